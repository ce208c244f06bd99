//! Consumers and publishers that come and go (DESIGN §3.3, §3.8): an instance that leaves with
//! prefetched messages, a publisher that exits right after an emit, instances that shut down
//! together, registrations taken back. What was published must not be lost on the way.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use purista_core::{Outcome, RunningService, Service, SubscriptionContext, SubscriptionDef};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{
    ARRIVAL, BULK_ARRIVAL, Collector, Runs, SENTINEL, ack, by_message, may_duplicate, n_of,
    recording_runs, set_difference, settle_with_sentinels,
};

/// Fails the case unless the runs (sentinels left out) are exactly `0..count`, each at one
/// instance, and — on an at-most-once bridge — each once.
fn assert_exact(runs: &Runs, count: u64, h: &Arc<dyn Harness>, what: &str) {
    let got = by_message(&runs.snapshot());
    if let Some(diff) = set_difference(&got.keys().copied().collect(), &(0..count).collect()) {
        panic!("{what}: {diff}");
    }
    if !may_duplicate(&h.capabilities()) {
        let twice: Vec<_> = got.iter().filter(|(_, (_, a))| a.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "{what}: an at-most-once bridge handled messages twice: {:?}",
            twice.iter().take(5).collect::<Vec<_>>()
        );
    }
}

/// A shared subscription whose handler takes a while (10 ms, on purpose) with prefetch 16: 500
/// messages; after instance A handled 50, instance B joins and A's service shuts down, with
/// messages prefetched but not handled. Every message is handled (nothing handled twice on an
/// at-most-once bridge).
pub async fn a_consumer_leaving_with_prefetched_messages_loses_none(h: Arc<dyn Harness>) {
    const COUNT: u64 = 500;
    let mut env = TestEnv::new(&h, 3).await;
    let event = env.name("prefetched");
    let runs: Runs = Collector::new();
    let slow = |instance: usize, runs: Runs| {
        SubscriptionDef::new("slow", move |ctx: SubscriptionContext, v: Value| {
            let runs = runs.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                runs.push((instance, n_of(&v), ctx.attempt()));
                Ok(Outcome::Ack)
            }
        })
        .event_name(&event)
        .prefetch(16)
    };
    let a = env
        .start(
            0,
            Service::builder(env.name("consumer"), "1").subscription(slow(0, runs.clone())),
        )
        .await;
    let publisher = env
        .start(2, Service::builder(env.name("publisher"), "1"))
        .await;
    let publishing = {
        let (publisher, event) = (publisher.clone(), event.clone());
        tokio::spawn(async move {
            for n in 0..COUNT {
                publisher
                    .emit(&event, json!({ "n": n }))
                    .await
                    .unwrap_or_else(|e| panic!("emit {n} failed: {e}"));
            }
        })
    };
    runs.wait_for_len(50, BULK_ARRIVAL, "instance A handling its first 50")
        .await;
    let b = env
        .start(
            1,
            Service::builder(env.name("consumer"), "1").subscription(slow(1, runs.clone())),
        )
        .await;
    a.shutdown(Instant::now() + Duration::from_secs(5)).await;
    publishing.await.expect("the publishing task did not panic");
    // Whatever A handed back went back before the sentinels, which B takes after the rest.
    settle_with_sentinels(&publisher, &event, &runs, &[b]).await;
    assert_exact(
        &runs,
        COUNT,
        &h,
        "a consumer left with prefetched, unhandled messages",
    );
    env.finish().await;
}

/// 20 emits that returned Ok, then the publishing instance shuts down at once: all 20 are
/// delivered (the bridge flushed what it had accepted before it closed).
pub async fn an_emit_that_returned_is_delivered_after_an_immediate_shutdown(h: Arc<dyn Harness>) {
    const COUNT: u64 = 20;
    let mut env = TestEnv::new(&h, 3).await;
    let event = env.name("flushed");
    let runs: Runs = Collector::new();
    let consumer = env
        .start(
            1,
            Service::builder(env.name("consumer"), "1").subscription(recording_runs(
                "flushed",
                &event,
                0,
                runs.clone(),
                ack,
            )),
        )
        .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    for n in 0..COUNT {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    env.bridge(0)
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
    let _ = runs
        .wait_until(ARRIVAL, |r| {
            r.iter().map(|(_, n, _)| *n).collect::<BTreeSet<_>>().len() >= COUNT as usize
        })
        .await;
    let other = env
        .start(2, Service::builder(env.name("other-publisher"), "1"))
        .await;
    settle_with_sentinels(&other, &event, &runs, &[consumer]).await;
    assert_exact(
        &runs,
        COUNT,
        &h,
        "emits that returned before an immediate shutdown",
    );
    env.finish().await;
}

/// The 3 instances of a shared subscription shut down at the same time; then a new instance
/// of the service starts and gets exactly everything published afterwards.
pub async fn a_shared_subscription_survives_its_instances_shutting_down_together(
    h: Arc<dyn Harness>,
) {
    const COUNT: u64 = 50;
    let mut env = TestEnv::new(&h, 5).await;
    let event = env.name("together");
    let before: Runs = Collector::new();
    let mut leaving: Vec<Arc<RunningService>> = Vec::new();
    for i in 0..3 {
        leaving.push(
            env.start(
                i,
                Service::builder(env.name("consumer"), "1").subscription(recording_runs(
                    "together",
                    &event,
                    i,
                    before.clone(),
                    ack,
                )),
            )
            .await,
        );
    }
    let publisher = env
        .start(4, Service::builder(env.name("publisher"), "1"))
        .await;
    // Consumed before the shutdown: should it come again, it counts as extra below.
    publisher
        .emit(&event, json!({ "n": 10_000 }))
        .await
        .expect("emit succeeds");
    before
        .wait_for_len(1, ARRIVAL, "a message while the 3 instances run")
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    futures::future::join_all(leaving.iter().map(|s| s.shutdown(deadline))).await;

    let runs: Runs = Collector::new();
    let newcomer = env
        .start(
            3,
            Service::builder(env.name("consumer"), "1").subscription(recording_runs(
                "together",
                &event,
                3,
                runs.clone(),
                ack,
            )),
        )
        .await;
    for n in 0..COUNT {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    let _ = runs
        .wait_until(ARRIVAL, |r| {
            r.iter()
                .map(|(_, n, _)| *n)
                .filter(|n| *n < SENTINEL)
                .collect::<BTreeSet<_>>()
                .len()
                >= COUNT as usize
        })
        .await;
    settle_with_sentinels(&publisher, &event, &runs, &[newcomer]).await;
    assert_exact(
        &runs,
        COUNT,
        &h,
        "a new instance after the others shut down together",
    );
    env.finish().await;
}
