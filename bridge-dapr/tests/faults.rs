//! The sidecar goes away and comes back: health turns error and back, calls fail with 503
//! within their bounds while it is away, deliveries flow again once it is back and nothing the
//! sidecars accepted is lost; the app server restarts and nothing accepted is lost either.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use purista_core::{
    Address, BridgeError, CommandHandler, Envelope, EventBridge, MessageType, SenderAddress,
    StatusCode,
};
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

/// Answers a command with its payload.
struct Echo;

#[async_trait::async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

fn echo_command(n: u64) -> Envelope {
    Envelope::command(
        SenderAddress::default(),
        Address::new("svc", "1", "echo"),
        json!(n),
        json!({}),
    )
}

fn event(n: u64) -> Envelope {
    Envelope::custom(SenderAddress::default(), "restart", json!({ "n": n }))
}

/// Polls `check` until it holds, at most `within` (Dapr has no notification for either).
async fn eventually(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The app's sidecar goes away mid-run (deliveries in flight, its queue full, another app
/// still publishing) and comes back on the same address, as a daprd restart on a durable
/// pub/sub component does: health is an error while it is away and ok after; invocations
/// and publishes through it fail at once with 503 (504 at most at their ttl); and every event
/// the sidecars accepted reaches the at-least-once subscription once it is back, those
/// published while it was away included. Duplicates are allowed, counted and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restart_mid_run_loses_no_accepted_event_and_calls_fail_within_their_ttl() {
    // Published by another app, across the outage; the sidecar stops after STOP_AT of them.
    const PUBLISHED: u64 = 400;
    const STOP_AT: u64 = 150;
    // Published by the app itself once its sidecar is back.
    const AFTER: u64 = 50;
    const APP: &str = "sidecar-restart-app";
    let began = Instant::now();
    let double = common::double();
    let (app, sidecar) = common::bridge_with(&double, APP, "sidecar-restart", |options, config| {
        options.concurrency = 4;
        config.consumer = Some(APP.into());
        config.call_timeout = Duration::from_secs(2);
    })
    .await;
    let sidecar = Arc::new(sidecar);
    app.register_command(Address::new("svc", "1", "echo"), Arc::new(Echo))
        .await
        .expect("the command registers");
    let recorder = Arc::new(common::Recorder::default());
    let mut spec = common::spec("svc", "sub", "restart", true);
    // Only the events: no copy of a command travels on the topic.
    spec.filter.message_type = Some(MessageType::CustomMessage);
    common::subscribe(&app, spec, recorder.clone()).await;
    let ttl = Duration::from_secs(1);
    let answer = app.invoke(echo_command(1), ttl).await.expect("the echo");
    assert_eq!(answer.payload, json!(1));

    let (publisher, _publisher_sidecar) =
        common::bridge(&double, "sidecar-restart-pub", "sidecar-restart").await;
    let (progress, mut published) = tokio::sync::watch::channel(0u64);
    let publishing = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            for n in 0..PUBLISHED {
                publisher
                    .emit(event(n))
                    .await
                    .expect("the publisher's sidecar accepts every event");
                progress.send_replace(n + 1);
            }
        })
    };
    published
        .wait_for(|n| *n >= STOP_AT)
        .await
        .expect("the publisher publishes");
    {
        let sidecar = sidecar.clone();
        tokio::task::spawn_blocking(move || sidecar.stop())
            .await
            .expect("the sidecar stops");
    }
    let handled_at_stop = recorder.seen.lock().len();
    let published_at_stop = *published.borrow();
    assert!(
        (handled_at_stop as u64) < published_at_stop,
        "the app had handled everything published ({published_at_stop}) when its sidecar went \
         away: the test proves nothing"
    );
    eventually("health turns error", Duration::from_secs(5), async || {
        !app.health().await.is_healthy()
    })
    .await;

    for n in 0..3 {
        let started = Instant::now();
        let err = app
            .invoke(echo_command(n), ttl)
            .await
            .expect_err("no invocation while the sidecar is away");
        assert!(
            matches!(
                err.status(),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
            ),
            "an invocation during the outage: {err}"
        );
        assert!(
            started.elapsed() <= ttl + Duration::from_millis(250),
            "an invocation during the outage took {:?}, its ttl is {ttl:?}",
            started.elapsed()
        );
    }
    for n in 0..3 {
        let started = Instant::now();
        let err = app
            .emit(event(10_000 + n))
            .await
            .expect_err("no publish while the sidecar is away");
        assert!(matches!(err, BridgeError::Unavailable(_)), "{err}");
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            started.elapsed() <= app.config().call_timeout,
            "a publish during the outage took {:?}",
            started.elapsed()
        );
    }
    publishing.await.expect("the publisher task");
    let kept = double.unacknowledged(APP);

    {
        let sidecar = sidecar.clone();
        tokio::task::spawn_blocking(move || sidecar.start_again())
            .await
            .expect("the sidecar task")
            .expect("the sidecar serves again on its address");
    }
    eventually("health turns ok", Duration::from_secs(10), async || {
        app.health().await.is_healthy()
    })
    .await;
    let answer = app
        .invoke(echo_command(2), Duration::from_secs(5))
        .await
        .expect("the echo once the sidecar is back");
    assert_eq!(answer.payload, json!(2));
    for n in PUBLISHED..PUBLISHED + AFTER {
        app.emit(event(n))
            .await
            .expect("the sidecar accepts events again");
    }

    let total = PUBLISHED + AFTER;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (seen, distinct) = loop {
        let seen = recorder.seen.lock().clone();
        let mut distinct = seen.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() as u64 >= total {
            break (seen, distinct);
        }
        assert!(
            Instant::now() < deadline,
            "accepted events were lost across the sidecar's restart: {} of {total} handled, \
             missing e.g. {:?}",
            distinct.len(),
            (0..total)
                .filter(|n| distinct.binary_search(n).is_err())
                .take(10)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        distinct,
        (0..total).collect::<Vec<_>>(),
        "what the app handled is what was accepted (none of the refused publishes)"
    );
    assert_eq!(
        double.accepted(&app.config().pubsub, app.topic()),
        total,
        "the sidecars accepted exactly the events whose publishers heard so"
    );
    eventually(
        "the broker has nothing left for the app",
        Duration::from_secs(5),
        async || double.unacknowledged(APP) == 0,
    )
    .await;
    println!(
        "{total} events accepted, all handled; {} duplicates ({:.1} %); at the stop the app had \
         handled {handled_at_stop} of {published_at_stop} published; {kept} waited for it \
         while its sidecar was away; {:?} in all",
        seen.len() - distinct.len(),
        100.0 * (seen.len() - distinct.len()) as f64 / total as f64,
        began.elapsed()
    );
}
