//! Drivers: how a bridge crate tells the `purista` facade which URL schemes it serves and how
//! to connect to one, the way `sqlx::Any` installs database drivers.
//!
//! Each bridge crate exports one `driver()` returning a [`Driver`]. The facade collects the
//! drivers of the bridge crates compiled in (by cargo feature) into its table and picks one by
//! the URL's scheme; a scheme no compiled-in driver serves is an honest error there.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::bridge::EventBridge;
use crate::capabilities::Capabilities;
use crate::error::BridgeError;
use crate::queue::QueueBridge;

/// What a connect call gets: the URL and the settings every bridge understands.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The bridge URL as given (its scheme in lower case).
    pub url: String,
    /// Names every broker resource under this prefix instead of the bridge's default.
    pub prefix: Option<String>,
}

impl std::fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("url", &crate::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// A started bridge, as a driver hands it out.
pub struct Connected {
    /// The event bridge (commands, subscriptions, streams), started.
    pub events: Arc<dyn EventBridge>,
    /// The queue bridge, where the broker has one.
    pub queues: Option<Arc<dyn QueueBridge>>,
}

/// Why a driver could not connect.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The URL cannot be read (says what is wrong; never shows a password).
    #[error("invalid bridge URL: {0}")]
    InvalidUrl(String),
    /// The settings (URL parameters, environment variables) are invalid.
    #[error("invalid bridge configuration: {0}")]
    InvalidConfig(String),
    /// The bridge did not start.
    #[error(transparent)]
    Bridge(#[from] BridgeError),
}

/// One bridge crate's entry in the facade's driver table.
#[derive(Clone, Copy)]
pub struct Driver {
    /// The bridge's name, as [`EventBridge::name`] reports it.
    pub name: &'static str,
    /// URL schemes it serves, lower case, e.g. `["amqp", "amqps"]`.
    pub schemes: &'static [&'static str],
    /// Its capabilities with default settings (what the matrix documents).
    pub capabilities: fn() -> Capabilities,
    /// Builds and starts a bridge for the request.
    pub connect: fn(ConnectRequest) -> BoxFuture<'static, Result<Connected, DriverError>>,
}

impl Driver {
    /// True when this driver serves `scheme` (compared case-insensitively).
    pub fn serves(&self, scheme: &str) -> bool {
        self.schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme))
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("name", &self.name)
            .field("schemes", &self.schemes)
            .finish_non_exhaustive()
    }
}
