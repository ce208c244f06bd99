//! Queue lifecycle defaults, backoff and settlement planning (DESIGN §3.6): what
//! `QueueConfig::plan` tells a queue bridge to do with a settled job.

use std::collections::BTreeSet;
use std::time::Duration;

use purista_core::queue::{
    JobDisposition, JobSettlement, LeasedJob, QueueConfig, RetryStrategy, dead_letter_queue_name,
};
use serde_json::json;

const ENQUEUED_AT: u64 = 1_716_192_000_000;
const HOUR_MS: u64 = 3_600_000;

fn job(attempt: u32) -> LeasedJob {
    LeasedJob {
        id: "job-1".into(),
        queue: "emails".into(),
        payload: json!({ "to": "ada@example.com" }),
        parameter: json!({}),
        attempt,
        lease_token: "lease-1".into(),
        lease_expires_at_ms: ENQUEUED_AT + 15 * 60_000,
        extensions: 0,
        enqueued_at_ms: ENQUEUED_AT,
        idempotency_key: None,
        trace_id: None,
        otp: None,
        principal_id: None,
        tenant_id: None,
        max_attempts: None,
    }
}

fn retry() -> JobSettlement {
    JobSettlement::Retry {
        delay: None,
        reason: None,
    }
}

fn soon() -> u64 {
    ENQUEUED_AT + 1_000
}

fn is_dead_letter(d: &JobDisposition) -> bool {
    matches!(d, JobDisposition::DeadLetter { .. })
}

#[test]
fn queue_config_defaults_match_the_design() {
    let c = QueueConfig::default();
    assert_eq!(c.visibility_timeout, Duration::from_secs(15 * 60));
    assert_eq!(c.max_lease_extensions, 3);
    assert!(!c.auto_heartbeat);
    assert_eq!(c.heartbeat_interval, Duration::from_secs(5 * 60));
    assert_eq!(c.max_attempts, 10);
    assert_eq!(c.retry_window, Duration::from_secs(24 * 3600));
    assert_eq!(c.dead_letter_queue, None);
    assert_eq!(c.retry, RetryStrategy::default());
}

#[test]
fn retry_strategy_defaults_match_the_design() {
    let s = RetryStrategy::default();
    assert_eq!(s.initial_delay_ms, 1_000);
    assert_eq!(s.multiplier, 2.0);
    assert_eq!(s.max_delay_ms, 120_000);
    assert_eq!(s.jitter_factor, 0.25);
}

#[test]
fn base_delay_doubles_from_one_second_and_caps_at_120_seconds() {
    let s = RetryStrategy::default();
    let secs: Vec<u64> = (1..=10).map(|a| s.base_delay(a).as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
}

#[test]
fn base_delay_stays_capped_for_huge_attempt_numbers() {
    let s = RetryStrategy::default();
    for attempt in [100, 1_000, u32::MAX] {
        assert_eq!(s.base_delay(attempt), Duration::from_secs(120), "{attempt}");
    }
}

#[test]
fn base_delay_of_attempt_zero_is_the_initial_delay() {
    assert_eq!(
        RetryStrategy::default().base_delay(0),
        Duration::from_secs(1)
    );
}

#[test]
fn jittered_delay_stays_within_25_percent_over_1000_samples() {
    let s = RetryStrategy::default();
    for attempt in [1, 3, 8] {
        let base = s.base_delay(attempt).as_millis() as f64;
        let (lo, hi) = ((base * 0.75).floor() as u128, (base * 1.25).ceil() as u128);
        for _ in 0..1_000 {
            let d = s.delay(attempt).as_millis();
            assert!((lo..=hi).contains(&d), "attempt {attempt}: {d} ms");
        }
    }
}

#[test]
fn jittered_delay_is_not_constant() {
    let s = RetryStrategy::default();
    let distinct: BTreeSet<u128> = (0..1_000).map(|_| s.delay(4).as_millis()).collect();
    assert!(
        distinct.len() > 10,
        "only {} distinct delays",
        distinct.len()
    );
}

#[test]
fn jittered_delay_spreads_both_below_and_above_the_base() {
    let s = RetryStrategy::default();
    let base = s.base_delay(4).as_millis();
    let samples: Vec<u128> = (0..1_000).map(|_| s.delay(4).as_millis()).collect();
    assert!(samples.iter().any(|&d| d < base));
    assert!(samples.iter().any(|&d| d > base));
}

#[test]
fn zero_jitter_gives_the_base_delay() {
    let s = RetryStrategy {
        jitter_factor: 0.0,
        ..RetryStrategy::default()
    };
    for attempt in 1..=10 {
        assert_eq!(s.delay(attempt), s.base_delay(attempt));
    }
}

#[test]
fn complete_plans_complete() {
    let c = QueueConfig::default();
    assert_eq!(
        c.plan(&job(1), &JobSettlement::Complete, soon()),
        JobDisposition::Complete
    );
}

#[test]
fn complete_at_max_attempts_and_after_the_window_still_completes() {
    let c = QueueConfig::default();
    let late = ENQUEUED_AT + 48 * HOUR_MS;
    assert_eq!(
        c.plan(&job(10), &JobSettlement::Complete, late),
        JobDisposition::Complete
    );
}

#[test]
fn retry_under_max_attempts_retries_after_the_jittered_backoff() {
    let c = QueueConfig::default();
    for attempt in 1..10 {
        match c.plan(&job(attempt), &retry(), soon()) {
            JobDisposition::RetryAfter { delay, reason } => {
                let base = c.retry.base_delay(attempt).as_millis() as f64;
                let ms = delay.as_millis() as f64;
                assert!(
                    ms >= (base * 0.75).floor() && ms <= (base * 1.25).ceil(),
                    "attempt {attempt}: {ms} ms vs base {base}"
                );
                assert_eq!(reason, None);
            }
            other => panic!("attempt {attempt}: expected RetryAfter, got {other:?}"),
        }
    }
}

#[test]
fn retry_with_explicit_delay_uses_that_delay() {
    let c = QueueConfig::default();
    let s = JobSettlement::Retry {
        delay: Some(Duration::from_millis(1_234)),
        reason: Some("rate limited".into()),
    };
    assert_eq!(
        c.plan(&job(2), &s, soon()),
        JobDisposition::RetryAfter {
            delay: Duration::from_millis(1_234),
            reason: Some("rate limited".into())
        }
    );
}

#[test]
fn retry_at_max_attempts_dead_letters() {
    let c = QueueConfig::default();
    let d = c.plan(&job(10), &retry(), soon());
    assert!(is_dead_letter(&d), "{d:?}");
    let JobDisposition::DeadLetter { reason } = d else {
        unreachable!()
    };
    assert!(reason.contains("10"), "{reason}");
}

#[test]
fn retry_after_the_retry_window_dead_letters() {
    let c = QueueConfig::default();
    let just_after = ENQUEUED_AT + 24 * HOUR_MS;
    match c.plan(&job(2), &retry(), just_after) {
        JobDisposition::DeadLetter { reason } => {
            assert!(reason.contains("window"), "{reason}");
        }
        other => panic!("expected DeadLetter, got {other:?}"),
    }
}

#[test]
fn retry_just_inside_the_retry_window_retries() {
    let c = QueueConfig::default();
    let just_before = ENQUEUED_AT + 24 * HOUR_MS - 1;
    assert!(matches!(
        c.plan(&job(2), &retry(), just_before),
        JobDisposition::RetryAfter { .. }
    ));
}

#[test]
fn fatal_fail_dead_letters_on_the_first_attempt() {
    let c = QueueConfig::default();
    let s = JobSettlement::Fail {
        fatal: true,
        reason: "invalid address".into(),
    };
    match c.plan(&job(1), &s, soon()) {
        JobDisposition::DeadLetter { reason } => {
            assert!(reason.contains("invalid address"), "{reason}");
        }
        other => panic!("expected DeadLetter, got {other:?}"),
    }
}

#[test]
fn non_fatal_fail_counts_as_a_retry() {
    let c = QueueConfig::default();
    let s = JobSettlement::Fail {
        fatal: false,
        reason: "smtp timeout".into(),
    };
    match c.plan(&job(1), &s, soon()) {
        JobDisposition::RetryAfter { delay, reason } => {
            assert_eq!(reason.as_deref(), Some("smtp timeout"));
            assert!(delay >= Duration::from_millis(750) && delay <= Duration::from_millis(1_250));
        }
        other => panic!("expected RetryAfter, got {other:?}"),
    }
}

#[test]
fn non_fatal_fail_at_max_attempts_dead_letters_with_its_reason() {
    let c = QueueConfig::default();
    let s = JobSettlement::Fail {
        fatal: false,
        reason: "smtp timeout".into(),
    };
    match c.plan(&job(10), &s, soon()) {
        JobDisposition::DeadLetter { reason } => assert!(reason.contains("smtp timeout")),
        other => panic!("expected DeadLetter, got {other:?}"),
    }
}

#[test]
fn dead_letter_settlement_dead_letters_with_its_reason() {
    let c = QueueConfig::default();
    assert_eq!(
        c.plan(
            &job(1),
            &JobSettlement::DeadLetter {
                reason: "poison".into()
            },
            soon()
        ),
        JobDisposition::DeadLetter {
            reason: "poison".into()
        }
    );
}

#[test]
fn per_job_max_attempts_overrides_the_queue_setting() {
    let c = QueueConfig::default();
    let mut j = job(2);
    j.max_attempts = Some(2);
    assert!(is_dead_letter(&c.plan(&j, &retry(), soon())));

    let mut j = job(10);
    j.max_attempts = Some(20);
    assert!(matches!(
        c.plan(&j, &retry(), soon()),
        JobDisposition::RetryAfter { .. }
    ));
}

#[test]
fn max_attempts_of_zero_behaves_as_one() {
    let c = QueueConfig {
        max_attempts: 0,
        ..QueueConfig::default()
    };
    assert!(is_dead_letter(&c.plan(&job(1), &retry(), soon())));
}

#[test]
fn dead_letter_queue_defaults_to_queue_dot_dead_letter() {
    assert_eq!(
        QueueConfig::default().dead_letter_queue_for("emails"),
        "emails.dead-letter"
    );
    assert_eq!(dead_letter_queue_name("emails"), "emails.dead-letter");
}

#[test]
fn dead_letter_queue_override_is_used() {
    let c = QueueConfig {
        dead_letter_queue: Some("all-failures".into()),
        ..QueueConfig::default()
    };
    assert_eq!(c.dead_letter_queue_for("emails"), "all-failures");
}

#[test]
fn lease_expiry_under_max_attempts_retries_at_once() {
    let c = QueueConfig::default();
    assert_eq!(
        c.plan_lease_expiry(&job(3), soon()),
        JobDisposition::RetryAfter {
            delay: Duration::ZERO,
            reason: Some("lease expired".into())
        }
    );
}

#[test]
fn lease_expiry_at_max_attempts_dead_letters() {
    let c = QueueConfig::default();
    match c.plan_lease_expiry(&job(10), soon()) {
        JobDisposition::DeadLetter { reason } => assert!(reason.contains("lease expired")),
        other => panic!("expected DeadLetter, got {other:?}"),
    }
}

#[test]
fn lease_expiry_after_the_retry_window_dead_letters() {
    let c = QueueConfig::default();
    assert!(is_dead_letter(
        &c.plan_lease_expiry(&job(1), ENQUEUED_AT + 25 * HOUR_MS)
    ));
}
