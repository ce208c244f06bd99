//! Subscriptions and filters (DESIGN §3.3): what reaches which subscription, shared versus
//! broadcast, and what a handler emits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use purista_core::filter::filter_table;
use purista_core::{
    AddressFilter, CommandDef, Context, Empty, Envelope, HandledError, InvokeOptions, MessageType,
    Need, Reply, Service, StatusCode, SubscriptionContext, SubscriptionDef, SubscriptionFilter,
};
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::gate::require;
use crate::harness::Harness;
use crate::runner::Verdict;
use crate::support::{ARRIVAL, Collector, may_duplicate, quiet_period, recording};

/// Every row of core's filter table, through the bridge: the set of subscriptions each message
/// reaches equals what the reference matcher says, for every (subscription, message) pair.
pub async fn filter_table_routes_like_the_reference_matcher(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::ComplexFilter, Need::SharedSubscription]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 1).await;
    let Some(raw) = env.raw() else {
        env.finish().await;
        return Verdict::NotApplicable(
            "the table's messages carry fixed senders, which only a raw publisher can put on the broker",
        );
    };
    let rows = filter_table();
    let received: Arc<Collector<(usize, String)>> = Collector::new();
    let mut service = Service::builder(env.name("table"), "1");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(
            row.filter.matches(&row.message),
            row.expected,
            "core's filter table row `{}` disagrees with the reference matcher",
            row.name
        );
        let sink = received.clone();
        service = service.subscription(
            SubscriptionDef::new(
                format!("row{i:02}"),
                move |ctx: SubscriptionContext, _v: Value| {
                    let sink = sink.clone();
                    async move {
                        if let Some(e) = ctx.envelope() {
                            sink.push((i, e.id.clone()));
                        }
                        Ok(())
                    }
                },
            )
            .filter(row.filter.clone()),
        );
    }
    env.start(0, service).await;

    // Fresh ids, so this case counts only its own messages on a shared broker.
    let messages: Vec<Envelope> = rows
        .iter()
        .map(|row| {
            let mut m = row.message.clone();
            m.id = purista_core::ids::new_id();
            m
        })
        .collect();
    let index_of: BTreeMap<String, usize> = messages
        .iter()
        .enumerate()
        .map(|(j, m)| (m.id.clone(), j))
        .collect();
    let mut expected: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (i, row) in rows.iter().enumerate() {
        for (j, m) in messages.iter().enumerate() {
            if row.filter.matches(m) {
                expected.insert((i, j));
            }
        }
    }
    for m in &messages {
        raw.publish(&m.encode())
            .await
            .unwrap_or_else(|e| panic!("publishing a valid envelope raw failed: {e}"));
    }
    let ours = |items: &[(usize, String)]| -> BTreeSet<(usize, usize)> {
        items
            .iter()
            .filter_map(|(i, id)| index_of.get(id).map(|j| (*i, *j)))
            .collect()
    };
    let _ = received
        .wait_until(ARRIVAL, |items| ours(items).len() >= expected.len())
        .await;
    quiet_period().await;
    let got = received.snapshot();
    let actual = ours(&got);
    let mut problems = Vec::new();
    for &(i, j) in expected.difference(&actual) {
        problems.push(format!(
            "subscription of row `{}` missed the message of row `{}`",
            rows[i].name, rows[j].name
        ));
    }
    for &(i, j) in actual.difference(&expected) {
        problems.push(format!(
            "subscription of row `{}` received the message of row `{}`, which its filter excludes",
            rows[i].name, rows[j].name
        ));
    }
    if !may_duplicate(&env.caps()) {
        let mut counts: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for (i, id) in &got {
            if let Some(j) = index_of.get(id) {
                *counts.entry((*i, *j)).or_insert(0) += 1;
            }
        }
        for ((i, j), n) in counts.into_iter().filter(|(_, n)| *n > 1) {
            problems.push(format!(
                "subscription of row `{}` received the message of row `{}` {n} times",
                rows[i].name, rows[j].name
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "routing differs from the reference matcher:\n  {}",
        problems.join("\n  ")
    );
    env.finish().await;
    Verdict::Passed
}

/// Starts `service(i)` on each of `instances` and publishes `count` events from instance 0;
/// returns the (instance, n) deliveries once `done` holds.
async fn fan(
    env: &mut TestEnv,
    instances: usize,
    broadcast: bool,
    count: u64,
) -> Vec<(usize, u64)> {
    let event = env.name("fan");
    let received: Arc<Collector<(usize, u64)>> = Collector::new();
    for i in 0..instances {
        let sink = received.clone();
        let mut def = SubscriptionDef::new("fan", move |_ctx: SubscriptionContext, v: Value| {
            let sink = sink.clone();
            async move {
                sink.push((i, v["n"].as_u64().unwrap_or(u64::MAX)));
                Ok(())
            }
        })
        .event_name(&event);
        if broadcast {
            def = def.broadcast();
        }
        env.start(
            i,
            Service::builder(env.name("consumer"), "1").subscription(def),
        )
        .await;
    }
    let publisher = env
        .start(instances, Service::builder(env.name("publisher"), "1"))
        .await;
    for n in 0..count {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    let expected = if broadcast {
        count as usize * instances
    } else {
        count as usize
    };
    let _ = received
        .wait_until(ARRIVAL, |items| {
            items.iter().collect::<BTreeSet<_>>().len() >= expected
                && (broadcast
                    || items.iter().map(|(_, n)| n).collect::<BTreeSet<_>>().len() >= expected)
        })
        .await;
    quiet_period().await;
    received.snapshot()
}

/// A shared subscription on 3 instances: each message reaches exactly one instance, and every
/// message arrives.
pub async fn shared_delivers_each_message_to_exactly_one_instance(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::SharedSubscription]).await {
        return v;
    }
    const COUNT: u64 = 60;
    let mut env = TestEnv::new(&h, 4).await;
    let got = fan(&mut env, 3, false, COUNT).await;
    let mut by_message: BTreeMap<u64, BTreeSet<usize>> = BTreeMap::new();
    let mut copies: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, n) in &got {
        by_message.entry(*n).or_default().insert(*i);
        *copies.entry(*n).or_insert(0) += 1;
    }
    let missing: Vec<u64> = (0..COUNT).filter(|n| !by_message.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "shared subscription lost messages {missing:?}"
    );
    if !may_duplicate(&env.caps()) {
        let dup: Vec<_> = copies.iter().filter(|(_, c)| **c > 1).collect();
        assert!(
            dup.is_empty(),
            "messages of a shared subscription reached more than one consumer (or one twice): {dup:?}"
        );
    }
    env.finish().await;
    Verdict::Passed
}

/// A broadcast subscription on 3 instances: each message reaches every instance.
pub async fn broadcast_delivers_each_message_to_every_instance(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::BroadcastSubscription]).await {
        return v;
    }
    const COUNT: u64 = 30;
    let mut env = TestEnv::new(&h, 4).await;
    let got = fan(&mut env, 3, true, COUNT).await;
    let mut copies: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    for (i, n) in &got {
        *copies.entry((*i, *n)).or_insert(0) += 1;
    }
    let mut missing = Vec::new();
    for i in 0..3 {
        for n in 0..COUNT {
            if !copies.contains_key(&(i, n)) {
                missing.push((i, n));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "broadcast messages missing at (instance, n): {missing:?}"
    );
    if !may_duplicate(&env.caps()) {
        let dup: Vec<_> = copies.iter().filter(|(_, c)| **c > 1).collect();
        assert!(
            dup.is_empty(),
            "broadcast delivered twice to one instance: {dup:?}"
        );
    }
    env.finish().await;
    Verdict::Passed
}

/// Subscriptions filtered on message type see commands, success responses and error responses.
pub async fn filtered_subscription_sees_commands_and_responses(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(
        &h,
        &[
            Need::Commands,
            Need::ComplexFilter,
            Need::SharedSubscription,
        ],
    )
    .await
    {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let billing = env.name("billing");
    let by_service = |name: &str| AddressFilter {
        service_name: Some(name.to_string()),
        ..AddressFilter::default()
    };
    let commands = Collector::new();
    let successes = Collector::new();
    let errors = Collector::new();
    let client = env
        .start(
            0,
            Service::builder(env.name("observer"), "1")
                .subscription(
                    recording("commands", commands.clone()).filter(
                        SubscriptionFilter::new()
                            .message_type(MessageType::Command)
                            .received_by(by_service(&billing)),
                    ),
                )
                .subscription(
                    recording("successes", successes.clone()).filter(
                        SubscriptionFilter::new()
                            .message_type(MessageType::CommandSuccessResponse)
                            .sent_from(by_service(&billing)),
                    ),
                )
                .subscription(
                    recording("errors", errors.clone()).filter(
                        SubscriptionFilter::new()
                            .message_type(MessageType::CommandErrorResponse)
                            .sent_from(by_service(&billing)),
                    ),
                ),
        )
        .await;
    let charge = CommandDef::new("charge", |_ctx: Context, ok: bool, _p: Empty| async move {
        if ok {
            Ok(json!({"charged": true}))
        } else {
            Err(HandledError::new(StatusCode::UNPROCESSABLE_ENTITY, "card declined").into())
        }
    });
    env.start(1, Service::builder(&billing, "1").command(charge))
        .await;
    let target = purista_core::Address::new(&billing, "1", "charge");
    let opts = || InvokeOptions::ttl(std::time::Duration::from_secs(5));
    let _: Value = client
        .invoke_with(target.clone(), true, Empty, opts())
        .await
        .expect("charge succeeds");
    let _ = client
        .invoke_with::<Value>(target, false, Empty, opts())
        .await
        .expect_err("charge fails");
    let cmds = commands
        .wait_until(ARRIVAL, |c| {
            c.iter().map(|e| &e.id).collect::<BTreeSet<_>>().len() >= 2
        })
        .await
        .unwrap_or_else(|c| {
            panic!(
                "a command-filtered subscription saw {} of 2 commands",
                c.len()
            )
        });
    let ok = successes
        .wait_for_len(
            1,
            ARRIVAL,
            "the success response on a type-filtered subscription",
        )
        .await;
    let err = errors
        .wait_for_len(
            1,
            ARRIVAL,
            "the error response on a type-filtered subscription",
        )
        .await;
    assert!(
        cmds.iter().all(|e| e.message_type == MessageType::Command),
        "a command subscription received something else"
    );
    assert!(
        cmds.iter()
            .any(|c| c.correlation_id == ok[0].correlation_id),
        "the success response does not correlate with a seen command"
    );
    assert!(
        cmds.iter()
            .any(|c| c.correlation_id == err[0].correlation_id),
        "the error response does not correlate with a seen command"
    );
    assert_eq!(
        err[0].payload["status"],
        json!(422),
        "error response payload lost"
    );
    env.finish().await;
    Verdict::Passed
}

/// A handler's returned value, with `emit_event` set, is emitted as exactly one custom message;
/// a handler that returns none emits nothing.
pub async fn emit_event_name_emits_exactly_one_event(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::SharedSubscription]).await {
        return v;
    }
    const COUNT: u64 = 5;
    let mut env = TestEnv::new(&h, 2).await;
    let incoming = env.name("in");
    let outgoing = env.name("out");
    let seen = Collector::new();
    let publisher = env
        .start(
            0,
            Service::builder(env.name("observer"), "1")
                .subscription(recording("out", seen.clone()).event_name(&outgoing)),
        )
        .await;
    let relay = SubscriptionDef::new("relay", |_ctx: SubscriptionContext, v: Value| async move {
        let n = v["n"].as_u64().unwrap_or(0);
        // Odd numbers reply without a value: nothing may be emitted for them.
        Ok(if n.is_multiple_of(2) {
            Reply::emit(json!({ "n": n, "relayed": true }))
        } else {
            Reply::ack()
        })
    })
    .event_name(&incoming)
    .emit_event(&outgoing);
    env.start(
        1,
        Service::builder(env.name("relay"), "1").subscription(relay),
    )
    .await;
    for n in 0..COUNT {
        publisher
            .emit(&incoming, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    let evens = (0..COUNT).filter(|n| n.is_multiple_of(2)).count();
    let _ = seen
        .wait_until(ARRIVAL, |items| {
            items
                .iter()
                .map(|e| e.payload["n"].as_u64())
                .collect::<BTreeSet<_>>()
                .len()
                >= evens
        })
        .await;
    quiet_period().await;
    let got = seen.snapshot();
    let mut per_n: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for e in &got {
        assert_eq!(
            e.message_type,
            MessageType::CustomMessage,
            "not a customMessage"
        );
        assert_eq!(
            e.event_name.as_deref(),
            Some(outgoing.as_str()),
            "wrong eventName"
        );
        per_n
            .entry(e.payload["n"].as_u64().expect("payload survives"))
            .or_default()
            .insert(e.id.clone());
    }
    let expected: BTreeSet<u64> = (0..COUNT).filter(|n| n.is_multiple_of(2)).collect();
    assert_eq!(
        per_n.keys().copied().collect::<BTreeSet<_>>(),
        expected,
        "emitted events for the wrong inputs"
    );
    for (n, ids) in &per_n {
        assert_eq!(
            ids.len(),
            1,
            "input {n} emitted {} events, not one",
            ids.len()
        );
    }
    if !may_duplicate(&env.caps()) {
        assert_eq!(
            got.len(),
            expected.len(),
            "an emitted event was delivered twice"
        );
    }
    env.finish().await;
    Verdict::Passed
}

/// A durable subscription keeps what is published while none of its consumers is connected and
/// delivers it to the next consumer.
pub async fn durable_subscription_keeps_messages_while_no_consumer(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::SharedSubscription, Need::DurableSubscription]).await {
        return v;
    }
    const COUNT: u64 = 5;
    let mut env = TestEnv::new(&h, 3).await;
    let event = env.name("kept");
    let received: Arc<Collector<u64>> = Collector::new();
    let durable = |sink: Arc<Collector<u64>>| {
        SubscriptionDef::new("kept", move |_ctx: SubscriptionContext, v: Value| {
            let sink = sink.clone();
            async move {
                sink.push(v["n"].as_u64().unwrap_or(u64::MAX));
                Ok(())
            }
        })
        .event_name(&event)
        .durable(true)
    };
    // The first consumer creates the subscription on the broker, then goes away.
    let first = env
        .start(
            0,
            Service::builder(env.name("consumer"), "1").subscription(durable(received.clone())),
        )
        .await;
    first
        .shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(2))
        .await;
    let publisher = env
        .start(2, Service::builder(env.name("publisher"), "1"))
        .await;
    for n in 0..COUNT {
        publisher
            .emit(&event, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    env.start(
        1,
        Service::builder(env.name("consumer"), "1").subscription(durable(received.clone())),
    )
    .await;
    let got = received
        .wait_until(ARRIVAL, |r| {
            r.iter().collect::<BTreeSet<_>>().len() as u64 >= COUNT
        })
        .await
        .unwrap_or_else(|r| {
            panic!(
                "a durable subscription lost messages published while no consumer ran: got {r:?}"
            )
        });
    assert_eq!(
        got.into_iter().collect::<BTreeSet<_>>(),
        (0..COUNT).collect::<BTreeSet<_>>()
    );
    env.finish().await;
    Verdict::Passed
}

/// At-least-once: a delivery whose consumer goes away before settling it is delivered again to
/// another consumer of the subscription.
pub async fn unsettled_delivery_is_redelivered_when_its_consumer_goes_away(
    h: Arc<dyn Harness>,
) -> Verdict {
    if let Some(v) = require(&h, &[Need::SharedSubscription, Need::AtLeastOnce]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 3).await;
    let event = env.name("unsettled");
    let taken: Arc<Collector<u64>> = Collector::new();
    let finished: Arc<Collector<u64>> = Collector::new();
    let sub = |hang: bool, sink: Arc<Collector<u64>>| {
        SubscriptionDef::new("unsettled", move |_ctx: SubscriptionContext, v: Value| {
            let sink = sink.clone();
            async move {
                sink.push(v["n"].as_u64().unwrap_or(u64::MAX));
                if hang {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        })
        .event_name(&event)
        .require(Need::AtLeastOnce)
    };
    env.start(
        0,
        Service::builder(env.name("consumer"), "1").subscription(sub(true, taken.clone())),
    )
    .await;
    let publisher = env
        .start(2, Service::builder(env.name("publisher"), "1"))
        .await;
    publisher
        .emit(&event, json!({ "n": 1 }))
        .await
        .expect("emit succeeds");
    taken
        .wait_for_len(1, ARRIVAL, "the first consumer taking the message")
        .await;
    env.start(
        1,
        Service::builder(env.name("consumer"), "1").subscription(sub(false, finished.clone())),
    )
    .await;
    // The first consumer's instance dies with the delivery unsettled.
    env.bridge(0)
        .shutdown(tokio::time::Instant::now() + std::time::Duration::from_millis(100))
        .await;
    let got = finished
        .wait_for_len(
            1,
            ARRIVAL,
            "the unsettled message redelivered to the other consumer",
        )
        .await;
    assert_eq!(got[0], 1);
    env.finish().await;
    Verdict::Passed
}
