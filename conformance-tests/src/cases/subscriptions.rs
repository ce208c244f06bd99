//! Subscriptions and filters (DESIGN §3.3): what reaches which subscription, shared versus
//! broadcast, and what a handler emits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use purista_core::{
    AddressFilter, CommandDef, Context, Empty, HandledError, InvokeOptions, MessageType, Need,
    Reply, Service, StatusCode, SubscriptionContext, SubscriptionDef, SubscriptionFilter,
};
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{
    ARRIVAL, Collector, SENTINEL, handlers_finished, may_duplicate, recording,
    sentinels_reach_every_instance,
};

/// One consumer service with subscription "fan" on each of `instances`, `count` events
/// published from instance `instances`; returns the (instance, n) deliveries of the case's
/// messages once they arrived and sentinels proved that nothing else follows.
///
/// Sentinels: broadcast — one, which every instance must get; shared — one at a time until
/// every instance has had one (or, should the bridge favour some instances, a few per
/// instance have arrived). Then no handler may still run.
async fn fan(
    env: &mut TestEnv,
    instances: usize,
    broadcast: bool,
    count: u64,
) -> Vec<(usize, u64)> {
    let event = env.name("fan");
    let received: Arc<Collector<(usize, u64)>> = Collector::new();
    let mut consumers = Vec::new();
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
        consumers.push(
            env.start(
                i,
                Service::builder(env.name("consumer"), "1").subscription(def),
            )
            .await,
        );
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
            let ours = items.iter().filter(|(_, n)| *n < SENTINEL);
            ours.clone().collect::<BTreeSet<_>>().len() >= expected
                && (broadcast || ours.map(|(_, n)| n).collect::<BTreeSet<_>>().len() >= expected)
        })
        .await;
    sentinels_reach_every_instance(&publisher, &event, &received, instances, broadcast).await;
    for c in &consumers {
        handlers_finished(c).await;
    }
    received
        .snapshot()
        .into_iter()
        .filter(|(_, n)| *n < SENTINEL)
        .collect()
}

/// A shared subscription on 3 instances: each message reaches exactly one instance, and every
/// message arrives.
pub async fn shared_delivers_each_message_to_exactly_one_instance(h: Arc<dyn Harness>) {
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
    let extra: Vec<u64> = by_message.keys().copied().filter(|n| *n >= COUNT).collect();
    assert!(
        extra.is_empty(),
        "messages nobody published arrived: {extra:?}"
    );
    // Even where at-least-once allows a redelivery, no fault happened here: a message that
    // reached two instances was broadcast, not shared.
    let broadcast: Vec<_> = by_message.iter().filter(|(_, at)| at.len() > 1).collect();
    assert!(
        broadcast.is_empty(),
        "messages of a shared subscription reached more than one instance: {broadcast:?}"
    );
    if !may_duplicate(&env.caps()) {
        let dup: Vec<_> = copies.iter().filter(|(_, c)| **c > 1).collect();
        assert!(
            dup.is_empty(),
            "messages of a shared subscription reached one instance twice: {dup:?}"
        );
    }
    env.finish().await;
}

/// A broadcast subscription on 3 instances: each message reaches every instance.
pub async fn broadcast_delivers_each_message_to_every_instance(h: Arc<dyn Harness>) {
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
}

/// Subscriptions filtered on message type see commands, success responses and error responses.
pub async fn filtered_subscription_sees_commands_and_responses(h: Arc<dyn Harness>) {
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
}

/// A handler's returned value, with `emit_event` set, is emitted as exactly one custom message;
/// a handler that returns none emits nothing.
pub async fn emit_event_name_emits_exactly_one_event(h: Arc<dyn Harness>) {
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
    let relay = env
        .start(
            1,
            Service::builder(env.name("relay"), "1").subscription(relay),
        )
        .await;
    // The sentinel input (even, so relayed) goes in once the relay has handled every other
    // input: the relay's handlers run side by side, so one sent along with the others could
    // have its event out first. Once the sentinel's event is in and no handler runs, an event
    // for an earlier input (published before it, by the same instance) would be in too.
    for n in 0..COUNT {
        publisher
            .emit(&incoming, json!({ "n": n }))
            .await
            .expect("emit succeeds");
    }
    let relayed = COUNT.div_ceil(2) as usize;
    if let Err(got) = seen
        .wait_until(ARRIVAL, |items| items.len() >= relayed)
        .await
    {
        panic!("the events relayed for the even inputs never all arrived: {got:?}");
    }
    handlers_finished(&relay).await;
    publisher
        .emit(&incoming, json!({ "n": SENTINEL }))
        .await
        .expect("emit succeeds");
    if let Err(got) = seen
        .wait_until(ARRIVAL, |items| {
            items.iter().any(|e| e.payload["n"] == json!(SENTINEL))
        })
        .await
    {
        panic!("the event relayed for the sentinel input never arrived: {got:?}");
    }
    handlers_finished(&relay).await;
    handlers_finished(&publisher).await;
    let got: Vec<_> = seen
        .snapshot()
        .into_iter()
        .filter(|e| e.payload["n"] != json!(SENTINEL))
        .collect();
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
}

/// A durable subscription keeps what is published while none of its consumers is connected and
/// delivers it to the next consumer.
pub async fn durable_subscription_keeps_messages_while_no_consumer(h: Arc<dyn Harness>) {
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
    let second = env
        .start(
            1,
            Service::builder(env.name("consumer"), "1").subscription(durable(received.clone())),
        )
        .await;
    if let Err(r) = received
        .wait_until(ARRIVAL, |r| {
            r.iter().collect::<BTreeSet<_>>().len() as u64 >= COUNT
        })
        .await
    {
        panic!("a durable subscription lost messages published while no consumer ran: got {r:?}");
    }
    // Published after the consumer is back: once it is in, nothing kept from before follows.
    publisher
        .emit(&event, json!({ "n": SENTINEL }))
        .await
        .expect("emit succeeds");
    if let Err(r) = received
        .wait_until(ARRIVAL, |r| r.contains(&SENTINEL))
        .await
    {
        panic!("the sentinel published after the consumer came back never arrived: {r:?}");
    }
    handlers_finished(&second).await;
    let got: Vec<u64> = received
        .snapshot()
        .into_iter()
        .filter(|n| *n != SENTINEL)
        .collect();
    assert_eq!(
        got.iter().copied().collect::<BTreeSet<_>>(),
        (0..COUNT).collect::<BTreeSet<_>>(),
        "the durable subscription delivered other messages than were published"
    );
    if !may_duplicate(&env.caps()) {
        assert_eq!(
            got.len() as u64,
            COUNT,
            "the durable subscription delivered a message twice: {got:?}"
        );
    }
    env.finish().await;
}

/// At-least-once: a delivery whose consumer goes away before settling it is delivered again to
/// another consumer of the subscription.
pub async fn unsettled_delivery_is_redelivered_when_its_consumer_goes_away(h: Arc<dyn Harness>) {
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
}
