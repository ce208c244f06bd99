//! Settings of one RabbitMQ bridge instance, read from code or from the environment.
//!
//! The URL carries credentials, so it never reaches a log as written: [`AmqpConfig`]'s `Debug`
//! and [`redact_url`] replace the password, and every log line of this crate uses the redacted
//! form. Every broker resource is named under [`AmqpConfig::prefix`], so deployments and test
//! runs sharing one broker do not collide.
//!
//! TLS material ([`TlsSettings`]) is named by file path, so the config stays plain data that
//! never holds key material; the files are read and checked by [`AmqpConfig::validate`], and
//! read again at every connect, so a renewed certificate is picked up by the next reconnect.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use purista_core::envelope::DEFAULT_MAX_ENVELOPE_BYTES;

use crate::budget::{DEFAULT_MAX_METADATA_BYTES, LARGEST_MAX_METADATA_BYTES};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Environment variable holding the broker URL (`amqp://…` or `amqps://…`).
pub const URL_ENV: &str = "PURISTA_BRIDGE_URL";
/// Environment variable holding the resource-name prefix.
pub const PREFIX_ENV: &str = "PURISTA_AMQP_PREFIX";
/// Environment variable naming a PEM file of CA certificates to trust for `amqps://`.
pub const CA_FILE_ENV: &str = "PURISTA_AMQP_CA_FILE";
/// Environment variable naming the PEM client certificate for mutual TLS.
pub const CLIENT_CERT_FILE_ENV: &str = "PURISTA_AMQP_CLIENT_CERT_FILE";
/// Environment variable naming the PEM private key of the client certificate.
pub const CLIENT_KEY_FILE_ENV: &str = "PURISTA_AMQP_CLIENT_KEY_FILE";
/// Environment variable choosing the queue topology: `native` (the default) or `purista`
/// ([`TopologyMode`]). The URL option `?topology=…` wins over it.
pub const TOPOLOGY_ENV: &str = "PURISTA_AMQP_TOPOLOGY";
/// Default resource-name prefix (and exchange name), as in PURISTA.
pub const DEFAULT_PREFIX: &str = "purista";
/// Default ttl of invocations: 30 s.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of unacknowledged commands one instance takes per command queue.
pub const DEFAULT_COMMAND_PREFETCH: u16 = 32;

/// Why a configuration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The URL variable is not set.
    #[error("environment variable {URL_ENV} is not set")]
    MissingUrl,
    /// The topology option (URL `?topology=` or `PURISTA_AMQP_TOPOLOGY`) names no mode.
    #[error("unknown AMQP topology `{0}`: use `native` or `purista`")]
    UnknownTopology(String),
    /// The URL is not `amqp://…` or `amqps://…` (shown redacted).
    #[error("`{0}` is not an amqp:// or amqps:// URL")]
    NotAmqp(String),
    /// The prefix is empty or contains characters that are awkward in resource names.
    #[error("invalid resource prefix `{0}`: use letters, digits, `.`, `-` and `_`")]
    InvalidPrefix(String),
    /// TLS settings are given, but the URL (shown redacted) is a plain `amqp://` one: the
    /// connection would not use them, and the user clearly expected TLS.
    #[error("TLS settings are given, but `{0}` is a plain amqp:// URL: use amqps://")]
    TlsWithoutAmqps(String),
    /// A TLS file cannot be read: missing, a directory, or no permission.
    #[error("cannot read the {kind} file `{}`: {reason}", path.display())]
    UnreadableTlsFile {
        /// What the file should hold.
        kind: TlsFile,
        /// The file as configured.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// A TLS file was read but does not hold what it should.
    #[error("the {kind} file `{}` is not usable: {reason}", path.display())]
    InvalidTlsFile {
        /// What the file should hold.
        kind: TlsFile,
        /// The file as configured.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },
    /// `max_metadata_bytes` leaves no room in RabbitMQ's frame for the bridge's own headers.
    #[error(
        "max_metadata_bytes of {0} is over {LARGEST_MAX_METADATA_BYTES}: the bridge's own headers and the broker's must still fit one frame"
    )]
    MetadataLimit(usize),
    /// The instance id `dead-letter` would name a reply queue like the dead-letter queue of a
    /// target named `reply`.
    #[error(
        "the instance id `dead-letter` is reserved: its reply queue would be a dead-letter queue's name"
    )]
    ReservedInstanceId,
    /// Only one of the client certificate and its private key is set in the environment.
    #[error("{given} is set but {missing} is not: a client certificate needs its private key")]
    IncompleteClientIdentity {
        /// The variable that is set.
        given: &'static str,
        /// The variable that is missing.
        missing: &'static str,
    },
}

/// Which TLS file a [`ConfigError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// The CA certificates trusted for the broker's certificate.
    CaCertificates,
    /// The client certificate (chain) presented to the broker.
    ClientCertificate,
    /// The private key of the client certificate.
    ClientKey,
}

impl std::fmt::Display for TlsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsFile::CaCertificates => "CA certificate",
            TlsFile::ClientCertificate => "client certificate",
            TlsFile::ClientKey => "client private key",
        })
    }
}

/// TLS settings of `amqps://` connections beyond the defaults.
///
/// With none, an `amqps://` connection trusts the platform's root certificates only, which
/// rejects a broker whose certificate a private CA signed. [`TlsSettings::ca_certificate_file`]
/// adds that CA; [`TlsSettings::client_identity`] is for brokers that require a client
/// certificate (`ssl_options.fail_if_no_peer_cert = true`). `Debug` shows file paths only.
///
/// ```
/// use purista_bridge_amqp::{AmqpConfig, TlsSettings};
/// let config = AmqpConfig::new("amqps://app:secret@mq.internal:5671/%2f")
///     .with_ca_certificate_file("/etc/purista/rabbitmq-ca.pem")
///     .with_client_identity_files("/etc/purista/client.pem", "/etc/purista/client.key");
/// assert!(!config.tls.is_empty());
/// assert!(TlsSettings::default().is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file of CA certificates trusted besides the platform's roots: the CA that signed
    /// the broker's certificate.
    pub ca_certificate_file: Option<PathBuf>,
    /// Client certificate and key this bridge presents (mutual TLS).
    pub client_identity: Option<ClientIdentity>,
}

/// A client certificate and its private key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The client certificate, optionally followed by its intermediate CA certificates.
    pub certificate_file: PathBuf,
    /// Its private key, unencrypted (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl TlsSettings {
    /// True when nothing is set: plain defaults.
    pub fn is_empty(&self) -> bool {
        self.ca_certificate_file.is_none() && self.client_identity.is_none()
    }

    /// Reads and checks every file: the TLS material lapin's rustls connector takes.
    pub(crate) fn load(&self) -> Result<OwnedTLSConfig, ConfigError> {
        let cert_chain = self
            .ca_certificate_file
            .as_deref()
            .map(read_ca_certificates)
            .transpose()?;
        let identity = self
            .client_identity
            .as_ref()
            .map(ClientIdentity::load)
            .transpose()?;
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

impl ClientIdentity {
    fn load(&self) -> Result<OwnedIdentity, ConfigError> {
        let pem = read_tls_file(TlsFile::ClientCertificate, &self.certificate_file)?;
        certificates_in(&pem).map_err(|reason| ConfigError::InvalidTlsFile {
            kind: TlsFile::ClientCertificate,
            path: self.certificate_file.clone(),
            reason,
        })?;
        let key = read_tls_file(TlsFile::ClientKey, &self.key_file)?;
        // The error would describe the key's content: say only what is missing.
        PrivateKeyDer::from_pem_slice(&key).map_err(|_| ConfigError::InvalidTlsFile {
            kind: TlsFile::ClientKey,
            path: self.key_file.clone(),
            reason: "it holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
        })?;
        Ok(OwnedIdentity::PKCS8 { pem, key })
    }
}

fn read_tls_file(kind: TlsFile, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::UnreadableTlsFile {
        kind,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The CA bundle as PEM text, once every certificate in it parses as a trust anchor (rustls
/// would otherwise skip a broken one silently and reject the broker later).
fn read_ca_certificates(path: &Path) -> Result<String, ConfigError> {
    let invalid = |reason: String| ConfigError::InvalidTlsFile {
        kind: TlsFile::CaCertificates,
        path: path.to_path_buf(),
        reason,
    };
    let pem = read_tls_file(TlsFile::CaCertificates, path)?;
    let certificates = certificates_in(&pem).map_err(invalid)?;
    let mut roots = RootCertStore::empty();
    for (n, certificate) in certificates.into_iter().enumerate() {
        if let Err(e) = roots.add(certificate) {
            let n = n + 1;
            return Err(invalid(format!(
                "certificate {n} is not a usable CA certificate: {e}"
            )));
        }
    }
    String::from_utf8(pem).map_err(|_| invalid("it is not PEM text".into()))
}

const NO_PEM_CERTIFICATE: &str = "it holds no PEM certificate (`-----BEGIN CERTIFICATE-----`; \
    a DER file converts with `openssl x509 -inform der -in FILE -out FILE.pem`)";

/// Every certificate of a PEM file; `Err` when there is none or one is malformed.
fn certificates_in(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM: {e}"))?;
    if certificates.is_empty() {
        return Err(NO_PEM_CERTIFICATE.into());
    }
    Ok(certificates)
}

/// Settings of one [`AmqpBridge`](crate::AmqpBridge).
///
/// ```
/// use purista_bridge_amqp::AmqpConfig;
/// let config = AmqpConfig::new("amqp://guest:secret@127.0.0.1:5672/%2f").with_prefix("orders-test");
/// assert_eq!(config.exchange_name(), "orders-test");
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://user:password@host:port/vhost` or `amqps://…` (TLS with rustls).
    pub url: String,
    /// CA certificates and client identity for `amqps://` (none: the platform's roots).
    pub tls: TlsSettings,
    /// Prefix of every queue and exchange name (default `purista`).
    pub prefix: String,
    /// The headers exchange all messages go through; `None` = the prefix itself (PURISTA's
    /// default exchange `purista`).
    pub exchange: Option<String>,
    /// Ttl of invocations when the caller gives none (30 s).
    pub default_command_timeout: Duration,
    /// Unacknowledged commands one instance takes from a command queue (32).
    pub command_prefetch: u16,
    /// The instance id stamped as `sender.instanceId`; `None` = a fresh random id.
    pub instance_id: Option<String>,
    /// Largest encoded envelope this bridge sends or accepts (1 MiB).
    pub max_payload_bytes: usize,
    /// Largest metadata a caller may send beside the body: the AMQP properties, headers
    /// included, as encoded (96 KiB). It must leave room within RabbitMQ's frame (131 072
    /// bytes) for the bridge's own headers and the broker's, so it is at most
    /// [`LARGEST_MAX_METADATA_BYTES`](crate::LARGEST_MAX_METADATA_BYTES); a broker configured
    /// with a smaller `frame_max` lowers it further (with a warning at connect). Over it,
    /// `emit`, `invoke` and `open_stream` fail with 400 before anything is sent.
    pub max_metadata_bytes: usize,
    /// How long connecting may take before an attempt counts as failed (10 s).
    pub connect_timeout: Duration,
    /// How long one broker call may take (a publish until its confirm, a declaration, a
    /// consume, a cancel) before it fails with 503 (10 s). `emit` returns by it whatever the
    /// broker's state (frozen, in a memory alarm).
    pub broker_timeout: Duration,
    /// First wait between reconnect attempts; doubles per failure (100 ms).
    pub reconnect_initial_delay: Duration,
    /// Longest wait between reconnect attempts (5 s).
    pub reconnect_max_delay: Duration,
    /// For this long after a reconnect (10 s), an invocation whose command finds no queue is
    /// published again (within its ttl) instead of failing with 502 at once: the serving
    /// instances lost their connections too and may not have re-created their command queues
    /// yet. Outside this window an unroutable command fails with 502 immediately. In
    /// [`TopologyMode::Purista`] the same holds for this long after a command last reached
    /// its queue: that queue goes with its server's connection, even when the caller's own
    /// connection survived.
    pub reconnect_grace: Duration,
    /// A command queue whose serving instances all vanished without unregistering (a crash, a
    /// lost connection) keeps taking commands for this long (60 s), so an instance that comes
    /// back finds the commands still within their ttl waiting; callers meanwhile get 504 at
    /// their ttl. After it the broker deletes the queue, and invocations fail with 502 at once.
    /// An instance that unregisters or shuts down deletes the queue itself when it was the
    /// last consumer, so a command nobody serves any more fails with 502 at once.
    pub command_queue_expiry: Duration,
    /// A subscription queue that is not durable, or belongs to one instance (broadcast), is
    /// deleted by the broker after this long without any consumer (30 min): what a crashed or
    /// retired deployment leaves behind cleans itself up. Durable shared queues never expire.
    pub idle_queue_expiry: Duration,
    /// How queues are declared: this bridge's own way (the default) or exactly as PURISTA's
    /// TypeScript AMQP bridge does, so that TypeScript and Rust instances of one service share
    /// its queues ([`TopologyMode`]).
    pub topology: TopologyMode,
    /// In [`TopologyMode::Purista`], whether command queues are declared durable: PURISTA
    /// declares them as its command definition says (`durable` is `false` unless the
    /// definition asks), and both sides must agree or the broker refuses the second
    /// declaration. Ignored in [`TopologyMode::Native`].
    pub purista_durable_command_queues: bool,
}

/// How the bridge declares its command and shared subscription queues.
///
/// RabbitMQ refuses (406 `PRECONDITION_FAILED`, "inequivalent arg") a queue declaration whose
/// flags or arguments differ from the queue's, so instances that share a queue must declare it
/// alike. Both modes use the same names, the same headers exchange, the same bindings and the
/// same envelope; they differ in how long queues live:
///
/// | | [`Native`](TopologyMode::Native) (default) | [`Purista`](TopologyMode::Purista) |
/// |---|---|---|
/// | command queue | not auto-delete, `x-expires` = [`AmqpConfig::command_queue_expiry`]; deleted by its last server when it leaves | auto-delete, no arguments, durable per [`AmqpConfig::purista_durable_command_queues`] (PURISTA's declaration) |
/// | shared subscription queue, durable | durable, no arguments | the same |
/// | shared subscription queue, not durable | `x-expires` = [`AmqpConfig::idle_queue_expiry`] | no arguments (PURISTA's declaration): stays until deleted by hand |
/// | response headers | `receiverInstanceId` | `receiverInstanceId` and PURISTA's `receiverServiceInstanceId` |
/// | AMQP `timestamp` property | seconds, as AMQP defines it | milliseconds, as PURISTA writes it |
///
/// What the PURISTA mode gives up: an auto-delete command queue disappears, with the commands
/// waiting in it, as soon as its last consumer goes, also when that consumer merely lost its
/// connection. While every server of a command reconnects, its commands are unroutable: a Rust
/// caller that reached the command within the last [`AmqpConfig::reconnect_grace`] (or
/// reconnected itself within it) publishes again within its ttl, and fails with 502 only once
/// the command has had no route for the grace; a TypeScript caller waits for its timeout; and
/// commands that were waiting in the queue are lost (their callers time out). The native mode keeps the queue, and
/// its commands, for [`AmqpConfig::command_queue_expiry`]. Everything else holds in both modes
/// and is proven by the conformance suite in both (`amqp` and `amqp_purista`): commands are
/// still published `mandatory` with an expiration (PURISTA's servers simply ignore both), so no
/// Rust server runs a command whose caller gave up, and the reply queue, stream queues,
/// broadcast queues, retry and dead-letter queues are this bridge's own in both modes (PURISTA
/// declares none of them under these names).
///
/// ```
/// use purista_bridge_amqp::{AmqpConfig, TopologyMode};
/// let config = AmqpConfig::from_lookup(|name| match name {
///     "PURISTA_BRIDGE_URL" => Some("amqp://localhost/%2f?topology=purista".into()),
///     _ => None,
/// })?;
/// assert_eq!(config.topology, TopologyMode::Purista);
/// // The option is the bridge's, not the broker's: it is taken off the URL.
/// assert_eq!(config.url, "amqp://localhost/%2f");
/// # Ok::<(), purista_bridge_amqp::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TopologyMode {
    /// This bridge's own declarations: queues that outlive a lost connection.
    #[default]
    Native,
    /// PURISTA's declarations, for deployments that mix TypeScript and Rust instances of one
    /// service on one exchange.
    Purista,
}

impl TopologyMode {
    /// `native` or `purista`.
    pub fn as_str(self) -> &'static str {
        match self {
            TopologyMode::Native => "native",
            TopologyMode::Purista => "purista",
        }
    }
}

impl std::str::FromStr for TopologyMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "native" => Ok(TopologyMode::Native),
            "purista" => Ok(TopologyMode::Purista),
            _ => Err(ConfigError::UnknownTopology(s.to_string())),
        }
    }
}

/// Takes the bridge's own `topology` option off a broker URL's query: `(url without it, its
/// value)`. Other query options (lapin's `heartbeat`, `frame_max`, …) stay.
fn take_topology_option(url: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some(("topology", v)) => {
                value = Some(v.to_string());
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    if kept.is_empty() {
        (base.to_string(), value)
    } else {
        (format!("{base}?{}", kept.join("&")), value)
    }
}

impl AmqpConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            tls: TlsSettings::default(),
            prefix: DEFAULT_PREFIX.to_string(),
            exchange: None,
            default_command_timeout: DEFAULT_COMMAND_TIMEOUT,
            command_prefetch: DEFAULT_COMMAND_PREFETCH,
            instance_id: None,
            max_payload_bytes: DEFAULT_MAX_ENVELOPE_BYTES,
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
            connect_timeout: Duration::from_secs(10),
            broker_timeout: Duration::from_secs(10),
            reconnect_initial_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            reconnect_grace: Duration::from_secs(10),
            command_queue_expiry: Duration::from_secs(60),
            idle_queue_expiry: Duration::from_secs(30 * 60),
            topology: TopologyMode::Native,
            purista_durable_command_queues: false,
        }
    }

    /// Reads `PURISTA_BRIDGE_URL` (required), and optionally `PURISTA_AMQP_PREFIX`,
    /// `PURISTA_AMQP_TOPOLOGY` (`native` or `purista`; the URL option `?topology=` wins),
    /// `PURISTA_AMQP_CA_FILE`, and `PURISTA_AMQP_CLIENT_CERT_FILE` with
    /// `PURISTA_AMQP_CLIENT_KEY_FILE` (both or neither); then [validates](Self::validate).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`AmqpConfig::from_env`], with a custom variable lookup (for tests and embedding).
    ///
    /// ```
    /// use purista_bridge_amqp::AmqpConfig;
    /// let config = AmqpConfig::from_lookup(|name| match name {
    ///     "PURISTA_BRIDGE_URL" => Some("amqp://localhost".into()),
    ///     "PURISTA_AMQP_PREFIX" => Some("staging".into()),
    ///     _ => None,
    /// })
    /// .unwrap();
    /// assert_eq!(config.prefix, "staging");
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let url = lookup(URL_ENV)
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingUrl)?;
        let (url, url_topology) = take_topology_option(url.trim());
        let mut config = AmqpConfig::new(url);
        if let Some(topology) = url_topology.or_else(|| lookup(TOPOLOGY_ENV)) {
            config.topology = topology.parse()?;
        }
        if let Some(prefix) = lookup(PREFIX_ENV).filter(|p| !p.trim().is_empty()) {
            config.prefix = prefix.trim().to_string();
        }
        let file = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        config.tls.ca_certificate_file = file(CA_FILE_ENV);
        config.tls.client_identity = match (file(CLIENT_CERT_FILE_ENV), file(CLIENT_KEY_FILE_ENV)) {
            (Some(certificate_file), Some(key_file)) => Some(ClientIdentity {
                certificate_file,
                key_file,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::IncompleteClientIdentity {
                    given: CLIENT_CERT_FILE_ENV,
                    missing: CLIENT_KEY_FILE_ENV,
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::IncompleteClientIdentity {
                    given: CLIENT_KEY_FILE_ENV,
                    missing: CLIENT_CERT_FILE_ENV,
                });
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// The same config with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same config trusting the CA certificates of a PEM file (besides the platform's
    /// roots): the CA that signed the broker's certificate. The file is read by
    /// [`AmqpConfig::validate`] and at every connect.
    ///
    /// ```
    /// use std::path::Path;
    /// use purista_bridge_amqp::{AmqpConfig, ConfigError, TlsFile};
    /// let config = AmqpConfig::new("amqps://app:secret@mq.internal:5671/%2f")
    ///     .with_ca_certificate_file("/nonexistent/rabbitmq-ca.pem");
    /// match config.validate() {
    ///     Err(ConfigError::UnreadableTlsFile { kind, path, .. }) => {
    ///         assert_eq!(kind, TlsFile::CaCertificates);
    ///         assert_eq!(path, Path::new("/nonexistent/rabbitmq-ca.pem"));
    ///     }
    ///     other => panic!("unexpected: {other:?}"),
    /// }
    /// ```
    pub fn with_ca_certificate_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_certificate_file = Some(path.into());
        self
    }

    /// The same config presenting a client certificate (mutual TLS): a PEM certificate file
    /// (optionally followed by its intermediates) and the PEM file of its unencrypted private
    /// key. Only paths are kept: `Debug` never shows key material.
    ///
    /// ```
    /// use purista_bridge_amqp::AmqpConfig;
    /// let config = AmqpConfig::new("amqps://mq.internal:5671/%2f")
    ///     .with_client_identity_files("/etc/purista/client.pem", "/etc/purista/client.key");
    /// let identity = config.tls.client_identity.as_ref().unwrap();
    /// assert_eq!(identity.key_file.to_str(), Some("/etc/purista/client.key"));
    /// ```
    pub fn with_client_identity_files(
        mut self,
        certificate_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.tls.client_identity = Some(ClientIdentity {
            certificate_file: certificate_file.into(),
            key_file: key_file.into(),
        });
        self
    }

    /// The same config declaring queues the given way ([`TopologyMode`]).
    pub fn with_topology(mut self, topology: TopologyMode) -> Self {
        self.topology = topology;
        self
    }

    /// The same config with a fixed instance id.
    pub fn with_instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// The headers exchange name: [`AmqpConfig::exchange`] or the prefix.
    pub fn exchange_name(&self) -> &str {
        self.exchange.as_deref().unwrap_or(&self.prefix)
    }

    /// The URL with its password replaced, safe for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks the scheme, the prefix, the metadata limit, the instance id and the TLS settings,
    /// reading every TLS file: a missing or unusable one is reported here, naming the file, not
    /// as a failed connect later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let scheme = self.url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("amqp" | "amqps")) {
            return Err(ConfigError::NotAmqp(self.redacted_url()));
        }
        if scheme == Some("amqp") && !self.tls.is_empty() {
            return Err(ConfigError::TlsWithoutAmqps(self.redacted_url()));
        }
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !valid(&self.prefix) {
            return Err(ConfigError::InvalidPrefix(self.prefix.clone()));
        }
        if let Some(exchange) = &self.exchange
            && !valid(exchange)
        {
            return Err(ConfigError::InvalidPrefix(exchange.clone()));
        }
        if self.max_metadata_bytes > LARGEST_MAX_METADATA_BYTES {
            return Err(ConfigError::MetadataLimit(self.max_metadata_bytes));
        }
        if self.instance_id.as_deref() == Some("dead-letter") {
            return Err(ConfigError::ReservedInstanceId);
        }
        self.tls.load()?;
        Ok(())
    }

    /// Removes the password from any text (broker error messages may echo the URL).
    pub(crate) fn scrub(&self, text: &str) -> String {
        match password_of(&self.url) {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text.to_string(),
        }
    }
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.redacted_url())
            .field("tls", &self.tls)
            .field("prefix", &self.prefix)
            .field("exchange", &self.exchange_name())
            .field("default_command_timeout", &self.default_command_timeout)
            .field("command_prefetch", &self.command_prefetch)
            .field("instance_id", &self.instance_id)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("max_metadata_bytes", &self.max_metadata_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("broker_timeout", &self.broker_timeout)
            .field("reconnect_initial_delay", &self.reconnect_initial_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("reconnect_grace", &self.reconnect_grace)
            .field("command_queue_expiry", &self.command_queue_expiry)
            .field("idle_queue_expiry", &self.idle_queue_expiry)
            .field("topology", &self.topology)
            .field(
                "purista_durable_command_queues",
                &self.purista_durable_command_queues,
            )
            .finish()
    }
}

/// The authority's userinfo password of `scheme://user:password@host/…`, if any.
fn password_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (userinfo, _) = authority.rsplit_once('@')?;
    userinfo.split_once(':').map(|(_, p)| p)
}

pub use purista_core::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let config = AmqpConfig::new("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("guest:***@127.0.0.1:5672/%2f"), "{shown}");
    }

    #[test]
    fn scrub_removes_the_password_from_broker_messages() {
        let config = AmqpConfig::new("amqp://u:p4ss@h/");
        assert_eq!(
            config.scrub("failed to reach amqp://u:p4ss@h/"),
            "failed to reach amqp://u:***@h/"
        );
    }

    #[test]
    fn the_topology_option_comes_off_the_url_and_wins_over_the_variable() {
        let read = |url: &str, variable: Option<&str>| {
            AmqpConfig::from_lookup(|n| match n {
                URL_ENV => Some(url.to_string()),
                TOPOLOGY_ENV => variable.map(str::to_string),
                _ => None,
            })
        };
        let config = read("amqp://h/%2f?heartbeat=5&topology=purista", Some("native")).unwrap();
        assert_eq!(config.topology, TopologyMode::Purista);
        assert_eq!(config.url, "amqp://h/%2f?heartbeat=5");
        let config = read("amqp://h/%2f", Some("PURISTA")).unwrap();
        assert_eq!(config.topology, TopologyMode::Purista);
        assert_eq!(
            read("amqp://h/%2f", None).unwrap().topology,
            TopologyMode::Native
        );
        assert_eq!(
            read("amqp://h/%2f?topology=typescript", None),
            Err(ConfigError::UnknownTopology("typescript".into()))
        );
    }

    #[test]
    fn from_lookup_needs_an_amqp_url() {
        assert_eq!(
            AmqpConfig::from_lookup(|_| None),
            Err(ConfigError::MissingUrl)
        );
        let err = AmqpConfig::from_lookup(|n| (n == URL_ENV).then(|| "http://u:pw@h".to_string()));
        assert_eq!(err, Err(ConfigError::NotAmqp("http://u:***@h".into())));
    }

    #[test]
    fn from_lookup_reads_the_prefix_and_keeps_defaults() {
        let config = AmqpConfig::from_lookup(|n| match n {
            URL_ENV => Some("amqps://mq.example".into()),
            PREFIX_ENV => Some("blue".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.prefix, "blue");
        assert_eq!(config.exchange_name(), "blue");
        assert_eq!(config.default_command_timeout, Duration::from_secs(30));
        assert_eq!(config.max_payload_bytes, DEFAULT_MAX_ENVELOPE_BYTES);
    }

    #[test]
    fn prefixes_with_spaces_or_slashes_are_refused() {
        let config = AmqpConfig::new("amqp://h").with_prefix("a b/c");
        assert!(matches!(
            config.validate(),
            Err(ConfigError::InvalidPrefix(_))
        ));
    }

    /// A directory of test files, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir = std::env::temp_dir()
                .join(format!("purista-amqp-config-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, content: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, content).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn self_signed() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap()
    }

    #[test]
    fn tls_settings_on_a_plain_amqp_url_are_refused() {
        let config = AmqpConfig::new("amqp://u:pw@h/").with_ca_certificate_file("/ca.pem");
        assert_eq!(
            config.validate(),
            Err(ConfigError::TlsWithoutAmqps("amqp://u:***@h/".into()))
        );
    }

    #[test]
    fn a_missing_ca_file_is_an_error_naming_it() {
        let config = AmqpConfig::new("amqps://h/").with_ca_certificate_file("/no/such/ca.pem");
        let error = config.validate().unwrap_err();
        assert!(
            matches!(&error, ConfigError::UnreadableTlsFile { kind: TlsFile::CaCertificates, path, .. }
                if path == Path::new("/no/such/ca.pem")),
            "{error:?}"
        );
        assert!(error.to_string().contains("/no/such/ca.pem"), "{error}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_invalid() {
        let scratch = Scratch::new("no-certificates");
        let key_only = scratch.file("key.pem", &self_signed().signing_key.serialize_pem());
        let config = AmqpConfig::new("amqps://h/").with_ca_certificate_file(&key_only);
        let error = config.validate().unwrap_err();
        assert!(
            matches!(&error, ConfigError::InvalidTlsFile { kind: TlsFile::CaCertificates, path, reason }
                if *path == key_only && reason.contains("no PEM certificate")),
            "{error:?}"
        );
    }

    #[test]
    fn a_broken_certificate_in_the_ca_file_is_invalid() {
        let scratch = Scratch::new("broken-certificate");
        // Valid base64, but not an X.509 certificate.
        let broken = scratch.file(
            "ca.pem",
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        let config = AmqpConfig::new("amqps://h/").with_ca_certificate_file(&broken);
        assert!(matches!(
            config.validate(),
            Err(ConfigError::InvalidTlsFile {
                kind: TlsFile::CaCertificates,
                ..
            })
        ));
    }

    #[test]
    fn a_pem_ca_file_becomes_the_extra_trusted_chain() {
        let scratch = Scratch::new("ca");
        let pem = self_signed().cert.pem();
        let ca = scratch.file("ca.pem", &pem);
        let config = AmqpConfig::new("amqps://h/").with_ca_certificate_file(&ca);
        config.validate().unwrap();
        let loaded = config.tls.load().unwrap();
        assert_eq!(loaded.cert_chain.as_deref(), Some(pem.as_str()));
        assert!(loaded.identity.is_none());
    }

    #[test]
    fn a_client_identity_loads_certificate_and_key() {
        let scratch = Scratch::new("identity");
        let client = self_signed();
        let cert = scratch.file("client.pem", &client.cert.pem());
        let key = scratch.file("client.key", &client.signing_key.serialize_pem());
        let config = AmqpConfig::new("amqps://h/").with_client_identity_files(&cert, &key);
        config.validate().unwrap();
        let loaded = config.tls.load().unwrap();
        assert!(loaded.cert_chain.is_none());
        assert!(matches!(
            loaded.identity,
            Some(OwnedIdentity::PKCS8 { pem, key })
                if pem == client.cert.pem().as_bytes()
                    && key == client.signing_key.serialize_pem().as_bytes()
        ));
    }

    #[test]
    fn a_key_file_without_a_private_key_is_invalid() {
        let scratch = Scratch::new("no-key");
        let client = self_signed();
        let cert = scratch.file("client.pem", &client.cert.pem());
        let config = AmqpConfig::new("amqps://h/").with_client_identity_files(&cert, &cert);
        assert!(matches!(
            config.validate(),
            Err(ConfigError::InvalidTlsFile { kind: TlsFile::ClientKey, path, .. }) if path == cert
        ));
    }

    #[test]
    fn debug_output_shows_tls_file_paths_only() {
        let config = AmqpConfig::new("amqps://u:pw@h/")
            .with_ca_certificate_file("/etc/ca.pem")
            .with_client_identity_files("/etc/client.pem", "/etc/client.key");
        let shown = format!("{config:?}");
        assert!(
            shown.contains("/etc/ca.pem") && shown.contains("/etc/client.key"),
            "{shown}"
        );
        assert!(!shown.contains("pw"), "{shown}");
    }

    #[test]
    fn from_lookup_reads_the_tls_variables() {
        let scratch = Scratch::new("lookup");
        let (ca, client) = (self_signed(), self_signed());
        let ca = scratch.file("ca.pem", &ca.cert.pem());
        let cert = scratch.file("client.pem", &client.cert.pem());
        let key = scratch.file("client.key", &client.signing_key.serialize_pem());
        let config = AmqpConfig::from_lookup(|n| match n {
            URL_ENV => Some("amqps://mq.example".into()),
            CA_FILE_ENV => Some(ca.display().to_string()),
            CLIENT_CERT_FILE_ENV => Some(cert.display().to_string()),
            CLIENT_KEY_FILE_ENV => Some(format!(" {} ", key.display())),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.tls.ca_certificate_file, Some(ca));
        assert_eq!(
            config.tls.client_identity,
            Some(ClientIdentity {
                certificate_file: cert,
                key_file: key
            })
        );
    }

    #[test]
    fn from_lookup_refuses_a_client_certificate_without_its_key() {
        let config = AmqpConfig::from_lookup(|n| match n {
            URL_ENV => Some("amqps://mq.example".into()),
            CLIENT_CERT_FILE_ENV => Some("/etc/client.pem".into()),
            _ => None,
        });
        assert_eq!(
            config,
            Err(ConfigError::IncompleteClientIdentity {
                given: CLIENT_CERT_FILE_ENV,
                missing: CLIENT_KEY_FILE_ENV
            })
        );
    }

    #[test]
    fn redact_keeps_urls_without_password() {
        assert_eq!(redact_url("amqp://user@h:5672/v"), "amqp://user@h:5672/v");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
