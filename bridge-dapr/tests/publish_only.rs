//! An app configured with `events=off` publishes and serves commands, but the sidecar delivers
//! it no events, and a service with a subscription is refused on it at start.

mod common;

use std::sync::Arc;
use std::time::Duration;

use purista_core::{
    Envelope, EventBridge, SenderAddress, Service, StartError, SubscriptionContext, SubscriptionDef,
};
use serde_json::json;

const EVENTS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_only_app_gets_no_deliveries_and_refuses_subscriptions() {
    let double = common::double();
    let (publisher, _publisher_sidecar) =
        common::bridge_with(&double, "po-publisher", "pubonly", |_, config| {
            config.receive_events = false;
        })
        .await;
    let (subscriber, _subscriber_sidecar) =
        common::bridge(&double, "po-subscriber", "pubonly").await;
    let recorder = Arc::new(common::Recorder::default());
    common::subscribe(
        &subscriber,
        common::spec("svc", "onTick", "tick", false),
        recorder.clone(),
    )
    .await;

    for n in 0..EVENTS {
        publisher
            .emit(Envelope::custom(
                SenderAddress::default(),
                "tick",
                json!({ "n": n }),
            ))
            .await
            .expect("a publish-only app publishes");
    }
    let mut seen = recorder
        .wait_for(EVENTS as usize, Duration::from_secs(20))
        .await;
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..EVENTS).collect::<Vec<_>>(),
        "the subscriber's events"
    );

    // Once neither consumer group holds an unanswered delivery, every delivery the double made
    // has been answered: a subscribed publisher would have answered one per event as well.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while double.unacknowledged("po-subscriber") + double.unacknowledged("po-publisher") > 0
        || double.delivered() < EVENTS
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries still unanswered after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        double.delivered(),
        EVENTS,
        "the sidecar delivered events to the publish-only app"
    );

    let caps = publisher.capabilities();
    assert!(!caps.shared_subscriptions && !caps.broadcast_subscriptions);
    let err = publisher
        .register_subscription(common::spec("svc", "late", "tick", true), recorder)
        .await
        .expect_err("a subscription on a publish-only app");
    assert!(err.to_string().contains("events=off"), "{err}");

    let service = Service::builder("listener", "1")
        .subscription(
            SubscriptionDef::new(
                "onTick",
                |_ctx: SubscriptionContext, _: serde_json::Value| async { Ok(()) },
            )
            .event_name("tick")
            .broadcast(),
        )
        .build();
    let bridge: Arc<dyn EventBridge> = publisher.clone();
    match service.start(bridge).await {
        Err(StartError::StrictCheck(unmet)) => {
            let text = unmet.to_string();
            assert!(text.contains("onTick"), "{text}");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a service with a subscription started on a publish-only app"),
    }
}
