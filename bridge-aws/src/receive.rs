//! The receive loop every queue consumer runs (commands, replies, subscriptions): SQS long
//! polling for as many messages as the consumer has free handler slots (at most 10 per call),
//! each message handed over with its slot. It stops at once when told (an open long poll is
//! abandoned, its messages reappear after their visibility timeout), waits while paused, and
//! backs off after failed calls (no hot loop against an AWS that throttles or is away).
//!
//! On subscription queues ([`Pace::AfterSettle`]), after a receive that brought messages, the
//! next one waits until those messages are settled (at most [`SETTLE_GRACE`]), as a consumer
//! that receives, handles and deletes in turn does: a receive sent while the last batch's
//! deletes are still out finds the queue nearly empty and brings one message, so quick
//! handlers paid a receive and a delete call per message (twice the calls, and AWS bills per
//! call). A slow handler holds the next receive up for the grace only, so the free slots are
//! still filled. Command and reply queues are on a waiting caller's clock ([`Pace::Eager`]):
//! they receive again at once.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName};
use purista_core::kit::broker_call;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

use crate::client::sdk_error;
use crate::shared::Shared;

/// Most messages SQS hands out per receive.
const MAX_PER_RECEIVE: usize = 10;
/// Backoff after a failed receive: from this…
const BACKOFF_START: Duration = Duration::from_millis(100);
/// …doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest a receive waits for the messages of the one before to be settled.
pub const SETTLE_GRACE: Duration = Duration::from_millis(50);

/// When a receive loop sends its next receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// As soon as a handler slot is free.
    Eager,
    /// Once the last receive's messages are settled or [`SETTLE_GRACE`] after they were handed
    /// out, whichever comes first, and a handler slot is free.
    AfterSettle,
}

/// A received message's handler slot: drop it when the message is settled. The last slot of a
/// receive's batch to go tells the receive loop that the batch is done.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    _batch: Arc<oneshot::Sender<()>>,
}

/// What a receive loop hands a message to, with its slot.
pub type OnMessage = Arc<dyn Fn(Message, Slot) + Send + Sync>;

/// Runs until `stop` turns true. `up` says whether the last receive worked.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    shared: Arc<Shared>,
    url: String,
    label: String,
    slots: Arc<Semaphore>,
    on_message: OnMessage,
    mut paused: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    up: watch::Sender<bool>,
    pace: Pace,
) {
    let mut backoff = BACKOFF_START;
    let mut failing = false;
    let wait = i32::from(shared.config.wait_seconds);
    // Resolves when every slot of the last receive's batch was dropped.
    let mut last_batch: Option<oneshot::Receiver<()>> = None;
    loop {
        if let Some(done) = last_batch.take() {
            tokio::select! {
                _ = tokio::time::timeout(SETTLE_GRACE, done) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        if *stop.borrow() {
            return;
        }
        if *paused.borrow() {
            tokio::select! {
                _ = paused.wait_for(|p| !*p) => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut permits = vec![first];
        while permits.len() < MAX_PER_RECEIVE {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let call = shared
            .clients
            .sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(i32::try_from(permits.len()).unwrap_or(1))
            .wait_time_seconds(wait)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send();
        let deadline =
            shared.config.call_timeout + Duration::from_secs(u64::from(shared.config.wait_seconds));
        // Not abandoned when told to stop: SQS may already have handed out messages, which
        // are released below instead of staying invisible for their visibility timeout.
        let received = broker_call(deadline, "ReceiveMessage", async {
            call.await
                .map_err(|e| sdk_error(&format!("receiving from {label}"), e))
        })
        .await;
        match received {
            Ok(out) => {
                if failing {
                    failing = false;
                    shared.count_reconnect();
                    tracing::info!(queue = %label, "receiving again");
                }
                let _ = up.send(true);
                backoff = BACKOFF_START;
                let messages = out.messages.unwrap_or_default();
                if *stop.borrow() || *paused.borrow() {
                    release(&shared, &url, &messages).await;
                    continue;
                }
                if messages.is_empty() {
                    continue;
                }
                let (batch, done) = oneshot::channel();
                let batch = Arc::new(batch);
                if pace == Pace::AfterSettle {
                    last_batch = Some(done);
                }
                for message in messages {
                    match permits.pop() {
                        Some(permit) => on_message(
                            message,
                            Slot {
                                _permit: permit,
                                _batch: batch.clone(),
                            },
                        ),
                        // SQS never hands out more than asked; if it did, the message
                        // reappears after its visibility timeout.
                        None => break,
                    }
                }
            }
            Err(error) => {
                if *paused.borrow() || *stop.borrow() {
                    continue;
                }
                if !failing {
                    tracing::warn!(queue = %label, %error, "receiving failed; retrying with backoff");
                }
                failing = true;
                let _ = up.send(false);
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// The attempt a message is on: its `purista-attempt` attribute (1 when absent) plus the
/// times SQS delivered this copy before.
pub fn attempt_of(message: &Message) -> u32 {
    let base = string_attribute(message, crate::shared::ATTR_ATTEMPT)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let received = message
        .attributes
        .as_ref()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    base.saturating_add(received - 1)
}

/// A string message attribute.
pub fn string_attribute<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message
        .message_attributes
        .as_ref()
        .and_then(|a| a.get(name))
        .and_then(|v| v.string_value())
}

/// Deletes a message (its receipt); batched with others of the queue.
pub async fn delete(
    shared: &Shared,
    url: &str,
    message: &Message,
) -> Result<(), purista_core::BridgeError> {
    match message.receipt_handle() {
        Some(receipt) => shared.delete(url, receipt).await,
        None => Ok(()),
    }
}

/// Makes messages visible again at once (received but not to be handled here).
pub async fn release(shared: &Shared, url: &str, messages: &[Message]) {
    let entries: Vec<_> = messages
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .set_receipt_handle(m.receipt_handle().map(str::to_string))
                .visibility_timeout(0)
                .build()
                .ok()
        })
        .collect();
    if entries.is_empty() {
        return;
    }
    let call = shared
        .clients
        .sqs
        .change_message_visibility_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send();
    if let Err(error) = broker_call(
        shared.config.call_timeout,
        "ChangeMessageVisibilityBatch",
        async {
            call.await
                .map(|_| ())
                .map_err(|e| sdk_error("releasing messages", e))
        },
    )
    .await
    {
        tracing::debug!(%error, "received messages could not be released; they reappear after their visibility timeout");
    }
}

/// A string message attribute value.
pub fn attr(
    value: impl Into<String>,
) -> Result<aws_sdk_sqs::types::MessageAttributeValue, purista_core::BridgeError> {
    aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| purista_core::BridgeError::InvalidRequest(format!("message attribute: {e}")))
}
