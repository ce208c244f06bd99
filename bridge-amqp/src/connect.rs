//! Opening a connection to the broker, and saying clearly why one could not be opened.
//!
//! A failed connect is one of two kinds. **Transient** — the broker is down, restarting,
//! unreachable, slow: the supervisor retries with backoff. **Permanent** — the broker answered
//! and refused this client (ACCESS_REFUSED: wrong user or password; NOT_ALLOWED: a virtual host
//! it does not have or this user may not use): retrying cannot cure it, so the first connect of a bridge fails at once with a non-retryable
//! [`BridgeError::Client`] that says what to check, instead of retrying until the connect
//! timeout.
//!
//! The connection is made with lapin's connector so that its I/O thread logs through
//! `lapin_logs.rs` (which keeps message bodies out of warnings).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use lapin::tcp::AMQPUriTcpExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use purista_core::BridgeError;

use crate::config::AmqpConfig;
use crate::lapin_logs;

/// Why a connect failed, and whether trying again can help.
#[derive(Debug)]
pub(crate) struct ConnectFailure {
    pub error: BridgeError,
    pub permanent: bool,
}

/// Opens a connection named `name` with `config`'s URL and TLS settings, within its connect
/// timeout. `closing` is the flag the session sets before it closes the connection itself.
pub(crate) async fn connect(
    config: &AmqpConfig,
    name: String,
    closing: Arc<AtomicBool>,
) -> Result<Connection, ConnectFailure> {
    let transient = |error: BridgeError| ConnectFailure {
        error,
        permanent: false,
    };
    let uri: AMQPUri = config.url.parse().map_err(|e: String| ConnectFailure {
        error: BridgeError::InvalidRequest(config.scrub(&format!(
            "`{}` is not a usable amqp URL: {e}",
            config.redacted_url()
        ))),
        permanent: true,
    })?;
    // TLS files are read at every connect, so a renewed certificate counts from the next
    // reconnect on; reading files blocks, so not on the runtime's threads.
    let tls = if config.tls.is_empty() {
        lapin::tcp::OwnedTLSConfig::default()
    } else {
        let settings = config.tls.clone();
        tokio::task::spawn_blocking(move || settings.load())
            .await
            .map_err(|e| {
                transient(BridgeError::Unavailable(format!(
                    "reading the TLS files failed: {e}"
                )))
            })?
            .map_err(|e| ConnectFailure {
                error: BridgeError::client("reading the TLS files", e, false),
                permanent: true,
            })?
    };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| transient(BridgeError::client("no async runtime for lapin", e, false)))?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let logs = lapin_logs::LapinLogs::new(closing);
    let connecting = Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            // This runs on lapin's I/O thread: what lapin logs there goes through our filter.
            logs.install_on_this_thread();
            uri.connect_with_config_async(tls.as_ref(), &runtime)
                .await
                .map_err(lapin::Error::from)
        },
        properties,
    );
    let connection = tokio::time::timeout(config.connect_timeout, connecting)
        .await
        .map_err(|_| {
            transient(BridgeError::Unavailable(format!(
                "connecting to {} timed out after {:?}",
                config.redacted_url(),
                config.connect_timeout
            )))
        })?;
    connection.map_err(|e| classify(config, &e))
}

/// A failed connect as the bridge reports it.
fn classify(config: &AmqpConfig, error: &lapin::Error) -> ConnectFailure {
    let url = config.redacted_url();
    let over_tls = config.url.starts_with("amqps://");
    if let Some(refusal) = refusal(error) {
        let text = config.scrub(&format!("connecting to {url} failed: {refusal}"));
        return ConnectFailure {
            error: BridgeError::client(text, error.clone(), false),
            permanent: true,
        };
    }
    // A certificate problem stays retryable: the TLS files are read again at every connect,
    // so a renewed certificate cures it without a restart.
    let why = config.scrub(&connect_failure(&url, over_tls, error));
    ConnectFailure {
        error: BridgeError::Unavailable(why),
        permanent: false,
    }
}

/// What the broker's refusal of this client means, if `error` is one.
fn refusal(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.get_id() {
            403 => Some(format!(
                "the broker refused the credentials (ACCESS_REFUSED: {}); check the user and \
                 password in the URL",
                amqp.get_message()
            )),
            530 => Some(format!(
                "the broker refused the virtual host (NOT_ALLOWED: {}); check that the URL's \
                 virtual host exists and this user may use it",
                amqp.get_message()
            )),
            402 => Some(format!(
                "the broker refused the virtual host (INVALID_PATH: {})",
                amqp.get_message()
            )),
            _ => None,
        },
        lapin::ErrorKind::AuthProviderError(reason) => Some(format!(
            "authentication failed ({reason}); check the credentials"
        )),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use std::io::{self, ErrorKind};

    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

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

    #[test]
    fn refused_credentials_are_permanent_and_a_reset_is_not() {
        let config = AmqpConfig::new("amqp://app:s3cret@mq/%2f");
        let refused: lapin::Error = lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - Login was refused".into(),
        ))
        .into();
        let failure = classify(&config, &refused);
        assert!(failure.permanent);
        assert!(!failure.error.is_retryable());
        let text = failure.error.to_string();
        assert!(
            text.contains("credentials") && !text.contains("s3cret"),
            "{text}"
        );
        let reset = classify(&config, &io_error(ErrorKind::ConnectionRefused, "refused"));
        assert!(!reset.permanent && reset.error.is_retryable());
    }
}
