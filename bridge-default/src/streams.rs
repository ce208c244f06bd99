//! Streams: one producer task per session, wired to the consumer with two channels.
//!
//! Opening a session picks one [`StreamMember`] of the endpoint's group (round robin, like
//! commands) and runs its handler in a task of the *producer's* bridge, counted there as
//! `stream` in-flight work until the handler returns. Frames travel over a bounded channel
//! (backpressure on the producer), cancellation over a `watch`. Which frames are valid, the one
//! terminal frame and the session timeout are core's business (its stream reader), not the
//! bridge's.

use std::sync::Arc;

use purista_core::kit::TaskSet;
use purista_core::{
    BridgeError, Envelope, InFlightTracker, StreamConsumerEnd, StreamHandler, StreamProducerEnd,
    WorkKind,
};
use tokio::sync::{mpsc, watch};

use crate::broker::EndpointMember;

/// Frames buffered per session before the producer waits.
pub const STREAM_FRAME_BUFFER: usize = 256;

/// One instance's producer of one stream endpoint.
pub(crate) struct StreamMember {
    pub(crate) instance_id: Arc<str>,
    /// The endpoint, `service@version/stream`.
    pub(crate) label: Arc<str>,
    pub(crate) handler: Arc<dyn StreamHandler>,
    /// The producer bridge's tasks and in-flight counters.
    pub(crate) tasks: Arc<TaskSet>,
    pub(crate) tracker: InFlightTracker,
}

impl EndpointMember for StreamMember {
    fn instance_id(&self) -> &str {
        &self.instance_id
    }
}

/// Starts a session on `member` with the (validated, stamped) open frame.
pub(crate) fn open(
    member: Arc<StreamMember>,
    open: Envelope,
) -> Result<StreamConsumerEnd, BridgeError> {
    let (frames_tx, frames_rx) = mpsc::channel(STREAM_FRAME_BUFFER);
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let in_flight = member.tracker.start(WorkKind::Stream, &member.label);
    let open = Arc::new(open);
    let tasks = member.tasks.clone();
    let label = member.label.clone();
    let spawned = tasks.spawn(WorkKind::Stream, label, async move {
        let _in_flight = in_flight;
        let producer = StreamProducerEnd {
            frames: frames_tx,
            cancelled: cancel_rx,
        };
        member.handler.open(open, producer).await;
    });
    if !spawned {
        return Err(BridgeError::Unavailable(
            "the producing bridge instance is shutting down".into(),
        ));
    }
    Ok(StreamConsumerEnd {
        frames: frames_rx,
        cancel: cancel_tx,
    })
}
