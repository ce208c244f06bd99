//! Subscriptions under load (DESIGN §3.3, §3.4): many publishers, many instances, retries in
//! flight, subscriptions set up while messages flow, the prefetch bound. Every case compares
//! exact sets — nothing missing, nothing extra — and proves with sentinels that nothing
//! follows.

use std::collections::BTreeSet;
use std::sync::Arc;

use purista_core::{
    Outcome, RunningService, Service, ServiceBuilder, SubscriptionContext, SubscriptionDef,
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{
    ARRIVAL, BULK_ARRIVAL, Collector, Runs, SENTINEL, ack, by_message, handlers_finished,
    may_duplicate, n_of, recording_runs, set_difference, settle_with_sentinels,
};

/// 8 publisher tasks × 500 emits (fewer where the harness scales its [`crate::Workload`]; the
/// size run is printed) into a shared subscription on 5 instances: the set delivered is
/// exactly the set published, each message at one instance (once, on an at-most-once bridge).
pub async fn concurrent_publishers_into_many_instances_deliver_the_exact_set(h: Arc<dyn Harness>) {
    const INSTANCES: usize = 5;
    const PUBLISHERS: u64 = 8;
    const FULL_PER_PUBLISHER: usize = 500;
    let workload = h.workload();
    let per_publisher = workload.of(FULL_PER_PUBLISHER) as u64;
    println!(
        "{PUBLISHERS} publishers × {per_publisher} emits ({} % of the full {FULL_PER_PUBLISHER} each{})",
        workload.percent(),
        workload.why().map(|w| format!(": {w}")).unwrap_or_default()
    );
    let mut env = TestEnv::new(&h, INSTANCES + 1).await;
    let event = env.name("bulk");
    let runs: Runs = Collector::new();
    let mut consumers = Vec::new();
    for i in 0..INSTANCES {
        let def = recording_runs("bulk", &event, i, runs.clone(), ack);
        consumers.push(
            env.start(
                i,
                Service::builder(env.name("consumer"), "1").subscription(def),
            )
            .await,
        );
    }
    let publisher = env
        .start(INSTANCES, Service::builder(env.name("publisher"), "1"))
        .await;
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let (publisher, event) = (publisher.clone(), event.clone());
            tokio::spawn(async move {
                for k in 0..per_publisher {
                    publisher
                        .emit(&event, json!({ "n": p * per_publisher + k }))
                        .await
                        .unwrap_or_else(|e| panic!("publisher {p}: emit {k} failed: {e}"));
                }
            })
        })
        .collect();
    for t in futures::future::join_all(tasks).await {
        t.expect("a publisher task panicked");
    }
    let expected: BTreeSet<u64> = (0..PUBLISHERS * per_publisher).collect();
    let arrived = runs
        .wait_until(BULK_ARRIVAL, |r| {
            r.iter()
                .map(|(_, n, _)| *n)
                .filter(|n| *n < SENTINEL)
                .collect::<BTreeSet<_>>()
                .len()
                >= expected.len()
        })
        .await;
    if let Err(so_far) = arrived {
        // Said as it is, rather than as a sentinel stuck behind the messages still on their way.
        let got: BTreeSet<u64> = so_far
            .iter()
            .map(|(_, n, _)| *n)
            .filter(|n| *n < SENTINEL)
            .collect();
        if let Some(diff) = set_difference(&got, &expected) {
            panic!(
                "{PUBLISHERS} concurrent publishers into {INSTANCES} instances, {BULK_ARRIVAL:?} after the last emit: {diff}"
            );
        }
    }
    settle_with_sentinels(&publisher, &event, &runs, &consumers).await;
    let got = by_message(&runs.snapshot());
    if let Some(diff) = set_difference(&got.keys().copied().collect(), &expected) {
        panic!("{PUBLISHERS} concurrent publishers into {INSTANCES} instances: {diff}");
    }
    let broadcast: Vec<_> = got.iter().filter(|(_, (at, _))| at.len() > 1).collect();
    assert!(
        broadcast.is_empty(),
        "messages of a shared subscription reached more than one instance: {:?}",
        broadcast.iter().take(5).collect::<Vec<_>>()
    );
    if !may_duplicate(&env.caps()) {
        let twice: Vec<_> = got.iter().filter(|(_, (_, a))| a.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "an at-most-once bridge delivered messages twice: {:?}",
            twice.iter().take(5).collect::<Vec<_>>()
        );
    }
    env.finish().await;
}

/// Every 10th of 300 messages asks for a retry on its first attempt while 2 instances with
/// prefetch 8 consume: the set acknowledged is exactly the set published, every retried
/// message was seen again as attempt 2, and no other message was retried.
pub async fn retry_under_load_acks_the_exact_set(h: Arc<dyn Harness>) {
    const COUNT: u64 = 300;
    fn decide(n: u64, attempt: u32) -> Outcome {
        if n < SENTINEL && n.is_multiple_of(10) && attempt == 1 {
            Outcome::retry()
        } else {
            Outcome::Ack
        }
    }
    let mut env = TestEnv::new(&h, 3).await;
    let event = env.name("load");
    let runs: Runs = Collector::new();
    let mut consumers = Vec::new();
    for i in 0..2 {
        let def = recording_runs("load", &event, i, runs.clone(), decide)
            .max_attempts(2)
            .prefetch(8);
        consumers.push(
            env.start(
                i,
                Service::builder(env.name("consumer"), "1").subscription(def),
            )
            .await,
        );
    }
    let publisher = env
        .start(2, Service::builder(env.name("publisher"), "1"))
        .await;
    for n in 0..COUNT {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    let acked = |r: &[(usize, u64, u32)]| -> BTreeSet<u64> {
        r.iter()
            .filter(|(_, n, a)| *n < SENTINEL && !matches!(decide(*n, *a), Outcome::Retry { .. }))
            .map(|(_, n, _)| *n)
            .collect()
    };
    if let Err(so_far) = runs
        .wait_until(BULK_ARRIVAL, |r| acked(r).len() >= COUNT as usize)
        .await
        && let Some(diff) = set_difference(&acked(&so_far), &(0..COUNT).collect())
    {
        panic!(
            "retries under load, {BULK_ARRIVAL:?} after the last emit: the acknowledged set differs from the published one: {diff}"
        );
    }
    settle_with_sentinels(&publisher, &event, &runs, &consumers).await;
    let snapshot = runs.snapshot();
    if let Some(diff) = set_difference(&acked(&snapshot), &(0..COUNT).collect()) {
        panic!("retries under load: the acknowledged set differs from the published one: {diff}");
    }
    for (n, (_, attempts)) in by_message(&snapshot) {
        let distinct: BTreeSet<u32> = attempts.iter().copied().collect();
        let expected = if n.is_multiple_of(10) {
            BTreeSet::from([1, 2])
        } else {
            BTreeSet::from([1])
        };
        assert_eq!(
            distinct, expected,
            "message {n} ran as attempts {attempts:?}"
        );
        if !may_duplicate(&env.caps()) {
            assert_eq!(
                attempts.len(),
                expected.len(),
                "message {n} ran as attempts {attempts:?} on an at-most-once bridge"
            );
        }
    }
    env.finish().await;
}

/// 10 services, each with a subscription on its own event, start at once on 2 instances while
/// messages flow to all 10 events: none fails to start, and every message published after the
/// starts reaches its own event's subscription — exactly those, nothing of another event.
pub async fn subscriptions_set_up_while_publishing_get_everything_after_their_start(
    h: Arc<dyn Harness>,
) {
    const SERVICES: usize = 10;
    const AFTER: u64 = 20;
    const NOISE: u64 = 2 * SENTINEL;
    // The event a message number belongs to.
    let event_of = |n: u64| -> usize {
        (if n >= NOISE {
            (n - NOISE) % 100
        } else if n >= SENTINEL {
            n - SENTINEL
        } else {
            n % 100
        }) as usize
    };
    let mut env = TestEnv::new(&h, 3).await;
    let events: Vec<String> = (0..SERVICES).map(|k| env.name(&format!("e{k}"))).collect();
    // (service, n): which service's subscription got message n (n encodes its event).
    let runs: Runs = Collector::new();
    let publisher = env
        .start(2, Service::builder(env.name("publisher"), "1"))
        .await;
    let (stop, stopped) = watch::channel(false);
    let noise = {
        let (publisher, events) = (publisher.clone(), events.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            while !*stopped.borrow() {
                for (e, event) in events.iter().enumerate() {
                    // Published around the starts: numbers from NOISE on, tagged with their
                    // event in the last two digits.
                    let n = NOISE + k * 100 + e as u64;
                    publisher
                        .emit(event, json!({ "n": n }))
                        .await
                        .expect("emit succeeds");
                }
                k += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    let builders: Vec<(usize, ServiceBuilder)> = events
        .iter()
        .enumerate()
        .map(|(k, event)| {
            let def = recording_runs("own", event, k, runs.clone(), ack);
            (
                k % 2,
                Service::builder(env.name(&format!("svc{k}")), "1").subscription(def),
            )
        })
        .collect();
    let started = env.start_concurrently(builders).await;
    let _ = stop.send(true);
    noise.await.expect("the publishing task did not panic");
    let consumers: Vec<Arc<RunningService>> = started
        .into_iter()
        .enumerate()
        .map(|(k, s)| s.unwrap_or_else(|e| panic!("service {k}, started while publishing: {e}")))
        .collect();
    for (e, event) in events.iter().enumerate() {
        for j in 0..AFTER {
            publisher
                .emit(event, json!({ "n": j * 100 + e as u64 }))
                .await
                .expect("emit succeeds");
        }
    }
    for (e, event) in events.iter().enumerate() {
        publisher
            .emit(event, json!({ "n": SENTINEL + e as u64 }))
            .await
            .expect("emit succeeds");
    }
    let _ = runs
        .wait_until(ARRIVAL, |r| {
            (0..SERVICES).all(|e| r.iter().any(|(_, n, _)| *n == SENTINEL + e as u64))
        })
        .await;
    for c in &consumers {
        handlers_finished(c).await;
    }
    let snapshot = runs.snapshot();
    for e in 0..SERVICES {
        let sentinel = SENTINEL + e as u64;
        assert!(
            snapshot.iter().any(|(k, n, _)| *k == e && *n == sentinel),
            "service {e} never received the sentinel of its event"
        );
        let got: BTreeSet<u64> = snapshot
            .iter()
            .filter(|(k, n, _)| *k == e && *n < SENTINEL)
            .map(|(_, n, _)| *n)
            .collect();
        let expected: BTreeSet<u64> = (0..AFTER).map(|j| j * 100 + e as u64).collect();
        if let Some(diff) = set_difference(&got, &expected) {
            panic!("service {e}, after its start while others started: {diff}");
        }
    }
    let misrouted: Vec<_> = snapshot
        .iter()
        .filter(|(k, n, _)| event_of(*n) != *k)
        .collect();
    assert!(
        misrouted.is_empty(),
        "messages reached the subscription of another event: {:?}",
        misrouted.iter().take(5).collect::<Vec<_>>()
    );
    env.finish().await;
}

/// Two services, each with a shared subscription on one event on 2 instances: each service
/// handles every message, each at one of its instances (once, on an at-most-once bridge).
pub async fn two_services_sharing_one_event_each_handle_every_message_once(h: Arc<dyn Harness>) {
    const COUNT: u64 = 100;
    let mut env = TestEnv::new(&h, 5).await;
    let event = env.name("both");
    let mut fleets = Vec::new();
    for s in 0..2 {
        let runs: Runs = Collector::new();
        let mut consumers = Vec::new();
        for i in 0..2 {
            let def = recording_runs("both", &event, i, runs.clone(), ack);
            consumers.push(
                env.start(
                    s * 2 + i,
                    Service::builder(env.name(&format!("service{s}")), "1").subscription(def),
                )
                .await,
            );
        }
        fleets.push((runs, consumers));
    }
    let publisher = env
        .start(4, Service::builder(env.name("publisher"), "1"))
        .await;
    for n in 0..COUNT {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    for (s, (runs, consumers)) in fleets.iter().enumerate() {
        let _ = runs
            .wait_until(ARRIVAL, |r| {
                r.iter()
                    .filter(|(_, n, _)| *n < SENTINEL)
                    .map(|(_, n, _)| n)
                    .collect::<BTreeSet<_>>()
                    .len()
                    >= COUNT as usize
            })
            .await;
        settle_with_sentinels(&publisher, &event, runs, consumers).await;
        let got = by_message(&runs.snapshot());
        if let Some(diff) = set_difference(&got.keys().copied().collect(), &(0..COUNT).collect()) {
            panic!("service {s} of two sharing one event: {diff}");
        }
        let broadcast: Vec<_> = got.iter().filter(|(_, (at, _))| at.len() > 1).collect();
        assert!(
            broadcast.is_empty(),
            "service {s}: messages reached both of its instances: {broadcast:?}"
        );
        if !may_duplicate(&env.caps()) {
            let twice: Vec<_> = got.iter().filter(|(_, (_, a))| a.len() > 1).collect();
            assert!(
                twice.is_empty(),
                "service {s}: messages handled twice: {twice:?}"
            );
        }
    }
    env.finish().await;
}

/// How long [`prefetch_bounds_the_handlers_running_at_once`] watches for a second handler
/// starting while the first is held: a bridge that ignores the prefetch starts one in
/// milliseconds once the messages have reached the consumer.
const PREFETCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(300);

/// With prefetch 1 and the handler holding message 1, message 2 does not start — although a
/// second subscription of the same event already has it — and it starts once message 1 is
/// settled.
pub async fn prefetch_bounds_the_handlers_running_at_once(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("bounded");
    let started: Arc<Collector<u64>> = Collector::new();
    let witnessed: Runs = Collector::new();
    let (release, gate) = watch::channel(false);
    let sink = started.clone();
    let held = SubscriptionDef::new("held", move |_ctx: SubscriptionContext, v: Value| {
        let (sink, mut gate) = (sink.clone(), gate.clone());
        async move {
            let n = n_of(&v);
            sink.push(n);
            if n == 1 {
                let _ = gate.wait_for(|open| *open).await;
            }
            Ok(Outcome::Ack)
        }
    })
    .event_name(&event)
    .prefetch(1);
    let witness = recording_runs("witness", &event, 0, witnessed.clone(), ack);
    env.start(
        1,
        Service::builder(env.name("consumer"), "1")
            .subscription(held)
            .subscription(witness),
    )
    .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    for n in 1..=3 {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    started
        .wait_for_len(1, ARRIVAL, "message 1 reaching the held handler")
        .await;
    if let Err(got) = witnessed
        .wait_until(ARRIVAL, |w| {
            (1..=3).all(|n| w.iter().any(|(_, m, _)| *m == n))
        })
        .await
    {
        panic!("messages 1..=3 did not reach the second subscription: {got:?}");
    }
    // Messages 2 and 3 are at the consumer (the second subscription has them); a bridge that
    // ignored the prefetch would start one of them now. Give it a moment to show that.
    if let Ok(got) = started.wait_until(PREFETCH_WINDOW, |s| s.len() >= 2).await {
        panic!("with prefetch 1, another message started while message 1 was held: {got:?}");
    }
    assert_eq!(
        started.snapshot(),
        vec![1],
        "with prefetch 1, another message started while message 1 was held"
    );
    let _ = release.send(true);
    let got = started
        .wait_for_len(3, ARRIVAL, "messages 2 and 3 once message 1 was settled")
        .await;
    assert_eq!(
        got.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );
    env.finish().await;
}
