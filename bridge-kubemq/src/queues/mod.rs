//! [`KubemqQueues`]: the [`QueueBridge`] on KubeMQ queues.
//!
//! * **Jobs** are KubeMQ queue messages on `<prefix>.q.<queue>`; the body is the job
//!   ([`record`]), the message id its id.
//! * **Leases** are KubeMQ's visibility leases (`StreamQueueMessage`, `ModifyVisibility`), one
//!   stream per leased job ([`stream`]); the bridge keeps the millisecond deadline, KubeMQ a
//!   visibility that always outlasts it and takes over when the lessee dies ([`lease`]).
//!   Extensions are capped by the queue's `max_lease_extensions`.
//! * **What a settlement means** is decided by core ([`QueueConfig::plan`],
//!   [`QueueConfig::plan_lease_expiry`]): retries back off with jitter within `max_attempts`
//!   and the retry window; the bridge executes the plan in one request on the lease's stream.
//! * **Delays** (`run_at`, retry delays): KubeMQ delays whole seconds; the job carries its
//!   millisecond due time and its lessee waits out the rest, so no job is leased early.
//! * **Dead letters** go to the KubeMQ queue of `<queue>.dead-letter` (or the configured
//!   name) with reason and time ([`dead_jobs`]): inspect, replay, purge. KubeMQ's own receive
//!   limit re-routes a job there too, should it come back unsettled 1 024 times.
//! * **Declarations**: the first declaration of a queue is in force on every instance
//!   ([`declarations`]).
//! * **Idempotency keys** are kept on the job but not enforced (declared so).
//! * **Metrics**: `depth` = ready jobs KubeMQ shows (a peek: at most 1 024), plus those this
//!   instance holds for a lease; `leased` = the leases this instance handed out; `delayed` =
//!   jobs not yet due that KubeMQ shows or this instance holds, plus those this instance
//!   delayed and KubeMQ has not released yet (KubeMQ shows no delayed messages);
//!   `dead_lettered` = this queue's records in its dead-letter queue (at most 1 024). On a
//!   real KubeMQ a peek waits its shortest wait (one second).
//!
//! [`QueueConfig::plan`]: purista_core::queue::QueueConfig::plan
//! [`QueueConfig::plan_lease_expiry`]: purista_core::queue::QueueConfig::plan_lease_expiry

mod dead_jobs;
mod declarations;
pub(crate) mod lease;
pub mod record;
pub(crate) mod stream;

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

use self::lease::{QueueLink, QueueState};
use self::record::{JobBody, JobRecord};
use crate::bridge::BRIDGE_NAME;
use crate::channels::Channels;
use crate::config::KubemqConfig;
use crate::connection::Connection;

/// What the KubeMQ queue bridge provides (each line proven by the conformance suite).
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

/// The KubeMQ queue bridge of one instance.
pub struct KubemqQueues {
    link: Arc<QueueLink>,
    channels: Channels,
    max_payload_bytes: usize,
    capabilities: QueueCapabilities,
    queues: RwLock<HashMap<String, Arc<QueueState>>>,
    tasks: Arc<TaskSet>,
    close: watch::Sender<bool>,
    shut: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for KubemqQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubemqQueues")
            .field("client_id", &self.link.client_id)
            .finish_non_exhaustive()
    }
}

impl KubemqQueues {
    /// A queue bridge on `connection` with the settings and channel names of its event bridge.
    pub(crate) fn new(config: &KubemqConfig, channels: Channels, connection: &Connection) -> Self {
        let (close, closed) = watch::channel(false);
        KubemqQueues {
            link: Arc::new(QueueLink {
                raw: connection.raw.clone(),
                client_id: connection.client_id.clone(),
                closed,
                leases: LeaseHolders::new(),
                call_timeout: config.publish_timeout,
            }),
            channels,
            max_payload_bytes: config.max_payload_bytes,
            capabilities: queue_capabilities(),
            queues: RwLock::new(HashMap::new()),
            tasks: TaskSet::new(),
            close,
            shut: tokio::sync::OnceCell::new(),
        }
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
}

fn shut_down() -> QueueError {
    QueueError::Unavailable("the kubemq queue bridge is shut down".into())
}

#[async_trait]
impl QueueBridge for KubemqQueues {
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
        if queue.is_empty() {
            return Err(QueueError::InvalidRequest("empty queue name".into()));
        }
        if declaration.config.visibility_timeout.is_zero() {
            return Err(QueueError::InvalidRequest(format!(
                "queue `{queue}`: visibility_timeout must be greater than zero"
            )));
        }
        let known = self.queues.read().get(queue).cloned();
        if let Some(known) = known {
            return known.declaration.check_redeclaration(queue, &declaration);
        }
        let first = declarations::first_declaration(
            self.link.raw.clone(),
            &self.link.client_id,
            &self.channels.queue_declarations(queue),
            &declaration,
            self.link.call_timeout,
        )
        .await?;
        let dead_letter_queue = first.config.dead_letter_queue_for(queue);
        let state = Arc::new(QueueState::new(
            queue,
            self.channels.queue(queue),
            self.channels.queue(&dead_letter_queue),
            first.clone(),
        ));
        self.queues
            .write()
            .entry(queue.to_string())
            .or_insert(state);
        first.check_redeclaration(queue, &declaration)
    }

    async fn enqueue(&self, queue: &str, job: NewJob) -> Result<String, QueueError> {
        let state = self.queue(queue)?;
        let now = now_ms();
        let record = JobRecord::new(queue, job, now);
        let body_len = record.encode().len();
        if body_len > self.max_payload_bytes {
            return Err(QueueError::InvalidRequest(format!(
                "the job is {body_len} bytes, over the bridge's limit of {} bytes",
                self.max_payload_bytes
            )));
        }
        let delay = Duration::from_millis(record.visible_at_ms.saturating_sub(now));
        let message = state.job_message(&self.link.client_id, &record, delay);
        dead_jobs::send(self.link.raw.clone(), message, self.link.call_timeout).await?;
        Ok(record.id)
    }

    async fn lease(&self, queue: &str, wait: Duration) -> Result<Option<LeasedJob>, QueueError> {
        let state = self.queue(queue)?;
        let tasks = self.tasks.clone();
        let label: Arc<str> = format!("queue receiver {queue}").into();
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
        let now = now_ms();
        let raw = self.link.raw.clone();
        let client_id = &self.link.client_id;
        let timeout = self.link.call_timeout;
        let (shown, dead) = futures::try_join!(
            dead_jobs::peek(raw.clone(), client_id, &state.channel, timeout),
            dead_jobs::records(raw, client_id, &state, timeout),
        )?;
        let held = state.held();
        let due = |m: &kubemq::proto::kubemq::QueueMessage| {
            JobRecord::decode(&m.body).map_or(true, |r| r.visible_at_ms <= now)
        };
        let ready = shown.iter().filter(|m| due(m)).count();
        Ok(QueueMetrics {
            depth: ready + held.ready,
            leased: held.leased,
            delayed: (shown.len() - ready) + held.early + held.delayed,
            dead_lettered: dead.len(),
        })
    }

    async fn inspect_dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetteredJob>, QueueError> {
        let state = self.queue(queue)?;
        dead_jobs::inspect(
            self.link.raw.clone(),
            &self.link.client_id,
            &state,
            limit,
            self.link.call_timeout,
        )
        .await
    }

    async fn replay_dead_letters(
        &self,
        queue: &str,
        ids: Option<Vec<String>>,
    ) -> Result<usize, QueueError> {
        let state = self.queue(queue)?;
        dead_jobs::take(
            &self.link.raw,
            &self.link.client_id,
            &state,
            ids,
            true,
            self.link.call_timeout,
        )
        .await
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize, QueueError> {
        let state = self.queue(queue)?;
        dead_jobs::take(
            &self.link.raw,
            &self.link.client_id,
            &state,
            None,
            false,
            self.link.call_timeout,
        )
        .await
    }

    /// Stops taking work: jobs held for a lease go back to their queue untouched, leases
    /// still open end (KubeMQ returns their jobs, counted as expired leases).
    async fn shutdown(&self) {
        self.shut
            .get_or_init(|| async {
                let _ = self.close.send(true);
                self.tasks.close();
                let deadline = tokio::time::Instant::now()
                    + self.link.call_timeout.min(Duration::from_secs(5));
                if !self.tasks.wait_empty(deadline).await {
                    self.tasks.abort_all();
                }
            })
            .await;
    }
}
