//! Responses: the per-instance reply queue's consumer and the pending invocations it completes.
//!
//! Each invocation registers a pending entry under its `correlationId` before the command is
//! published; the entry is removed however the invocation ends (response, timeout, error, or
//! the caller dropping its future). A response that finds no entry — it came after the
//! timeout, or carries an unknown correlation id — is ignored with a warning and counted
//! (`unmatched_responses`). Anything else on the reply queue (bytes that do not decode, a body
//! over the size limit, a valid envelope that is not a response) is poison: dropped with a
//! warning naming the queue and counted (`poison_messages`); the consumer goes on.
//!
//! The reply queue also carries stream frames of this instance's sessions, both ends: they
//! go to the session table (`streams.rs`) by `correlationId`, never to an invocation.
//!
//! On connection loss every pending invocation fails at once with 503: its response would
//! have arrived on a reply queue that died with the connection.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::StreamExt;
use parking_lot::Mutex;
use purista_core::{BridgeError, Envelope, MessageType};
use tokio::sync::oneshot;

use crate::bridge::Shared;
use crate::streams;

/// What a pending invocation receives.
pub(crate) type Reply = Result<Envelope, BridgeError>;

/// Pending invocations of one bridge instance, by `correlationId`.
#[derive(Default)]
pub(crate) struct ReplyInbox {
    pending: Mutex<HashMap<String, oneshot::Sender<Reply>>>,
    closed: AtomicBool,
    unmatched: AtomicU64,
}

impl ReplyInbox {
    /// Registers a pending invocation; the slot removes it again when dropped.
    pub(crate) fn wait_for(
        &self,
        correlation_id: &str,
    ) -> Result<(PendingSlot<'_>, oneshot::Receiver<Reply>), BridgeError> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(BridgeError::Unavailable("bridge shutting down".into()));
        }
        match pending.entry(correlation_id.to_string()) {
            Entry::Occupied(_) => Err(BridgeError::InvalidRequest(format!(
                "an invocation with correlationId {correlation_id} is already pending"
            ))),
            Entry::Vacant(slot) => {
                slot.insert(tx);
                Ok((
                    PendingSlot {
                        inbox: self,
                        correlation_id: correlation_id.to_string(),
                    },
                    rx,
                ))
            }
        }
    }

    /// Completes the invocation a response belongs to, or warns and counts.
    pub(crate) fn resolve(&self, response: Envelope) {
        let correlation_id = response.correlation_id.clone().unwrap_or_default();
        let waiting = self.pending.lock().remove(&correlation_id);
        let unmatched = match waiting {
            Some(tx) => tx.send(Ok(response)).err().map(|r| r.ok()),
            None => Some(Some(response)),
        };
        if let Some(response) = unmatched {
            self.unmatched.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                correlation_id,
                message_id = response.as_ref().map(|r| r.id.as_str()).unwrap_or(""),
                "response for an unknown or expired invocation ignored"
            );
        }
    }

    /// Fails every pending invocation with `error`; new ones are still accepted.
    pub(crate) fn fail_all(&self, error: &BridgeError) -> usize {
        let pending: Vec<_> = self.pending.lock().drain().map(|(_, tx)| tx).collect();
        let n = pending.len();
        for tx in pending {
            let _ = tx.send(Err(error.clone()));
        }
        n
    }

    /// Refuses new invocations and fails every pending one. Returns how many.
    pub(crate) fn close(&self, error: &BridgeError) -> usize {
        {
            let _pending = self.pending.lock();
            self.closed.store(true, Ordering::Release);
        }
        self.fail_all(error)
    }

    /// Responses that found no pending invocation.
    pub(crate) fn unmatched(&self) -> u64 {
        self.unmatched.load(Ordering::Relaxed)
    }
}

/// Removes a pending entry when its invocation stops waiting, however it stops.
pub(crate) struct PendingSlot<'a> {
    inbox: &'a ReplyInbox,
    correlation_id: String,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.inbox.pending.lock().remove(&self.correlation_id);
    }
}

/// Consumes the reply queue (auto-ack: a response is useful once, or never) until the
/// consumer ends with its connection. Stream frames are routed to their sessions without
/// waiting: this loop completes every invocation of the instance and must not stall.
pub(crate) async fn run_reply_consumer(mut consumer: lapin::Consumer, shared: &Arc<Shared>) {
    let queue = shared.topology.reply_queue();
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(d) => d,
            Err(error) => {
                tracing::debug!(%error, "reply consumer ended");
                break;
            }
        };
        match Envelope::decode_with_limit(&delivery.data, shared.config.max_payload_bytes) {
            Ok(response) if response.message_type.is_response() => shared.inbox.resolve(response),
            Ok(frame) if frame.message_type == MessageType::Stream => {
                streams::route(shared, frame, &delivery.properties);
            }
            Ok(other) => {
                shared.count_poison();
                tracing::warn!(
                    %queue,
                    message_id = %other.id,
                    message_type = %other.message_type,
                    "non-response, non-stream message on the reply queue dropped"
                );
            }
            Err(error) => {
                shared.count_poison();
                tracing::warn!(
                    %queue,
                    %error,
                    bytes = delivery.data.len(),
                    "undecodable message on the reply queue dropped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use purista_core::{Address, SenderAddress};

    use super::*;

    fn response(correlation_id: &str) -> Envelope {
        let mut cmd = Envelope::command(
            SenderAddress::default(),
            Address::new("a", "1", "b"),
            serde_json::json!(null),
            serde_json::json!(null),
        );
        cmd.correlation_id = Some(correlation_id.into());
        cmd.success_response(serde_json::json!("ok"), None)
    }

    #[test]
    fn a_response_completes_its_invocation_and_removes_the_entry() {
        let inbox = ReplyInbox::default();
        let (slot, mut rx) = inbox.wait_for("c-1").unwrap();
        inbox.resolve(response("c-1"));
        assert_eq!(rx.try_recv().unwrap().unwrap().payload, "ok");
        drop(slot);
        inbox.resolve(response("c-1"));
        assert_eq!(inbox.unmatched(), 1);
    }

    #[test]
    fn a_late_response_after_the_caller_gave_up_is_counted() {
        let inbox = ReplyInbox::default();
        let (slot, rx) = inbox.wait_for("c-2").unwrap();
        drop((slot, rx));
        inbox.resolve(response("c-2"));
        assert_eq!(inbox.unmatched(), 1);
    }

    #[test]
    fn fail_all_answers_every_pending_invocation() {
        let inbox = ReplyInbox::default();
        let (_a, mut ra) = inbox.wait_for("a").unwrap();
        let (_b, mut rb) = inbox.wait_for("b").unwrap();
        let lost = BridgeError::Unavailable("lost".into());
        assert_eq!(inbox.fail_all(&lost), 2);
        assert_eq!(ra.try_recv().unwrap(), Err(lost.clone()));
        assert_eq!(rb.try_recv().unwrap(), Err(lost));
        assert!(inbox.wait_for("c").is_ok(), "still open after fail_all");
        inbox.close(&BridgeError::Unavailable("bye".into()));
        assert!(inbox.wait_for("d").is_err());
    }

    #[test]
    fn duplicate_correlation_ids_are_refused() {
        let inbox = ReplyInbox::default();
        let _a = inbox.wait_for("x").unwrap();
        assert!(matches!(
            inbox.wait_for("x"),
            Err(BridgeError::InvalidRequest(_))
        ));
    }
}
