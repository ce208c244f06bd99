//! The instance's event pipe: one `SendEventsStream` on the generated client that carries the
//! best-effort publications of the command path — a command announced for the subscriptions
//! that watch commands, and a command's response published for them. Both were one unary
//! `SendEvent` call each (a gRPC stream opened and closed per message), whose failure was only
//! logged; on the pipe they are one message on a stream that stays open.
//!
//! KubeMQ answers a plain event on this stream only when it refuses it (the refusal is logged,
//! as a failed unary call was). The pipe takes a message only while its stream is open and its
//! buffer has room ([`EventPipe::offer`]); otherwise the caller sends it the unary way, as
//! before, so a stream that is down or a broker slower than its publishers changes nothing.
//! What the pipe holds when its stream fails is lost (events are at most once) and counted in
//! a debug line. The stream is opened on the first offer, opened again with backoff after a
//! loss, and ends at shutdown once what was queued before [`EventPipe::close`] went out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kubemq::proto::kubemq::Event;
use parking_lot::Mutex;
use purista_core::WorkKind;
use purista_core::kit::TaskSet;
use rand::Rng;
use tokio::sync::mpsc;

use crate::connection::RawClient;

/// Messages the pipe holds at most before publishers fall back to unary sends.
const CAPACITY: usize = 4096;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a closing pipe waits for KubeMQ to end the stream after the last message.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// `Some` = a message, `None` = the end marker [`EventPipe::close`] queues.
type Slot = Option<Event>;

/// The event pipe of one bridge instance.
pub struct EventPipe {
    tx: mpsc::Sender<Slot>,
    /// Taken by the pipe's task when it starts (first offer).
    rx: Mutex<Option<mpsc::Receiver<Slot>>>,
    /// Whether the stream is open (the pipe takes messages only then).
    up: Arc<AtomicBool>,
}

impl Default for EventPipe {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(CAPACITY);
        EventPipe {
            tx,
            rx: Mutex::new(Some(rx)),
            up: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl EventPipe {
    /// Queues `event` on the open stream, or hands it back (`Err`) for a unary send: the
    /// stream is not open (yet, or any more), or the pipe is full. Starts the pipe on first
    /// use.
    pub fn offer(
        &self,
        tasks: &Arc<TaskSet>,
        raw: &RawClient,
        event: Event,
    ) -> Result<(), Box<Event>> {
        if !self.up.load(Ordering::Acquire) {
            self.start(tasks, raw);
            return Err(Box::new(event));
        }
        match self.tx.try_send(Some(event)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Some(e)))
            | Err(mpsc::error::TrySendError::Closed(Some(e))) => Err(Box::new(e)),
            // Never: `offer` queues no end marker.
            Err(_) => Ok(()),
        }
    }

    /// Ends the pipe once what it holds went out (shutdown); later offers go unary.
    pub fn close(&self) {
        self.up.store(false, Ordering::Release);
        // Not started: its receiver goes, and offers fail over to unary sends. Started: the
        // end marker (a full pipe has its task aborted with the task set).
        if self.rx.lock().take().is_none() {
            let _ = self.tx.try_send(None);
        }
    }

    fn start(&self, tasks: &Arc<TaskSet>, raw: &RawClient) {
        let Some(rx) = self.rx.lock().take() else {
            return;
        };
        let spawned = tasks.spawn(
            WorkKind::Generic,
            "event pipe".into(),
            run(raw.clone(), rx, self.up.clone()),
        );
        if !spawned {
            tracing::debug!("the event pipe did not start: the bridge is shutting down");
        }
    }
}

/// Keeps the stream open until the end marker: opens it, reads KubeMQ's refusals, opens it
/// again with backoff after a loss.
async fn run(raw: RawClient, rx: mpsc::Receiver<Slot>, up: Arc<AtomicBool>) {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let ended = Arc::new(tokio::sync::Notify::new());
    let done = Arc::new(AtomicBool::new(false));
    let mut backoff = FIRST_BACKOFF;
    loop {
        let requests = futures::stream::unfold(
            (rx.clone(), ended.clone(), done.clone()),
            |(rx, ended, done)| async move {
                let next = rx.lock().await.recv().await;
                match next {
                    Some(Some(event)) => Some((event, (rx, ended, done))),
                    Some(None) | None => {
                        done.store(true, Ordering::Release);
                        ended.notify_one();
                        None
                    }
                }
            },
        );
        let mut client = raw.clone();
        // Open before KubeMQ's answer: a server may send its response headers only after the
        // first message.
        if !done.load(Ordering::Acquire) {
            up.store(true, Ordering::Release);
        }
        let opening = client.send_events_stream(requests);
        tokio::pin!(opening);
        let opened = tokio::select! {
            opened = &mut opening => opened,
            _ = ended.notified() => {
                // The end marker went out before KubeMQ answered the opening: the request
                // body is sent on its own, give KubeMQ a moment to take the rest.
                up.store(false, Ordering::Release);
                let _ = tokio::time::timeout(CLOSE_GRACE, opening).await;
                return;
            }
        };
        match opened {
            Ok(response) => {
                backoff = FIRST_BACKOFF;
                let mut results = response.into_inner();
                let mut closing = false;
                loop {
                    let next = if closing {
                        match tokio::time::timeout(CLOSE_GRACE, results.message()).await {
                            Ok(next) => next,
                            Err(_) => return,
                        }
                    } else {
                        tokio::select! {
                            next = results.message() => next,
                            _ = ended.notified() => {
                                closing = true;
                                continue;
                            }
                        }
                    };
                    match next {
                        Ok(Some(result)) if !result.sent => {
                            tracing::debug!(event_id = %result.event_id, error = %result.error, "KubeMQ refused an event sent on the event pipe");
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(code = ?status.code(), error = %status.message(), "the event pipe's stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), error = %status.message(), "opening the event pipe's stream failed");
            }
        }
        up.store(false, Ordering::Release);
        if done.load(Ordering::Acquire) {
            return;
        }
        // What was queued for the lost stream is dropped: it would arrive late, after
        // publications sent the unary way meanwhile.
        let mut lost = 0usize;
        {
            let mut rx = rx.lock().await;
            while let Ok(slot) = rx.try_recv() {
                match slot {
                    Some(_) => lost += 1,
                    None => return,
                }
            }
        }
        if lost > 0 {
            tracing::debug!(
                lost,
                "events queued on the event pipe were lost with its stream"
            );
        }
        let jitter = rand::rng().random_range(0.5..1.0);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
