//! One check cycle over a set of watches: load their stored state, resolve every distinct
//! target once, diff, and commit resolutions, events and outbox rows.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::alert;
use crate::config::{Config, Watch};
use crate::diff::{self, Outcome, Policy};
use crate::event::{DetectedBy, Envelope, EnvelopeContext};
use crate::model::{Digest, ManifestEvidence, Observation, Reference, Resolution};
use crate::registry::{Registries, RegistryError};
use crate::resolve;
use crate::store::{CheckRecord, Store, StoreError, StoredEvent};

/// How one watch's check ended.
#[derive(Debug, Clone)]
pub struct WatchOutcome {
    /// The watch.
    pub name: String,
    /// The digest it resolved to, when the check succeeded and it exists.
    pub digest: Option<Digest>,
    /// Why the check failed, with the whole cause chain.
    pub error: Option<String>,
}

/// What a cycle did.
#[derive(Debug, Default)]
pub struct CycleReport {
    /// Every stored event, in storage order.
    pub events: Vec<Envelope>,
    /// Each watch's outcome, in the order given.
    pub watches: Vec<WatchOutcome>,
}

/// Options of one cycle.
#[derive(Debug, Clone, Copy)]
pub struct CycleOptions {
    /// Whether events get outbox rows for their sinks.
    pub route_alerts: bool,
    /// Poll or webhook.
    pub detected_by: DetectedBy,
}

/// Runs one cycle over `watches`. Fails only when the store does; registry trouble is a
/// per-watch outcome.
#[tracing::instrument(
    name = "check_cycle",
    level = "debug",
    skip_all,
    fields(watches = watches.len(), detected_by = ?options.detected_by)
)]
pub async fn run_cycle(
    config: &Config,
    registries: &Arc<Registries>,
    store: &Store,
    watches: &[&Watch],
    options: CycleOptions,
) -> Result<CycleReport, StoreError> {
    let keys = watches
        .iter()
        .map(|w| (w.name.clone(), w.reference.to_string()))
        .collect();
    let states = store.load_states(keys).await?;

    // The same tag or digest named by several watches is looked up once. Stored evidence for
    // each target lets an unchanged one cost a single HEAD. Referrers are looked up for a
    // target when any watch naming it asks for them.
    let mut targets: HashMap<Reference, Target<'_>> = HashMap::new();
    for w in watches {
        let last = states.get(&w.name).and_then(|s| s.last.as_ref());
        let known_tag = last
            .and_then(|l| l.tag.as_ref())
            .and_then(Observation::evidence);
        let known_pin = last
            .and_then(|l| l.pinned.as_ref())
            .and_then(Observation::evidence);
        for (target, known) in [
            (w.reference.tag_only(), known_tag),
            (w.reference.digest_only(), known_pin),
        ] {
            if let Some(t) = target {
                let slot = targets.entry(t).or_insert(Target {
                    known: None,
                    referrers: false,
                    watch: &w.name,
                    watches: 0,
                });
                if slot.known.is_none() {
                    slot.known = known.cloned();
                }
                slot.referrers |= w.referrers || !w.require_referrers.is_empty();
                slot.watches += 1;
            }
        }
    }

    let mut prefetched = list_tags(registries, targets.keys()).await;
    let mut tasks = JoinSet::new();
    for (target, slot) in targets {
        let Target {
            known, referrers, ..
        } = slot;
        let registries = registries.clone();
        let prefetch = prefetched.remove(&target).unwrap_or_default();
        // One span per lookup, parent of its registry requests: a lookup shared by several
        // watches is one check of them all (named after the first), and one span per watch
        // on top would double the tracing cost of a cycle for no extra information.
        let span = tracing::debug_span!(
            "check_watch",
            watch.name = slot.watch,
            image.ref = %target,
            driftwatch.watches = slot.watches,
        );
        tasks.spawn(
            async move {
                let started = std::time::Instant::now();
                let result =
                    resolve::observe(&registries, &target, known.as_ref(), referrers, prefetch)
                        .await;
                (target, result.map_err(Arc::new), started.elapsed())
            }
            .instrument(span),
        );
    }
    let mut observed: HashMap<Reference, Result<Observation, Arc<RegistryError>>> = HashMap::new();
    let mut took: HashMap<Reference, std::time::Duration> = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((target, result, elapsed)) => {
                took.insert(target.clone(), elapsed);
                observed.insert(target, result);
            }
            Err(e) => tracing::error!(cause = %e, "a resolve task panicked"),
        }
    }

    let source = crate::event::source_for_host();
    let now = Utc::now();
    let mut report = CycleReport::default();
    let mut records = Vec::with_capacity(watches.len());
    for w in watches {
        let outcome = assemble(w, &observed, now);
        let error = match &outcome {
            Outcome::Failed { reason } => {
                tracing::warn!(watch = %w.name, cause = %reason, "check failed");
                Some(reason.clone())
            }
            Outcome::Resolved(_) => None,
        };
        // A check takes as long as its slowest lookup; a shared lookup counts for each watch.
        let duration = [w.reference.tag_only(), w.reference.digest_only()]
            .into_iter()
            .flatten()
            .filter_map(|t| took.get(&t).copied())
            .max()
            .unwrap_or_default();
        let checked = match error {
            None => crate::telemetry::CheckOutcome::Ok,
            Some(_) => crate::telemetry::CheckOutcome::Failed,
        };
        crate::telemetry::metrics().check(checked, duration);
        let prev = states.get(&w.name).cloned().unwrap_or_default();
        let d = diff::diff(&policy(w, config), &prev, outcome);

        let ctx = EnvelopeContext {
            source,
            watch: &w.name,
            registry: w.reference.registry(),
            repository: w.reference.repository(),
            tag: w.reference.tag(),
            labels: &w.labels,
            detected_by: options.detected_by,
            time: now,
        };
        let mut events = Vec::with_capacity(d.changes.len());
        for change in d.changes {
            let envelope = Envelope::new(change, &ctx);
            let sinks = if options.route_alerts {
                alert::route(config, &envelope, d.baseline)
            } else {
                Vec::new()
            };
            tracing::debug!(watch = %w.name, event.type = %envelope.kind, "event");
            report.events.push(envelope.clone());
            let after = prev.last.as_ref().map(|l| l.time);
            let dedupe_key = alert::dedupe_key(&envelope, after);
            events.push(StoredEvent {
                envelope,
                baseline: d.baseline,
                sinks,
                dedupe_key,
            });
        }
        report.watches.push(WatchOutcome {
            name: w.name.clone(),
            digest: d
                .next
                .last
                .as_ref()
                .and_then(Resolution::digest)
                .cloned()
                .filter(|_| error.is_none()),
            error: error.clone(),
        });
        records.push(CheckRecord {
            watch: w.name.clone(),
            reference: w.reference.to_string(),
            checked_at: now,
            outcome: if error.is_some() { "failed" } else { "ok" },
            error,
            new_resolution: d.resolution_changed,
            state: d.next,
            events,
        });
    }
    let commit = tracing::debug_span!("store_commit", events = report.events.len());
    store
        .commit(records, config.daemon.history_limit)
        .instrument(commit)
        .await?;
    // Each event once, and only once it is stored: the collector sees what history shows.
    let telemetry = crate::telemetry::global();
    for event in &report.events {
        telemetry.emit_event(event);
    }
    Ok(report)
}

/// One distinct tag or digest to look up in a cycle, and what the watches naming it need.
struct Target<'a> {
    /// Stored evidence of this target, from any watch naming it.
    known: Option<ManifestEvidence>,
    /// Whether any watch naming it tracks referrers.
    referrers: bool,
    /// The first watch naming it, for the span.
    watch: &'a str,
    /// How many watches name it.
    watches: usize,
}

/// ACR: where several tags of one repository are watched, one paged `/acr/v1` tag listing
/// can replace a lookup per tag. It is used when it takes fewer requests: the listing is cut
/// (and not tried again until more tags are watched) when it needs as many pages as there
/// are tags to look up.
async fn list_tags<'a>(
    registries: &Registries,
    targets: impl Iterator<Item = &'a Reference>,
) -> HashMap<Reference, resolve::Prefetch> {
    use crate::registry::acr::Metadata;
    let mut by_repo: HashMap<(&str, &str), Vec<&Reference>> = HashMap::new();
    for t in targets.filter(|t| t.tag().is_some() && t.digest().is_none()) {
        by_repo
            .entry((t.registry(), t.repository()))
            .or_default()
            .push(t);
    }
    let mut out = HashMap::new();
    for ((registry, repo), refs) in by_repo {
        let n = refs.len();
        let Ok(client) = registries.client(registry) else {
            continue;
        };
        if n < 2
            || !client.metadata_usable(repo)
            || client.listing_pages(repo).is_some_and(|p| p >= n)
        {
            continue;
        }
        match client.acr_tag_listing(repo, n - 1).await {
            Ok(Metadata::Found(Some(list))) => {
                let mut by_name: HashMap<String, crate::registry::acr::AcrTag> =
                    list.into_iter().map(|t| (t.name.clone(), t)).collect();
                for r in refs {
                    let listed = r.tag().and_then(|t| by_name.remove(t));
                    let prefetch = match listed {
                        Some(t) => resolve::Prefetch::Listed(t),
                        None => resolve::Prefetch::Unlisted,
                    };
                    out.insert(r.clone(), prefetch);
                }
            }
            Ok(Metadata::Found(None) | Metadata::NotFound) => {}
            Ok(Metadata::Unavailable(reason)) => client.metadata_refused(repo, &reason),
            // The lookups per tag go ahead and report whatever is wrong.
            Err(e) => tracing::debug!(registry, repo, cause = %e, "tag listing failed"),
        }
    }
    out
}

fn policy(w: &Watch, config: &Config) -> Policy {
    Policy {
        tag_subject: w.reference.tag_only().map(|r| r.to_string()),
        pin_subject: w.reference.digest_only().map(|r| r.to_string()),
        pinned: w.reference.digest().cloned(),
        platforms: w.platforms.clone(),
        failing_after: config.daemon.failing_after,
        track_referrers: w.referrers,
        require_referrers: w.require_referrers.clone(),
        soft_delete_reminder: config
            .registries
            .get(w.reference.registry())
            .map_or(Some(crate::config::DEFAULT_SOFT_DELETE_REMINDER), |r| {
                r.soft_delete_reminder
            })
            .and_then(|d| chrono::Duration::from_std(d).ok()),
    }
}

/// Puts a watch's resolution together from the targets it names; any failed lookup fails the
/// whole check, so that state only ever moves on complete, authoritative answers.
fn assemble(
    w: &Watch,
    observed: &HashMap<Reference, Result<Observation, Arc<RegistryError>>>,
    now: chrono::DateTime<Utc>,
) -> Outcome {
    let lookup = |target: Option<Reference>| -> Result<Option<Observation>, String> {
        let Some(t) = target else { return Ok(None) };
        match observed.get(&t) {
            Some(Ok(o)) => Ok(Some(o.clone())),
            Some(Err(e)) => Err(error_chain(e.as_ref())),
            None => Err("the lookup did not complete".to_string()),
        }
    };
    let tag = lookup(w.reference.tag_only());
    let pinned = lookup(w.reference.digest_only());
    match (tag, pinned) {
        (Ok(tag), Ok(pinned)) => Outcome::Resolved(Resolution {
            time: now,
            tag,
            pinned,
        }),
        (Err(reason), _) | (_, Err(reason)) => Outcome::Failed { reason },
    }
}

/// An error and its causes, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}
