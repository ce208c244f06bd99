//! Waiting and bookkeeping helpers the cases share.
//!
//! Cases never sleep to wait for something to happen: they wait on a condition with a deadline
//! ([`Collector::wait_for_len`], [`eventually`]). "Nothing else arrives" is proven with a
//! sentinel — a message published after the one that must not arrive, on the same path — and
//! [`handlers_finished`]: once the sentinel is in and no handler still runs, the other would
//! have arrived too.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How late a timer-driven event (a ttl, a retry delay, a visibility timeout) may fire after
/// its time, beyond what the machine stalled meanwhile ([`Stopwatch`]), before the suite calls
/// it broken.
pub const LATE_SLACK: Duration = Duration::from_millis(300);

/// How early such an event may fire (clock granularity of brokers that count in ms).
pub const EARLY_SLACK: Duration = Duration::from_millis(5);

/// How often the [`Stopwatch`]'s probe asks the runtime to wake it.
const PROBE_TICK: Duration = Duration::from_millis(10);

/// How late a probe tick may wake before it counts as a stall: ordinary timer jitter.
const PROBE_JITTER: Duration = Duration::from_millis(15);

/// Deadline for "this should arrive soon" waits. Generous: it only bounds a failing case.
pub const ARRIVAL: Duration = Duration::from_secs(10);

/// A unique resource prefix for one test: `t` and 8 hex characters.
pub fn new_prefix() -> String {
    format!("t{}", &purista_core::ids::new_id()[..8])
}

/// Values pushed by handlers, awaited by the case. Cheap to share behind an `Arc`.
pub struct Collector<T> {
    items: Mutex<Vec<T>>,
    changed: Notify,
}

impl<T: Clone + Send + 'static> Collector<T> {
    /// An empty collector.
    pub fn new() -> Arc<Self> {
        Arc::new(Collector {
            items: Mutex::new(Vec::new()),
            changed: Notify::new(),
        })
    }

    /// Records one value and wakes waiters.
    pub fn push(&self, value: T) {
        self.items.lock().push(value);
        self.changed.notify_waiters();
    }

    /// Number of values so far.
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of everything recorded so far, in arrival order.
    pub fn snapshot(&self) -> Vec<T> {
        self.items.lock().clone()
    }

    /// Waits until `done` holds for the recorded values or `timeout` passes. `Ok` with the
    /// values when it held, `Err` with what had arrived otherwise.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&[T]) -> bool,
    ) -> Result<Vec<T>, Vec<T>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let items = self.items.lock();
                if done(&items) {
                    return Ok(items.clone());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let items = self.items.lock();
                return if done(&items) {
                    Ok(items.clone())
                } else {
                    Err(items.clone())
                };
            }
        }
    }

    /// Waits until `progress` of the recorded values reaches `target`, for as long as it keeps
    /// growing: `Err` with what had arrived once it stood still for `stall`. For volume waits
    /// whose length is the broker's throughput (an emulator at full size): a fixed deadline
    /// would measure speed, a stall says that something is lost or stuck.
    pub async fn wait_while_growing(
        &self,
        stall: Duration,
        target: usize,
        progress: impl Fn(&[T]) -> usize,
    ) -> Result<Vec<T>, Vec<T>> {
        let mut reached = progress(&self.snapshot());
        loop {
            if reached >= target {
                return Ok(self.snapshot());
            }
            let seen = reached;
            match self.wait_until(stall, |items| progress(items) > seen).await {
                Ok(items) => reached = progress(&items),
                Err(items) => return Err(items),
            }
        }
    }

    /// Waits for at least `n` values; panics naming `what` when they do not arrive in time.
    pub async fn wait_for_len(&self, n: usize, timeout: Duration, what: &str) -> Vec<T> {
        match self.wait_until(timeout, |items| items.len() >= n).await {
            Ok(items) => items,
            Err(items) => panic!(
                "{what}: expected {n} within {timeout:?}, only {} arrived",
                items.len()
            ),
        }
    }
}

/// Waits until the async condition holds, polling every few ms; panics naming `what` when the
/// deadline passes first. For conditions nobody can notify (broker-side state).
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: still not true after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `count()` reaches `target`, for as long as it keeps growing: panics naming
/// `what` once it stood still for `stall` (see [`Collector::wait_while_growing`]).
pub async fn until_reached(what: &str, stall: Duration, target: usize, count: impl Fn() -> usize) {
    let mut last = count();
    let mut moved = Instant::now();
    while last < target {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = count();
        if now != last {
            last = now;
            moved = Instant::now();
        } else if moved.elapsed() >= stall {
            panic!("{what}: stuck at {last} of {target} for {stall:?}");
        }
    }
}

/// Like [`eventually`] for a condition that yields a value.
pub async fn eventually_some<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{what}: still nothing after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `service` runs no subscription handler: after a sentinel arrived, so that a
/// delivery that came before it is recorded too.
pub async fn handlers_finished(service: &purista_core::RunningService) {
    eventually("the subscription handlers finish", ARRIVAL, || {
        let n = service.in_flight().by_kind.subscription;
        async move { n == 0 }
    })
    .await;
}

/// Deliveries per message id.
pub fn count_by_id<'a>(ids: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in ids {
        *counts.entry(id.clone()).or_insert(0) += 1;
    }
    counts
}

/// A stopwatch for timer-driven events that also measures how long the machine stalled the
/// case while it ran.
///
/// "Fires within [`LATE_SLACK`] after its time" cannot hold on a machine that does not run the
/// test at all for longer than that: a loaded 2-core CI host with many test processes and the
/// brokers on the same cores, or a runtime whose worker threads another case keeps busy. So a
/// probe task on the case's own runtime asks to be woken every 10 ms, and every wake-up more
/// than 15 ms late adds its lateness to the measured *stall*. The late bound is then
/// `expected + LATE_SLACK + stall`: the time the bridge had and did not get is not blamed on
/// it, while a bridge whose timer fires late on a machine that ran it is still caught (its
/// lateness is no stall of the probe). The early bound ([`EARLY_SLACK`]) does not move: a
/// stall never makes an event early.
pub struct Stopwatch {
    began: Instant,
    stalled_us: Arc<AtomicU64>,
    probe: tokio::task::AbortHandle,
}

impl Stopwatch {
    /// Starts now, with its probe on the current runtime.
    pub fn start() -> Self {
        let began = Instant::now();
        let stalled_us = Arc::new(AtomicU64::new(0));
        let sink = stalled_us.clone();
        // Counted from `began`, not from the probe's first run: a stall before that counts.
        let probe = tokio::spawn(async move {
            let mut asked = began;
            loop {
                let due = asked + PROBE_TICK;
                tokio::time::sleep_until(due).await;
                let woke = Instant::now();
                let late = woke.saturating_duration_since(due);
                if late > PROBE_JITTER {
                    let us = u64::try_from(late.as_micros()).unwrap_or(u64::MAX);
                    sink.fetch_add(us, Ordering::Relaxed);
                }
                asked = woke;
            }
        })
        .abort_handle();
        Stopwatch {
            began,
            stalled_us,
            probe,
        }
    }

    /// When it started.
    pub fn began(&self) -> Instant {
        self.began
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.began.elapsed()
    }

    /// How long the probe found the case's runtime stalled since the start.
    pub fn stalled(&self) -> Duration {
        Duration::from_micros(self.stalled_us.load(Ordering::Relaxed))
    }

    /// What an event may come late: [`LATE_SLACK`] plus the stall so far.
    pub fn late_slack(&self) -> Duration {
        LATE_SLACK + self.stalled()
    }

    /// Asserts that the event observed just now happened `expected` after the start: not
    /// before it (less [`EARLY_SLACK`]), not later than [`Stopwatch::late_slack`] after it.
    pub fn assert_on_time(&self, what: &str, expected: Duration) {
        self.assert_on_time_at(what, self.elapsed(), expected);
    }

    /// Like [`Stopwatch::assert_on_time`] for an event `elapsed` after the start.
    pub fn assert_on_time_at(&self, what: &str, elapsed: Duration, expected: Duration) {
        assert!(
            elapsed + EARLY_SLACK >= expected,
            "{what} happened after {elapsed:?}, before the {expected:?} it must wait"
        );
        self.assert_by_at(what, elapsed, expected);
    }

    /// Asserts that `elapsed` (since the start) is no later than `bound` plus
    /// [`Stopwatch::late_slack`]: "fast", "by its deadline".
    pub fn assert_by_at(&self, what: &str, elapsed: Duration, bound: Duration) {
        let stalled = self.stalled();
        assert!(
            elapsed <= bound + LATE_SLACK + stalled,
            "{what} happened after {elapsed:?}, more than {LATE_SLACK:?} later than {bound:?} \
             (beyond the {stalled:?} the machine stalled this case meanwhile)"
        );
    }
}

impl Drop for Stopwatch {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

/// A subscription named `name` whose handler records every envelope it gets and acks.
pub fn recording(
    name: &str,
    sink: Arc<Collector<purista_core::Envelope>>,
) -> purista_core::SubscriptionDef {
    purista_core::SubscriptionDef::new(
        name,
        move |ctx: purista_core::SubscriptionContext, _payload: serde_json::Value| {
            let sink = sink.clone();
            async move {
                if let Some(e) = ctx.envelope() {
                    sink.push(e.clone());
                }
                Ok(())
            }
        },
    )
}

/// True when the bridge may deliver a message more than once (the suite then de-duplicates by
/// message id before counting).
pub fn may_duplicate(caps: &purista_core::Capabilities) -> bool {
    caps.subscription_delivery == purista_core::DeliveryGuarantee::AtLeastOnce
}

/// The message number sentinels carry: `{"n": SENTINEL + k}`, above any number a case uses.
pub const SENTINEL: u64 = 1_000_000;

/// Publishes sentinels (`{"n": SENTINEL + k}`) on `event` until each of `instances` recorded
/// one in `received` as `(instance, n)`: broadcast — one, which every instance must get;
/// shared — one at a time until every instance has had one or, should the bridge favour some
/// instances, `4 × instances` of them arrived. Panics when a sentinel does not arrive.
pub async fn sentinels_reach_every_instance(
    publisher: &purista_core::RunningService,
    event: &str,
    received: &Collector<(usize, u64)>,
    instances: usize,
    broadcast: bool,
) {
    let most = if broadcast { 1 } else { 4 * instances as u64 };
    for k in 0..most {
        let n = SENTINEL + k;
        publisher
            .emit(event, serde_json::json!({ "n": n }))
            .await
            .expect("emit succeeds");
        let copies = if broadcast { instances } else { 1 };
        let arrived = received
            .wait_until(ARRIVAL, |items| {
                items.iter().filter(|(_, m)| *m == n).count() >= copies
            })
            .await;
        if let Err(got) = arrived {
            panic!(
                "sentinel {k} published after the case's messages did not arrive: {:?}",
                got.iter()
                    .filter(|(_, m)| *m >= SENTINEL)
                    .collect::<Vec<_>>()
            );
        }
        let with_sentinel: std::collections::BTreeSet<usize> = received
            .snapshot()
            .iter()
            .filter(|(_, m)| *m >= SENTINEL)
            .map(|(i, _)| *i)
            .collect();
        if with_sentinel.len() >= instances {
            return;
        }
    }
}

/// (instance, n, attempt) per handler run.
pub type Runs = Arc<Collector<(usize, u64, u32)>>;

/// How long a case with thousands of messages may take to see them all.
pub const BULK_ARRIVAL: Duration = Duration::from_secs(60);

/// The message number `n` of a payload (`u64::MAX` when absent).
pub fn n_of(v: &serde_json::Value) -> u64 {
    v["n"].as_u64().unwrap_or(u64::MAX)
}

/// A subscription `name` on `event` that records `(instance, n, attempt)` and settles as
/// `decide(n, attempt)` says.
pub fn recording_runs(
    name: &str,
    event: &str,
    instance: usize,
    runs: Runs,
    decide: fn(u64, u32) -> purista_core::Outcome,
) -> purista_core::SubscriptionDef {
    purista_core::SubscriptionDef::new(
        name,
        move |ctx: purista_core::SubscriptionContext, v: serde_json::Value| {
            let runs = runs.clone();
            async move {
                let n = n_of(&v);
                runs.push((instance, n, ctx.attempt()));
                Ok(decide(n, ctx.attempt()))
            }
        },
    )
    .event_name(event)
}

/// Settles every delivery with `ack` (for [`recording_runs`]).
pub fn ack(_n: u64, _attempt: u32) -> purista_core::Outcome {
    purista_core::Outcome::Ack
}

/// Sentinels on `event` until every consumer had one, then no handler runs.
pub async fn settle_with_sentinels(
    publisher: &purista_core::RunningService,
    event: &str,
    runs: &Runs,
    consumers: &[Arc<purista_core::RunningService>],
) {
    // The sentinel helper counts (instance, n); mirror the runs into that shape.
    let seen: Arc<Collector<(usize, u64)>> = Collector::new();
    let mirror = {
        let (runs, seen) = (runs.clone(), seen.clone());
        tokio::spawn(async move {
            let mut at = 0;
            loop {
                let items = match runs.wait_until(ARRIVAL, |r| r.len() > at).await {
                    Ok(items) | Err(items) => items,
                };
                for (i, n, _) in &items[at..] {
                    seen.push((*i, *n));
                }
                at = items.len();
            }
        })
    };
    sentinels_reach_every_instance(publisher, event, &seen, consumers.len(), false).await;
    mirror.abort();
    for c in consumers {
        handlers_finished(c).await;
    }
}

/// Per message number (sentinels left out): the instances that ran it and its attempts.
pub fn by_message(runs: &[(usize, u64, u32)]) -> BTreeMap<u64, (BTreeSet<usize>, Vec<u32>)> {
    let mut out: BTreeMap<u64, (BTreeSet<usize>, Vec<u32>)> = BTreeMap::new();
    for (i, n, attempt) in runs.iter().filter(|(_, n, _)| *n < SENTINEL) {
        let e = out.entry(*n).or_default();
        e.0.insert(*i);
        e.1.push(*attempt);
    }
    for (_, attempts) in out.values_mut() {
        attempts.sort_unstable();
    }
    out
}

/// Missing and extra message numbers against `expected`, as a failure text, or `None`.
pub fn set_difference(got: &BTreeSet<u64>, expected: &BTreeSet<u64>) -> Option<String> {
    let missing: Vec<&u64> = expected.difference(got).collect();
    let extra: Vec<&u64> = got.difference(expected).collect();
    (!missing.is_empty() || !extra.is_empty()).then(|| {
        format!(
            "{} missing (e.g. {:?}), {} extra (e.g. {:?})",
            missing.len(),
            missing.iter().take(10).collect::<Vec<_>>(),
            extra.len(),
            extra.iter().take(10).collect::<Vec<_>>()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_millis(200);
    const STEP: Duration = Duration::from_millis(40);

    /// Pushes `0..n` into `c`, one every [`STEP`]: taking far longer than [`STALL`] overall.
    fn trickle(c: &Arc<Collector<usize>>, n: usize) {
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep(STEP).await;
                c.push(i);
            }
        });
    }

    #[tokio::test]
    async fn a_collection_that_keeps_growing_is_waited_for_past_the_stall_time() {
        let c = Collector::new();
        trickle(&c, 15);
        let got = c
            .wait_while_growing(STALL, 15, <[usize]>::len)
            .await
            .expect("it kept growing");
        assert_eq!(got.len(), 15);
    }

    #[tokio::test]
    async fn a_collection_that_stops_growing_is_given_up_on_after_the_stall_time() {
        let c = Collector::new();
        trickle(&c, 3);
        let clock = Instant::now();
        let got = c
            .wait_while_growing(STALL, 5, <[usize]>::len)
            .await
            .expect_err("it stopped at 3");
        assert_eq!(got, vec![0, 1, 2]);
        assert!(clock.elapsed() >= STALL);
    }

    #[tokio::test]
    async fn a_count_that_keeps_growing_is_waited_for_past_the_stall_time() {
        let c = Collector::new();
        trickle(&c, 15);
        until_reached("the count", STALL, 15, || c.len()).await;
        assert_eq!(c.len(), 15);
    }

    #[tokio::test]
    #[should_panic(expected = "the count: stuck at 3 of 5")]
    async fn a_count_that_stops_growing_fails_naming_where_it_stopped() {
        let c = Collector::new();
        trickle(&c, 3);
        until_reached("the count", STALL, 5, || c.len()).await;
    }
}
