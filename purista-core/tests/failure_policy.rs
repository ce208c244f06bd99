//! Subscription outcomes and the failure policy (DESIGN §3.4): how `FailurePolicy::settle` turns
//! a handler's outcome on delivery number N into the one settlement a bridge carries out.

use std::time::Duration;

use purista_core::outcome::PolicyMode;
use purista_core::{DeadLetterNote, FailurePolicy, Outcome, Settlement};
use serde_json::json;

const ORIGIN: &str = "orders@1/onPaid";

fn policy(max_attempts: u32, retry_delay_ms: u64, target: Option<&str>) -> FailurePolicy {
    FailurePolicy {
        max_attempts,
        retry_delay_ms,
        dead_letter_target: target.map(Into::into),
        ..FailurePolicy::default()
    }
}

#[test]
fn default_policy_is_strict_one_attempt_no_delay_no_target() {
    let p = FailurePolicy::default();
    assert_eq!(p.mode, PolicyMode::Strict);
    assert_eq!(p.max_attempts, 1);
    assert_eq!(p.retry_delay_ms, 0);
    assert_eq!(p.dead_letter_target, None);
}

#[test]
fn default_policy_drops_a_retry_on_the_first_attempt() {
    let s = FailurePolicy::default().settle(1, &Outcome::retry(), ORIGIN);
    assert!(matches!(s, Settlement::Drop { .. }), "{s:?}");
}

#[test]
fn retry_under_max_attempts_redelivers_with_the_policy_delay() {
    let p = policy(3, 250, Some("dlq"));
    assert_eq!(
        p.settle(1, &Outcome::retry(), ORIGIN),
        Settlement::Redeliver {
            delay: Duration::from_millis(250),
            next_attempt: 2
        }
    );
    assert_eq!(
        p.settle(2, &Outcome::retry(), ORIGIN),
        Settlement::Redeliver {
            delay: Duration::from_millis(250),
            next_attempt: 3
        }
    );
}

#[test]
fn retry_delay_on_the_outcome_overrides_the_policy_delay() {
    let p = policy(3, 250, None);
    assert_eq!(
        p.settle(
            1,
            &Outcome::Retry {
                delay_ms: Some(5_000)
            },
            ORIGIN
        ),
        Settlement::Redeliver {
            delay: Duration::from_millis(5_000),
            next_attempt: 2
        }
    );
}

#[test]
fn retry_delay_override_of_zero_retries_at_once() {
    let p = policy(3, 250, None);
    assert_eq!(
        p.settle(1, &Outcome::Retry { delay_ms: Some(0) }, ORIGIN),
        Settlement::Redeliver {
            delay: Duration::ZERO,
            next_attempt: 2
        }
    );
}

#[test]
fn retry_at_max_attempts_dead_letters_with_reason_attempts_and_origin() {
    let p = policy(3, 250, Some("orders.failed"));
    match p.settle(3, &Outcome::retry(), ORIGIN) {
        Settlement::DeadLetter(note) => {
            assert_eq!(note.target, "orders.failed");
            assert_eq!(note.attempts, 3);
            assert_eq!(note.origin, ORIGIN);
            assert!(note.reason.contains('3'), "{}", note.reason);
            assert!(!note.reason.is_empty());
        }
        other => panic!("expected DeadLetter, got {other:?}"),
    }
}

#[test]
fn retry_past_max_attempts_still_dead_letters() {
    let p = policy(2, 0, Some("dlq"));
    assert!(matches!(
        p.settle(7, &Outcome::retry(), ORIGIN),
        Settlement::DeadLetter(DeadLetterNote { attempts: 7, .. })
    ));
}

#[test]
fn retry_at_max_attempts_without_target_drops_with_reason() {
    let p = policy(3, 250, None);
    match p.settle(3, &Outcome::retry(), ORIGIN) {
        Settlement::Drop { reason } => {
            assert!(reason.contains("no dead-letter target"), "{reason}");
        }
        other => panic!("expected Drop, got {other:?}"),
    }
}

#[test]
fn dead_letter_outcome_goes_to_the_target_at_once() {
    let p = policy(5, 0, Some("orders.failed"));
    assert_eq!(
        p.settle(1, &Outcome::dead_letter("bad payload"), ORIGIN),
        Settlement::DeadLetter(DeadLetterNote {
            target: "orders.failed".into(),
            reason: "bad payload".into(),
            attempts: 1,
            origin: ORIGIN.into(),
        })
    );
}

#[test]
fn dead_letter_outcome_without_target_drops_keeping_the_reason() {
    match policy(5, 0, None).settle(2, &Outcome::dead_letter("bad payload"), ORIGIN) {
        Settlement::Drop { reason } => assert!(reason.contains("bad payload"), "{reason}"),
        other => panic!("expected Drop, got {other:?}"),
    }
}

#[test]
fn drop_outcome_drops_with_its_reason() {
    assert_eq!(
        policy(5, 0, Some("dlq")).settle(1, &Outcome::drop_message("stale"), ORIGIN),
        Settlement::Drop {
            reason: "stale".into()
        }
    );
}

#[test]
fn stop_consumer_outcome_pauses_with_its_reason() {
    assert_eq!(
        policy(5, 0, Some("dlq")).settle(4, &Outcome::stop_consumer("db down"), ORIGIN),
        Settlement::Pause {
            reason: "db down".into()
        }
    );
}

#[test]
fn ack_outcome_acks_on_any_attempt() {
    let p = policy(3, 0, Some("dlq"));
    for attempt in [1, 3, 10] {
        assert_eq!(p.settle(attempt, &Outcome::Ack, ORIGIN), Settlement::Ack);
    }
}

#[test]
fn outcome_serializes_with_a_status_tag() {
    assert_eq!(
        serde_json::to_value(Outcome::Ack).expect("json"),
        json!({ "status": "ack" })
    );
    assert_eq!(
        serde_json::to_value(Outcome::dead_letter("x")).expect("json"),
        json!({ "status": "deadLetter", "reason": "x" })
    );
}

#[test]
fn dead_letter_note_serializes_in_camel_case() {
    let note = DeadLetterNote {
        target: "t".into(),
        reason: "r".into(),
        attempts: 2,
        origin: "o".into(),
    };
    assert_eq!(
        serde_json::to_value(&note).expect("json"),
        json!({ "target": "t", "reason": "r", "attempts": 2, "origin": "o" })
    );
}
