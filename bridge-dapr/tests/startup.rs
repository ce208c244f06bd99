//! A started bridge receives what is published right after its start returns.

mod common;

use std::sync::Arc;
use std::time::Duration;

use purista_bridge_dapr::double::{DaprDouble, DoubleOptions, SidecarOptions};
use purista_core::{Envelope, SenderAddress};

/// daprd reads `/dapr/subscribe` and only then subscribes to the broker: a message published
/// in between does not reach the app. The bridge's start waits until the sidecar lists the
/// subscription, so the first event published after it returns arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_event_after_start_arrives_although_the_sidecar_subscribes_late() {
    let double = DaprDouble::start(DoubleOptions {
        subscribe_delay: Duration::from_millis(300),
        ..DoubleOptions::default()
    })
    .expect("the double starts");
    let recorder = Arc::new(common::Recorder::default());
    let (consumer, _sidecar) = common::bridge(&double, "late-sub-0", "latesub").await;
    // Published through a sidecar of its own without an app, at once: no start of another
    // bridge in between gives the consumer's sidecar time to catch up.
    let raw = double
        .sidecar(SidecarOptions {
            app_id: "late-sub-raw".into(),
            ..SidecarOptions::default()
        })
        .expect("a sidecar starts");
    let client =
        purista_bridge_dapr::sidecar::Sidecar::new(&raw.address(), None).expect("a sidecar client");
    common::subscribe(
        &consumer,
        common::spec("svc", "sub", "first", false),
        recorder.clone(),
    )
    .await;
    let event = Envelope::custom(
        SenderAddress::default(),
        "first",
        serde_json::json!({ "n": 1 }),
    );
    let bytes = purista_bridge_dapr::cloudevent::wrap(&event, &event.encode(), "raw")
        .expect("a CloudEvent");
    client
        .publish("pubsub", "latesub.messages", bytes, Duration::from_secs(5))
        .await
        .expect("the publish is accepted");
    let seen = recorder.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(
        seen,
        vec![1],
        "the event published right after start was lost"
    );
}
