//! Dead-letter queues for operators: inspect, replay, purge.
//!
//! **Inspect** reads messages with `basic.get` on a channel of its own without acking them:
//! closing the channel returns every one to the queue, in order.
//!
//! **Replay**: each message goes back to the subscription queue it was dead-lettered from,
//! with a fresh retry budget. The dead-letter path records the source queue in
//! `x-purista-dead-letter-queue` (`settle.rs`). A replay reads the dead-letter queue with `basic.get` on a channel of its
//! own and, for each message, publishes a copy straight to that queue through the default
//! exchange (never through the headers exchange, which would hand it to every other matching
//! subscription again), `mandatory` and confirmed. The copy keeps body, ids, properties and
//! the header projection but sheds `x-purista-attempt` and the `x-purista-dead-letter-*`
//! notes, so the subscription sees attempt 1 again.
//!
//! Only a confirmed copy gets its original acked: a crash in between leaves the message in the
//! dead-letter queue and its copy in the subscription queue, a duplicate rather than a loss.
//! Whatever is not replayed stays unacknowledged on the replay channel until the end, so the
//! same call never fetches it twice, and closing the channel returns it to the dead-letter
//! queue in its place.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use purista_core::{
    BridgeError, DeadLetterEntry, DeadLetterNote, Envelope, LeftDeadLetter, NotReplayed,
    ReplayReport,
};

use crate::headers;
use crate::publish::{self, Outgoing, Verdict};
use crate::session::Session;
use crate::topology::{self, Topology, name};

/// Reads up to `limit` messages of a dead-letter queue without removing them: they are fetched
/// unacknowledged and go back to the queue, in order, when the channel closes.
pub(crate) async fn peek(
    session: &Session,
    queue: &str,
    target: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<DeadLetterEntry>, BridgeError> {
    let channel = session.new_channel().await?;
    let read = session
        .call(
            "reading dead letters",
            peek_on(&channel, queue, target, limit, max_bytes),
        )
        .await;
    // Closing the channel returns every fetched message to the queue.
    if channel.status().connected() {
        let _ = session
            .call("closing a channel", async {
                let _ = channel.close(200, "OK".into()).await;
                Ok(())
            })
            .await;
    }
    read
}

async fn peek_on(
    channel: &Channel,
    queue: &str,
    target: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<DeadLetterEntry>, BridgeError> {
    let exists = channel
        .queue_declare(
            name(queue)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let mut entries = Vec::new();
    if !exists {
        return Ok(entries);
    }
    while entries.len() < limit {
        let message = channel
            .basic_get(name(queue)?, BasicGetOptions::default())
            .await
            .map_err(|e| topology::broker_error("reading", queue, &e))?;
        let Some(message) = message else { break };
        let delivery = message.delivery;
        let table = delivery.properties.headers().as_ref();
        let note = DeadLetterNote {
            target: target.to_string(),
            reason: headers::get_str(table, headers::DEAD_LETTER_REASON)
                .unwrap_or("")
                .to_string(),
            attempts: headers::get_u64(table, headers::DEAD_LETTER_ATTEMPTS)
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0),
            origin: headers::get_str(table, headers::DEAD_LETTER_ORIGIN)
                .unwrap_or("")
                .to_string(),
        };
        let dead_lettered_at = headers::get_u64(table, headers::DEAD_LETTERED_AT).unwrap_or(0);
        let (envelope, raw) = match Envelope::decode_with_limit(&delivery.data, max_bytes) {
            Ok(envelope) => (Some(envelope), None),
            Err(_) => (None, Some(delivery.data.clone())),
        };
        entries.push(DeadLetterEntry {
            note,
            envelope,
            raw,
            dead_lettered_at,
        });
    }
    Ok(entries)
}

/// Deletes every message of the dead-letter queue `queue`; a missing queue purges nothing.
pub(crate) async fn purge(session: &Session, queue: &str) -> Result<usize, BridgeError> {
    topology::purge_queue(&session.connection, queue, session.timeout).await
}

/// Replays up to `limit` messages of the dead-letter queue `queue` (see the module docs).
pub(crate) async fn replay(
    session: &Session,
    topology: &Topology,
    queue: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<ReplayReport, BridgeError> {
    let queue_name = name(queue)?;
    let channel = session.new_channel().await?;
    let result = replay_on(session, topology, &channel, queue, limit, max_bytes).await;
    // Returns everything fetched but not acked to the dead-letter queue.
    if channel.status().connected() {
        let _ = session
            .call("closing a channel", async {
                let _ = channel.close(200, "OK".into()).await;
                Ok(())
            })
            .await;
    }
    let report = result?;
    tracing::info!(queue = %queue_name, replayed = report.replayed, left = report.left.len(), "dead letters replayed");
    Ok(report)
}

async fn replay_on(
    session: &Session,
    topology: &Topology,
    channel: &Channel,
    queue: &str,
    limit: usize,
    max_bytes: usize,
) -> Result<ReplayReport, BridgeError> {
    let mut report = ReplayReport::default();
    let exists = session
        .call("looking up a dead-letter queue", async {
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            Ok(channel
                .queue_declare(name(queue)?, passive, FieldTable::default())
                .await
                .is_ok())
        })
        .await?;
    if !exists {
        return Ok(report);
    }
    let mut taken = 0;
    while taken < limit {
        let message = session
            .call("reading a dead letter", async {
                channel
                    .basic_get(name(queue)?, BasicGetOptions::default())
                    .await
                    .map_err(|e| topology::broker_error("reading", queue, &e))
            })
            .await?;
        let Some(message) = message else { break };
        taken += 1;
        let delivery = message.delivery;
        let envelope = Envelope::decode_with_limit(&delivery.data, max_bytes).ok();
        let message_id = match &envelope {
            Some(envelope) => Some(envelope.id.clone()),
            None => delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
        };
        let verdict = match envelope {
            None => Err(NotReplayed::Undecodable),
            Some(_) => replay_one(session, topology, &delivery.properties, &delivery.data).await?,
        };
        match verdict {
            Ok(source) => {
                let acked = session
                    .call("removing a replayed dead letter", async {
                        delivery
                            .acker
                            .ack(BasicAckOptions::default())
                            .await
                            .map_err(|e| BridgeError::client("ack", e, true))
                    })
                    .await;
                acked.map_err(|e| {
                    BridgeError::Unavailable(format!(
                        "message {} was replayed to `{source}` but removing it from `{queue}` \
                             failed ({e}); it stays there and a later replay duplicates it",
                        message_id.as_deref().unwrap_or("without id")
                    ))
                })?;
                tracing::debug!(message_id = message_id.as_deref().unwrap_or(""), queue = %source, "dead letter replayed");
                report.replayed += 1;
            }
            Err(reason) => {
                tracing::debug!(message_id = message_id.as_deref().unwrap_or(""), %reason, "dead letter left in its queue");
                report.left.push(LeftDeadLetter { message_id, reason });
            }
        }
    }
    Ok(report)
}

/// Publishes a fresh copy of one dead letter to its source queue. `Ok(Ok(source))` once the
/// broker confirmed it, `Ok(Err(reason))` when it stays a dead letter, `Err` when the broker
/// cannot be reached.
async fn replay_one(
    session: &Session,
    topology: &Topology,
    properties: &BasicProperties,
    body: &[u8],
) -> Result<Result<String, NotReplayed>, BridgeError> {
    let table = properties.headers().as_ref();
    let Some(source) = headers::get_str(table, headers::DEAD_LETTER_QUEUE) else {
        return Ok(Err(NotReplayed::UnknownSource));
    };
    let source = source.to_string();
    if !topology.is_subscription_queue(&source) || name(&source).is_err() {
        return Ok(Err(NotReplayed::ForeignSource { source }));
    }
    let fresh = table.map(headers::without_retry_state).unwrap_or_default();
    let verdict = session
        .publish(Outgoing {
            exchange: "",
            routing_key: &source,
            mandatory: true,
            body,
            properties: publish::republish_properties(properties, fresh),
        })
        .await?;
    Ok(match verdict {
        Verdict::Confirmed => Ok(source),
        Verdict::Returned { .. } => Err(NotReplayed::SourceGone { source }),
        Verdict::Nacked => Err(NotReplayed::Refused { source }),
    })
}
