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
    /// The bridge failed to start.
    #[error("bridge failed to start: {0}")]
    Bridge(#[from] BridgeError),
}

/// Removes a password from `scheme://user:password@host/…`.
///
/// ```
/// assert_eq!(purista::redact_url("amqp://guest:secret@host:5672/"), "amqp://guest:***@host:5672/");
/// assert_eq!(purista::redact_url("memory://"), "memory://");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://{user}@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
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

/// Connects to the bridge a URL names and starts it.
///
/// `memory://NAME` gives a new bridge instance on the process-wide hub `NAME` (`memory://` is
/// the hub with the empty name), so two `connect` calls with one URL act like two service
/// instances on one broker. Every instance on a hub shares one in-memory queue bridge.
pub async fn connect(url: &str) -> Result<Connection, ConnectError> {
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

/// Connects to the URL in `PURISTA_BRIDGE_URL`.
pub async fn from_env() -> Result<Connection, ConnectError> {
    let url = std::env::var(BRIDGE_URL_ENV).map_err(|_| ConnectError::MissingEnv)?;
    connect(&url).await
}
