//! The differ: a pure function from the stored state of a watch and the outcome of a check to
//! the events that outcome means and the state to store next. No I/O, no clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::event::Severity;
use crate::event::{Change, EventType, StateSummary};
use crate::model::{
    Digest, ItemAttributes, ManifestEvidence, Observation, Platform, Resolution, SoftDelete,
};

/// What the differ needs to know about a watch.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The tag reference (`HOST/REPO:TAG`), for a watch that names a tag.
    pub tag_subject: Option<String>,
    /// The pinned reference (`HOST/REPO@DIGEST`), for a watch that names a digest.
    pub pin_subject: Option<String>,
    /// The pinned digest.
    pub pinned: Option<Digest>,
    /// Platforms the watch is limited to (`os/arch[/variant]`); empty means all.
    pub platforms: Vec<String>,
    /// Consecutive failures before `check.failing`.
    pub failing_after: u32,
    /// Whether referrers of the watched digest are tracked (`referrers.lost`/`added`).
    pub track_referrers: bool,
    /// Artifact types or aliases that must have a referrer (`referrers.missing`).
    pub require_referrers: Vec<String>,
    /// How long before a soft-deleted digest's expected purge to remind; `None` for never.
    pub soft_delete_reminder: Option<chrono::Duration>,
}

/// The stored state of a watch between checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchState {
    /// The last successful resolution.
    pub last: Option<Resolution>,
    /// Failed checks since the last success.
    pub consecutive_failures: u32,
    /// Whether `check.failing` has been raised and not yet recovered.
    pub failing: bool,
}

/// What a check produced.
// Observations are nearly always the large variant; boxing it would add an allocation
// per lookup and buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The registry gave authoritative answers.
    Resolved(Resolution),
    /// The check could not be completed (auth, network, 5xx, bad body).
    Failed {
        /// Why, for the event detail.
        reason: String,
    },
}

/// The differ's answer.
#[derive(Debug, Clone)]
pub struct Diff {
    /// Events, in the order they should be stored and delivered.
    pub changes: Vec<Change>,
    /// The state to store.
    pub next: WatchState,
    /// Whether `next.last` differs from the stored resolution in substance (a new digest, a
    /// presence change), so that a new history row is worth writing.
    pub resolution_changed: bool,
    /// Whether this was the watch's first resolution.
    pub baseline: bool,
}

/// Compares a check's outcome with the stored state.
pub fn diff(policy: &Policy, prev: &WatchState, outcome: Outcome) -> Diff {
    let subject = policy
        .tag_subject
        .clone()
        .or(policy.pin_subject.clone())
        .unwrap_or_default();
    match outcome {
        // A failure never touches the stored resolution: only authoritative answers may.
        Outcome::Failed { reason } => {
            let failures = prev.consecutive_failures.saturating_add(1);
            let mut changes = Vec::new();
            let raise = !prev.failing && failures >= policy.failing_after;
            if raise {
                let mut c = Change::new(EventType::CheckFailing, &subject);
                c.detail = json!({"consecutive_failures": failures, "reason": reason});
                changes.push(c);
            }
            Diff {
                changes,
                next: WatchState {
                    last: prev.last.clone(),
                    consecutive_failures: failures,
                    failing: prev.failing || raise,
                },
                resolution_changed: false,
                baseline: false,
            }
        }
        Outcome::Resolved(mut res) => {
            let mut changes = Vec::new();
            if prev.failing {
                let mut c = Change::new(EventType::CheckRecovered, &subject);
                c.detail = json!({"after_failures": prev.consecutive_failures});
                changes.push(c);
            }
            let last = prev.last.as_ref();
            remember_last_digest(&mut res.tag, last.and_then(|l| l.tag.as_ref()));
            remember_last_digest(&mut res.pinned, last.and_then(|l| l.pinned.as_ref()));

            if let (Some(subject), Some(cur)) = (&policy.tag_subject, &res.tag) {
                let pin = res.pinned.as_ref().and_then(Observation::evidence);
                tag_changes(
                    policy,
                    subject,
                    last.and_then(|l| l.tag.as_ref()),
                    cur,
                    pin,
                    &mut changes,
                );
            }
            if let (Some(subject), Some(cur)) = (&policy.pin_subject, &mut res.pinned) {
                pin_changes(
                    policy,
                    subject,
                    last.and_then(|l| l.pinned.as_ref()),
                    cur,
                    res.time,
                    &mut changes,
                );
            }
            for (subject, prev, cur) in [
                (
                    &policy.tag_subject,
                    last.and_then(|l| l.tag.as_ref()),
                    &res.tag,
                ),
                (
                    &policy.pin_subject,
                    last.and_then(|l| l.pinned.as_ref()),
                    &res.pinned,
                ),
            ] {
                if let (
                    Some(subject),
                    Some(Observation::Present(p)),
                    Some(Observation::Present(c)),
                ) = (subject, prev, cur)
                {
                    attribute_changes(subject, p, c, &mut changes);
                }
            }
            // Referrers belong to the digest the watch stands for: the tag's, else the pin's.
            let (prev_primary, cur_primary) = match &policy.tag_subject {
                Some(_) => (last.and_then(|l| l.tag.as_ref()), res.tag.as_ref()),
                None => (last.and_then(|l| l.pinned.as_ref()), res.pinned.as_ref()),
            };
            if let Some(Observation::Present(c)) = cur_primary {
                let prev = prev_primary.and_then(Observation::evidence);
                referrer_changes(policy, &subject, prev, c, &mut changes);
            }

            let resolution_changed = match last {
                None => true,
                Some(l) => !same(&l.tag, &res.tag) || !same(&l.pinned, &res.pinned),
            };
            Diff {
                changes,
                baseline: last.is_none(),
                next: WatchState {
                    last: Some(res),
                    consecutive_failures: 0,
                    failing: false,
                },
                resolution_changed,
            }
        }
    }
}

/// An absent observation keeps the digest that was last seen there, so that a later
/// reappearance can be told apart from a first appearance, and whether the purge reminder
/// for the same soft deletion was already raised.
fn remember_last_digest(cur: &mut Option<Observation>, prev: Option<&Observation>) {
    if let Some(Observation::Absent {
        last_digest,
        soft_delete,
        ..
    }) = cur
    {
        *last_digest = match prev {
            Some(Observation::Present(p)) => Some(p.digest.clone()),
            Some(Observation::Absent { last_digest, .. }) => last_digest.clone(),
            None => None,
        };
        // A listing that cannot be read now does not undo what an earlier one showed.
        if let (
            Some(SoftDelete::Unknown { .. }),
            Some(Observation::Absent {
                soft_delete: Some(was @ SoftDelete::SoftDeleted { .. }),
                ..
            }),
        ) = (&soft_delete, prev)
        {
            *soft_delete = Some(was.clone());
        }
        if let (
            Some(SoftDelete::SoftDeleted {
                deleted_at,
                reminded,
                ..
            }),
            Some(Observation::Absent {
                soft_delete:
                    Some(SoftDelete::SoftDeleted {
                        deleted_at: was,
                        reminded: was_reminded,
                        ..
                    }),
                ..
            }),
        ) = (soft_delete, prev)
            && deleted_at == was
        {
            *reminded = *was_reminded;
        }
    }
}

fn same(a: &Option<Observation>, b: &Option<Observation>) -> bool {
    match (a, b) {
        (Some(Observation::Present(x)), Some(Observation::Present(y))) => {
            x.digest == y.digest && x.referrers == y.referrers && x.attributes == y.attributes
        }
        (
            Some(Observation::Absent { soft_delete: x, .. }),
            Some(Observation::Absent { soft_delete: y, .. }),
        ) => match (x, y) {
            // The reason's wording may vary between checks; the state is what is stored.
            (Some(SoftDelete::Unknown { .. }), Some(SoftDelete::Unknown { .. })) => true,
            _ => x == y,
        },
        (None, None) => true,
        _ => false,
    }
}

fn change(
    kind: EventType,
    subject: &str,
    previous: Option<&ManifestEvidence>,
    current: Option<&ManifestEvidence>,
) -> Change {
    let mut c = Change::new(kind, subject);
    c.previous = previous.map(StateSummary::from);
    c.current = current.map(StateSummary::from);
    c
}

fn tag_changes(
    policy: &Policy,
    subject: &str,
    prev: Option<&Observation>,
    cur: &Observation,
    pin: Option<&ManifestEvidence>,
    out: &mut Vec<Change>,
) {
    let pinned = policy.pinned.as_ref();
    match (prev, cur) {
        (None, Observation::Present(c)) => {
            out.push(change(EventType::TagCreated, subject, None, Some(c)));
            if let Some(p) = pinned.filter(|p| **p != c.digest) {
                let mut d = change(EventType::TagDiverged, subject, pin, Some(c));
                d.detail = json!({"pinned": p, "tag_digest": c.digest});
                out.push(d);
            }
        }
        (Some(Observation::Present(p)), Observation::Present(c)) if p.digest != c.digest => {
            let (added, removed, changed) =
                platform_diff(&p.platforms, &c.platforms, &policy.platforms);
            let filtered_index = !policy.platforms.is_empty() && p.is_index() && c.is_index();
            // With a platform filter, an index that changed only in platforms nobody watches
            // is recorded but not reported as a move.
            let relevant =
                !filtered_index || !added.is_empty() || !removed.is_empty() || !changed.is_empty();
            if let Some(pd) = pinned.filter(|pd| **pd == p.digest) {
                let mut d = change(EventType::TagDiverged, subject, pin.or(Some(p)), Some(c));
                d.detail = json!({"pinned": pd, "tag_digest": c.digest});
                out.push(d);
            } else if relevant {
                let mut m = change(EventType::TagMoved, subject, Some(p), Some(c));
                m.detail = json!({"from": p.digest, "to": c.digest});
                if let Some(pd) = pinned {
                    m.detail["converged"] = json!(*pd == c.digest);
                }
                out.push(m);
            }
            if p.is_index() && c.is_index() && (!added.is_empty() || !removed.is_empty()) {
                let mut pc = change(EventType::PlatformsChanged, subject, Some(p), Some(c));
                pc.detail = json!({"added": added, "removed": removed, "changed": changed});
                out.push(pc);
            }
        }
        (
            Some(Observation::Present(p)),
            Observation::Absent {
                code, soft_delete, ..
            },
        ) => {
            let mut c = change(EventType::TagDeleted, subject, Some(p), None);
            c.detail = match soft_delete {
                Some(soft) => soft_delete_detail(soft, code, &p.referrers, false),
                None => json!({"code": code, "lost_referrers": p.referrers}),
            };
            out.push(c);
        }
        (Some(Observation::Absent { last_digest, .. }), Observation::Present(c)) => {
            match last_digest {
                Some(last) => {
                    let mut r = change(EventType::TagRestored, subject, None, Some(c));
                    r.detail = json!({"last_digest": last, "same_digest": *last == c.digest});
                    out.push(r);
                }
                None => out.push(change(EventType::TagCreated, subject, None, Some(c))),
            }
        }
        _ => {}
    }
}

fn pin_changes(
    policy: &Policy,
    subject: &str,
    prev: Option<&Observation>,
    cur: &mut Observation,
    now: chrono::DateTime<chrono::Utc>,
    out: &mut Vec<Change>,
) {
    let prev_evidence = prev.and_then(Observation::evidence);
    let lost = prev_evidence
        .map(|p| p.referrers.clone())
        .unwrap_or_default();
    let prev_soft = match prev {
        Some(Observation::Absent { soft_delete, .. }) => soft_delete.as_ref(),
        _ => None,
    };
    let due = |purge_at: &chrono::DateTime<chrono::Utc>| {
        policy
            .soft_delete_reminder
            .is_some_and(|lead| now >= *purge_at - lead)
    };
    let was_soft_deleted = matches!(prev_soft, Some(SoftDelete::SoftDeleted { .. }));
    match (prev, cur) {
        // Newly known to be restorable: from present, or from a deletion whose soft-delete
        // state was unknown or not listed before.
        (
            None | Some(Observation::Present(_)) | Some(Observation::Absent { .. }),
            Observation::Absent {
                code,
                soft_delete: Some(soft @ SoftDelete::SoftDeleted { .. }),
                ..
            },
        ) if !was_soft_deleted => {
            // Within the reminder's lead time already: this event is the reminder too.
            if let SoftDelete::SoftDeleted {
                purge_at, reminded, ..
            } = soft
            {
                *reminded = due(purge_at);
            }
            let mut c = change(EventType::DigestSoftDeleted, subject, prev_evidence, None);
            c.detail = soft_delete_detail(soft, code, &lost, false);
            out.push(c);
        }
        (
            None | Some(Observation::Present(_)),
            Observation::Absent {
                code, soft_delete, ..
            },
        ) => {
            let mut c = change(EventType::DigestDeleted, subject, prev_evidence, None);
            c.detail = json!({
                "code": code,
                "soft_delete": soft_delete,
                "lost_referrers": lost,
            });
            out.push(c);
        }
        // Gone from the soft-delete listing: purged (or hard-deleted) now.
        (
            Some(Observation::Absent { .. }),
            Observation::Absent {
                code,
                soft_delete: Some(soft @ SoftDelete::NotListed),
                ..
            },
        ) if was_soft_deleted => {
            let mut c = change(EventType::DigestDeleted, subject, None, None);
            c.detail = json!({
                "code": code,
                "soft_delete": soft,
                "purged": matches!(soft, SoftDelete::NotListed),
                "was": prev_soft,
            });
            out.push(c);
        }
        (
            Some(Observation::Absent { .. }),
            Observation::Absent {
                code,
                soft_delete: Some(soft),
                ..
            },
        ) => {
            let SoftDelete::SoftDeleted {
                purge_at, reminded, ..
            } = soft
            else {
                return;
            };
            if due(purge_at) && !*reminded {
                *reminded = true;
                let mut c = change(EventType::DigestSoftDeleted, subject, None, None);
                c.detail = soft_delete_detail(soft, code, &[], true);
                out.push(c);
            }
        }
        (Some(Observation::Absent { .. }), Observation::Present(c)) => {
            let mut r = change(EventType::DigestRestored, subject, None, Some(c));
            r.detail = json!({"was": prev_soft});
            out.push(r);
        }
        _ => {}
    }
}

fn soft_delete_detail(
    soft: &SoftDelete,
    code: &str,
    lost: &[crate::model::Referrer],
    reminder: bool,
) -> serde_json::Value {
    let mut d = json!({"code": code, "soft_delete": soft, "lost_referrers": lost});
    if let SoftDelete::SoftDeleted {
        deleted_at,
        purge_at,
        restore_command,
        ..
    } = soft
    {
        d["deleted_at"] = json!(deleted_at);
        d["purge_at"] = json!(purge_at);
        d["restore_command"] = json!(restore_command);
    }
    if reminder {
        d["reminder"] = json!(true);
    }
    d
}

/// Registry-side attribute changes (ACR lock flags, quarantine) of one observation. The
/// tag's attributes are compared whatever it points at; the manifest's only for the same
/// digest. Unlocking (delete or write enabled again), blocking reads and a quarantine state
/// other than `Passed` are warnings; the rest is information.
fn attribute_changes(
    subject: &str,
    prev: &ManifestEvidence,
    cur: &ManifestEvidence,
    out: &mut Vec<Change>,
) {
    let (Some(p), Some(c)) = (&prev.attributes, &cur.attributes) else {
        return;
    };
    let mut fields = Vec::new();
    let mut warning = false;
    let mut compare = |scope: &str, a: &Option<ItemAttributes>, b: &Option<ItemAttributes>| {
        let (Some(a), Some(b)) = (a, b) else { return };
        let flags = [
            ("deleteEnabled", a.delete_enabled, b.delete_enabled),
            ("writeEnabled", a.write_enabled, b.write_enabled),
            ("readEnabled", a.read_enabled, b.read_enabled),
            ("listEnabled", a.list_enabled, b.list_enabled),
        ];
        for (field, old, new) in flags {
            if old != new && old.is_some() && new.is_some() {
                let unlocked =
                    matches!(field, "deleteEnabled" | "writeEnabled") && new == Some(true);
                let blocked = field == "readEnabled" && new == Some(false);
                warning |= unlocked || blocked;
                fields.push(json!({"scope": scope, "field": field, "old": old, "new": new}));
            }
        }
        if a.quarantine_state != b.quarantine_state {
            warning |= b.quarantine_state.as_deref().is_some_and(|q| q != "Passed");
            fields.push(json!({
                "scope": scope,
                "field": "quarantineState",
                "old": a.quarantine_state,
                "new": b.quarantine_state,
            }));
        }
    };
    compare("tag", &p.tag, &c.tag);
    if prev.digest == cur.digest {
        compare("manifest", &p.manifest, &c.manifest);
    }
    if fields.is_empty() {
        return;
    }
    let mut ch = change(EventType::AttributesChanged, subject, Some(prev), Some(cur));
    if warning {
        ch.severity = Severity::Warning;
    }
    ch.detail = json!({"changes": fields});
    out.push(ch);
}

fn referrer_changes(
    policy: &Policy,
    subject: &str,
    prev: Option<&ManifestEvidence>,
    cur: &ManifestEvidence,
    out: &mut Vec<Change>,
) {
    // Referrer sets are compared only for the same subject; a new digest has its own.
    let same_subject = prev.filter(|p| p.digest == cur.digest);
    if let (true, Some(p)) = (policy.track_referrers, same_subject) {
        let gone = |a: &[crate::model::Referrer], b: &[crate::model::Referrer]| -> Vec<_> {
            a.iter()
                .filter(|r| !b.iter().any(|x| x.digest == r.digest))
                .cloned()
                .collect()
        };
        let lost = gone(&p.referrers, &cur.referrers);
        let added = gone(&cur.referrers, &p.referrers);
        if !lost.is_empty() {
            let mut c = change(EventType::ReferrersLost, subject, Some(p), Some(cur));
            c.detail = json!({"lost": lost});
            out.push(c);
        }
        if !added.is_empty() {
            let mut c = change(EventType::ReferrersAdded, subject, Some(p), Some(cur));
            c.detail = json!({"added": added});
            out.push(c);
        }
    }
    let missing = |e: &ManifestEvidence| -> Vec<String> {
        policy
            .require_referrers
            .iter()
            .filter(|t| !e.referrers.iter().any(|r| r.satisfies(t)))
            .cloned()
            .collect()
    };
    let now = missing(cur);
    // Reported when it starts, or when what is missing changes; not on every check.
    let before = same_subject.map(missing).unwrap_or_default();
    if !now.is_empty() && now != before {
        let mut c = change(
            EventType::ReferrersMissing,
            subject,
            same_subject,
            Some(cur),
        );
        c.detail = json!({"missing": now, "digest": cur.digest});
        out.push(c);
    }
}

fn platform_matches(filter: &str, p: &Platform) -> bool {
    let mut parts = filter.split('/');
    let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
    os == Some(p.os.as_str())
        && arch == Some(p.architecture.as_str())
        && variant.is_none_or(|v| p.variant.as_deref() == Some(v))
}

type PlatformDiff = (Vec<Platform>, Vec<Platform>, Vec<serde_json::Value>);

/// Platforms added, removed, and changed (same platform, another child digest), limited to
/// the watch's platform filter when it has one.
fn platform_diff(prev: &[Platform], cur: &[Platform], filter: &[String]) -> PlatformDiff {
    let keep = |p: &&Platform| filter.is_empty() || filter.iter().any(|f| platform_matches(f, p));
    let index = |ps: &[Platform]| -> BTreeMap<String, Platform> {
        ps.iter()
            .filter(keep)
            .map(|p| (p.key(), p.clone()))
            .collect()
    };
    let (before, after) = (index(prev), index(cur));
    let added = after
        .iter()
        .filter(|(k, _)| !before.contains_key(*k))
        .map(|(_, p)| p.clone())
        .collect();
    let removed = before
        .iter()
        .filter(|(k, _)| !after.contains_key(*k))
        .map(|(_, p)| p.clone())
        .collect();
    let changed = before
        .iter()
        .filter_map(|(k, b)| {
            let a = after.get(k)?;
            (a.digest != b.digest).then(|| json!({"platform": k, "from": b.digest, "to": a.digest}))
        })
        .collect();
    (added, removed, changed)
}

#[cfg(test)]
mod tests;
