//! A failed `Service::start` leaves nothing behind (issue 8, defect 1): every registration made
//! before the failing one is undone, no queue worker keeps running, and the lifecycle messages
//! say the service is gone (`infoServiceNotReady` with the reason, then `infoServiceShutdown`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_bridge_default::{MemoryBroker, MemoryQueueBridge};
use purista_core::{
    Address, AddressFilter, CommandDef, Context, Empty, EventBridge, JobContext, MessageType,
    QueueBridge, QueueWorkerDef, RunningService, Service, StartError, StatusCode, StreamDef,
    StreamWriter, SubscriptionContext, SubscriptionDef, SubscriptionFilter,
};
use serde_json::Value;
use tokio::time::Instant;

use common::eventually;

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// Starts a service on a fresh instance of `broker`.
async fn start_on(broker: &MemoryBroker, service: Service) -> RunningService {
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    service.start(bridge).await.expect("start")
}

/// A service that records every info message `watched` sends.
async fn lifecycle_observer(
    broker: &MemoryBroker,
    watched: &str,
) -> (RunningService, Arc<Mutex<Vec<MessageType>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let observer = Service::builder("observer", "1").subscription(
        SubscriptionDef::new("lifecycle", move |ctx: SubscriptionContext, _v: Value| {
            let record = record.clone();
            async move {
                if let Some(e) = ctx.envelope()
                    && e.message_type.is_info()
                {
                    record.lock().push(e.message_type);
                }
                Ok(())
            }
        })
        .filter(SubscriptionFilter::new().sent_from(AddressFilter {
            service_name: Some(watched.to_string()),
            ..AddressFilter::default()
        }))
        .prefetch(1),
    );
    (start_on(broker, observer.build()).await, seen)
}

#[tokio::test]
async fn a_failed_start_unregisters_what_it_registered_and_says_the_service_is_gone() {
    let broker = MemoryBroker::new();
    let (caller, lifecycle) = lifecycle_observer(&broker, "inventory").await;

    // An instance already serving the subscription `inventory@1/onOrder`: registering it a
    // second time on that instance is refused by the bridge, after the command and the stream
    // of the second definition were registered.
    let instance: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    let delivered = Arc::new(Mutex::new(0usize));
    let count = delivered.clone();
    let first = Service::builder("inventory", "1")
        .subscription(
            SubscriptionDef::new("onOrder", move |_ctx: SubscriptionContext, _v: Value| {
                let count = count.clone();
                async move {
                    *count.lock() += 1;
                    Ok(())
                }
            })
            .event_name("orderPlaced"),
        )
        .build()
        .start(instance.clone())
        .await
        .expect("the first definition starts");
    eventually("the first start's infoServiceReady", || {
        lifecycle.lock().last() == Some(&MessageType::InfoServiceReady)
    })
    .await;
    lifecycle.lock().clear();

    let second = Service::builder("inventory", "1")
        .command(CommandDef::new(
            "reserve",
            |_ctx: Context, _i: Empty, _p: Empty| async move { Ok("reserved") },
        ))
        .stream(StreamDef::new(
            "feed",
            |_ctx: Context, _i: Empty, _p: Empty, _out: StreamWriter| async move { Ok(()) },
        ))
        .subscription(
            SubscriptionDef::new(
                "onOrder",
                |_ctx: SubscriptionContext, _v: Value| async move { Ok(()) },
            )
            .event_name("orderPlaced"),
        )
        .build();
    let err = match second.start(instance.clone()).await {
        Ok(_) => panic!("a start whose subscription is refused must fail"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, StartError::Registration { registration, .. } if registration.contains("onOrder")),
        "{err}"
    );

    // Nobody serves what the failed start registered.
    let invoked = caller
        .invoke::<String>(Address::new("inventory", "1", "reserve"), Empty, Empty)
        .await;
    assert_eq!(
        invoked.map_err(|e| e.status),
        Err(StatusCode::BAD_GATEWAY),
        "the command of a failed start must not be served"
    );
    let opened = caller
        .open_stream(Address::new("inventory", "1", "feed"), Empty, Empty, None)
        .await;
    assert_eq!(
        opened.err().map(|e| e.status),
        Some(StatusCode::BAD_GATEWAY),
        "the stream of a failed start must not be served"
    );

    // The lifecycle messages end with "not ready" and "shut down".
    eventually("infoServiceShutdown after the failed start", || {
        lifecycle.lock().last() == Some(&MessageType::InfoServiceShutdown)
    })
    .await;
    assert_eq!(
        *lifecycle.lock(),
        vec![
            MessageType::InfoServiceInit,
            // The command, then the stream (PURISTA announces both).
            MessageType::InfoServiceFunctionAdded,
            MessageType::InfoServiceFunctionAdded,
            MessageType::InfoServiceNotReady,
            MessageType::InfoServiceShutdown,
        ]
    );

    // What the failed start did not register stays: the first definition still gets events.
    caller.emit("orderPlaced", "o-1").await.expect("emit");
    eventually("the first definition's delivery", || *delivered.lock() == 1).await;

    first.shutdown(deadline()).await;
    caller.shutdown(deadline()).await;
}

#[tokio::test]
async fn a_failed_start_leaves_no_queue_worker_running() {
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let handled_by = Arc::new(Mutex::new(Vec::<&'static str>::new()));

    let worker = |who: &'static str, queue: &str| {
        let handled_by = handled_by.clone();
        QueueWorkerDef::new(queue, move |_ctx: JobContext, _i: Value, _p: Empty| {
            let handled_by = handled_by.clone();
            async move {
                handled_by.lock().push(who);
                Ok(())
            }
        })
        .lease_wait(Duration::from_millis(50))
    };

    // The second worker's queue name is invalid, so the start fails after the first worker's
    // queue was declared.
    let failed = Service::builder("mailer", "1")
        .queue_bridge(queues.clone())
        .queue_worker(worker("failed start", "emails"))
        .queue_worker(worker("failed start", ""))
        .build();
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    let err = match failed.start(bridge).await {
        Ok(_) => panic!("a worker on an empty queue name must fail the start"),
        Err(e) => e,
    };
    assert!(matches!(err, StartError::Queue { .. }), "{err}");

    queues
        .enqueue("emails", Default::default())
        .await
        .expect("enqueue");
    let sentinel = start_on(
        &broker,
        Service::builder("mailer", "1")
            .queue_bridge(queues.clone())
            .queue_worker(worker("sentinel", "emails"))
            .build(),
    )
    .await;
    eventually("the job to be handled", || !handled_by.lock().is_empty()).await;
    assert_eq!(*handled_by.lock(), vec!["sentinel"]);
    sentinel.shutdown(deadline()).await;
}
