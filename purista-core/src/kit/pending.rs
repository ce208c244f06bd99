//! Pending invocations of one bridge instance, by `correlationId`: the caller's side of a
//! command's request/reply.
//!
//! An invocation registers its entry *before* the command leaves, so a fast response can never
//! arrive first. The entry is removed however the invocation ends: response, timeout, error, or
//! the caller dropping its future ([`PendingSlot`] removes it on drop). A response that finds no
//! entry — it came after the timeout, or carries a correlation id nobody waits for — is ignored
//! with one warning and counted ([`PendingInvocations::unmatched`]); DESIGN §3.2.
//!
//! On connection loss a bridge fails every entry at once ([`PendingInvocations::fail_all`]: the
//! responses would have come over what was lost); on shutdown it closes the table
//! ([`PendingInvocations::close`]), which also refuses new invocations.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::fast_hash::FastMap;
use crate::envelope::Envelope;
use crate::error::BridgeError;

/// What a pending invocation receives: the response, or why none will come.
pub type PendingReply<T> = Result<T, BridgeError>;

/// Pending invocations by `correlationId`. `T` is how the bridge holds a response
/// ([`Envelope`], or `Arc<Envelope>` where it shares one with subscriptions).
///
/// ```
/// use purista_core::kit::PendingInvocations;
/// use purista_core::{Address, Envelope, SenderAddress};
///
/// let pending: PendingInvocations<Envelope> = PendingInvocations::default();
/// let command = Envelope::command(
///     SenderAddress::default(),
///     Address::new("orders", "1", "place"),
///     serde_json::json!({}),
///     serde_json::json!({}),
/// );
/// let correlation_id = command.correlation_id.clone().unwrap();
/// let (slot, mut reply) = pending.wait_for(&correlation_id).unwrap();
/// pending.resolve(command.success_response(serde_json::json!("ok"), None));
/// assert_eq!(reply.try_recv().unwrap().unwrap().payload, "ok");
/// drop(slot);
/// // The same response again finds nobody waiting: ignored with a warning, counted.
/// pending.resolve(command.success_response(serde_json::json!("late"), None));
/// assert_eq!(pending.unmatched(), 1);
/// ```
pub struct PendingInvocations<T = Envelope> {
    pending: Mutex<FastMap<Arc<str>, oneshot::Sender<PendingReply<T>>>>,
    closed: AtomicBool,
    unmatched: AtomicU64,
}

impl<T> Default for PendingInvocations<T> {
    fn default() -> Self {
        PendingInvocations {
            pending: Mutex::new(FastMap::default()),
            closed: AtomicBool::new(false),
            unmatched: AtomicU64::new(0),
        }
    }
}

impl<T: Borrow<Envelope>> PendingInvocations<T> {
    /// Registers a pending invocation. The returned slot removes it again when dropped.
    ///
    /// # Errors
    /// [`BridgeError::Unavailable`] once the table is closed; [`BridgeError::InvalidRequest`]
    /// when an invocation with this correlation id is already pending.
    pub fn wait_for(
        &self,
        correlation_id: &str,
    ) -> Result<(PendingSlot<'_, T>, oneshot::Receiver<PendingReply<T>>), BridgeError> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(BridgeError::Unavailable("bridge shutting down".into()));
        }
        match pending.entry(correlation_id.into()) {
            Entry::Occupied(_) => Err(BridgeError::InvalidRequest(format!(
                "an invocation with correlationId {correlation_id} is already pending"
            ))),
            Entry::Vacant(slot) => {
                let correlation_id = slot.key().clone();
                slot.insert(tx);
                Ok((
                    PendingSlot {
                        owner: self,
                        correlation_id,
                    },
                    rx,
                ))
            }
        }
    }

    /// Completes the invocation `response` belongs to, or warns and counts it as unmatched.
    pub fn resolve(&self, response: T) {
        let waiting = self
            .pending
            .lock()
            .remove(correlation_of(response.borrow()));
        let undelivered = match waiting {
            Some(tx) => match tx.send(Ok(response)) {
                Ok(()) => return,
                // The caller stopped waiting between the lookup and the send.
                Err(Ok(response)) => response,
                Err(Err(_)) => return,
            },
            None => response,
        };
        self.unmatched.fetch_add(1, Ordering::Relaxed);
        let envelope: &Envelope = undelivered.borrow();
        tracing::warn!(
            correlation_id = correlation_of(envelope),
            message_id = %envelope.id,
            "response for an unknown or expired invocation ignored"
        );
    }
}

impl<T> PendingInvocations<T> {
    /// Fails one pending invocation with `error` (nothing happens when it is not pending).
    pub fn fail(&self, correlation_id: &str, error: BridgeError) {
        if let Some(tx) = self.pending.lock().remove(correlation_id) {
            let _ = tx.send(Err(error));
        }
    }

    /// Fails every pending invocation with `error`; new ones are still accepted. Returns how
    /// many were pending.
    pub fn fail_all(&self, error: &BridgeError) -> usize {
        let pending: Vec<_> = self.pending.lock().drain().map(|(_, tx)| tx).collect();
        let n = pending.len();
        for tx in pending {
            let _ = tx.send(Err(error.clone()));
        }
        n
    }

    /// Refuses new invocations from now on and fails every pending one with `error`. Returns
    /// how many were pending.
    pub fn close(&self, error: &BridgeError) -> usize {
        let pending: Vec<_> = {
            let mut pending = self.pending.lock();
            self.closed.store(true, Ordering::Release);
            pending.drain().map(|(_, tx)| tx).collect()
        };
        let n = pending.len();
        for tx in pending {
            let _ = tx.send(Err(error.clone()));
        }
        n
    }

    /// Invocations waiting now.
    pub fn len(&self) -> usize {
        self.pending.lock().len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Responses that found no pending invocation.
    pub fn unmatched(&self) -> u64 {
        self.unmatched.load(Ordering::Relaxed)
    }
}

fn correlation_of(envelope: &Envelope) -> &str {
    envelope.correlation_id.as_deref().unwrap_or("")
}

/// Removes a pending entry when its invocation stops waiting, however it stops.
pub struct PendingSlot<'a, T> {
    owner: &'a PendingInvocations<T>,
    correlation_id: Arc<str>,
}

impl<T> PendingSlot<'_, T> {
    /// The `correlationId` the invocation waits for.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

impl<T> Drop for PendingSlot<'_, T> {
    fn drop(&mut self) {
        self.owner.pending.lock().remove(&self.correlation_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Address, SenderAddress};

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
    fn a_late_response_after_the_caller_gave_up_is_counted_not_delivered() {
        let pending = PendingInvocations::<Envelope>::default();
        let (slot, rx) = pending.wait_for("c-2").unwrap();
        drop((slot, rx));
        pending.resolve(response("c-2"));
        assert_eq!(pending.unmatched(), 1);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_receiver_dropped_before_the_response_counts_it_as_unmatched() {
        let pending = PendingInvocations::<Arc<Envelope>>::default();
        let (_slot, rx) = pending.wait_for("c-3").unwrap();
        drop(rx);
        pending.resolve(Arc::new(response("c-3")));
        assert_eq!(pending.unmatched(), 1);
    }

    #[test]
    fn fail_all_answers_every_pending_invocation_and_close_refuses_new_ones() {
        let pending = PendingInvocations::<Envelope>::default();
        let (_a, mut ra) = pending.wait_for("a").unwrap();
        let (_b, mut rb) = pending.wait_for("b").unwrap();
        let lost = BridgeError::Unavailable("lost".into());
        assert_eq!(pending.fail_all(&lost), 2);
        assert_eq!(ra.try_recv().unwrap(), Err(lost.clone()));
        assert_eq!(rb.try_recv().unwrap(), Err(lost));
        assert!(pending.wait_for("c").is_ok(), "still open after fail_all");
        pending.close(&BridgeError::Unavailable("bye".into()));
        assert!(matches!(
            pending.wait_for("d"),
            Err(BridgeError::Unavailable(_))
        ));
    }

    #[test]
    fn duplicate_correlation_ids_are_refused() {
        let pending = PendingInvocations::<Envelope>::default();
        let _a = pending.wait_for("x").unwrap();
        assert!(matches!(
            pending.wait_for("x"),
            Err(BridgeError::InvalidRequest(_))
        ));
    }
}
