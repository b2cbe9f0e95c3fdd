//! Table-driven tests of every transition the differ knows.

use chrono::{TimeZone, Utc};

use super::*;
use crate::model::ObtainedBy;
use crate::registry::manifest::{OCI_INDEX, OCI_MANIFEST};

fn dg(c: char) -> Digest {
    Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
}

fn image(c: char) -> Observation {
    Observation::Present(ManifestEvidence {
        digest: dg(c),
        media_type: OCI_MANIFEST.into(),
        size: 100,
        platforms: vec![],
        attestations: vec![],
        config: None,
        layers: vec![],
        annotations: Default::default(),
        artifact_type: None,
        subject: None,
        referrers: vec![],
        referrers_etag: None,
        attributes: None,
        obtained_by: ObtainedBy::Get,
    })
}

fn index(c: char, platforms: &[(&str, char)]) -> Observation {
    let Observation::Present(mut e) = image(c) else {
        unreachable!()
    };
    e.media_type = OCI_INDEX.into();
    e.platforms = platforms
        .iter()
        .map(|(key, d)| {
            let mut parts = key.split('/');
            Platform {
                os: parts.next().unwrap().into(),
                architecture: parts.next().unwrap().into(),
                variant: parts.next().map(Into::into),
                digest: dg(*d),
            }
        })
        .collect();
    Observation::Present(e)
}

fn absent() -> Observation {
    Observation::absent("MANIFEST_UNKNOWN".into())
}

fn res(tag: Option<Observation>, pinned: Option<Observation>) -> Resolution {
    Resolution {
        time: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        tag,
        pinned,
    }
}

fn tag_policy() -> Policy {
    Policy {
        tag_subject: Some("r.io/team/api:prod".into()),
        pin_subject: None,
        pinned: None,
        platforms: vec![],
        failing_after: 3,
        track_referrers: false,
        require_referrers: vec![],
        soft_delete_reminder: Some(chrono::Duration::hours(24)),
    }
}

fn pin_policy() -> Policy {
    Policy {
        tag_subject: None,
        pin_subject: Some(format!("r.io/team/api@{}", dg('a'))),
        pinned: Some(dg('a')),
        platforms: vec![],
        failing_after: 3,
        track_referrers: false,
        require_referrers: vec![],
        soft_delete_reminder: Some(chrono::Duration::hours(24)),
    }
}

fn both_policy() -> Policy {
    Policy {
        tag_subject: Some("r.io/team/api:prod".into()),
        ..pin_policy()
    }
}

fn state(last: Option<Resolution>) -> WatchState {
    WatchState {
        last,
        consecutive_failures: 0,
        failing: false,
    }
}

fn kinds(d: &Diff) -> Vec<&'static str> {
    d.changes.iter().map(|c| c.kind.short()).collect()
}

#[test]
fn tag_transitions() {
    type Case = (
        &'static str,
        Option<Observation>,
        Observation,
        &'static [&'static str],
    );
    let cases: Vec<Case> = vec![
        ("first sighting", None, image('a'), &["tag.created"]),
        ("first sighting of a missing tag", None, absent(), &[]),
        ("unchanged", Some(image('a')), image('a'), &[]),
        ("moved", Some(image('a')), image('b'), &["tag.moved"]),
        ("deleted", Some(image('a')), absent(), &["tag.deleted"]),
        ("still deleted", Some(absent()), absent(), &[]),
        (
            "appeared after a missing baseline",
            Some(absent()),
            image('a'),
            &["tag.created"],
        ),
    ];
    for (name, prev, cur, want) in cases {
        let prev = state(prev.map(|p| res(Some(p), None)));
        let d = diff(
            &tag_policy(),
            &prev,
            Outcome::Resolved(res(Some(cur), None)),
        );
        assert_eq!(kinds(&d), want, "{name}");
    }
}

#[test]
fn a_moved_tag_carries_both_digests() {
    let prev = state(Some(res(Some(image('a')), None)));
    let d = diff(
        &tag_policy(),
        &prev,
        Outcome::Resolved(res(Some(image('b')), None)),
    );
    let c = &d.changes[0];
    assert_eq!(c.previous.as_ref().unwrap().digest, dg('a'));
    assert_eq!(c.current.as_ref().unwrap().digest, dg('b'));
    assert_eq!(c.subject, "r.io/team/api:prod");
    assert!(d.resolution_changed && !d.baseline);
}

#[test]
fn a_deleted_then_restored_tag_is_restored_not_created() {
    let policy = tag_policy();
    let s0 = state(Some(res(Some(image('a')), None)));
    let d1 = diff(&policy, &s0, Outcome::Resolved(res(Some(absent()), None)));
    assert_eq!(kinds(&d1), ["tag.deleted"]);
    let d2 = diff(
        &policy,
        &d1.next,
        Outcome::Resolved(res(Some(absent()), None)),
    );
    assert!(d2.changes.is_empty() && !d2.resolution_changed);
    let d3 = diff(
        &policy,
        &d2.next,
        Outcome::Resolved(res(Some(image('b')), None)),
    );
    assert_eq!(kinds(&d3), ["tag.restored"]);
    assert_eq!(d3.changes[0].detail["same_digest"], false);
}

#[test]
fn digest_transitions() {
    type Case = (
        &'static str,
        Option<Observation>,
        Observation,
        &'static [&'static str],
    );
    let cases: Vec<Case> = vec![
        ("baseline present", None, image('a'), &[]),
        ("baseline already gone", None, absent(), &["digest.deleted"]),
        ("still there", Some(image('a')), image('a'), &[]),
        ("deleted", Some(image('a')), absent(), &["digest.deleted"]),
        ("still deleted", Some(absent()), absent(), &[]),
        ("restored", Some(absent()), image('a'), &["digest.restored"]),
    ];
    for (name, prev, cur, want) in cases {
        let prev = state(prev.map(|p| res(None, Some(p))));
        let d = diff(
            &pin_policy(),
            &prev,
            Outcome::Resolved(res(None, Some(cur))),
        );
        assert_eq!(kinds(&d), want, "{name}");
    }
}

#[test]
fn a_tag_at_digest_watch_reports_divergence_once_then_moves() {
    let policy = both_policy();
    let s0 = state(Some(res(Some(image('a')), Some(image('a')))));
    let d1 = diff(
        &policy,
        &s0,
        Outcome::Resolved(res(Some(image('b')), Some(image('a')))),
    );
    assert_eq!(kinds(&d1), ["tag.diverged"]);
    assert_eq!(d1.changes[0].previous.as_ref().unwrap().digest, dg('a'));
    assert_eq!(d1.changes[0].current.as_ref().unwrap().digest, dg('b'));
    let d2 = diff(
        &policy,
        &d1.next,
        Outcome::Resolved(res(Some(image('c')), Some(image('a')))),
    );
    assert_eq!(kinds(&d2), ["tag.moved"]);
    let d3 = diff(
        &policy,
        &d2.next,
        Outcome::Resolved(res(Some(image('a')), Some(image('a')))),
    );
    assert_eq!(kinds(&d3), ["tag.moved"]);
    assert_eq!(d3.changes[0].detail["converged"], true);
}

#[test]
fn a_tag_at_digest_baseline_that_already_differs_is_diverged() {
    let d = diff(
        &both_policy(),
        &WatchState::default(),
        Outcome::Resolved(res(Some(image('b')), Some(image('a')))),
    );
    assert_eq!(kinds(&d), ["tag.created", "tag.diverged"]);
    assert!(d.baseline);
}

#[test]
fn an_index_losing_a_platform_reports_the_removal() {
    let prev = state(Some(res(
        Some(index('a', &[("linux/amd64", '1'), ("linux/arm64", '2')])),
        None,
    )));
    let cur = res(Some(index('b', &[("linux/amd64", '1')])), None);
    let d = diff(&tag_policy(), &prev, Outcome::Resolved(cur));
    assert_eq!(kinds(&d), ["tag.moved", "platforms.changed"]);
    let detail = &d.changes[1].detail;
    assert_eq!(detail["removed"][0]["architecture"], "arm64");
    assert_eq!(detail["added"].as_array().unwrap().len(), 0);
}

#[test]
fn a_platform_filter_hides_changes_in_other_platforms() {
    let policy = Policy {
        platforms: vec!["linux/amd64".into()],
        ..tag_policy()
    };
    let prev = state(Some(res(
        Some(index('a', &[("linux/amd64", '1'), ("linux/arm64", '2')])),
        None,
    )));
    // Only arm64's child changed: recorded, not reported.
    let quiet = res(
        Some(index('b', &[("linux/amd64", '1'), ("linux/arm64", '3')])),
        None,
    );
    let d = diff(&policy, &prev, Outcome::Resolved(quiet));
    assert!(d.changes.is_empty() && d.resolution_changed);
    // amd64's child changed: a move.
    let loud = res(
        Some(index('c', &[("linux/amd64", '4'), ("linux/arm64", '2')])),
        None,
    );
    let d = diff(&policy, &prev, Outcome::Resolved(loud));
    assert_eq!(kinds(&d), ["tag.moved"]);
}

#[test]
fn failures_never_change_state_and_raise_failing_once() {
    let policy = tag_policy();
    let s0 = state(Some(res(Some(image('a')), None)));
    let fail = || Outcome::Failed {
        reason: "registry unreachable".into(),
    };
    let d1 = diff(&policy, &s0, fail());
    let d2 = diff(&policy, &d1.next, fail());
    let d3 = diff(&policy, &d2.next, fail());
    let d4 = diff(&policy, &d3.next, fail());
    assert_eq!((kinds(&d1), kinds(&d2)), (vec![], vec![]));
    assert_eq!(kinds(&d3), ["check.failing"]);
    assert!(d4.changes.is_empty());
    for d in [&d1, &d2, &d3, &d4] {
        assert_eq!(
            d.next.last, s0.last,
            "a failed check must not change the stored resolution"
        );
        assert!(!d.resolution_changed);
    }
    // Recovery diffs against the resolution stored before the failures.
    let d5 = diff(
        &policy,
        &d4.next,
        Outcome::Resolved(res(Some(image('b')), None)),
    );
    assert_eq!(kinds(&d5), ["check.recovered", "tag.moved"]);
    assert_eq!(d5.next.consecutive_failures, 0);
    assert!(!d5.next.failing);
}

#[test]
fn a_failure_between_two_moves_still_reports_the_move_from_the_stored_digest() {
    let policy = tag_policy();
    let s0 = state(Some(res(Some(image('a')), None)));
    let d1 = diff(
        &policy,
        &s0,
        Outcome::Failed {
            reason: "503".into(),
        },
    );
    let d2 = diff(
        &policy,
        &d1.next,
        Outcome::Resolved(res(Some(image('c')), None)),
    );
    assert_eq!(kinds(&d2), ["tag.moved"]);
    assert_eq!(d2.changes[0].previous.as_ref().unwrap().digest, dg('a'));
}

fn referrer(c: char, artifact_type: &str) -> crate::model::Referrer {
    crate::model::Referrer {
        digest: dg(c),
        artifact_type: Some(artifact_type.into()),
        media_type: OCI_MANIFEST.into(),
        annotations: Default::default(),
        source: Some("api".into()),
    }
}

fn signed(c: char, referrers: Vec<crate::model::Referrer>) -> Observation {
    let Observation::Present(mut e) = image(c) else {
        unreachable!()
    };
    e.referrers = referrers;
    Observation::Present(e)
}

const NOTARY: &str = "application/vnd.cncf.notary.signature";
const SPDX: &str = "application/spdx+json";

#[test]
fn referrer_sets_of_the_same_digest_are_compared() {
    let policy = Policy {
        track_referrers: true,
        ..tag_policy()
    };
    let prev = state(Some(res(
        Some(signed(
            'a',
            vec![referrer('1', NOTARY), referrer('2', SPDX)],
        )),
        None,
    )));
    let d = diff(
        &policy,
        &prev,
        Outcome::Resolved(res(Some(signed('a', vec![referrer('2', SPDX)])), None)),
    );
    assert_eq!(kinds(&d), ["referrers.lost"]);
    assert_eq!(d.changes[0].detail["lost"][0]["artifact_type"], NOTARY);
    assert!(
        d.resolution_changed,
        "a changed referrer set is a new resolution"
    );

    let d = diff(
        &policy,
        &d.next,
        Outcome::Resolved(res(
            Some(signed(
                'a',
                vec![referrer('2', SPDX), referrer('3', NOTARY)],
            )),
            None,
        )),
    );
    assert_eq!(kinds(&d), ["referrers.added"]);

    // Untracked watches say nothing about referrers.
    let quiet = diff(
        &tag_policy(),
        &prev,
        Outcome::Resolved(res(Some(signed('a', vec![])), None)),
    );
    assert!(quiet.changes.is_empty());
}

#[test]
fn a_required_signature_missing_is_reported_once_and_again_after_a_move() {
    let policy = Policy {
        require_referrers: vec!["signature".into()],
        ..tag_policy()
    };
    let s0 = state(Some(res(
        Some(signed('a', vec![referrer('1', NOTARY)])),
        None,
    )));
    // The tag moves to an unsigned digest.
    let d1 = diff(
        &policy,
        &s0,
        Outcome::Resolved(res(Some(signed('b', vec![])), None)),
    );
    assert_eq!(kinds(&d1), ["tag.moved", "referrers.missing"]);
    assert_eq!(d1.changes[1].detail["missing"][0], "signature");
    // Still unsigned: no repeat.
    let d2 = diff(
        &policy,
        &d1.next,
        Outcome::Resolved(res(Some(signed('b', vec![])), None)),
    );
    assert!(d2.changes.is_empty());
    // The signature is removed from a signed digest: missing, without tracking enabled.
    let d3 = diff(
        &policy,
        &s0,
        Outcome::Resolved(res(Some(signed('a', vec![referrer('2', SPDX)])), None)),
    );
    assert_eq!(kinds(&d3), ["referrers.missing"]);
}

#[test]
fn a_deleted_subject_reports_its_referrers_in_one_event() {
    let policy = Policy {
        track_referrers: true,
        ..pin_policy()
    };
    let prev = state(Some(res(
        None,
        Some(signed(
            'a',
            vec![referrer('1', NOTARY), referrer('2', SPDX)],
        )),
    )));
    let d = diff(&policy, &prev, Outcome::Resolved(res(None, Some(absent()))));
    assert_eq!(kinds(&d), ["digest.deleted"]);
    assert_eq!(
        d.changes[0].detail["lost_referrers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn aliases_match_their_artifact_types() {
    assert!(referrer('1', NOTARY).satisfies("signature"));
    assert!(
        referrer('1', "application/vnd.dev.cosign.artifact.sig.v1+json").satisfies("signature")
    );
    assert!(referrer('1', SPDX).satisfies("sbom"));
    assert!(referrer('1', SPDX).satisfies(SPDX));
    assert!(!referrer('1', SPDX).satisfies("signature"));
    assert!(referrer('1', "application/vnd.in-toto+json").satisfies("provenance"));
}

fn soft_deleted(deleted_days_before_check: i64) -> Observation {
    let check = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    let deleted_at = check - chrono::Duration::days(deleted_days_before_check);
    Observation::Absent {
        code: "MANIFEST_UNKNOWN".into(),
        last_digest: None,
        soft_delete: Some(SoftDelete::SoftDeleted {
            deleted_at,
            purge_at: deleted_at + chrono::Duration::days(7),
            retention_days: 7,
            digest: None,
            restore_command: "az acr manifest restore …".into(),
            reminded: false,
        }),
    }
}

fn gone(soft: SoftDelete) -> Observation {
    Observation::Absent {
        code: "MANIFEST_UNKNOWN".into(),
        last_digest: None,
        soft_delete: Some(soft),
    }
}

#[test]
fn soft_delete_transitions_of_a_pinned_digest() {
    type Case = (
        &'static str,
        Option<Observation>,
        Observation,
        &'static [&'static str],
    );
    let unknown = || {
        gone(SoftDelete::Unknown {
            reason: "no deleted_read".into(),
        })
    };
    let cases: Vec<Case> = vec![
        (
            "soft-deleted",
            Some(image('a')),
            soft_deleted(1),
            &["digest.soft_deleted"],
        ),
        (
            "still soft-deleted",
            Some(soft_deleted(1)),
            soft_deleted(1),
            &[],
        ),
        (
            "purged",
            Some(soft_deleted(1)),
            gone(SoftDelete::NotListed),
            &["digest.deleted"],
        ),
        (
            "restored",
            Some(soft_deleted(1)),
            image('a'),
            &["digest.restored"],
        ),
        (
            "hard-deleted",
            Some(image('a')),
            gone(SoftDelete::NotListed),
            &["digest.deleted"],
        ),
        (
            "state unknown",
            Some(image('a')),
            unknown(),
            &["digest.deleted"],
        ),
        ("still unknown", Some(unknown()), unknown(), &[]),
        (
            "unreadable listing after a soft delete",
            Some(soft_deleted(1)),
            unknown(),
            &[],
        ),
        (
            "known restorable later",
            Some(unknown()),
            soft_deleted(1),
            &["digest.soft_deleted"],
        ),
        (
            "within a day of the purge",
            Some(soft_deleted(6)),
            soft_deleted(6),
            &["digest.soft_deleted"],
        ),
    ];
    for (name, prev, cur, want) in cases {
        let prev = state(prev.map(|p| res(None, Some(p))));
        let d = diff(
            &pin_policy(),
            &prev,
            Outcome::Resolved(res(None, Some(cur))),
        );
        assert_eq!(kinds(&d), want, "{name}");
    }
}

#[test]
fn the_purge_reminder_is_raised_once() {
    let prev = state(Some(res(None, Some(soft_deleted(6)))));
    let first = diff(
        &pin_policy(),
        &prev,
        Outcome::Resolved(res(None, Some(soft_deleted(6)))),
    );
    assert_eq!(first.changes[0].detail["reminder"], true);
    let again = diff(
        &pin_policy(),
        &first.next,
        Outcome::Resolved(res(None, Some(soft_deleted(6)))),
    );
    assert!(again.changes.is_empty(), "{:?}", kinds(&again));
    let never = Policy {
        soft_delete_reminder: None,
        ..pin_policy()
    };
    let d = diff(
        &never,
        &prev,
        Outcome::Resolved(res(None, Some(soft_deleted(6)))),
    );
    assert!(d.changes.is_empty());
}

#[test]
fn a_soft_deleted_digest_says_when_it_will_be_purged_and_how_to_restore_it() {
    let prev = state(Some(res(None, Some(image('a')))));
    let d = diff(
        &pin_policy(),
        &prev,
        Outcome::Resolved(res(None, Some(soft_deleted(1)))),
    );
    let detail = &d.changes[0].detail;
    assert_eq!(d.changes[0].severity, Severity::Critical);
    assert_eq!(detail["purge_at"], "2023-11-20T22:13:20Z");
    assert!(
        detail["restore_command"]
            .as_str()
            .unwrap()
            .starts_with("az acr manifest restore")
    );
}

fn with_attributes(c: char, tag: ItemAttributes, manifest: ItemAttributes) -> Observation {
    let Observation::Present(mut e) = image(c) else {
        unreachable!()
    };
    e.attributes = Some(crate::model::RegistryAttributes {
        tag: Some(tag),
        manifest: Some(manifest),
    });
    Observation::Present(e)
}

fn locked(delete: bool, quarantine: Option<&str>) -> ItemAttributes {
    ItemAttributes {
        delete_enabled: Some(!delete),
        write_enabled: Some(!delete),
        read_enabled: Some(true),
        list_enabled: Some(true),
        quarantine_state: quarantine.map(Into::into),
        ..ItemAttributes::default()
    }
}

#[test]
fn attribute_changes_and_their_severity() {
    let run = |prev: Observation, cur: Observation| {
        let prev = state(Some(res(Some(prev), None)));
        diff(
            &tag_policy(),
            &prev,
            Outcome::Resolved(res(Some(cur), None)),
        )
    };
    let a = |tag, manifest| with_attributes('a', tag, manifest);
    let d = run(
        a(locked(true, None), locked(false, None)),
        a(locked(false, None), locked(false, None)),
    );
    assert_eq!(kinds(&d), ["attributes.changed"]);
    assert_eq!(d.changes[0].severity, Severity::Warning, "a lock removed");
    assert_eq!(d.changes[0].detail["changes"].as_array().unwrap().len(), 2);
    assert_eq!(d.changes[0].detail["changes"][0]["scope"], "tag");
    assert!(d.resolution_changed);

    let d = run(
        a(locked(false, None), locked(false, None)),
        a(locked(true, None), locked(false, None)),
    );
    assert_eq!(d.changes[0].severity, Severity::Info, "a lock added");

    let d = run(
        a(locked(false, None), locked(false, Some("Passed"))),
        a(locked(false, None), locked(false, Some("Failed"))),
    );
    assert_eq!(d.changes[0].severity, Severity::Warning, "quarantined");
    assert_eq!(d.changes[0].detail["changes"][0]["scope"], "manifest");

    let d = run(
        a(locked(false, None), locked(false, None)),
        a(locked(false, None), locked(false, None)),
    );
    assert!(d.changes.is_empty());

    // The manifest under a moved tag is another manifest: only the move is reported.
    let d = run(
        a(locked(false, None), locked(true, None)),
        with_attributes('b', locked(false, None), locked(false, None)),
    );
    assert_eq!(kinds(&d), ["tag.moved"]);

    // Attributes missing on one side (no metadata_read any more) are not a change.
    let d = run(a(locked(true, None), locked(true, None)), image('a'));
    assert!(d.changes.is_empty());
}

#[test]
fn an_unreadable_listing_keeps_what_an_earlier_one_showed() {
    let prev = state(Some(res(None, Some(soft_deleted(1)))));
    let unknown = gone(SoftDelete::Unknown {
        reason: "no deleted_read".into(),
    });
    let d = diff(
        &pin_policy(),
        &prev,
        Outcome::Resolved(res(None, Some(unknown))),
    );
    assert!(d.changes.is_empty());
    assert!(!d.resolution_changed);
    let kept = d.next.last.unwrap().pinned.unwrap();
    assert!(matches!(
        kept,
        Observation::Absent {
            soft_delete: Some(SoftDelete::SoftDeleted { .. }),
            ..
        }
    ));
}

#[test]
fn a_deletion_first_seen_close_to_the_purge_is_not_reminded_again() {
    let prev = state(Some(res(None, Some(image('a')))));
    let first = diff(
        &pin_policy(),
        &prev,
        Outcome::Resolved(res(None, Some(soft_deleted(6)))),
    );
    assert_eq!(kinds(&first), ["digest.soft_deleted"]);
    let again = diff(
        &pin_policy(),
        &first.next,
        Outcome::Resolved(res(None, Some(soft_deleted(6)))),
    );
    assert!(again.changes.is_empty(), "{:?}", kinds(&again));
}
