//! [`AwsQueues`]: the [`QueueBridge`] on SQS.
//!
//! * **Jobs** are SQS messages on `<prefix>-q-<queue>` (a queue name that does not fit SQS's
//!   80 characters is refused, never cut); the body is the job ([`record`]).
//! * **Leases** are SQS visibility: the receive hides the message, and the bridge keeps the
//!   millisecond deadline of the lease while SQS's visibility always outlasts it and takes
//!   over when the lessee dies (its receive count then counts the expired lease) (`lease.rs`).
//!   `extend_lease` is `ChangeMessageVisibility` when the new deadline passes what SQS was
//!   told, capped by the queue's `max_lease_extensions`. A lease SQS cannot cover (its
//!   visibility ends at most 12 hours after the receive) is refused with `InvalidRequest`: at
//!   `declare_queue` for the visibility timeout, at `extend_lease` for an extension.
//! * **What a settlement means** is decided by core ([`QueueConfig::plan`],
//!   [`QueueConfig::plan_lease_expiry`]): retries back off exponentially with jitter within
//!   `max_attempts` and the 24 h retry window (by default), then the dead-letter queue.
//! * **Delays** (`run_at`, retry delays): SQS delays whole seconds, at most 15 minutes
//!   (`DelaySeconds`). The job carries its millisecond due time: the receiving instance waits
//!   out the sub-second rest, and a job due later than that is sent on with the rest of its
//!   delay, so a delay of hours is a chain of 15-minute copies. No job is leased early.
//! * **Dead letters** go to the SQS queue of `<queue>.dead-letter` (or the configured name)
//!   with reason and time (`dead_jobs.rs`): inspect, replay, purge. A message that is no job
//!   (not JSON, wrong types, another kind of message) goes there too, with the reason.
//! * **Declarations**: the first declaration of a queue is in force on every instance; it is
//!   kept in the job queue's tags ([`declarations`]).
//! * **Idempotency keys** are kept on the job but not enforced (declared so): SQS FIFO
//!   queues deduplicate for 5 minutes only, which is not "a repeated key returns the first
//!   job id".
//! * **Metrics** come from SQS's queue attributes, which SQS itself calls approximate (real
//!   SQS lags them by up to a minute): `depth` = `ApproximateNumberOfMessages` plus the due
//!   jobs this instance holds for a `lease` call; `leased` =
//!   `ApproximateNumberOfMessagesNotVisible` less the jobs this instance holds for a lease
//!   (other instances' held jobs count as leased); `delayed` =
//!   `ApproximateNumberOfMessagesDelayed` plus the jobs this instance holds not yet due;
//!   `dead_lettered` = the dead-letter queue's messages, visible and in flight.
//!
//! [`QueueConfig::plan`]: purista_core::queue::QueueConfig::plan
//! [`QueueConfig::plan_lease_expiry`]: purista_core::queue::QueueConfig::plan_lease_expiry

mod calls;
mod dead_jobs;
pub mod declarations;
pub(crate) mod lease;
pub mod record;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use purista_core::WorkKind;
use purista_core::capabilities::{DeliveryGuarantee, QueueCapabilities};
use purista_core::envelope::now_ms;
use purista_core::kit::{LeaseCommand, LeaseHolders, TaskSet};
use purista_core::queue::{
    DeadLetteredJob, JobSettlement, LeasedJob, NewJob, QueueBridge, QueueDeclaration, QueueError,
    QueueMetrics,
};
use tokio::sync::{oneshot, watch};

use self::calls::{Sqs, queue_error};
use self::lease::{QueueLink, QueueState};
use self::record::{DEAD_RECORD_OVERHEAD, JobBody, JobRecord};
use crate::bridge::BRIDGE_NAME;
use crate::names::Names;

pub use self::dead_jobs::ATTR_QUEUE;

/// What the SQS queue bridge provides (each line proven by the conformance suite on moto).
pub fn queue_capabilities() -> QueueCapabilities {
    QueueCapabilities {
        bridge: BRIDGE_NAME.to_string(),
        delayed_delivery: true,
        lease_extension: true,
        dead_letter_inspect: true,
        dead_letter_replay: true,
        dead_letter_purge: true,
        idempotency_enforcement: false,
        delivery: DeliveryGuarantee::AtLeastOnce,
    }
}

/// The SQS queue bridge of one instance.
pub struct AwsQueues {
    link: Arc<QueueLink>,
    names: Names,
    max_job_bytes: usize,
    capabilities: QueueCapabilities,
    queues: RwLock<HashMap<String, Arc<QueueState>>>,
    tasks: Arc<TaskSet>,
    close: watch::Sender<bool>,
    shut: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for AwsQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsQueues")
            .field("prefix", &self.names.prefix())
            .finish_non_exhaustive()
    }
}

impl AwsQueues {
    /// A queue bridge on `sqs` under the names of its event bridge. A job (as stored) may
    /// take `max_message_bytes` less the room its dead letter needs beside it.
    pub(crate) fn new(
        sqs: aws_sdk_sqs::Client,
        call_timeout: Duration,
        names: Names,
        max_message_bytes: usize,
    ) -> Self {
        let (close, closed) = watch::channel(false);
        AwsQueues {
            link: Arc::new(QueueLink {
                sqs: Sqs {
                    client: sqs,
                    timeout: call_timeout,
                },
                closed,
                leases: LeaseHolders::new(),
            }),
            names,
            max_job_bytes: max_message_bytes.saturating_sub(DEAD_RECORD_OVERHEAD),
            capabilities: queue_capabilities(),
            queues: RwLock::new(HashMap::new()),
            tasks: TaskSet::new(),
            close,
            shut: tokio::sync::OnceCell::new(),
        }
    }

    /// The largest job (payload, parameter and the bridge's fields, as JSON) an enqueue takes.
    pub fn max_job_bytes(&self) -> usize {
        self.max_job_bytes
    }

    fn queue(&self, queue: &str) -> Result<Arc<QueueState>, QueueError> {
        if *self.close.borrow() {
            return Err(shut_down());
        }
        self.queues
            .read()
            .get(queue)
            .cloned()
            .ok_or_else(|| QueueError::UnknownQueue(queue.to_string()))
    }

    async fn command<T>(
        &self,
        job: &LeasedJob,
        make: impl FnOnce(oneshot::Sender<Result<T, QueueError>>) -> LeaseCommand,
    ) -> Result<T, QueueError> {
        self.queue(&job.queue)?;
        self.link.leases.call(job, make).await
    }

    /// The SQS queue name of job queue `queue`.
    fn sqs_name(&self, queue: &str) -> Result<String, QueueError> {
        self.names.job_queue(queue).map_err(queue_error)
    }
}

fn shut_down() -> QueueError {
    QueueError::Unavailable("the aws queue bridge is shut down".into())
}

#[async_trait]
impl QueueBridge for AwsQueues {
    fn name(&self) -> &str {
        BRIDGE_NAME
    }

    fn capabilities(&self) -> &QueueCapabilities {
        &self.capabilities
    }

    async fn declare_queue(
        &self,
        queue: &str,
        declaration: QueueDeclaration,
    ) -> Result<(), QueueError> {
        if *self.close.borrow() {
            return Err(shut_down());
        }
        if declaration.config.visibility_timeout.is_zero() {
            return Err(QueueError::InvalidRequest(format!(
                "queue `{queue}`: visibility_timeout must be greater than zero"
            )));
        }
        let hidden = lease::receive_visibility(&declaration);
        if hidden > Duration::from_secs(calls::MAX_VISIBILITY_SECONDS) {
            return Err(QueueError::InvalidRequest(format!(
                "queue `{queue}`: a visibility_timeout of {} s and the bridge's {} s margin pass SQS's longest visibility of {} s",
                declaration.config.visibility_timeout.as_secs(),
                (hidden - declaration.config.visibility_timeout).as_secs(),
                calls::MAX_VISIBILITY_SECONDS
            )));
        }
        let name = self.sqs_name(queue)?;
        let dead_letter_queue = declaration.config.dead_letter_queue_for(queue);
        let dead_name = self.sqs_name(&dead_letter_queue)?;
        let known = self.queues.read().get(queue).cloned();
        if let Some(known) = known {
            return known.declaration.check_redeclaration(queue, &declaration);
        }
        let sqs = &self.link.sqs;
        let url = sqs.ensure_queue(&name).await?;
        let first = declarations::first_declaration(sqs, queue, &url, &declaration).await?;
        // The dead-letter queue of the declaration in force (ours may name another).
        let dead_letter_queue = first.config.dead_letter_queue_for(queue);
        let dead_name = if dead_letter_queue == declaration.config.dead_letter_queue_for(queue) {
            dead_name
        } else {
            self.sqs_name(&dead_letter_queue)?
        };
        let dead_url = sqs.ensure_queue(&dead_name).await?;
        let state = Arc::new(QueueState::new(queue, url, dead_url, first.clone()));
        self.queues
            .write()
            .entry(queue.to_string())
            .or_insert(state);
        first.check_redeclaration(queue, &declaration)
    }

    async fn enqueue(&self, queue: &str, job: NewJob) -> Result<String, QueueError> {
        let state = self.queue(queue)?;
        let record = JobRecord::new(queue, job, now_ms());
        let bytes = record.encode().len();
        if bytes > self.max_job_bytes {
            return Err(QueueError::InvalidRequest(format!(
                "the job is {bytes} bytes, over the bridge's limit of {} bytes (SQS's message limit less room for its dead letter)",
                self.max_job_bytes
            )));
        }
        state.send_job(&self.link.sqs, &record).await?;
        Ok(record.id)
    }

    async fn lease(&self, queue: &str, wait: Duration) -> Result<Option<LeasedJob>, QueueError> {
        let state = self.queue(queue)?;
        let tasks = self.tasks.clone();
        let label: Arc<str> = format!("job receiver {queue}").into();
        let spawn = move |task: futures::future::BoxFuture<'static, ()>| {
            tasks.spawn(WorkKind::Queue, label.clone(), task)
        };
        lease::lease(&self.link, &state, wait, &spawn).await
    }

    async fn extend_lease(&self, job: &LeasedJob, by: Option<Duration>) -> Result<u64, QueueError> {
        self.command(job, |reply| LeaseCommand::Extend { by, reply })
            .await
    }

    async fn settle(&self, job: &LeasedJob, settlement: JobSettlement) -> Result<(), QueueError> {
        self.command(job, |reply| LeaseCommand::Settle { settlement, reply })
            .await
    }

    async fn metrics(&self, queue: &str) -> Result<QueueMetrics, QueueError> {
        let state = self.queue(queue)?;
        let sqs = &self.link.sqs;
        let ((visible, in_flight, delayed), (dead_visible, dead_in_flight, dead_delayed)) =
            futures::try_join!(sqs.counts(&state.url), sqs.counts(&state.dead_url))?;
        let held = state.held();
        let pooled = held.ready + held.early;
        Ok(QueueMetrics {
            // A job held here is in flight for SQS: counted by its state here instead.
            depth: visible + held.ready,
            leased: in_flight.saturating_sub(pooled),
            delayed: delayed + held.early,
            dead_lettered: dead_visible + dead_in_flight + dead_delayed,
        })
    }

    async fn inspect_dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetteredJob>, QueueError> {
        let state = self.queue(queue)?;
        dead_jobs::inspect(&self.link.sqs, &state, limit).await
    }

    async fn replay_dead_letters(
        &self,
        queue: &str,
        ids: Option<Vec<String>>,
    ) -> Result<usize, QueueError> {
        let state = self.queue(queue)?;
        dead_jobs::replay(&self.link.sqs, &state, ids).await
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize, QueueError> {
        let state = self.queue(queue)?;
        dead_jobs::purge(&self.link.sqs, &state).await
    }

    /// Stops taking work: jobs held for a lease go back to their queue as fresh copies,
    /// leases still open end (SQS returns their jobs after their visibility, counted as
    /// expired leases).
    async fn shutdown(&self) {
        self.shut
            .get_or_init(|| async {
                let _ = self.close.send(true);
                self.tasks.close();
                let deadline =
                    tokio::time::Instant::now() + self.link.sqs.timeout.min(Duration::from_secs(5));
                if !self.tasks.wait_empty(deadline).await {
                    self.tasks.abort_all();
                }
            })
            .await;
    }
}
