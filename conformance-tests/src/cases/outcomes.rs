//! Subscription outcomes and failure handling (DESIGN §3.4): how a handler's outcome settles a
//! delivery, retries, dead letters, pausing, and messages that are not what they claim to be.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use purista_core::{
    DeadLetterEntry, Envelope, HealthState, Need, Outcome, RegistrationKey, RunningService,
    Service, SettleError, SubscriptionContext, SubscriptionDef,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::env::TestEnv;
use crate::gate::declares;
use crate::harness::Harness;
use crate::logs;
use crate::support::{
    ARRIVAL, Collector, Stopwatch, eventually, eventually_some, handlers_finished, may_duplicate,
};

/// (n, attempt) per handler run.
type Runs = Arc<Collector<(u64, u32)>>;

fn n_of(v: &Value) -> u64 {
    v["n"].as_u64().unwrap_or(u64::MAX)
}

/// A consumer service on instance 1 with `def` and a publisher service on instance 0:
/// (consumer, publisher).
async fn consumer_and_publisher(
    env: &mut TestEnv,
    def: SubscriptionDef,
) -> (Arc<RunningService>, Arc<RunningService>) {
    let consumer = env
        .start(
            1,
            Service::builder(env.name("consumer"), "1").subscription(def),
        )
        .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    (consumer, publisher)
}

/// The message number the sentinels of these cases carry.
const SENTINEL: u64 = 1_000_000;

/// Publishes the sentinel (`n` = [`SENTINEL`]) and waits until `runs` has it and `consumer`
/// runs no handler: a delivery that came before the sentinel is in `runs` by then.
async fn sentinel(publisher: &RunningService, consumer: &RunningService, event: &str, runs: &Runs) {
    publisher
        .emit(event, json!({ "n": SENTINEL }))
        .await
        .expect("emit succeeds");
    if let Err(got) = runs
        .wait_until(ARRIVAL, |r| r.iter().any(|(n, _)| *n == SENTINEL))
        .await
    {
        panic!("the sentinel published after the case's messages never arrived: {got:?}");
    }
    handlers_finished(consumer).await;
}

/// Waits until `runs` (of another subscription than [`sentinel`] waited on) has the sentinel.
async fn sentinel_seen(runs: &Runs) {
    if let Err(got) = runs
        .wait_until(ARRIVAL, |r| r.iter().any(|(n, _)| *n == SENTINEL))
        .await
    {
        panic!("the sentinel published after the case's messages never arrived: {got:?}");
    }
}

/// Runs per message number, sentinel left out.
fn runs_per_n(runs: &[(u64, u32)]) -> BTreeMap<u64, Vec<u32>> {
    let mut per_n: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (n, attempt) in runs.iter().filter(|(n, _)| *n != SENTINEL) {
        per_n.entry(*n).or_default().push(*attempt);
    }
    for attempts in per_n.values_mut() {
        attempts.sort_unstable();
    }
    per_n
}

async fn dead_letters(env: &TestEnv, target: &str) -> Vec<DeadLetterEntry> {
    env.bridge(0)
        .inspect_dead_letters(target, 100)
        .await
        .unwrap_or_else(|e| panic!("inspecting dead-letter target `{target}` failed: {e}"))
}

/// `ack` settles the delivery: it runs once and is not redelivered.
pub async fn ack_settles_the_delivery(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("acked");
    let runs: Runs = Collector::new();
    let sink = runs.clone();
    let def = SubscriptionDef::new("acks", move |ctx: SubscriptionContext, v: Value| {
        let sink = sink.clone();
        async move {
            sink.push((n_of(&v), ctx.attempt()));
            Ok(Outcome::Ack)
        }
    })
    .event_name(&event);
    let (consumer, publisher) = consumer_and_publisher(&mut env, def).await;
    for n in 0..5 {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    runs.wait_for_len(5, ARRIVAL, "acked deliveries").await;
    sentinel(&publisher, &consumer, &event, &runs).await;
    let got = runs_per_n(&runs.snapshot());
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (0..5).collect::<Vec<_>>(),
        "acked deliveries lost: {got:?}"
    );
    assert!(
        got.values().flatten().all(|attempt| *attempt == 1),
        "an acked message was delivered again: {got:?}"
    );
    if !may_duplicate(&env.caps()) {
        assert!(
            got.values().all(|a| a.len() == 1),
            "an acked message was delivered again: {got:?}"
        );
    }
    env.finish().await;
}

/// `retry` redelivers up to `max_attempts`; then the message goes to the dead-letter target with
/// reason, attempt count and origin, payload intact. A returned unhandled error counts as retry.
pub async fn retry_up_to_max_attempts_then_dead_letter(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("failing");
    let target = env.name("dead-letters");
    let runs: Runs = Collector::new();
    let errors: Runs = Collector::new();
    let (retry_sink, error_sink) = (runs.clone(), errors.clone());
    let consumer = env.name("consumer");
    let consumer_service = env
        .start(
            1,
            Service::builder(&consumer, "1")
                .subscription(
                    SubscriptionDef::new("retries", move |ctx: SubscriptionContext, v: Value| {
                        let sink = retry_sink.clone();
                        async move {
                            sink.push((n_of(&v), ctx.attempt()));
                            // The sentinel is settled; everything else asks for a retry.
                            Ok(if n_of(&v) == SENTINEL {
                                Outcome::Ack
                            } else {
                                Outcome::retry()
                            })
                        }
                    })
                    .event_name(&event)
                    .max_attempts(3)
                    .dead_letter_target(&target),
                )
                .subscription(
                    SubscriptionDef::new("errors", move |ctx: SubscriptionContext, v: Value| {
                        let sink = error_sink.clone();
                        async move {
                            sink.push((n_of(&v), ctx.attempt()));
                            if n_of(&v) == SENTINEL {
                                return Ok(());
                            }
                            Err(anyhow::anyhow!("downstream unavailable"))
                        }
                    })
                    .event_name(&event)
                    .max_attempts(2)
                    .dead_letter_target(&target),
                ),
        )
        .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    let payload = json!({ "n": 7, "orderId": "o-7", "lines": [1, 2, 3] });
    publisher
        .emit(&event, payload.clone())
        .await
        .expect("emit succeeds");

    let entries = eventually_some("two dead-letter entries", ARRIVAL, || {
        let env = &env;
        let target = target.clone();
        async move {
            let e = dead_letters(env, &target).await;
            (e.len() >= 2).then_some(e)
        }
    })
    .await;
    sentinel(&publisher, &consumer_service, &event, &runs).await;
    sentinel_seen(&errors).await;
    handlers_finished(&consumer_service).await;
    let retried = runs_per_n(&runs.snapshot());
    let errored = runs_per_n(&errors.snapshot());
    let distinct = |a: &[u32]| a.iter().copied().collect::<BTreeSet<u32>>();
    assert_eq!(
        retried.get(&7).map(|a| distinct(a)),
        Some(BTreeSet::from([1, 2, 3])),
        "retry did not deliver exactly attempts 1..=max_attempts: {retried:?}"
    );
    assert_eq!(
        errored.get(&7).map(|a| distinct(a)),
        Some(BTreeSet::from([1, 2])),
        "a returned error was not retried up to max_attempts: {errored:?}"
    );
    if !may_duplicate(&env.caps()) {
        assert_eq!(
            retried[&7],
            vec![1, 2, 3],
            "more deliveries than max_attempts"
        );
        assert_eq!(errored[&7], vec![1, 2], "more deliveries than max_attempts");
    }
    for (origin, attempts) in [("retries", 3), ("errors", 2)] {
        let key = format!("{consumer}@1/{origin}");
        let entry = entries
            .iter()
            .find(|e| e.note.origin == key)
            .unwrap_or_else(|| panic!("no dead-letter entry names origin `{key}`: {entries:?}"));
        assert_eq!(
            entry.note.target, target,
            "dead-lettered to the wrong target"
        );
        assert_eq!(
            entry.note.attempts, attempts,
            "the dead-letter entry has the wrong attempt count"
        );
        assert!(
            !entry.note.reason.is_empty(),
            "the dead-letter entry has no reason"
        );
        let envelope = entry
            .envelope
            .as_ref()
            .expect("the dead-lettered message is kept");
        assert_eq!(
            envelope.payload, payload,
            "the dead-lettered payload changed"
        );
        assert_eq!(envelope.event_name.as_deref(), Some(event.as_str()));
    }
    env.finish().await;
}

/// A retry with a delay is not delivered before the delay has passed.
pub async fn delayed_retry_is_not_delivered_before_its_delay(h: Arc<dyn Harness>) {
    // As required in the case table (`DelayedRetry { delay_ms: 300 }`).
    const DELAY_MS: u64 = 300;
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("later");
    let runs: Arc<Collector<(u32, Instant)>> = Collector::new();
    let sink = runs.clone();
    let def = SubscriptionDef::new("later", move |ctx: SubscriptionContext, _v: Value| {
        let sink = sink.clone();
        async move {
            sink.push((ctx.attempt(), Instant::now()));
            Ok(if ctx.attempt() == 1 {
                Outcome::retry()
            } else {
                Outcome::Ack
            })
        }
    })
    .event_name(&event)
    .max_attempts(2)
    .retry_delay_ms(DELAY_MS);
    let (_, publisher) = consumer_and_publisher(&mut env, def).await;
    // Measures the machine's stalls over the whole run: the retry's window lies inside it.
    let clock = Stopwatch::start();
    publisher
        .emit(&event, json!({}))
        .await
        .expect("emit succeeds");
    let got = runs.wait_for_len(2, ARRIVAL, "the delayed retry").await;
    let first = got.iter().find(|(a, _)| *a == 1).expect("attempt 1").1;
    let second = got.iter().find(|(a, _)| *a == 2).expect("attempt 2").1;
    clock.assert_on_time_at(
        "the delayed retry",
        second.duration_since(first),
        Duration::from_millis(DELAY_MS),
    );
    env.finish().await;
}

/// `drop` settles the delivery with a warning: no redelivery, no dead letter.
pub async fn drop_settles_with_a_warning(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("unwanted");
    let target = env.name("dead-letters");
    let reason = format!("{} not wanted here", env.prefix);
    let runs: Runs = Collector::new();
    let sink = runs.clone();
    let why = reason.clone();
    let mut def = SubscriptionDef::new("drops", move |ctx: SubscriptionContext, v: Value| {
        let sink = sink.clone();
        let why = why.clone();
        async move {
            sink.push((n_of(&v), ctx.attempt()));
            Ok(Outcome::drop_message(why))
        }
    })
    .event_name(&event);
    // Where retries and dead letters exist, prove that drop uses neither.
    let retry = Need::BoundedRetry { max_attempts: 3 };
    let with_dead_letters = declares(&h, &retry) && declares(&h, &Need::DeadLetter);
    if with_dead_letters {
        def = def.max_attempts(3).dead_letter_target(&target);
    }
    let (consumer, publisher) = consumer_and_publisher(&mut env, def).await;
    publisher
        .emit(&event, json!({ "n": 1 }))
        .await
        .expect("emit succeeds");
    runs.wait_for_len(1, ARRIVAL, "the dropped delivery").await;
    eventually("a warning for the dropped message", ARRIVAL, || {
        let found = !logs::warnings(|c| c.mentions(&reason)).is_empty();
        async move { found }
    })
    .await;
    sentinel(&publisher, &consumer, &event, &runs).await;
    let got = runs_per_n(&runs.snapshot());
    assert_eq!(
        got.get(&1),
        Some(&vec![1]),
        "a dropped message was redelivered: {got:?}"
    );
    if with_dead_letters {
        assert!(
            dead_letters(&env, &target).await.is_empty(),
            "a dropped message was dead-lettered"
        );
    }
    env.finish().await;
}

/// `stop_consumer` pauses the consumer: it is listed as paused, health is `warn`, nothing is
/// delivered; resuming delivers the paused message and everything published meanwhile.
pub async fn stop_consumer_pauses_until_resumed(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("maintenance");
    let reason = format!("{} downstream in maintenance", env.prefix);
    let runs: Runs = Collector::new();
    let stopped_once = Arc::new(AtomicBool::new(false));
    let (sink, stopped, why) = (runs.clone(), stopped_once.clone(), reason.clone());
    let def = SubscriptionDef::new("pausing", move |ctx: SubscriptionContext, v: Value| {
        let (sink, stopped, why) = (sink.clone(), stopped.clone(), why.clone());
        async move {
            sink.push((n_of(&v), ctx.attempt()));
            if !stopped.swap(true, Ordering::SeqCst) {
                return Ok(Outcome::stop_consumer(why));
            }
            Ok(Outcome::Ack)
        }
    })
    .event_name(&event)
    .pausable()
    .prefetch(1);
    // A second subscription of the same event that never pauses: once it has a message, the
    // paused one would have had it too.
    let witnessed: Runs = Collector::new();
    let witness_sink = witnessed.clone();
    let witness = SubscriptionDef::new("witness", move |_ctx: SubscriptionContext, v: Value| {
        let sink = witness_sink.clone();
        async move {
            sink.push((n_of(&v), 1));
            Ok(Outcome::Ack)
        }
    })
    .event_name(&event);
    let consumer = env
        .start(
            1,
            Service::builder(env.name("consumer"), "1")
                .subscription(def)
                .subscription(witness),
        )
        .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    let key = RegistrationKey::new(&env.name("consumer"), "1", "pausing");

    publisher
        .emit(&event, json!({ "n": 0 }))
        .await
        .expect("emit succeeds");
    runs.wait_for_len(1, ARRIVAL, "the delivery that stops the consumer")
        .await;
    eventually("the consumer is listed as paused", ARRIVAL, || {
        let paused = consumer
            .paused_subscription_consumers()
            .iter()
            .any(|p| p.key == key);
        async move { paused }
    })
    .await;
    let paused = consumer.paused_subscription_consumers();
    assert_eq!(
        paused[0].reason, reason,
        "the pause does not carry its reason"
    );
    let health = consumer.health().await;
    assert_eq!(
        health.state,
        HealthState::Warn,
        "a paused consumer must make health `warn`"
    );
    assert!(
        health.paused_consumers.iter().any(|p| p.key == key),
        "health does not list the paused consumer"
    );

    for n in 1..=5 {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    if let Err(got) = witnessed
        .wait_until(ARRIVAL, |w| (1..=5).all(|n| w.iter().any(|(m, _)| *m == n)))
        .await
    {
        panic!("the messages published during the pause did not reach the witness: {got:?}");
    }
    handlers_finished(&consumer).await;
    assert_eq!(
        runs.len(),
        1,
        "a paused consumer received messages: {:?}",
        runs.snapshot()
    );

    assert!(
        consumer
            .resume_subscription_consumer(&key)
            .await
            .expect("resume succeeds"),
        "resume says the consumer was not paused"
    );
    if let Err(got) = runs
        .wait_until(ARRIVAL, |items| {
            items.iter().map(|(n, _)| *n).collect::<BTreeSet<_>>().len() >= 6
                && items.iter().filter(|(n, _)| *n == 0).count() >= 2
        })
        .await
    {
        panic!("after resume, not everything published meanwhile arrived: {got:?}");
    }
    sentinel(&publisher, &consumer, &event, &runs).await;
    let got = runs_per_n(&runs.snapshot());
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        (0..=5).collect::<Vec<_>>(),
        "after resume, the paused consumer did not get exactly what was published: {got:?}"
    );
    assert!(
        got[&0].len() >= 2,
        "the delivery that paused the consumer was lost instead of put back: {got:?}"
    );
    if !may_duplicate(&env.caps()) {
        assert_eq!(
            got[&0].len(),
            2,
            "the delivery that paused the consumer ran more than twice: {got:?}"
        );
        assert!(
            (1..=5).all(|n| got[&n].len() == 1),
            "a message published during the pause ran more than once: {got:?}"
        );
    }
    assert!(
        consumer.paused_subscription_consumers().is_empty(),
        "the consumer is still listed as paused"
    );
    assert_eq!(
        consumer.health().await.state,
        HealthState::Ok,
        "health stays `warn` after resume"
    );
    assert!(
        !consumer
            .resume_subscription_consumer(&key)
            .await
            .expect("resume succeeds"),
        "resuming a running consumer claims it was paused"
    );
    env.finish().await;
}

/// Settling a delivery twice is a typed error, and the consumer keeps working.
pub async fn settling_twice_is_a_typed_error(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("twice");
    let results: Arc<Collector<(u64, bool, Option<String>)>> = Collector::new();
    let sink = results.clone();
    let def = SubscriptionDef::new("twice", move |ctx: SubscriptionContext, v: Value| {
        let sink = sink.clone();
        async move {
            let first = ctx.settle(Outcome::Ack).await;
            let second = ctx.settle(Outcome::Ack).await;
            let second = match second {
                Err(SettleError::AlreadySettled { .. }) => None,
                other => Some(format!("{other:?}")),
            };
            sink.push((n_of(&v), first.is_ok(), second));
            Ok(Outcome::Ack)
        }
    })
    .event_name(&event);
    let (_, publisher) = consumer_and_publisher(&mut env, def).await;
    for n in 0..3 {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    let got = results
        .wait_until(ARRIVAL, |r| {
            r.iter().map(|(n, ..)| n).collect::<BTreeSet<_>>().len() >= 3
        })
        .await
        .unwrap_or_else(|got| panic!("the consumer stopped after a double settle: {got:?}"));
    for (n, first_ok, second) in got {
        assert!(first_ok, "message {n}: the first settle failed");
        assert_eq!(
            second, None,
            "message {n}: the second settle was not SettleError::AlreadySettled"
        );
    }
    env.finish().await;
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Order {
    order_id: String,
}

/// Poison never stops a consumer: bytes that are not an envelope (published raw) are refused,
/// dead-lettered or dropped with a warning; a payload that does not fit the subscription's type
/// is dead-lettered (or dropped with a warning); the next good message is still delivered.
pub async fn poison_message_does_not_stop_the_consumer(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("orders");
    let target = env.name("dead-letters");
    let good: Arc<Collector<String>> = Collector::new();
    let sink = good.clone();
    let with_dead_letters = declares(&h, &Need::DeadLetter);
    let mut def = SubscriptionDef::new("orders", move |_ctx: SubscriptionContext, o: Order| {
        let sink = sink.clone();
        async move {
            sink.push(o.order_id);
            Ok(())
        }
    })
    .event_name(&event);
    if with_dead_letters {
        def = def.dead_letter_target(&target);
    }
    let (_, publisher) = consumer_and_publisher(&mut env, def).await;

    if let Some(raw) = env.raw() {
        let bytes = format!("{} this is not an envelope {{", env.prefix).into_bytes();
        let before = logs::warnings(|_| true).len();
        let route_as = Envelope::custom(
            purista_core::SenderAddress {
                service_name: env.name("publisher"),
                service_version: "1".into(),
                service_target: String::new(),
                instance_id: "raw-publisher".into(),
            },
            &event,
            json!({}),
        );
        if raw.publish_undecodable(&bytes, &route_as).await.is_ok() {
            // The broker took the bytes: the consumer side must dead-letter or drop them.
            let seen = eventually_some(
                "the undecodable message is dead-lettered or dropped with a warning",
                ARRIVAL,
                || {
                    let env = &env;
                    let (target, bytes) = (target.clone(), bytes.clone());
                    async move {
                        let dead = with_dead_letters
                            && dead_letters(env, &target)
                                .await
                                .iter()
                                .any(|e| e.raw.as_deref() == Some(bytes.as_slice()));
                        let warned = logs::warnings(|_| true).len() > before;
                        (dead || warned).then_some(())
                    }
                },
            )
            .await;
            let () = seen;
        }
    }

    publisher
        .emit(&event, json!(42))
        .await
        .expect("emit succeeds");
    publisher
        .emit(&event, json!({ "order_id": "o-1" }))
        .await
        .expect("emit succeeds");
    let got = good
        .wait_for_len(1, ARRIVAL, "the good message after poison")
        .await;
    assert_eq!(got[0], "o-1");
    if with_dead_letters {
        let entries = eventually_some("the mistyped message is dead-lettered", ARRIVAL, || {
            let env = &env;
            let target = target.clone();
            async move {
                let e = dead_letters(env, &target).await;
                let found: Vec<Envelope> = e
                    .into_iter()
                    .filter_map(|e| e.envelope)
                    .filter(|e| e.payload == json!(42))
                    .collect();
                (!found.is_empty()).then_some(found)
            }
        })
        .await;
        assert_eq!(
            entries.len(),
            1,
            "the mistyped message was dead-lettered twice"
        );
    }
    env.finish().await;
}
