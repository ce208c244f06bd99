//! A queue's dead letters: messages on its dead-letter queue's KubeMQ channel, each a
//! [`DeadRecord`] (the job intact, reason, time). Queues may share a dead-letter queue, so
//! every operation looks only at the records of its own queue.
//!
//! * **inspect** peeks (nothing is taken), oldest first;
//! * **replay** takes the dead-letter queue's messages one lease at a time, puts the chosen
//!   jobs back into their queue with a fresh attempt budget and acks each only once it is back
//!   (a crash in between leaves a duplicate, never a loss); the others are handed back
//!   untouched;
//! * **purge** does the same without putting anything back.

use std::collections::HashSet;
use std::time::Duration;

use kubemq::proto::kubemq::ReceiveQueueMessagesRequest;
use purista_core::envelope::now_ms;
use purista_core::queue::{DeadLetteredJob, QueueError};

use super::lease::{MAX_RECEIVES, QueueState};
use super::record::{DeadBody, DeadRecord};
use super::stream::LeaseStream;
use crate::connection::RawClient;

/// KubeMQ's most messages per read (`MaxNumberOfMessages`).
pub const MAX_READ: i32 = 1024;
/// KubeMQ's shortest wait.
const READ_WAIT_SECONDS: i32 = 1;
/// How long a dead letter is held while replay or purge looks at the others.
const HOLD_SECONDS: i32 = 60;

/// The reason of a job KubeMQ itself moved to the dead-letter queue.
fn rerouted_reason() -> String {
    format!("KubeMQ re-routed the job after {MAX_RECEIVES} receives without a settlement")
}

/// Every message of `channel` that can be read without taking it (ready, not held), oldest
/// first, at most [`MAX_READ`].
pub async fn peek(
    mut raw: RawClient,
    client_id: &str,
    channel: &str,
    timeout: Duration,
) -> Result<Vec<kubemq::proto::kubemq::QueueMessage>, QueueError> {
    let request = ReceiveQueueMessagesRequest {
        request_id: purista_core::ids::new_id(),
        client_id: client_id.to_string(),
        channel: channel.to_string(),
        max_number_of_messages: MAX_READ,
        wait_time_seconds: READ_WAIT_SECONDS,
        is_peak: true,
    };
    let wait = timeout + Duration::from_secs(READ_WAIT_SECONDS as u64);
    let answer = tokio::time::timeout(wait, raw.receive_queue_messages(request))
        .await
        .map_err(|_| {
            QueueError::Unavailable(format!("KubeMQ did not answer a peek of `{channel}`"))
        })?
        .map_err(|s| QueueError::Unavailable(format!("peeking `{channel}`: {}", s.message())))?
        .into_inner();
    if answer.is_error {
        return Err(QueueError::Broker(format!(
            "peeking `{channel}`: {}",
            answer.error
        )));
    }
    Ok(answer.messages)
}

/// The dead letters of `queue` that a peek sees, oldest first.
pub async fn records(
    raw: RawClient,
    client_id: &str,
    queue: &QueueState,
    timeout: Duration,
) -> Result<Vec<DeadRecord>, QueueError> {
    let messages = peek(raw, client_id, &queue.dead_letter_channel, timeout).await?;
    let reason = rerouted_reason();
    Ok(messages
        .iter()
        .filter_map(|m| DeadRecord::decode(&m.body, &reason))
        .filter(|d| d.job.queue == queue.name)
        .collect())
}

/// Up to `limit` dead letters of `queue`.
pub async fn inspect(
    raw: RawClient,
    client_id: &str,
    queue: &QueueState,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<DeadLetteredJob>, QueueError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    Ok(records(raw, client_id, queue, timeout)
        .await?
        .iter()
        .take(limit)
        .map(DeadRecord::to_dead_lettered)
        .collect())
}

/// Takes the dead letters of `queue` (those in `ids`, or all): back into the queue when
/// `replay`, else removed. Returns how many.
///
/// Each dead letter is taken on a lease stream of its own ([`LeaseStream`]) and settled
/// there with a confirmation: a replayed one is acked only once its job is back in the queue.
/// The ones left alone are held until the end (so the next receive reaches past them) and
/// then handed back unchanged.
pub async fn take(
    raw: &RawClient,
    client_id: &str,
    queue: &QueueState,
    ids: Option<Vec<String>>,
    replay: bool,
    timeout: Duration,
) -> Result<usize, QueueError> {
    let ids: Option<HashSet<String>> = ids.map(|v| v.into_iter().collect());
    // How many there are now: taking stops there instead of waiting for more.
    let present = peek(raw.clone(), client_id, &queue.dead_letter_channel, timeout)
        .await?
        .len();
    let reason = rerouted_reason();
    let mut count = 0;
    let mut failure = None;
    let mut left = Vec::new();
    for _ in 0..present {
        let received = tokio::time::timeout(
            timeout + Duration::from_secs(READ_WAIT_SECONDS as u64),
            LeaseStream::receive(
                raw.clone(),
                client_id,
                &queue.dead_letter_channel,
                HOLD_SECONDS,
                READ_WAIT_SECONDS,
            ),
        )
        .await
        .map_err(|_| QueueError::Unavailable("KubeMQ did not hand out a dead letter".into()))?
        .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        let Some((mut stream, message)) = received else {
            break;
        };
        let sequence = message.attributes.as_ref().map_or(0, |a| a.sequence);
        let chosen = DeadRecord::decode(&message.body, &reason).filter(|d| {
            d.job.queue == queue.name && ids.as_ref().is_none_or(|ids| ids.contains(&d.job.id))
        });
        let Some(dead) = chosen else {
            left.push((stream, sequence));
            continue;
        };
        if replay {
            let record = dead.job.replayed(now_ms());
            let message = queue.job_message(client_id, &record, Duration::ZERO);
            if let Err(e) = send(raw.clone(), message, timeout).await {
                failure = Some(e);
                left.push((stream, sequence));
                continue;
            }
        }
        match tokio::time::timeout(timeout, stream.ack(sequence)).await {
            Ok(Ok(())) => count += 1,
            _ => {
                tracing::warn!(queue = %queue.name, job_id = %dead.job.id, "a dead letter could not be removed (a replayed one stays as a duplicate)");
            }
        }
    }
    for (mut stream, sequence) in left {
        let _ = tokio::time::timeout(timeout, stream.resend(sequence, &queue.dead_letter_channel))
            .await;
    }
    match failure {
        Some(e) if count == 0 => Err(e),
        _ => Ok(count),
    }
}

/// Sends one queue message on the generated client; `Err` when KubeMQ refused it.
pub async fn send(
    mut raw: RawClient,
    message: kubemq::proto::kubemq::QueueMessage,
    timeout: Duration,
) -> Result<(), QueueError> {
    let result = tokio::time::timeout(timeout, raw.send_queue_message(message))
        .await
        .map_err(|_| QueueError::Unavailable("KubeMQ did not take the job in time".into()))?
        .map_err(|s| QueueError::Unavailable(format!("sending a job to KubeMQ: {}", s.message())))?
        .into_inner();
    if result.is_error {
        return Err(QueueError::Broker(format!(
            "KubeMQ refused the job: {}",
            result.error
        )));
    }
    Ok(())
}
