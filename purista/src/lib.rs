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
//! | `kubemq://[:TOKEN@]host[:port][?client_id=…&prefix=…]` | KubeMQ | `kubemq` |
//! | `aws://[REGION][?prefix=…&bus=…&endpoint=…&wait_seconds=…&max_message_bytes=…]` | AWS EventBridge + SQS | `aws` |
//! | `dapr://[:TOKEN@]sidecar-host[:port][?app_id=…&app_port=…&pubsub=…&statestore=…&prefix=…]` | Dapr sidecar | `dapr` |
//!
//! The table behind [`connect`] is [`drivers`]: one [`Driver`] per bridge crate compiled in, each
//! naming its URL schemes. A scheme whose bridge exists but whose feature is off is an error
//! naming the feature to turn on; any other unknown scheme is an error listing the schemes this
//! build serves.
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
//!     .command(CommandDef::new("hello", |_ctx: Context, name: String| async move {
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

use std::sync::Arc;

pub use purista_bridge_default as default_bridge;
pub use purista_core::*;

/// The RabbitMQ bridge (cargo feature `amqp`): its config, topology names and the `lapin` it
/// uses, for deployments that build an `AmqpBridge` themselves to set more than [`connect`]
/// does (timeouts, prefetch, exchange).
#[cfg(feature = "amqp")]
pub use purista_bridge_amqp as amqp;

/// The KubeMQ bridge (cargo feature `kubemq`): its config (URL grammar, environment), channel
/// names and the `kubemq` SDK it uses.
#[cfg(feature = "kubemq")]
pub use purista_bridge_kubemq as kubemq;

/// The AWS bridge (cargo feature `aws`): its config (URL grammar, environment), resource names
/// and the AWS SDK crates it uses.
#[cfg(feature = "aws")]
pub use purista_bridge_aws as aws;
/// The Dapr bridge (cargo feature `dapr`): its config (URL grammar, Dapr's environment
/// variables), the CloudEvent mapping and the sidecar client it uses.
#[cfg(feature = "dapr")]
pub use purista_bridge_dapr as dapr;

/// The names most programs need, for `use purista::prelude::*`.
pub mod prelude {
    pub use purista_core::service::{
        CommandContract, CommandDef, Context, Empty, InvokeOptions, JobContext, QueueWorkerDef,
        Reply, Service, StreamDef, SubscriptionContext, SubscriptionDef, WorkerMode,
    };
    pub use purista_core::{
        Address, BusinessError, CommandError, CommandErrorKind, EventBridge, FailurePolicy,
        HandledError, JobSettlement, Outcome, QueueBridge, QueueConfig, RegistrationKey,
        StatusCode, StreamItem, StreamWriter, SubscriptionFilter, SubscriptionOperator,
    };
}

/// The environment variable [`from_env`] reads.
pub const BRIDGE_URL_ENV: &str = "PURISTA_BRIDGE_URL";

/// What [`connect`] hands out: the started bridges a URL selects.
#[derive(Clone)]
pub struct Connection {
    /// The event bridge (commands, subscriptions, streams). Operator calls (dead letters,
    /// paused consumers) are on it too, through [`SubscriptionOperator`].
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
    #[error("unknown bridge URL scheme `{scheme}` (this build serves: {known})")]
    UnknownScheme {
        /// The scheme.
        scheme: String,
        /// The schemes the compiled-in drivers serve, comma separated.
        known: String,
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

/// The drivers of the bridge crates compiled into this build, in the order [`connect`] asks
/// them.
///
/// ```
/// let names: Vec<&str> = purista::drivers().iter().map(|d| d.name).collect();
/// assert!(names.contains(&"default"));
/// ```
pub fn drivers() -> Vec<Driver> {
    vec![
        purista_bridge_default::driver(),
        #[cfg(feature = "amqp")]
        purista_bridge_amqp::driver(),
        #[cfg(feature = "kubemq")]
        purista_bridge_kubemq::driver(),
        #[cfg(feature = "aws")]
        purista_bridge_aws::driver(),
        #[cfg(feature = "dapr")]
        purista_bridge_dapr::driver(),
    ]
}

/// Schemes of bridges that exist but are behind a cargo feature of this crate, with the
/// feature. Only features that exist are listed here.
const FEATURE_SCHEMES: &[(&str, &str)] = &[
    ("amqp", "amqp"),
    ("amqps", "amqp"),
    ("kubemq", "kubemq"),
    ("aws", "aws"),
    ("dapr", "dapr"),
];

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
    let scheme = scheme.to_ascii_lowercase();
    let drivers = drivers();
    let Some(driver) = drivers.iter().find(|d| d.serves(&scheme)) else {
        if let Some((_, feature)) = FEATURE_SCHEMES.iter().find(|(s, _)| *s == scheme) {
            return Err(ConnectError::FeatureDisabled { scheme, feature });
        }
        let known: Vec<&str> = drivers
            .iter()
            .flat_map(|d| d.schemes.iter().copied())
            .collect();
        return Err(ConnectError::UnknownScheme {
            scheme,
            known: known.join(", "),
        });
    };
    let request = ConnectRequest {
        url: format!("{scheme}://{rest}"),
        prefix: options.prefix.clone(),
    };
    let connected = (driver.connect)(request).await.map_err(|e| match e {
        DriverError::InvalidUrl(reason) => ConnectError::InvalidUrl {
            url: redacted.clone(),
            reason,
        },
        DriverError::InvalidConfig(reason) => ConnectError::InvalidConfig { reason },
        DriverError::Bridge(e) => ConnectError::Bridge(e),
    })?;
    Ok(Connection {
        events: connected.events,
        queues: connected.queues,
        redacted_url: redacted,
    })
}

/// Connects to the URL in `PURISTA_BRIDGE_URL`; the bridge reads its other variables itself
/// (RabbitMQ: `PURISTA_AMQP_PREFIX`; KubeMQ: `KUBEMQ_AUTH_TOKEN`, `PURISTA_KUBEMQ_PREFIX`,
/// `PURISTA_KUBEMQ_CLIENT_ID`). With the `kubemq` feature and no `PURISTA_BRIDGE_URL`,
/// `KUBEMQ_ADDRESS` (`host:port`, as KubeMQ's SDKs read it) selects the KubeMQ bridge. With the
/// `dapr` feature and neither, Dapr's own `DAPR_HTTP_ENDPOINT` or `DAPR_HTTP_PORT` (set by
/// Dapr for the app) selects the Dapr bridge, which reads `APP_ID`, `APP_PORT`,
/// `DAPR_API_TOKEN` and `APP_API_TOKEN` itself.
pub async fn from_env() -> Result<Connection, ConnectError> {
    let url = match std::env::var(BRIDGE_URL_ENV) {
        Ok(url) => url,
        #[cfg(feature = "dapr")]
        Err(_) if dapr_url_from_env().is_some() => dapr_url_from_env().unwrap_or_default(),
        #[cfg(feature = "kubemq")]
        Err(_)
            if std::env::var(purista_bridge_kubemq::config::ADDRESS_ENV)
                .is_ok_and(|a| !a.trim().is_empty()) =>
        {
            let address =
                std::env::var(purista_bridge_kubemq::config::ADDRESS_ENV).unwrap_or_default();
            format!("kubemq://{}", address.trim())
        }
        Err(_) => return Err(ConnectError::MissingEnv),
    };
    connect(&url).await
}

/// `dapr://host:port` from Dapr's `DAPR_HTTP_ENDPOINT` (`http://host:port`) or
/// `DAPR_HTTP_PORT` (the sidecar on localhost), when either is set.
#[cfg(feature = "dapr")]
fn dapr_url_from_env() -> Option<String> {
    use purista_bridge_dapr::config::{HTTP_ENDPOINT_ENV, HTTP_PORT_ENV};
    let get = |name: &str| {
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if let Some(endpoint) = get(HTTP_ENDPOINT_ENV) {
        let hostport = endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        return Some(format!("dapr://{hostport}"));
    }
    get(HTTP_PORT_ENV).map(|port| format!("dapr://127.0.0.1:{port}"))
}
