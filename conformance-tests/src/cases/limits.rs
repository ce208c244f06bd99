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
    BridgeError, Envelope, MessagePart, Outcome, Service, StatusCode, SubscriptionContext,
    SubscriptionDef, SubscriptionFilter, kit,
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

/// What a caller gets for one envelope field far over the declared metadata limit: a typed 400
/// (`TooLarge` of the metadata, or an invalid request where the field is also a name the broker
/// limits), or, where the bridge carries that field in the body only, success. Never anything
/// that a retry could cure (a 503 from a connection the broker dropped over it).
fn assert_refused_or_carried(result: Result<(), BridgeError>, what: &str) -> bool {
    match result {
        Ok(()) => false,
        Err(BridgeError::TooLarge {
            part: MessagePart::Metadata,
            ..
        }) => true,
        Err(other) if other.status() == StatusCode::BAD_REQUEST && !other.is_retryable() => true,
        Err(other) => panic!(
            "{what} failed with {other} ({}), not a typed 400 at the caller",
            other.status()
        ),
    }
}

/// A principal, tenant, event name or trace context far larger than the declared metadata
/// limit is refused at the caller with a typed 400, on emit and (where commands are declared)
/// on invoke, before anything reaches the broker: the bridge keeps its connection (no
/// reconnect counted) and delivers the next message as if nothing happened.
pub async fn oversized_metadata_fields_are_400_at_the_caller_and_cost_no_reconnect(
    h: Arc<dyn Harness>,
) {
    let limit = h
        .capabilities()
        .limits
        .max_metadata_bytes
        .expect("planned only for a declared metadata limit");
    let commands = h.capabilities().commands;
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("after");
    let seen: Arc<Collector<Envelope>> = Collector::new();
    let mut consumer = Service::builder(env.name("consumer"), "1")
        .subscription(recording("after", seen.clone()).event_name(&event));
    if commands {
        consumer = consumer.command(purista_core::CommandDef::new(
            "echo",
            |_ctx: purista_core::Context, v: serde_json::Value, _p: purista_core::Empty| async move {
                Ok(v)
            },
        ));
    }
    env.start(1, consumer).await;
    env.start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    let bridge = env.bridge(0);
    let reconnects_before = bridge.counters().reconnects;
    let sender = purista_core::SenderAddress {
        service_name: env.name("publisher"),
        service_version: "1".into(),
        service_target: String::new(),
        instance_id: bridge.instance_id().to_string(),
    };
    let huge = "x".repeat(limit + 64 * 1024);
    let trace_context = json!({ "traceparent": huge }).to_string();
    let tag = |m: &mut Envelope, field: &str| match field {
        "principalId" => m.principal_id = Some(huge.clone()),
        "tenantId" => m.tenant_id = Some(huge.clone()),
        "otp" => m.otp = Some(trace_context.clone()),
        _ => unreachable!("a field this case sets"),
    };

    let mut tenant_refused = false;
    for field in ["principalId", "tenantId", "otp"] {
        let mut m = Envelope::custom(sender.clone(), &event, json!({ "oversized": field }));
        tag(&mut m, field);
        let refused = assert_refused_or_carried(
            bridge.emit(m).await,
            &format!("an emit with a {} KiB {field}", huge.len() / 1024),
        );
        tenant_refused |= refused && field == "tenantId";
    }
    assert!(
        tenant_refused,
        "a tenant id larger than the declared metadata limit was sent anyway"
    );
    let named = Envelope::custom(sender.clone(), &huge, json!({ "oversized": "eventName" }));
    assert_refused_or_carried(bridge.emit(named).await, "an emit with a huge event name");
    if commands {
        let receiver = purista_core::Address::new(env.name("consumer"), "1", "echo");
        for field in ["principalId", "tenantId", "otp"] {
            let mut command =
                Envelope::command(sender.clone(), receiver.clone(), json!(1), json!({}));
            tag(&mut command, field);
            let invoked = bridge.invoke(command, ARRIVAL).await.map(|_| ());
            assert_refused_or_carried(invoked, &format!("an invocation with a huge {field}"));
        }
    }

    assert_eq!(
        bridge.counters().reconnects,
        reconnects_before,
        "oversized metadata cost the bridge its connection"
    );
    let after = Envelope::custom(sender, &event, json!({ "after": true }));
    bridge
        .emit(after)
        .await
        .expect("an ordinary emit after the refusals succeeds");
    seen.wait_until(ARRIVAL, |e| {
        e.iter().any(|e| e.payload["after"] == json!(true))
    })
    .await
    .unwrap_or_else(|_| panic!("the event after the refused ones never arrived"));
    env.finish().await;
}

/// A message whose metadata is as large as the bridge accepts still leaves room for what the
/// bridge adds when it retries and dead-letters it: it is delivered, retried, and dead-lettered
/// with its metadata and payload intact, the consumer goes on with the next message, and the
/// bridge keeps its connection throughout.
pub async fn a_message_at_the_metadata_limit_is_retried_and_dead_lettered_without_a_reconnect(
    h: Arc<dyn Harness>,
) {
    let limit = h
        .capabilities()
        .limits
        .max_metadata_bytes
        .expect("planned only for a declared metadata limit");
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("heavy");
    let probe = env.name("probe");
    let target = env.name("heavy-dead-letters");
    let attempts: Arc<Collector<(String, u32)>> = Collector::new();
    let sink = attempts.clone();
    env.start(
        1,
        Service::builder(env.name("consumer"), "1").subscription(
            SubscriptionDef::new(
                "heavy",
                move |ctx: SubscriptionContext, v: serde_json::Value| {
                    let sink = sink.clone();
                    async move {
                        let kind = v["kind"].as_str().unwrap_or_default().to_string();
                        sink.push((kind.clone(), ctx.attempt()));
                        Ok(if kind == "heavy" {
                            Outcome::retry()
                        } else {
                            Outcome::Ack
                        })
                    }
                },
            )
            .event_name(&event)
            .max_attempts(2)
            .dead_letter_target(&target),
        ),
    )
    .await;
    env.start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    let bridge = env.bridge(0);
    let reconnects_before = bridge.counters().reconnects;
    let sender = purista_core::SenderAddress {
        service_name: env.name("publisher"),
        service_version: "1".into(),
        service_target: String::new(),
        instance_id: bridge.instance_id().to_string(),
    };
    let message = |name: &str, n: usize, kind: &str| {
        let mut m = Envelope::custom(sender.clone(), name, json!({ "kind": kind }));
        m.tenant_id = Some("t".repeat(n));
        m
    };
    // The largest tenant id the bridge accepts, found on an event nobody subscribes to.
    let largest =
        largest_accepted(limit, |n| {
            let (bridge, m) = (bridge.clone(), message(&probe, n, "probe"));
            async move {
                refused_part(bridge.emit(m).await, &format!("a tenant id of {n} bytes")).is_none()
            }
        })
        .await;
    bridge
        .emit(message(&event, largest, "heavy"))
        .await
        .expect("the message at the limit is accepted");
    bridge
        .emit(message(&event, 1, "light"))
        .await
        .expect("the next message is accepted");

    attempts
        .wait_until(ARRIVAL, |a| {
            a.iter()
                .any(|(kind, attempt)| kind == "heavy" && *attempt == 2)
                && a.iter().any(|(kind, _)| kind == "light")
        })
        .await
        .unwrap_or_else(|got| {
            panic!(
                "the message at the limit was not retried, or the next one never came: {:?} \
                 (reconnects: {})",
                got,
                bridge.counters().reconnects - reconnects_before
            )
        });
    let entry = crate::support::eventually_some(
        "the message at the limit is dead-lettered",
        ARRIVAL,
        || {
            let (bridge, target) = (bridge.clone(), target.clone());
            async move {
                let entries = bridge
                    .inspect_dead_letters(&target, 10)
                    .await
                    .unwrap_or_else(|e| panic!("inspecting `{target}` failed: {e}"));
                entries.into_iter().find(|e| {
                    e.envelope
                        .as_ref()
                        .is_some_and(|m| m.payload["kind"] == json!("heavy"))
                })
            }
        },
    )
    .await;
    let dead = entry.envelope.expect("found by its envelope");
    assert_eq!(
        dead.tenant_id.as_deref().map(str::len),
        Some(largest),
        "the dead letter lost or changed its metadata"
    );
    assert_eq!(
        bridge.counters().reconnects,
        reconnects_before,
        "retrying or dead-lettering the message at the limit cost the bridge its connection"
    );
    env.finish().await;
}

/// A command over the declared body limit is refused with 400 at the caller whether or not
/// anybody serves its receiver, and so is a stream open frame where streams are declared: the
/// size is checked before the route, so the caller learns that its message is too large, not
/// that nobody is there (a 502, which it might retry elsewhere with the same message).
pub async fn an_oversized_invocation_is_400_whether_or_not_anyone_serves_it(h: Arc<dyn Harness>) {
    let limit = h
        .capabilities()
        .limits
        .max_payload_bytes
        .expect("planned only for a declared body limit");
    let streams = h.capabilities().streams;
    let mut env = TestEnv::new(&h, 2).await;
    let mut server = Service::builder(env.name("server"), "1").command(
        purista_core::CommandDef::new(
            "big",
            |_ctx: purista_core::Context, _v: serde_json::Value, _p: purista_core::Empty| async move {
                Ok(())
            },
        ),
    );
    if streams {
        server = server.stream(purista_core::StreamDef::new(
            "big",
            |_ctx: purista_core::Context,
             _v: serde_json::Value,
             _p: purista_core::Empty,
             _out: purista_core::StreamWriter| async move { Ok(json!(null)) },
        ));
    }
    env.start(1, server).await;
    let client = env
        .start(0, Service::builder(env.name("client"), "1"))
        .await;
    let oversized = json!({ "fill": "x".repeat(limit) });
    for (whose, service) in [("a served", "server"), ("an unserved", "nobody")] {
        let to = purista_core::Address::new(env.name(service), "1", "big");
        let err = client
            .invoke_with::<serde_json::Value>(
                to.clone(),
                oversized.clone(),
                purista_core::Empty,
                purista_core::InvokeOptions::ttl(ARRIVAL),
            )
            .await
            .expect_err("an invocation over the body limit cannot succeed");
        assert_eq!(
            err.status,
            StatusCode::BAD_REQUEST,
            "an oversized invocation of {whose} command failed with {err}, not 400"
        );
        if streams {
            match client
                .open_stream(to, oversized.clone(), purista_core::Empty, Some(ARRIVAL))
                .await
            {
                Ok(_) => panic!("{whose} stream session opened with a body over the limit"),
                Err(err) => assert_eq!(
                    err.status,
                    StatusCode::BAD_REQUEST,
                    "opening {whose} stream with an oversized body failed with {err}, not 400"
                ),
            }
        }
    }
    env.finish().await;
}
