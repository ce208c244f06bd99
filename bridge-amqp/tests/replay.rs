//! Replaying subscription dead letters on RabbitMQ: back to the queue they came from, with a
//! fresh retry budget, and nothing that cannot be replayed leaves the dead-letter queue.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use purista_bridge_amqp::AmqpBridge;
use purista_core::{
    BridgeError, Envelope, EventBridge, Outcome, SenderAddress, SubscriptionFilter,
    SubscriptionSpec,
};
use purista_core::{LeftDeadLetter, NotReplayed, SubscriptionOperator};
use serde_json::json;

use common::{Recorder, dead_letters, eventually, spec};

common::runner::test_main! {
    common::BROKER: [
        a_replayed_dead_letter_comes_back_as_attempt_one_and_leaves_the_queue,
        a_replayed_message_that_still_fails_gets_every_attempt_again,
        a_replay_reaches_only_the_subscription_it_was_dead_lettered_from,
        undecodable_and_orphaned_dead_letters_stay_in_the_queue_with_their_reasons,
        a_dead_letter_without_its_source_queue_stays_and_says_so,
        a_replay_takes_at_most_limit_messages,
        a_replay_of_a_missing_dead_letter_queue_is_empty,
        a_replay_refuses_an_invalid_target,
        a_replay_needs_a_connection,
        purge_deletes_every_dead_letter_of_a_target_and_an_unknown_target_purges_nothing,
    ],
}

const WAIT: Duration = Duration::from_secs(10);

fn event(n: usize) -> Envelope {
    let sender = SenderAddress {
        service_name: "shop".into(),
        service_version: "1".into(),
        service_target: "sell".into(),
        instance_id: String::new(),
    };
    Envelope::custom(sender, "sold", json!({ "n": n }))
}

fn sold() -> SubscriptionFilter {
    SubscriptionFilter::new().event_name("sold")
}

/// A handler for `spec` that answers `failure` until the test flips the returned switch (the
/// cause is "fixed"), and acks from then on.
fn failing_until_fixed(
    spec: &SubscriptionSpec,
    failure: Outcome,
) -> (Arc<Recorder>, Arc<AtomicBool>) {
    let fixed = Arc::new(AtomicBool::new(false));
    let flag = fixed.clone();
    let recorder = Recorder::deciding(spec, move |_, _| {
        if flag.load(Ordering::SeqCst) {
            Outcome::Ack
        } else {
            failure.clone()
        }
    });
    (recorder, fixed)
}

async fn dead_letter_count(bridge: &AmqpBridge, target: &str) -> usize {
    bridge
        .inspect_dead_letters(target, 100)
        .await
        .expect("dead letters readable")
        .len()
}

async fn a_replayed_dead_letter_comes_back_as_attempt_one_and_leaves_the_queue() {
    let broker = common::TestBroker::new("replay_fresh");
    let (bridge, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut spec = spec("onSold", sold());
    spec.policy.max_attempts = 3;
    spec.policy.dead_letter_target = Some("sold-failed".into());
    let (recorder, fixed) = failing_until_fixed(&spec, Outcome::retry());
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();

    publisher.emit(event(1)).await.unwrap();
    assert!(eventually(WAIT, || recorder.count() == 3).await);
    let entries = dead_letters(&bridge, "sold-failed", 1).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].note.attempts, 3);

    fixed.store(true, Ordering::SeqCst);
    let report = bridge.replay_dead_letters("sold-failed", 10).await.unwrap();
    assert_eq!(report.replayed, 1);
    assert!(report.left.is_empty(), "{:?}", report.left);

    assert!(eventually(WAIT, || recorder.count() == 4).await);
    let seen = recorder.seen();
    assert_eq!(seen[3].envelope.id, seen[0].envelope.id, "the same message");
    assert_eq!(seen[3].envelope.payload, json!({"n": 1}));
    assert_eq!(seen[3].attempt, 1, "a fresh retry budget");
    assert_eq!(dead_letter_count(&bridge, "sold-failed").await, 0);
    let queue = bridge.topology().subscription_queue(&spec).unwrap();
    assert_eq!(broker.ready_messages(&queue).await, Some(0), "acked");
    broker.finish().await;
}

async fn a_replayed_message_that_still_fails_gets_every_attempt_again() {
    let broker = common::TestBroker::new("replay_budget");
    let (bridge, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut spec = spec("onSold", sold());
    spec.policy.max_attempts = 3;
    spec.policy.dead_letter_target = Some("sold-failed".into());
    let recorder = Recorder::deciding(&spec, |_, _| Outcome::retry());
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();

    publisher.emit(event(1)).await.unwrap();
    assert!(eventually(WAIT, || recorder.count() == 3).await);
    assert_eq!(dead_letters(&bridge, "sold-failed", 1).await.len(), 1);

    let report = bridge.replay_dead_letters("sold-failed", 10).await.unwrap();
    assert_eq!(report.replayed, 1);
    assert!(eventually(WAIT, || recorder.count() == 6).await);
    let attempts: Vec<u32> = recorder.seen().iter().map(|s| s.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 1, 2, 3]);

    let entries = dead_letters(&bridge, "sold-failed", 1).await;
    assert_eq!(entries.len(), 1, "dead-lettered a second time");
    assert_eq!(entries[0].note.attempts, 3);
    assert_eq!(
        entries[0].note.reason,
        "retries exhausted after 3 attempt(s)"
    );
    broker.finish().await;
}

async fn a_replay_reaches_only_the_subscription_it_was_dead_lettered_from() {
    let broker = common::TestBroker::new("replay_one_queue");
    let (bridge, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut failing = spec("onSold", sold());
    failing.policy.dead_letter_target = Some("sold-failed".into());
    let (failing_recorder, fixed) =
        failing_until_fixed(&failing, Outcome::dead_letter("downstream rejected it"));
    let audit = spec("audit", sold());
    let audit_recorder = Recorder::acking(&audit);
    bridge
        .register_subscription(failing.clone(), failing_recorder.clone())
        .await
        .unwrap();
    bridge
        .register_subscription(audit.clone(), audit_recorder.clone())
        .await
        .unwrap();

    publisher.emit(event(1)).await.unwrap();
    assert!(eventually(WAIT, || audit_recorder.count() == 1).await);
    assert_eq!(dead_letters(&bridge, "sold-failed", 1).await.len(), 1);
    let original = audit_recorder.ids()[0].clone();

    fixed.store(true, Ordering::SeqCst);
    let report = bridge.replay_dead_letters("sold-failed", 10).await.unwrap();
    assert_eq!(report.replayed, 1);
    assert!(eventually(WAIT, || failing_recorder.count() == 2).await);

    // A later event reaches the audit queue after anything routed there before it.
    publisher.emit(event(2)).await.unwrap();
    assert!(
        eventually(WAIT, || audit_recorder.count() >= 2
            && failing_recorder.count() == 3)
        .await
    );
    let audit_ids = audit_recorder.ids();
    assert_eq!(audit_ids.len(), 2, "{audit_ids:?}");
    assert_eq!(
        audit_ids.iter().filter(|id| **id == original).count(),
        1,
        "the audit subscription saw the original only"
    );
    broker.finish().await;
}

async fn undecodable_and_orphaned_dead_letters_stay_in_the_queue_with_their_reasons() {
    let broker = common::TestBroker::new("replay_left");
    let bridge = broker.bridge().await;
    let mut poisoned = spec("onSold", sold());
    poisoned.policy.dead_letter_target = Some("sold-failed".into());
    let poisoned_recorder = Recorder::acking(&poisoned);
    let mut orphan = spec("onSoldGone", sold());
    orphan.policy.dead_letter_target = Some("sold-failed".into());
    let orphan_recorder = Recorder::deciding(&orphan, |_, _| Outcome::dead_letter("broken"));
    bridge
        .register_subscription(poisoned.clone(), poisoned_recorder.clone())
        .await
        .unwrap();
    bridge
        .register_subscription(orphan.clone(), orphan_recorder.clone())
        .await
        .unwrap();

    broker
        .publish_into(
            &bridge.topology().subscription_queue(&poisoned).unwrap(),
            &[b"{not an envelope"],
        )
        .await;
    bridge.emit(event(1)).await.unwrap();
    assert!(eventually(WAIT, || orphan_recorder.count() == 1).await);
    let orphan_id = orphan_recorder.ids()[0].clone();
    assert_eq!(dead_letters(&bridge, "sold-failed", 2).await.len(), 2);

    // The orphan's subscription goes away, queue and all.
    bridge.unregister_subscription(&orphan.key).await.unwrap();
    let orphan_queue = bridge.topology().subscription_queue(&orphan).unwrap();
    let conn = broker.raw_connection().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(orphan_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "OK".into()).await;

    let report = bridge.replay_dead_letters("sold-failed", 10).await.unwrap();
    assert_eq!(report.replayed, 0, "{report:?}");
    assert_eq!(report.left.len(), 2, "{report:?}");
    assert!(report.left.contains(&LeftDeadLetter {
        message_id: None,
        reason: NotReplayed::Undecodable,
    }));
    assert!(report.left.contains(&LeftDeadLetter {
        message_id: Some(orphan_id),
        reason: NotReplayed::SourceGone {
            source: orphan_queue.clone(),
        },
    }));
    let gone = NotReplayed::SourceGone {
        source: orphan_queue.clone(),
    };
    assert!(gone.to_string().contains(&orphan_queue));

    assert_eq!(
        dead_letter_count(&bridge, "sold-failed").await,
        2,
        "both stay"
    );
    // The event reaches the other subscription; the poison message never does.
    assert!(eventually(WAIT, || poisoned_recorder.count() == 1).await);
    broker.finish().await;
}

async fn a_dead_letter_without_its_source_queue_stays_and_says_so() {
    let broker = common::TestBroker::new("replay_unknown_source");
    let bridge = broker.bridge().await;
    let mut spec = spec("onSold", sold());
    spec.policy.dead_letter_target = Some("sold-failed".into());
    let recorder = Recorder::deciding(&spec, |_, _| Outcome::dead_letter("broken"));
    bridge
        .register_subscription(spec.clone(), recorder)
        .await
        .unwrap();
    // As an older bridge dead-lettered it: no source-queue header.
    let legacy = event(1);
    let dead_letter_queue = bridge.topology().dead_letter_queue("sold-failed").unwrap();
    broker
        .publish_into(&dead_letter_queue, &[&legacy.encode()])
        .await;

    let report = bridge.replay_dead_letters("sold-failed", 10).await.unwrap();
    assert_eq!(report.replayed, 0);
    assert_eq!(
        report.left,
        [LeftDeadLetter {
            message_id: Some(legacy.id.clone()),
            reason: NotReplayed::UnknownSource,
        }]
    );
    assert_eq!(dead_letter_count(&bridge, "sold-failed").await, 1);
    broker.finish().await;
}

async fn a_replay_takes_at_most_limit_messages() {
    let broker = common::TestBroker::new("replay_limit");
    let (bridge, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut spec = spec("onSold", sold());
    spec.policy.dead_letter_target = Some("sold-failed".into());
    let (recorder, fixed) = failing_until_fixed(&spec, Outcome::dead_letter("not yet"));
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    for n in 0..3 {
        publisher.emit(event(n)).await.unwrap();
    }
    assert_eq!(dead_letters(&bridge, "sold-failed", 3).await.len(), 3);

    fixed.store(true, Ordering::SeqCst);
    let report = bridge.replay_dead_letters("sold-failed", 2).await.unwrap();
    assert_eq!(report.replayed, 2);
    assert!(report.left.is_empty());
    assert_eq!(dead_letter_count(&bridge, "sold-failed").await, 1);
    assert!(eventually(WAIT, || recorder.count() == 5).await);

    let rest = bridge.replay_dead_letters("sold-failed", 10).await.unwrap();
    assert_eq!(rest.replayed, 1);
    assert!(eventually(WAIT, || recorder.count() == 6).await);
    assert_eq!(dead_letter_count(&bridge, "sold-failed").await, 0);
    broker.finish().await;
}

async fn a_replay_of_a_missing_dead_letter_queue_is_empty() {
    let broker = common::TestBroker::new("replay_missing");
    let bridge = broker.bridge().await;
    let report = bridge
        .replay_dead_letters("nothing-here", 10)
        .await
        .unwrap();
    assert_eq!(report.replayed, 0);
    assert!(report.left.is_empty());
    broker.finish().await;
}

async fn a_replay_refuses_an_invalid_target() {
    let broker = common::TestBroker::new("replay_invalid");
    let bridge = broker.bridge().await;
    for target in [String::new(), "x".repeat(300)] {
        let error = bridge.replay_dead_letters(&target, 1).await.unwrap_err();
        assert!(matches!(error, BridgeError::InvalidRequest(_)), "{error:?}");
    }
    broker.finish().await;
}

async fn a_replay_needs_a_connection() {
    let broker = common::TestBroker::new("replay_unconnected");
    let bridge = AmqpBridge::new(broker.config()).unwrap();
    let error = bridge
        .replay_dead_letters("sold-failed", 1)
        .await
        .unwrap_err();
    assert!(matches!(error, BridgeError::Unavailable(_)), "{error:?}");
    broker.finish().await;
}

async fn purge_deletes_every_dead_letter_of_a_target_and_an_unknown_target_purges_nothing() {
    let broker = common::TestBroker::new("purge");
    let (bridge, publisher) = (broker.bridge().await, broker.bridge().await);
    let mut spec = spec("onSold", sold());
    spec.policy.dead_letter_target = Some("sold-failed".into());
    let recorder = Recorder::deciding(&spec, |_, _| Outcome::dead_letter("rejected"));
    bridge
        .register_subscription(spec.clone(), recorder.clone())
        .await
        .unwrap();
    for n in 0..3 {
        publisher.emit(event(n)).await.unwrap();
    }
    assert_eq!(dead_letters(&bridge, "sold-failed", 3).await.len(), 3);

    assert_eq!(bridge.purge_dead_letters("sold-failed").await.unwrap(), 3);
    assert_eq!(dead_letter_count(&bridge, "sold-failed").await, 0);
    assert_eq!(bridge.purge_dead_letters("never-used").await.unwrap(), 0);
    assert!(
        bridge.is_connected(),
        "a missing queue does not cost the connection"
    );
    broker.finish().await;
}
