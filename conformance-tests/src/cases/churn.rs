//! Consumers and publishers that come and go (DESIGN §3.3, §3.8): an instance that leaves with
//! prefetched messages, a publisher that exits right after an emit, instances that shut down
//! together, registrations taken back. What was published must not be lost on the way.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use purista_core::{
    Outcome, RegistrationKey, RunningService, Service, SubscriptionContext, SubscriptionDef,
};
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

/// `unregister_subscription` on one of two instances of a shared subscription: that instance
/// gets nothing published afterwards, the other gets exactly all of it.
pub async fn an_unregistered_subscription_instance_gets_nothing_more(h: Arc<dyn Harness>) {
    const BEFORE: u64 = 20;
    const AFTER: u64 = 50;
    let mut env = TestEnv::new(&h, 3).await;
    let event = env.name("leaving");
    let service = env.name("consumer");
    let runs: Runs = Collector::new();
    let mut consumers = Vec::new();
    for i in 0..2 {
        consumers.push(
            env.start(
                i,
                Service::builder(&service, "1").subscription(recording_runs(
                    "leaving",
                    &event,
                    i,
                    runs.clone(),
                    ack,
                )),
            )
            .await,
        );
    }
    let publisher = env
        .start(2, Service::builder(env.name("publisher"), "1"))
        .await;
    for n in 0..BEFORE {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    let _ = runs
        .wait_until(ARRIVAL, |r| {
            r.iter().map(|(_, n, _)| *n).collect::<BTreeSet<_>>().len() >= BEFORE as usize
        })
        .await;
    env.bridge(0)
        .unregister_subscription(&RegistrationKey::new(&service, "1", "leaving"))
        .await
        .unwrap_or_else(|e| panic!("unregistering the subscription failed: {e}"));
    for n in BEFORE..BEFORE + AFTER {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    settle_with_sentinels(&publisher, &event, &runs, &consumers[1..]).await;
    for c in &consumers {
        crate::support::handlers_finished(c).await;
    }
    assert_exact(
        &runs,
        BEFORE + AFTER,
        &h,
        "a shared subscription with one instance unregistered",
    );
    let to_the_leaver: Vec<u64> = runs
        .snapshot()
        .iter()
        .filter(|(i, n, _)| *i == 0 && (BEFORE..BEFORE + AFTER).contains(n))
        .map(|(_, n, _)| *n)
        .collect();
    assert!(
        to_the_leaver.is_empty(),
        "the unregistered instance still got messages published after it left: {to_the_leaver:?}"
    );
    env.finish().await;
}

/// `unregister_command` on one of two servers: every invocation afterwards is served by the
/// other; once it unregisters too, an invocation fails with 502 at once or 504 at its ttl.
pub async fn an_unregistered_command_server_serves_nothing_more(h: Arc<dyn Harness>) {
    const TTL: Duration = Duration::from_millis(500);
    let mut env = TestEnv::new(&h, 3).await;
    let served: Arc<Collector<usize>> = Collector::new();
    let service = env.name("server");
    for i in 0..2 {
        let served = served.clone();
        let echo = purista_core::CommandDef::new(
            "echo",
            move |_ctx: purista_core::Context, n: u64, _p: purista_core::Empty| {
                let served = served.clone();
                async move {
                    served.push(i);
                    Ok(n)
                }
            },
        );
        env.start(i, Service::builder(&service, "1").command(echo))
            .await;
    }
    let client = env
        .start(2, Service::builder(env.name("client"), "1"))
        .await;
    let to = purista_core::Address::new(&service, "1", "echo");
    env.bridge(0)
        .unregister_command(&to)
        .await
        .unwrap_or_else(|e| panic!("unregistering the command failed: {e}"));
    for n in 0..20u64 {
        let answer: u64 = client
            .invoke_with(
                to.clone(),
                n,
                purista_core::Empty,
                purista_core::InvokeOptions::ttl(ARRIVAL),
            )
            .await
            .unwrap_or_else(|e| panic!("invocation {n} with one server left failed: {e}"));
        assert_eq!(answer, n);
    }
    let by: Vec<usize> = served.snapshot();
    assert!(
        by.iter().all(|i| *i == 1),
        "the unregistered server still served invocations: served by {by:?}"
    );
    env.bridge(1)
        .unregister_command(&to)
        .await
        .unwrap_or_else(|e| panic!("unregistering the command failed: {e}"));
    let clock = crate::support::Stopwatch::start();
    let err = client
        .invoke_with::<u64>(
            to,
            0u64,
            purista_core::Empty,
            purista_core::InvokeOptions::ttl(TTL),
        )
        .await
        .expect_err("a command whose servers all unregistered cannot succeed");
    let took = clock.elapsed();
    match err.status {
        purista_core::StatusCode::BAD_GATEWAY => clock.assert_by_at("the 502", took, TTL),
        purista_core::StatusCode::GATEWAY_TIMEOUT => clock.assert_on_time_at("the 504", took, TTL),
        other => {
            panic!("a command nobody serves any more failed with {other} ({err}), not 502 or 504")
        }
    }
    env.finish().await;
}

/// `unregister_stream` on one of two producers: every session afterwards is served by the
/// other; once it unregisters too, opening a session fails.
pub async fn an_unregistered_stream_producer_serves_nothing_more(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 3).await;
    let service = env.name("producer");
    for i in 0..2u64 {
        let stream = purista_core::StreamDef::new(
            "who",
            move |_ctx: purista_core::Context,
                  _p: purista_core::Empty,
                  _q: purista_core::Empty,
                  out: purista_core::StreamWriter| async move {
                out.write(i).await?;
                Ok(json!(i))
            },
        );
        env.start(i as usize, Service::builder(&service, "1").stream(stream))
            .await;
    }
    let consumer = env
        .start(2, Service::builder(env.name("consumer"), "1"))
        .await;
    let to = purista_core::Address::new(&service, "1", "who");
    env.bridge(0)
        .unregister_stream(&to)
        .await
        .unwrap_or_else(|e| panic!("unregistering the stream failed: {e}"));
    for k in 0..10 {
        let mut reader = consumer
            .open_stream(
                to.clone(),
                purista_core::Empty,
                purista_core::Empty,
                Some(ARRIVAL),
            )
            .await
            .unwrap_or_else(|e| panic!("session {k} with one producer left did not open: {e}"));
        let mut produced_by = Vec::new();
        while let Some(item) = reader.next().await {
            match item {
                purista_core::StreamItem::Chunk(v) => produced_by.push(v),
                purista_core::StreamItem::Complete(_) => break,
                other => panic!("session {k} ended with {other:?}"),
            }
        }
        assert_eq!(
            produced_by,
            vec![json!(1)],
            "session {k} was produced by the unregistered producer"
        );
    }
    env.bridge(1)
        .unregister_stream(&to)
        .await
        .unwrap_or_else(|e| panic!("unregistering the stream failed: {e}"));
    let opened = consumer
        .open_stream(
            to,
            purista_core::Empty,
            purista_core::Empty,
            Some(Duration::from_millis(500)),
        )
        .await;
    match opened {
        Err(e) => assert!(
            matches!(
                e.status,
                purista_core::StatusCode::BAD_GATEWAY | purista_core::StatusCode::GATEWAY_TIMEOUT
            ),
            "opening a stream nobody serves failed with {e}, not 502 or 504"
        ),
        Ok(mut reader) => {
            let first = reader.next().await;
            assert!(
                matches!(
                    first,
                    Some(purista_core::StreamItem::Error(_) | purista_core::StreamItem::TimedOut)
                ),
                "a stream nobody serves any more produced {first:?}"
            );
        }
    }
    env.finish().await;
}
