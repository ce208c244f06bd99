//! Connection loss: the broker closes the bridge's connection; in-flight invocations fail with
//! 503, health is an error while disconnected, and the bridge reconnects, re-declares its
//! topology and consumers, and delivers again — without losing durable messages.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use purista_bridge_amqp::TopologyMode;
use purista_core::{Address, Envelope, EventBridge, SenderAddress, StatusCode, SubscriptionFilter};
use serde_json::json;

use common::{Echo, Recorder, close_connection_of, eventually, spec};

common::runner::test_main! {
    common::BROKER_AND_RABBITMQCTL: [
        the_bridge_reconnects_after_the_broker_closes_its_connection,
        right_after_a_reconnect_an_unrouted_command_waits_for_its_server,
        a_command_sent_while_its_server_reconnects_is_served_after_it,
        in_the_purista_mode_a_command_whose_server_reconnects_waits_for_it,
    ],
}

fn sold(n: usize) -> Envelope {
    let sender = SenderAddress {
        service_name: "shop".into(),
        service_version: "1".into(),
        service_target: "sell".into(),
        instance_id: String::new(),
    };
    Envelope::custom(sender, "sold", json!({ "n": n }))
}

async fn the_bridge_reconnects_after_the_broker_closes_its_connection() {
    let broker = common::TestBroker::new("reconnect");
    let server = broker.bridge().await;
    let client = broker.bridge().await;
    let slow = Address::new("slow", "1", "work");
    let echo = Address::new("echo", "1", "say");
    server
        .register_command(slow.clone(), Echo::slow(Duration::from_secs(2)))
        .await
        .unwrap();
    server
        .register_command(echo.clone(), Echo::new())
        .await
        .unwrap();
    let mut spec = spec("onSold", SubscriptionFilter::new().event_name("sold"));
    spec.durable = true;
    let recorder = Recorder::acking(&spec);
    client
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();

    let saw_unhealthy = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, flag) = (client.clone(), saw_unhealthy.clone());
        tokio::spawn(async move {
            loop {
                if !client.health().await.is_healthy() {
                    flag.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let pending = {
        let client = client.clone();
        let cmd = Envelope::command(SenderAddress::default(), slow.clone(), json!(1), json!({}));
        tokio::spawn(async move { client.invoke(cmd, Duration::from_secs(10)).await })
    };
    assert!(eventually(Duration::from_secs(2), || client.in_flight().total == 1).await);

    close_connection_of(&client).expect("connection closed by the broker");
    // rabbitmqctl itself takes a second or two; the clock starts once the broker closed it.
    let closed_at = Instant::now();
    // Published while the subscriber is (or is about to be) disconnected: durable, so kept.
    for n in 0..5 {
        server.emit(sold(n)).await.unwrap();
    }
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE, "{err:?}");
    assert!(
        closed_at.elapsed() < Duration::from_secs(2),
        "failed at once (503), not at the 10 s ttl (504)"
    );

    assert!(
        eventually(Duration::from_secs(10), || client.reconnects() >= 1
            && client.is_connected())
        .await,
        "reconnected"
    );
    watcher.abort();
    assert!(
        saw_unhealthy.load(Ordering::SeqCst),
        "health was an error while disconnected"
    );
    assert!(client.health().await.is_healthy());

    // Consumers and the reply queue are back.
    assert!(eventually(Duration::from_secs(5), || recorder.count() >= 5).await);
    server.emit(sold(5)).await.unwrap();
    assert!(eventually(Duration::from_secs(5), || recorder.count() >= 6).await);
    let ns: std::collections::BTreeSet<u64> = recorder
        .seen()
        .iter()
        .map(|s| s.envelope.payload["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (0..=5).collect(), "nothing lost");
    let cmd = Envelope::command(
        SenderAddress::default(),
        echo.clone(),
        json!("again"),
        json!({}),
    );
    assert_eq!(
        client
            .invoke(cmd, Duration::from_secs(5))
            .await
            .unwrap()
            .payload,
        "again"
    );
    broker.finish().await;
}

/// Right after a reconnect a command without a route is tried again (within its ttl) rather
/// than failed with 502: the serving instance may still be re-creating its queue. Once the
/// grace is over, an unserved command fails with 502 at once again.
async fn right_after_a_reconnect_an_unrouted_command_waits_for_its_server() {
    let broker = common::TestBroker::new("reconnect_grace");
    const GRACE: Duration = Duration::from_secs(3);
    let client = broker.bridge_with(|c| c.reconnect_grace = GRACE).await;
    let server = broker.bridge().await;
    let echo = Address::new("late", "1", "echo");
    let invoke = |n: u64| {
        let client = client.clone();
        let cmd = Envelope::command(SenderAddress::default(), echo.clone(), json!(n), json!({}));
        async move { client.invoke(cmd, Duration::from_secs(5)).await }
    };

    // Before any reconnect: nobody serves `late.echo`, so 502 at once.
    let began = Instant::now();
    let err = invoke(1).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err:?}");
    assert!(began.elapsed() < Duration::from_secs(1), "failed fast");

    close_connection_of(&client).expect("connection closed by the broker");
    assert!(
        eventually(Duration::from_secs(10), || client.reconnects() >= 1
            && client.is_connected())
        .await,
        "reconnected"
    );
    let reconnected_at = tokio::time::Instant::now();
    // Inside the grace: the invocation waits, and the server that registers a moment later
    // (as a reconnecting server re-creates its queue) answers it.
    let pending = tokio::spawn(invoke(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "an unrouted command inside the grace is not failed"
    );
    server
        .register_command(echo.clone(), Echo::new())
        .await
        .unwrap();
    let answer = pending
        .await
        .unwrap()
        .expect("answered once the server is back");
    assert_eq!(answer.payload, json!(2));

    // After the grace: unserved is 502 at once again.
    server.unregister_command(&echo).await.unwrap();
    // The grace is a span of time: wait it out (with a margin for the restore that stamps it).
    tokio::time::sleep_until(reconnected_at + GRACE + Duration::from_millis(500)).await;
    let began = Instant::now();
    let err = invoke(3).await.unwrap_err();
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err:?}");
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "failed fast after the grace"
    );
    broker.finish().await;
}

/// A server that loses its connection (a network fault, not a goodbye) keeps its command
/// queue: a command sent meanwhile waits there and is served once the server is back, instead
/// of failing with 502.
async fn a_command_sent_while_its_server_reconnects_is_served_after_it() {
    let broker = common::TestBroker::new("server_reconnects");
    // The server waits a second before reconnecting: the command surely comes while it is away.
    let server = broker
        .bridge_with(|c| c.reconnect_initial_delay = Duration::from_secs(1))
        .await;
    let client = broker.bridge().await;
    let echo = Address::new("echo", "1", "back");
    server
        .register_command(echo.clone(), Echo::new())
        .await
        .unwrap();

    close_connection_of(&server).expect("server connection closed by the broker");
    assert!(
        eventually(Duration::from_secs(5), || !server.is_connected()).await,
        "the server noticed the loss"
    );
    let cmd = Envelope::command(
        SenderAddress::default(),
        echo.clone(),
        json!("hi"),
        json!({}),
    );
    assert_eq!(
        server.reconnects(),
        0,
        "still away when the command is sent"
    );
    let answer = client
        .invoke(cmd, Duration::from_secs(10))
        .await
        .expect("served once its server is back");
    assert_eq!(answer.payload, json!("hi"));
    assert!(server.reconnects() >= 1);
    assert_eq!(client.reconnects(), 0, "the client kept its connection");
    broker.finish().await;
}

/// In the PURISTA topology a command queue is auto-delete and goes with its server's
/// connection. A caller whose own connection survived, and which reached the command a moment
/// ago, publishes again until the server is back instead of failing with 502; a command it
/// never reached still fails with 502 at once.
async fn in_the_purista_mode_a_command_whose_server_reconnects_waits_for_it() {
    let broker = common::TestBroker::new("purista_server_reconnects");
    let purista = |c: &mut purista_bridge_amqp::AmqpConfig| {
        c.topology = TopologyMode::Purista;
        c.reconnect_initial_delay = Duration::from_secs(1);
    };
    let server = broker.bridge_with(purista).await;
    let client = broker.bridge_with(purista).await;
    let echo = Address::new("echo", "1", "purista");
    server
        .register_command(echo.clone(), Echo::new())
        .await
        .unwrap();
    let cmd = |payload: &str| {
        Envelope::command(
            SenderAddress::default(),
            echo.clone(),
            json!(payload),
            json!({}),
        )
    };
    let answer = client
        .invoke(cmd("before"), Duration::from_secs(5))
        .await
        .expect("served before the fault");
    assert_eq!(answer.payload, json!("before"));

    close_connection_of(&server).expect("server connection closed by the broker");
    assert!(
        eventually(Duration::from_secs(5), || !server.is_connected()).await,
        "the server noticed the loss"
    );
    assert_eq!(
        server.reconnects(),
        0,
        "still away when the command is sent"
    );
    let answer = client
        .invoke(cmd("during"), Duration::from_secs(10))
        .await
        .expect("served once its server is back, not 502 while its queue is gone");
    assert_eq!(answer.payload, json!("during"));
    assert!(server.reconnects() >= 1);
    assert_eq!(client.reconnects(), 0, "the client kept its connection");

    let never = Envelope::command(
        SenderAddress::default(),
        Address::new("echo", "1", "never-served"),
        json!("x"),
        json!({}),
    );
    let started = Instant::now();
    let err = client
        .invoke(never, Duration::from_secs(10))
        .await
        .expect_err("nobody serves it");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a command never reached fails with 502 at once, not after {:?}",
        started.elapsed()
    );
    broker.finish().await;
}
