//! Behaviour of the in-process queue bridge, one behaviour per test.
//!
//! Tests where time matters run on tokio's paused clock (`start_paused = true`): the bridge
//! reads its time from `tokio::time::Instant`, so waiting for a lease to expire or a retry to
//! become visible takes no real time.

use std::time::Duration;

use purista_bridge_default::MemoryQueueBridge;
use purista_core::capabilities::DeliveryGuarantee;
use purista_core::queue::{
    JobSettlement, LeasedJob, NewJob, QueueBridge, QueueConfig, QueueDeclaration, QueueError,
    QueueMetrics,
};
use serde_json::json;
use tokio::time::{Instant, advance};

const Q: &str = "jobs";

fn config() -> QueueConfig {
    QueueConfig {
        visibility_timeout: Duration::from_secs(30),
        ..QueueConfig::default()
    }
}

fn job(n: u32) -> NewJob {
    NewJob {
        payload: json!({ "n": n }),
        ..NewJob::default()
    }
}

async fn bridge_with(config: QueueConfig) -> MemoryQueueBridge {
    let bridge = MemoryQueueBridge::new();
    bridge
        .declare_queue(Q, QueueDeclaration::new("test@1", config))
        .await
        .expect("declare");
    bridge
}

async fn lease_now(bridge: &MemoryQueueBridge) -> Option<LeasedJob> {
    bridge.lease(Q, Duration::ZERO).await.expect("lease")
}

async fn metrics(bridge: &MemoryQueueBridge) -> QueueMetrics {
    bridge.metrics(Q).await.expect("metrics")
}

fn retry_now() -> JobSettlement {
    JobSettlement::Retry {
        delay: Some(Duration::ZERO),
        reason: None,
    }
}

fn retry_with_backoff() -> JobSettlement {
    JobSettlement::Retry {
        delay: None,
        reason: None,
    }
}

#[tokio::test]
async fn capabilities_are_default_bridge_with_everything_at_most_once() {
    let bridge = MemoryQueueBridge::default();
    let caps = bridge.capabilities();
    assert_eq!(bridge.name(), "default");
    assert_eq!(caps.bridge, "default");
    assert!(caps.delayed_delivery);
    assert!(caps.lease_extension);
    assert!(caps.dead_letter_inspect && caps.dead_letter_replay && caps.dead_letter_purge);
    assert!(caps.idempotency_enforcement);
    assert_eq!(caps.delivery, DeliveryGuarantee::AtMostOnce);
}

#[tokio::test(start_paused = true)]
async fn a_lease_hides_the_job() {
    let bridge = bridge_with(config()).await;
    let id = bridge.enqueue(Q, job(1)).await.unwrap();

    let leased = lease_now(&bridge).await.expect("job visible");
    assert_eq!(leased.id, id);
    assert_eq!(leased.queue, Q);
    assert_eq!(leased.payload, json!({ "n": 1 }));
    assert_eq!(leased.attempt, 1);
    assert_eq!(leased.extensions, 0);
    assert_eq!(leased.lease_expires_at_ms, leased.enqueued_at_ms + 30_000);

    assert_eq!(lease_now(&bridge).await, None);
}

#[tokio::test(start_paused = true)]
async fn an_unsettled_lease_reappears_after_the_visibility_timeout_with_attempt_2() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let first = lease_now(&bridge).await.unwrap();

    advance(Duration::from_millis(29_999)).await;
    assert_eq!(lease_now(&bridge).await, None);

    advance(Duration::from_millis(1)).await;
    let second = lease_now(&bridge).await.expect("visible again");
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.lease_token, first.lease_token);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_lease_wakes_when_a_lease_expires() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    lease_now(&bridge).await.unwrap();

    let start = Instant::now();
    let again = bridge.lease(Q, Duration::from_secs(60)).await.unwrap();
    assert_eq!(again.map(|j| j.attempt), Some(2));
    assert_eq!(start.elapsed(), Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn extend_lease_pushes_the_expiry_out() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();

    advance(Duration::from_secs(20)).await;
    let expiry = bridge.extend_lease(&leased, None).await.unwrap();
    assert_eq!(expiry, leased.lease_expires_at_ms + 20_000);

    advance(Duration::from_secs(20)).await;
    assert_eq!(
        lease_now(&bridge).await,
        None,
        "still leased after the old expiry"
    );
    bridge
        .settle(&leased, JobSettlement::Complete)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn extend_lease_stops_at_the_extension_cap() {
    let bridge = bridge_with(QueueConfig {
        max_lease_extensions: 2,
        ..config()
    })
    .await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();

    bridge
        .extend_lease(&leased, Some(Duration::from_secs(5)))
        .await
        .unwrap();
    bridge.extend_lease(&leased, None).await.unwrap();
    let third = bridge.extend_lease(&leased, None).await;
    assert_eq!(
        third,
        Err(QueueError::ExtensionCapReached {
            job_id: leased.id.clone(),
            cap: 2
        })
    );
}

#[tokio::test(start_paused = true)]
async fn settle_with_a_stale_token_is_lease_lost_and_changes_nothing() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let stale = lease_now(&bridge).await.unwrap();
    advance(Duration::from_secs(30)).await;
    let current = lease_now(&bridge).await.unwrap();

    let result = bridge.settle(&stale, JobSettlement::Complete).await;
    assert_eq!(
        result,
        Err(QueueError::LeaseLost {
            job_id: stale.id.clone(),
            lease_token: stale.lease_token.clone()
        })
    );
    assert_eq!(metrics(&bridge).await.leased, 1);
    bridge
        .settle(&current, JobSettlement::Complete)
        .await
        .unwrap();
    assert_eq!(metrics(&bridge).await, QueueMetrics::default());
}

#[tokio::test(start_paused = true)]
async fn settle_after_the_lease_expired_is_lease_lost() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    advance(Duration::from_secs(30)).await;

    let result = bridge.settle(&leased, JobSettlement::Complete).await;
    assert!(matches!(result, Err(QueueError::LeaseLost { .. })));
    assert_eq!(metrics(&bridge).await.depth, 1, "the job is visible again");
}

#[tokio::test(start_paused = true)]
async fn extend_with_a_stale_token_is_lease_lost() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    bridge
        .settle(&leased, JobSettlement::Complete)
        .await
        .unwrap();

    let result = bridge.extend_lease(&leased, None).await;
    assert!(matches!(result, Err(QueueError::LeaseLost { .. })));
}

#[tokio::test(start_paused = true)]
async fn complete_removes_the_job() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    bridge
        .settle(&leased, JobSettlement::Complete)
        .await
        .unwrap();

    advance(Duration::from_secs(60)).await;
    assert_eq!(lease_now(&bridge).await, None);
    assert_eq!(metrics(&bridge).await, QueueMetrics::default());
}

#[tokio::test(start_paused = true)]
async fn retry_without_delay_backs_off_1s_then_2s_within_25_percent_jitter() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();

    let first = lease_now(&bridge).await.unwrap();
    bridge.settle(&first, retry_with_backoff()).await.unwrap();
    let start = Instant::now();
    let second = bridge
        .lease(Q, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(second.attempt, 2);
    assert!(
        (Duration::from_millis(750)..=Duration::from_millis(1_250)).contains(&waited),
        "first retry after {waited:?}"
    );

    bridge.settle(&second, retry_with_backoff()).await.unwrap();
    let start = Instant::now();
    let third = bridge
        .lease(Q, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(third.attempt, 3);
    assert!(
        (Duration::from_millis(1_500)..=Duration::from_millis(2_500)).contains(&waited),
        "second retry after {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_with_an_explicit_delay_waits_exactly_that_long() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    let settlement = JobSettlement::Retry {
        delay: Some(Duration::from_secs(7)),
        reason: Some("busy".into()),
    };
    bridge.settle(&leased, settlement).await.unwrap();

    let start = Instant::now();
    let again = bridge.lease(Q, Duration::from_secs(60)).await.unwrap();
    assert_eq!(again.map(|j| j.attempt), Some(2));
    assert_eq!(start.elapsed(), Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn max_attempts_moves_the_job_to_the_dead_letter_queue() {
    let bridge = bridge_with(QueueConfig {
        max_attempts: 2,
        ..config()
    })
    .await;
    bridge.enqueue(Q, job(1)).await.unwrap();

    let first = lease_now(&bridge).await.unwrap();
    bridge.settle(&first, retry_now()).await.unwrap();
    let second = lease_now(&bridge).await.unwrap();
    assert_eq!(second.attempt, 2);
    let fail = JobSettlement::Fail {
        fatal: false,
        reason: "boom".into(),
    };
    bridge.settle(&second, fail).await.unwrap();

    assert_eq!(lease_now(&bridge).await, None);
    let dead = bridge.inspect_dead_letters(Q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].job.id, first.id);
    assert_eq!(dead[0].job.attempt, 2);
    assert!(
        dead[0].reason.contains("max attempts (2)"),
        "{}",
        dead[0].reason
    );
    assert!(dead[0].reason.contains("boom"), "{}", dead[0].reason);
}

#[tokio::test(start_paused = true)]
async fn per_job_max_attempts_overrides_the_queue_setting() {
    let bridge = bridge_with(config()).await;
    let new_job = NewJob {
        max_attempts: Some(1),
        ..job(1)
    };
    bridge.enqueue(Q, new_job).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    bridge.settle(&leased, retry_now()).await.unwrap();

    assert_eq!(metrics(&bridge).await.dead_lettered, 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_past_max_attempts_goes_to_the_dead_letter_queue() {
    let bridge = bridge_with(QueueConfig {
        max_attempts: 2,
        ..config()
    })
    .await;
    let id = bridge.enqueue(Q, job(1)).await.unwrap();
    lease_now(&bridge).await.unwrap();
    advance(Duration::from_secs(30)).await;
    let second = lease_now(&bridge).await.unwrap();
    assert_eq!(second.attempt, 2);
    advance(Duration::from_secs(30)).await;

    assert_eq!(lease_now(&bridge).await, None);
    let dead = bridge.inspect_dead_letters(Q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].job.id, id);
    assert!(
        dead[0].reason.contains("max attempts"),
        "{}",
        dead[0].reason
    );
    assert!(
        dead[0].reason.contains("lease expired"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].dead_lettered_at_ms, second.lease_expires_at_ms);
}

#[tokio::test(start_paused = true)]
async fn retry_window_exceeded_moves_the_job_to_the_dead_letter_queue() {
    let bridge = bridge_with(QueueConfig {
        retry_window: Duration::from_secs(10),
        ..config()
    })
    .await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    advance(Duration::from_secs(11)).await;
    bridge.settle(&leased, retry_now()).await.unwrap();

    assert_eq!(lease_now(&bridge).await, None);
    let dead = bridge.inspect_dead_letters(Q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("retry window"),
        "{}",
        dead[0].reason
    );
}

#[tokio::test(start_paused = true)]
async fn fatal_fail_dead_letters_at_once() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    let fail = JobSettlement::Fail {
        fatal: true,
        reason: "bad input".into(),
    };
    bridge.settle(&leased, fail).await.unwrap();

    let dead = bridge.inspect_dead_letters(Q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].job.attempt, 1);
    assert_eq!(dead[0].job.payload, json!({ "n": 1 }));
    assert!(dead[0].reason.contains("bad input"), "{}", dead[0].reason);
}

#[tokio::test(start_paused = true)]
async fn dead_letter_settlement_keeps_the_given_reason() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    let settlement = JobSettlement::DeadLetter {
        reason: "poison".into(),
    };
    bridge.settle(&leased, settlement).await.unwrap();

    let dead = bridge.inspect_dead_letters(Q, 10).await.unwrap();
    assert_eq!(dead[0].reason, "poison");
}

async fn dead_letter(bridge: &MemoryQueueBridge, n: u32) -> String {
    let id = bridge.enqueue(Q, job(n)).await.unwrap();
    let leased = lease_now(bridge).await.unwrap();
    assert_eq!(leased.id, id);
    let settlement = JobSettlement::DeadLetter {
        reason: format!("dead {n}"),
    };
    bridge.settle(&leased, settlement).await.unwrap();
    id
}

#[tokio::test(start_paused = true)]
async fn dead_letters_inspect_replay_purge_round_trip() {
    let bridge = bridge_with(config()).await;
    let a = dead_letter(&bridge, 1).await;
    advance(Duration::from_secs(1)).await;
    let b = dead_letter(&bridge, 2).await;

    let dead = bridge.inspect_dead_letters(Q, 10).await.unwrap();
    let ids: Vec<_> = dead.iter().map(|d| d.job.id.clone()).collect();
    assert_eq!(ids, [a.clone(), b.clone()], "oldest first");
    assert_eq!(bridge.inspect_dead_letters(Q, 1).await.unwrap().len(), 1);

    advance(Duration::from_secs(5)).await;
    assert_eq!(bridge.replay_dead_letters(Q, None).await.unwrap(), 2);
    assert_eq!(metrics(&bridge).await.dead_lettered, 0);
    let replayed = lease_now(&bridge).await.unwrap();
    assert_eq!(replayed.id, a);
    assert_eq!(replayed.attempt, 1, "fresh attempt budget");
    assert_eq!(replayed.enqueued_at_ms, dead[0].dead_lettered_at_ms + 6_000);

    let settlement = JobSettlement::DeadLetter {
        reason: "again".into(),
    };
    bridge.settle(&replayed, settlement).await.unwrap();
    assert_eq!(bridge.purge_dead_letters(Q).await.unwrap(), 1);
    assert!(bridge.inspect_dead_letters(Q, 10).await.unwrap().is_empty());
    assert_eq!(lease_now(&bridge).await.map(|j| j.id), Some(b));
}

#[tokio::test(start_paused = true)]
async fn replay_by_id_moves_only_those_jobs() {
    let bridge = bridge_with(config()).await;
    let a = dead_letter(&bridge, 1).await;
    let b = dead_letter(&bridge, 2).await;

    let moved = bridge
        .replay_dead_letters(Q, Some(vec![b.clone(), "no-such-job".into()]))
        .await
        .unwrap();
    assert_eq!(moved, 1);
    assert_eq!(lease_now(&bridge).await.map(|j| j.id), Some(b));
    let left = bridge.inspect_dead_letters(Q, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].job.id, a);
}

#[tokio::test(start_paused = true)]
async fn a_shared_dead_letter_queue_is_scoped_to_the_origin_queue() {
    let shared = QueueConfig {
        dead_letter_queue: Some("all.dead".into()),
        ..config()
    };
    let bridge = MemoryQueueBridge::new();
    bridge
        .declare_queue("a", QueueDeclaration::new("test@1", shared.clone()))
        .await
        .unwrap();
    bridge
        .declare_queue("b", QueueDeclaration::new("test@1", shared))
        .await
        .unwrap();
    for queue in ["a", "b"] {
        bridge.enqueue(queue, job(1)).await.unwrap();
        let leased = bridge.lease(queue, Duration::ZERO).await.unwrap().unwrap();
        let settlement = JobSettlement::DeadLetter { reason: "x".into() };
        bridge.settle(&leased, settlement).await.unwrap();
    }

    let in_a = bridge.inspect_dead_letters("a", 10).await.unwrap();
    assert_eq!(in_a.len(), 1);
    assert_eq!(in_a[0].job.queue, "a");
    assert_eq!(bridge.purge_dead_letters("a").await.unwrap(), 1);
    assert_eq!(bridge.metrics("b").await.unwrap().dead_lettered, 1);
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_key_returns_the_first_job_id() {
    let bridge = bridge_with(config()).await;
    let keyed = |n| NewJob {
        idempotency_key: Some("order-42".into()),
        ..job(n)
    };
    let first = bridge.enqueue(Q, keyed(1)).await.unwrap();
    let second = bridge.enqueue(Q, keyed(2)).await.unwrap();

    assert_eq!(second, first);
    assert_eq!(metrics(&bridge).await.depth, 1);
    let leased = lease_now(&bridge).await.unwrap();
    assert_eq!(leased.payload, json!({ "n": 1 }));
    assert_eq!(leased.idempotency_key.as_deref(), Some("order-42"));
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_key_is_forgotten_after_the_retry_window() {
    let bridge = bridge_with(QueueConfig {
        retry_window: Duration::from_secs(60),
        ..config()
    })
    .await;
    let keyed = || NewJob {
        idempotency_key: Some("k".into()),
        ..job(1)
    };
    let first = bridge.enqueue(Q, keyed()).await.unwrap();
    advance(Duration::from_secs(59)).await;
    assert_eq!(bridge.enqueue(Q, keyed()).await.unwrap(), first);
    advance(Duration::from_secs(1)).await;

    let later = bridge.enqueue(Q, keyed()).await.unwrap();
    assert_ne!(later, first);
    assert_eq!(metrics(&bridge).await.depth, 2);
}

#[tokio::test(start_paused = true)]
async fn a_delayed_job_is_not_leased_before_run_at() {
    let bridge = bridge_with(config()).await;
    // The bridge's "now": the enqueue time of a probe job.
    bridge.enqueue(Q, job(0)).await.unwrap();
    let now_ms = lease_now(&bridge).await.unwrap().enqueued_at_ms;
    let delayed = NewJob {
        run_at_ms: Some(now_ms + 5_000),
        ..job(1)
    };
    let id = bridge.enqueue(Q, delayed).await.unwrap();

    advance(Duration::from_millis(4_999)).await;
    assert_eq!(lease_now(&bridge).await, None);
    assert_eq!(metrics(&bridge).await.delayed, 1);

    let start = Instant::now();
    let leased = bridge.lease(Q, Duration::from_secs(60)).await.unwrap();
    assert_eq!(leased.map(|j| j.id), Some(id));
    assert_eq!(start.elapsed(), Duration::from_millis(1));
}

#[tokio::test(start_paused = true)]
async fn a_run_at_in_the_past_is_visible_at_once_in_enqueue_order() {
    let bridge = bridge_with(config()).await;
    let first = bridge.enqueue(Q, job(1)).await.unwrap();
    let past = NewJob {
        run_at_ms: Some(0),
        ..job(2)
    };
    bridge.enqueue(Q, past).await.unwrap();

    assert_eq!(lease_now(&bridge).await.map(|j| j.id), Some(first));
    assert_eq!(
        lease_now(&bridge).await.map(|j| j.payload),
        Some(json!({ "n": 2 }))
    );
}

#[tokio::test(start_paused = true)]
async fn jobs_are_leased_in_fifo_order() {
    let bridge = bridge_with(config()).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(bridge.enqueue(Q, job(n)).await.unwrap());
    }

    let mut leased = Vec::new();
    while let Some(job) = lease_now(&bridge).await {
        leased.push(job.id);
    }
    assert_eq!(leased, ids);
}

#[tokio::test(start_paused = true)]
async fn a_retried_job_queues_behind_jobs_visible_before_it() {
    let bridge = bridge_with(config()).await;
    let a = bridge.enqueue(Q, job(1)).await.unwrap();
    let leased = lease_now(&bridge).await.unwrap();
    advance(Duration::from_secs(1)).await;
    let b = bridge.enqueue(Q, job(2)).await.unwrap();
    advance(Duration::from_millis(1)).await;
    bridge.settle(&leased, retry_now()).await.unwrap();

    assert_eq!(lease_now(&bridge).await.map(|j| j.id), Some(b));
    assert_eq!(lease_now(&bridge).await.map(|j| j.id), Some(a));
}

#[tokio::test(start_paused = true)]
async fn metrics_count_ready_leased_delayed_and_dead_lettered() {
    let bridge = bridge_with(config()).await;
    for n in 0..4 {
        bridge.enqueue(Q, job(n)).await.unwrap();
    }
    let delayed = NewJob {
        run_at_ms: Some(u64::MAX),
        ..job(9)
    };
    bridge.enqueue(Q, delayed).await.unwrap();
    lease_now(&bridge).await.unwrap();
    let dead = lease_now(&bridge).await.unwrap();
    let settlement = JobSettlement::DeadLetter { reason: "x".into() };
    bridge.settle(&dead, settlement).await.unwrap();

    assert_eq!(
        metrics(&bridge).await,
        QueueMetrics {
            depth: 2,
            leased: 1,
            delayed: 1,
            dead_lettered: 1,
        }
    );
}

#[tokio::test]
async fn an_undeclared_queue_is_unknown_queue() {
    let bridge = MemoryQueueBridge::new();

    let enqueue = bridge.enqueue("nope", job(1)).await;
    let lease = bridge.lease("nope", Duration::ZERO).await;
    let metrics = bridge.metrics("nope").await;
    assert_eq!(enqueue, Err(QueueError::UnknownQueue("nope".into())));
    assert_eq!(lease, Err(QueueError::UnknownQueue("nope".into())));
    assert_eq!(metrics, Err(QueueError::UnknownQueue("nope".into())));
}

#[tokio::test]
async fn an_empty_queue_name_is_an_invalid_request() {
    let bridge = MemoryQueueBridge::new();

    let declare = bridge
        .declare_queue("", QueueDeclaration::new("test@1", config()))
        .await;
    let enqueue = bridge.enqueue("", job(1)).await;
    assert!(matches!(declare, Err(QueueError::InvalidRequest(_))));
    assert!(matches!(enqueue, Err(QueueError::InvalidRequest(_))));
}

#[tokio::test(start_paused = true)]
async fn redeclaring_a_queue_with_the_same_config_keeps_it_and_its_jobs() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    bridge
        .declare_queue(Q, QueueDeclaration::new("other@1", config()))
        .await
        .expect("an identical declaration is fine");

    let leased = lease_now(&bridge).await.expect("job kept");
    assert_eq!(leased.lease_expires_at_ms, leased.enqueued_at_ms + 30_000);
}

#[tokio::test(start_paused = true)]
async fn redeclaring_a_queue_with_another_config_is_refused_naming_both_and_changes_nothing() {
    let bridge = bridge_with(config()).await;
    bridge.enqueue(Q, job(1)).await.unwrap();
    let longer = QueueConfig {
        visibility_timeout: Duration::from_secs(90),
        max_attempts: 2,
        ..config()
    };
    let refused = bridge
        .declare_queue(Q, QueueDeclaration::new("shop@1", longer))
        .await;
    assert_eq!(
        refused,
        Err(QueueError::ConflictingDeclaration {
            queue: Q.into(),
            first: "test@1".into(),
            second: "shop@1".into(),
            differing: vec!["visibility_timeout".into(), "max_attempts".into()],
        })
    );

    let leased = lease_now(&bridge).await.expect("job kept");
    assert_eq!(
        leased.lease_expires_at_ms,
        leased.enqueued_at_ms + 30_000,
        "the first declaration stays in force"
    );
    assert_eq!(bridge.declaration(Q).map(|d| d.config), Some(config()));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_lease_wakes_on_enqueue() {
    let bridge = bridge_with(config()).await;
    let waiter = {
        let bridge = bridge.clone();
        tokio::spawn(async move { bridge.lease(Q, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = Instant::now();
    let id = bridge.enqueue(Q, job(1)).await.unwrap();

    let leased = waiter.await.unwrap().unwrap();
    assert_eq!(leased.map(|j| j.id), Some(id));
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_lease_returns_none_after_its_wait() {
    let bridge = bridge_with(config()).await;

    let start = Instant::now();
    assert_eq!(bridge.lease(Q, Duration::from_secs(3)).await, Ok(None));
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn shutdown_makes_a_waiting_lease_return_unavailable() {
    let bridge = bridge_with(config()).await;
    let waiter = {
        let bridge = bridge.clone();
        tokio::spawn(async move { bridge.lease(Q, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = Instant::now();
    bridge.shutdown().await;

    let result = waiter.await.unwrap();
    assert!(
        matches!(result, Err(QueueError::Unavailable(_))),
        "{result:?}"
    );
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn calls_after_shutdown_are_unavailable() {
    let bridge = bridge_with(config()).await;
    bridge.shutdown().await;

    let enqueue = bridge.enqueue(Q, job(1)).await;
    let declare = bridge
        .declare_queue("other", QueueDeclaration::new("test@1", config()))
        .await;
    assert!(matches!(enqueue, Err(QueueError::Unavailable(_))));
    assert!(matches!(declare, Err(QueueError::Unavailable(_))));
}
