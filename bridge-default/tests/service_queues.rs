//! Declaring one queue twice (issue 8, defect 4): identical declarations are fine; a different
//! config is a typed error naming both declarations, and the second service does not start.

use std::sync::Arc;
use std::time::Duration;

use purista_bridge_default::{MemoryBroker, MemoryQueueBridge};
use purista_core::{
    Empty, EventBridge, JobContext, QueueConfig, QueueError, QueueWorkerDef, Service, StartError,
};
use serde_json::Value;
use tokio::time::Instant;

fn worker_config() -> QueueConfig {
    QueueConfig {
        visibility_timeout: Duration::from_secs(30),
        max_attempts: 3,
        ..QueueConfig::default()
    }
}

fn mailer(queues: &Arc<MemoryQueueBridge>) -> Service {
    Service::builder("mailer", "1")
        .queue_bridge(queues.clone())
        .queue_worker(
            QueueWorkerDef::new(
                "emails",
                |_ctx: JobContext, _v: Value, _p: Empty| async move { Ok(()) },
            )
            .config(worker_config()),
        )
        .build()
}

fn bridge(broker: &MemoryBroker) -> Arc<dyn EventBridge> {
    Arc::new(broker.bridge())
}

#[tokio::test]
async fn a_second_declaration_with_another_config_fails_the_start_naming_both() {
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let worker = mailer(&queues)
        .start(bridge(&broker))
        .await
        .expect("the worker's service starts");

    // A service that only enqueues, declaring the queue with the default config.
    let shop = Service::builder("shop", "1")
        .queue_bridge(queues.clone())
        .declare_queue("emails", QueueConfig::default())
        .build();
    let err = match shop.start(bridge(&broker)).await {
        Ok(_) => panic!("a conflicting declaration must fail the start"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        matches!(
            &err,
            StartError::Queue {
                queue,
                source: QueueError::ConflictingDeclaration { first, second, .. },
            } if queue == "emails" && first == "mailer@1" && second == "shop@1"
        ),
        "{text}"
    );
    assert!(
        text.contains("mailer@1") && text.contains("shop@1"),
        "the message names both declarations: {text}"
    );

    // The first declaration still holds.
    let declared = queues.declaration("emails").expect("declared");
    assert_eq!(declared.config, worker_config());
    worker
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
}

#[tokio::test]
async fn identical_declarations_of_one_queue_are_fine() {
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let first = mailer(&queues).start(bridge(&broker)).await.expect("first");
    let second = mailer(&queues)
        .start(bridge(&broker))
        .await
        .expect("a second instance with the same config starts");
    let deadline = Instant::now() + Duration::from_secs(1);
    first.shutdown(deadline).await;
    second.shutdown(deadline).await;
}
