//! Queue workers (DESIGN §3.6): leases, visibility, retries with backoff, dead-letter queue,
//! idempotency keys and delayed jobs, on the bridge's [`QueueBridge`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use purista_core::envelope::now_ms;
use purista_core::{
    Empty, JobContext, JobSettlement, LeasedJob, NewJob, QueueBridge, QueueConfig,
    QueueDeclaration, QueueError, QueueWorkerDef, RetryStrategy, Service, WorkerMode,
};
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{ARRIVAL, Collector, EARLY_SLACK, Stopwatch, eventually};

/// Short lifecycle settings so the suite stays fast: 200 ms leases, 50 ms first retry.
fn fast_config() -> QueueConfig {
    QueueConfig {
        visibility_timeout: Duration::from_millis(200),
        max_lease_extensions: 3,
        max_attempts: 3,
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

/// A deployment with a queue bridge and one declared queue.
async fn queue_env(h: &Arc<dyn Harness>, config: QueueConfig) -> (TestEnv, String) {
    let env = TestEnv::new(h, 1).await;
    let queue = format!("{}.jobs", env.prefix);
    env.queues()
        .declare_queue(&queue, QueueDeclaration::new("conformance@1", config))
        .await
        .unwrap_or_else(|e| panic!("declaring queue `{queue}` failed: {e}"));
    (env, queue)
}

fn job(payload: Value) -> NewJob {
    NewJob {
        payload,
        ..NewJob::default()
    }
}

async fn enqueue(q: &Arc<dyn QueueBridge>, queue: &str, payload: Value) -> String {
    q.enqueue(queue, job(payload))
        .await
        .unwrap_or_else(|e| panic!("enqueue failed: {e}"))
}

async fn lease(q: &Arc<dyn QueueBridge>, queue: &str, wait: Duration) -> Option<LeasedJob> {
    q.lease(queue, wait)
        .await
        .unwrap_or_else(|e| panic!("lease failed: {e}"))
}

async fn lease_now(q: &Arc<dyn QueueBridge>, queue: &str, what: &str) -> LeasedJob {
    lease(q, queue, ARRIVAL)
        .await
        .unwrap_or_else(|| panic!("{what}: no job became visible within {ARRIVAL:?}"))
}

async fn settle(q: &Arc<dyn QueueBridge>, job: &LeasedJob, s: JobSettlement) {
    q.settle(job, s)
        .await
        .unwrap_or_else(|e| panic!("settling job {} failed: {e}", job.id));
}

/// A leased job is invisible to other workers until settled or expired.
pub async fn lease_hides_the_job(h: Arc<dyn Harness>) {
    let config = QueueConfig {
        visibility_timeout: Duration::from_secs(30),
        ..fast_config()
    };
    let (env, queue) = queue_env(&h, config).await;
    let q = env.queues();
    let id = enqueue(&q, &queue, json!({"n": 1})).await;
    let leased = lease_now(&q, &queue, "the enqueued job").await;
    assert_eq!(leased.id, id);
    assert_eq!(leased.attempt, 1, "a first lease must be attempt 1");
    assert_eq!(leased.payload, json!({"n": 1}), "the payload changed");
    // The sentinel, enqueued after: the next lease must hand out it, not the leased job.
    let sentinel = enqueue(&q, &queue, json!({"sentinel": true})).await;
    let next = lease_now(&q, &queue, "the sentinel job").await;
    assert_eq!(
        next.id, sentinel,
        "a leased job was handed to a second worker"
    );
    settle(&q, &next, JobSettlement::Complete).await;
    let m = q.metrics(&queue).await.expect("metrics");
    assert_eq!(
        (m.depth, m.leased),
        (0, 1),
        "metrics disagree with one leased job: {m:?}"
    );
    settle(&q, &leased, JobSettlement::Complete).await;
    let m = q.metrics(&queue).await.expect("metrics");
    assert_eq!(
        (m.depth, m.leased),
        (0, 0),
        "a completed job is still counted: {m:?}"
    );
    env.finish().await;
}

/// A lease that is not settled in time expires: the job reappears, as the next attempt, and
/// the stale lease can no longer settle it.
pub async fn unsettled_lease_reappears_after_visibility_timeout(h: Arc<dyn Harness>) {
    let config = fast_config();
    let visibility = config.visibility_timeout;
    let (env, queue) = queue_env(&h, config).await;
    let q = env.queues();
    let id = enqueue(&q, &queue, json!({"n": 1})).await;
    let first = lease_now(&q, &queue, "the enqueued job").await;
    let clock = Stopwatch::start();
    let again = lease_now(&q, &queue, "the job after its lease expired").await;
    clock.assert_on_time("the expired job's reappearance", visibility);
    assert_eq!(again.id, id, "another job appeared");
    assert_eq!(
        again.attempt, 2,
        "an expired lease must count as an attempt"
    );
    assert!(
        matches!(
            q.settle(&first, JobSettlement::Complete).await,
            Err(QueueError::LeaseLost { .. })
        ),
        "a stale lease could still settle the job"
    );
    settle(&q, &again, JobSettlement::Complete).await;
    env.finish().await;
}

/// `extend_lease` keeps the job hidden and stops at the cap.
pub async fn lease_extension_is_capped(h: Arc<dyn Harness>) {
    // A visibility long enough that a loaded machine reaches the first extension before it
    // runs out (200 ms did not always suffice on 2 busy cores), short enough to wait past.
    const VISIBILITY: Duration = Duration::from_secs(1);
    let config = QueueConfig {
        visibility_timeout: VISIBILITY,
        ..fast_config()
    };
    let (env, queue) = queue_env(&h, config).await;
    let q = env.queues();
    enqueue(&q, &queue, json!({})).await;
    let mut leased = lease_now(&q, &queue, "the enqueued job").await;
    let mut expiry = leased.lease_expires_at_ms;
    // Extensions far longer than the check below: however long the machine stalls the case, it
    // is the original visibility that must not apply, never an extension that ran out.
    for n in 1..=3 {
        let until = q
            .extend_lease(&leased, Some(Duration::from_secs(30)))
            .await
            .unwrap_or_else(|e| panic!("extension {n} of 3 failed: {e}"));
        assert!(until >= expiry, "extension {n} shortened the lease");
        expiry = until;
        leased.lease_expires_at_ms = until;
        leased.extensions = n;
    }
    // Without the extensions the job would reappear after the visibility timeout.
    assert!(
        lease(&q, &queue, VISIBILITY * 2).await.is_none(),
        "an extended lease expired at the original visibility timeout"
    );
    match q.extend_lease(&leased, None).await {
        Err(QueueError::ExtensionCapReached { cap, .. }) => assert_eq!(cap, 3),
        other => panic!("a 4th extension past the cap of 3 returned {other:?}"),
    }
    settle(&q, &leased, JobSettlement::Complete).await;
    env.finish().await;
}

/// Retries without an explicit delay back off exponentially within the jitter bounds.
pub async fn retry_backoff_stays_within_jitter_bounds(h: Arc<dyn Harness>) {
    let config = QueueConfig {
        max_attempts: 5,
        retry: RetryStrategy {
            initial_delay_ms: 100,
            max_delay_ms: 10_000,
            multiplier: 2.0,
            jitter_factor: 0.25,
        },
        visibility_timeout: Duration::from_secs(30),
        ..fast_config()
    };
    let (env, queue) = queue_env(&h, config).await;
    let q = env.queues();
    enqueue(&q, &queue, json!({})).await;
    let mut leased = lease_now(&q, &queue, "the enqueued job").await;
    for (retry, base_ms) in [(1u32, 100u64), (2, 200), (3, 400)] {
        let clock = Stopwatch::start();
        settle(
            &q,
            &leased,
            JobSettlement::Retry {
                delay: None,
                reason: Some("try again".into()),
            },
        )
        .await;
        leased = lease_now(&q, &queue, "the retried job").await;
        let waited = clock.elapsed();
        let low = Duration::from_millis(base_ms * 3 / 4);
        let high = Duration::from_millis(base_ms * 5 / 4);
        assert!(
            waited + EARLY_SLACK >= low,
            "retry {retry} came after {waited:?}, before the jitter floor {low:?}"
        );
        clock.assert_by_at(
            &format!("retry {retry} (jitter ceiling {high:?})"),
            waited,
            high,
        );
        assert_eq!(leased.attempt, retry + 1, "wrong attempt number");
    }
    settle(&q, &leased, JobSettlement::Complete).await;
    env.finish().await;
}

/// Nothing of the queue can come back: no job waits, is leased or is delayed (a retry that
/// was wrongly scheduled would be counted as delayed). State, not a pause.
async fn assert_nothing_left(q: &Arc<dyn QueueBridge>, queue: &str, what: &str) {
    let m = q.metrics(queue).await.expect("metrics");
    assert_eq!(
        (m.depth, m.leased, m.delayed),
        (0, 0, 0),
        "{what}: the queue still holds work ({m:?})"
    );
}

async fn dead_lettered(
    q: &Arc<dyn QueueBridge>,
    queue: &str,
    id: &str,
) -> purista_core::DeadLetteredJob {
    let all = q
        .inspect_dead_letters(queue, 100)
        .await
        .unwrap_or_else(|e| panic!("inspecting the dead-letter queue failed: {e}"));
    all.into_iter()
        .find(|d| d.job.id == id)
        .unwrap_or_else(|| panic!("job {id} is not in the dead-letter queue"))
}

/// After `max_attempts` failed deliveries the job goes to the dead-letter queue.
pub async fn max_attempts_then_dead_letter_queue(h: Arc<dyn Harness>) {
    let (env, queue) = queue_env(&h, fast_config()).await;
    let q = env.queues();
    let payload = json!({"to": "ada@example.com", "lines": [1, 2]});
    let id = enqueue(&q, &queue, payload.clone()).await;
    for attempt in 1..=3 {
        let leased = lease_now(&q, &queue, "the failing job").await;
        assert_eq!(leased.attempt, attempt, "wrong attempt number");
        settle(
            &q,
            &leased,
            JobSettlement::Fail {
                fatal: false,
                reason: "smtp down".into(),
            },
        )
        .await;
    }
    assert_nothing_left(
        &q,
        &queue,
        "the job was delivered more than max_attempts times",
    )
    .await;
    let dead = dead_lettered(&q, &queue, &id).await;
    assert_eq!(
        dead.job.attempt, 3,
        "the dead-lettered job has the wrong attempt count"
    );
    assert_eq!(
        dead.job.payload, payload,
        "the dead-lettered payload changed"
    );
    assert!(
        dead.reason.contains("max attempts"),
        "the dead-letter reason does not say why: {}",
        dead.reason
    );
    let m = q.metrics(&queue).await.expect("metrics");
    assert_eq!(
        m.dead_lettered, 1,
        "metrics do not count the dead letter: {m:?}"
    );
    env.finish().await;
}

/// A job that still fails after its retry window goes to the dead-letter queue, even with
/// attempts left.
pub async fn retry_window_then_dead_letter_queue(h: Arc<dyn Harness>) {
    let config = QueueConfig {
        max_attempts: 100,
        retry_window: Duration::from_millis(150),
        visibility_timeout: Duration::from_secs(30),
        ..fast_config()
    };
    let (env, queue) = queue_env(&h, config).await;
    let q = env.queues();
    let id = enqueue(&q, &queue, json!({})).await;
    let first = lease_now(&q, &queue, "the job").await;
    settle(
        &q,
        &first,
        JobSettlement::Retry {
            delay: Some(Duration::from_millis(250)),
            reason: None,
        },
    )
    .await;
    let second = lease_now(&q, &queue, "the retried job").await;
    assert_eq!(second.attempt, 2);
    settle(
        &q,
        &second,
        JobSettlement::Retry {
            delay: None,
            reason: Some("still failing".into()),
        },
    )
    .await;
    assert_nothing_left(&q, &queue, "a job past its retry window was retried again").await;
    let dead = dead_lettered(&q, &queue, &id).await;
    assert!(
        dead.reason.contains("retry window"),
        "the dead-letter reason does not name the retry window: {}",
        dead.reason
    );
    env.finish().await;
}

/// A fatal failure dead-letters the job on its first attempt.
pub async fn fatal_failure_dead_letters_at_once(h: Arc<dyn Harness>) {
    let (env, queue) = queue_env(&h, fast_config()).await;
    let q = env.queues();
    let id = enqueue(&q, &queue, json!({"n": 1})).await;
    let leased = lease_now(&q, &queue, "the job").await;
    settle(
        &q,
        &leased,
        JobSettlement::Fail {
            fatal: true,
            reason: "malformed address".into(),
        },
    )
    .await;
    assert_nothing_left(&q, &queue, "a fatally failed job was retried").await;
    let dead = dead_lettered(&q, &queue, &id).await;
    assert_eq!(dead.job.attempt, 1);
    assert!(
        dead.reason.contains("malformed address"),
        "the dead-letter reason lost the failure: {}",
        dead.reason
    );
    env.finish().await;
}

/// Dead letters can be listed (oldest first), replayed with a fresh attempt budget and purged.
pub async fn dead_letters_inspect_replay_purge(h: Arc<dyn Harness>) {
    let (env, queue) = queue_env(&h, fast_config()).await;
    let q = env.queues();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(enqueue(&q, &queue, json!({"n": n})).await);
        let leased = lease_now(&q, &queue, "the job").await;
        settle(
            &q,
            &leased,
            JobSettlement::DeadLetter {
                reason: format!("bad {n}"),
            },
        )
        .await;
    }
    let listed = q.inspect_dead_letters(&queue, 10).await.expect("inspect");
    assert_eq!(
        listed.iter().map(|d| d.job.id.clone()).collect::<Vec<_>>(),
        ids,
        "inspect does not list the dead letters oldest first"
    );
    assert_eq!(
        q.inspect_dead_letters(&queue, 2)
            .await
            .expect("inspect")
            .len(),
        2,
        "inspect ignores its limit"
    );
    let moved = q
        .replay_dead_letters(&queue, Some(vec![ids[1].clone()]))
        .await
        .expect("replay");
    assert_eq!(moved, 1, "replaying one job moved {moved}");
    let replayed = lease_now(&q, &queue, "the replayed job").await;
    assert_eq!(replayed.id, ids[1], "another job was replayed");
    assert_eq!(
        replayed.attempt, 1,
        "a replayed job must get a fresh attempt budget"
    );
    assert_eq!(
        replayed.payload,
        json!({"n": 1}),
        "the replayed payload changed"
    );
    settle(&q, &replayed, JobSettlement::Complete).await;
    let purged = q.purge_dead_letters(&queue).await.expect("purge");
    assert_eq!(purged, 2, "purge removed {purged} of 2");
    assert!(
        q.inspect_dead_letters(&queue, 10)
            .await
            .expect("inspect")
            .is_empty(),
        "dead letters left after purge"
    );
    assert_eq!(q.metrics(&queue).await.expect("metrics").dead_lettered, 0);
    env.finish().await;
}

/// A repeated enqueue with the same idempotency key returns the first job id (where enforced).
pub async fn idempotency_key_returns_the_first_job_id(h: Arc<dyn Harness>) {
    let (env, queue) = queue_env(&h, fast_config()).await;
    let q = env.queues();
    let keyed = |key: &str, n: u64| NewJob {
        payload: json!({"n": n}),
        idempotency_key: Some(key.to_string()),
        ..NewJob::default()
    };
    let first = q
        .enqueue(&queue, keyed("invoice-1", 1))
        .await
        .expect("enqueue");
    let again = q
        .enqueue(&queue, keyed("invoice-1", 2))
        .await
        .expect("enqueue");
    let other = q
        .enqueue(&queue, keyed("invoice-2", 3))
        .await
        .expect("enqueue");
    assert_eq!(
        first, again,
        "a repeated idempotency key created a second job"
    );
    assert_ne!(first, other, "different keys share a job");
    assert_eq!(
        q.metrics(&queue).await.expect("metrics").depth,
        2,
        "wrong queue depth"
    );
    let leased = lease_now(&q, &queue, "the first keyed job").await;
    assert_eq!(
        leased.payload,
        json!({"n": 1}),
        "the repeated enqueue replaced the first job"
    );
    env.finish().await;
}

/// A job scheduled for later is not leased before its time, and is leased once it is due.
///
/// "Not before" is judged by the clock, not by a window: a lease that returns the job must
/// have been granted at or after its run-at time (by the bridge's own lease timestamp and by
/// the case's clock), so a machine that stalls the case past the run-at time cannot fail it. The
/// delayed count is checked only when the answer came before the run-at time (after it, the
/// job is simply due).
pub async fn delayed_job_is_not_leased_early(h: Arc<dyn Harness>) {
    const DELAY: Duration = Duration::from_millis(300);
    let config = fast_config();
    let visibility_ms = config.visibility_timeout.as_millis() as u64;
    let (env, queue) = queue_env(&h, config).await;
    let q = env.queues();
    let clock = Stopwatch::start();
    let run_at_ms = now_ms() + DELAY.as_millis() as u64;
    let early_ms = EARLY_SLACK.as_millis() as u64;
    let id = q
        .enqueue(
            &queue,
            NewJob {
                payload: json!({}),
                run_at_ms: Some(run_at_ms),
                ..NewJob::default()
            },
        )
        .await
        .expect("enqueue");
    // Granted at or after its time: the bridge's lease timestamp (expiry less the visibility
    // timeout) and the case's clock when the lease came back both say so.
    let not_early = |job: &LeasedJob, returned_ms: u64, what: &str| {
        let granted_ms = job.lease_expires_at_ms.saturating_sub(visibility_ms);
        assert!(
            granted_ms + early_ms >= run_at_ms && returned_ms + early_ms >= run_at_ms,
            "{what}: a delayed job was leased before its time (leased at {granted_ms}, returned \
             at {returned_ms}, due at {run_at_ms}, epoch ms)"
        );
    };
    let tried = lease(&q, &queue, Duration::from_millis(100)).await;
    let answered_ms = now_ms();
    let leased = match tried {
        Some(job) => {
            // The case stalled past the run-at time: the job was due when it was leased.
            not_early(&job, answered_ms, "a lease asked for before its time");
            job
        }
        None => {
            let delayed = q.metrics(&queue).await.expect("metrics").delayed;
            if now_ms() < run_at_ms {
                assert_eq!(
                    delayed, 1,
                    "a job waiting for its time is not counted as delayed"
                );
            }
            let job = lease_now(&q, &queue, "the delayed job").await;
            not_early(&job, now_ms(), "the lease once it was due");
            job
        }
    };
    clock.assert_on_time("the delayed job", DELAY);
    assert_eq!(leased.id, id);
    env.finish().await;
}

/// A service's queue worker runs enqueued jobs; a failing job is retried and then completes.
pub async fn worker_settles_jobs_through_the_service(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 1).await;
    let queue = format!("{}.work", env.prefix);
    let runs: Arc<Collector<(u64, u32)>> = Collector::new();
    let sink = runs.clone();
    let worker = QueueWorkerDef::new(&queue, move |ctx: JobContext, n: u64, _p: Empty| {
        let sink = sink.clone();
        async move {
            sink.push((n, ctx.attempt()));
            if !n.is_multiple_of(2) && ctx.attempt() == 1 {
                anyhow::bail!("transient failure of job {n}");
            }
            Ok(())
        }
    })
    .config(fast_config())
    .mode(WorkerMode::Continuous { concurrency: 2 })
    .lease_wait(Duration::from_millis(100));
    let service = env
        .start(
            0,
            Service::builder(env.name("worker"), "1").queue_worker(worker),
        )
        .await;
    for n in 0..6u64 {
        service.enqueue(&queue, n, Empty).await.expect("enqueue");
    }
    if let Err(r) = runs.wait_until(ARRIVAL, |r| r.len() >= 9).await {
        panic!("the worker ran {} of 9 expected attempts: {r:?}", r.len());
    }
    let q = env.queues();
    let settled = |what: &'static str| {
        let (q, queue) = (q.clone(), queue.clone());
        eventually(what, ARRIVAL, move || {
            let (q, queue) = (q.clone(), queue.clone());
            async move {
                let m = q.metrics(&queue).await.expect("metrics");
                m.depth == 0 && m.leased == 0 && m.delayed == 0 && m.dead_lettered == 0
            }
        })
    };
    settled("the queue is empty after the worker settled every job").await;
    // The sentinel job, enqueued once everything settled: once it ran and settled, an extra
    // run of an earlier job would have shown.
    const SENTINEL: u64 = 1_000_000;
    service
        .enqueue(&queue, SENTINEL, Empty)
        .await
        .expect("enqueue");
    if let Err(r) = runs
        .wait_until(ARRIVAL, |r| r.iter().any(|(n, _)| *n == SENTINEL))
        .await
    {
        panic!("the sentinel job never ran: {r:?}");
    }
    settled("the queue is empty after the sentinel job").await;
    let mut attempts: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (n, a) in runs.snapshot() {
        attempts.entry(n).or_default().push(a);
    }
    assert_eq!(
        attempts.remove(&SENTINEL),
        Some(vec![1]),
        "the sentinel job did not run exactly once"
    );
    assert_eq!(
        attempts.keys().copied().collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>(),
        "the worker ran other jobs than were enqueued: {attempts:?}"
    );
    for n in 0..6u64 {
        let expected = if !n.is_multiple_of(2) {
            vec![1, 2]
        } else {
            vec![1]
        };
        let mut got = attempts.get(&n).cloned().unwrap_or_default();
        got.sort_unstable();
        assert_eq!(got, expected, "job {n} ran with attempts {got:?}");
    }
    env.finish().await;
}

/// A job enqueued by a command handler runs in the flow of the invocation that enqueued it: the
/// job handler sees the caller's trace id, principal and tenant.
pub async fn a_job_runs_in_the_flow_that_enqueued_it(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let queue = format!("{}.flow", env.prefix);
    // (trace, principal, tenant) the job handler saw.
    type Flow = (Option<String>, Option<String>, Option<String>);
    let seen: Arc<Collector<Flow>> = Collector::new();
    let sink = seen.clone();
    let worker = QueueWorkerDef::new(&queue, move |ctx: JobContext, _n: u64, _p: Empty| {
        let sink = sink.clone();
        async move {
            sink.push((
                ctx.trace_id().map(str::to_string),
                ctx.principal_id().map(str::to_string),
                ctx.tenant_id().map(str::to_string),
            ));
            Ok(())
        }
    })
    .config(fast_config())
    .lease_wait(Duration::from_millis(100));
    let q = queue.clone();
    let enqueue_job = purista_core::CommandDef::new(
        "enqueue",
        move |ctx: purista_core::Context, n: u64, _p: Empty| {
            let q = q.clone();
            async move {
                ctx.enqueue(&q, n, Empty).await?;
                Ok(())
            }
        },
    );
    env.start(
        0,
        Service::builder(env.name("worker"), "1")
            .queue_worker(worker)
            .command(enqueue_job),
    )
    .await;
    let client = env
        .start(1, Service::builder(env.name("client"), "1"))
        .await;
    let trace = format!("{}-job-trace", env.prefix);
    let options = purista_core::InvokeOptions {
        ttl: Some(ARRIVAL),
        trace_id: Some(trace.clone()),
        principal_id: Some("user-9".into()),
        tenant_id: Some("tenant-9".into()),
    };
    client
        .invoke_with::<Value>(
            purista_core::Address::new(env.name("worker"), "1", "enqueue"),
            7u64,
            Empty,
            options,
        )
        .await
        .unwrap_or_else(|e| panic!("the enqueuing command failed: {e}"));
    let got = seen.wait_for_len(1, ARRIVAL, "the job running").await;
    assert_eq!(
        got[0],
        (
            Some(trace),
            Some("user-9".to_string()),
            Some("tenant-9".to_string())
        ),
        "the job did not run in the flow (trace, principal, tenant) that enqueued it"
    );
    env.finish().await;
}
