//! The stream sessions of one bridge instance, both ends, by `correlationId`: plain data, no
//! broker.
//!
//! A *consumer session* is the opener's end: the reader's frame buffer, the producer's reply
//! queue once its first frame named it, and the in-flight count until the terminal frame. A
//! *producer session* is the serving end: the cancel signal of the handler and the opener's
//! reply queue. `streams.rs` moves frames between the broker and these; this file only keeps
//! the sessions, applies the buffer rule (a reader that lets [`STREAM_FRAME_BUFFER`] frames
//! pile up fails its session rather than stall the reply consumer) and ends them all when the
//! connection drops or the bridge shuts down.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use purista_core::inflight::InFlightGuard;
use purista_core::stream::{FrameType, frame_type, session_error_frame};
use purista_core::{BridgeError, Envelope, SenderAddress, StatusCode, StreamConsumerEnd};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

/// Frames buffered per session end before the producer waits (the in-memory bridge's figure).
pub const STREAM_FRAME_BUFFER: usize = 256;

/// Why a producer is cancelled when the consumer end is gone.
pub(crate) const CONSUMER_GONE: &str = "stream consumer went away";
/// Why sessions end when the connection drops.
pub(crate) const CONNECTION_LOST: &str = "connection to the broker lost";

/// The opener's side of one session.
struct ConsumerSession {
    /// Into the reader's buffer; one slot beyond [`STREAM_FRAME_BUFFER`] is kept for the error
    /// frame of an overflow or a connection loss.
    frames: mpsc::Sender<Envelope>,
    /// The producer's reply queue, from the first frame's `reply_to`.
    producer: watch::Sender<Option<String>>,
    /// Sender of the frames this bridge makes up for the session (the endpoint, this instance).
    origin: SenderAddress,
    /// Counts the session as `stream` in-flight work until its terminal frame.
    in_flight: Option<InFlightGuard>,
    terminal: bool,
    /// The task that carries the consumer's cancel and removes the session at the end.
    watcher: Option<AbortHandle>,
}

impl ConsumerSession {
    /// Ends the session for good: a 503 error frame unless it already ended, then the buffer
    /// closes (the watcher holds the other sender).
    fn fail(mut self, correlation_id: &str, reason: &str) {
        if !self.terminal {
            let _ = self
                .frames
                .try_send(error_frame(&self.origin, correlation_id, reason));
        }
        self.in_flight = None;
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
    }
}

/// A frame this bridge writes to end a session with a 503 (the reader turns it into an error).
pub(crate) fn error_frame(origin: &SenderAddress, correlation_id: &str, reason: &str) -> Envelope {
    session_error_frame(
        origin.clone(),
        correlation_id,
        StatusCode::SERVICE_UNAVAILABLE,
        reason,
    )
}

/// What the reply consumer must do after routing a frame to a consumer session.
pub(crate) enum Routed {
    /// Handed to the session (or ignored after its end).
    Delivered,
    /// No such session here: tell the producer at `reply_to` to stop.
    Unmatched { reply_to: Option<String> },
    /// The reader fell behind and the session failed: cancel the producer.
    Overflowed { producer: Option<String> },
}

/// The stream sessions of one bridge instance, both ends, by `correlationId`.
#[derive(Default)]
pub(crate) struct StreamSessions {
    consumers: Mutex<HashMap<String, ConsumerSession>>,
    producers: Mutex<HashMap<String, ProducerSession>>,
    closed: AtomicBool,
    unmatched: AtomicU64,
}

/// The serving side of one session.
struct ProducerSession {
    /// Becomes `Some(reason)` when the session is cancelled.
    cancel: watch::Sender<Option<String>>,
    /// The opener's reply queue.
    reply_to: String,
    /// Sender of the frames this bridge makes up for the session.
    origin: SenderAddress,
}

impl ProducerSession {
    fn cancel(&self, reason: &str) {
        self.cancel.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason.to_string());
            true
        });
    }
}

/// What the watcher of a consumer session needs.
pub(crate) struct ConsumerWatch {
    pub(crate) correlation_id: String,
    /// The opener, sender of the session's cancel.
    pub(crate) opener: SenderAddress,
    pub(crate) frames: mpsc::Sender<Envelope>,
    pub(crate) cancel: watch::Receiver<Option<String>>,
    pub(crate) producer: watch::Receiver<Option<String>>,
}

impl StreamSessions {
    /// Registers a consumer session (before its open frame is published, so no frame can come
    /// first) for `opener`; `origin` is the sender of the frames the bridge makes up for the
    /// reader (the endpoint, on this instance).
    pub(crate) fn open_consumer(
        &self,
        correlation_id: &str,
        opener: SenderAddress,
        origin: SenderAddress,
        in_flight: InFlightGuard,
    ) -> Result<(StreamConsumerEnd, ConsumerWatch), BridgeError> {
        let (frames_tx, frames_rx) = mpsc::channel(STREAM_FRAME_BUFFER + 1);
        let (cancel_tx, cancel_rx) = watch::channel(None);
        let (producer_tx, producer_rx) = watch::channel(None);
        let mut consumers = self.consumers.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(BridgeError::Unavailable("bridge shutting down".into()));
        }
        match consumers.entry(correlation_id.to_string()) {
            Entry::Occupied(_) => Err(BridgeError::InvalidRequest(format!(
                "a stream session with correlationId {correlation_id} is already open"
            ))),
            Entry::Vacant(slot) => {
                slot.insert(ConsumerSession {
                    frames: frames_tx.clone(),
                    producer: producer_tx,
                    origin,
                    in_flight: Some(in_flight),
                    terminal: false,
                    watcher: None,
                });
                Ok((
                    StreamConsumerEnd {
                        frames: frames_rx,
                        cancel: cancel_tx,
                    },
                    ConsumerWatch {
                        correlation_id: correlation_id.to_string(),
                        opener,
                        frames: frames_tx,
                        cancel: cancel_rx,
                        producer: producer_rx,
                    },
                ))
            }
        }
    }

    /// Remembers the watcher task of a session; aborts it when the session is already gone.
    pub(crate) fn attach_watcher(&self, correlation_id: &str, watcher: AbortHandle) {
        match self.consumers.lock().get_mut(correlation_id) {
            Some(session) => session.watcher = Some(watcher),
            None => watcher.abort(),
        }
    }

    /// Removes a consumer session (its open failed, or its reader is gone).
    pub(crate) fn remove_consumer(&self, correlation_id: &str) {
        let removed = self.consumers.lock().remove(correlation_id);
        drop(removed);
    }

    pub(crate) fn is_terminal(&self, correlation_id: &str) -> bool {
        self.consumers
            .lock()
            .get(correlation_id)
            .is_none_or(|s| s.terminal)
    }

    /// Hands a frame from a producer to its consumer session.
    pub(crate) fn route_to_consumer(&self, frame: Envelope, reply_to: Option<&str>) -> Routed {
        let correlation_id = frame.correlation_id.clone().unwrap_or_default();
        let kind = frame_type(&frame);
        let mut consumers = self.consumers.lock();
        let Some(session) = consumers
            .get_mut(&correlation_id)
            .filter(|s| !s.frames.is_closed())
        else {
            drop(consumers);
            self.unmatched.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                correlation_id,
                frame = ?kind,
                "stream frame for an unknown or ended session ignored"
            );
            let answer = kind.is_some_and(|k| !k.is_terminal());
            return Routed::Unmatched {
                reply_to: reply_to.filter(|_| answer).map(str::to_string),
            };
        };
        if session.producer.borrow().is_none()
            && let Some(queue) = reply_to
        {
            session.producer.send_replace(Some(queue.to_string()));
        }
        let terminal = kind.is_some_and(FrameType::is_terminal);
        if !session.terminal && !terminal && session.frames.capacity() <= 1 {
            // Only the reserved slot is left: the reader fell behind.
            tracing::warn!(
                correlation_id,
                buffer = STREAM_FRAME_BUFFER,
                "stream consumer fell behind; session failed"
            );
            let failed = error_frame(
                &session.origin,
                &correlation_id,
                "stream consumer fell behind: its frame buffer is full",
            );
            let _ = session.frames.try_send(failed);
            session.terminal = true;
            session.in_flight = None;
            return Routed::Overflowed {
                producer: session.producer.borrow().clone(),
            };
        }
        if session.frames.try_send(frame).is_err() {
            // Only after the session failed (an overflow leaves no room): the reader would
            // ignore it anyway, and a warning per frame of a flood helps nobody.
            tracing::debug!(
                correlation_id,
                frame = ?kind,
                "stream frame after the session ended dropped: the buffer is full"
            );
        }
        if terminal && !session.terminal {
            session.terminal = true;
            session.in_flight = None;
        }
        Routed::Delivered
    }

    /// Registers a producer session answering on `reply_to`; `None` when one with this id
    /// already runs here.
    pub(crate) fn open_producer(
        &self,
        correlation_id: &str,
        reply_to: &str,
        origin: SenderAddress,
    ) -> Option<ProducerSlot<'_>> {
        let (tx, rx) = watch::channel(None);
        match self.producers.lock().entry(correlation_id.to_string()) {
            Entry::Occupied(_) => None,
            Entry::Vacant(slot) => {
                slot.insert(ProducerSession {
                    cancel: tx,
                    reply_to: reply_to.to_string(),
                    origin,
                });
                Some(ProducerSlot {
                    sessions: self,
                    correlation_id: correlation_id.to_string(),
                    cancelled: rx,
                })
            }
        }
    }

    /// Cancels a producer session (a consumer's `cancel` frame, a lost consumer).
    pub(crate) fn cancel_producer(&self, correlation_id: &str, reason: &str) -> bool {
        match self.producers.lock().get(correlation_id) {
            Some(session) => {
                session.cancel(reason);
                true
            }
            None => false,
        }
    }

    /// The producer sessions still running: `(correlationId, opener's reply queue, origin)`.
    pub(crate) fn running_producers(&self) -> Vec<(String, String, SenderAddress)> {
        self.producers
            .lock()
            .iter()
            .map(|(id, s)| (id.clone(), s.reply_to.clone(), s.origin.clone()))
            .collect()
    }

    /// Ends every session: consumer sessions with a 503 error frame, producers cancelled with
    /// `reason`. Used when the connection drops (new sessions are taken afterwards) and, with
    /// `close`, at shutdown (none are). Returns how many sessions were open.
    pub(crate) fn end_all(&self, reason: &str, close: bool) -> usize {
        let consumers: Vec<(String, ConsumerSession)> = {
            let mut consumers = self.consumers.lock();
            if close {
                self.closed.store(true, Ordering::Release);
            }
            consumers.drain().collect()
        };
        let producers = {
            let producers = self.producers.lock();
            for session in producers.values() {
                session.cancel(reason);
            }
            producers.len()
        };
        let n = consumers.iter().filter(|(_, s)| !s.terminal).count();
        for (correlation_id, session) in consumers {
            session.fail(&correlation_id, reason);
        }
        n + producers
    }

    /// Stream frames that found no session.
    pub(crate) fn unmatched(&self) -> u64 {
        self.unmatched.load(Ordering::Relaxed)
    }
}

/// A producer session's entry; removed when dropped.
pub(crate) struct ProducerSlot<'a> {
    sessions: &'a StreamSessions,
    correlation_id: String,
    pub(crate) cancelled: watch::Receiver<Option<String>>,
}

impl Drop for ProducerSlot<'_> {
    fn drop(&mut self) {
        self.sessions.producers.lock().remove(&self.correlation_id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use purista_core::stream::frame;
    use purista_core::{InFlightTracker, WorkKind};
    use serde_json::Value;

    use super::*;

    fn chunk(correlation_id: &str, seq: u64) -> Envelope {
        frame(
            SenderAddress::default(),
            correlation_id,
            FrameType::Chunk,
            seq,
            Some(("chunk", Value::from(seq))),
        )
    }

    fn session(sessions: &StreamSessions, id: &str) -> (StreamConsumerEnd, ConsumerWatch) {
        let tracker = InFlightTracker::new();
        let guard = tracker.start(WorkKind::Stream, &Arc::from("s"));
        sessions
            .open_consumer(
                id,
                SenderAddress::default(),
                SenderAddress::default(),
                guard,
            )
            .expect("a fresh session opens")
    }

    #[test]
    fn frames_reach_their_session_and_the_first_names_the_producer() {
        let sessions = StreamSessions::default();
        let (mut end, watch) = session(&sessions, "c");
        assert!(matches!(
            sessions.route_to_consumer(chunk("c", 0), Some("p.reply.x")),
            Routed::Delivered
        ));
        assert_eq!(
            end.frames.try_recv().map(|f| f.payload["sequence"].clone()),
            Ok(Value::from(0))
        );
        assert_eq!(watch.producer.borrow().as_deref(), Some("p.reply.x"));
    }

    #[test]
    fn a_frame_for_no_session_is_counted_and_answered_unless_terminal() {
        let sessions = StreamSessions::default();
        let answered = sessions.route_to_consumer(chunk("gone", 1), Some("p.reply.x"));
        assert!(matches!(answered, Routed::Unmatched { reply_to: Some(q) } if q == "p.reply.x"));
        let done = frame(
            SenderAddress::default(),
            "gone",
            FrameType::Complete,
            2,
            None,
        );
        let quiet = sessions.route_to_consumer(done, Some("p.reply.x"));
        assert!(matches!(quiet, Routed::Unmatched { reply_to: None }));
        assert_eq!(sessions.unmatched(), 2);
    }

    #[test]
    fn a_reader_that_falls_behind_gets_an_error_frame_and_the_producer_is_named() {
        let sessions = StreamSessions::default();
        let (mut end, _watch) = session(&sessions, "slow");
        for seq in 0..STREAM_FRAME_BUFFER as u64 {
            assert!(matches!(
                sessions.route_to_consumer(chunk("slow", seq), Some("p.reply.x")),
                Routed::Delivered
            ));
        }
        let overflow = sessions.route_to_consumer(chunk("slow", 999), Some("p.reply.x"));
        assert!(matches!(overflow, Routed::Overflowed { producer: Some(q) } if q == "p.reply.x"));
        let mut last = None;
        while let Ok(f) = end.frames.try_recv() {
            last = Some(f);
        }
        let last = last.expect("frames were buffered");
        assert_eq!(frame_type(&last), Some(FrameType::Error));
        assert_eq!(last.payload["error"]["status"], Value::from(503));
    }

    #[test]
    fn ending_all_sessions_fails_consumers_and_cancels_producers() {
        let sessions = StreamSessions::default();
        let (mut end, _watch) = session(&sessions, "a");
        let slot = sessions
            .open_producer("b", "p.reply.x", SenderAddress::default())
            .expect("a fresh producer session");
        assert_eq!(sessions.end_all(CONNECTION_LOST, false), 2);
        let failed = end.frames.try_recv().expect("an error frame");
        assert_eq!(frame_type(&failed), Some(FrameType::Error));
        assert_eq!(slot.cancelled.borrow().as_deref(), Some(CONNECTION_LOST));
        let again = || sessions.open_producer("b", "p.reply.x", SenderAddress::default());
        assert!(again().is_none(), "still running");
        drop(slot);
        assert!(again().is_some(), "removed when it ends");
    }
}
