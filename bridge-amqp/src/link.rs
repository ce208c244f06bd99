//! The bridge's link to the broker across connections: which session is current, why there is
//! none, how often it was re-established, and publishing that must reach a queue.
//!
//! The supervisor (`reconnect.rs`) replaces the session; everyone else reads it here. While no
//! session is current every broker operation fails at once with 503, naming the last reason.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use purista_core::{Address, BridgeError};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::publish::{Outgoing, Verdict};
use crate::session::Session;

/// First wait before publishing an unroutable command again during the reconnect grace.
const UNROUTED_RETRY_FIRST: Duration = Duration::from_millis(20);
/// Longest wait between those publishes.
const UNROUTED_RETRY_MAX: Duration = Duration::from_millis(320);
/// How many receivers [`RecentRoutes`] remembers at most.
const RECENT_ROUTES_CAP: usize = 4096;

/// What the first connect ended in, for `start` to wait on.
#[derive(Debug, Clone, Default)]
pub(crate) enum FirstConnect {
    /// Still trying.
    #[default]
    Pending,
    /// Connected once.
    Connected,
    /// The broker refused this client: retrying cannot help.
    Refused(purista_core::BridgeError),
}

/// The connection state of one bridge instance.
pub(crate) struct Link {
    /// The live session; `None` while disconnected.
    session: watch::Sender<Option<Arc<Session>>>,
    first: watch::Sender<FirstConnect>,
    last_error: Mutex<Option<String>>,
    reconnects: AtomicU64,
    /// The generation of the last reconnect and when the supervisor finished restoring it.
    reconnected: Mutex<Option<(u64, Instant)>>,
    /// See [`AmqpConfig::reconnect_grace`](crate::AmqpConfig::reconnect_grace).
    grace: Duration,
    /// Set where a serving instance's command queue vanishes with its connection
    /// ([`TopologyMode::Purista`](crate::TopologyMode::Purista)).
    recent: Option<RecentRoutes>,
}

/// When a routed publish to each receiver was last confirmed.
///
/// In the PURISTA topology a command queue is auto-delete: it goes with its last server's
/// connection, and comes back when that server has reconnected. A caller whose own connection
/// survived sees the command come back unroutable meanwhile, although a server is on its way
/// back. A receiver that took a publish within the reconnect grace is taken to be such a
/// server, and its unroutable commands are published again (within their ttl) instead of
/// failing with 502 at once; a receiver never routed to, or not for the grace, is 502 at once.
struct RecentRoutes {
    confirmed: Mutex<HashMap<String, Instant>>,
}

impl RecentRoutes {
    /// Notes that a publish to `receiver` reached a queue now.
    fn routed(&self, receiver: &str, grace: Duration) {
        let now = Instant::now();
        let mut confirmed = self.confirmed.lock();
        if let Some(at) = confirmed.get_mut(receiver) {
            *at = now;
            return;
        }
        if confirmed.len() >= RECENT_ROUTES_CAP {
            confirmed.retain(|_, at| now.duration_since(*at) < grace);
        }
        // Still full of fresh entries: this receiver is not remembered, and its unroutable
        // commands get the immediate 502 they got before.
        if confirmed.len() < RECENT_ROUTES_CAP {
            confirmed.insert(receiver.to_owned(), now);
        }
    }

    /// Whether a publish to `receiver` reached a queue within `grace`.
    fn was_routed_within(&self, receiver: &str, grace: Duration) -> bool {
        self.confirmed
            .lock()
            .get(receiver)
            .is_some_and(|at| at.elapsed() < grace)
    }
}

impl Link {
    /// A link whose unroutable commands are retried for `grace` after a reconnect, and, when
    /// `queues_vanish_with_servers`, also for `grace` after the receiver last took one.
    pub(crate) fn new(grace: Duration, queues_vanish_with_servers: bool) -> Self {
        Link {
            session: watch::Sender::new(None),
            first: watch::Sender::new(FirstConnect::Pending),
            last_error: Mutex::new(None),
            reconnects: AtomicU64::new(0),
            reconnected: Mutex::new(None),
            grace,
            recent: queues_vanish_with_servers.then(|| RecentRoutes {
                confirmed: Mutex::default(),
            }),
        }
    }

    /// The live session, if connected.
    pub(crate) fn current(&self) -> Option<Arc<Session>> {
        self.session.borrow().clone().filter(|s| s.is_live())
    }

    /// The live session, or 503 saying why there is none.
    pub(crate) fn connected(&self) -> Result<Arc<Session>, BridgeError> {
        self.current().ok_or_else(|| {
            BridgeError::Unavailable(match self.last_error.lock().as_deref() {
                Some(e) => format!("not connected to the broker ({e})"),
                None => "not connected to the broker".into(),
            })
        })
    }

    /// Makes `session` current (or none).
    ///
    /// The session is current before `start` hears of the first connect: `start` asks for the
    /// bridge's health as soon as it does, and must not find the session still missing.
    pub(crate) fn replace(&self, session: Option<Arc<Session>>) -> Option<Arc<Session>> {
        let connected = session.is_some();
        let previous = self.session.send_replace(session);
        if connected {
            self.first.send_replace(FirstConnect::Connected);
        }
        previous
    }

    /// Watches the current session.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<Session>>> {
        self.session.subscribe()
    }

    /// Watches how the first connect ends.
    pub(crate) fn first_connect(&self) -> watch::Receiver<FirstConnect> {
        self.first.subscribe()
    }

    /// The first connect was refused for good.
    pub(crate) fn refused(&self, error: BridgeError) {
        self.first.send_replace(FirstConnect::Refused(error));
    }

    /// Starts over after a refused first connect (a new `start`).
    pub(crate) fn retry_first(&self) {
        self.first.send_if_modified(|first| {
            if matches!(first, FirstConnect::Refused(_)) {
                *first = FirstConnect::Pending;
                return true;
            }
            false
        });
    }

    /// Why the link is down (already scrubbed of credentials).
    pub(crate) fn set_last_error(&self, error: String) {
        *self.last_error.lock() = Some(error);
    }

    /// Counts a reconnect of session `generation` and remembers when it happened.
    pub(crate) fn count_reconnect(&self, generation: u64) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        *self.reconnected.lock() = Some((generation, Instant::now()));
    }

    /// How often the connection was re-established after a loss.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Why the bridge cannot take messages right now, if it cannot: not connected, or a
    /// connection the broker blocks or does not answer on.
    pub(crate) async fn problem(&self) -> Option<String> {
        match self.connected() {
            Ok(session) => session.problem().await,
            Err(error) => Some(error.to_string()),
        }
    }

    /// True while `session` is a reconnect younger than the reconnect grace: serving instances
    /// may not have re-created their command queues yet, so a command without a route is not
    /// yet proof that nobody serves it. A session the supervisor has not finished restoring
    /// counts as just reconnected.
    fn in_reconnect_grace(&self, session: &Session) -> bool {
        if !session.reconnect {
            return false;
        }
        match *self.reconnected.lock() {
            Some((generation, at)) if generation == session.generation => at.elapsed() < self.grace,
            _ => true,
        }
    }

    /// True while an unroutable publish to `receiver` on `session` may be a server on its way
    /// back rather than nobody serving it: see [`Link::in_reconnect_grace`] and
    /// [`RecentRoutes`].
    fn may_come_back(&self, session: &Session, receiver: &str) -> bool {
        self.in_reconnect_grace(session)
            || self
                .recent
                .as_ref()
                .is_some_and(|recent| recent.was_routed_within(receiver, self.grace))
    }

    /// Publishes a `mandatory` message that must reach a queue (a command, a stream's open
    /// frame) for `receiver`: unroutable is [`BridgeError::NoHandler`] (502) at once, except
    /// while its server may be on its way back ([`Link::may_come_back`]), where it is published
    /// again after short pauses (a returned message reached no queue, so this cannot duplicate
    /// it); nacked is [`BridgeError::Refused`]. The caller bounds the whole by its ttl.
    pub(crate) async fn publish_routed(
        &self,
        mut session: Arc<Session>,
        out: Outgoing<'_>,
        receiver: &Address,
    ) -> Result<(), BridgeError> {
        let mut pause = UNROUTED_RETRY_FIRST;
        let name = receiver.to_string();
        loop {
            let attempt = Outgoing {
                properties: out.properties.clone(),
                ..out
            };
            match session.publish(attempt).await? {
                Verdict::Confirmed => {
                    if let Some(recent) = &self.recent {
                        recent.routed(&name, self.grace);
                    }
                    return Ok(());
                }
                Verdict::Returned { .. } if self.may_come_back(&session, &name) => {
                    tracing::debug!(%receiver, retry_in = ?pause, "no route, but its server may be reconnecting; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(UNROUTED_RETRY_MAX);
                    session = self.connected()?;
                }
                Verdict::Returned { code, .. } => {
                    tracing::debug!(%receiver, code, "no queue took the message: nobody serves it");
                    return Err(BridgeError::NoHandler(receiver.to_string()));
                }
                Verdict::Nacked => return Err(BridgeError::Refused(receiver.to_string())),
            }
        }
    }
}
