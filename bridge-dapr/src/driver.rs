//! The bridge's entry in the facade's driver table: `dapr://…` URLs.

use std::sync::Arc;

use futures::FutureExt;
use purista_core::{ConnectRequest, Connected, Driver, DriverError, EventBridge};

use crate::bridge::{BRIDGE_NAME, DaprBridge, capabilities};
use crate::config::{
    API_TOKEN_ENV, APP_API_TOKEN_ENV, APP_ID_ENV, APP_PORT_ENV, DaprConfig, PREFIX_ENV, PUBSUB_ENV,
    STATESTORE_ENV, URL_ENV,
};

/// The Dapr driver: scheme `dapr`.
pub fn driver() -> Driver {
    Driver {
        name: BRIDGE_NAME,
        schemes: &["dapr"],
        capabilities: || capabilities(&DaprConfig::new("http://127.0.0.1:3500", "purista")),
        connect: |request| connect(request).boxed(),
    }
}

async fn connect(request: ConnectRequest) -> Result<Connected, DriverError> {
    let config = config(&request, |name| std::env::var(name).ok())?;
    let bridge = DaprBridge::new(config)?;
    let events: Arc<dyn EventBridge> = Arc::new(bridge);
    events.start().await?;
    Ok(Connected {
        events,
        queues: None,
    })
}

/// The URL says where the sidecar is; the app's own variables (set by Dapr) still apply, and
/// the prefix argument wins over everything.
fn config(
    request: &ConnectRequest,
    env: impl Fn(&str) -> Option<String>,
) -> Result<DaprConfig, DriverError> {
    let mut config = DaprConfig::from_lookup(|name| match name {
        URL_ENV => Some(request.url.clone()),
        API_TOKEN_ENV | APP_API_TOKEN_ENV | APP_ID_ENV | APP_PORT_ENV | PUBSUB_ENV
        | STATESTORE_ENV | PREFIX_ENV => env(name),
        _ => None,
    })
    .map_err(|e| DriverError::InvalidConfig(e.to_string()))?;
    if let Some(prefix) = &request.prefix {
        config.prefix = prefix.clone();
        config
            .validate()
            .map_err(|e| DriverError::InvalidConfig(e.to_string()))?;
    }
    Ok(config)
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
    fn the_prefix_argument_wins_and_tokens_come_from_the_environment() {
        let c = config(
            &request("dapr://localhost:3501?prefix=url&app_id=a", Some("arg")),
            |n| (n == APP_API_TOKEN_ENV).then(|| "app-token".to_string()),
        )
        .unwrap();
        assert_eq!(c.prefix, "arg");
        assert_eq!(c.app_id, "a");
        assert_eq!(c.app_api_token.as_deref(), Some("app-token"));
        assert!(matches!(
            config(&request("dapr://h:port", None), |_| None),
            Err(DriverError::InvalidConfig(_))
        ));
    }
}
