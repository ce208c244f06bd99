//! The `amqp://` / `amqps://` driver for the `purista` facade's driver table.
//!
//! A connect reads the bridge's settings with its own environment reader
//! ([`AmqpConfig::from_lookup`]), so that `purista::connect` and [`AmqpBridge::from_env`] agree:
//! the URL given stands in for `PURISTA_BRIDGE_URL`, the request's prefix (when given) for
//! `PURISTA_AMQP_PREFIX`; every other variable (TLS: `PURISTA_AMQP_CA_FILE`,
//! `PURISTA_AMQP_CLIENT_CERT_FILE`, `PURISTA_AMQP_CLIENT_KEY_FILE`) comes from the process
//! environment. The connect waits for the first connection, at most the connect timeout.

use std::sync::Arc;

use futures::FutureExt;
use purista_core::{ConnectRequest, Connected, Driver, DriverError, EventBridge};

use crate::bridge::{AmqpBridge, BRIDGE_NAME, capabilities};
use crate::config::{AmqpConfig, ConfigError, PREFIX_ENV, URL_ENV};

/// The RabbitMQ bridge's driver: schemes `amqp` and `amqps`. It has no queue bridge.
///
/// ```
/// let driver = purista_bridge_amqp::driver();
/// assert!(driver.serves("amqps"));
/// assert!((driver.capabilities)().durable_subscriptions);
/// ```
pub fn driver() -> Driver {
    Driver {
        name: BRIDGE_NAME,
        schemes: &["amqp", "amqps"],
        capabilities: || capabilities(&AmqpConfig::new("amqp://localhost")),
        connect: |request| connect(request).boxed(),
    }
}

async fn connect(request: ConnectRequest) -> Result<Connected, DriverError> {
    let config = config(&request, |name| std::env::var(name).ok())?;
    let bridge = AmqpBridge::new(config).map_err(invalid)?;
    let events: Arc<dyn EventBridge> = Arc::new(bridge);
    // On failure the bridge is dropped here, which stops its reconnect supervisor.
    events.start().await?;
    Ok(Connected {
        events,
        queues: None,
    })
}

/// The bridge's config for `request`, other variables from `env`.
fn config(
    request: &ConnectRequest,
    env: impl Fn(&str) -> Option<String>,
) -> Result<AmqpConfig, DriverError> {
    AmqpConfig::from_lookup(|name| match name {
        URL_ENV => Some(request.url.clone()),
        PREFIX_ENV => request.prefix.clone().or_else(|| env(PREFIX_ENV)),
        other => env(other),
    })
    .map_err(invalid)
}

fn invalid(error: ConfigError) -> DriverError {
    DriverError::InvalidConfig(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CA_FILE_ENV, CLIENT_CERT_FILE_ENV};

    fn request(url: &str, prefix: Option<&str>) -> ConnectRequest {
        ConnectRequest {
            url: url.into(),
            prefix: prefix.map(str::to_string),
        }
    }

    #[test]
    fn the_tls_variables_reach_the_bridge_config() {
        let error = config(
            &request("amqps://app:secret@mq.internal/%2f", None),
            |name| (name == CA_FILE_ENV).then(|| "/nonexistent/purista-ca.pem".to_string()),
        )
        .unwrap_err();
        assert!(
            matches!(&error, DriverError::InvalidConfig(reason)
                if reason.contains("CA certificate file `/nonexistent/purista-ca.pem`")),
            "{error:?}"
        );
    }

    #[test]
    fn a_client_certificate_without_its_key_is_refused() {
        let error = config(&request("amqps://mq.internal/%2f", Some("blue")), |name| {
            (name == CLIENT_CERT_FILE_ENV).then(|| "/etc/client.pem".to_string())
        })
        .unwrap_err();
        assert!(
            matches!(&error, DriverError::InvalidConfig(reason)
                if reason.contains("PURISTA_AMQP_CLIENT_KEY_FILE")),
            "{error:?}"
        );
    }

    #[test]
    fn the_prefix_argument_wins_over_the_environment() {
        let config = config(&request("amqp://h/%2f", Some("blue")), |name| {
            (name == PREFIX_ENV).then(|| "green".to_string())
        })
        .unwrap();
        assert_eq!(config.prefix, "blue");
    }
}
