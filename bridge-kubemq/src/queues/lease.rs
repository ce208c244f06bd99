//! From a received KubeMQ message to a settled job: one task per message.
//!
//! 1. **Receive** ([`receive`]): a `StreamQueueMessage` asks KubeMQ for the next message of
//!    the queue, with the broker's shortest wait (one second), because a lease call may wait
//!    less than KubeMQ can (it counts in seconds). The task is spawned for a waiting `lease`
//!    call and outlives it if need be, so a message KubeMQ hands out after the caller gave up
//!    is not dropped mid-flight (which KubeMQ would count as a receive).
//! 2. **Check**: a message returned unsettled before (receive count above one) counts its
//!    returns as expired leases, and core's [`QueueConfig::plan_lease_expiry`] may send it to
//!    the dead-letter queue at once. A message not yet due to the millisecond waits.
//! 3. **Hold** ([`QueueState`]'s pool): the task holds the message — invisible to every other
//!    consumer — until a `lease` call claims it. Unclaimed for [`POOL_HOLD`] after it is due,
//!    it is handed back unchanged (`ResendMessage`: no attempt is counted).
//! 4. **Lease**: the claiming call gets a [`LeasedJob`]; the task keeps the stream and a
//!    millisecond timer. Extensions move the timer (and the broker's visibility, which always
//!    outlasts it), up to the queue's cap. A settlement is planned by core
//!    ([`QueueConfig::plan`]) and carried out on the stream in one request: ack, the next
//!    attempt as a modified message (KubeMQ delays whole seconds, the job's `visibleAtMs` the
//!    rest), or the dead letter. When the timer fires first, the task settles the lease as
//!    expired, as core plans it.
//!
//! [`QueueConfig::plan_lease_expiry`]: purista_core::queue::QueueConfig::plan_lease_expiry
//! [`QueueConfig::plan`]: purista_core::queue::QueueConfig::plan

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kubemq::proto::kubemq::{QueueMessage, QueueMessagePolicy};
use parking_lot::Mutex;
use purista_core::envelope::now_ms;
use purista_core::kit::{Claim, JobPool, LeaseCommand, LeaseHolders, PoolCounts, millis};
use purista_core::queue::{JobDisposition, LeasedJob, QueueDeclaration, QueueError};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::record::{DeadBody, DeadRecord, JobBody, JobRecord};
use super::stream::{LeaseStream, delay_seconds, visibility_seconds};
use crate::connection::RawClient;

/// How long a received message waits for a `lease` call after it is due, before it is handed
/// back to the queue.
pub const POOL_HOLD: Duration = Duration::from_secs(1);
/// A received message due later than this is sent back with the rest of its delay (a far
/// future time is a long delay split into KubeMQ's 12 h steps, or a skewed clock).
const EARLY_LIMIT_MS: u64 = 2_000;
/// KubeMQ's largest receive count: a message returned unsettled this often is re-routed by
/// KubeMQ itself to the dead-letter queue (instead of being dropped, KubeMQ's default).
pub const MAX_RECEIVES: i32 = 1024;
/// KubeMQ's shortest wait for a message.
const RECEIVE_WAIT_SECONDS: i32 = 1;
/// A failed receive waits this long before the next (no hot loop while KubeMQ is away).
const FAILED_RECEIVE_PAUSE: Duration = Duration::from_millis(200);

/// What every queue task uses.
pub struct QueueLink {
    /// The generated client.
    pub raw: RawClient,
    /// This instance's KubeMQ client id.
    pub client_id: String,
    /// Turns true at shutdown.
    pub closed: watch::Receiver<bool>,
    /// Leases handed out, by token.
    pub leases: LeaseHolders,
    /// Deadline of one broker call.
    pub call_timeout: Duration,
}

/// One declared queue on this instance: its channels, the declaration in force, and the
/// messages this instance holds for it.
pub struct QueueState {
    /// The queue's name.
    pub name: String,
    /// Its KubeMQ queue channel.
    pub channel: String,
    /// The channel of its dead-letter queue.
    pub dead_letter_channel: String,
    /// The declaration in force.
    pub declaration: QueueDeclaration,
    pool: JobPool,
    leased: AtomicUsize,
    /// When KubeMQ releases the messages this instance delayed (epoch ms).
    delayed_until: Mutex<Vec<u64>>,
}

/// Counts this instance holds of one queue.
#[derive(Debug, Default, Clone, Copy)]
pub struct Held {
    /// Held and due: ready for the next lease.
    pub ready: usize,
    /// Held, not yet due.
    pub early: usize,
    /// Handed out under a lease.
    pub leased: usize,
    /// Delayed by KubeMQ, not yet released.
    pub delayed: usize,
}

impl QueueState {
    /// The state of a newly declared queue.
    pub fn new(
        name: &str,
        channel: String,
        dead_letter_channel: String,
        declaration: QueueDeclaration,
    ) -> Self {
        QueueState {
            name: name.to_string(),
            channel,
            dead_letter_channel,
            declaration,
            pool: JobPool::new(),
            leased: AtomicUsize::new(0),
            delayed_until: Mutex::new(Vec::new()),
        }
    }

    /// The KubeMQ message of `record`, delayed by KubeMQ for the whole seconds of `delay`.
    pub fn job_message(
        &self,
        client_id: &str,
        record: &JobRecord,
        delay: Duration,
    ) -> QueueMessage {
        let seconds = delay_seconds(delay);
        if seconds > 0 {
            self.note_delayed(now_ms() + u64::try_from(seconds).unwrap_or(0) * 1000);
        }
        QueueMessage {
            message_id: record.id.clone(),
            client_id: client_id.to_string(),
            channel: self.channel.clone(),
            metadata: "purista-job".into(),
            body: record.encode(),
            policy: Some(QueueMessagePolicy {
                delay_seconds: seconds,
                max_receive_count: MAX_RECEIVES,
                max_receive_queue: self.dead_letter_channel.clone(),
                expiration_seconds: 0,
            }),
            ..Default::default()
        }
    }

    /// The KubeMQ message of a dead letter.
    pub fn dead_message(&self, client_id: &str, dead: &DeadRecord) -> QueueMessage {
        QueueMessage {
            message_id: dead.job.id.clone(),
            client_id: client_id.to_string(),
            channel: self.dead_letter_channel.clone(),
            metadata: "purista-dead-job".into(),
            body: dead.encode(),
            ..Default::default()
        }
    }

    fn note_delayed(&self, until_ms: u64) {
        let now = now_ms();
        let mut delayed = self.delayed_until.lock();
        delayed.retain(|t| *t > now);
        delayed.push(until_ms);
    }

    /// What this instance holds of the queue right now.
    pub fn held(&self) -> Held {
        let now = now_ms();
        let PoolCounts { ready, early } = self.pool.counts(now);
        Held {
            ready,
            early,
            leased: self.leased.load(Ordering::SeqCst),
            delayed: self
                .delayed_until
                .lock()
                .iter()
                .filter(|t| **t > now)
                .count(),
        }
    }
}

/// Leases the next due job of `queue`, waiting at most `wait`. `spawn` starts a receive task.
pub async fn lease(
    link: &Arc<QueueLink>,
    queue: &Arc<QueueState>,
    wait: Duration,
    spawn: &(dyn Fn(futures::future::BoxFuture<'static, ()>) -> bool + Sync),
) -> Result<Option<LeasedJob>, QueueError> {
    let start_receiver = || spawn(Box::pin(receive(link.clone(), queue.clone())));
    queue
        .pool
        .lease(wait, &link.closed, start_receiver, || {
            QueueError::Unavailable("the queue bridge is shut down".into())
        })
        .await
}

/// One receive task: asks KubeMQ for a message and, when one comes, holds and leases it.
async fn receive(link: Arc<QueueLink>, queue: Arc<QueueState>) {
    let visibility = visibility_seconds(queue.declaration.config.visibility_timeout)
        .saturating_add(i32::try_from(POOL_HOLD.as_secs()).unwrap_or(1) + 1);
    let mut closed = link.closed.clone();
    let received = tokio::select! {
        r = LeaseStream::receive(
            link.raw.clone(),
            &link.client_id,
            &queue.channel,
            visibility,
            RECEIVE_WAIT_SECONDS,
        ) => r,
        _ = closed.wait_for(|c| *c) => Ok(None),
    };
    let received_at = Instant::now();
    match received {
        Ok(Some((stream, message))) => {
            queue.pool.receiver_ended();
            queue.pool.wake();
            let broker_until =
                received_at + Duration::from_secs(u64::try_from(visibility).unwrap_or(1));
            hold(link, queue, stream, message, broker_until).await;
        }
        Ok(None) => {
            queue.pool.receiver_ended();
            queue.pool.wake();
        }
        Err(error) => {
            tracing::debug!(queue = %queue.name, %error, "receiving from a KubeMQ queue failed");
            tokio::select! {
                () = tokio::time::sleep(FAILED_RECEIVE_PAUSE) => {}
                _ = closed.wait_for(|c| *c) => {}
            }
            queue
                .pool
                .fail(format!("KubeMQ queue `{}`: {error}", queue.channel));
            queue.pool.receiver_ended();
            queue.pool.wake();
        }
    }
}

/// Checks a received message, holds it until claimed, then serves its lease.
async fn hold(
    link: Arc<QueueLink>,
    queue: Arc<QueueState>,
    mut stream: LeaseStream,
    message: QueueMessage,
    broker_until: Instant,
) {
    let attributes = message.attributes.clone().unwrap_or_default();
    let sequence = attributes.sequence;
    let record = match JobRecord::decode(&message.body) {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(queue = %queue.name, message_id = %message.message_id, %error, "a message in a job queue is no job: moved to the dead-letter queue");
            let _ = stream.resend(sequence, &queue.dead_letter_channel).await;
            return;
        }
    };
    let config = &queue.declaration.config;
    let attempt = record.attempt_at(u32::try_from(attributes.receive_count).unwrap_or(0));
    let now = now_ms();
    if attempt > record.attempt {
        // Returned unsettled: the previous lease expired with its holder.
        let previous = record.leased(attempt - 1, String::new(), now);
        if let JobDisposition::DeadLetter { reason } = config.plan_lease_expiry(&previous, now) {
            let dead = DeadRecord {
                job: record.next(attempt - 1, record.visible_at_ms),
                reason,
                dead_lettered_at_ms: now,
            };
            let replacement = queue.dead_message(&link.client_id, &dead);
            if let Err(error) = stream.send_modified(sequence, replacement).await {
                tracing::warn!(queue = %queue.name, job_id = %record.id, %error, "a job past its budget could not be dead-lettered; KubeMQ returns it");
            }
            return;
        }
    }
    if record.visible_at_ms > now + EARLY_LIMIT_MS {
        // Not due for a while yet: back with the rest of its delay, the same attempt.
        let rest = Duration::from_millis(record.visible_at_ms - now);
        let again = record.next(attempt, record.visible_at_ms);
        let replacement = queue.job_message(&link.client_id, &again, rest);
        let _ = stream.send_modified(sequence, replacement).await;
        return;
    }
    let claim = queue
        .pool
        .hold(record.visible_at_ms, now, POOL_HOLD, &link.closed)
        .await;
    match claim {
        Some(claim) => {
            serve(
                link,
                queue,
                stream,
                record,
                attempt,
                sequence,
                claim,
                broker_until,
            )
            .await;
        }
        None => {
            // Nobody wanted it: back to the queue, not counted as an attempt.
            let _ =
                tokio::time::timeout(link.call_timeout, stream.resend(sequence, &queue.channel))
                    .await;
        }
    }
}

/// Removes a lease from the table when its task ends.
struct Registered<'a> {
    link: &'a QueueLink,
    queue: &'a QueueState,
    token: String,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.link.leases.remove(&self.token);
        self.queue.leased.fetch_sub(1, Ordering::SeqCst);
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    link: Arc<QueueLink>,
    queue: Arc<QueueState>,
    mut stream: LeaseStream,
    record: JobRecord,
    attempt: u32,
    sequence: u64,
    claim: Claim,
    mut broker_until: Instant,
) {
    let config = queue.declaration.config.clone();
    let token = purista_core::ids::new_id();
    let mut deadline = Instant::now() + config.visibility_timeout;
    let mut expires_at_ms = now_ms() + millis(config.visibility_timeout);
    if deadline + Duration::from_millis(500) > broker_until {
        let seconds = visibility_seconds(config.visibility_timeout);
        if let Err(error) = stream.modify_visibility(seconds).await {
            let _ = claim.send(Err(QueueError::Unavailable(format!(
                "KubeMQ lost the lease: {error}"
            ))));
            return;
        }
        broker_until = Instant::now() + Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
    }
    let (tx, mut rx) = mpsc::channel(4);
    link.leases.insert(token.clone(), tx);
    queue.leased.fetch_add(1, Ordering::SeqCst);
    let registered = Registered {
        link: &link,
        queue: &queue,
        token: token.clone(),
    };
    let mut job = record.leased(attempt, token, expires_at_ms);
    if claim.send(Ok(job.clone())).is_err() {
        // The lease call went away before it got the job: back, not an attempt.
        let _ =
            tokio::time::timeout(link.call_timeout, stream.resend(sequence, &queue.channel)).await;
        return;
    }
    let mut closed = link.closed.clone();
    enum Event {
        Command(Option<LeaseCommand>),
        Expired,
        Closing,
    }
    loop {
        let event = tokio::select! {
            biased;
            command = rx.recv() => Event::Command(command),
            () = tokio::time::sleep_until(deadline) => Event::Expired,
            _ = closed.wait_for(|c| *c) => Event::Closing,
        };
        match event {
            Event::Command(Some(LeaseCommand::Extend { by, reply })) => {
                if job.extensions >= config.max_lease_extensions {
                    let _ = reply.send(Err(QueueError::ExtensionCapReached {
                        job_id: job.id.clone(),
                        cap: config.max_lease_extensions,
                    }));
                    continue;
                }
                let by = by.unwrap_or(config.visibility_timeout);
                let until = (Instant::now() + by).max(deadline);
                if until + Duration::from_millis(500) > broker_until {
                    let seconds =
                        visibility_seconds(until.saturating_duration_since(Instant::now()));
                    let refreshed =
                        tokio::time::timeout(link.call_timeout, stream.modify_visibility(seconds))
                            .await;
                    if !matches!(refreshed, Ok(Ok(()))) {
                        let _ = reply.send(Err(QueueError::LeaseLost {
                            job_id: job.id.clone(),
                            lease_token: job.lease_token.clone(),
                        }));
                        return;
                    }
                    broker_until =
                        Instant::now() + Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
                }
                expires_at_ms = expires_at_ms.max(now_ms() + millis(by));
                deadline = until;
                job.extensions += 1;
                job.lease_expires_at_ms = expires_at_ms;
                let _ = reply.send(Ok(expires_at_ms));
            }
            Event::Command(Some(LeaseCommand::Settle { settlement, reply })) => {
                let disposition = config.plan(&job, &settlement, now_ms());
                let done = carry_out(
                    &link,
                    &queue,
                    &mut stream,
                    &record,
                    &job,
                    sequence,
                    disposition,
                )
                .await;
                // Off the books before the caller hears of it: metrics read right after a
                // settlement must not count the lease.
                drop(registered);
                let _ = reply.send(done);
                return;
            }
            Event::Command(None) | Event::Closing => return,
            Event::Expired => {
                let disposition = config.plan_lease_expiry(&job, now_ms());
                if let Err(error) = carry_out(
                    &link,
                    &queue,
                    &mut stream,
                    &record,
                    &job,
                    sequence,
                    disposition,
                )
                .await
                {
                    tracing::warn!(queue = %queue.name, job_id = %job.id, %error, "an expired lease could not be settled; KubeMQ returns the job");
                }
                return;
            }
        }
    }
}

/// Carries out core's plan for one leased job on its stream.
async fn carry_out(
    link: &QueueLink,
    queue: &QueueState,
    stream: &mut LeaseStream,
    record: &JobRecord,
    job: &LeasedJob,
    sequence: u64,
    disposition: JobDisposition,
) -> Result<(), QueueError> {
    let now = now_ms();
    let call = async {
        match disposition {
            JobDisposition::Complete => stream.ack(sequence).await,
            JobDisposition::RetryAfter { delay, .. } => {
                let next = record.next(job.attempt + 1, now + millis(delay));
                let replacement = queue.job_message(&link.client_id, &next, delay);
                stream.send_modified(sequence, replacement).await
            }
            JobDisposition::DeadLetter { reason } => {
                let dead = DeadRecord {
                    job: record.next(job.attempt, record.visible_at_ms),
                    reason,
                    dead_lettered_at_ms: now,
                };
                let replacement = queue.dead_message(&link.client_id, &dead);
                stream.send_modified(sequence, replacement).await
            }
        }
    };
    match tokio::time::timeout(link.call_timeout, call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(QueueError::Broker(error.to_string())),
        Err(_) => Err(QueueError::Unavailable(format!(
            "KubeMQ did not answer the settlement within {} ms",
            millis(link.call_timeout)
        ))),
    }
}
