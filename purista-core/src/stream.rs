//! Stream sessions: frames on the wire, the consumer's [`StreamReader`] and the producer's
//! [`StreamWriter`].
//!
//! A session is one `correlationId`. Frames travel as `messageType: stream` envelopes in
//! PURISTA's shape: the payload is `{frameType, sequence, chunk | final | error | reason}`, an
//! error frame's `error` is `{status, message, isHandledError, data?, traceId?}`, and the open
//! frame is `{frameType: "open", payload, parameter, ttl}` (`ttl`, the session timeout in ms, is
//! ours: a PURISTA consumer does not send it, and a producer that does not know it ignores it).
//!
//! Exactly one terminal frame (`complete`, `error`, `cancel`) ends a session; both ends enforce
//! it here, in core: the writer refuses to write after a terminal, the reader ignores (with a
//! warning) any frame after a terminal or after the session timeout.
//!
//! Frames are numbered from 0 in the order the producer writes them; the writer assigns the
//! number and hands the frame to the bridge in one critical section, so concurrent writers
//! never reorder. The reader checks the numbers: a duplicate is ignored with a warning, a gap
//! (frames lost in transit) ends the session with [`StreamItem::FramesLost`] and cancels the
//! producer, unless the frame after the gap is itself an `error` or `cancel`: the session
//! failed anyway, and that frame's reason is returned. A frame without a number (a bridge
//! ending a session it lost, see [`session_error_frame`]) is not checked.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::bridge::{StreamConsumerEnd, StreamProducerEnd};
use crate::envelope::{Envelope, MessageType, SenderAddress};
use crate::error::{CommandError, ErrorPayload, StatusCode};

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FrameType {
    /// Request to open a session (payload + parameter).
    Open,
    /// The producer accepted the session.
    Start,
    /// One item.
    Chunk,
    /// Terminal success, optional final value.
    Complete,
    /// Terminal failure.
    Error,
    /// Terminal cancellation.
    Cancel,
    /// Keep-alive.
    Heartbeat,
}

impl FrameType {
    /// `complete`, `error` or `cancel`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            FrameType::Complete | FrameType::Error | FrameType::Cancel
        )
    }
}

/// Reads the frame type of a stream envelope.
pub fn frame_type(e: &Envelope) -> Option<FrameType> {
    e.payload
        .get("frameType")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Reads the sequence number of a stream frame (`payload.sequence`), if it has one.
pub fn frame_sequence(e: &Envelope) -> Option<u64> {
    e.payload.get(SEQUENCE).and_then(Value::as_u64)
}

/// The payload field that numbers frames.
const SEQUENCE: &str = "sequence";

/// Builds a stream frame envelope for session `correlation_id`, numbered `sequence`.
pub fn frame(
    sender: SenderAddress,
    correlation_id: &str,
    kind: FrameType,
    sequence: u64,
    body: Option<(&str, Value)>,
) -> Envelope {
    let mut e = unnumbered_frame(sender, correlation_id, kind, body);
    if let Value::Object(p) = &mut e.payload {
        p.insert(SEQUENCE.into(), Value::from(sequence));
    }
    e
}

fn unnumbered_frame(
    sender: SenderAddress,
    correlation_id: &str,
    kind: FrameType,
    body: Option<(&str, Value)>,
) -> Envelope {
    let mut e = Envelope::new(MessageType::Stream, sender);
    e.correlation_id = Some(correlation_id.to_string());
    let mut p = Map::with_capacity(3);
    p.insert(
        "frameType".into(),
        serde_json::to_value(kind).unwrap_or(Value::Null),
    );
    if let Some((k, v)) = body {
        p.insert(k.to_string(), v);
    }
    e.payload = Value::Object(p);
    e
}

/// The `error` of an error frame in PURISTA's shape: the error payload with `isHandledError`.
pub fn frame_error(error: &ErrorPayload, handled: bool) -> Value {
    let mut v = serde_json::to_value(error).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        o.insert("isHandledError".into(), Value::Bool(handled));
    }
    v
}

/// An unnumbered, unhandled error frame that a bridge writes to end a session it lost (for
/// example on connection loss). Readers accept it whatever number they expect next.
///
/// ```
/// use purista_core::stream::{FrameType, frame_sequence, frame_type, session_error_frame};
/// use purista_core::{SenderAddress, StatusCode};
/// let f = session_error_frame(SenderAddress::default(), "session-1", StatusCode::SERVICE_UNAVAILABLE, "connection lost");
/// assert_eq!(frame_type(&f), Some(FrameType::Error));
/// assert_eq!(frame_sequence(&f), None);
/// assert_eq!(f.payload["error"]["isHandledError"], false);
/// ```
pub fn session_error_frame(
    sender: SenderAddress,
    correlation_id: &str,
    status: StatusCode,
    message: &str,
) -> Envelope {
    let error = ErrorPayload {
        status,
        message: message.to_string(),
        data: None,
        trace_id: None,
    };
    unnumbered_frame(
        sender,
        correlation_id,
        FrameType::Error,
        Some(("error", frame_error(&error, false))),
    )
}

/// The open frame's field carrying the session timeout in milliseconds.
pub const OPEN_TTL_FIELD: &str = "ttl";

/// The frame that opens session `correlation_id`: `{frameType: "open", payload, parameter,
/// ttl}` (unnumbered, as PURISTA's). The caller sets the receiver and the flow ids.
///
/// ```
/// use std::time::Duration;
/// use purista_core::stream::{FrameType, frame_type, open_frame, open_ttl};
/// use purista_core::SenderAddress;
/// let open = open_frame(SenderAddress::default(), "s-1", "report-7".into(), serde_json::json!({}), Duration::from_secs(5));
/// assert_eq!(frame_type(&open), Some(FrameType::Open));
/// assert_eq!(open.payload["payload"], "report-7");
/// assert_eq!(open_ttl(&open), Some(Duration::from_secs(5)));
/// ```
pub fn open_frame(
    sender: SenderAddress,
    correlation_id: &str,
    payload: Value,
    parameter: Value,
    ttl: std::time::Duration,
) -> Envelope {
    let mut open = unnumbered_frame(sender, correlation_id, FrameType::Open, None);
    if let Value::Object(p) = &mut open.payload {
        p.insert("payload".into(), payload);
        p.insert("parameter".into(), parameter);
        p.insert(
            OPEN_TTL_FIELD.into(),
            Value::from(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        );
    }
    open
}

/// The session timeout an open frame asks for, if it carries one.
pub fn open_ttl(open: &Envelope) -> Option<std::time::Duration> {
    open.payload
        .get(OPEN_TTL_FIELD)
        .and_then(Value::as_u64)
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

/// What a consumer reads from a session.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// One chunk.
    Chunk(Value),
    /// Terminal: success with an optional final value.
    Complete(Option<Value>),
    /// Terminal: the producer failed.
    Error(CommandError),
    /// Terminal: the session was cancelled (by the consumer or the producer).
    Cancelled(String),
    /// Terminal: the session timeout passed first.
    TimedOut,
    /// Terminal: frames were lost in transit (a gap in the sequence numbers); the session was
    /// cancelled, since what follows the gap is incomplete.
    FramesLost {
        /// The sequence number the reader expected.
        expected: u64,
        /// The number of the frame that arrived instead.
        received: u64,
    },
}

impl StreamItem {
    /// True for every variant but `Chunk`.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, StreamItem::Chunk(_))
    }
}

/// The consumer's end of a session. Yields chunks in order, then exactly one terminal item.
///
/// The session ends at its deadline for both ends: the producer is stopped then, and the reader
/// returns [`StreamItem::TimedOut`] for a call made after it, even when frames that arrived
/// earlier are still unread. A consumer that needs longer to work through a session asks for
/// a longer timeout when it opens it.
pub struct StreamReader {
    frames: mpsc::Receiver<Envelope>,
    cancel: watch::Sender<Option<String>>,
    deadline: Instant,
    finished: bool,
    ignored: u64,
    next_sequence: u64,
    correlation_id: String,
}

impl StreamReader {
    /// Wraps a bridge's consumer end; the session ends at `deadline` at the latest.
    pub fn new(end: StreamConsumerEnd, correlation_id: String, deadline: Instant) -> Self {
        StreamReader {
            frames: end.frames,
            cancel: end.cancel,
            deadline,
            finished: false,
            ignored: 0,
            next_sequence: 0,
            correlation_id,
        }
    }

    /// The next item; `None` after the terminal item has been returned.
    pub async fn next(&mut self) -> Option<StreamItem> {
        if self.finished {
            self.drain_ignored();
            return None;
        }
        loop {
            let received = tokio::time::timeout_at(self.deadline, self.frames.recv()).await;
            let frame = match received {
                // A frame only read once the deadline passed came too late (the producer ends
                // the session at the same deadline, so its `cancel` may already be here).
                Ok(Some(f)) if Instant::now() < self.deadline => f,
                Ok(None) => {
                    // Producer went away without a terminal frame.
                    self.finished = true;
                    return Some(StreamItem::Error(CommandError::local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "stream producer closed the session without a terminal frame",
                        None,
                    )));
                }
                timed_out => {
                    if matches!(timed_out, Ok(Some(_))) {
                        self.ignored += 1;
                    }
                    self.finished = true;
                    let _ = self.cancel.send(Some("session timeout".into()));
                    tracing::warn!(correlation_id = %self.correlation_id, "stream session timed out");
                    return Some(StreamItem::TimedOut);
                }
            };
            let kind = frame_type(&frame);
            if let Some(sequence) = frame_sequence(&frame) {
                if sequence < self.next_sequence {
                    self.ignored += 1;
                    tracing::warn!(correlation_id = %self.correlation_id, sequence, "ignoring a duplicate stream frame");
                    continue;
                }
                let failed = matches!(kind, Some(FrameType::Error | FrameType::Cancel));
                if sequence > self.next_sequence && failed {
                    // The session failed anyway; its own reason says more than the gap.
                    tracing::warn!(correlation_id = %self.correlation_id, expected = self.next_sequence, received = sequence, "stream frames lost before the session failed");
                } else if sequence > self.next_sequence {
                    self.finished = true;
                    let expected = self.next_sequence;
                    let _ = self.cancel.send(Some("stream frames lost".into()));
                    tracing::warn!(correlation_id = %self.correlation_id, expected, received = sequence, "stream frames lost; session cancelled");
                    return Some(StreamItem::FramesLost {
                        expected,
                        received: sequence,
                    });
                }
                self.next_sequence = sequence + 1;
            }
            let Some(kind) = kind else {
                self.ignored += 1;
                tracing::warn!(correlation_id = %self.correlation_id, "ignoring stream frame without frameType");
                continue;
            };
            let item = match kind {
                FrameType::Open | FrameType::Start | FrameType::Heartbeat => continue,
                FrameType::Chunk => {
                    StreamItem::Chunk(frame.payload.get("chunk").cloned().unwrap_or(Value::Null))
                }
                FrameType::Complete => StreamItem::Complete(
                    frame.payload.get("final").cloned().filter(|v| !v.is_null()),
                ),
                FrameType::Error => {
                    let error = frame.payload.get("error");
                    // PURISTA's place for the flag; earlier purista-rs wrote it on the envelope.
                    let handled = error
                        .and_then(|e| e.get("isHandledError"))
                        .and_then(Value::as_bool)
                        .or(frame.is_handled_error)
                        .unwrap_or(false);
                    let err = error
                        .cloned()
                        .and_then(|v| serde_json::from_value::<ErrorPayload>(v).ok())
                        .map(|p| CommandError::from_payload(p, handled))
                        .unwrap_or_else(|| {
                            CommandError::unhandled(StatusCode::INTERNAL_SERVER_ERROR, None)
                        });
                    StreamItem::Error(err)
                }
                FrameType::Cancel => StreamItem::Cancelled(
                    frame
                        .payload
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or("cancelled")
                        .to_string(),
                ),
            };
            if item.is_terminal() {
                self.finished = true;
            }
            return Some(item);
        }
    }

    /// Cancels the session: the producer sees it and the session ends with `Cancelled`.
    pub fn cancel(&self, reason: impl Into<String>) {
        let _ = self.cancel.send(Some(reason.into()));
    }

    /// Frames received after the terminal item and ignored with a warning.
    pub fn ignored_frames(&mut self) -> u64 {
        self.drain_ignored();
        self.ignored
    }

    fn drain_ignored(&mut self) {
        while let Ok(f) = self.frames.try_recv() {
            self.ignored += 1;
            tracing::warn!(
                correlation_id = %self.correlation_id,
                frame = ?frame_type(&f),
                "ignoring stream frame after the session ended"
            );
        }
    }
}

/// Why a write to a stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamWriteError {
    /// The session already ended with a terminal frame.
    #[error("the stream session already ended")]
    Closed,
    /// The consumer cancelled the session.
    #[error("the stream session was cancelled: {0}")]
    Cancelled(String),
    /// A chunk could not be serialized.
    #[error("chunk could not be serialized: {0}")]
    Serialize(String),
}

/// The producer's end of a session. Cheap to clone: the runtime keeps one handle to close the
/// session after the handler returns, the handler gets another. Clones write one sequence:
/// numbering a frame and handing it to the bridge happen under one lock, so frames of
/// concurrent writers arrive in the order of their numbers.
#[derive(Clone)]
pub struct StreamWriter {
    state: std::sync::Arc<tokio::sync::Mutex<WriterState>>,
    /// The consumer's cancel, through the bridge.
    cancelled: watch::Receiver<Option<String>>,
    /// The runtime ending the session (at its deadline).
    ended: std::sync::Arc<watch::Sender<Option<String>>>,
    deadline: Option<Instant>,
}

struct WriterState {
    frames: mpsc::Sender<Envelope>,
    sender: SenderAddress,
    correlation_id: String,
    template: Envelope,
    sequence: u64,
    terminal: bool,
}

impl StreamWriter {
    /// Wraps a bridge's producer end for the session opened by `open`.
    pub fn new(end: StreamProducerEnd, open: &Envelope, sender: SenderAddress) -> Self {
        Self::continuing(end, open, sender, None)
    }

    /// [`StreamWriter::new`] whose frames carry `otp` (the producer's span) instead of the
    /// open frame's.
    pub(crate) fn continuing(
        end: StreamProducerEnd,
        open: &Envelope,
        sender: SenderAddress,
        otp: Option<String>,
    ) -> Self {
        let mut template = open.clone();
        if otp.is_some() {
            template.otp = otp;
        }
        StreamWriter {
            state: std::sync::Arc::new(tokio::sync::Mutex::new(WriterState {
                frames: end.frames,
                sender,
                correlation_id: open.correlation_id.clone().unwrap_or_default(),
                template,
                sequence: 0,
                terminal: false,
            })),
            cancelled: end.cancelled,
            ended: std::sync::Arc::new(watch::Sender::new(None)),
            deadline: None,
        }
    }

    /// The same writer, knowing the session's deadline (see [`StreamWriter::deadline`]).
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// When the session ends at the latest: the consumer's session timeout (carried in the open
    /// frame, else the producer bridge's command timeout). The runtime ends the handler then;
    /// a producer can use it to plan its work. `None` for a writer made without one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The reason, once the consumer cancelled or the session passed its deadline
    /// (`session timeout`).
    pub fn cancelled(&self) -> Option<String> {
        self.cancelled
            .borrow()
            .clone()
            .or_else(|| self.ended.borrow().clone())
    }

    /// Resolves when the consumer cancels or the session passes its deadline (never, if
    /// neither happens).
    pub async fn on_cancel(&self) -> String {
        tokio::select! {
            r = first_reason(self.cancelled.clone()) => r,
            r = first_reason(self.ended.subscribe()) => r,
        }
    }

    /// Tells the handler (through [`StreamWriter::cancelled`] and [`StreamWriter::on_cancel`])
    /// that the session is over; later writes fail with [`StreamWriteError::Cancelled`].
    pub(crate) fn end_session(&self, reason: &str) {
        self.ended.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(reason.to_string());
            }
            first
        });
    }

    /// True after a terminal frame was written.
    pub async fn is_closed(&self) -> bool {
        self.state.lock().await.terminal
    }

    async fn send(
        &self,
        kind: FrameType,
        body: Option<(&str, Value)>,
    ) -> Result<(), StreamWriteError> {
        // Held until the frame is handed over: the numbers are the order of arrival.
        let mut st = self.state.lock().await;
        if st.terminal {
            return Err(StreamWriteError::Closed);
        }
        if !kind.is_terminal()
            && let Some(r) = self.cancelled()
        {
            return Err(StreamWriteError::Cancelled(r));
        }
        let mut f = frame(
            st.sender.clone(),
            &st.correlation_id,
            kind,
            st.sequence,
            body,
        );
        f.propagate_from(&st.template);
        f.receiver = Some(st.template.sender.to_address());
        st.sequence += 1;
        if kind.is_terminal() {
            st.terminal = true;
        }
        // A consumer that went away is not an error for the producer: it is a cancel.
        if st.frames.send(f).await.is_err() && !kind.is_terminal() {
            return Err(StreamWriteError::Cancelled("consumer went away".into()));
        }
        Ok(())
    }

    /// Sends the `start` frame (the runtime does this before the handler runs).
    pub async fn start(&self) -> Result<(), StreamWriteError> {
        self.send(FrameType::Start, None).await
    }

    /// Writes one chunk.
    pub async fn write(&self, chunk: impl Serialize) -> Result<(), StreamWriteError> {
        let v =
            serde_json::to_value(chunk).map_err(|e| StreamWriteError::Serialize(e.to_string()))?;
        self.send(FrameType::Chunk, Some(("chunk", v))).await
    }

    /// Writes a heartbeat.
    pub async fn heartbeat(&self) -> Result<(), StreamWriteError> {
        self.send(FrameType::Heartbeat, None).await
    }

    /// Ends the session successfully.
    pub async fn complete(&self, final_value: Option<Value>) -> Result<(), StreamWriteError> {
        self.send(FrameType::Complete, final_value.map(|v| ("final", v)))
            .await
    }

    /// Ends the session with an error; `handled` is carried as `isHandledError` inside the
    /// frame's `error`, where PURISTA puts it.
    pub async fn fail(&self, error: ErrorPayload, handled: bool) -> Result<(), StreamWriteError> {
        self.send(
            FrameType::Error,
            Some(("error", frame_error(&error, handled))),
        )
        .await
    }

    /// Ends the session as cancelled.
    pub async fn cancel(&self, reason: impl Into<String>) -> Result<(), StreamWriteError> {
        self.send(
            FrameType::Cancel,
            Some(("reason", Value::String(reason.into()))),
        )
        .await
    }

    /// Ends the session as cancelled without waiting for room in the consumer's buffer (the
    /// runtime, at the session deadline or after the consumer cancelled). A writer clone that
    /// still holds the lock is not waited for either: the frame is then left out, and the
    /// consumer ends by its own deadline or cancel.
    pub(crate) fn abandon(&self, reason: &str) {
        let Ok(mut st) = self.state.try_lock() else {
            return;
        };
        if st.terminal {
            return;
        }
        let mut f = frame(
            st.sender.clone(),
            &st.correlation_id,
            FrameType::Cancel,
            st.sequence,
            Some(("reason", Value::String(reason.to_string()))),
        );
        f.propagate_from(&st.template);
        f.receiver = Some(st.template.sender.to_address());
        st.sequence += 1;
        st.terminal = true;
        let _ = st.frames.try_send(f);
    }
}

/// The first reason a cancel watch carries (never resolves when it carries none and closes).
async fn first_reason(mut rx: watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(r) = rx.borrow_and_update().clone() {
            return r;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
