//! # purista
//!
//! PURISTA's programming model for Rust — commands (request/reply with timeouts),
//! content-filtered subscriptions, streams and leased queue jobs — over a pluggable event bridge.
//!
//! This facade re-exports [`purista_core`] and picks a bridge from a URL at run time, the way
//! `sqlx::Any` picks a database: a deployment changes its broker by changing its URL (and a cargo
//! feature), not its code.
//!
//! | URL | bridge | cargo feature |
//! |---|---|---|
//! | `memory://` or `memory://NAME` | in-process ([`purista_bridge_default`]) | always on |
//! | `amqp://…`, `amqps://…` | RabbitMQ | `amqp` |
//! | `aws://…` | AWS EventBridge + SQS | `aws` |
//! | `dapr://…` | Dapr sidecar | `dapr` |
//! | `kubemq://…` | KubeMQ | `kubemq` |
//!
//! Bridges that create broker resources name them under a prefix: by default each bridge's own
//! (`purista` on RabbitMQ, or `PURISTA_AMQP_PREFIX`), or the one given with
//! [`ConnectOptions::prefix`], so deployments and test runs sharing a broker never collide.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> anyhow::Result<()> {
//! use purista::prelude::*;
//!
//! let conn = purista::connect("memory://doc-example").await?;
//! let service = Service::builder("greeter", "1")
//!     .command(CommandDef::new("hello", |_ctx: Context, name: String, _p: Empty| async move {
//!         Ok(format!("hello {name}"))
//!     }))
//!     .build()
//!     .start(conn.events.clone())
//!     .await?;
//! let reply: String = service.invoke(Address::new("greeter", "1", "hello"), "ada", Empty).await?;
//! assert_eq!(reply, "hello ada");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

pub use purista_bridge_default as default_bridge;
pub use purista_core::*;

/// The RabbitMQ bridge (cargo feature `amqp`): its config, topology names and the `lapin` it
/// uses, for deployments that need more than [`connect`] sets (timeouts, prefetch, exchange).
#[cfg(feature = "amqp")]
pub use purista_bridge_amqp as amqp;

/// The names most programs need, for `use purista::prelude::*`.
pub mod prelude {
    pub use purista_core::service::{
        CommandDef, Context, Empty, InvokeOptions, JobContext, QueueWorkerDef, Reply, Service,
        StreamDef, SubscriptionContext, SubscriptionDef, WorkerMode,
    };
    pub use purista_core::{
        Address, CommandError, EventBridge, FailurePolicy, HandledError, JobSettlement, Outcome,
        QueueBridge, QueueConfig, StatusCode, StreamItem, StreamWriter, SubscriptionFilter,
    };
}

/// The environment variable [`from_env`] reads.
pub const BRIDGE_URL_ENV: &str = "PURISTA_BRIDGE_URL";

/// The bridges a URL selects.
#[derive(Clone)]
pub struct Connection {
    /// The event bridge (commands, subscriptions, streams).
    pub events: Arc<dyn EventBridge>,
    /// The queue bridge, where the broker has one.
    pub queues: Option<Arc<dyn QueueBridge>>,
    /// The URL with any password removed, safe to log.
    pub redacted_url: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("bridge", &self.events.name())
            .field("instance_id", &self.events.instance_id())
            .field(
                "queues",
                &self.queues.as_ref().map(|q| q.name().to_string()),
            )
            .field("url", &self.redacted_url)
            .finish()
    }
}

impl Connection {
    /// The RabbitMQ bridge behind [`Connection::events`], for its own operator calls (replaying
    /// dead letters, poison and reconnect counters, the topology it declared); `None` for any
    /// other bridge.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let conn = purista::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
    /// if let Some(amqp) = conn.amqp() {
    ///     let report = amqp.replay_dead_letters("billing.receipts.failed", 100).await?;
    ///     println!("{} replayed, {} left", report.replayed, report.left.len());
    /// }
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "amqp")]
    pub fn amqp(&self) -> Option<Arc<purista_bridge_amqp::AmqpBridge>> {
        let any: Arc<dyn std::any::Any + Send + Sync> = self.events.clone();
        any.downcast().ok()
    }
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL has no `scheme://`.
    #[error("invalid bridge URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No bridge has this scheme.
    #[error("unknown bridge URL scheme `{scheme}` (known: memory, amqp, amqps, aws, dapr, kubemq)")]
    UnknownScheme {
        /// The scheme.
        scheme: String,
    },
    /// The bridge exists but its cargo feature is off.
    #[error(
        "bridge URL scheme `{scheme}` needs the cargo feature `{feature}` of crate `purista` (e.g. `purista = {{ version = \"*\", features = [\"{feature}\"] }}`)"
    )]
    FeatureDisabled {
        /// The scheme.
        scheme: String,
        /// The feature to enable.
        feature: &'static str,
    },
    /// [`from_env`] found no URL.
    #[error("environment variable {BRIDGE_URL_ENV} is not set")]
    MissingEnv,
    /// The bridge's settings are invalid (e.g. a resource prefix with spaces or slashes).
    #[error("invalid bridge configuration: {reason}")]
    InvalidConfig {
        /// What is wrong (with any password removed).
        reason: String,
    },
    /// The bridge failed to start.
    #[error("bridge failed to start: {0}")]
    Bridge(#[from] BridgeError),
}

type MemoryHub = (
    purista_bridge_default::MemoryBroker,
    purista_bridge_default::MemoryQueueBridge,
);

fn memory_hub(name: &str) -> MemoryHub {
    static HUBS: OnceLock<Mutex<HashMap<String, MemoryHub>>> = OnceLock::new();
    let hubs = HUBS.get_or_init(|| Mutex::new(HashMap::new()));
    hubs.lock()
        .entry(name.to_string())
        .or_insert_with(|| {
            (
                purista_bridge_default::MemoryBroker::named(name),
                purista_bridge_default::MemoryQueueBridge::new(),
            )
        })
        .clone()
}

/// What [`connect_with`] connects to: a bridge URL and the settings every bridge understands.
///
/// ```
/// let options = purista::ConnectOptions::new("amqp://guest:guest@127.0.0.1:5672/%2f").prefix("orders-staging");
/// assert_eq!(options.url(), "amqp://guest:guest@127.0.0.1:5672/%2f");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    url: String,
    prefix: Option<String>,
}

impl ConnectOptions {
    /// Options for `url` with every bridge's defaults.
    pub fn new(url: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            prefix: None,
        }
    }

    /// Names every broker resource (exchange, queues) under `prefix` instead of the bridge's
    /// default or its environment variable (`PURISTA_AMQP_PREFIX`). Bridges that create no
    /// broker resources (`memory://`) ignore it.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// The bridge URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Connects to the bridge a URL names and starts it.
///
/// `memory://NAME` gives a new bridge instance on the process-wide hub `NAME` (`memory://` is
/// the hub with the empty name), so two `connect` calls with one URL act like two service
/// instances on one broker. Every instance on a hub shares one in-memory queue bridge.
///
/// `amqp://user:password@host:port/vhost` (or `amqps://…` for TLS) gives a new RabbitMQ bridge
/// instance with its own connection (cargo feature `amqp`); its resources are named under
/// `PURISTA_AMQP_PREFIX` (default `purista`). It has no queue bridge. Connecting waits for the
/// first connection, at most the bridge's connect timeout (10 s).
pub async fn connect(url: &str) -> Result<Connection, ConnectError> {
    connect_with(&ConnectOptions::new(url)).await
}

/// [`connect`] with options, e.g. a resource prefix per deployment or test run.
pub async fn connect_with(options: &ConnectOptions) -> Result<Connection, ConnectError> {
    let url = options.url.as_str();
    let redacted = redact_url(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(ConnectError::InvalidUrl {
            url: redacted,
            reason: "expected `scheme://…`, e.g. `memory://` or `amqp://localhost:5672`".into(),
        });
    };
    match scheme.to_ascii_lowercase().as_str() {
        "memory" => {
            let name = rest.trim_end_matches('/');
            let (broker, queues) = memory_hub(name);
            let events: Arc<dyn EventBridge> = Arc::new(broker.bridge());
            events.start().await?;
            Ok(Connection {
                events,
                queues: Some(Arc::new(queues)),
                redacted_url: redacted,
            })
        }
        #[cfg(feature = "amqp")]
        scheme @ ("amqp" | "amqps") => {
            // The bridge wants the scheme in lower case; the rest of the URL is lapin's to read.
            let url = format!("{scheme}://{rest}");
            let events = amqp_bridge::start(&url, options.prefix.as_deref()).await?;
            Ok(Connection {
                events,
                queues: None,
                redacted_url: redacted,
            })
        }
        #[cfg(not(feature = "amqp"))]
        "amqp" | "amqps" => Err(ConnectError::FeatureDisabled {
            scheme: scheme.to_string(),
            feature: "amqp",
        }),
        "aws" => Err(ConnectError::FeatureDisabled {
            scheme: scheme.to_string(),
            feature: "aws",
        }),
        "dapr" => Err(ConnectError::FeatureDisabled {
            scheme: scheme.to_string(),
            feature: "dapr",
        }),
        "kubemq" => Err(ConnectError::FeatureDisabled {
            scheme: scheme.to_string(),
            feature: "kubemq",
        }),
        other => Err(ConnectError::UnknownScheme {
            scheme: other.to_string(),
        }),
    }
}

/// How `connect` builds a RabbitMQ bridge.
#[cfg(feature = "amqp")]
mod amqp_bridge {
    use std::sync::Arc;

    use purista_bridge_amqp::{AmqpBridge, AmqpConfig, PREFIX_ENV, URL_ENV};
    use purista_core::EventBridge;

    use crate::ConnectError;

    /// A started bridge on `url`, configured by [`config`] from the process environment.
    pub(crate) async fn start(
        url: &str,
        prefix: Option<&str>,
    ) -> Result<Arc<dyn EventBridge>, ConnectError> {
        let config = config(url, prefix, |name| std::env::var(name).ok())?;
        let bridge = AmqpBridge::new(config).map_err(invalid)?;
        let events: Arc<dyn EventBridge> = Arc::new(bridge);
        // On failure the bridge is dropped here, which stops its reconnect supervisor.
        events.start().await?;
        Ok(events)
    }

    /// The bridge's config, read by its own environment reader so that `connect` and
    /// `AmqpBridge::from_env` agree: the URL given here stands in for `PURISTA_BRIDGE_URL`,
    /// `prefix` (when given) for `PURISTA_AMQP_PREFIX`; every other variable (TLS:
    /// `PURISTA_AMQP_CA_FILE`, `PURISTA_AMQP_CLIENT_CERT_FILE`, `PURISTA_AMQP_CLIENT_KEY_FILE`)
    /// comes from `env`.
    fn config(
        url: &str,
        prefix: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AmqpConfig, ConnectError> {
        AmqpConfig::from_lookup(|name| match name {
            URL_ENV => Some(url.to_string()),
            PREFIX_ENV => prefix.map(str::to_string).or_else(|| env(PREFIX_ENV)),
            other => env(other),
        })
        .map_err(invalid)
    }

    fn invalid(error: purista_bridge_amqp::ConfigError) -> ConnectError {
        ConnectError::InvalidConfig {
            reason: error.to_string(),
        }
    }

    #[cfg(test)]
    mod tests {
        use purista_bridge_amqp::{CA_FILE_ENV, CLIENT_CERT_FILE_ENV};

        use super::*;

        #[test]
        fn the_tls_variables_reach_the_bridge_config() {
            let error = config("amqps://app:secret@mq.internal/%2f", None, |name| {
                (name == CA_FILE_ENV).then(|| "/nonexistent/purista-ca.pem".to_string())
            })
            .unwrap_err();
            assert!(
                matches!(&error, ConnectError::InvalidConfig { reason }
                    if reason.contains("CA certificate file `/nonexistent/purista-ca.pem`")),
                "{error:?}"
            );
        }

        #[test]
        fn a_client_certificate_without_its_key_is_refused() {
            let error = config("amqps://mq.internal/%2f", Some("blue"), |name| {
                (name == CLIENT_CERT_FILE_ENV).then(|| "/etc/client.pem".to_string())
            })
            .unwrap_err();
            assert!(
                matches!(&error, ConnectError::InvalidConfig { reason }
                    if reason.contains("PURISTA_AMQP_CLIENT_KEY_FILE")),
                "{error:?}"
            );
        }

        #[test]
        fn the_prefix_argument_wins_over_the_environment() {
            let config = config("amqp://h/%2f", Some("blue"), |name| {
                (name == PREFIX_ENV).then(|| "green".to_string())
            })
            .unwrap();
            assert_eq!(config.prefix, "blue");
        }
    }
}

/// Connects to the URL in `PURISTA_BRIDGE_URL`; the bridge reads its other variables itself
/// (RabbitMQ: `PURISTA_AMQP_PREFIX`).
pub async fn from_env() -> Result<Connection, ConnectError> {
    let url = std::env::var(BRIDGE_URL_ENV).map_err(|_| ConnectError::MissingEnv)?;
    connect(&url).await
}
