//! Stream sessions: frames on the wire, the consumer's [`StreamReader`] and the producer's
//! [`StreamWriter`].
//!
//! A session is one `correlationId`. Frames travel as `messageType: stream` envelopes whose
//! payload is `{frameType, seq, chunk | final | error | reason | payload+parameter}`. Exactly one
//! terminal frame (`complete`, `error`, `cancel`) ends a session; both ends enforce it here, in
//! core: the writer refuses to write after a terminal, the reader ignores (with a warning) any
//! frame after a terminal or after the session timeout.

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

/// Builds a stream frame envelope for session `correlation_id`.
pub fn frame(
    sender: SenderAddress,
    correlation_id: &str,
    kind: FrameType,
    seq: u64,
    body: Option<(&str, Value)>,
) -> Envelope {
    let mut e = Envelope::new(MessageType::Stream, sender);
    e.correlation_id = Some(correlation_id.to_string());
    let mut p = Map::with_capacity(3);
    p.insert(
        "frameType".into(),
        serde_json::to_value(kind).unwrap_or(Value::Null),
    );
    p.insert("seq".into(), Value::from(seq));
    if let Some((k, v)) = body {
        p.insert(k.to_string(), v);
    }
    e.payload = Value::Object(p);
    e
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
}

impl StreamItem {
    /// True for every variant but `Chunk`.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, StreamItem::Chunk(_))
    }
}

/// The consumer's end of a session. Yields chunks in order, then exactly one terminal item.
pub struct StreamReader {
    frames: mpsc::Receiver<Envelope>,
    cancel: watch::Sender<Option<String>>,
    deadline: Instant,
    finished: bool,
    ignored: u64,
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
            let frame = match tokio::time::timeout_at(self.deadline, self.frames.recv()).await {
                Err(_) => {
                    self.finished = true;
                    let _ = self.cancel.send(Some("session timeout".into()));
                    tracing::warn!(correlation_id = %self.correlation_id, "stream session timed out");
                    return Some(StreamItem::TimedOut);
                }
                Ok(None) => {
                    // Producer went away without a terminal frame.
                    self.finished = true;
                    return Some(StreamItem::Error(CommandError::local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "stream producer closed the session without a terminal frame",
                        None,
                    )));
                }
                Ok(Some(f)) => f,
            };
            let Some(kind) = frame_type(&frame) else {
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
                    let handled = frame.is_handled_error.unwrap_or(false);
                    let err = frame
                        .payload
                        .get("error")
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
/// session after the handler returns, the handler gets another.
#[derive(Clone)]
pub struct StreamWriter {
    state: std::sync::Arc<tokio::sync::Mutex<WriterState>>,
    cancelled: watch::Receiver<Option<String>>,
}

struct WriterState {
    frames: mpsc::Sender<Envelope>,
    sender: SenderAddress,
    correlation_id: String,
    template: Envelope,
    seq: u64,
    terminal: bool,
}

impl StreamWriter {
    /// Wraps a bridge's producer end for the session opened by `open`.
    pub fn new(end: StreamProducerEnd, open: &Envelope, sender: SenderAddress) -> Self {
        StreamWriter {
            state: std::sync::Arc::new(tokio::sync::Mutex::new(WriterState {
                frames: end.frames,
                sender,
                correlation_id: open.correlation_id.clone().unwrap_or_default(),
                template: open.clone(),
                seq: 0,
                terminal: false,
            })),
            cancelled: end.cancelled,
        }
    }

    /// The reason, once the consumer cancelled.
    pub fn cancelled(&self) -> Option<String> {
        self.cancelled.borrow().clone()
    }

    /// Resolves when the consumer cancels (never, if it does not).
    pub async fn on_cancel(&self) -> String {
        let mut rx = self.cancelled.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// True after a terminal frame was written.
    pub async fn is_closed(&self) -> bool {
        self.state.lock().await.terminal
    }

    async fn send(
        &self,
        kind: FrameType,
        body: Option<(&str, Value)>,
        handled: Option<bool>,
    ) -> Result<(), StreamWriteError> {
        let mut st = self.state.lock().await;
        if st.terminal {
            return Err(StreamWriteError::Closed);
        }
        if !kind.is_terminal()
            && let Some(r) = self.cancelled()
        {
            return Err(StreamWriteError::Cancelled(r));
        }
        let mut f = frame(st.sender.clone(), &st.correlation_id, kind, st.seq, body);
        f.propagate_from(&st.template);
        f.receiver = Some(st.template.sender.to_address());
        f.is_handled_error = handled;
        st.seq += 1;
        if kind.is_terminal() {
            st.terminal = true;
        }
        let frames = st.frames.clone();
        drop(st);
        // A consumer that went away is not an error for the producer: it is a cancel.
        if frames.send(f).await.is_err() && !kind.is_terminal() {
            return Err(StreamWriteError::Cancelled("consumer went away".into()));
        }
        Ok(())
    }

    /// Sends the `start` frame (the runtime does this before the handler runs).
    pub async fn start(&self) -> Result<(), StreamWriteError> {
        self.send(FrameType::Start, None, None).await
    }

    /// Writes one chunk.
    pub async fn write(&self, chunk: impl Serialize) -> Result<(), StreamWriteError> {
        let v =
            serde_json::to_value(chunk).map_err(|e| StreamWriteError::Serialize(e.to_string()))?;
        self.send(FrameType::Chunk, Some(("chunk", v)), None).await
    }

    /// Writes a heartbeat.
    pub async fn heartbeat(&self) -> Result<(), StreamWriteError> {
        self.send(FrameType::Heartbeat, None, None).await
    }

    /// Ends the session successfully.
    pub async fn complete(&self, final_value: Option<Value>) -> Result<(), StreamWriteError> {
        self.send(FrameType::Complete, final_value.map(|v| ("final", v)), None)
            .await
    }

    /// Ends the session with an error; `handled` is carried as `isHandledError`.
    pub async fn fail(&self, error: ErrorPayload, handled: bool) -> Result<(), StreamWriteError> {
        let v = serde_json::to_value(&error).unwrap_or(Value::Null);
        self.send(FrameType::Error, Some(("error", v)), Some(handled))
            .await
    }

    /// Ends the session as cancelled.
    pub async fn cancel(&self, reason: impl Into<String>) -> Result<(), StreamWriteError> {
        self.send(
            FrameType::Cancel,
            Some(("reason", Value::String(reason.into()))),
            None,
        )
        .await
    }
}
