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
//! Subscriptions are at least once: the sidecar gets `SUCCESS` for a delivery only once every
//! matching subscription settled it, so what the app did not answer (it restarted, a handler
//! was cut off) is delivered again by the sidecar per its resiliency policy. Bounded and
//! delayed retries and dead letters are the bridge's, built on the pub/sub topic itself (retry
//! copies for one subscription, a dead-letter topic that is also the subscription's
//! `deadLetterTopic`); why the bridge does not lean on Dapr's `RETRY` for them is said in
//! [`capabilities`], how it works in [`subscriptions`] and [`dead_letters`].
//!
//! With the `double` feature, [`double`] is an in-repo sidecar double for tests.

pub mod app;
mod bridge;
pub mod cloudevent;
pub mod config;
pub mod copies;
pub mod dead_letters;
mod driver;
mod endpoints;
mod http;
pub mod routing;
mod shared;
pub mod sidecar;
pub mod subscriptions;

#[cfg(feature = "double")]
pub mod double;

pub use bridge::{BRIDGE_NAME, DaprBridge, capabilities};
pub use config::{ConfigError, DaprConfig};
pub use driver::driver;

/// Pending connections a listener of this crate queues (the standard library's 128 is too few
/// for a burst of invocations: connections beyond it are refused or reset).
const LISTEN_BACKLOG: u32 = 4096;

/// A non-blocking listener on `host:port` with a deep accept queue. Inside a Tokio runtime the
/// socket is set up through Tokio (which can set the backlog); outside one, the standard
/// library's defaults apply.
pub(crate) fn listen(host: &str, port: u16) -> std::io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let address = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} resolves to no address")))?;
    if tokio::runtime::Handle::try_current().is_ok() {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        return socket.listen(LISTEN_BACKLOG)?.into_std();
    }
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
