//! Dead-letter targets are KubeMQ queues (`<prefix>.dl.<target>`): durable, outside every
//! consumer, each message the envelope's bytes intact with reason, attempts, origin and time
//! as tags. Inspect peeks (nothing is taken), purge acks all, replay takes messages in a
//! queue transaction and hands each to its subscription's consumer on this instance as
//! attempt 1; a dead letter is acked only once it is back, so a crash in between leaves a
//! duplicate, never a loss.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kubemq::{AckAllQueueMessagesRequest, PollRequest};
use purista_core::kit;
use purista_core::{
    BridgeError, DeadLetterEntry, DeadLetterNote, Envelope, LeftDeadLetter, NotReplayed,
    RegistrationKey, ReplayReport,
};

use crate::connection::sdk_error;
use crate::durable::DurableConsumer;
use crate::shared::Shared;
use crate::subscriptions::{Consumer, TAG_AT, TAG_ATTEMPTS, TAG_ORIGIN, TAG_REASON};

/// How long a dead-letter read waits for messages (KubeMQ's least: one second).
const READ_WAIT_SECONDS: i32 = 1;

fn note_of(target: &str, tags: &HashMap<String, String>) -> DeadLetterNote {
    DeadLetterNote {
        target: target.to_string(),
        reason: tags.get(TAG_REASON).cloned().unwrap_or_default(),
        attempts: tags
            .get(TAG_ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        origin: tags.get(TAG_ORIGIN).cloned().unwrap_or_default(),
    }
}

/// Up to `limit` dead letters of `target`, oldest first, none taken.
pub async fn inspect(
    shared: &Shared,
    target: &str,
    limit: usize,
) -> Result<Vec<DeadLetterEntry>, BridgeError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let channel = shared.channels.dead_letter(target);
    let sdk = &shared.connection.sdk;
    let max = i32::try_from(limit).unwrap_or(i32::MAX);
    let messages = kit::broker_call(
        shared.config.publish_timeout,
        "reading dead letters",
        async {
            sdk.receive_queue_messages(&channel, max, READ_WAIT_SECONDS, true)
                .await
                .map_err(|e| sdk_error("reading dead letters from KubeMQ", e))
        },
    )
    .await?;
    Ok(messages
        .into_iter()
        .map(|m| {
            let decoded = Envelope::decode(&m.body).ok();
            DeadLetterEntry {
                note: note_of(target, &m.tags),
                raw: decoded.is_none().then(|| m.body.clone()),
                envelope: decoded,
                dead_lettered_at: m.tags.get(TAG_AT).and_then(|t| t.parse().ok()).unwrap_or(0),
            }
        })
        .collect())
}

/// Removes every dead letter of `target`.
pub async fn purge(shared: &Shared, target: &str) -> Result<usize, BridgeError> {
    let request = AckAllQueueMessagesRequest {
        request_id: String::new(),
        client_id: shared.connection.client_id.clone(),
        channel: shared.channels.dead_letter(target),
        wait_time_seconds: READ_WAIT_SECONDS,
    };
    let sdk = &shared.connection.sdk;
    let response = kit::broker_call(
        shared.config.publish_timeout,
        "purging dead letters",
        async {
            sdk.ack_all_queue_messages(&request)
                .await
                .map_err(|e| sdk_error("purging dead letters in KubeMQ", e))
        },
    )
    .await?;
    if response.is_error {
        return Err(BridgeError::Broker(response.error));
    }
    Ok(usize::try_from(response.affected_messages).unwrap_or(usize::MAX))
}

/// Hands up to `limit` dead letters of `target` back to their subscriptions on this instance.
pub async fn replay(
    shared: &Shared,
    consumers: &HashMap<RegistrationKey, Arc<Consumer>>,
    durables: &HashMap<RegistrationKey, Arc<DurableConsumer>>,
    target: &str,
    limit: usize,
) -> Result<ReplayReport, BridgeError> {
    let mut report = ReplayReport::default();
    if limit == 0 {
        return Ok(report);
    }
    let sdk = &shared.connection.sdk;
    let request = PollRequest {
        channel: shared.channels.dead_letter(target),
        max_items: i32::try_from(limit).unwrap_or(i32::MAX),
        wait_timeout_seconds: READ_WAIT_SECONDS,
        auto_ack: false,
    };
    let wait = shared.config.publish_timeout + Duration::from_secs(READ_WAIT_SECONDS as u64);
    let (polled, receiver) = kit::broker_call(wait, "taking dead letters", async {
        sdk.poll_queue(request)
            .await
            .map_err(|e| sdk_error("taking dead letters from KubeMQ", e))
    })
    .await?;
    for m in &polled.messages {
        let note = note_of(target, &m.message.tags);
        let envelope = match Envelope::decode(&m.message.body) {
            Ok(e) => e,
            Err(_) => {
                report.left.push(LeftDeadLetter {
                    message_id: Some(m.message.id.clone()),
                    reason: NotReplayed::Undecodable,
                });
                let _ = m.nack().await;
                continue;
            }
        };
        let left = if note.origin.is_empty() {
            Some(NotReplayed::UnknownSource)
        } else {
            let origin = RegistrationKey::from(note.origin.as_str());
            match (consumers.get(&origin), durables.get(&origin)) {
                (Some(consumer), _) => match consumer.hand_in(envelope.clone()).await {
                    true => None,
                    false => Some(NotReplayed::Refused {
                        source: note.origin.clone(),
                    }),
                },
                // A durable subscription's: into its queue, for any of its instances.
                (None, Some(durable)) => match durable.hand_in(&envelope).await {
                    Ok(()) => None,
                    Err(_) => Some(NotReplayed::Refused {
                        source: note.origin.clone(),
                    }),
                },
                (None, None) => Some(NotReplayed::SourceGone {
                    source: note.origin.clone(),
                }),
            }
        };
        match left {
            None => match m.ack().await {
                Ok(()) => report.replayed += 1,
                Err(error) => {
                    tracing::warn!(%error, message_id = %envelope.id, "a replayed dead letter could not be removed: it stays (a duplicate, not a loss)");
                }
            },
            Some(reason) => {
                let _ = m.nack().await;
                report.left.push(LeftDeadLetter {
                    message_id: Some(envelope.id.clone()),
                    reason,
                });
            }
        }
    }
    let _ = receiver.close().await;
    Ok(report)
}
