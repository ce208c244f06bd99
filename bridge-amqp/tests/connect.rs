//! Permanent connect errors: credentials the broker refuses, a virtual host it does not have.
//! Retrying cannot cure them, so `start` (and the facade's connect) fails at the broker's first
//! answer with a clear error that says so, instead of retrying until the connect timeout.

mod common;

use std::time::{Duration, Instant};

use purista_bridge_amqp::{AmqpBridge, AmqpConfig};
use purista_core::{BridgeError, ConnectRequest, EventBridge};

common::runner::test_main! {
    common::BROKER: [
        refused_credentials_fail_start_at_once_and_say_retrying_cannot_help,
        an_unknown_virtual_host_fails_start_at_once,
        the_driver_connect_fails_at_once_on_refused_credentials,
    ],
}

/// The first answer comes in milliseconds; a second is generous.
const AT_ONCE: Duration = Duration::from_secs(1);

/// `url` with its userinfo replaced by `user:password`.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host}")
}

/// `url` with its virtual host replaced.
fn with_vhost(url: &str, vhost: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let authority = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{authority}/{vhost}")
}

async fn assert_fails_at_once(config: AmqpConfig, secret: Option<&str>, what: &str) {
    let bridge = AmqpBridge::new(config).expect("valid config");
    let began = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(30), bridge.start())
        .await
        .expect("start returns")
        .expect_err(what);
    let took = began.elapsed();
    assert!(
        took < AT_ONCE,
        "{what}: failed after {took:?}, not at the first answer"
    );
    assert!(
        matches!(
            error,
            BridgeError::Client {
                retryable: false,
                ..
            }
        ),
        "{what}: a non-retryable client error, got {error:?}"
    );
    assert!(!error.is_retryable());
    if let Some(secret) = secret {
        assert!(!error.to_string().contains(secret), "{error}");
    }
    assert!(!bridge.health().await.is_healthy());
    eprintln!("{what}: failed in {took:?}: {error}");
}

async fn refused_credentials_fail_start_at_once_and_say_retrying_cannot_help() {
    let broker = common::TestBroker::new("refused_credentials");
    let mut config = broker.config();
    config.url = with_credentials(&broker.url, "guest", "not-the-password");
    assert_fails_at_once(config, Some("not-the-password"), "refused credentials").await;
    let mut config = broker.config();
    config.url = with_credentials(&broker.url, "nobody-such", "pw");
    assert_fails_at_once(config, None, "unknown user").await;
    broker.finish().await;
}

async fn an_unknown_virtual_host_fails_start_at_once() {
    let broker = common::TestBroker::new("unknown_vhost");
    let mut config = broker.config();
    config.url = with_vhost(&broker.url, "no-such-vhost");
    assert_fails_at_once(config, None, "unknown virtual host").await;
    broker.finish().await;
}

async fn the_driver_connect_fails_at_once_on_refused_credentials() {
    let broker = common::TestBroker::new("driver_refused");
    let driver = purista_bridge_amqp::driver();
    let began = Instant::now();
    let request = ConnectRequest {
        url: with_credentials(&broker.url, "guest", "wrong"),
        prefix: Some(broker.prefix.clone()),
    };
    let result = tokio::time::timeout(Duration::from_secs(30), (driver.connect)(request))
        .await
        .expect("connect returns");
    assert!(result.is_err(), "refused");
    assert!(began.elapsed() < AT_ONCE, "{:?}", began.elapsed());
    broker.finish().await;
}
