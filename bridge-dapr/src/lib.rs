//! # purista-bridge-dapr
//!
//! The Dapr event bridge of purista-rs: it talks to the Dapr sidecar's HTTP API (publish,
//! service invocation, state, health) and runs the app server the sidecar delivers to
//! (`/dapr/subscribe`, topic deliveries, invoked commands). See [`DaprBridge`] for the
//! mapping and [`capabilities`] for what it declares; [`config`] for the `dapr://` URL and the
//! environment (Dapr's own variables).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use purista_bridge_dapr::{DaprBridge, DaprConfig};
//! use purista_core::EventBridge;
//! let bridge = DaprBridge::new(DaprConfig::from_env()?)?;
//! bridge.start().await?;
//! # Ok(()) }
//! ```
//!
//! With the `double` feature, [`double`] is an in-repo sidecar double for tests.

pub mod app;
mod bridge;
pub mod cloudevent;
pub mod config;
mod driver;
mod shared;
pub mod sidecar;
pub mod subscriptions;

#[cfg(feature = "double")]
pub mod double;

pub use bridge::{BRIDGE_NAME, DaprBridge, capabilities};
pub use config::{ConfigError, DaprConfig};
pub use driver::driver;
