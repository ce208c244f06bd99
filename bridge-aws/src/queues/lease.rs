//! From a received SQS message to a settled job: one task per message.
//!
//! 1. **Receive** ([`receive`]): `ReceiveMessage` (one message, a one-second long poll, since a
//!    `lease` call may wait less than SQS counts) hides the message for longer than a lease
//!    can need before its first extension. The task is spawned for a waiting `lease` call and
//!    outlives it if need be, so a message SQS hands out after the caller gave up is put back
//!    rather than left hidden.
//! 2. **Check**: a body that is no job goes to the dead-letter queue with the reason
//!    ([`super::dead_jobs::poison`]). A copy returned unsettled before (receive count above
//!    one) counts its returns as expired leases, and core's
//!    [`QueueConfig::plan_lease_expiry`] may dead-letter it at once. A job due more than
//!    [`EARLY_LIMIT_MS`] later is sent on with the rest of its delay (SQS delays at most
//!    15 minutes: a longer delay is a chain of such copies).
//! 3. **Hold** ([`QueueState`]'s pool): the task holds the message until a `lease` call
//!    claims it once due — SQS counts whole seconds, the pool milliseconds. Unclaimed for
//!    [`POOL_HOLD`] after it is due, it is put back as a fresh copy (not counted as an attempt).
//! 4. **Lease**: the claiming call gets a [`LeasedJob`]; the task keeps the receipt and a
//!    millisecond timer, and SQS's visibility always outlasts it
//!    (`ChangeMessageVisibility` when the timer would pass it). Extensions move the timer, up
//!    to the queue's cap. A settlement is planned by core ([`QueueConfig::plan`]) and carried
//!    out: delete, the next attempt as a new copy (SQS delays whole seconds, the job's
//!    `visibleAtMs` the rest) then delete, or the dead letter then delete. When the timer
//!    fires first, the task settles the lease as expired, as core plans it; a lessee that
//!    died leaves that to SQS's visibility timeout and the receive count.
//!
//! Every change is a send followed by a delete: a crash between the two leaves a duplicate
//! copy (at least once), never a lost job.
//!
//! [`QueueConfig::plan_lease_expiry`]: purista_core::queue::QueueConfig::plan_lease_expiry
//! [`QueueConfig::plan`]: purista_core::queue::QueueConfig::plan

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::Message;
use purista_core::envelope::now_ms;
use purista_core::kit::{Claim, JobPool, LeaseCommand, LeaseHolders, PoolCounts, millis};
use purista_core::queue::{JobDisposition, LeasedJob, QueueDeclaration, QueueError};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::calls::{MAX_VISIBILITY_SECONDS, Sqs, covering_seconds, delay_seconds, receive_count};
use super::dead_jobs;
use super::record::{DeadBody, DeadRecord, JobBody, JobRecord};

/// How long a received job waits for a `lease` call after it is due, before it is put back.
pub const POOL_HOLD: Duration = Duration::from_secs(1);
/// A received job due later than this is sent on with the rest of its delay.
pub const EARLY_LIMIT_MS: u64 = 2_000;
/// The long poll of one receive (SQS counts in seconds).
const RECEIVE_WAIT_SECONDS: i32 = 1;
/// A failed receive waits this long before it reports (no hot loop while SQS is away).
const FAILED_RECEIVE_PAUSE: Duration = Duration::from_millis(200);
/// SQS's visibility must outlast the bridge's lease timer by at least this much, so that the
/// timer's settlement still holds a valid receipt.
const BROKER_MARGIN: Duration = Duration::from_secs(1);

/// What every queue task uses.
pub struct QueueLink {
    /// SQS.
    pub sqs: Sqs,
    /// Turns true at shutdown.
    pub closed: watch::Receiver<bool>,
    /// Leases handed out, by token.
    pub leases: LeaseHolders,
}

/// One declared queue on this instance: its SQS queues, the declaration in force, and the
/// messages this instance holds for it.
pub struct QueueState {
    /// The queue's name.
    pub name: String,
    /// Its SQS queue URL.
    pub url: String,
    /// Its dead-letter queue's URL.
    pub dead_url: String,
    /// The declaration in force.
    pub declaration: QueueDeclaration,
    pool: JobPool,
}

/// Counts this instance holds of one queue.
#[derive(Debug, Default, Clone, Copy)]
pub struct Held {
    /// Held and due: ready for the next lease.
    pub ready: usize,
    /// Held, not yet due.
    pub early: usize,
}

impl QueueState {
    /// The state of a newly declared queue.
    pub fn new(name: &str, url: String, dead_url: String, declaration: QueueDeclaration) -> Self {
        QueueState {
            name: name.to_string(),
            url,
            dead_url,
            declaration,
            pool: JobPool::new(),
        }
    }

    /// What this instance holds of the queue right now.
    pub fn held(&self) -> Held {
        let now = now_ms();
        let PoolCounts { ready, early } = self.pool.counts(now);
        Held { ready, early }
    }

    /// Sends `record` to the job queue, SQS delaying it for the whole seconds until it is due.
    pub async fn send_job(&self, sqs: &Sqs, record: &JobRecord) -> Result<(), QueueError> {
        let rest = Duration::from_millis(record.visible_at_ms.saturating_sub(now_ms()));
        sqs.send(&self.url, record.encode(), delay_seconds(rest))
            .await
    }

    /// Sends `dead` to the dead-letter queue.
    pub async fn send_dead(&self, sqs: &Sqs, dead: &DeadRecord) -> Result<(), QueueError> {
        sqs.send(&self.dead_url, dead.encode(), 0).await
    }
}

fn shut_down() -> QueueError {
    QueueError::Unavailable("the aws queue bridge is shut down".into())
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
        .lease(wait, &link.closed, start_receiver, shut_down)
        .await
}

/// How long a receive hides a message: the lease, the pool's wait and a margin.
pub fn receive_visibility(declaration: &QueueDeclaration) -> Duration {
    declaration.config.visibility_timeout
        + Duration::from_millis(EARLY_LIMIT_MS)
        + POOL_HOLD
        + BROKER_MARGIN
}

/// One receive task: asks SQS for a message and, when one comes, holds and leases it.
async fn receive(link: Arc<QueueLink>, queue: Arc<QueueState>) {
    let visibility = covering_seconds(receive_visibility(&queue.declaration));
    let mut closed = link.closed.clone();
    let received = tokio::select! {
        r = link.sqs.receive(&queue.url, 1, RECEIVE_WAIT_SECONDS, visibility) => r,
        _ = closed.wait_for(|c| *c) => Ok(Vec::new()),
    };
    let broker_until = Instant::now() + Duration::from_secs(u64::try_from(visibility).unwrap_or(1));
    queue.pool.receiver_ended();
    match received {
        Ok(messages) => {
            queue.pool.wake();
            for message in messages {
                hold(link.clone(), queue.clone(), message, broker_until).await;
            }
        }
        Err(error) => {
            tracing::debug!(queue = %queue.name, %error, "receiving from an SQS job queue failed");
            tokio::select! {
                () = tokio::time::sleep(FAILED_RECEIVE_PAUSE) => {}
                _ = closed.wait_for(|c| *c) => {}
            }
            queue
                .pool
                .fail(format!("SQS job queue `{}`: {error}", queue.name));
            queue.pool.wake();
        }
    }
}

/// Sends `record` as a fresh copy and deletes the received one (the copy first: a crash
/// between leaves a duplicate, never a loss).
async fn replace(
    link: &QueueLink,
    queue: &QueueState,
    receipt: &str,
    record: &JobRecord,
) -> Result<(), QueueError> {
    queue.send_job(&link.sqs, record).await?;
    link.sqs.delete(&queue.url, receipt).await
}

/// Checks a received message, holds it until claimed, then serves its lease.
async fn hold(
    link: Arc<QueueLink>,
    queue: Arc<QueueState>,
    message: Message,
    broker_until: Instant,
) {
    let Some(receipt) = message.receipt_handle().map(str::to_string) else {
        return;
    };
    let body = message.body().unwrap_or_default();
    let record = match JobRecord::decode(body) {
        Ok(r) if r.queue == queue.name => r,
        Ok(r) => {
            let reason = format!(
                "a job of queue `{}` arrived in queue `{}`",
                r.queue, queue.name
            );
            dead_jobs::poison(&link.sqs, &queue, &message, &receipt, &reason).await;
            return;
        }
        Err(error) => {
            let reason = format!("not a job: {error}");
            dead_jobs::poison(&link.sqs, &queue, &message, &receipt, &reason).await;
            return;
        }
    };
    let config = &queue.declaration.config;
    let attempt = record.attempt_at(receive_count(&message));
    let now = now_ms();
    if attempt > record.attempt {
        // Returned unsettled: the previous lease expired with its holder.
        let previous = record.leased(attempt - 1, String::new(), now);
        if let JobDisposition::DeadLetter { reason } = config.plan_lease_expiry(&previous, now) {
            let dead =
                DeadRecord::new(record.next(attempt - 1, record.visible_at_ms), &reason, now);
            if let Err(error) = dead_letter(&link, &queue, &receipt, &dead).await {
                tracing::warn!(queue = %queue.name, job_id = %record.id, %error, "a job past its budget could not be dead-lettered; SQS returns it");
            }
            return;
        }
    }
    if record.visible_at_ms > now + EARLY_LIMIT_MS {
        // Not due for a while: on with the rest of its delay, the same attempt.
        let again = record.next(attempt, record.visible_at_ms);
        if let Err(error) = replace(&link, &queue, &receipt, &again).await {
            tracing::warn!(queue = %queue.name, job_id = %record.id, %error, "a delayed job could not be sent on; SQS returns it");
        }
        return;
    }
    let claim = queue
        .pool
        .hold(record.visible_at_ms, now, POOL_HOLD, &link.closed)
        .await;
    match claim {
        Some(claim) => {
            let held = Received {
                receipt,
                record,
                attempt,
                broker_until,
            };
            serve(link, queue, held, claim).await;
        }
        None => {
            // Nobody wanted it: back as a fresh copy, so SQS's receive count does not take it
            // for an expired lease.
            let again = record.next(attempt, record.visible_at_ms);
            if let Err(error) = replace(&link, &queue, &receipt, &again).await {
                tracing::debug!(queue = %queue.name, job_id = %record.id, %error, "an unclaimed job could not be put back; SQS returns it");
            }
        }
    }
}

/// A received job on its way to a lease.
struct Received {
    receipt: String,
    record: JobRecord,
    attempt: u32,
    broker_until: Instant,
}

/// Removes a lease from the table when its task ends.
struct Registered<'a> {
    link: &'a QueueLink,
    token: String,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.link.leases.remove(&self.token);
    }
}

/// Makes SQS hide the job until `until` plus the margin; returns SQS's new end.
async fn cover(
    link: &QueueLink,
    queue: &QueueState,
    receipt: &str,
    until: Instant,
) -> Result<Instant, QueueError> {
    let now = Instant::now();
    let needed = until.saturating_duration_since(now) + BROKER_MARGIN;
    if needed > Duration::from_secs(MAX_VISIBILITY_SECONDS) {
        return Err(QueueError::InvalidRequest(format!(
            "a lease of {} s: SQS hides a message for at most {MAX_VISIBILITY_SECONDS} s",
            needed.as_secs()
        )));
    }
    let seconds = covering_seconds(needed);
    link.sqs
        .change_visibility(&queue.url, receipt, seconds)
        .await?;
    Ok(now + Duration::from_secs(u64::try_from(seconds).unwrap_or(1)))
}

async fn serve(link: Arc<QueueLink>, queue: Arc<QueueState>, held: Received, claim: Claim) {
    let Received {
        receipt,
        record,
        attempt,
        mut broker_until,
    } = held;
    let config = queue.declaration.config.clone();
    let token = purista_core::ids::new_id();
    let mut deadline = Instant::now() + config.visibility_timeout;
    let mut expires_at_ms = now_ms() + millis(config.visibility_timeout);
    if deadline + BROKER_MARGIN > broker_until {
        match cover(&link, &queue, &receipt, deadline).await {
            Ok(until) => broker_until = until,
            Err(error) => {
                let _ = claim.send(Err(QueueError::Unavailable(format!(
                    "SQS did not keep the job hidden for its lease: {error}"
                ))));
                return;
            }
        }
    }
    let (tx, mut rx) = mpsc::channel(4);
    link.leases.insert(token.clone(), tx);
    let registered = Registered {
        link: &link,
        token: token.clone(),
    };
    let mut job = record.leased(attempt, token, expires_at_ms);
    if claim.send(Ok(job.clone())).is_err() {
        // The lease call went away before it got the job: back, not an attempt.
        drop(registered);
        let again = record.next(attempt, record.visible_at_ms);
        let _ = replace(&link, &queue, &receipt, &again).await;
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
        // A command that comes after the deadline finds the lease expired, as the timer would.
        let event = match event {
            Event::Command(Some(command)) if Instant::now() >= deadline => {
                let lost = QueueError::LeaseLost {
                    job_id: job.id.clone(),
                    lease_token: job.lease_token.clone(),
                };
                match command {
                    LeaseCommand::Extend { reply, .. } => {
                        let _ = reply.send(Err(lost));
                    }
                    LeaseCommand::Settle { reply, .. } => {
                        let _ = reply.send(Err(lost));
                    }
                }
                Event::Expired
            }
            other => other,
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
                if until + BROKER_MARGIN > broker_until {
                    match cover(&link, &queue, &receipt, until).await {
                        Ok(end) => broker_until = end,
                        Err(error) => {
                            // The lease as it was still holds; only the extension failed.
                            let _ = reply.send(Err(error));
                            continue;
                        }
                    }
                }
                expires_at_ms = expires_at_ms.max(now_ms() + millis(by));
                deadline = until;
                job.extensions += 1;
                job.lease_expires_at_ms = expires_at_ms;
                let _ = reply.send(Ok(expires_at_ms));
            }
            Event::Command(Some(LeaseCommand::Settle { settlement, reply })) => {
                let disposition = config.plan(&job, &settlement, now_ms());
                let done = carry_out(&link, &queue, &receipt, &record, &job, disposition).await;
                // Off the books before the caller hears of it: metrics read right after a
                // settlement must not count the lease.
                drop(registered);
                let _ = reply.send(done);
                return;
            }
            Event::Command(None) | Event::Closing => return,
            Event::Expired => {
                drop(registered);
                let disposition = config.plan_lease_expiry(&job, now_ms());
                if let Err(error) =
                    carry_out(&link, &queue, &receipt, &record, &job, disposition).await
                {
                    tracing::warn!(queue = %queue.name, job_id = %job.id, %error, "an expired lease could not be settled; SQS returns the job");
                }
                return;
            }
        }
    }
}

/// Sends `dead` to the dead-letter queue and deletes the received copy.
async fn dead_letter(
    link: &QueueLink,
    queue: &QueueState,
    receipt: &str,
    dead: &DeadRecord,
) -> Result<(), QueueError> {
    queue.send_dead(&link.sqs, dead).await?;
    link.sqs.delete(&queue.url, receipt).await
}

/// Carries out core's plan for one leased job.
async fn carry_out(
    link: &QueueLink,
    queue: &QueueState,
    receipt: &str,
    record: &JobRecord,
    job: &LeasedJob,
    disposition: JobDisposition,
) -> Result<(), QueueError> {
    let now = now_ms();
    match disposition {
        JobDisposition::Complete => link.sqs.delete(&queue.url, receipt).await,
        JobDisposition::RetryAfter { delay, .. } => {
            let next = record.next(job.attempt + 1, now + millis(delay));
            replace(link, queue, receipt, &next).await
        }
        JobDisposition::DeadLetter { reason } => {
            let dead =
                DeadRecord::new(record.next(job.attempt, record.visible_at_ms), &reason, now);
            dead_letter(link, queue, receipt, &dead).await
        }
    }
}
