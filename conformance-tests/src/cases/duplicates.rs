//! Duplicates (DESIGN §3.4, §3.6): at-least-once delivery means a message can arrive twice;
//! core's idempotency guard makes its side effect run once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use purista_core::{
    Envelope, IdempotencyGuard, SenderAddress, Service, SubscriptionContext, SubscriptionDef,
};
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{ARRIVAL, Collector, handlers_finished};

/// A subscription with the guard whose side effect records the payload's `key`, plus a witness
/// subscription without guard that records every delivery (so the case knows all copies were
/// offered before it counts side effects).
fn guarded(
    event: &str,
    guard: IdempotencyGuard,
    effects: Arc<Collector<String>>,
    witnessed: Arc<Collector<String>>,
) -> (SubscriptionDef, SubscriptionDef) {
    let effect = SubscriptionDef::new("effect", move |_ctx: SubscriptionContext, v: Value| {
        let effects = effects.clone();
        async move {
            effects.push(v["key"].as_str().unwrap_or_default().to_string());
            Ok(())
        }
    })
    .event_name(event)
    .idempotent(guard);
    let witness = SubscriptionDef::new("witness", move |ctx: SubscriptionContext, _v: Value| {
        let witnessed = witnessed.clone();
        async move {
            if let Some(e) = ctx.envelope() {
                witnessed.push(e.id.clone());
            }
            Ok(())
        }
    })
    .event_name(event);
    (effect, witness)
}

/// Waits for the side effect of the message keyed `sentinel`, published after the others.
async fn sentinel_arrives(effects: &Collector<String>) {
    if let Err(got) = effects
        .wait_until(ARRIVAL, |e| e.iter().any(|k| k == "sentinel"))
        .await
    {
        panic!(
            "the sentinel message published after the others never ran its side effect: {got:?}"
        );
    }
}

/// The same message id delivered twice (a re-publish, as a redelivery looks to a consumer)
/// runs the guarded side effect once.
pub async fn redelivered_message_id_runs_side_effect_once(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 1).await;
    let raw = env.raw_publisher();
    let event = env.name("charged");
    let effects = Collector::new();
    let witnessed = Collector::new();
    let (effect, witness) = guarded(
        &event,
        IdempotencyGuard::in_memory(Duration::from_secs(60)),
        effects.clone(),
        witnessed.clone(),
    );
    let consumer = env
        .start(
            0,
            Service::builder(env.name("consumer"), "1")
                .subscription(effect)
                .subscription(witness),
        )
        .await;
    let sender = SenderAddress {
        service_name: env.name("publisher"),
        service_version: "1".into(),
        service_target: String::new(),
        instance_id: "raw-publisher".into(),
    };
    let once = Envelope::custom(sender.clone(), &event, json!({ "key": "twice" }));
    let other = Envelope::custom(sender.clone(), &event, json!({ "key": "other" }));
    let sentinel = Envelope::custom(sender, &event, json!({ "key": "sentinel" }));
    for m in [&once, &once, &once, &other, &sentinel] {
        raw.publish(&m.encode())
            .await
            .unwrap_or_else(|e| panic!("raw publish failed: {e}"));
    }
    witnessed
        .wait_for_len(5, ARRIVAL, "every copy reaching the witness subscription")
        .await;
    sentinel_arrives(&effects).await;
    handlers_finished(&consumer).await;
    let got = effects.snapshot();
    let runs = got.iter().filter(|k| *k == "twice").count();
    assert_eq!(
        runs, 1,
        "one message id delivered 3 times ran its side effect {runs} times"
    );
    assert!(
        got.contains(&"other".to_string()),
        "a different message was skipped as duplicate"
    );
    env.finish().await;
}

/// Different messages with the same business key run the guarded side effect once.
pub async fn repeated_business_key_runs_side_effect_once(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("paid");
    let effects = Collector::new();
    let witnessed = Collector::new();
    let guard = IdempotencyGuard::in_memory(Duration::from_secs(60))
        .keyed_by(|e| e.payload["key"].as_str().map(str::to_string));
    let (effect, witness) = guarded(&event, guard, effects.clone(), witnessed.clone());
    let consumer = env
        .start(
            1,
            Service::builder(env.name("consumer"), "1")
                .subscription(effect)
                .subscription(witness),
        )
        .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    for key in ["order-1", "order-1", "order-1", "order-2", "sentinel"] {
        publisher
            .emit(&event, json!({ "key": key }))
            .await
            .expect("emit succeeds");
    }
    let _ = witnessed
        .wait_until(ARRIVAL, |w| w.iter().collect::<BTreeSet<_>>().len() >= 5)
        .await;
    sentinel_arrives(&effects).await;
    handlers_finished(&consumer).await;
    let got = effects.snapshot();
    let runs = got.iter().filter(|k| *k == "order-1").count();
    assert_eq!(
        runs, 1,
        "three messages with one business key ran the side effect {runs} times"
    );
    assert_eq!(
        got.iter().filter(|k| *k == "order-2").count(),
        1,
        "a message with another key did not run exactly once"
    );
    env.finish().await;
}
