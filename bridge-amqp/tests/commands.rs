//! Commands on RabbitMQ: round trips across instances, fail-fast 502, timeouts, expiry,
//! broker refusals and shutdown.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use purista_core::{
    Address, BridgeError, Envelope, EventBridge, MessageType, SenderAddress, StatusCode,
};
use serde_json::json;

use common::{Echo, eventually};

common::runner::test_main! {
    common::BROKER: [
        invoke_round_trips_across_two_instances,
        concurrent_invocations_never_cross_correlate,
        invoking_a_command_nobody_serves_fails_fast_with_502,
        a_command_whose_last_server_left_fails_fast_with_502,
        unregistering_one_of_two_servers_mid_stream_fails_no_invocation,
        a_timed_out_invocation_is_504_and_its_late_response_is_ignored,
        no_command_is_served_after_its_caller_gave_up,
        a_command_the_broker_refuses_fails_at_once_with_502,
        shutdown_rejects_pending_invocations_with_503_and_removes_the_reply_queue,
        emit_refuses_commands_and_stream_frames,
    ],
}

fn caller() -> SenderAddress {
    SenderAddress {
        service_name: "caller".into(),
        service_version: "1".into(),
        service_target: "run".into(),
        instance_id: String::new(),
    }
}

fn command(to: &Address, payload: serde_json::Value) -> Envelope {
    Envelope::command(caller(), to.clone(), payload, json!({}))
}

async fn invoke_round_trips_across_two_instances() {
    let broker = common::TestBroker::new("invoke_round_trip");
    let server = broker.bridge().await;
    let client = broker.bridge().await;
    let echo = Echo::new();
    let address = Address::new("echo", "1", "say");
    server
        .register_command(address.clone(), echo.clone())
        .await
        .unwrap();

    let mut cmd = command(&address, json!("hi"));
    cmd.principal_id = Some("user-1".into());
    cmd.tenant_id = Some("acme".into());
    let response = client
        .invoke(cmd.clone(), Duration::from_secs(5))
        .await
        .unwrap();

    assert_eq!(response.message_type, MessageType::CommandSuccessResponse);
    assert_eq!(response.payload, "hi");
    assert_eq!(response.correlation_id, cmd.correlation_id);
    assert_eq!(response.trace_id, cmd.trace_id);
    assert_eq!(response.principal_id.as_deref(), Some("user-1"));
    assert_eq!(response.tenant_id.as_deref(), Some("acme"));
    assert_eq!(response.sender.instance_id, server.instance_id());
    assert_eq!(
        response.receiver.and_then(|r| r.instance_id).as_deref(),
        Some(client.instance_id())
    );
    assert_eq!(echo.calls(), 1);
    broker.finish().await;
}

async fn concurrent_invocations_never_cross_correlate() {
    let broker = common::TestBroker::new("no_cross_correlation");
    let server = broker.bridge().await;
    let client = broker.bridge().await;
    let address = Address::new("echo", "1", "say");
    server
        .register_command(address.clone(), Echo::new())
        .await
        .unwrap();

    let calls = (0..300).map(|i| {
        let client = client.clone();
        let cmd = command(&address, json!(i));
        async move { (i, client.invoke(cmd, Duration::from_secs(10)).await) }
    });
    for (i, result) in futures::future::join_all(calls).await {
        assert_eq!(result.unwrap().payload, json!(i));
    }
    assert_eq!(client.in_flight().total, 0);
    broker.finish().await;
}

async fn invoking_a_command_nobody_serves_fails_fast_with_502() {
    let broker = common::TestBroker::new("no_handler_502");
    let client = broker.bridge().await;
    let address = Address::new("nobody", "1", "home");

    let started = Instant::now();
    let err = client
        .invoke(command(&address, json!(1)), Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, BridgeError::NoHandler(_)), "{err:?}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(client.in_flight().total, 0);
    broker.finish().await;
}

async fn a_command_whose_last_server_left_fails_fast_with_502() {
    let broker = common::TestBroker::new("last_server_left");
    let client = broker.bridge().await;
    let address = Address::new("echo", "1", "say");
    // Leaving on purpose, either way: the last server deletes the command queue on its way out.
    for shutdown in [false, true] {
        let server = broker.bridge().await;
        let other = broker.bridge().await;
        for s in [&server, &other] {
            s.register_command(address.clone(), Echo::new())
                .await
                .unwrap();
        }
        client
            .invoke(command(&address, json!(1)), Duration::from_secs(5))
            .await
            .unwrap();
        // One of two leaving: the other still serves.
        other.unregister_command(&address).await.unwrap();
        client
            .invoke(command(&address, json!(2)), Duration::from_secs(5))
            .await
            .expect("still served by the remaining instance");

        if shutdown {
            server
                .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
                .await;
        } else {
            server.unregister_command(&address).await.unwrap();
        }
        let started = Instant::now();
        let result = client
            .invoke(command(&address, json!(3)), Duration::from_secs(5))
            .await;
        assert!(
            matches!(result, Err(BridgeError::NoHandler(_))),
            "the first invocation after the last server left (shutdown: {shutdown}): {result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "502 at once");
    }
    broker.finish().await;
}

async fn unregistering_one_of_two_servers_mid_stream_fails_no_invocation() {
    let broker = common::TestBroker::new("unregister_mid_stream");
    let (a, b) = (broker.bridge().await, broker.bridge().await);
    let client = broker.bridge().await;
    let address = Address::new("echo", "1", "say");
    let (echo_a, echo_b) = (Echo::new(), Echo::new());
    a.register_command(address.clone(), echo_a.clone())
        .await
        .unwrap();
    b.register_command(address.clone(), echo_b.clone())
        .await
        .unwrap();

    let calls: Vec<_> = (0..1000)
        .map(|i| {
            let client = client.clone();
            let cmd = command(&address, json!(i));
            tokio::spawn(async move { client.invoke(cmd, Duration::from_secs(20)).await })
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || echo_a.calls() >= 100).await);
    a.unregister_command(&address).await.unwrap();
    for (i, call) in calls.into_iter().enumerate() {
        let response = call.await.unwrap();
        assert_eq!(response.map(|r| r.payload), Ok(json!(i)));
    }
    assert_eq!(
        echo_a.calls() + echo_b.calls(),
        1000,
        "each command served once"
    );
    broker.finish().await;
}

async fn a_timed_out_invocation_is_504_and_its_late_response_is_ignored() {
    let broker = common::TestBroker::new("timeout_504");
    let server = broker.bridge().await;
    let client = broker.bridge().await;
    let echo = Echo::slow(Duration::from_millis(1200));
    let address = Address::new("slow", "1", "work");
    server
        .register_command(address.clone(), echo.clone())
        .await
        .unwrap();

    let started = Instant::now();
    let err = client
        .invoke(command(&address, json!(1)), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err, BridgeError::Timeout(300));
    assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(client.in_flight().total, 0, "no pending entry left behind");

    assert!(
        eventually(Duration::from_secs(5), || client.unmatched_responses() == 1).await,
        "the late response arrives and is ignored"
    );
    assert_eq!(echo.calls(), 1);
    broker.finish().await;
}

async fn no_command_is_served_after_its_caller_gave_up() {
    let broker = common::TestBroker::new("expired_not_served");
    // One command at a time: the second waits in the queue while the first is served.
    let server = broker.bridge_with(|c| c.command_prefetch = 1).await;
    let client = broker.bridge().await;
    let echo = Echo::slow(Duration::from_millis(1000));
    let address = Address::new("slow", "1", "work");
    server
        .register_command(address.clone(), echo.clone())
        .await
        .unwrap();

    let first = {
        let client = client.clone();
        let cmd = command(&address, json!("first"));
        tokio::spawn(async move { client.invoke(cmd, Duration::from_secs(5)).await })
    };
    assert!(eventually(Duration::from_secs(2), || echo.calls() == 1).await);
    let second = client
        .invoke(
            command(&address, json!("second")),
            Duration::from_millis(300),
        )
        .await;
    assert_eq!(second.unwrap_err(), BridgeError::Timeout(300));
    assert_eq!(first.await.unwrap().unwrap().payload, "first");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(echo.calls(), 1, "the expired command was never served");
    broker.finish().await;
}

async fn a_command_the_broker_refuses_fails_at_once_with_502() {
    let broker = common::TestBroker::new("nack_502");
    let client = broker.bridge().await;
    // A queue that refuses every message: commands routed to it are nacked by the broker.
    let conn = broker.raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let refusing = format!("{}.refusing", broker.prefix);
    broker.track_queue(&refusing);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        refusing.as_str().into(),
        QueueDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    let mut binding = FieldTable::default();
    binding.insert("x-match".into(), AMQPValue::LongString("all".into()));
    binding.insert(
        "messageType".into(),
        AMQPValue::LongString("command".into()),
    );
    ch.queue_bind(
        refusing.as_str().into(),
        client.topology().exchange().into(),
        "".into(),
        QueueBindOptions::default(),
        binding,
    )
    .await
    .unwrap();

    let started = Instant::now();
    let err = client
        .invoke(
            command(&Address::new("any", "1", "thing"), json!(1)),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, BridgeError::Refused(_)), "{err:?}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let _ = conn.close(200, "OK".into()).await;
    broker.finish().await;
}

async fn shutdown_rejects_pending_invocations_with_503_and_removes_the_reply_queue() {
    let broker = common::TestBroker::new("shutdown_503");
    let server = broker.bridge().await;
    let client = broker.bridge().await;
    let address = Address::new("slow", "1", "work");
    server
        .register_command(address.clone(), Echo::slow(Duration::from_secs(3)))
        .await
        .unwrap();

    let pending = {
        let client = client.clone();
        let cmd = command(&address, json!(1));
        tokio::spawn(async move { client.invoke(cmd, Duration::from_secs(10)).await })
    };
    assert!(eventually(Duration::from_secs(2), || client.in_flight().total == 1).await);
    let report = client
        .shutdown(tokio::time::Instant::now() + Duration::from_millis(200))
        .await;
    assert_eq!(report.rejected_invocations, 1);
    assert!(!report.completed);
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE, "{err:?}");
    assert!(!client.health().await.is_healthy());
    assert_eq!(
        client
            .invoke(command(&address, json!(2)), Duration::from_secs(1))
            .await
            .unwrap_err()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    let conn = broker.raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let reply_queue = client.topology().reply_queue();
    assert!(
        ch.queue_declare(reply_queue.into(), passive, FieldTable::default())
            .await
            .is_err(),
        "reply queue {reply_queue} is gone"
    );
    let _ = conn.close(200, "OK".into()).await;
    broker.finish().await;
}

async fn emit_refuses_commands_and_stream_frames() {
    let broker = common::TestBroker::new("emit_refuses");
    let bridge = broker.bridge().await;
    let cmd = command(&Address::new("a", "1", "b"), json!(1));
    assert!(matches!(
        bridge.emit(cmd).await,
        Err(BridgeError::InvalidRequest(_))
    ));
    let mut frame = Envelope::new(MessageType::Stream, caller());
    frame.correlation_id = Some("c".into());
    assert!(matches!(
        bridge.emit(frame).await,
        Err(BridgeError::InvalidRequest(_))
    ));
    // Streams are declared, yet their frames travel in sessions (open_stream), never by emit.
    let streams: Arc<dyn EventBridge> = bridge.clone();
    assert!(streams.capabilities().streams);
    broker.finish().await;
}
