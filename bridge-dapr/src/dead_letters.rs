//! Dead letters travel on Dapr's own primitive: the dead-letter topic `<prefix>.dead-letters`
//! of the pub/sub component, which the app's subscription also names as its
//! `deadLetterTopic`, so a delivery the sidecar itself gives up on (its resiliency policy's
//! retries spent) lands there as well.
//!
//! * A dead letter the bridge makes is a CloudEvent with the envelope intact as `data` and its
//!   note (target, reason, attempts, origin, time) as extension attributes
//!   ([`crate::cloudevent`]).
//! * Every app subscribes to the dead-letter topic and keeps what arrives in the state store,
//!   one JSON list per target (`<prefix>||dl||<target>`, entries oldest first, written with
//!   first-write concurrency; an entry already there by its CloudEvent id is not added again,
//!   so every instance recording it leaves one entry). That list is what operators inspect,
//!   replay and purge. An event the sidecar gave up on carries no note: it is listed under
//!   the target named by the topic (`<prefix>.messages`), with the reason saying so.
//! * Replay publishes a retry copy for the origin subscription as attempt 1 and removes the
//!   entry only once the sidecar took the copy (a crash in between leaves a duplicate, never a
//!   loss).
//!
//! The list is one state entry: it suits dead letters as exceptions, not as a second queue.

use std::sync::Arc;

use purista_core::{
    BridgeError, DeadLetterEntry, DeadLetterNote, Envelope, LeftDeadLetter, NotReplayed,
    RegistrationKey, ReplayReport,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cloudevent;
use crate::shared::Shared;

/// What a recorded dead letter looks like in the state store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Recorded {
    /// The dead letter's CloudEvent id.
    id: String,
    note: DeadLetterNote,
    /// The envelope, when the data was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    envelope: Option<Envelope>,
    /// The data's bytes as text, when it was not an envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    raw: Option<String>,
    at: u64,
}

impl Recorded {
    fn entry(self) -> DeadLetterEntry {
        DeadLetterEntry {
            note: self.note,
            envelope: self.envelope,
            raw: self.raw.map(String::into_bytes),
            dead_lettered_at: self.at,
        }
    }
}

impl Shared {
    /// The dead-letter topic of this deployment.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dead-letters", self.config.prefix)
    }

    /// The topic whose subscription `start` waits for: the events topic, or the dead-letter
    /// topic for an app that receives no events.
    pub fn subscribed_topic(&self) -> String {
        if self.config.receive_events {
            self.topic.clone()
        } else {
            self.dead_letter_topic()
        }
    }

    fn dead_letter_key(&self, target: &str) -> String {
        format!(
            "{}||dl||{}",
            self.config.prefix,
            crate::bridge::key_part(target)
        )
    }
}

/// Publishes `envelope` to the dead-letter topic with `note`.
pub async fn publish(
    shared: &Shared,
    envelope: &Envelope,
    note: &DeadLetterNote,
) -> Result<(), BridgeError> {
    let attempts = note.attempts.to_string();
    let at = purista_core::envelope::now_ms().to_string();
    let encoded = envelope.encode();
    let event = cloudevent::wrap_with(
        envelope,
        &encoded,
        &shared.config.app_id,
        &purista_core::ids::new_id(),
        &[
            (cloudevent::EXT_DL_TARGET, note.target.as_str()),
            (cloudevent::EXT_DL_REASON, note.reason.as_str()),
            (cloudevent::EXT_DL_ATTEMPTS, attempts.as_str()),
            (cloudevent::EXT_DL_ORIGIN, note.origin.as_str()),
            (cloudevent::EXT_DL_AT, at.as_str()),
        ],
    )
    .map_err(BridgeError::InvalidRequest)?;
    shared
        .sidecar
        .publish(
            &shared.config.pubsub,
            &shared.dead_letter_topic(),
            event,
            shared.config.call_timeout,
        )
        .await
}

/// Why a delivery on the dead-letter topic could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not a JSON CloudEvent with an id: nothing to keep it by.
    #[error("not a CloudEvent with an id: {0}")]
    NotCloudEvent(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] BridgeError),
}

/// Keeps a delivery of the dead-letter topic in its target's list.
pub async fn record(shared: &Shared, body: &[u8]) -> Result<(), RecordError> {
    let event: serde_json::Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| RecordError::NotCloudEvent(e.to_string()))?;
    let text = |name: &str| event.get(name).and_then(Value::as_str).map(str::to_string);
    let id = text("id").ok_or_else(|| RecordError::NotCloudEvent("no id".into()))?;
    let (envelope, raw) = match cloudevent::unwrap(body) {
        Ok(delivered) => (Some(delivered.envelope), None),
        Err(_) => {
            let raw = match event.get("data") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            (None, Some(raw))
        }
    };
    let note = match text(cloudevent::EXT_DL_TARGET) {
        Some(target) => DeadLetterNote {
            target,
            reason: text(cloudevent::EXT_DL_REASON).unwrap_or_default(),
            attempts: text(cloudevent::EXT_DL_ATTEMPTS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            origin: text(cloudevent::EXT_DL_ORIGIN).unwrap_or_default(),
        },
        None => DeadLetterNote {
            target: shared.topic.clone(),
            reason: "the Dapr sidecar gave up delivering it (its resiliency policy's retries were spent)".into(),
            attempts: 0,
            origin: String::new(),
        },
    };
    let at = text(cloudevent::EXT_DL_AT)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(purista_core::envelope::now_ms);
    let key = shared.dead_letter_key(&note.target);
    let recorded = serde_json::to_value(Recorded {
        id: id.clone(),
        note,
        envelope,
        raw,
        at,
    })
    .map_err(|e| RecordError::NotCloudEvent(e.to_string()))?;
    shared
        .update_list(&key, |items| {
            if items
                .iter()
                .any(|i| i.get("id").and_then(Value::as_str) == Some(&id))
            {
                return false;
            }
            items.push(recorded.clone());
            true
        })
        .await?;
    Ok(())
}

async fn read(shared: &Shared, target: &str) -> Result<Vec<Recorded>, BridgeError> {
    let key = shared.dead_letter_key(target);
    let items = match shared
        .sidecar
        .get_state(&shared.config.statestore, &key, shared.config.call_timeout)
        .await?
    {
        Some((Value::Array(items), _)) => items,
        _ => Vec::new(),
    };
    Ok(items
        .into_iter()
        .filter_map(|i| serde_json::from_value(i).ok())
        .collect())
}

/// Up to `limit` dead letters of `target`, oldest first, none taken.
pub async fn inspect(
    shared: &Shared,
    target: &str,
    limit: usize,
) -> Result<Vec<DeadLetterEntry>, BridgeError> {
    Ok(read(shared, target)
        .await?
        .into_iter()
        .take(limit)
        .map(Recorded::entry)
        .collect())
}

/// Removes every dead letter of `target`; how many there were.
pub async fn purge(shared: &Shared, target: &str) -> Result<usize, BridgeError> {
    let mut removed = 0;
    shared
        .update_list(&shared.dead_letter_key(target), |items| {
            removed = items.len();
            let changed = !items.is_empty();
            items.clear();
            changed
        })
        .await?;
    Ok(removed)
}

/// Hands up to `limit` dead letters of `target` back to their subscriptions as attempt 1.
pub async fn replay(
    shared: &Arc<Shared>,
    target: &str,
    limit: usize,
) -> Result<ReplayReport, BridgeError> {
    let mut report = ReplayReport::default();
    for recorded in read(shared, target).await?.into_iter().take(limit) {
        let message_id = recorded.envelope.as_ref().map(|e| e.id.clone());
        let left = match &recorded.envelope {
            None => Some(NotReplayed::Undecodable),
            Some(_) if recorded.note.origin.is_empty() => Some(NotReplayed::UnknownSource),
            Some(envelope) => {
                let origin = RegistrationKey::from(recorded.note.origin.as_str());
                let spec = shared.consumers.read().get(&origin).map(|c| c.spec.clone());
                match spec {
                    None => Some(NotReplayed::SourceGone {
                        source: recorded.note.origin.clone(),
                    }),
                    Some(spec) => match shared
                        .publish_retry(&spec, envelope, 1, std::time::Duration::ZERO)
                        .await
                    {
                        Ok(()) => None,
                        Err(error) => {
                            tracing::warn!(%error, source = %recorded.note.origin, "a dead letter could not be replayed");
                            Some(NotReplayed::Refused {
                                source: recorded.note.origin.clone(),
                            })
                        }
                    },
                }
            }
        };
        match left {
            None => {
                let id = recorded.id.clone();
                match shared
                    .update_list(&shared.dead_letter_key(target), |items| {
                        let before = items.len();
                        items.retain(|i| i.get("id").and_then(Value::as_str) != Some(&id));
                        items.len() != before
                    })
                    .await
                {
                    Ok(()) => report.replayed += 1,
                    Err(error) => {
                        tracing::warn!(%error, message_id = ?message_id, "a replayed dead letter could not be removed: it stays (a duplicate, not a loss)");
                    }
                }
            }
            Some(reason) => report.left.push(LeftDeadLetter { message_id, reason }),
        }
    }
    Ok(report)
}
