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
