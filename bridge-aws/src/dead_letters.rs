//! Dead-letter targets: an SQS queue per target (`<prefix>-d-<target>-dead-letter`), created
//! on first use. Each entry is the envelope, intact, with reason, attempts, origin
//! (registration key) and time as message attributes. The operator calls read entries without
//! removing them (receives with visibility 0), replay them to the subscription they came
//! from as attempt 1 (the copy first, then the delete: a crash between leaves a duplicate,
//! never a loss), and purge them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::Message;
use parking_lot::Mutex;
use purista_core::kit::broker_call;
use purista_core::{
    BridgeError, DeadLetterEntry, DeadLetterNote, Envelope, LeftDeadLetter, NotReplayed,
    RegistrationKey, ReplayReport,
};

use crate::client::sdk_error;
use crate::receive::{self, attr, string_attribute};
use crate::shared::{Shared, now_ms};
use crate::subscriptions::{ATTR_AT, ATTR_ATTEMPTS, ATTR_ORIGIN, ATTR_REASON, Consumer, note_of};
use crate::topology;

/// Dead-letter queue URLs by target.
#[derive(Default)]
pub struct DeadLetterUrls(Mutex<HashMap<String, String>>);

async fn url(shared: &Shared, target: &str, create: bool) -> Result<Option<String>, BridgeError> {
    if let Some(u) = shared.dead_letter_urls.0.lock().get(target) {
        return Ok(Some(u.clone()));
    }
    let name = shared.names.dead_letter_queue(target)?;
    let found = if create {
        Some(topology::ensure_queue(shared, &name, &[], &[]).await?.url)
    } else {
        topology::queue_url(shared, &name).await?
    };
    if let Some(u) = &found {
        shared
            .dead_letter_urls
            .0
            .lock()
            .insert(target.to_string(), u.clone());
    }
    Ok(found)
}

/// Sends `envelope` to `note.target` with the note as attributes.
pub async fn send(
    shared: &Shared,
    note: &DeadLetterNote,
    envelope: &Envelope,
) -> Result<(), BridgeError> {
    let Some(url) = url(shared, &note.target, true).await? else {
        return Err(BridgeError::Broker(format!(
            "dead-letter target {} has no queue",
            note.target
        )));
    };
    let body = String::from_utf8(envelope.encode()).unwrap_or_default();
    let size = body.len() + note.reason.len() + note.origin.len() + 256;
    let entry = aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
        .message_body(body)
        .message_attributes(
            ATTR_REASON,
            attr(if note.reason.is_empty() {
                "-"
            } else {
                note.reason.as_str()
            })?,
        )
        .message_attributes(ATTR_ATTEMPTS, attr(note.attempts.to_string())?)
        .message_attributes(
            ATTR_ORIGIN,
            attr(if note.origin.is_empty() {
                "-"
            } else {
                note.origin.as_str()
            })?,
        )
        .message_attributes(ATTR_AT, attr(now_ms().to_string())?);
    shared.send(&url, entry, size).await
}

async fn receive_batch(
    shared: &Shared,
    url: &str,
    visibility: i32,
) -> Result<Vec<Message>, BridgeError> {
    let call = shared
        .clients
        .sqs
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .visibility_timeout(visibility)
        .wait_time_seconds(0)
        .message_attribute_names("All")
        .send();
    let out = broker_call(
        shared.config.call_timeout,
        "ReceiveMessage (dead letters)",
        async { call.await.map_err(|e| sdk_error("reading dead letters", e)) },
    )
    .await?;
    Ok(out.messages.unwrap_or_default())
}

fn at_of(m: &Message) -> u64 {
    string_attribute(m, ATTR_AT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn entry(m: &Message, target: &str, max: usize) -> DeadLetterEntry {
    let body = m.body().unwrap_or_default();
    let mut note = note_of(m, target);
    if note.reason == "-" {
        note.reason.clear();
    }
    if note.origin == "-" {
        note.origin.clear();
    }
    match Envelope::decode_with_limit(body.as_bytes(), max) {
        Ok(e) => DeadLetterEntry {
            note,
            envelope: Some(e),
            raw: None,
            dead_lettered_at: at_of(m),
        },
        Err(_) => DeadLetterEntry {
            note,
            envelope: None,
            raw: Some(body.as_bytes().to_vec()),
            dead_lettered_at: at_of(m),
        },
    }
}

/// Up to `limit` entries, oldest first, left in place.
pub async fn inspect(
    shared: &Shared,
    target: &str,
    limit: usize,
) -> Result<Vec<DeadLetterEntry>, BridgeError> {
    let Some(url) = url(shared, target, false).await? else {
        return Ok(Vec::new());
    };
    let mut seen = HashSet::new();
    let mut found: Vec<Message> = Vec::new();
    // Receives with visibility 0 leave every message visible, so rounds may repeat messages;
    // stop once a few rounds bring nothing new.
    let mut idle_rounds = 0;
    while found.len() < limit && idle_rounds < 3 {
        let batch = receive_batch(shared, &url, 0).await?;
        let before = found.len();
        for m in batch {
            if let Some(id) = m.message_id()
                && seen.insert(id.to_string())
            {
                found.push(m);
            }
        }
        if found.len() == before {
            idle_rounds += 1;
        }
    }
    found.sort_by_key(at_of);
    found.truncate(limit);
    Ok(found
        .iter()
        .map(|m| entry(m, target, shared.config.max_message_bytes))
        .collect())
}

/// Hands up to `limit` entries back to their subscriptions (this instance's consumers).
pub async fn replay(
    shared: &Shared,
    consumers: &HashMap<RegistrationKey, Arc<Consumer>>,
    target: &str,
    limit: usize,
) -> Result<ReplayReport, BridgeError> {
    let mut report = ReplayReport::default();
    let Some(url) = url(shared, target, false).await? else {
        return Ok(report);
    };
    let mut taken = 0;
    while taken < limit {
        let batch = receive_batch(shared, &url, 30).await?;
        if batch.is_empty() {
            break;
        }
        let mut batch = batch;
        batch.sort_by_key(at_of);
        for m in batch {
            if taken >= limit {
                put_back(shared, &url, &m).await;
                continue;
            }
            taken += 1;
            let e = entry(&m, target, shared.config.max_message_bytes);
            let id = e
                .envelope
                .as_ref()
                .map(|e| e.id.clone())
                .or_else(|| m.message_id().map(str::to_string));
            let left = |reason| LeftDeadLetter {
                message_id: id.clone(),
                reason,
            };
            let Some(envelope) = e.envelope else {
                report.left.push(left(NotReplayed::Undecodable));
                put_back(shared, &url, &m).await;
                continue;
            };
            if e.note.origin.is_empty() {
                report.left.push(left(NotReplayed::UnknownSource));
                put_back(shared, &url, &m).await;
                continue;
            }
            let key = RegistrationKey::from(e.note.origin.as_str());
            let Some(consumer) = consumers.get(&key) else {
                report.left.push(left(NotReplayed::SourceGone {
                    source: e.note.origin.clone(),
                }));
                put_back(shared, &url, &m).await;
                continue;
            };
            match consumer.requeue(&envelope).await {
                Ok(()) => {
                    if let Err(error) = receive::delete(shared, &url, &m).await {
                        tracing::warn!(%error, "a replayed dead letter could not be deleted; it stays as a duplicate");
                    }
                    report.replayed += 1;
                }
                Err(_) => {
                    report.left.push(left(NotReplayed::Refused {
                        source: e.note.origin.clone(),
                    }));
                    put_back(shared, &url, &m).await;
                }
            }
        }
    }
    Ok(report)
}

async fn put_back(shared: &Shared, url: &str, m: &Message) {
    let call = shared
        .clients
        .sqs
        .change_message_visibility()
        .queue_url(url)
        .set_receipt_handle(m.receipt_handle().map(str::to_string))
        .visibility_timeout(0)
        .send();
    let _ = tokio::time::timeout(shared.config.call_timeout, call).await;
}

/// Deletes every entry; returns how many.
pub async fn purge(shared: &Shared, target: &str) -> Result<usize, BridgeError> {
    let Some(url) = url(shared, target, false).await? else {
        return Ok(0);
    };
    let mut deleted = 0;
    loop {
        let batch = receive_batch(shared, &url, 60).await?;
        if batch.is_empty() {
            return Ok(deleted);
        }
        for m in &batch {
            receive::delete(shared, &url, m).await?;
            deleted += 1;
        }
        tokio::task::yield_now().await;
        let _ = Duration::ZERO;
    }
}
