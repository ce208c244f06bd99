//! One live connection to the broker and what hangs off it: a *session*.
//!
//! Each successful connect opens a [`Session`] (a new *generation*): the confirm-mode
//! publishing channel, a plain channel for declarations, and this instance's reply consumer
//! (started by the supervisor, `reconnect.rs`). Every broker call made through it is bounded by
//! the bridge's `broker_timeout`: a broker that stalls (frozen, or blocking publishers in a
//! memory alarm) costs a caller that long and a 503, never a hang. A call that timed out marks
//! the session *stalled* until a later call succeeds; a broker's `connection.blocked` marks it
//! blocked until `connection.unblocked`. Either is reported by [`Session::problem`], which
//! health shows.
//!
//! Every publish is measured before it is sent: metadata over the session's [`Budget`] (see
//! `budget.rs`) is refused here, the last guard before the broker, so no publish of this bridge
//! can make the broker close the connection with a frame error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::{Channel, Connection, Event};
use parking_lot::Mutex;
use purista_core::BridgeError;
use purista_core::kit::broker_call;
use tokio::task::JoinHandle;

use crate::budget::Budget;
use crate::publish::{self, ChannelSlot, Outgoing, Verdict};

/// How long a health check waits for a stalled broker to answer again.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often [`Session::lost`] looks at the connection state besides listening to its events.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// One live connection and what hangs off it.
pub(crate) struct Session {
    /// Increases by one per connect attempt.
    pub generation: u64,
    /// True for a session after the first: a reconnect.
    pub reconnect: bool,
    pub connection: Connection,
    /// The deadline of one broker call.
    pub timeout: Duration,
    /// What fits one frame on this connection.
    pub budget: Budget,
    publisher: ChannelSlot,
    admin: ChannelSlot,
    reply_consumer: Mutex<Option<JoinHandle<()>>>,
    /// Set by a broker call that timed out, cleared by one that did not.
    stalled: AtomicBool,
    /// The broker's reason while it blocks this connection (`connection.blocked`).
    blocked: Mutex<Option<String>>,
    /// Set before this bridge closes the connection itself: what lapin then reports about
    /// closing channels is expected (see `lapin_logs.rs`).
    closing: Arc<AtomicBool>,
}

impl Session {
    /// Opens the publishing and declaration channels on a fresh `connection`.
    pub(crate) async fn open(
        generation: u64,
        reconnect: bool,
        connection: Connection,
        timeout: Duration,
        declared_metadata_limit: usize,
        closing: Arc<AtomicBool>,
    ) -> Result<Arc<Session>, BridgeError> {
        let frame_max = usize::try_from(connection.configuration().frame_max()).unwrap_or(0);
        let budget = Budget::new(declared_metadata_limit, frame_max);
        if budget.caller < declared_metadata_limit {
            tracing::warn!(
                frame_max,
                declared = declared_metadata_limit,
                enforced = budget.caller,
                "the broker's frame_max leaves less room than max_metadata_bytes declares; the smaller limit is enforced"
            );
        }
        let channel_error =
            |e: lapin::Error| BridgeError::client("opening a channel failed", e, true);
        let publisher = broker_call(timeout, "opening the publishing channel", async {
            ChannelSlot::open(&connection, true)
                .await
                .map_err(channel_error)
        })
        .await?;
        let admin = broker_call(timeout, "opening a channel", async {
            ChannelSlot::open(&connection, false)
                .await
                .map_err(channel_error)
        })
        .await?;
        Ok(Arc::new(Session {
            generation,
            reconnect,
            connection,
            timeout,
            budget,
            publisher,
            admin,
            reply_consumer: Mutex::new(None),
            stalled: AtomicBool::new(false),
            blocked: Mutex::new(None),
            closing,
        }))
    }

    /// True while the connection is up.
    pub(crate) fn is_live(&self) -> bool {
        self.connection.status().connected()
    }

    /// Why this session cannot take messages right now, if it cannot: blocked by the broker,
    /// or not answering. A session that stalled is asked once more (a channel opened and
    /// closed, at most [`PROBE_TIMEOUT`]): a broker that answers again is healthy again.
    pub(crate) async fn problem(&self) -> Option<String> {
        if let Some(reason) = self.blocked.lock().clone() {
            return Some(format!(
                "the broker blocked publishing on this connection ({reason})"
            ));
        }
        if self.connection.status().blocked() {
            return Some("the broker blocked publishing on this connection".into());
        }
        if self.stalled.load(Ordering::Relaxed) {
            let probe = broker_call(self.timeout.min(PROBE_TIMEOUT), "a probe", async {
                let channel = self
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| BridgeError::client("opening a channel failed", e, true))?;
                let _ = channel.close(200, "OK".into()).await;
                Ok(())
            })
            .await;
            if probe.is_ok() {
                self.stalled.store(false, Ordering::Relaxed);
                return None;
            }
            return Some(format!(
                "the broker did not answer within {} ms",
                self.timeout.as_millis()
            ));
        }
        None
    }

    /// Runs one broker call with the session's deadline, keeping track of whether the broker
    /// answers.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, BridgeError>>,
    ) -> Result<T, BridgeError> {
        let mut answered = false;
        let result = broker_call(self.timeout, what, async {
            let result = fut.await;
            answered = true;
            result
        })
        .await;
        self.stalled.store(!answered, Ordering::Relaxed);
        result
    }

    /// Publishes with confirms on this connection, within the session's deadline. Metadata
    /// that cannot fit a frame is refused without sending anything.
    pub(crate) async fn publish(&self, out: Outgoing<'_>) -> Result<Verdict, BridgeError> {
        self.budget
            .check_republish(publish::metadata_len(&out.properties))?;
        self.call("a publish", async {
            let channel = self
                .publisher
                .get(&self.connection)
                .await
                .map_err(|e| BridgeError::client("no publishing channel", e, true))?;
            publish::publish(&channel, out).await
        })
        .await
    }

    /// A plain channel for declarations that are not tied to a registration.
    pub(crate) async fn admin_channel(&self) -> Result<Channel, BridgeError> {
        self.call("opening a channel", async {
            self.admin
                .get(&self.connection)
                .await
                .map_err(|e| BridgeError::client("no channel", e, true))
        })
        .await
    }

    /// Opens a fresh channel (a registration's, or one for a call the broker may answer by
    /// closing it).
    pub(crate) async fn new_channel(&self) -> Result<Channel, BridgeError> {
        self.call("opening a channel", async {
            self.connection
                .create_channel()
                .await
                .map_err(|e| BridgeError::client("opening a channel failed", e, true))
        })
        .await
    }

    /// Keeps the reply consumer's task, stopped with the session.
    pub(crate) fn attach_reply_consumer(&self, task: JoinHandle<()>) {
        if let Some(old) = self.reply_consumer.lock().replace(task) {
            old.abort();
        }
    }

    /// Closes the connection politely (shutdown), waiting for the broker's answer at most until
    /// `deadline`: lapin occasionally never resolves the close although the socket is gone,
    /// and a shutdown must not hang on it.
    pub(crate) async fn close(&self, deadline: tokio::time::Instant) {
        self.closing.store(true, Ordering::Release);
        if self.is_live() {
            let closed = self.connection.close(200, "OK".into());
            match tokio::time::timeout_at(deadline, closed).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, "closing the connection failed"),
                Err(_) => tracing::debug!(
                    "the broker did not confirm the close in time; connection dropped"
                ),
            }
        }
        // Only now: the reply consumer's channel closes itself when dropped, and a channel
        // closing while its connection closes is an error in lapin's eyes.
        if let Some(task) = self.reply_consumer.lock().take() {
            task.abort();
        }
    }

    /// Resolves when the connection is gone, with a reason; keeps track of the broker blocking
    /// and unblocking it meanwhile.
    pub(crate) async fn lost(&self) -> String {
        let mut events = self.connection.events_listener();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Event::ConnectionBlocked(reason)) => {
                        tracing::warn!(generation = self.generation, %reason, "the broker blocked this connection: publishes wait until it unblocks it");
                        *self.blocked.lock() = Some(reason);
                    }
                    Some(Event::ConnectionUnblocked) => {
                        tracing::info!(generation = self.generation, "the broker unblocked this connection");
                        *self.blocked.lock() = None;
                    }
                    // Channel-level errors surface here too; only a dead connection counts.
                    Some(Event::Error(error)) if !self.is_live() => return error.to_string(),
                    Some(_) => {}
                    None => return "connection closed".into(),
                },
                _ = tick.tick() => {
                    if !self.is_live() {
                        return "connection closed".into();
                    }
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(task) = self.reply_consumer.lock().take() {
            task.abort();
        }
    }
}
