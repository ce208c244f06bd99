//! `connect("amqp://…")` with the `amqp` feature: a started RabbitMQ bridge, usable by services
//! like any other, named under the prefix it was given.
//!
//! These run against the real RabbitMQ at `amqp://guest:guest@127.0.0.1:5672/%2f` (override
//! with `PURISTA_AMQP_TEST_URL`), each under its own prefix, and delete what they declared. When
//! the broker cannot be reached a test that needs it is listed as ignored with the reason in its
//! name (a skip, never a pass; see `common/runner.rs`), unless `PURISTA_REQUIRE_BROKERS=1`,
//! which makes it run and fail. (A `harness = false` target that needs the `amqp` feature.)

mod common;

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use purista::amqp::lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions};
use purista::amqp::lapin::types::FieldTable;
use purista::amqp::lapin::{Connection as LapinConnection, ConnectionProperties, ExchangeKind};
use purista::prelude::*;
use purista::{BridgeError, ConnectError, ConnectOptions, Connection, connect_with};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

use common::runner::Needs;

const BROKER: Needs = Needs::new("RabbitMQ", broker_reachable);

common::runner::test_main! {
    BROKER: [
        amqp_url_gives_a_started_rabbitmq_bridge_without_a_queue_bridge,
        the_prefix_names_the_headers_exchange,
        a_command_crosses_two_amqp_connections,
        an_event_reaches_every_instance_of_a_broadcast_subscription,
        amqps_urls_use_tls_without_a_crypto_provider_panic,
    ],
    Needs::NOTHING: [
        an_invalid_prefix_is_a_config_error_before_any_connection,
        an_unreachable_broker_is_unavailable_and_the_error_hides_the_password,
    ],
}

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn broker_url() -> String {
    std::env::var("PURISTA_AMQP_TEST_URL").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// `host:port` of an amqp URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

/// `Ok` when the broker accepts TCP connections, else why not.
fn broker_reachable() -> Result<(), String> {
    let url = broker_url();
    let reachable = host_port(&url)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if reachable {
        Ok(())
    } else {
        Err(format!(
            "RabbitMQ is not reachable at {}",
            purista::redact_url(&url)
        ))
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A prefix no other test (or run) uses.
fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "t.facade.{test}.{:x}{:x}.{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Shuts the connections down, then deletes the exchange named after `prefix`. Everything else
/// a bridge declares for these tests deletes itself: reply queues are exclusive, command queues
/// auto-delete, non-durable broadcast queues are deleted at shutdown.
async fn finish(prefix: &str, connections: &[&Connection]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for c in connections {
        c.events.shutdown(deadline).await;
    }
    let raw = LapinConnection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .expect("cleanup connection");
    let channel = raw.create_channel().await.expect("cleanup channel");
    channel
        .exchange_delete(prefix.into(), ExchangeDeleteOptions::default())
        .await
        .expect("exchange deleted");
    let _ = raw.close(200, "OK".into()).await;
}

async fn connect_under(prefix: &str) -> Connection {
    connect_with(&ConnectOptions::new(broker_url()).prefix(prefix))
        .await
        .expect("amqp connects")
}

async fn amqp_url_gives_a_started_rabbitmq_bridge_without_a_queue_bridge() {
    let prefix = unique_prefix("started");
    let conn = connect_under(&prefix).await;
    assert_eq!(conn.events.name(), "amqp");
    assert!(conn.queues.is_none(), "RabbitMQ has no queue bridge");
    assert!(conn.events.health().await.is_healthy());
    // Operator calls go through the trait object: an unknown target has no dead letters.
    assert_eq!(
        conn.events
            .inspect_dead_letters("nothing-here", 10)
            .await
            .expect("inspect on a connected bridge"),
        Vec::new()
    );
    assert!(
        !conn.redacted_url.contains(":guest@"),
        "password shown: {}",
        conn.redacted_url
    );
    assert!(
        !format!("{conn:?}").contains(":guest@"),
        "password in Debug: {conn:?}"
    );
    finish(&prefix, &[&conn]).await;
}

async fn the_prefix_names_the_headers_exchange() {
    let prefix = unique_prefix("exchange");
    let conn = connect_under(&prefix).await;
    // A passive declaration fails (and closes the channel) when the exchange does not exist.
    let raw = LapinConnection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .expect("raw connection");
    let channel = raw.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            prefix.as_str().into(),
            ExchangeKind::Headers,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the bridge declared the exchange `<prefix>`");
    let _ = raw.close(200, "OK".into()).await;
    finish(&prefix, &[&conn]).await;
}

async fn a_command_crosses_two_amqp_connections() {
    let prefix = unique_prefix("command");
    let a = connect_under(&prefix).await;
    let b = connect_under(&prefix).await;
    assert_ne!(a.events.instance_id(), b.events.instance_id());
    let server = Service::builder("echo", "1")
        .command(CommandDef::new(
            "double",
            |_c: Context, v: u32, _p: Empty| async move { Ok(v * 2) },
        ))
        .build()
        .start(a.events.clone())
        .await
        .expect("server starts");
    let client = Service::builder("client", "1")
        .build()
        .start(b.events.clone())
        .await
        .expect("client starts");
    let v: u32 = client
        .invoke(Address::new("echo", "1", "double"), 21, Empty)
        .await
        .expect("invocation answered");
    assert_eq!(v, 42);
    let err = client
        .invoke::<u32>(Address::new("echo", "1", "nobody"), 1, Empty)
        .await
        .expect_err("no such command");
    assert_eq!(
        err.status,
        StatusCode::BAD_GATEWAY,
        "an unserved command fails fast"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    client.shutdown(deadline).await;
    server.shutdown(deadline).await;
    finish(&prefix, &[&a, &b]).await;
}

async fn an_event_reaches_every_instance_of_a_broadcast_subscription() {
    let prefix = unique_prefix("broadcast");
    let (seen, mut received) = mpsc::unbounded_channel::<String>();
    let mut connections = Vec::new();
    let mut services = Vec::new();
    for _ in 0..2 {
        let conn = connect_under(&prefix).await;
        let seen = seen.clone();
        let instance = conn.events.instance_id().to_string();
        let on_tick = SubscriptionDef::new("onTick", move |_ctx: SubscriptionContext, n: u32| {
            let seen = seen.clone();
            let instance = instance.clone();
            async move {
                let _ = seen.send(format!("{instance}:{n}"));
                Ok(())
            }
        })
        .event_name("tick")
        .broadcast();
        services.push(
            Service::builder("sink", "1")
                .subscription(on_tick)
                .build()
                .start(conn.events.clone())
                .await
                .expect("sink starts"),
        );
        connections.push(conn);
    }
    let source_conn = connect_under(&prefix).await;
    let source = Service::builder("source", "1")
        .build()
        .start(source_conn.events.clone())
        .await
        .expect("source starts");
    source.emit("tick", 7u32).await.expect("emitted");
    let mut got = Vec::new();
    while got.len() < 2 {
        match timeout(Duration::from_secs(10), received.recv()).await {
            Ok(Some(one)) => got.push(one),
            _ => panic!("only {got:?} arrived"),
        }
    }
    got.sort();
    let mut expected: Vec<String> = connections
        .iter()
        .map(|c| format!("{}:7", c.events.instance_id()))
        .collect();
    expected.sort();
    assert_eq!(got, expected, "each instance once");
    let deadline = Instant::now() + Duration::from_secs(5);
    source.shutdown(deadline).await;
    for s in &services {
        s.shutdown(deadline).await;
    }
    let mut all: Vec<&Connection> = connections.iter().collect();
    all.push(&source_conn);
    finish(&prefix, &all).await;
}

async fn an_invalid_prefix_is_a_config_error_before_any_connection() {
    let err =
        connect_with(&ConnectOptions::new("amqp://guest:guest@127.0.0.1:5672/%2f").prefix("a b/c"))
            .await
            .expect_err("invalid prefix");
    assert!(
        matches!(err, ConnectError::InvalidConfig { .. }),
        "got {err:?}"
    );
    assert!(err.to_string().contains("a b/c"), "{err}");
}

async fn an_unreachable_broker_is_unavailable_and_the_error_hides_the_password() {
    // Port 1 refuses connections: start gives up after the bridge's connect timeout.
    let err = purista::connect("AMQP://app:s3cret@127.0.0.1:1/%2f")
        .await
        .expect_err("nothing listens on port 1");
    match &err {
        ConnectError::Bridge(BridgeError::Unavailable(_)) => {}
        other => panic!("expected an unavailable bridge, got {other:?}"),
    }
    assert!(
        !err.to_string().contains("s3cret"),
        "password leaked: {err}"
    );
}

async fn amqps_urls_use_tls_without_a_crypto_provider_panic() {
    // The plain AMQP port does not speak TLS: the handshake fails, but building the TLS client
    // (where rustls panics when it cannot pick a crypto provider) must not.
    let plain = host_port(&broker_url());
    let err = purista::connect(&format!("amqps://guest:guest@{plain}/%2f"))
        .await
        .expect_err("no TLS on the plain port");
    assert!(
        matches!(err, ConnectError::Bridge(BridgeError::Unavailable(_))),
        "got {err:?}"
    );
    // A reported connect failure, not a bare timeout: the supervisor tried and lived on (a
    // panicking supervisor task would leave only "not connected to the broker").
    assert!(
        err.to_string().contains("connecting to amqps://"),
        "no TLS attempt reported: {err}"
    );
}
