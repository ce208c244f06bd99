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

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use lapin::BasicProperties;
use purista_core::stream::{FrameType, frame, frame_type};
use purista_core::{
    Address, BridgeError, Envelope, MessageType, SenderAddress, StreamHandler, StreamProducerEnd,
    WorkKind,
};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::delivery::Taken;
use crate::headers::{self, STREAM_TO, STREAM_TO_CONSUMER, STREAM_TO_PRODUCER};
use crate::publish::{self, Outgoing, Verdict};
use crate::registry::Registration;
use crate::shared::Shared;
use crate::stream_table::{
    CONNECTION_LOST, CONSUMER_GONE, ConsumerWatch, Routed, STREAM_FRAME_BUFFER, error_frame,
};

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
        if !shared.work.streams.cancel_producer(correlation_id, reason) {
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
    let (queue, reason) = match shared.work.streams.route_to_consumer(frame, reply_to) {
        Routed::Delivered => return,
        Routed::Unmatched { reply_to } => (reply_to, "no such stream session"),
        Routed::Overflowed { producer } => (producer, "stream consumer fell behind"),
    };
    let Some(queue) = queue else { return };
    let task_shared = shared.clone();
    let label: Arc<str> = correlation_id.clone().into();
    shared
        .work
        .tasks
        .spawn(WorkKind::Stream, label, async move {
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
    let Some(session) = shared.link.current() else {
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
            properties: publish::stream_properties(&cancel, STREAM_TO_PRODUCER, reply_queue),
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
    if !shared.work.streams.is_terminal(&correlation_id) {
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
    shared.work.streams.remove_consumer(&correlation_id);
}

/// Serves one open frame taken from a stream queue: ack, then the handler and the forwarder of
/// its frames, in a task. Nothing here can panic into the consumer loop: decoding is total and
/// the handler runs behind `catch_unwind`.
pub(crate) fn serve_open(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    handler: Arc<dyn StreamHandler>,
    taken: Taken,
) {
    let task_shared = shared.clone();
    let task_reg = reg.clone();
    // Counted until the open frame is acked: an unregister must not close the channel first.
    let active = reg.activity.enter();
    let run = async move {
        let (shared, reg) = (task_shared, task_reg);
        let mut taken = taken;
        let turn = taken.turn(&shared, &reg).await;
        let Taken { delivery, held, .. } = taken;
        let lapin::message::Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        let opened = decode_open(&shared, &reg, &data, &properties);
        let acked = acker.ack(lapin::options::BasicAckOptions::default()).await;
        if acked.is_ok()
            && let Some(held) = held
        {
            held.settled();
        }
        drop(turn);
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
        let Some(slot) =
            shared
                .work
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
    if !shared
        .work
        .tasks
        .spawn(WorkKind::Stream, reg.label.clone(), run)
    {
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
            shared.ledger.count_poison();
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
            shared.ledger.count_poison();
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
                    .work
                    .streams
                    .cancel_producer(correlation_id, CONNECTION_LOST);
            }
            Err(reason) => {
                tracing::debug!(
                    correlation_id,
                    reason,
                    "stream session ended by the transport"
                );
                shared.work.streams.cancel_producer(correlation_id, reason);
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

/// Why a session ends when one of its frames cannot fit the broker's frame.
const FRAME_TOO_LARGE: &str = "a stream frame's headers are too large for the broker";

/// How long a session's last frame waits for this instance to reconnect.
const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// [`publish_frame`], after waiting (at most [`RECONNECT_WAIT`]) for a live connection.
async fn publish_when_connected(
    shared: &Shared,
    frame: &Envelope,
    reply_to: &str,
) -> Result<(), &'static str> {
    let mut session = shared.link.subscribe();
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
    let session = shared.link.current().ok_or(CONNECTION_LOST)?;
    let body = frame.encode();
    let reply_queue = shared.topology.reply_queue();
    let verdict = session
        .publish(Outgoing {
            exchange: "",
            routing_key: reply_to,
            mandatory: true,
            body: &body,
            properties: publish::stream_properties(frame, STREAM_TO_CONSUMER, reply_queue),
        })
        .await
        .map_err(|error| match error {
            BridgeError::TooLarge { .. } => FRAME_TOO_LARGE,
            _ => CONNECTION_LOST,
        })?;
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
