//! Inbound registry notifications: ACR webhook payloads and Azure Event Grid deliveries (Event
//! Grid schema or CloudEvents 1.0) read into [`Notice`]s, and the watches each notice concerns.
//! Pure, no I/O: the routes, and the triggering of checks, live in [`crate::server`].
//!
//! A notice is a hint to check early, never a finding: registries do not report untagging or
//! restores, so the checks it triggers (and the scheduled ones) stay the truth. Parsing is
//! tolerant of fields it does not use and of event types it does not know, and strict about
//! the fields it does use.

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::model::{Digest, Reference};

/// The largest hook body accepted: Event Grid caps a batch at 1 MB, and an ACR webhook
/// payload is well under a kilobyte.
pub const MAX_BODY: usize = 1024 * 1024;

/// The Event Grid event type of the subscription-validation handshake.
pub const SUBSCRIPTION_VALIDATION_EVENT: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

/// What happened to the artifact a notice names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// An image or chart was pushed (a tag may have moved).
    Pushed,
    /// A manifest, chart or repository was deleted.
    Deleted,
    /// A push was quarantined (ACR quarantine policy).
    Quarantined,
}

impl Action {
    /// `pushed`, `deleted` or `quarantined`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pushed => "pushed",
            Action::Deleted => "deleted",
            Action::Quarantined => "quarantined",
        }
    }
}

/// One registry notification: `action` at (registry, repository, tag, digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What happened.
    pub action: Action,
    /// The login server from `request.host`, `HOST[:PORT]`; absent from chart events.
    pub host: Option<String>,
    /// The registry's Azure resource name, from an Event Grid `topic` or a CloudEvents
    /// `source` (`…/registries/<name>`); used only when `host` is unknown.
    pub registry_name: Option<String>,
    /// The repository.
    pub repository: String,
    /// The tag, when the payload has one (deletions never do).
    pub tag: Option<String>,
    /// The manifest digest, when the payload has one.
    pub digest: Option<Digest>,
}

impl Notice {
    /// Whether a check of `reference` could see this notice's change: same registry and
    /// repository, and, when the notice names a tag, the same tag or (for a pinned
    /// reference) the pinned digest. A notice without a tag (a deletion) concerns every
    /// reference in the repository, since it cannot say which tags pointed at the digest.
    pub fn concerns(&self, reference: &Reference) -> bool {
        self.same_registry(reference.registry())
            && self.repository == reference.repository()
            && self.same_artifact(reference)
    }

    fn same_registry(&self, registry: &str) -> bool {
        match (&self.host, &self.registry_name) {
            (Some(host), _) => host.eq_ignore_ascii_case(registry),
            (None, Some(name)) => first_label(registry).eq_ignore_ascii_case(name),
            // Nothing says which registry; triggering watches of every registry that has a
            // repository of that name would be a guess.
            (None, None) => false,
        }
    }

    fn same_artifact(&self, reference: &Reference) -> bool {
        let Some(tag) = &self.tag else {
            return true;
        };
        if reference.tag() == Some(tag.as_str()) {
            return true;
        }
        match (reference.digest(), &self.digest) {
            (Some(pin), Some(digest)) => pin == digest,
            _ => false,
        }
    }
}

/// `myreg` of `myreg.azurecr.io` or `myreg.azurecr.io:443`.
fn first_label(host: &str) -> &str {
    let without_port = host.split(':').next().unwrap_or(host);
    without_port.split('.').next().unwrap_or(without_port)
}

/// The names of the watches in `config` that any of `notices` concerns, each once, in config
/// order.
pub fn matching_watches(config: &Config, notices: &[Notice]) -> Vec<String> {
    // By repository first: a batch of a thousand events against ten thousand watches must not
    // cost ten million comparisons.
    let mut by_repository: HashMap<&str, Vec<&Notice>> = HashMap::new();
    for n in notices {
        by_repository.entry(&n.repository).or_default().push(n);
    }
    // Watch names are unique, so each is named once.
    config
        .watches
        .iter()
        .filter(|w| {
            by_repository
                .get(w.reference.repository())
                .is_some_and(|ns| ns.iter().any(|n| n.concerns(&w.reference)))
        })
        .map(|w| w.name.clone())
        .collect()
}

/// What an Event Grid endpoint received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Registry notices; none when every event was of a type that is not about images.
    Notices(Vec<Notice>),
    /// The subscription-validation handshake, with the code to echo back.
    Validation(String),
}

/// Why a hook body was refused; the message names the place in the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The body is not JSON at all.
    #[error("the body is not valid JSON: {0}")]
    Json(String),
    /// JSON, but not of the expected shape; `at` is a path such as `$[0].data.target`.
    #[error("{at}: {message}")]
    Shape {
        /// Where in the body, `$` being the whole body.
        at: String,
        /// What is wrong there.
        message: String,
    },
}

fn shape(at: &str, message: impl Into<String>) -> PayloadError {
    PayloadError::Shape {
        at: at.to_string(),
        message: message.into(),
    }
}

/// Deserializes `value` (found at `at`), naming the offending field on failure.
fn typed<T: DeserializeOwned>(value: &Value, at: &str) -> Result<T, PayloadError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let at = match inner.as_str() {
            "." => at.to_string(),
            p if p.starts_with('[') => format!("{at}{p}"),
            p => format!("{at}.{p}"),
        };
        shape(&at, e.into_inner().to_string())
    })
}

fn json(body: &[u8]) -> Result<Value, PayloadError> {
    serde_json::from_slice(body).map_err(|e| PayloadError::Json(e.to_string()))
}

/// The part of an ACR payload that a notice is made of: the webhook body, and the `data` of
/// the Event Grid and CloudEvents forms.
#[derive(Deserialize)]
#[serde(expecting = "an object with a target")]
struct AcrBody {
    target: AcrTarget,
    #[serde(default)]
    request: Option<AcrRequest>,
}

#[derive(Deserialize)]
#[serde(expecting = "an object with a repository")]
struct AcrTarget {
    repository: String,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    digest: Option<String>,
}

#[derive(Deserialize)]
#[serde(expecting = "an object")]
struct AcrRequest {
    #[serde(default)]
    host: Option<String>,
}

#[derive(Deserialize)]
#[serde(expecting = "an ACR webhook object with an action")]
struct AcrHead {
    action: String,
}

impl AcrBody {
    fn into_notice(
        self,
        action: Action,
        registry_name: Option<String>,
        at: &str,
    ) -> Result<Notice, PayloadError> {
        let target = self.target;
        if target.repository.is_empty() {
            return Err(shape(
                &format!("{at}.target.repository"),
                "empty repository",
            ));
        }
        let digest = match target.digest.filter(|d| !d.is_empty()) {
            Some(d) => Some(
                Digest::parse(&d)
                    .map_err(|e| shape(&format!("{at}.target.digest"), e.to_string()))?,
            ),
            None => None,
        };
        Ok(Notice {
            action,
            host: self.request.and_then(|r| r.host).filter(|h| !h.is_empty()),
            registry_name,
            repository: target.repository,
            tag: target.tag.filter(|t| !t.is_empty()),
            digest,
        })
    }
}

/// Reads an ACR webhook payload (`POST /v1/hooks/acr`): one JSON object whose `action` is
/// `push`, `delete`, `quarantine`, `chart_push` or `chart_delete`. Other actions (the
/// portal's `ping`) give no notice.
pub fn parse_acr(body: &[u8]) -> Result<Vec<Notice>, PayloadError> {
    let value = json(body)?;
    if value.is_array() {
        return Err(shape(
            "$",
            "expected one ACR webhook object, found an array (Event Grid deliveries go to \
             /v1/hooks/eventgrid)",
        ));
    }
    let head: AcrHead = typed(&value, "$")?;
    let action = match head.action.as_str() {
        "push" | "chart_push" => Action::Pushed,
        "delete" | "chart_delete" => Action::Deleted,
        "quarantine" => Action::Quarantined,
        _ => return Ok(Vec::new()),
    };
    let body: AcrBody = typed(&value, "$")?;
    Ok(vec![body.into_notice(action, None, "$")?])
}

#[derive(Deserialize)]
#[serde(expecting = "an Event Grid event object")]
struct GridEvent {
    #[serde(rename = "eventType")]
    event_type: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
#[serde(expecting = "a CloudEvent object")]
struct CloudEvent {
    specversion: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
#[serde(expecting = "an object with a validationCode")]
struct ValidationData {
    #[serde(rename = "validationCode")]
    validation_code: String,
}

/// One event of a delivery, whichever schema it came in.
enum Item {
    Notice(Notice),
    Validation(String),
    Ignored,
}

/// The action an ACR event type stands for; `None` for types that are not about images.
fn grid_action(event_type: &str) -> Option<Action> {
    match event_type {
        "Microsoft.ContainerRegistry.ImagePushed" | "Microsoft.ContainerRegistry.ChartPushed" => {
            Some(Action::Pushed)
        }
        "Microsoft.ContainerRegistry.ImageDeleted" | "Microsoft.ContainerRegistry.ChartDeleted" => {
            Some(Action::Deleted)
        }
        _ => None,
    }
}

/// The name after `/registries/` in an Azure resource id.
fn registry_name(resource: Option<&str>) -> Option<String> {
    let parts: Vec<&str> = resource?.split('/').collect();
    let i = parts
        .iter()
        .rposition(|p| p.eq_ignore_ascii_case("registries"))?;
    parts
        .get(i + 1)
        .filter(|n| !n.is_empty())
        .map(|n| n.to_ascii_lowercase())
}

fn grid_item(value: &Value, at: &str) -> Result<Item, PayloadError> {
    let event: GridEvent = typed(value, at)?;
    if event.event_type == SUBSCRIPTION_VALIDATION_EVENT {
        let data: ValidationData = typed(&event.data, &format!("{at}.data"))?;
        return Ok(Item::Validation(data.validation_code));
    }
    let Some(action) = grid_action(&event.event_type) else {
        return Ok(Item::Ignored);
    };
    let at = format!("{at}.data");
    let body: AcrBody = typed(&event.data, &at)?;
    let name = registry_name(event.topic.as_deref());
    Ok(Item::Notice(body.into_notice(action, name, &at)?))
}

fn cloud_item(value: &Value, at: &str) -> Result<Item, PayloadError> {
    let event: CloudEvent = typed(value, at)?;
    if !event.specversion.starts_with("1.") {
        return Err(shape(
            &format!("{at}.specversion"),
            format!(
                "unsupported CloudEvents version {:?} (expected 1.0)",
                event.specversion
            ),
        ));
    }
    let Some(action) = grid_action(&event.kind) else {
        return Ok(Item::Ignored);
    };
    let at = format!("{at}.data");
    let body: AcrBody = typed(&event.data, &at)?;
    let name = registry_name(event.source.as_deref());
    Ok(Item::Notice(body.into_notice(action, name, &at)?))
}

fn item(value: &Value, at: &str) -> Result<Item, PayloadError> {
    let Some(object) = value.as_object() else {
        return Err(shape(at, "expected an event object"));
    };
    if object.contains_key("specversion") {
        cloud_item(value, at)
    } else if object.contains_key("eventType") {
        grid_item(value, at)
    } else {
        Err(shape(
            at,
            "neither an Event Grid event (no eventType) nor a CloudEvent (no specversion)",
        ))
    }
}

/// Reads an Event Grid delivery (`POST /v1/hooks/eventgrid`): an Event Grid-schema array, a
/// CloudEvents batch array, or one structured CloudEvent. Events of types other than the
/// four `Microsoft.ContainerRegistry.*` image and chart events are ignored; a
/// `Microsoft.EventGrid.SubscriptionValidationEvent` must come alone.
pub fn parse_eventgrid(body: &[u8]) -> Result<Delivery, PayloadError> {
    let value = json(body)?;
    let items = match &value {
        Value::Array(events) => events
            .iter()
            .enumerate()
            .map(|(i, e)| item(e, &format!("$[{i}]")))
            .collect::<Result<Vec<_>, _>>()?,
        Value::Object(_) => vec![item(&value, "$")?],
        _ => {
            return Err(shape(
                "$",
                "expected an array of events or one CloudEvent object",
            ));
        }
    };
    let mut notices = Vec::new();
    let many = items.len() > 1;
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Item::Notice(n) => notices.push(n),
            Item::Validation(code) if !many => return Ok(Delivery::Validation(code)),
            Item::Validation(_) => {
                return Err(shape(
                    &format!("$[{i}]"),
                    "a subscription-validation event must be delivered alone",
                ));
            }
            Item::Ignored => {}
        }
    }
    Ok(Delivery::Notices(notices))
}

/// Whether an `Authorization` header value is `Bearer <secret>`. The comparison takes the same
/// time whatever the value, so response times do not reveal how much of a guess was right.
pub fn bearer_matches(authorization: Option<&[u8]>, secret: &str) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    let Some(split) = value.iter().position(|b| *b == b' ') else {
        return false;
    };
    let (scheme, token) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return false;
    }
    constant_time_eq(token.trim_ascii(), secret.as_bytes())
}

/// Compares fixed-size hashes of both sides, so neither the position of the first difference
/// nor the secret's length shows in the time taken.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Watch;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    /// The documented ACR webhook push sample (§2e), with a full-length digest.
    fn acr_push() -> String {
        format!(
            r#"{{"id":"cb8c3971-9adc-488b-xxxx-43cbb4974ff5",
                "timestamp":"2023-11-17T16:52:01.343145347Z","action":"push",
                "target":{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
                  "size":524,"digest":"{D1}","length":524,"repository":"hello-world",
                  "tag":"v1"}},
                "request":{{"id":"3cbb6949-7549-4fa1-xxxx-a6d5451dffc7",
                  "host":"myregistry.azurecr.io","method":"PUT",
                  "useragent":"docker/17.09.0-ce go/go1.8.3"}}}}"#
        )
    }

    const TOPIC: &str = concat!(
        "/subscriptions/0000/resourceGroups/rg/providers/",
        "Microsoft.ContainerRegistry/registries/MyReg"
    );

    fn grid(event_type: &str, subject: &str, data: &str) -> String {
        format!(
            r#"[{{"id":"831e1650-001e-001b-66ab-eeb76e069631","topic":"{TOPIC}",
                 "subject":"{subject}","eventType":"{event_type}",
                 "eventTime":"2021-01-01T00:00:00.0Z","data":{data},
                 "dataVersion":"2.0","metadataVersion":"1"}}]"#
        )
    }

    fn image_data(tag: Option<&str>, host: Option<&str>) -> String {
        let tag = tag.map_or(String::new(), |t| format!(r#","tag":"{t}""#));
        let request = host.map_or(String::new(), |h| {
            format!(r#","request":{{"id":"r1","addr":"10.0.0.1","host":"{h}","method":"PUT"}}"#)
        });
        format!(
            r#"{{"id":"e1","timestamp":"2021-01-01T00:00:00Z","action":"push","location":"westus",
                 "target":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":3,
                   "digest":"{D1}","length":3,"repository":"team/api"{tag}}}{request},
                 "actor":{{"name":"someone"}},"source":{{"addr":"x","instanceID":"y"}}}}"#
        )
    }

    fn notice(host: Option<&str>, name: Option<&str>, tag: Option<&str>, digest: &str) -> Notice {
        Notice {
            action: Action::Pushed,
            host: host.map(str::to_string),
            registry_name: name.map(str::to_string),
            repository: "team/api".to_string(),
            tag: tag.map(str::to_string),
            digest: Some(Digest::parse(digest).unwrap()),
        }
    }

    fn reference(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn an_acr_push_names_host_repository_tag_and_digest() {
        let notices = parse_acr(acr_push().as_bytes()).unwrap();
        assert_eq!(
            notices,
            vec![Notice {
                action: Action::Pushed,
                host: Some("myregistry.azurecr.io".to_string()),
                registry_name: None,
                repository: "hello-world".to_string(),
                tag: Some("v1".to_string()),
                digest: Some(Digest::parse(D1).unwrap()),
            }]
        );
    }

    #[test]
    fn an_acr_delete_has_no_tag() {
        let body = format!(
            r#"{{"id":"1","timestamp":"2023-11-17T16:52:01Z","action":"delete",
                "target":{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
                  "digest":"{D1}","repository":"hello-world"}},
                "request":{{"id":"2","host":"myregistry.azurecr.io","method":"DELETE",
                  "useragent":"python-requests/2.18.4"}}}}"#
        );
        let n = parse_acr(body.as_bytes()).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].action, Action::Deleted);
        assert_eq!(n[0].tag, None);
        assert_eq!(n[0].host.as_deref(), Some("myregistry.azurecr.io"));
    }

    #[test]
    fn an_acr_chart_push_has_no_host_and_a_quarantine_is_its_own_action() {
        let chart = format!(
            r#"{{"id":"1","timestamp":"2023-11-17T16:52:01Z","action":"chart_push",
                "target":{{"mediaType":"application/vnd.acr.helm.chart","size":25265,
                  "digest":"{D1}","repository":"repo","tag":"wordpress-5.4.0.tgz",
                  "name":"wordpress","version":"5.4.0.tgz"}}}}"#
        );
        let n = parse_acr(chart.as_bytes()).unwrap();
        assert_eq!((n[0].action, n[0].host.as_deref()), (Action::Pushed, None));
        let deleted = chart.replace("chart_push", "chart_delete");
        assert_eq!(
            parse_acr(deleted.as_bytes()).unwrap()[0].action,
            Action::Deleted
        );

        let quarantine = acr_push().replace(r#""push""#, r#""quarantine""#);
        let n = parse_acr(quarantine.as_bytes()).unwrap();
        assert_eq!(n[0].action, Action::Quarantined);
        assert_eq!(n[0].tag.as_deref(), Some("v1"));
    }

    #[test]
    fn an_unknown_acr_action_such_as_ping_gives_no_notice() {
        let ping = r#"{"id":"1","timestamp":"2023-11-17T16:52:01Z","action":"ping"}"#;
        assert_eq!(parse_acr(ping.as_bytes()).unwrap(), vec![]);
    }

    #[test]
    fn malformed_acr_payloads_say_what_is_wrong_and_where() {
        let err = |body: &str| parse_acr(body.as_bytes()).unwrap_err().to_string();
        assert!(err("{not json").starts_with("the body is not valid JSON: "));
        assert!(err("[]").starts_with("$: expected one ACR webhook object"));
        assert!(err(r#"{"target":{}}"#).contains("$: missing field `action`"));
        assert!(err(r#"{"action":"push"}"#).contains("$: missing field `target`"));
        let e = err(r#"{"action":"push","target":{"repository":7}}"#);
        assert!(
            e.starts_with("$.target.repository: invalid type: integer"),
            "{e}"
        );
        let e = err(r#"{"action":"push","target":{"repository":"r","digest":"sha256:abc"}}"#);
        assert!(e.starts_with("$.target.digest: "), "{e}");
        let e = err(r#"{"action":"push","target":{"repository":""}}"#);
        assert_eq!(e, "$.target.repository: empty repository");
    }

    #[test]
    fn an_event_grid_image_push_carries_the_host_and_the_topic_registry_name() {
        let body = grid(
            "Microsoft.ContainerRegistry.ImagePushed",
            "team/api:v1",
            &image_data(Some("v1"), Some("myreg.azurecr.io")),
        );
        let Delivery::Notices(n) = parse_eventgrid(body.as_bytes()).unwrap() else {
            panic!("not notices");
        };
        assert_eq!(
            n,
            vec![notice(
                Some("myreg.azurecr.io"),
                Some("myreg"),
                Some("v1"),
                D1
            )]
        );
    }

    #[test]
    fn event_grid_deletes_charts_and_other_types_in_one_batch() {
        let deleted = grid(
            "Microsoft.ContainerRegistry.ImageDeleted",
            "team/api",
            &format!(
                r#"{{"id":"1","timestamp":"t","action":"delete","target":{{"mediaType":"m",
                     "digest":"{D2}","repository":"team/api"}},"request":{{"host":"h.io"}}}}"#
            ),
        );
        let chart = grid(
            "Microsoft.ContainerRegistry.ChartPushed",
            "team/api:1.0.0",
            &format!(
                r#"{{"id":"1","timestamp":"t","action":"chart_push","target":{{
                     "mediaType":"application/vnd.acr.helm.chart","size":1,"digest":"{D1}",
                     "repository":"team/api","tag":"c-1.0.0.tgz","name":"c","version":"1.0.0"}}}}"#
            ),
        );
        let other = grid("Microsoft.Storage.BlobCreated", "x", r#"{"url":"u"}"#);
        let body = format!(
            "[{},{},{}]",
            &deleted[1..deleted.len() - 1],
            &chart[1..chart.len() - 1],
            &other[1..other.len() - 1]
        );
        let Delivery::Notices(n) = parse_eventgrid(body.as_bytes()).unwrap() else {
            panic!("not notices");
        };
        assert_eq!(n.len(), 2);
        assert_eq!((n[0].action, n[0].tag.as_deref()), (Action::Deleted, None));
        assert_eq!(n[1].action, Action::Pushed);
        assert_eq!(
            (n[1].host.as_deref(), n[1].registry_name.as_deref()),
            (None, Some("myreg"))
        );
    }

    #[test]
    fn the_subscription_validation_event_gives_its_code() {
        let url = concat!(
            "https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/x/validate",
            "?id=1&t=2&apiVersion=2018-05-01-preview&token=3"
        );
        let body = format!(
            r#"[{{"id":"2d1781af-3a4c-4d7c-bd0c-e34b19da4e66","topic":"/subscriptions/xx",
            "subject":"","data":{{"validationCode":"512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
            "validationUrl":"{url}"}},
            "eventType":"Microsoft.EventGrid.SubscriptionValidationEvent",
            "eventTime":"2018-01-25T22:12:19.4556811Z","metadataVersion":"1","dataVersion":"1"}}]"#
        );
        assert_eq!(
            parse_eventgrid(body.as_bytes()).unwrap(),
            Delivery::Validation("512d38b6-c7b8-40c8-89fe-f46f9e9622b6".to_string())
        );
        let no_code = r#"[{"eventType":"Microsoft.EventGrid.SubscriptionValidationEvent",
            "data":{}}]"#;
        let e = parse_eventgrid(no_code.as_bytes()).unwrap_err().to_string();
        assert_eq!(e, "$[0].data: missing field `validationCode`");
        let doubled = format!(
            "[{},{}]",
            &body[1..body.len() - 1],
            &body[1..body.len() - 1]
        );
        let e = parse_eventgrid(doubled.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with("$[0]: a subscription-validation event must be delivered alone"));
    }

    #[test]
    fn a_structured_cloud_event_and_a_cloud_events_batch() {
        let event = format!(
            r#"{{"id":"e1","source":"{}",
                 "subject":"team/api:v1","type":"Microsoft.ContainerRegistry.ImagePushed",
                 "time":"2021-01-01T00:00:00Z","specversion":"1.0","data":{}}}"#,
            TOPIC.replace("MyReg", "myreg"),
            image_data(Some("v1"), None)
        );
        let expected = Delivery::Notices(vec![notice(None, Some("myreg"), Some("v1"), D1)]);
        assert_eq!(parse_eventgrid(event.as_bytes()).unwrap(), expected);
        let batch = format!("[{event},{event}]");
        let Delivery::Notices(n) = parse_eventgrid(batch.as_bytes()).unwrap() else {
            panic!("not notices");
        };
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn malformed_event_grid_deliveries_say_what_is_wrong_and_where() {
        let err = |body: &str| parse_eventgrid(body.as_bytes()).unwrap_err().to_string();
        assert!(err("[{").starts_with("the body is not valid JSON: "));
        assert_eq!(
            err("42"),
            "$: expected an array of events or one CloudEvent object"
        );
        assert_eq!(err("[1]"), "$[0]: expected an event object");
        assert!(err(r#"[{"id":"x"}]"#).starts_with("$[0]: neither an Event Grid event"));
        let e = err(
            r#"[{"eventType":"Microsoft.ContainerRegistry.ImagePushed","data":{
            "target":{"tag":"v1"}}}]"#,
        );
        assert_eq!(e, "$[0].data.target: missing field `repository`");
        let e = err(r#"{"specversion":"0.3","type":"t"}"#);
        assert!(
            e.starts_with("$.specversion: unsupported CloudEvents version"),
            "{e}"
        );
        let e = err(r#"{"specversion":"1.0"}"#);
        assert_eq!(e, "$: missing field `type`");
    }

    #[test]
    fn the_registry_name_is_read_from_the_resource_id() {
        let id = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ContainerRegistry/\
                  registries/MyReg";
        assert_eq!(registry_name(Some(id)).as_deref(), Some("myreg"));
        assert_eq!(registry_name(Some("/subscriptions/s")), None);
        assert_eq!(registry_name(Some("/x/registries/")), None);
        assert_eq!(registry_name(None), None);
    }

    #[test]
    fn a_tagged_notice_concerns_its_tag_and_a_pin_on_its_digest() {
        let n = notice(Some("MyReg.azurecr.io"), None, Some("v1"), D1);
        assert!(n.concerns(&reference("myreg.azurecr.io/team/api:v1")));
        assert!(n.concerns(&reference(&format!("myreg.azurecr.io/team/api@{D1}"))));
        assert!(n.concerns(&reference(&format!("myreg.azurecr.io/team/api:v2@{D1}"))));
        assert!(!n.concerns(&reference(&format!("myreg.azurecr.io/team/api@{D2}"))));
        assert!(!n.concerns(&reference("myreg.azurecr.io/team/api:v2")));
        assert!(!n.concerns(&reference("myreg.azurecr.io/team/web:v1")));
        assert!(!n.concerns(&reference("other.azurecr.io/team/api:v1")));
        assert!(!n.concerns(&reference("myreg.example.com/team/api:v1")));
    }

    #[test]
    fn an_untagged_notice_concerns_every_watch_of_the_repository() {
        let mut n = notice(Some("127.0.0.1:5000"), None, None, D1);
        n.action = Action::Deleted;
        assert!(n.concerns(&reference("127.0.0.1:5000/team/api:v1")));
        assert!(n.concerns(&reference(&format!("127.0.0.1:5000/team/api@{D2}"))));
        assert!(!n.concerns(&reference("127.0.0.1:5001/team/api:v1")));
    }

    #[test]
    fn without_a_host_the_registry_name_matches_the_first_label() {
        let n = notice(None, Some("myreg"), Some("v1"), D1);
        assert!(n.concerns(&reference("myreg.azurecr.io/team/api:v1")));
        assert!(n.concerns(&reference("myreg.azurecr.io:443/team/api:v1")));
        assert!(!n.concerns(&reference("myreg2.azurecr.io/team/api:v1")));
        let nowhere = notice(None, None, Some("v1"), D1);
        assert!(!nowhere.concerns(&reference("myreg.azurecr.io/team/api:v1")));
    }

    fn watch(name: &str, image: &str) -> Arc<Watch> {
        Arc::new(Watch {
            name: name.to_string(),
            reference: reference(image),
            schedule: "0 * * * * *".to_string(),
            platforms: vec![],
            referrers: false,
            require_referrers: vec![],
            labels: Default::default(),
        })
    }

    #[test]
    fn matching_watches_are_named_once_in_config_order() {
        let mut config = Config::defaults();
        config.watches = vec![
            watch("web", "myreg.azurecr.io/team/web:v1"),
            watch("pinned", &format!("myreg.azurecr.io/team/api@{D1}")),
            watch("api", "myreg.azurecr.io/team/api:v1"),
            watch("api-v2", "myreg.azurecr.io/team/api:v2"),
        ];
        let notices = [
            notice(Some("myreg.azurecr.io"), None, Some("v1"), D1),
            notice(Some("myreg.azurecr.io"), None, Some("v1"), D2),
        ];
        assert_eq!(matching_watches(&config, &notices), ["pinned", "api"]);
        assert!(matching_watches(&config, &[]).is_empty());
    }

    #[test]
    fn the_bearer_secret_must_match_exactly() {
        let ok = |h: &str| bearer_matches(Some(h.as_bytes()), "s3cret");
        assert!(ok("Bearer s3cret"));
        assert!(ok("bearer  s3cret "));
        assert!(!ok("Bearer s3cre"));
        assert!(!ok("Bearer s3cret2"));
        assert!(!ok("Basic s3cret"));
        assert!(!ok("s3cret"));
        assert!(!ok("Bearer "));
        assert!(!bearer_matches(None, "s3cret"));
    }
}
