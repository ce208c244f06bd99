//! The dead-letter queue of a job queue (`<queue>.dead-letter` unless configured): an SQS
//! queue whose messages are [`DeadRecord`]s — the job as last leased, the reason, the time —
//! and, for messages that were no job at all, the body as it came with the reason and time as
//! message attributes.
//!
//! Inspect, replay and purge read the whole dead-letter queue (hiding what they read for a
//! moment, so that every message is seen once; a one-second long poll, since a short poll of
//! real SQS may miss messages), sort what belongs to the queue oldest first,
//! act, and make the rest visible again. A replay sends the job back with a fresh attempt
//! budget before deleting its dead letter: a crash between leaves a duplicate, never a loss.
//! Messages that were no job cannot be replayed; purge removes them.

use std::collections::HashSet;

use aws_sdk_sqs::types::Message;
use purista_core::envelope::now_ms;
use purista_core::queue::{DeadLetteredJob, QueueError};
use serde_json::Value;

use super::calls::Sqs;
use super::lease::QueueState;
use super::record::{DeadBody, DeadRecord, MAX_REASON_BYTES, cut};
use crate::receive::string_attribute;
use crate::subscriptions::{ATTR_AT, ATTR_REASON};

/// Message attribute of a dead letter that is no job: the job queue it arrived in.
pub const ATTR_QUEUE: &str = "purista-queue";
/// How many dead letters one inspect, replay or purge reads at most.
pub const MAX_READ: usize = 10_000;
/// How long a read hides the dead letters it has seen (released at the end).
const READ_VISIBILITY: i32 = 30;

/// A message that is no job of `queue`: to its dead-letter queue with `reason`, then deleted.
/// When SQS refuses the dead letter (a body at SQS's limit has no room for the reason), the
/// message is dropped. Either way with one warning.
pub async fn poison(sqs: &Sqs, queue: &QueueState, message: &Message, receipt: &str, reason: &str) {
    let body = message.body().unwrap_or_default().to_string();
    let bytes = body.len();
    let message_id = message.message_id().unwrap_or_default();
    let attributes = [
        (ATTR_REASON, cut(reason, MAX_REASON_BYTES)),
        (ATTR_AT, now_ms().to_string()),
        (ATTR_QUEUE, queue.name.clone()),
    ];
    match sqs
        .send_with_attributes(&queue.dead_url, body, &attributes)
        .await
    {
        Ok(()) => {
            tracing::warn!(queue = %queue.name, %message_id, bytes, %reason, "a message in a job queue is no job: moved to the dead-letter queue");
        }
        Err(error) => {
            tracing::warn!(queue = %queue.name, %message_id, bytes, %reason, %error, "a message in a job queue is no job and could not be dead-lettered: dropped");
        }
    }
    if let Err(error) = sqs.delete(&queue.url, receipt).await {
        tracing::debug!(queue = %queue.name, %message_id, %error, "a message that is no job could not be deleted; SQS returns it");
    }
}

/// One message of a dead-letter queue, read.
struct Entry {
    receipt: String,
    /// The dead letter as core reports it.
    dead: DeadLetteredJob,
    /// The job, when it is one (replayable).
    record: Option<DeadRecord>,
}

fn entry(queue: &QueueState, message: &Message) -> Option<Entry> {
    let receipt = message.receipt_handle()?.to_string();
    let body = message.body().unwrap_or_default();
    if let Some(record) = DeadRecord::decode(body) {
        if record.job.queue != queue.name {
            return None;
        }
        return Some(Entry {
            receipt,
            dead: record.to_dead_lettered(),
            record: Some(record),
        });
    }
    if string_attribute(message, ATTR_QUEUE) != Some(queue.name.as_str()) {
        return None;
    }
    // No job: shown with the SQS message id, the body as payload (JSON when it is JSON).
    let payload =
        serde_json::from_str::<Value>(body).unwrap_or_else(|_| Value::String(body.to_string()));
    let at = string_attribute(message, ATTR_AT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let job = super::record::JobRecord {
        id: message.message_id().unwrap_or_default().to_string(),
        queue: queue.name.clone(),
        payload,
        parameter: Value::Null,
        attempt: 0,
        enqueued_at_ms: at,
        visible_at_ms: at,
        idempotency_key: None,
        trace_id: None,
        otp: None,
        principal_id: None,
        tenant_id: None,
        max_attempts: None,
    };
    Some(Entry {
        receipt,
        dead: DeadLetteredJob {
            job: job.leased(0, String::new(), 0),
            reason: string_attribute(message, ATTR_REASON)
                .unwrap_or_default()
                .to_string(),
            dead_lettered_at_ms: at,
        },
        record: None,
    })
}

/// Reads the dead-letter queue: this queue's entries oldest first, and the receipts of the
/// others (to release).
async fn read_all(sqs: &Sqs, queue: &QueueState) -> Result<(Vec<Entry>, Vec<String>), QueueError> {
    let mut seen = HashSet::new();
    let mut mine = Vec::new();
    let mut others = Vec::new();
    while seen.len() < MAX_READ {
        let batch = match sqs.receive(&queue.dead_url, 10, 1, READ_VISIBILITY).await {
            Ok(batch) => batch,
            Err(error) => {
                let read: Vec<String> = mine.into_iter().map(|e: Entry| e.receipt).collect();
                sqs.release(&queue.dead_url, &read).await;
                sqs.release(&queue.dead_url, &others).await;
                return Err(error);
            }
        };
        if batch.is_empty() {
            break;
        }
        for message in batch {
            let id = message.message_id().unwrap_or_default().to_string();
            if !seen.insert(id) {
                continue;
            }
            match entry(queue, &message) {
                Some(e) => mine.push(e),
                None => others.extend(message.receipt_handle().map(str::to_string)),
            }
        }
    }
    mine.sort_by_key(|e| e.dead.dead_lettered_at_ms);
    Ok((mine, others))
}

/// Up to `limit` dead letters of `queue`, oldest first, left in place.
pub async fn inspect(
    sqs: &Sqs,
    queue: &QueueState,
    limit: usize,
) -> Result<Vec<DeadLetteredJob>, QueueError> {
    let (mine, mut others) = read_all(sqs, queue).await?;
    let mut listed = Vec::new();
    for e in mine {
        if listed.len() < limit {
            listed.push(e.dead);
        }
        others.push(e.receipt);
    }
    sqs.release(&queue.dead_url, &others).await;
    Ok(listed)
}

/// Sends the dead jobs of `queue` (those in `ids`, or all) back to it with a fresh attempt
/// budget; returns how many moved. Dead letters that are no job stay.
pub async fn replay(
    sqs: &Sqs,
    queue: &QueueState,
    ids: Option<Vec<String>>,
) -> Result<usize, QueueError> {
    let wanted: Option<HashSet<String>> = ids.map(|ids| ids.into_iter().collect());
    let (mine, mut others) = read_all(sqs, queue).await?;
    let mut moved = 0;
    let mut failure = None;
    for e in mine {
        let chosen = e
            .record
            .as_ref()
            .filter(|r| wanted.as_ref().is_none_or(|w| w.contains(&r.job.id)));
        let Some(record) = chosen.filter(|_| failure.is_none()) else {
            others.push(e.receipt);
            continue;
        };
        let again = record.job.replayed(now_ms());
        match queue.send_job(sqs, &again).await {
            Ok(()) => {
                moved += 1;
                if let Err(error) = sqs.delete(&queue.dead_url, &e.receipt).await {
                    tracing::warn!(queue = %queue.name, job_id = %record.job.id, %error, "a replayed dead letter could not be deleted; it stays as a duplicate");
                }
            }
            Err(error) => {
                others.push(e.receipt);
                failure = Some(error);
            }
        }
    }
    sqs.release(&queue.dead_url, &others).await;
    match failure {
        Some(error) if moved == 0 => Err(error),
        _ => Ok(moved),
    }
}

/// Deletes every dead letter of `queue`; returns how many.
pub async fn purge(sqs: &Sqs, queue: &QueueState) -> Result<usize, QueueError> {
    let (mine, others) = read_all(sqs, queue).await?;
    sqs.release(&queue.dead_url, &others).await;
    let mut deleted = 0;
    for e in mine {
        sqs.delete(&queue.dead_url, &e.receipt).await?;
        deleted += 1;
    }
    Ok(deleted)
}
