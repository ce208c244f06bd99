//! The bridge's entry in the facade's driver table: `kubemq://…` URLs.

use std::sync::Arc;

use futures::FutureExt;
use purista_core::{ConnectRequest, Connected, Driver, DriverError, EventBridge, QueueBridge};

use crate::bridge::{BRIDGE_NAME, KubemqBridge, capabilities};
use crate::config::{AUTH_TOKEN_ENV, CLIENT_ID_ENV, KubemqConfig, PREFIX_ENV, URL_ENV};

/// The KubeMQ driver: scheme `kubemq`.
pub fn driver() -> Driver {
    Driver {
        name: BRIDGE_NAME,
        schemes: &["kubemq"],
        capabilities: || capabilities(&KubemqConfig::new("localhost", 50000)),
        connect: |request| connect(request).boxed(),
    }
}

async fn connect(request: ConnectRequest) -> Result<Connected, DriverError> {
    let config = config(&request, |name| std::env::var(name).ok())?;
    let bridge = KubemqBridge::new(config).await?;
    let queues: Arc<dyn QueueBridge> = Arc::new(bridge.queue_bridge());
    let events: Arc<dyn EventBridge> = Arc::new(bridge);
    events.start().await?;
    Ok(Connected {
        events,
        queues: Some(queues),
    })
}

fn config(
    request: &ConnectRequest,
    env: impl Fn(&str) -> Option<String>,
) -> Result<KubemqConfig, DriverError> {
    KubemqConfig::from_lookup(|name| match name {
        URL_ENV => Some(request.url.clone()),
        PREFIX_ENV => request.prefix.clone().or_else(|| env(PREFIX_ENV)),
        AUTH_TOKEN_ENV | CLIENT_ID_ENV => env(name),
        _ => None,
    })
    .map_err(|e| DriverError::InvalidConfig(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(url: &str, prefix: Option<&str>) -> ConnectRequest {
        ConnectRequest {
            url: url.into(),
            prefix: prefix.map(str::to_string),
        }
    }

    #[test]
    fn the_prefix_argument_wins_and_the_token_comes_from_the_environment() {
        let c = config(&request("kubemq://mq:50000?prefix=url", Some("arg")), |n| {
            (n == AUTH_TOKEN_ENV).then(|| "jwt".to_string())
        })
        .unwrap();
        assert_eq!(c.prefix, "arg");
        assert_eq!(c.auth_token.as_deref(), Some("jwt"));
    }

    #[test]
    fn a_bad_url_is_an_invalid_config() {
        assert!(matches!(
            config(&request("kubemq://mq:port", None), |_| None),
            Err(DriverError::InvalidConfig(_))
        ));
    }
}
