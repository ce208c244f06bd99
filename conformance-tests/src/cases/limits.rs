//! Declared limits (DESIGN §3.7, §4): a message just under a limit the bridge declares goes
//! through intact; one byte over is refused at the caller with a typed 400
//! ([`BridgeError::TooLarge`]), before anything reaches the broker.
//!
//! "Just under" is found, not guessed: the envelope around a payload (ids, sender, metadata)
//! differs per bridge, so a binary search finds the largest message the bridge accepts. The
//! case then proves that this message arrives intact and is near the declared limit (the
//! bridge does not refuse far below what it declares), and that one byte more is refused.

use std::sync::Arc;

use purista_core::{
    BridgeError, Envelope, MessagePart, Service, StatusCode, SubscriptionFilter, kit,
};
use serde_json::json;

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{ARRIVAL, Collector, recording};

/// How far below its declared limit a bridge may start refusing (envelope fields a case does
/// not control, measured differently per bridge).
const SLACK_BYTES: usize = 4_096;

/// The part a refusal names, or a failure naming what came instead.
fn refused_part(result: Result<(), BridgeError>, what: &str) -> Option<MessagePart> {
    match result {
        Ok(()) => None,
        Err(BridgeError::TooLarge { part, .. }) => Some(part),
        Err(other) => panic!(
            "{what} was refused with {other} ({}), not a typed TooLarge 400",
            other.status()
        ),
    }
}

/// The largest `n` in `0..=most` for which `accepts(n)` holds (it holds for 0 and fails for
/// `most + 1`, which the caller checks).
async fn largest_accepted<F, Fut>(most: usize, mut accepts: F) -> usize
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut low, mut high) = (0usize, most);
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        if accepts(mid).await {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    low
}

/// The largest event body the bridge accepts arrives intact and is within a few KiB of the
/// declared `max_payload_bytes`; one byte more is refused with a typed 400 at the caller (for
/// an emit and, where commands are declared, an invocation).
pub async fn a_body_at_the_declared_limit_arrives_and_one_byte_more_is_400(h: Arc<dyn Harness>) {
    let limit = h
        .capabilities()
        .limits
        .max_payload_bytes
        .expect("planned only for a declared body limit");
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("big");
    let seen: Arc<Collector<Envelope>> = Collector::new();
    let commands = h.capabilities().commands;
    let mut consumer = Service::builder(env.name("consumer"), "1")
        .subscription(recording("big", seen.clone()).event_name(&event));
    if commands {
        consumer = consumer.command(purista_core::CommandDef::new(
            "big",
            |_ctx: purista_core::Context, _v: serde_json::Value, _p: purista_core::Empty| async move {
                Ok(())
            },
        ));
    }
    env.start(1, consumer).await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    let fill = |n: usize| json!({ "fill": "x".repeat(n) });
    let largest = largest_accepted(limit, |n| {
        let (publisher, event) = (publisher.clone(), event.clone());
        async move {
            let sent = publisher.emit(&event, fill(n)).await;
            refused_part(sent, &format!("a body with {n} bytes of payload")).is_none()
        }
    })
    .await;
    let over = publisher.emit(&event, fill(largest + 1)).await;
    assert_eq!(
        refused_part(over, "one byte over the largest accepted body"),
        Some(MessagePart::Body),
        "one byte more than the largest accepted body was not refused as too large a body"
    );
    let got = seen
        .wait_until(ARRIVAL, |e| {
            e.iter()
                .any(|e| e.payload["fill"].as_str().map(str::len) == Some(largest))
        })
        .await
        .unwrap_or_else(|_| {
            panic!("the largest accepted body ({largest} bytes of payload) never arrived")
        });
    let arrived = got
        .iter()
        .find(|e| e.payload["fill"].as_str().map(str::len) == Some(largest))
        .expect("found above");
    assert_eq!(
        arrived.payload,
        fill(largest),
        "the largest accepted body arrived changed"
    );
    let size = kit::encoded_len(arrived).expect("a received envelope encodes");
    assert!(
        size <= limit,
        "an envelope of {size} bytes went through a bridge that declares a body limit of {limit}"
    );
    assert!(
        size + SLACK_BYTES >= limit,
        "the bridge refuses bodies of {} bytes although it declares a limit of {limit}",
        size + 1
    );
    if commands {
        let err = publisher
            .invoke_with::<serde_json::Value>(
                purista_core::Address::new(env.name("consumer"), "1", "big"),
                fill(limit),
                purista_core::Empty,
                purista_core::InvokeOptions::ttl(ARRIVAL),
            )
            .await
            .expect_err("an invocation over the body limit cannot succeed");
        assert_eq!(
            err.status,
            StatusCode::BAD_REQUEST,
            "an invocation over the body limit failed with {err}, not 400"
        );
    }
    env.finish().await;
}

/// The largest metadata the bridge accepts (a long tenant id: it travels beside the body where
/// brokers route on it) arrives intact and is within a few KiB of the declared
/// `max_metadata_bytes`; one byte more is refused with a typed 400 at the caller.
pub async fn metadata_at_the_declared_limit_arrives_and_one_byte_more_is_400(h: Arc<dyn Harness>) {
    let limit = h
        .capabilities()
        .limits
        .max_metadata_bytes
        .expect("planned only for a declared metadata limit");
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("tagged");
    let seen: Arc<Collector<Envelope>> = Collector::new();
    env.start(
        1,
        Service::builder(env.name("consumer"), "1").subscription(
            recording("tagged", seen.clone()).filter(SubscriptionFilter::new().event_name(&event)),
        ),
    )
    .await;
    env.start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    let bridge = env.bridge(0);
    let sender = purista_core::SenderAddress {
        service_name: env.name("publisher"),
        service_version: "1".into(),
        service_target: String::new(),
        instance_id: bridge.instance_id().to_string(),
    };
    let message = |n: usize| {
        let mut m = Envelope::custom(sender.clone(), &event, json!({ "tenantLength": n }));
        m.tenant_id = Some("t".repeat(n));
        m
    };
    let largest = largest_accepted(limit, |n| {
        let (bridge, m) = (bridge.clone(), message(n));
        async move {
            let sent = bridge.emit(m).await;
            match refused_part(sent, &format!("a tenant id of {n} bytes")) {
                None => true,
                Some(MessagePart::Metadata) => false,
                Some(MessagePart::Body) => panic!(
                    "a tenant id of {n} bytes was refused as too large a body, not as metadata"
                ),
            }
        }
    })
    .await;
    let over = bridge.emit(message(largest + 1)).await;
    assert_eq!(
        refused_part(over, "one byte over the largest accepted metadata"),
        Some(MessagePart::Metadata),
        "one byte more than the largest accepted metadata was not refused as too large"
    );
    let got = seen
        .wait_until(ARRIVAL, |e| {
            e.iter()
                .any(|e| e.payload["tenantLength"] == json!(largest))
        })
        .await
        .unwrap_or_else(|_| panic!("the largest accepted metadata never arrived"));
    let arrived = got
        .iter()
        .find(|e| e.payload["tenantLength"] == json!(largest))
        .expect("found above");
    assert_eq!(
        arrived.tenant_id.as_deref().map(str::len),
        Some(largest),
        "the largest accepted tenant id arrived changed"
    );
    assert!(
        largest + SLACK_BYTES >= limit,
        "the bridge refuses a tenant id of {} bytes although it declares a metadata limit of {limit}",
        largest + 1
    );
    env.finish().await;
}
