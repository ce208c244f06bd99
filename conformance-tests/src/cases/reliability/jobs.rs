//! Queue jobs across broker faults (issue 10's "2 000 queue jobs through the fault proxy"):
//! none is lost, a job lands in the dead-letter queue only when its handler failed it, and
//! duplicates appear only where the queue bridge declares at-least-once delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use purista_core::capabilities::DeliveryGuarantee;
use purista_core::{
    Empty, JobContext, JobSettlement, QueueConfig, QueueWorkerDef, RetryStrategy, Service,
    WorkerMode,
};
use tokio::time::Instant;

use super::{Fault, RECOVERY, broker_control, strike_along};
use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{Collector, eventually};

/// Jobs at the full size.
const FULL_JOBS: usize = 2_000;
/// Producers enqueueing at once, each every `PRODUCERS`-th job.
const PRODUCERS: u64 = 4;
/// Every job whose number is a multiple of this fails its first attempt (a retry through the
/// faults).
const TRANSIENT_EVERY: u64 = 10;
/// Every job whose number leaves this remainder modulo [`FATAL_EVERY`] fails fatally: the only
/// jobs that belong in the dead-letter queue.
const FATAL_REMAINDER: u64 = 49;
const FATAL_EVERY: u64 = 50;

fn fails_fatally(n: u64) -> bool {
    n % FATAL_EVERY == FATAL_REMAINDER
}

/// Leases short enough that a job whose settlement a fault swallowed comes back within
/// seconds, retries fast, and room for the attempts that faults (not handlers) cost: an
/// expired lease counts as an attempt.
fn job_config() -> QueueConfig {
    QueueConfig {
        visibility_timeout: Duration::from_secs(2),
        max_attempts: 10,
        retry: RetryStrategy {
            initial_delay_ms: 50,
            max_delay_ms: 1_000,
            multiplier: 2.0,
            jitter_factor: 0.25,
        },
        retry_window: Duration::from_secs(3_600),
        ..QueueConfig::default()
    }
}

/// 2 000 queue jobs (the harness's [`Harness::fault_workload`] share of them) enqueued and
/// worked while the broker's connections are dropped and then the broker goes through a
/// restart (on moto: the fault proxy's outage schedule). Every job completes at least once;
/// the dead-letter queue holds exactly the jobs whose handler failed fatally; each job that
/// failed once is retried to completion; duplicate runs are counted, and allowed only where
/// the queue bridge declares at-least-once delivery.
pub async fn queue_jobs_survive_broker_faults(h: Arc<dyn Harness>) {
    let faults = [Fault::DropConnections, Fault::Restart];
    let workload = h.fault_workload();
    let total = workload.of(FULL_JOBS) as u64;
    println!(
        "{total} jobs ({} % of the full {FULL_JOBS}{}) across {faults:?}",
        workload.percent(),
        workload.why().map(|w| format!(": {w}")).unwrap_or_default()
    );
    let at_least_once = h
        .queue_capabilities()
        .is_some_and(|c| c.delivery == DeliveryGuarantee::AtLeastOnce);
    let control = broker_control(&h).await;
    let mut env = TestEnv::on_broker(&h, &control, 1).await;
    let queue = format!("{}.faulted", env.prefix);
    // (job, attempt) of every run that completed.
    let completed: Arc<Collector<(u64, u32)>> = Collector::new();
    let sink = completed.clone();
    let worker = QueueWorkerDef::new(&queue, move |ctx: JobContext, n: u64, _p: Empty| {
        let sink = sink.clone();
        async move {
            if fails_fatally(n) {
                return Ok(JobSettlement::Fail {
                    fatal: true,
                    reason: format!("job {n} fails fatally"),
                });
            }
            if n.is_multiple_of(TRANSIENT_EVERY) && ctx.attempt() == 1 {
                anyhow::bail!("transient failure of job {n}");
            }
            sink.push((n, ctx.attempt()));
            Ok(JobSettlement::Complete)
        }
    })
    .config(job_config())
    .mode(WorkerMode::Continuous { concurrency: 4 })
    .lease_wait(Duration::from_millis(500));
    let service = env
        .start(
            0,
            Service::builder(env.name("worker"), "1").queue_worker(worker),
        )
        .await;

    let enqueued = Arc::new(AtomicUsize::new(0));
    // Enqueue calls the faults failed (shows that they struck).
    let refused = Arc::new(AtomicUsize::new(0));
    // Enqueueing must work again RECOVERY after the last fault is over (set then).
    let recovered_by: Arc<parking_lot::Mutex<Option<Instant>>> = Arc::default();
    let enqueuers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (service, queue) = (service.clone(), queue.clone());
            let (enqueued, refused) = (enqueued.clone(), refused.clone());
            let recovered_by = recovered_by.clone();
            tokio::spawn(async move {
                for n in (p..total).step_by(PRODUCERS as usize) {
                    // Like a real producer: retry until the broker takes it (a job the broker
                    // took but whose answer a fault swallowed is a duplicate, not a loss).
                    while let Err(e) = service.enqueue(&queue, n, Empty).await {
                        refused.fetch_add(1, Ordering::Relaxed);
                        let by = *recovered_by.lock();
                        assert!(
                            by.is_none_or(|by| Instant::now() < by),
                            "enqueueing still fails {RECOVERY:?} after the faults: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    enqueued.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    strike_along(
        &control,
        &env,
        &faults,
        total as usize,
        "jobs are enqueued",
        &enqueued,
    )
    .await;
    *recovered_by.lock() = Some(Instant::now() + RECOVERY);
    for e in futures::future::join_all(enqueuers).await {
        e.expect("an enqueuing task panicked");
    }

    let expected: BTreeSet<u64> = (0..total).filter(|n| !fails_fatally(*n)).collect();
    let runs = completed
        .wait_while_growing(RECOVERY, expected.len(), |r| {
            r.iter().map(|(n, _)| *n).collect::<BTreeSet<_>>().len()
        })
        .await;
    let runs = match runs {
        Ok(r) | Err(r) => r,
    };
    let mut attempts: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (n, a) in &runs {
        attempts.entry(*n).or_default().push(*a);
    }
    let done: BTreeSet<u64> = attempts.keys().copied().collect();
    let missing: Vec<_> = expected.difference(&done).collect();
    let extra: Vec<_> = done.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "across {faults:?}, {} of {} jobs never completed (e.g. {:?}) and {} completed that should not have (e.g. {:?})",
        missing.len(),
        expected.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>()
    );
    let retried_on_first: Vec<_> = attempts
        .iter()
        .filter(|(n, a)| n.is_multiple_of(TRANSIENT_EVERY) && a.contains(&1))
        .map(|(n, _)| *n)
        .collect();
    assert!(
        retried_on_first.is_empty(),
        "jobs that fail their first attempt completed on it: {retried_on_first:?}"
    );

    // Every settlement lands: the queue drains, and its dead-letter queue holds the jobs whose
    // handler failed them, no other.
    let q = env.queues();
    let fatal: BTreeSet<u64> = (0..total).filter(|n| fails_fatally(*n)).collect();
    eventually(
        "the queue drains after the faults (nothing ready, leased or delayed)",
        RECOVERY,
        || {
            let (q, queue) = (q.clone(), queue.clone());
            async move {
                q.metrics(&queue)
                    .await
                    .is_ok_and(|m| m.depth == 0 && m.leased == 0 && m.delayed == 0)
            }
        },
    )
    .await;
    let dead = q
        .inspect_dead_letters(&queue, 10 * fatal.len() + 100)
        .await
        .unwrap_or_else(|e| panic!("inspecting the dead-letter queue failed: {e}"));
    let dead_jobs: BTreeSet<u64> = dead
        .iter()
        .map(|d| {
            d.job.payload.as_u64().unwrap_or_else(|| {
                panic!(
                    "a dead-lettered job's payload changed across the faults: {}",
                    d.job.payload
                )
            })
        })
        .collect();
    let wrongly_dead: Vec<_> = dead_jobs.difference(&fatal).collect();
    let not_dead: Vec<_> = fatal.difference(&dead_jobs).collect();
    assert!(
        wrongly_dead.is_empty() && not_dead.is_empty(),
        "across {faults:?}, {} jobs whose handler never failed them were dead-lettered (e.g. {:?}: {:?}) and {} that failed fatally are not in the dead-letter queue (e.g. {:?})",
        wrongly_dead.len(),
        wrongly_dead.iter().take(5).collect::<Vec<_>>(),
        dead.iter()
            .find(|d| d.job.payload.as_u64().is_some_and(|n| !fatal.contains(&n)))
            .map(|d| &d.reason),
        not_dead.len(),
        not_dead.iter().take(5).collect::<Vec<_>>()
    );

    let duplicates = runs.len() - done.len();
    println!(
        "{} of {} jobs completed ({} enqueue calls failed during the faults and were repeated); {duplicates} duplicate completions ({} jobs ran twice or more); {} dead-lettered ({} copies)",
        done.len(),
        total,
        refused.load(Ordering::Relaxed),
        attempts.values().filter(|a| a.len() > 1).count(),
        dead_jobs.len(),
        dead.len()
    );
    assert!(
        at_least_once || duplicates == 0,
        "{duplicates} jobs completed twice on a queue bridge that declares at-most-once delivery"
    );
    env.finish().await;
}
