//! This instance's command, stream and subscription registrations, and the consumer state of
//! each.
//!
//! A registration outlives connections: it is what the reconnect supervisor re-declares and
//! re-consumes after every reconnect. Its [`ConsumerState`] says which connection generation
//! its channel belongs to, whether a consumer is running on it, and whether it is paused.
//!
//! Changes to consumer state that talk to the broker (start, pause, resume, stop) are carried
//! out one after the other by the registration's *keeper* task (`consume.rs`), which takes them
//! as [`ConsumerOp`]s: a restore after a reconnect never races a resume or a pause into two
//! consumers or a running consumer on a paused registration, and no lock is held while the
//! broker is asked.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use lapin::types::ShortString;
use parking_lot::Mutex;
use purista_core::kit::Activity;
use purista_core::{
    Address, BridgeError, CommandHandler, DeliveryHandler, PausedConsumer, StreamHandler,
    SubscriptionSpec,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::session::Session;

/// A change of a registration's consumer, for its keeper.
pub(crate) enum ConsumerOp {
    /// Declare the queue and consume it on `session` (nothing when paused, removed or already
    /// consuming there).
    Start {
        session: Arc<Session>,
        done: Option<oneshot::Sender<Result<(), BridgeError>>>,
    },
    /// Cancel the consumer until resumed (`stop_consumer`).
    Pause {
        reason: String,
        done: oneshot::Sender<()>,
    },
    /// Consume again; `false` when it was not paused.
    Resume {
        done: oneshot::Sender<Result<bool, BridgeError>>,
    },
    /// Stop for good: cancel, retire the queue when this instance was its last server, then,
    /// once the running handlers settled or `deadline` passed, close the channel. `done` is
    /// answered once the queue is dealt with; the keeper ends after the cleanup.
    Stop {
        deadline: Instant,
        done: Option<oneshot::Sender<()>>,
    },
}

/// What a registration serves.
pub(crate) enum Kind {
    /// A command endpoint.
    Command {
        address: Address,
        handler: Arc<dyn CommandHandler>,
    },
    /// A stream endpoint: its queue takes open frames.
    Stream {
        address: Address,
        handler: Arc<dyn StreamHandler>,
    },
    /// A subscription.
    Subscription {
        spec: Box<SubscriptionSpec>,
        handler: Arc<dyn DeliveryHandler>,
    },
}

/// The broker side of a registration right now.
#[derive(Default)]
pub(crate) struct ConsumerState {
    /// The registration's channel and the connection generation it belongs to.
    pub channel: Option<(u64, Channel)>,
    /// The consumer tag while consuming.
    pub tag: Option<ShortString>,
    /// Set while paused by `stop_consumer`.
    pub paused: Option<PausedConsumer>,
    /// Set once unregistered; nothing starts it again.
    pub removed: bool,
}

/// One command, stream or subscription registration.
pub(crate) struct Registration {
    /// `service@version/target` for commands and streams, the registration key for
    /// subscriptions.
    pub label: Arc<str>,
    /// The queue it consumes.
    pub queue: Arc<str>,
    pub kind: Kind,
    /// Its running handlers.
    pub activity: Arc<Activity>,
    pub state: Mutex<ConsumerState>,
    /// Turns true once an unregister or shutdown has dealt with the queue (deleted it when
    /// this instance was its last consumer). A command taken but not started in the meantime
    /// is handed back only after that, so with no instance left it is answered 503 at once
    /// instead of going down with the deleted queue.
    pub retired: tokio::sync::watch::Sender<bool>,
    /// The keeper's inbox (see [`ConsumerOp`]).
    ops: mpsc::UnboundedSender<ConsumerOp>,
    /// One suspect delivery at a time (see `suspects.rs`).
    pub turn: Arc<Semaphore>,
}

impl Registration {
    /// A registration and the inbox of its keeper, which the caller starts.
    pub(crate) fn new(
        label: &str,
        queue: &str,
        kind: Kind,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<ConsumerOp>) {
        let (ops, inbox) = mpsc::unbounded_channel();
        let reg = Arc::new(Registration {
            label: label.into(),
            queue: queue.into(),
            kind,
            activity: Arc::default(),
            state: Mutex::new(ConsumerState::default()),
            retired: tokio::sync::watch::Sender::new(false),
            ops,
            turn: Arc::new(Semaphore::new(1)),
        });
        (reg, inbox)
    }

    /// Hands `op` to the keeper; `false` when the keeper is gone (the registration stopped).
    pub(crate) fn send(&self, op: ConsumerOp) -> bool {
        self.ops.send(op).is_ok()
    }

    /// Deliveries it takes at once: the subscription's prefetch, or the command prefetch (for
    /// streams too: an open frame is taken, acked and handed to a task at once).
    pub(crate) fn prefetch(&self, command_prefetch: u16) -> u16 {
        match &self.kind {
            Kind::Command { .. } | Kind::Stream { .. } => command_prefetch.max(1),
            Kind::Subscription { spec, .. } => spec.prefetch.max(1),
        }
    }

    /// True while deliveries must go back to the queue instead of a handler.
    pub(crate) fn refuses_deliveries(&self) -> bool {
        let state = self.state.lock();
        state.removed || state.paused.is_some()
    }

    /// The subscription spec, for subscriptions.
    pub(crate) fn spec(&self) -> Option<&SubscriptionSpec> {
        match &self.kind {
            Kind::Subscription { spec, .. } => Some(spec.as_ref()),
            Kind::Command { .. } | Kind::Stream { .. } => None,
        }
    }

    /// True for endpoints (commands, streams) whose queue its last server deletes when it
    /// leaves, so that an unserved address is unroutable (502) at once.
    pub(crate) fn is_endpoint(&self) -> bool {
        matches!(self.kind, Kind::Command { .. } | Kind::Stream { .. })
    }
}

impl Registration {
    /// Asks the keeper to start consuming on `session` and waits for the answer, at most
    /// `timeout`. A registration stopped meanwhile has nothing to start.
    pub(crate) async fn request_start(
        &self,
        session: Arc<Session>,
        timeout: Duration,
    ) -> Result<(), BridgeError> {
        let (done, answer) = oneshot::channel();
        if !self.send(ConsumerOp::Start {
            session,
            done: Some(done),
        }) {
            return Ok(());
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(BridgeError::Unavailable(format!(
                "starting the consumer of {} took longer than {} ms",
                self.label,
                timeout.as_millis()
            ))),
        }
    }

    /// Asks the keeper to stop for good and waits until the queue is dealt with, at most until
    /// `deadline`.
    pub(crate) async fn request_stop(&self, deadline: Instant) {
        let (done, answer) = oneshot::channel();
        if !self.send(ConsumerOp::Stop {
            deadline,
            done: Some(done),
        }) {
            return;
        }
        if tokio::time::timeout_at(deadline, answer).await.is_err() {
            tracing::debug!(registration = %self.label, "stopping the consumer did not finish by the deadline");
        }
    }

    /// Asks the keeper to pause and waits until the consumer is cancelled (bounded by the
    /// keeper's own broker deadlines).
    pub(crate) async fn request_pause(&self, reason: String) {
        let (done, answer) = oneshot::channel();
        if self.send(ConsumerOp::Pause { reason, done }) {
            let _ = answer.await;
        }
    }

    /// Asks the keeper to resume; `false` when it was not paused.
    pub(crate) async fn request_resume(&self) -> Result<bool, BridgeError> {
        let (done, answer) = oneshot::channel();
        if !self.send(ConsumerOp::Resume { done }) {
            return Ok(false);
        }
        answer.await.unwrap_or(Ok(false))
    }
}

/// All registrations of the instance.
#[derive(Default)]
pub(crate) struct Registry {
    /// Commands by endpoint (`service@version/target`).
    commands: Mutex<HashMap<String, Arc<Registration>>>,
    /// Stream endpoints by endpoint (`service@version/target`).
    streams: Mutex<HashMap<String, Arc<Registration>>>,
    /// Subscriptions by registration key.
    subscriptions: Mutex<HashMap<String, Arc<Registration>>>,
}

impl Registry {
    /// Adds a command registration; `false` when the endpoint is already served here.
    pub(crate) fn add_command(&self, reg: Arc<Registration>) -> bool {
        let mut commands = self.commands.lock();
        if commands.contains_key(&*reg.label) {
            return false;
        }
        commands.insert(reg.label.to_string(), reg);
        true
    }

    /// Adds a stream registration; `false` when the endpoint is already served here.
    pub(crate) fn add_stream(&self, reg: Arc<Registration>) -> bool {
        let mut streams = self.streams.lock();
        if streams.contains_key(&*reg.label) {
            return false;
        }
        streams.insert(reg.label.to_string(), reg);
        true
    }

    /// Adds a subscription registration; `false` when the key is taken.
    pub(crate) fn add_subscription(&self, reg: Arc<Registration>) -> bool {
        let mut subscriptions = self.subscriptions.lock();
        if subscriptions.contains_key(&*reg.label) {
            return false;
        }
        subscriptions.insert(reg.label.to_string(), reg);
        true
    }

    pub(crate) fn remove_command(&self, label: &str) -> Option<Arc<Registration>> {
        self.commands.lock().remove(label)
    }

    pub(crate) fn remove_stream(&self, label: &str) -> Option<Arc<Registration>> {
        self.streams.lock().remove(label)
    }

    pub(crate) fn remove_subscription(&self, key: &str) -> Option<Arc<Registration>> {
        self.subscriptions.lock().remove(key)
    }

    pub(crate) fn subscription(&self, key: &str) -> Option<Arc<Registration>> {
        self.subscriptions.lock().get(key).cloned()
    }

    /// Every registration, commands first, then streams.
    pub(crate) fn all(&self) -> Vec<Arc<Registration>> {
        let mut all: Vec<_> = self.commands.lock().values().cloned().collect();
        all.extend(self.streams.lock().values().cloned());
        all.extend(self.subscriptions.lock().values().cloned());
        all
    }

    /// Paused subscription consumers, sorted by key.
    pub(crate) fn paused(&self) -> Vec<PausedConsumer> {
        let mut paused: Vec<PausedConsumer> = self
            .subscriptions
            .lock()
            .values()
            .filter_map(|r| r.state.lock().paused.clone())
            .collect();
        paused.sort_by(|a, b| a.key.cmp(&b.key));
        paused
    }

    /// Removes and returns everything (shutdown).
    pub(crate) fn drain(&self) -> Vec<Arc<Registration>> {
        let mut all: Vec<_> = self.commands.lock().drain().map(|(_, r)| r).collect();
        all.extend(self.streams.lock().drain().map(|(_, r)| r));
        all.extend(self.subscriptions.lock().drain().map(|(_, r)| r));
        all
    }
}
