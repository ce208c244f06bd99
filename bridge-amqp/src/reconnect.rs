//! The connection supervisor: connect, prepare, watch, and after a loss do it all again.
//!
//! One task per bridge instance owns the broker connection. Each successful connect opens a
//! [`Session`] (a new *generation*): the confirm-mode publishing channel, the exchange, this
//! instance's reply queue and its consumer, then every registration's queues, bindings and
//! consumers. While a session is current the bridge is healthy.
//!
//! When the connection is lost the session is withdrawn at once (health turns to error, new
//! invocations fail with 503), every pending invocation fails with 503, every stream session
//! ends (consumers with a 503 error, producers cancelled), and the supervisor
//! reconnects with exponential backoff. Deliveries received on the old connection can no
//! longer be settled there; the broker redelivers them, which is why settlements check the
//! generation they were received on.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use parking_lot::Mutex;
use purista_core::BridgeError;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bridge::Shared;
use crate::consume;
use crate::publish::{self, ChannelSlot, Outgoing, Verdict};
use crate::reply;
use crate::streams;
use crate::topology::{self, name};

/// How often the supervisor looks at the connection state besides listening to its events.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// How long a polite close waits for the broker's confirmation.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One live connection and what hangs off it.
pub(crate) struct Session {
    /// Increases by one per successful connect.
    pub generation: u64,
    pub connection: Connection,
    publisher: ChannelSlot,
    admin: ChannelSlot,
    reply_consumer: Mutex<Option<JoinHandle<()>>>,
}

impl Session {
    /// True while the connection is up.
    pub(crate) fn is_live(&self) -> bool {
        self.connection.status().connected()
    }

    /// Publishes with confirms on this connection.
    pub(crate) async fn publish(&self, out: Outgoing<'_>) -> Result<Verdict, BridgeError> {
        let channel = self
            .publisher
            .get(&self.connection)
            .await
            .map_err(|e| BridgeError::Unavailable(format!("no publishing channel: {e}")))?;
        publish::publish(&channel, out).await
    }

    /// A plain channel for declarations that are not tied to a registration.
    pub(crate) async fn admin_channel(&self) -> Result<Channel, BridgeError> {
        self.admin
            .get(&self.connection)
            .await
            .map_err(|e| BridgeError::Unavailable(format!("no channel: {e}")))
    }

    /// Closes the connection politely (shutdown), waiting at most `CLOSE_TIMEOUT` for the
    /// broker's answer: lapin occasionally never resolves the close although the socket is
    /// gone, and a shutdown must not hang on it.
    pub(crate) async fn close(&self) {
        if let Some(task) = self.reply_consumer.lock().take() {
            task.abort();
        }
        if !self.is_live() {
            return;
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, "OK".into())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "closing the connection failed"),
            Err(_) => tracing::debug!(
                timeout = ?CLOSE_TIMEOUT,
                "the broker did not confirm the close in time; connection dropped"
            ),
        }
    }

    /// Resolves when the connection is gone, with a reason.
    async fn lost(&self) -> String {
        let mut events = self.connection.events_listener();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                event = events.next() => match event {
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

/// Connects, prepares the base topology and starts the reply consumer.
async fn open_session(shared: &Arc<Shared>, generation: u64) -> Result<Arc<Session>, BridgeError> {
    let config = &shared.config;
    let properties = ConnectionProperties::default().with_connection_name(
        format!(
            "purista {} {}",
            shared.topology.prefix(),
            shared.instance_id
        )
        .into(),
    );
    // TLS files are read at every connect, so a renewed certificate counts from the next
    // reconnect on; reading files blocks, so not on the runtime's threads.
    let tls = if config.tls.is_empty() {
        None
    } else {
        let settings = config.tls.clone();
        let loaded = tokio::task::spawn_blocking(move || settings.load())
            .await
            .map_err(|e| BridgeError::Unavailable(format!("reading the TLS files failed: {e}")))?
            .map_err(|e| BridgeError::Unavailable(e.to_string()))?;
        Some(loaded)
    };
    let connecting = async {
        match tls {
            Some(tls) => {
                let runtime = lapin::runtime::default_runtime()?;
                Connection::connect_with_config(&config.url, properties, tls, runtime).await
            }
            None => Connection::connect(&config.url, properties).await,
        }
    };
    let connection = tokio::time::timeout(config.connect_timeout, connecting)
        .await
        .map_err(|_| {
            BridgeError::Unavailable(format!(
                "connecting to {} timed out after {:?}",
                config.redacted_url(),
                config.connect_timeout
            ))
        })?
        .map_err(|e| {
            let over_tls = config.url.starts_with("amqps://");
            let why = connect_failure(&config.redacted_url(), over_tls, &e);
            BridgeError::Unavailable(config.scrub(&why))
        })?;
    let lapin_err =
        |e: lapin::Error| BridgeError::Unavailable(format!("opening a channel failed: {e}"));
    let publisher = ChannelSlot::open(&connection, true)
        .await
        .map_err(lapin_err)?;
    let admin = ChannelSlot::open(&connection, false)
        .await
        .map_err(lapin_err)?;
    let session = Arc::new(Session {
        generation,
        connection,
        publisher,
        admin,
        reply_consumer: Mutex::new(None),
    });
    let admin = session.admin_channel().await?;
    topology::declare_exchange(&admin, &shared.topology).await?;

    // The reply queue gets its own channel: it is exclusive to this connection and consumed
    // with auto-ack, independent of everything else.
    let replies = session
        .connection
        .create_channel()
        .await
        .map_err(lapin_err)?;
    topology::declare_reply_queue(&replies, &shared.topology).await?;
    let reply_queue = shared.topology.reply_queue();
    shared.record(&reply_queue);
    let consumer = replies
        .basic_consume(
            name(&reply_queue)?,
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| topology::broker_error("consuming reply queue", &reply_queue, &e))?;
    let reply_shared = shared.clone();
    let task = tokio::spawn(async move {
        // The channel lives as long as its consumer.
        let _channel = replies;
        reply::run_reply_consumer(consumer, &reply_shared).await;
    });
    *session.reply_consumer.lock() = Some(task);
    Ok(session)
}

/// What to do about a broker that refuses this client.
const CLIENT_CERTIFICATE_HINT: &str = "the broker refused this client: if it requires a client \
    certificate, give one signed by a CA it trusts with PURISTA_AMQP_CLIENT_CERT_FILE and \
    PURISTA_AMQP_CLIENT_KEY_FILE or AmqpConfig::with_client_identity_files";

/// Why connecting to `url` (redacted) failed. A TLS failure says it is one and what to check:
/// lapin alone reports it as an I/O error that does not mention certificates.
fn connect_failure(url: &str, over_tls: bool, error: &lapin::Error) -> String {
    match tls_error(error) {
        Some(tls) => {
            let (problem, hint) = tls_problem(tls);
            format!("connecting to {url} failed: {problem}: {tls}; {hint}")
        }
        // With TLS 1.3 a broker refuses a client certificate after the client's side of the
        // handshake is done, and its alert is often lost to the reset of the closed connection.
        None if over_tls && closed_by_peer(error) => format!(
            "connecting to {url} failed: {error}; possibly a TLS certificate problem: \
             {CLIENT_CERTIFICATE_HINT}"
        ),
        None => format!("connecting to {url} failed: {error}"),
    }
}

/// What kind of TLS failure `tls` is, and what to check.
fn tls_problem(tls: &rustls::Error) -> (&'static str, &'static str) {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    const CERTIFICATE: &str = "TLS certificate problem";
    match tls {
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => (
            CERTIFICATE,
            "the broker's certificate is not signed by a CA this bridge trusts: give that CA's \
             certificate with PURISTA_AMQP_CA_FILE or AmqpConfig::with_ca_certificate_file",
        ),
        rustls::Error::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        ) => (
            CERTIFICATE,
            "the broker's certificate is not issued for the URL's host name",
        ),
        rustls::Error::InvalidCertificate(_) => {
            (CERTIFICATE, "the broker's certificate was rejected")
        }
        rustls::Error::AlertReceived(
            Alert::CertificateRequired
            | Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        ) => (CERTIFICATE, CLIENT_CERTIFICATE_HINT),
        _ => (
            "TLS handshake failed",
            "check that the port speaks TLS, and the TLS settings of the broker and this bridge",
        ),
    }
}

/// True when the broker closed the connection under the client.
fn closed_by_peer(error: &lapin::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(error.kind(), lapin::ErrorKind::IOError(io)
        if matches!(io.kind(), ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe))
}

/// The rustls error behind a failed connect, if any (wrapped in I/O errors).
fn tls_error(error: &lapin::Error) -> Option<&rustls::Error> {
    let lapin::ErrorKind::IOError(io) = error.kind() else {
        return None;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = io.get_ref().map(|e| e as _);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = e.source();
    }
    None
}

/// Runs until `stop` turns true: keeps one session current, reconnecting with backoff.
///
/// The current session is published in `shared.session` (start waits for the first one); it
/// is published under the topology lock together with restoring every registration, so a
/// concurrent register either is restored here or starts itself on the new session.
pub(crate) async fn supervise(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let config = shared.config.clone();
    let mut generation = 0u64;
    let mut delay = config.reconnect_initial_delay;
    loop {
        if *stop.borrow() {
            return;
        }
        generation += 1;
        let session = match open_session(&shared, generation).await {
            Ok(session) => session,
            Err(error) => {
                shared.set_last_error(error.to_string());
                tracing::warn!(
                    url = %config.redacted_url(),
                    %error,
                    retry_in = ?delay,
                    "cannot connect to the broker"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                delay = (delay * 2).min(config.reconnect_max_delay);
                continue;
            }
        };
        delay = config.reconnect_initial_delay;
        {
            let _topology = shared.topology_lock.lock().await;
            shared.session.send_replace(Some(session.clone()));
            for reg in shared.registry.all() {
                if let Err(error) = consume::start_locked(&shared, &reg, &session).await {
                    tracing::error!(registration = %reg.label, %error, "re-establishing a consumer failed");
                }
            }
        }
        if generation > 1 {
            shared.count_reconnect();
            tracing::info!(url = %config.redacted_url(), generation, "reconnected to the broker");
        } else {
            tracing::info!(url = %config.redacted_url(), "connected to the broker");
        }
        tokio::select! {
            reason = session.lost() => {
                shared.session.send_replace(None);
                shared.set_last_error(reason.clone());
                let failed = shared
                    .inbox
                    .fail_all(&BridgeError::Unavailable("connection to the broker lost".into()));
                // Stream sessions are at most once: they die with the connection.
                let ended_streams = shared.streams.end_all(streams::CONNECTION_LOST, false);
                tracing::warn!(%reason, failed_invocations = failed, ended_streams, "connection to the broker lost; reconnecting");
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, ErrorKind};

    use super::*;

    const URL: &str = "amqps://app:***@mq.internal:5671/%2f";

    fn io_error(
        kind: ErrorKind,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> lapin::Error {
        io::Error::new(kind, cause).into()
    }

    #[test]
    fn an_untrusted_broker_certificate_is_a_tls_certificate_problem() {
        let untrusted = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let text = connect_failure(URL, true, &io_error(ErrorKind::InvalidData, untrusted));
        assert!(
            text.starts_with(&format!("connecting to {URL} failed")),
            "{text}"
        );
        assert!(text.contains("TLS certificate problem"), "{text}");
        assert!(text.contains("PURISTA_AMQP_CA_FILE"), "{text}");
    }

    #[test]
    fn a_refused_client_points_at_the_client_certificate() {
        let refused = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let text = connect_failure(URL, true, &io_error(ErrorKind::InvalidData, refused));
        assert!(text.contains("TLS certificate problem"), "{text}");
        assert!(text.contains("PURISTA_AMQP_CLIENT_CERT_FILE"), "{text}");
    }

    #[test]
    fn a_reset_during_a_tls_connect_may_be_a_refused_client_certificate() {
        let reset = io_error(ErrorKind::ConnectionReset, "reset by peer");
        let text = connect_failure(URL, true, &reset);
        assert!(
            text.contains("possibly a TLS certificate problem"),
            "{text}"
        );
        let plain = connect_failure("amqp://h/", false, &reset);
        assert!(!plain.contains("TLS"), "{plain}");
    }
}
