//! The sidecar goes away and comes back: health turns error and back, calls fail with 503
//! within their bounds while it is away, and deliveries flow again once it is back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use purista_core::{Address, BridgeError, Envelope, EventBridge, SenderAddress, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restart_turns_health_error_and_back_and_calls_fail_with_503_meanwhile() {
    let double = common::double();
    let (bridge, sidecar) = common::bridge_with(&double, "faults", "faults", |_, config| {
        config.call_timeout = Duration::from_secs(2);
    })
    .await;
    let recorder = Arc::new(common::Recorder::default());
    common::subscribe(
        &bridge,
        common::spec("svc", "sub", "tick", false),
        recorder.clone(),
    )
    .await;
    assert!(bridge.health().await.is_healthy());

    let sidecar = Arc::new(sidecar);
    {
        let sidecar = sidecar.clone();
        tokio::task::spawn_blocking(move || sidecar.stop())
            .await
            .unwrap();
    }
    assert!(
        !bridge.health().await.is_healthy(),
        "health is an error while the sidecar is away"
    );
    let started = Instant::now();
    let err = bridge
        .emit(Envelope::custom(
            SenderAddress::default(),
            "tick",
            json!({ "n": 0 }),
        ))
        .await
        .expect_err("no sidecar, no publish");
    assert!(matches!(err, BridgeError::Unavailable(_)), "{err}");
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    let command = Envelope::command(
        SenderAddress::default(),
        Address::new("nobody", "1", "x"),
        json!(null),
        json!(null),
    );
    let err = bridge
        .invoke(command, Duration::from_secs(1))
        .await
        .expect_err("no sidecar, no invocation");
    assert!(
        matches!(err, BridgeError::Unavailable(_) | BridgeError::Timeout(_)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls are bounded"
    );

    {
        let sidecar = sidecar.clone();
        tokio::task::spawn_blocking(move || sidecar.start_again())
            .await
            .unwrap()
            .expect("the sidecar serves again");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(bridge.health().await.is_healthy() && sidecar.subscribed()) {
        assert!(Instant::now() < deadline, "health did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bridge
        .emit(Envelope::custom(
            SenderAddress::default(),
            "tick",
            json!({ "n": 1 }),
        ))
        .await
        .expect("publishing works again");
    assert_eq!(recorder.wait_for(1, Duration::from_secs(10)).await, vec![1]);
}

/// The app server restarts mid-run (the bridge shuts down with its handlers cut off, a new one
/// takes its port and registers the subscription after it started, as a service does): every
/// event the sidecar accepted is handled, none lost; duplicates are allowed (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_server_restart_loses_no_accepted_event() {
    const EVENTS: u64 = 200;
    let double = purista_bridge_dapr::double::DaprDouble::start(
        purista_bridge_dapr::double::DoubleOptions {
            // Long enough for the restart: the sidecar retries what the app did not answer.
            resiliency: purista_bridge_dapr::double::Resiliency {
                max_retries: 500,
                interval: Duration::from_millis(20),
            },
            ..Default::default()
        },
    )
    .expect("the double starts");
    let slow = Arc::new(common::Recorder::default());
    let spec = || common::spec("svc", "sub", "restart", true);
    let (first, sidecar) =
        common::bridge_with(&double, "restart-app", "restart", |options, config| {
            options.concurrency = 4;
            config.consumer = Some("restart-app".into());
        })
        .await;
    common::subscribe(&first, spec(), slow.clone()).await;
    let port = first.app_port();
    let (publisher, _publisher_sidecar) = common::bridge(&double, "restart-pub", "restart").await;
    let publishing = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            for n in 0..EVENTS {
                let event =
                    Envelope::custom(SenderAddress::default(), "restart", json!({ "n": n }));
                publisher
                    .emit(event)
                    .await
                    .expect("the sidecar accepts the event");
            }
        })
    };
    slow.wait_for(20, Duration::from_secs(10)).await;
    first.shutdown(tokio::time::Instant::now()).await;
    drop(first);
    let second = {
        let mut config = purista_bridge_dapr::DaprConfig::new(sidecar.address(), "restart-app")
            .with_prefix("restart");
        config.app_port = port;
        config.consumer = Some("restart-app".into());
        config.connect_timeout = Duration::from_secs(10);
        let mut tries = 0;
        loop {
            match purista_bridge_dapr::DaprBridge::new(config.clone()) {
                Ok(bridge) => break Arc::new(bridge),
                // The old server lets its last requests finish before the port is free.
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("the restarted app cannot take its port: {e}"),
            }
        }
    };
    sidecar.connect_app(second.app_port());
    second.start().await.expect("the restarted app starts");
    let after = Arc::new(common::Recorder::default());
    common::subscribe(&second, spec(), after.clone()).await;
    publishing.await.expect("the publisher task");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut seen: Vec<u64> = slow.seen.lock().clone();
        seen.extend(after.seen.lock().iter());
        seen.sort_unstable();
        seen.dedup();
        if seen.len() as u64 == EVENTS {
            assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events accepted by the sidecar were lost across the app restart: {} of {EVENTS} handled, missing e.g. {:?}",
            seen.len(),
            (0..EVENTS)
                .filter(|n| !seen.contains(n))
                .take(10)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
