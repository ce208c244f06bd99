//! The connection supervisor: connect, prepare, watch, and after a loss do it all again.
//!
//! One task per bridge instance owns the broker connection. Each successful connect opens a
//! session (`session.rs`): the exchange, this instance's reply queue and its consumer, then
//! every registration's queues, bindings and consumers, which their keepers restore
//! (`consume.rs`). While a session is current the bridge is healthy.
//!
//! When the connection is lost the session is withdrawn at once (health turns to error, new
//! invocations fail with 503), every pending invocation fails with 503, every stream session
//! ends (consumers with a 503 error frame, producers cancelled), the deliveries in hand become
//! suspects of the poison watch (`suspects.rs`), and the supervisor reconnects with
//! exponential backoff. Deliveries received on the old connection can no longer be settled
//! there; the broker redelivers them, which is why settlements check the generation they were
//! received on.
//!
//! The supervisor never waits without a deadline: connecting is bounded by the connect
//! timeout, each broker call by `broker_timeout`, a restore by a multiple of it. A session
//! whose restore the broker does not answer is given up and replaced like a lost one. The
//! supervisor stops only when the bridge shuts down, or when the broker refuses the very first
//! connect for good (wrong credentials, unknown virtual host): then `start` fails with that
//! error, and a later `start` tries again.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use purista_core::BridgeError;
use tokio::sync::watch;

use crate::connect::{self, ConnectFailure};
use crate::reply;
use crate::session::Session;
use crate::shared::Shared;
use crate::stream_table::CONNECTION_LOST;
use crate::topology::{self, name};

/// Broker calls one registration's restore may take (channel, prefetch, declarations,
/// bindings, consume): its keeper answers within this many `broker_timeout`s.
const RESTORE_CALLS: u32 = 8;

/// Connects, prepares the base topology and starts the reply consumer.
async fn open_session(
    shared: &Arc<Shared>,
    generation: u64,
    reconnect: bool,
) -> Result<Arc<Session>, ConnectFailure> {
    let config = &shared.config;
    let name = format!(
        "purista {} {}",
        shared.topology.prefix(),
        shared.instance_id
    );
    let closing = Arc::new(AtomicBool::new(false));
    let connection = connect::connect(config, name, closing.clone()).await?;
    let transient = |error: BridgeError| ConnectFailure {
        error,
        permanent: false,
    };
    let session = Session::open(
        generation,
        reconnect,
        connection,
        config.broker_timeout,
        config.max_metadata_bytes,
        closing,
    )
    .await
    .map_err(transient)?;
    let prepared = prepare(shared, &session).await;
    if let Err(error) = prepared {
        session
            .close(tokio::time::Instant::now() + config.broker_timeout)
            .await;
        return Err(transient(error));
    }
    Ok(session)
}

/// The exchange, the reply queue and its consumer on a fresh session.
async fn prepare(shared: &Arc<Shared>, session: &Arc<Session>) -> Result<(), BridgeError> {
    let timeout = session.timeout;
    let admin = session.admin_channel().await?;
    topology::declare_exchange(&admin, &shared.topology, timeout).await?;
    // The reply queue gets its own channel: it is exclusive to this connection and consumed
    // with auto-ack, independent of everything else.
    let replies = session.new_channel().await?;
    topology::declare_reply_queue(&replies, &shared.topology, timeout).await?;
    let reply_queue = shared.topology.reply_queue();
    shared.ledger.record(reply_queue);
    let consumer = session
        .call("consuming the reply queue", async {
            replies
                .basic_consume(
                    name(reply_queue)?,
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| topology::broker_error("consuming reply queue", reply_queue, &e))
        })
        .await?;
    let reply_shared = shared.clone();
    let task = tokio::spawn(async move {
        // The channel lives as long as its consumer.
        let _channel = replies;
        reply::run_reply_consumer(consumer, &reply_shared).await;
    });
    session.attach_reply_consumer(task);
    Ok(())
}

/// Asks every registration's keeper to start consuming on `session` and waits for all of
/// them. `Err` when the broker did not answer (the session is no good); a registration the
/// broker refuses for good (a conflicting queue) is logged and left out.
async fn restore(shared: &Arc<Shared>, session: &Arc<Session>) -> Result<(), BridgeError> {
    let timeout = session.timeout * RESTORE_CALLS;
    let registrations = shared.registry.all();
    let starts = registrations
        .iter()
        .map(|reg| reg.request_start(session.clone(), timeout));
    let results = futures::future::join_all(starts).await;
    let mut broken = None;
    for (reg, result) in registrations.iter().zip(results) {
        match result {
            Ok(()) => {}
            Err(error) if error.is_retryable() => broken = Some(error),
            Err(error) => {
                tracing::error!(registration = %reg.label, %error, "re-establishing a consumer failed: the broker refuses it");
            }
        }
    }
    broken.map_or(Ok(()), Err)
}

/// Runs until `stop` turns true: keeps one session current, reconnecting with backoff.
///
/// The current session is published before the registrations are restored on it: a
/// concurrent register either finds it and starts itself, or is found by the restore (its
/// keeper ignores the second start).
pub(crate) async fn supervise(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let config = shared.config.clone();
    let mut generation = 0u64;
    let mut delay = config.reconnect_initial_delay;
    let mut connected_once = false;
    let mut warned: Option<String> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        generation += 1;
        let opened = tokio::select! {
            opened = open_session(&shared, generation, connected_once) => opened,
            _ = stop.wait_for(|s| *s) => return,
        };
        let session = match opened {
            Ok(session) => session,
            Err(failure) => {
                let error = failure.error;
                shared.link.set_last_error(error.to_string());
                if failure.permanent && !connected_once {
                    tracing::warn!(url = %config.redacted_url(), %error, "the broker refused this bridge; retrying cannot help");
                    shared.link.refused(error);
                    return;
                }
                // One warning per kind of failure, not one per attempt of an outage.
                let text = error.to_string();
                if warned.as_deref() == Some(text.as_str()) {
                    tracing::debug!(url = %config.redacted_url(), %error, retry_in = ?delay, "cannot connect to the broker");
                } else {
                    tracing::warn!(url = %config.redacted_url(), %error, retry_in = ?delay, "cannot connect to the broker; retrying with backoff");
                    warned = Some(text);
                }
                if backoff(&mut stop, &mut delay, config.reconnect_max_delay).await {
                    return;
                }
                continue;
            }
        };
        delay = config.reconnect_initial_delay;
        warned = None;
        shared.link.replace(Some(session.clone()));
        let restored = tokio::select! {
            restored = restore(&shared, &session) => restored,
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Err(error) = restored {
            tracing::warn!(%error, "the broker did not answer while consumers were restored; reconnecting");
            let deadline = tokio::time::Instant::now() + config.broker_timeout;
            session.close(deadline).await;
            lost(&shared, &session, error.to_string());
            if backoff(&mut stop, &mut delay, config.reconnect_max_delay).await {
                return;
            }
            continue;
        }
        if connected_once {
            shared.link.count_reconnect(session.generation);
            tracing::info!(url = %config.redacted_url(), generation, "reconnected to the broker");
        } else {
            tracing::info!(url = %config.redacted_url(), "connected to the broker");
        }
        connected_once = true;
        tokio::select! {
            reason = session.lost() => lost(&shared, &session, reason),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Waits the current backoff (doubling it for next time, up to `max`); `true` when the bridge
/// stops meanwhile.
async fn backoff(stop: &mut watch::Receiver<bool>, delay: &mut Duration, max: Duration) -> bool {
    let stopped = tokio::select! {
        () = tokio::time::sleep(*delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    *delay = (*delay * 2).min(max);
    stopped
}

/// What follows the loss of `session`: it is withdrawn, everything that lived on it ends, and
/// what was in hand on it becomes a suspect.
fn lost(shared: &Shared, session: &Session, reason: String) {
    shared.link.replace(None);
    shared.link.set_last_error(shared.config.scrub(&reason));
    let failed = shared.work.inbox.fail_all(&BridgeError::Unavailable(
        "connection to the broker lost".into(),
    ));
    // Stream sessions are at most once: they die with the connection.
    let ended_streams = shared.work.streams.end_all(CONNECTION_LOST, false);
    let suspects = shared.suspects.connection_lost(session.generation);
    tracing::warn!(reason = %shared.config.scrub(&reason), failed_invocations = failed, ended_streams, suspects, "connection to the broker lost; reconnecting");
}
