//! Delays past SQS's longest (`DelaySeconds` takes at most 15 minutes): a job due later is not
//! leased; the instance that receives it sends it on with the rest of its delay, so SQS holds
//! it as delayed again. A lease SQS cannot cover is refused when the queue is declared.

mod common;

use std::time::Duration;

use purista_bridge_aws::AwsBridge;
use purista_core::envelope::now_ms;
use purista_core::{QueueBridge, QueueConfig, QueueDeclaration, QueueError};
use serde_json::json;

common::runner::test_main! {
    common::ENDPOINT: [
        a_job_due_after_sqs_longest_delay_is_sent_on_not_leased,
        a_lease_longer_than_sqs_can_hide_a_message_is_refused_at_declaration,
    ],
}

async fn a_job_due_after_sqs_longest_delay_is_sent_on_not_leased() {
    let endpoint = common::endpoint();
    let prefix = common::prefix();
    let bridge = AwsBridge::new(common::config(&endpoint, &prefix))
        .await
        .unwrap();
    let jobs = bridge.queue_bridge();
    jobs.declare_queue(
        "later",
        QueueDeclaration::new("delays@1", QueueConfig::default()),
    )
    .await
    .unwrap();
    let url = bridge
        .sqs()
        .get_queue_url()
        .queue_name(bridge.names().job_queue("later").unwrap())
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    // A copy at the end of SQS's 15 minutes that still has 20 minutes to go: visible now, as a
    // copy of a long delay is when SQS releases it.
    let due = now_ms() + 20 * 60 * 1000;
    let body = json!({
        "id": "j-later", "queue": "later", "payload": {"n": 1}, "parameter": null,
        "attempt": 2, "enqueuedAtMs": now_ms(), "visibleAtMs": due
    });
    bridge
        .sqs()
        .send_message()
        .queue_url(&url)
        .message_body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        jobs.lease("later", Duration::from_secs(2))
            .await
            .unwrap()
            .is_none(),
        "a job due in 20 minutes was leased"
    );
    // Sent on: delayed by SQS, nothing ready, nothing leased, nothing dead.
    let m = jobs.metrics("later").await.unwrap();
    assert_eq!(
        (m.depth, m.leased, m.delayed, m.dead_lettered),
        (0, 0, 1, 0),
        "{m:?}"
    );
    jobs.shutdown().await;
    common::remove_all(&bridge).await;
}

async fn a_lease_longer_than_sqs_can_hide_a_message_is_refused_at_declaration() {
    let endpoint = common::endpoint();
    let prefix = common::prefix();
    let bridge = AwsBridge::new(common::config(&endpoint, &prefix))
        .await
        .unwrap();
    let jobs = bridge.queue_bridge();
    let declare = |hours: u64| {
        QueueDeclaration::new(
            "long@1",
            QueueConfig {
                visibility_timeout: Duration::from_secs(hours * 3600),
                ..QueueConfig::default()
            },
        )
    };
    match jobs.declare_queue("long", declare(12)).await {
        Err(QueueError::InvalidRequest(m)) => assert!(m.contains("43200"), "{m}"),
        other => panic!("a 12 h lease (plus the margin) was declared: {other:?}"),
    }
    jobs.declare_queue("long", declare(11)).await.unwrap();
    jobs.shutdown().await;
    common::remove_all(&bridge).await;
}
