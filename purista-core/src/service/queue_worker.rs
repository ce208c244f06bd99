//! Queue workers: typed definitions, worker modes and the lease → handle → settle loop.
//!
//! Each worker is one task that leases jobs and runs the handler (sequentially, at an interval,
//! or continuously with a concurrency limit). The handler's result becomes a [`JobSettlement`]:
//! `Ok(())` completes, a returned settlement is used as is, a [`HandledError`](crate::HandledError)
//! is a non-fatal failure with its message as reason, any other error or a panic is a retry.
//! The queue bridge applies [`QueueConfig::plan`](crate::QueueConfig::plan) to it. Stopping is
//! explicit: a watch signal ends the loop (`stop`: finish the running jobs; `abort`: end them),
//! and the running service awaits every worker task before its shutdown returns.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

use super::context::{Context, JobContext, Shared};
use super::flow::Flow;
use super::handler::{HandlerArgs, run_guarded};
use crate::capabilities::Need;
use crate::error::HandledError;
use crate::inflight::InFlightCounter;
use crate::observe::metrics::{RegistrationMeters, Settled};
use crate::observe::spans;
use crate::queue::{JobDisposition, JobSettlement, LeasedJob, QueueBridge, QueueConfig};

/// How a worker takes jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMode {
    /// One job at a time; the next lease only after the handler finished (default).
    Sequential,
    /// One job per period.
    Interval(Duration),
    /// Up to `concurrency` jobs at once, leasing as soon as a slot is free.
    Continuous {
        /// Jobs handled at once.
        concurrency: usize,
    },
}

/// Anything a job handler may return inside `Ok`.
pub trait IntoJobSettlement {
    /// Converts to a settlement.
    fn into_settlement(self) -> JobSettlement;
}

impl IntoJobSettlement for () {
    fn into_settlement(self) -> JobSettlement {
        JobSettlement::Complete
    }
}

impl IntoJobSettlement for JobSettlement {
    fn into_settlement(self) -> JobSettlement {
        self
    }
}

pub(crate) type ErasedJobFn = dyn Fn(JobContext, &Value, &Value) -> BoxFuture<'static, anyhow::Result<JobSettlement>>
    + Send
    + Sync;

/// Marks a job payload that does not deserialize: dead-lettered at once.
#[derive(Debug, thiserror::Error)]
#[error("job payload does not match the worker's type: {0}")]
struct JobPayloadMismatch(String);

/// A job handler: an `async` closure or fn `Fn(JobContext, I)` or `Fn(JobContext, I, P)`
/// returning `anyhow::Result<R>` with `R` an [`IntoJobSettlement`]. Implemented for every such
/// function; `Args` is `(I,)` or `(I, P)` and tells the two shapes apart.
pub trait JobFn<Args, R>: Send + Sync + 'static {
    /// The handler's future.
    type Future: Future<Output = anyhow::Result<R>> + Send + 'static;

    /// Runs the handler.
    fn call(&self, ctx: JobContext, args: Args) -> Self::Future;
}

impl<F, Fut, I, R> JobFn<(I,), R> for F
where
    F: Fn(JobContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, ctx: JobContext, (input,): (I,)) -> Fut {
        self(ctx, input)
    }
}

impl<F, Fut, I, P, R> JobFn<(I, P), R> for F
where
    F: Fn(JobContext, I, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, ctx: JobContext, (input, parameter): (I, P)) -> Fut {
        self(ctx, input, parameter)
    }
}

/// A queue worker definition.
///
/// ```
/// use purista_core::service::{JobContext, QueueWorkerDef, WorkerMode};
/// let def = QueueWorkerDef::new("emails", |_ctx: JobContext, to: String| async move {
///     println!("sending to {to}");
///     Ok(())
/// })
/// .mode(WorkerMode::Continuous { concurrency: 4 });
/// assert_eq!(def.queue(), "emails");
/// ```
pub struct QueueWorkerDef {
    pub(crate) queue: String,
    pub(crate) config: QueueConfig,
    pub(crate) mode: WorkerMode,
    pub(crate) idempotency_enforced: bool,
    pub(crate) delayed_jobs: bool,
    pub(crate) dead_letter_ops: bool,
    pub(crate) lease_wait: Duration,
    pub(crate) handler: Arc<ErasedJobFn>,
}

impl QueueWorkerDef {
    /// A worker for `queue`; `handler` is a `Fn(JobContext, I)` or `Fn(JobContext, I, P)` that
    /// gets the job's payload as `I` (and parameter as `P`). A job whose payload or parameter
    /// does not match is dead-lettered at once.
    pub fn new<Args, R, F>(queue: impl Into<String>, handler: F) -> Self
    where
        Args: HandlerArgs,
        R: IntoJobSettlement + Send + 'static,
        F: JobFn<Args, R>,
    {
        let handler = Arc::new(handler);
        let erased = move |ctx: JobContext, payload: &Value, parameter: &Value| {
            let fut = Args::decode(payload, parameter)
                .map_err(|e| anyhow::Error::new(JobPayloadMismatch(e.message)))
                .map(|args| handler.call(ctx, args));
            async move { Ok(fut?.await?.into_settlement()) }.boxed()
        };
        QueueWorkerDef {
            queue: queue.into(),
            config: QueueConfig::default(),
            mode: WorkerMode::Sequential,
            idempotency_enforced: false,
            delayed_jobs: false,
            dead_letter_ops: false,
            lease_wait: Duration::from_secs(1),
            handler: Arc::new(erased),
        }
    }

    /// The queue name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Lifecycle settings (visibility timeout, attempts, backoff, …).
    pub fn config(mut self, config: QueueConfig) -> Self {
        self.config = config;
        self
    }

    /// Worker mode.
    pub fn mode(mut self, mode: WorkerMode) -> Self {
        self.mode = mode;
        self
    }

    /// Requires the bridge to enforce idempotency keys (strict mode).
    pub fn enforce_idempotency(mut self) -> Self {
        self.idempotency_enforced = true;
        self
    }

    /// Declares that jobs will be scheduled for later (needs delayed delivery).
    pub fn delayed_jobs(mut self) -> Self {
        self.delayed_jobs = true;
        self
    }

    /// Declares that operators will inspect, replay and purge this queue's dead letters
    /// (needs the bridge's dead-letter operations).
    pub fn dead_letter_ops(mut self) -> Self {
        self.dead_letter_ops = true;
        self
    }

    /// How long one lease call waits for a job before the loop checks for stop (default 1 s).
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    pub(crate) fn needs(&self) -> Vec<Need> {
        let mut needs = Vec::new();
        if self.config.auto_heartbeat {
            needs.push(Need::QueueLeaseExtension);
        }
        if self.idempotency_enforced {
            needs.push(Need::QueueIdempotency);
        }
        if self.delayed_jobs {
            needs.push(Need::QueueDelayedDelivery);
        }
        if self.dead_letter_ops {
            needs.push(Need::QueueDeadLetterOps);
        }
        needs
    }
}

/// What the service tells its workers. Only moves forward: `Run` → `Stop` → `Abort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum WorkerSignal {
    /// Lease and handle jobs.
    Run,
    /// Lease no more jobs; let the running ones finish.
    Stop,
    /// The drain deadline passed: end the running jobs too (their leases expire and the jobs
    /// reappear for another worker).
    Abort,
}

pub(crate) struct WorkerRuntime {
    pub shared: Arc<Shared>,
    pub queues: Arc<dyn QueueBridge>,
    pub queue: String,
    pub registration: Arc<str>,
    pub in_flight: InFlightCounter,
    pub config: QueueConfig,
    pub mode: WorkerMode,
    pub lease_wait: Duration,
    pub handler: Arc<ErasedJobFn>,
    pub meters: RegistrationMeters,
}

impl WorkerSignal {
    /// Moves the signal forward to `to` (never back). True when it changed.
    pub fn advance_to(&mut self, to: WorkerSignal) -> bool {
        if *self < to {
            *self = to;
            true
        } else {
            false
        }
    }
}

/// Resolves once the signal reaches `at_least` (or the service is gone).
async fn signalled(signal: &mut watch::Receiver<WorkerSignal>, at_least: WorkerSignal) {
    let _ = signal.wait_for(|s| *s >= at_least).await;
}

impl WorkerRuntime {
    /// The worker loop. Stops leasing on [`WorkerSignal::Stop`] and then waits for its running
    /// jobs; on [`WorkerSignal::Abort`] it ends them and returns once they are gone.
    pub async fn run(self: Arc<Self>, mut signal: watch::Receiver<WorkerSignal>) {
        let slots = match self.mode {
            WorkerMode::Continuous { concurrency } => concurrency.max(1),
            _ => 1,
        };
        let semaphore = Arc::new(Semaphore::new(slots));
        // Jobs of a continuous worker run as tasks of this set, so ending the worker ends them.
        let mut jobs = tokio::task::JoinSet::new();
        loop {
            if *signal.borrow() != WorkerSignal::Run {
                break;
            }
            while jobs.try_join_next().is_some() {}
            if self.shared.paused_workers.lock().contains_key(&self.queue) {
                let resumed = self.shared.workers_resumed.notified();
                tokio::select! {
                    _ = resumed => continue,
                    _ = signalled(&mut signal, WorkerSignal::Stop) => continue,
                    // Re-check periodically in case the notification raced the check above.
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
            let permit = tokio::select! {
                p = semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = signalled(&mut signal, WorkerSignal::Stop) => continue,
            };
            let leased = tokio::select! {
                r = self.queues.lease(&self.queue, self.lease_wait) => r,
                _ = signalled(&mut signal, WorkerSignal::Stop) => continue,
            };
            match leased {
                Ok(Some(job)) => {
                    let this = self.clone();
                    if slots == 1 {
                        // Inline: no task per job. Only an abort cuts the job short.
                        tokio::select! {
                            _ = this.handle(job) => {}
                            _ = signalled(&mut signal, WorkerSignal::Abort) => break,
                        }
                        drop(permit);
                    } else {
                        jobs.spawn(async move {
                            this.handle(job).await;
                            drop(permit);
                        });
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(queue = %self.queue, error = %e, "leasing failed; retrying in 1 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = signalled(&mut signal, WorkerSignal::Stop) => {}
                    }
                }
            }
            if let WorkerMode::Interval(period) = self.mode {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = signalled(&mut signal, WorkerSignal::Stop) => {}
                }
            }
        }
        // Let running jobs finish, unless told to abort them.
        tokio::select! {
            _ = async { while jobs.join_next().await.is_some() {} } => {}
            _ = signalled(&mut signal, WorkerSignal::Abort) => jobs.shutdown().await,
        }
    }

    async fn handle(&self, job: LeasedJob) {
        let _guard = self.in_flight.start();
        let _running = self.meters.running();
        let started = std::time::Instant::now();
        let traced = spans::job(&self.shared.site, self.queues.name(), &self.queue, &job);
        let span = traced.span.clone();
        let job = Arc::new(job);
        let ctx = JobContext {
            ctx: Context {
                shared: self.shared.clone(),
                flow: Flow::Job(job.clone()),
                target: self.registration.clone(),
                trace: Some(traced.cx.clone()),
            },
            job: job.clone(),
            queues: self.queues.clone(),
        };
        let work = run_guarded(|| (self.handler)(ctx, &job.payload, &job.parameter))
            .instrument(span.clone());
        // The heartbeat runs inside the job's future, so it ends with the job however the job
        // ends (also when an abort drops it).
        let result = if self.config.auto_heartbeat {
            tokio::pin!(work);
            tokio::select! {
                r = &mut work => r,
                () = self.heartbeat(&job) => work.await,
            }
        } else {
            work.await
        };
        let settlement = span.in_scope(|| match result {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                if let Some(m) = err.downcast_ref::<JobPayloadMismatch>() {
                    traced.fail_with("payload_mismatch");
                    tracing::warn!(error = %m, "poison job dead-lettered");
                    JobSettlement::DeadLetter {
                        reason: m.to_string(),
                    }
                } else if let Some(h) = err.downcast_ref::<HandledError>() {
                    traced.fail(h.status);
                    JobSettlement::Fail {
                        fatal: false,
                        reason: h.message.clone(),
                    }
                } else {
                    traced.fail_with("unhandled_error");
                    tracing::warn!(error = %format!("{err:#}"), "job failed; retry per policy");
                    JobSettlement::Retry {
                        delay: None,
                        reason: Some(format!("{err:#}")),
                    }
                }
            }
            Err(()) => {
                traced.fail_with("panic");
                tracing::error!("job handler panicked; retry per policy");
                JobSettlement::Retry {
                    delay: None,
                    reason: Some("handler panicked".into()),
                }
            }
        });
        self.meters.took(started.elapsed());
        // The queue bridge applies the same plan; its kind is the attempt's outcome.
        let (outcome, settled) =
            match self
                .config
                .plan(&job, &settlement, crate::envelope::now_ms())
            {
                JobDisposition::Complete => ("complete", Settled::Ok),
                JobDisposition::RetryAfter { .. } => ("retry", Settled::Retry),
                JobDisposition::DeadLetter { .. } => ("dead_letter", Settled::DeadLetter),
            };
        traced.outcome(outcome);
        self.meters.settled(settled);
        if let Err(e) = self.queues.settle(&job, settlement).instrument(span).await {
            tracing::warn!(error = %e, "settling the job failed; the lease will expire and the job reappear");
        }
    }

    /// Extends the job's lease every `heartbeat_interval`; returns when an extension fails.
    async fn heartbeat(&self, job: &LeasedJob) {
        loop {
            tokio::time::sleep(self.config.heartbeat_interval).await;
            if let Err(e) = self.queues.extend_lease(job, None).await {
                tracing::warn!(error = %e, "automatic lease extension stopped");
                return;
            }
        }
    }
}
