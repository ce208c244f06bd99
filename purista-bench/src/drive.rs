//! The timing harness the bridge scenarios and the raw baselines share.
//!
//! Both sides of a ratio go through the same loops here, so the harness's own cost (clock reads,
//! latency vectors, task spawning) is in both figures and cancels out of the ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How long any one wait in a scenario may take before the run is declared stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(120);

/// Wall time of a run and the latency of every operation in it (nanoseconds).
pub struct Timed {
    /// Wall time from the first operation's start to the last one's end.
    pub elapsed: Duration,
    /// One sample per operation.
    pub latencies_ns: Vec<u64>,
}

/// Runs `call(0)`, `call(1)`, … `call(n - 1)` one after another.
pub async fn sequential<F, Fut>(n: u64, mut call: F) -> anyhow::Result<Timed>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut latencies_ns = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        let t0 = Instant::now();
        call(i).await?;
        latencies_ns.push(t0.elapsed().as_nanos() as u64);
    }
    Ok(Timed {
        elapsed: start.elapsed(),
        latencies_ns,
    })
}

/// Runs `call(0)` … `call(n - 1)` from `in_flight` caller tasks, each taking the next index as
/// soon as its previous call returned, so `in_flight` calls are outstanding at any time.
pub async fn concurrent<F, Fut>(n: u64, in_flight: usize, call: F) -> anyhow::Result<Timed>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let in_flight = in_flight.max(1);
    let per_task = n as usize / in_flight + 1;
    let start = Instant::now();
    let mut callers = JoinSet::new();
    for _ in 0..in_flight {
        let call = call.clone();
        let next = next.clone();
        callers.spawn(async move {
            let mut latencies_ns = Vec::with_capacity(per_task);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(latencies_ns);
                }
                let t0 = Instant::now();
                call(i).await?;
                latencies_ns.push(t0.elapsed().as_nanos() as u64);
            }
        });
    }
    let mut all = Vec::with_capacity(n as usize);
    while let Some(joined) = callers.join_next().await {
        // The first failing caller ends the run; the others are aborted with the set.
        all.extend(joined.context("a caller task panicked")??);
    }
    Ok(Timed {
        elapsed: start.elapsed(),
        latencies_ns: all,
    })
}

/// A count that consumers (subscription handlers, workers, receiver tasks) increase and the
/// scenario waits on.
#[derive(Default)]
pub struct Progress {
    done: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

impl Progress {
    /// A count at zero.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Counts one more; wakes the waiter when the target is reached.
    pub fn add_one(&self) {
        let now = self.done.fetch_add(1, Ordering::AcqRel) + 1;
        if now == self.target.load(Ordering::Acquire) {
            self.reached.notify_one();
        }
    }

    /// The count so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    /// Sets the count to wait for. Set it before the work that reaches it starts.
    pub fn expect(&self, target: u64) {
        self.target.store(target, Ordering::Release);
    }

    /// Waits until the count reaches the target set with [`Progress::expect`], failing when no
    /// progress is made for [`STUCK_AFTER`].
    pub async fn wait(&self, what: &str) -> anyhow::Result<()> {
        let target = self.target.load(Ordering::Acquire);
        let mut last = self.done();
        loop {
            // `notify_one` keeps a permit when nobody waits yet, so no wake-up is lost between
            // the check and the wait.
            if self.done() >= target {
                return Ok(());
            }
            match tokio::time::timeout(STUCK_AFTER, self.reached.notified()).await {
                Ok(()) => {}
                Err(_) => {
                    let now = self.done();
                    if now == last {
                        bail!(
                            "{what}: stuck at {now} of {target} after {} s without progress",
                            STUCK_AFTER.as_secs()
                        );
                    }
                    last = now;
                }
            }
        }
    }
}

/// Times the command round trips `call` makes as `scenario` asks, after a warm-up: cmd-seq one
/// after another (with latency percentiles), cmd-conc with `cmd_conc_in_flight` at once. For
/// the raw baselines, whose calls are plain closures.
pub async fn commands<F, Fut>(
    label: &str,
    scenario: crate::workload::Scenario,
    workload: &crate::workload::Workload,
    call: F,
) -> anyhow::Result<crate::measurement::Measurement>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use crate::measurement::{Measurement, Percentiles};
    if scenario == crate::workload::Scenario::CmdSeq {
        sequential(workload.warmup, &call).await?;
        let timed = sequential(workload.cmd_seq_calls, &call).await?;
        return Ok(
            Measurement::new(label, scenario, workload.cmd_seq_calls, timed.elapsed)
                .with_latency(Percentiles::of(timed.latencies_ns)),
        );
    }
    let in_flight = workload.cmd_conc_in_flight;
    concurrent(workload.warmup, in_flight, call.clone()).await?;
    let timed = concurrent(workload.cmd_conc_calls, in_flight, call).await?;
    Ok(
        Measurement::new(label, scenario, workload.cmd_conc_calls, timed.elapsed)
            .with_latency(Percentiles::of(timed.latencies_ns))
            .with_note(format!("{in_flight} in flight")),
    )
}

/// The fan-out rounds of a raw baseline: the warm-up's events, all delivered to each of the
/// `subscribers` (counted in `delivered`, a [`Progress`], on top of what it counted before),
/// then `fanout_events` more, timed until every subscriber has each. `emit(from, count)`, an
/// async closure, publishes the events numbered `from..from + count`. Evaluates to the
/// deliveries timed and how long they took, or returns the error from the enclosing function.
///
/// A macro, not a function: a function taking the async closure makes the caller's future
/// lose `Send` (the compiler cannot prove it for every lifetime of the closure's borrow).
macro_rules! fanout_rounds {
    ($delivered:expr, $workload:expr, $subscribers:expr, $emit:expr) => {{
        let (delivered, workload, subscribers) = (&$delivered, $workload, $subscribers);
        delivered.expect(delivered.done() + workload.warmup * subscribers);
        $emit(0, workload.warmup).await?;
        delivered.wait("raw fanout warm-up").await?;
        let ops = workload.fanout_events * subscribers;
        delivered.expect(delivered.done() + ops);
        let start = tokio::time::Instant::now();
        $emit(workload.warmup, workload.fanout_events).await?;
        delivered.wait("raw fanout deliveries").await?;
        (ops, start.elapsed())
    }};
}
pub(crate) use fanout_rounds;
