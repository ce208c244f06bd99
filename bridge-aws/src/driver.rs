//! The bridge's entry in the facade's driver table: `aws://…` URLs.

use std::sync::Arc;

use futures::FutureExt;
use purista_core::{ConnectRequest, Connected, Driver, DriverError, EventBridge, QueueBridge};

use crate::bridge::{AwsBridge, BRIDGE_NAME, capabilities};
use crate::config::{AwsConfig, PREFIX_ENV, URL_ENV};

/// The AWS driver: scheme `aws`.
pub fn driver() -> Driver {
    Driver {
        name: BRIDGE_NAME,
        schemes: &["aws"],
        capabilities: || capabilities(&AwsConfig::default()),
        connect: |request| connect(request).boxed(),
    }
}

async fn connect(request: ConnectRequest) -> Result<Connected, DriverError> {
    let config = config(&request, |name| std::env::var(name).ok())?;
    let bridge = AwsBridge::new(config).await?;
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
) -> Result<AwsConfig, DriverError> {
    AwsConfig::from_lookup(|name| match name {
        URL_ENV => Some(request.url.clone()),
        PREFIX_ENV => request.prefix.clone().or_else(|| env(PREFIX_ENV)),
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
    fn the_prefix_argument_wins() {
        let c = config(&request("aws://eu-west-1?prefix=url", Some("arg")), |_| {
            None
        })
        .unwrap();
        assert_eq!(c.prefix, "arg");
    }

    #[test]
    fn a_bad_url_is_an_invalid_config() {
        assert!(matches!(
            config(&request("aws://eu-west-1?wait_seconds=x", None), |_| None),
            Err(DriverError::InvalidConfig(_))
        ));
    }
}
