//! The envelope on the wire (DESIGN §3.1): what the bridge stamps, what it must carry along
//! untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use purista_core::envelope::now_ms;
use purista_core::{
    Address, CommandDef, Context, Empty, Envelope, HandledError, MessageType, Need, Reply,
    SenderAddress, Service, StatusCode, SubscriptionContext, SubscriptionDef,
};
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::gate::declares;
use crate::harness::Harness;
use crate::support::{ARRIVAL, Collector, handlers_finished, recording};

fn sender(service: &str, target: &str, instance: &str) -> SenderAddress {
    SenderAddress {
        service_name: service.into(),
        service_version: "1".into(),
        service_target: target.into(),
        instance_id: instance.into(),
    }
}

/// Every emitted message gets a unique id, an epoch-ms timestamp and the emitting instance as
/// `sender.instanceId`, whatever the caller put there.
pub async fn stamps_unique_id_ms_timestamp_and_sender_instance(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("stamped");
    let seen = Collector::new();
    env.start(
        1,
        Service::builder(env.name("observer"), "1")
            .subscription(recording("seen", seen.clone()).event_name(&event)),
    )
    .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    let before = now_ms();
    for n in 0..20 {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    // A caller that fills in id, timestamp and instance itself is overwritten by the bridge.
    let bridge = env.bridge(0);
    for n in 20..22 {
        let mut forged = Envelope::custom(
            sender(&env.name("publisher"), "", "forged-instance"),
            &event,
            json!({ "n": n }),
        );
        forged.id = "not-unique".into();
        forged.timestamp = 1;
        bridge.emit(forged).await.expect("emit succeeds");
    }
    let after = now_ms();
    let got = seen
        .wait_until(ARRIVAL, |items| {
            items
                .iter()
                .map(|e| e.payload["n"].as_u64())
                .collect::<BTreeSet<_>>()
                .len()
                >= 22
        })
        .await
        .unwrap_or_else(|got| panic!("only {} of 22 emitted events arrived", got.len()));

    let mut id_of: BTreeMap<u64, String> = BTreeMap::new();
    for e in &got {
        let n = e.payload["n"].as_u64().expect("payload survives");
        if let Some(previous) = id_of.insert(n, e.id.clone()) {
            assert_eq!(
                previous, e.id,
                "two deliveries of one emitted message carry different ids"
            );
        }
        assert!(
            e.timestamp >= 1_000_000_000_000,
            "timestamp {} is not in epoch milliseconds",
            e.timestamp
        );
        assert!(
            e.timestamp + 1_000 >= before && e.timestamp <= after + 1_000,
            "timestamp {} is not the emit time (between {before} and {after})",
            e.timestamp
        );
        assert_eq!(
            e.sender.instance_id,
            bridge.instance_id(),
            "sender.instanceId is not the emitting bridge instance"
        );
        assert!(!e.id.is_empty(), "a message without id");
    }
    let distinct: BTreeSet<&String> = id_of.values().collect();
    assert_eq!(
        distinct.len(),
        id_of.len(),
        "different messages share an id: {id_of:?}"
    );
    assert!(
        !distinct.contains(&"not-unique".to_string()),
        "the bridge kept a caller-supplied id instead of stamping a fresh one"
    );
    env.finish().await;
}

/// `traceId`, `principalId` and `tenantId` of a command reach its handler and come back on the
/// response, for success and error responses.
pub async fn trace_principal_tenant_survive_invoke_to_response(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let server = env.name("server");
    let who = CommandDef::new("who", |ctx: Context, _p: Empty, _q: Empty| async move {
        Ok(json!({
            "trace": ctx.trace_id(),
            "principal": ctx.principal_id(),
            "tenant": ctx.tenant_id(),
        }))
    });
    let refuse = CommandDef::new("refuse", |_ctx: Context, _p: Empty, _q: Empty| async move {
        Err::<(), _>(HandledError::new(StatusCode::FORBIDDEN, "not yours").into())
    });
    env.start(
        1,
        Service::builder(&server, "1").command(who).command(refuse),
    )
    .await;
    env.start(0, Service::builder(env.name("client"), "1"))
        .await;
    let bridge = env.bridge(0);

    for (target, expect_type) in [
        ("who", MessageType::CommandSuccessResponse),
        ("refuse", MessageType::CommandErrorResponse),
    ] {
        let mut command = Envelope::command(
            sender(&env.name("client"), "", bridge.instance_id()),
            Address::new(&server, "1", target),
            json!({}),
            json!({}),
        );
        command.trace_id = Some(format!("{}-trace", env.prefix));
        command.principal_id = Some("user-7".into());
        command.tenant_id = Some("tenant-7".into());
        let correlation = command.correlation_id.clone();
        let response = bridge
            .invoke(command, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("invoking {target} failed: {e}"));
        assert_eq!(response.message_type, expect_type, "wrong response type");
        assert_eq!(
            response.correlation_id, correlation,
            "the response does not carry the command's correlationId"
        );
        assert_eq!(
            response.trace_id.as_deref(),
            Some(format!("{}-trace", env.prefix).as_str()),
            "traceId lost between invoke and response"
        );
        assert_eq!(
            response.principal_id.as_deref(),
            Some("user-7"),
            "principalId lost between invoke and response"
        );
        assert_eq!(
            response.tenant_id.as_deref(),
            Some("tenant-7"),
            "tenantId lost between invoke and response"
        );
        if target == "who" {
            assert_eq!(
                response.payload,
                json!({
                    "trace": format!("{}-trace", env.prefix),
                    "principal": "user-7",
                    "tenant": "tenant-7",
                }),
                "the handler did not see the ids the caller sent"
            );
        }
    }
    env.finish().await;
}

/// The ids of a consumed event reach what its handler emits, both through `emit_event` and
/// through `Context::emit`.
pub async fn trace_principal_tenant_survive_subscription_to_emit(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let incoming = env.name("in");
    let via_reply = env.name("out-reply");
    let via_context = env.name("out-context");
    let seen = Collector::new();
    env.start(
        0,
        Service::builder(env.name("observer"), "1")
            .subscription(recording("reply", seen.clone()).event_name(&via_reply))
            .subscription(recording("context", seen.clone()).event_name(&via_context)),
    )
    .await;
    let manual = via_context.clone();
    let relay = SubscriptionDef::new("relay", move |ctx: SubscriptionContext, _v: Value| {
        let manual = manual.clone();
        async move {
            ctx.emit(&manual, json!({ "via": "context" })).await?;
            Ok(Reply::emit(json!({ "via": "reply" })))
        }
    })
    .event_name(&incoming)
    .emit_event(&via_reply);
    env.start(
        1,
        Service::builder(env.name("relay"), "1").subscription(relay),
    )
    .await;

    let bridge = env.bridge(0);
    let mut event = Envelope::custom(
        sender(&env.name("observer"), "", bridge.instance_id()),
        &incoming,
        json!({}),
    );
    event.trace_id = Some(format!("{}-trace", env.prefix));
    event.principal_id = Some("user-9".into());
    event.tenant_id = Some("tenant-9".into());
    bridge.emit(event).await.expect("emit succeeds");

    let got = seen
        .wait_until(ARRIVAL, |items| {
            let vias: BTreeSet<_> = items.iter().map(|e| e.payload["via"].to_string()).collect();
            vias.len() >= 2
        })
        .await
        .unwrap_or_else(|got| panic!("the relay's emitted events did not arrive: {got:?}"));
    for e in &got {
        let via = &e.payload["via"];
        assert_eq!(
            e.trace_id.as_deref(),
            Some(format!("{}-trace", env.prefix).as_str()),
            "traceId lost from subscription to emit ({via})"
        );
        assert_eq!(
            e.principal_id.as_deref(),
            Some("user-9"),
            "principalId lost from subscription to emit ({via})"
        );
        assert_eq!(
            e.tenant_id.as_deref(),
            Some("tenant-9"),
            "tenantId lost from subscription to emit ({via})"
        );
        assert_eq!(
            e.sender.instance_id,
            env.bridge(1).instance_id(),
            "an emitted event's sender is not the relay's instance"
        );
    }
    env.finish().await;
}

/// Fields the envelope does not define travel through the bridge untouched.
pub async fn unknown_fields_survive_a_round_trip(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("extra");
    let extra = json!({
        "xVendorContext": { "region": "eu-1", "hops": [1, 2, 3] },
        "xFlag": true,
    });
    let extra_map = extra.as_object().cloned().expect("an object");
    let seen = Collector::new();
    let commands = declares(&h, &Need::Commands);
    let mut server = Service::builder(env.name("server"), "1")
        .subscription(recording("seen", seen.clone()).event_name(&event));
    if commands {
        server = server.command(CommandDef::new(
            "extras",
            |ctx: Context, _p: Empty, _q: Empty| async move {
                Ok(ctx
                    .envelope()
                    .map(|e| Value::Object(e.extra.clone()))
                    .unwrap_or(Value::Null))
            },
        ));
    }
    env.start(1, server).await;
    env.start(0, Service::builder(env.name("client"), "1"))
        .await;
    let bridge = env.bridge(0);

    let mut message = Envelope::custom(
        sender(&env.name("client"), "", bridge.instance_id()),
        &event,
        json!({ "n": 1 }),
    );
    message.extra = extra_map.clone();
    bridge.emit(message).await.expect("emit succeeds");
    let got = seen
        .wait_for_len(1, ARRIVAL, "the event with extra fields")
        .await;
    for (k, v) in &extra_map {
        assert_eq!(
            got[0].extra.get(k),
            Some(v),
            "unknown field `{k}` did not survive the trip through the bridge"
        );
    }

    if commands {
        let mut command = Envelope::command(
            sender(&env.name("client"), "", bridge.instance_id()),
            Address::new(env.name("server"), "1", "extras"),
            json!({}),
            json!({}),
        );
        command.extra = extra_map.clone();
        let response = bridge
            .invoke(command, Duration::from_secs(5))
            .await
            .expect("invoke succeeds");
        for (k, v) in &extra_map {
            assert_eq!(
                response.payload.get(k),
                Some(v),
                "unknown field `{k}` did not reach the command handler"
            );
        }
    }
    env.finish().await;
}

/// 100 messages, each with its own trace id, principal, tenant and an unknown extra field: on
/// arrival, the metadata of each message is exactly its own (nothing crossed over between
/// messages, nothing lost or added).
pub async fn metadata_of_each_message_arrives_as_its_own(h: Arc<dyn Harness>) {
    const COUNT: u64 = 100;
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("meta");
    let seen: Arc<Collector<Envelope>> = Collector::new();
    let consumer = env
        .start(
            1,
            Service::builder(env.name("consumer"), "1")
                .subscription(recording("meta", seen.clone()).event_name(&event)),
        )
        .await;
    env.start(0, Service::builder(env.name("client"), "1"))
        .await;
    let bridge = env.bridge(0);
    // What each message must arrive with: (trace, principal, tenant, extra field).
    let metadata = |n: u64| {
        (
            format!("trace-{n}-{}", env.prefix),
            format!("principal-{n}"),
            format!("tenant-{}", n % 7),
            json!({ "n": n, "tag": format!("x{n}") }),
        )
    };
    let mut expected: BTreeMap<u64, (String, String, String, Value)> = BTreeMap::new();
    for n in 0..=COUNT {
        let mut message = Envelope::custom(
            sender(&env.name("client"), "", bridge.instance_id()),
            &event,
            json!({ "n": n }),
        );
        let (trace, principal, tenant, extra) = metadata(n);
        message.trace_id = Some(trace.clone());
        message.principal_id = Some(principal.clone());
        message.tenant_id = Some(tenant.clone());
        message.extra.insert("xCaseMeta".into(), extra.clone());
        bridge.emit(message).await.expect("emit succeeds");
        if n < COUNT {
            expected.insert(n, (trace, principal, tenant, extra));
        }
    }
    // Message COUNT is the sentinel: published last, once it is in, the others are.
    if let Err(got) = seen
        .wait_until(ARRIVAL, |e| {
            e.iter().any(|e| e.payload["n"] == json!(COUNT))
        })
        .await
    {
        panic!(
            "the last of {COUNT} messages never arrived ({} did)",
            got.len()
        );
    }
    handlers_finished(&consumer).await;
    let mut got: BTreeMap<u64, (String, String, String, Value)> = BTreeMap::new();
    for e in seen.snapshot() {
        let n = e.payload["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("a payload arrived changed: {}", e.payload));
        if n == COUNT {
            continue;
        }
        let value = (
            e.trace_id.clone().unwrap_or_default(),
            e.principal_id.clone().unwrap_or_default(),
            e.tenant_id.clone().unwrap_or_default(),
            e.extra.get("xCaseMeta").cloned().unwrap_or(Value::Null),
        );
        if let Some(before) = got.insert(n, value.clone()) {
            assert_eq!(
                before, value,
                "two copies of message {n} arrived with different metadata"
            );
        }
    }
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(n, want)| got.get(n) != Some(want))
        .map(|(n, want)| format!("message {n}: sent {want:?}, arrived {:?}", got.get(n)))
        .collect();
    assert!(
        wrong.is_empty() && got.len() == expected.len(),
        "the metadata of {} of {COUNT} messages did not arrive as sent ({} arrived):\n  {}",
        wrong.len(),
        got.len(),
        wrong
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    env.finish().await;
}
