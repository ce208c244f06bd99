//! Streams: sessions of ordered frames between the instance that opened them and the one
//! instance that serves them.
//!
//! * **Open**: the opener registers a *consumer session* under the session's `correlationId`,
//!   then publishes the open frame `mandatory`, with confirms, through the default exchange
//!   straight to the endpoint's stream queue (`P.stream.<service>.<version>.<stream>`,
//!   competing consumers, like a command queue), naming its reply queue in `reply_to`. No
//!   queue: 502 at once.
//! * **Serve**: the instance that takes the open frame acks it and runs the handler in a task
//!   with a *producer session*. A forwarder publishes every frame the handler writes, in order,
//!   each confirmed before the next, through the default exchange straight to the opener's
//!   reply queue, with its own reply queue in `reply_to`. No stream frame ever travels
//!   through the headers exchange, so none reaches a subscription queue.
//! * **Route**: each reply-queue consumer hands `stream` frames to the session table here, by
//!   `correlationId` and by the [`STREAM_TO`] header that says which end the frame is for (one
//!   instance can be both ends of a session). The consumer end learns the producer's reply
//!   queue from the first frame; a cancel goes there as a `cancel` frame and turns the
//!   producer's `cancelled` to `Some(reason)`.
//!
//! Sessions are at most once and live on connections: when the opener's connection drops,
//! its consumer sessions end at once with a 503 error frame, and the producer's next publish
//! to the vanished reply queue comes back unroutable, which cancels it; when the producer's
//! connection drops, its sessions are cancelled (`connection to the broker lost`). A frame
//! for a session this instance does not know (it ended, or died with an earlier connection)
//! is dropped with a warning, counted with the unmatched responses, and answered with a
//! cancel so that its producer stops.
//!
//! Backpressure: the producer waits on a bounded buffer that the forwarder empties at the
//! broker's pace. The consumer's buffer ([`STREAM_FRAME_BUFFER`] frames) is filled by the
//! reply consumer, which also completes every invocation of the instance and so must never
//! wait for one slow reader: when a reader lets its buffer fill up, its session fails with a
//! 503 error frame (held in a slot kept free for it) and the producer is cancelled.
//!
//! Which frames are valid, the one terminal frame and the session timeout are core's business
//! (`purista_core::stream`); this file only transports frames.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::FutureExt;
use lapin::BasicProperties;
use parking_lot::Mutex;
use purista_core::inflight::InFlightGuard;
use purista_core::stream::{FrameType, frame, frame_type, session_error_frame};
use purista_core::{
    Address, BridgeError, Envelope, MessageType, SenderAddress, StatusCode, StreamConsumerEnd,
    StreamHandler, StreamProducerEnd, WorkKind,
};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::bridge::Shared;
use crate::headers::{self, STREAM_TO, STREAM_TO_CONSUMER, STREAM_TO_PRODUCER};
use crate::publish::{self, Outgoing, Verdict};
use crate::registry::Registration;

/// Frames buffered per session end before the producer waits (the in-memory bridge's figure).
pub const STREAM_FRAME_BUFFER: usize = 256;

/// Why a producer is cancelled when the consumer end is gone.
const CONSUMER_GONE: &str = "stream consumer went away";
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
fn error_frame(origin: &SenderAddress, correlation_id: &str, reason: &str) -> Envelope {
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
    correlation_id: String,
    /// The opener, sender of the session's cancel.
    opener: SenderAddress,
    frames: mpsc::Sender<Envelope>,
    cancel: watch::Receiver<Option<String>>,
    producer: watch::Receiver<Option<String>>,
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

    fn is_terminal(&self, correlation_id: &str) -> bool {
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
    fn open_producer(
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
struct ProducerSlot<'a> {
    sessions: &'a StreamSessions,
    correlation_id: String,
    cancelled: watch::Receiver<Option<String>>,
}

impl Drop for ProducerSlot<'_> {
    fn drop(&mut self) {
        self.sessions.producers.lock().remove(&self.correlation_id);
    }
}

/// Routes a frame that reached this instance's reply queue. Never waits: anything to publish
/// is done in a task.
pub(crate) fn route(shared: &Arc<Shared>, frame: Envelope, properties: &BasicProperties) {
    let to = headers::get_str(properties.headers().as_ref(), STREAM_TO);
    let reply_to = properties.reply_to().as_ref().map(|q| q.as_str());
    if to == Some(STREAM_TO_PRODUCER) {
        let correlation_id = frame.correlation_id.as_deref().unwrap_or("");
        if frame_type(&frame) != Some(FrameType::Cancel) {
            tracing::debug!(
                correlation_id,
                "non-cancel stream frame for a producer ignored"
            );
            return;
        }
        let reason = frame
            .payload
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("cancelled");
        if !shared.streams.cancel_producer(correlation_id, reason) {
            tracing::debug!(
                correlation_id,
                "cancel for a stream session that already ended"
            );
        }
        return;
    }
    // A cancel this instance answers with comes from the consumer the frame was for.
    let consumer = match &frame.receiver {
        Some(receiver) => origin(receiver, &shared.instance_id),
        None => SenderAddress::default(),
    };
    let correlation_id = frame.correlation_id.clone().unwrap_or_default();
    let (queue, reason) = match shared.streams.route_to_consumer(frame, reply_to) {
        Routed::Delivered => return,
        Routed::Unmatched { reply_to } => (reply_to, "no such stream session"),
        Routed::Overflowed { producer } => (producer, "stream consumer fell behind"),
    };
    let Some(queue) = queue else { return };
    let task_shared = shared.clone();
    let label: Arc<str> = correlation_id.clone().into();
    shared.tasks.spawn(WorkKind::Stream, label, async move {
        send_cancel(&task_shared, &queue, &correlation_id, consumer, reason).await;
    });
}

/// Publishes a `cancel` frame from `consumer` to a producer's reply queue. Best effort: a
/// producer that is gone needs no cancel.
async fn send_cancel(
    shared: &Shared,
    queue: &str,
    correlation_id: &str,
    consumer: SenderAddress,
    reason: &str,
) {
    let Some(session) = shared.current() else {
        return;
    };
    let cancel = frame(
        consumer,
        correlation_id,
        FrameType::Cancel,
        0,
        Some(("reason", Value::String(reason.to_string()))),
    );
    let body = cancel.encode();
    let reply_queue = shared.topology.reply_queue();
    let published = session
        .publish(Outgoing {
            exchange: "",
            routing_key: queue,
            mandatory: false,
            body: &body,
            properties: publish::stream_properties(&cancel, STREAM_TO_PRODUCER, &reply_queue),
        })
        .await;
    if let Err(error) = published {
        tracing::debug!(correlation_id, %error, "a stream cancel could not be published");
    }
}

/// Runs for the life of a consumer session: carries the consumer's cancel (or its going away)
/// to the producer, then removes the session once the reader is gone.
pub(crate) async fn watch_consumer(shared: Arc<Shared>, watch: ConsumerWatch) {
    let ConsumerWatch {
        correlation_id,
        opener,
        frames,
        mut cancel,
        mut producer,
    } = watch;
    let reason = tokio::select! {
        wanted = cancel.wait_for(Option::is_some) => match wanted {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => CONSUMER_GONE.to_string(),
        },
        () = frames.closed() => CONSUMER_GONE.to_string(),
    };
    if !shared.streams.is_terminal(&correlation_id) {
        let known = producer.borrow().clone();
        let queue = match known {
            Some(queue) => Some(queue),
            // No frame yet: wait for the first one, as long as the reader is there. A reader
            // gone before that is answered when the frame comes (an unknown session).
            None => tokio::select! {
                named = producer.wait_for(Option::is_some) => named.ok().and_then(|q| q.clone()),
                () = frames.closed() => None,
            },
        };
        if let Some(queue) = queue {
            tracing::debug!(%correlation_id, %reason, "stream session cancelled by its consumer");
            send_cancel(&shared, &queue, &correlation_id, opener, &reason).await;
        }
    }
    frames.closed().await;
    shared.streams.remove_consumer(&correlation_id);
}

/// Serves one open frame taken from a stream queue: ack, then the handler and the forwarder of
/// its frames, in a task. Nothing here can panic into the consumer loop: decoding is total and
/// the handler runs behind `catch_unwind`.
pub(crate) fn serve_open(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    handler: Arc<dyn StreamHandler>,
    delivery: lapin::message::Delivery,
) {
    let task_shared = shared.clone();
    let task_reg = reg.clone();
    // Counted until the open frame is acked: an unregister must not close the channel first.
    let active = reg.activity.enter();
    let run = async move {
        let (shared, reg) = (task_shared, task_reg);
        let lapin::message::Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        let opened = decode_open(&shared, &reg, &data, &properties);
        let acked = acker.ack(lapin::options::BasicAckOptions::default()).await;
        drop(active);
        let Some((open, reply_to)) = opened else {
            return;
        };
        let correlation_id = open.correlation_id.clone().unwrap_or_default();
        if let Err(error) = acked {
            tracing::debug!(registration = %reg.label, correlation_id, %error, "acking an open frame failed; the broker hands it out again");
            return;
        }
        let mut origin = open
            .receiver
            .as_ref()
            .map(SenderAddress::from)
            .unwrap_or_default();
        origin.instance_id.clone_from(&shared.instance_id);
        let Some(slot) = shared
            .streams
            .open_producer(&correlation_id, &reply_to, origin.clone())
        else {
            tracing::warn!(registration = %reg.label, correlation_id, "open frame for a session this instance already serves dropped");
            return;
        };
        let (frames_tx, frames_rx) = mpsc::channel(STREAM_FRAME_BUFFER);
        let producer = StreamProducerEnd {
            frames: frames_tx,
            cancelled: slot.cancelled.clone(),
        };
        let open = Arc::new(open);
        let serving = AssertUnwindSafe(handler.open(open, producer)).catch_unwind();
        let forwarding = forward(&shared, frames_rx, &reply_to, &correlation_id, origin);
        let (served, ()) = tokio::join!(serving, forwarding);
        if served.is_err() {
            tracing::error!(registration = %reg.label, correlation_id, "stream handler panicked");
        }
        drop(slot);
    };
    if !shared.tasks.spawn(WorkKind::Stream, reg.label.clone(), run) {
        tracing::debug!(registration = %reg.label, "bridge shut down: open frame left to the broker");
    }
}

/// The open frame and the opener's reply queue, or `None` for poison (counted and warned
/// about; the caller acks it away).
fn decode_open(
    shared: &Shared,
    reg: &Registration,
    data: &[u8],
    properties: &BasicProperties,
) -> Option<(Envelope, String)> {
    let open = match Envelope::decode_with_limit(data, shared.config.max_payload_bytes) {
        Ok(open) => open,
        Err(error) => {
            shared.count_poison();
            tracing::warn!(registration = %reg.label, queue = %reg.queue, %error, bytes = data.len(), "undecodable open frame dropped");
            return None;
        }
    };
    let reply_to = properties.reply_to().as_ref().map(|q| q.to_string());
    let valid = open.message_type == MessageType::Stream
        && frame_type(&open) == Some(FrameType::Open)
        && open.correlation_id.is_some();
    match reply_to {
        Some(reply_to) if valid => Some((open, reply_to)),
        _ => {
            shared.count_poison();
            tracing::warn!(registration = %reg.label, queue = %reg.queue, message_id = %open.id, message_type = %open.message_type, "not an open frame with a correlationId and a reply queue; dropped");
            None
        }
    }
}

/// Publishes the producer's frames in order to the opener's reply queue until the handler is
/// done.
///
/// A frame the broker cannot route means the opener (and its reply queue) is gone: the
/// producer is cancelled and the forwarder stops, which also fails the producer's further
/// writes. A publish that fails with this instance's connection cancels the producer too, but
/// the opener is still there: the session's remaining chunks are dropped and only its terminal
/// frame (the handler's answer to the cancel) goes out once reconnected, so the opener learns
/// at once that the session ended instead of waiting for its timeout.
async fn forward(
    shared: &Shared,
    mut frames: mpsc::Receiver<Envelope>,
    reply_to: &str,
    correlation_id: &str,
    origin: SenderAddress,
) {
    let mut ended = false;
    let mut lost = false;
    while let Some(frame) = frames.recv().await {
        let terminal = frame_type(&frame).is_some_and(FrameType::is_terminal);
        if lost && !terminal {
            continue;
        }
        let published = if lost {
            publish_when_connected(shared, &frame, reply_to).await
        } else {
            publish_frame(shared, &frame, reply_to).await
        };
        match published {
            Ok(()) => ended |= terminal,
            Err(CONNECTION_LOST) if !lost => {
                tracing::debug!(correlation_id, "stream session lost its connection");
                lost = true;
                shared
                    .streams
                    .cancel_producer(correlation_id, CONNECTION_LOST);
            }
            Err(reason) => {
                tracing::debug!(
                    correlation_id,
                    reason,
                    "stream session ended by the transport"
                );
                shared.streams.cancel_producer(correlation_id, reason);
                return;
            }
        }
    }
    if !ended {
        // The handler dropped its end without a terminal frame (a raw handler that gave up or
        // panicked, or the terminal was lost): end the consumer's session now rather than at
        // its timeout.
        let failed = error_frame(
            &origin,
            correlation_id,
            "stream producer closed the session without a terminal frame",
        );
        let _ = publish_when_connected(shared, &failed, reply_to).await;
    }
}

/// How long a session's last frame waits for this instance to reconnect.
const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// [`publish_frame`], after waiting (at most [`RECONNECT_WAIT`]) for a live connection.
async fn publish_when_connected(
    shared: &Shared,
    frame: &Envelope,
    reply_to: &str,
) -> Result<(), &'static str> {
    let mut session = shared.session.subscribe();
    let live = async {
        session
            .wait_for(|s| s.as_ref().is_some_and(|s| s.is_live()))
            .await
            .is_ok()
    };
    if tokio::time::timeout(RECONNECT_WAIT, live).await != Ok(true) {
        return Err(CONNECTION_LOST);
    }
    publish_frame(shared, frame, reply_to).await
}

/// Publishes one frame to a consumer's reply queue; `Err(reason)` when the session cannot go on.
async fn publish_frame(
    shared: &Shared,
    frame: &Envelope,
    reply_to: &str,
) -> Result<(), &'static str> {
    let session = shared.current().ok_or(CONNECTION_LOST)?;
    let body = frame.encode();
    let reply_queue = shared.topology.reply_queue();
    let verdict = session
        .publish(Outgoing {
            exchange: "",
            routing_key: reply_to,
            mandatory: true,
            body: &body,
            properties: publish::stream_properties(frame, STREAM_TO_CONSUMER, &reply_queue),
        })
        .await
        .map_err(|_| CONNECTION_LOST)?;
    match verdict {
        Verdict::Confirmed => Ok(()),
        Verdict::Returned { .. } => Err(CONSUMER_GONE),
        Verdict::Nacked => Err("the broker refused a stream frame"),
    }
}

/// Ends `running` producer sessions (from [`StreamSessions::running_producers`]) that a
/// shutdown gave up on (their tasks are aborted): each opener gets a 503 error frame now
/// instead of waiting for its timeout. Best effort, bounded by `CLOSE_NOTICE_TIMEOUT`.
pub(crate) async fn abandon_producers(
    shared: &Shared,
    running: &[(String, String, SenderAddress)],
    reason: &str,
) {
    let notices = running
        .iter()
        .map(|(correlation_id, reply_to, origin)| async move {
            let failed = error_frame(origin, correlation_id, reason);
            let _ = publish_frame(shared, &failed, reply_to).await;
        });
    let all = futures::future::join_all(notices);
    if tokio::time::timeout(CLOSE_NOTICE_TIMEOUT, all)
        .await
        .is_err()
    {
        tracing::debug!("not every stream opener could be told of the shutdown");
    }
}

/// How long a shutdown tries to tell openers that their sessions were abandoned.
const CLOSE_NOTICE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The address a session's made-up frames come from: the endpoint, on this instance.
pub(crate) fn origin(receiver: &Address, instance_id: &str) -> SenderAddress {
    let mut origin = SenderAddress::from(receiver);
    origin.instance_id = instance_id.to_string();
    origin
}

#[cfg(test)]
mod tests {
    use purista_core::InFlightTracker;

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
