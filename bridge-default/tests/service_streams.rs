//! The stream session deadline and the consumer's cancel bind the producer too (issue 8,
//! defect 3): a producer handler that neither finishes nor looks at its writer is ended by the
//! runtime, its in-flight count released, and a drain no longer waits for it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use purista_bridge_default::MemoryBroker;
use purista_core::{
    Address, Context, Empty, EventBridge, RunningService, Service, StreamDef, StreamItem,
    StreamWriter,
};
use tokio::time::Instant;

use common::eventually;

/// Sets its flag when dropped: tells that the runtime dropped the producer's future.
struct Dropped(Arc<AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A producer that writes one chunk and then waits forever, ignoring cancel and deadline.
async fn stubborn_producer(broker: &MemoryBroker) -> (RunningService, Arc<AtomicBool>) {
    let ended = Arc::new(AtomicBool::new(false));
    let flag = ended.clone();
    let service = Service::builder("reports", "1")
        .stream(StreamDef::new(
            "export",
            move |_ctx: Context, _i: Empty, _p: Empty, out: StreamWriter| {
                let guard = Dropped(flag.clone());
                async move {
                    let _guard = guard;
                    out.write(1).await?;
                    std::future::pending::<()>().await;
                    Ok(())
                }
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("producer starts");
    (service, ended)
}

async fn consumer(broker: &MemoryBroker) -> RunningService {
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    Service::builder("dashboard", "1")
        .build()
        .start(bridge)
        .await
        .expect("consumer starts")
}

fn export() -> Address {
    Address::new("reports", "1", "export")
}

#[tokio::test]
async fn the_session_deadline_ends_a_producer_even_when_the_consumer_never_reads() {
    let broker = MemoryBroker::new();
    let (producer, ended) = stubborn_producer(&broker).await;
    let consumer = consumer(&broker).await;

    let reader = consumer
        .open_stream(export(), Empty, Empty, Some(Duration::from_millis(200)))
        .await
        .expect("open");
    eventually("the producer to be ended at the session deadline", || {
        ended.load(Ordering::SeqCst)
    })
    .await;
    eventually("the producer's in-flight count to be released", || {
        producer.in_flight().by_kind.stream == 0
    })
    .await;
    let report = producer
        .shutdown(Instant::now() + Duration::from_millis(200))
        .await;
    assert!(
        report.completed && report.still_running.is_empty(),
        "a drain must not wait for an ended session: {report:?}"
    );
    drop(reader);
    consumer
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
}

#[tokio::test]
async fn a_consumer_cancel_ends_a_producer_that_ignores_it() {
    let broker = MemoryBroker::new();
    let (producer, ended) = stubborn_producer(&broker).await;
    let consumer = consumer(&broker).await;

    let mut reader = consumer
        .open_stream(export(), Empty, Empty, Some(Duration::from_secs(30)))
        .await
        .expect("open");
    assert_eq!(reader.next().await, Some(StreamItem::Chunk(1.into())));
    reader.cancel("not needed any more");
    eventually("the producer to be ended by the cancel", || {
        ended.load(Ordering::SeqCst)
    })
    .await;
    assert_eq!(
        reader.next().await,
        Some(StreamItem::Cancelled("not needed any more".into())),
        "the session ends in cancel"
    );
    eventually("the producer's in-flight count to be released", || {
        producer.in_flight().by_kind.stream == 0
    })
    .await;
    producer
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
    consumer
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
}

#[tokio::test]
async fn the_producer_learns_the_session_deadline_from_the_open_frame() {
    let broker = MemoryBroker::new();
    let learned = Arc::new(parking_lot::Mutex::new(None::<Option<Instant>>));
    let record = learned.clone();
    let producer = Service::builder("reports", "1")
        .stream(StreamDef::new(
            "export",
            move |_ctx: Context, _i: Empty, _p: Empty, out: StreamWriter| {
                *record.lock() = Some(out.deadline());
                async move { Ok(()) }
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("producer starts");
    let consumer = consumer(&broker).await;

    let opened_at = Instant::now();
    let mut reader = consumer
        .open_stream(export(), Empty, Empty, Some(Duration::from_secs(7)))
        .await
        .expect("open");
    assert_eq!(reader.next().await, Some(StreamItem::Complete(None)));
    let deadline = learned
        .lock()
        .expect("the handler ran")
        .expect("the writer knows the deadline");
    let expected = opened_at + Duration::from_secs(7);
    assert!(
        deadline >= expected && deadline <= expected + Duration::from_secs(1),
        "the producer's deadline is the consumer's: {:?} after opening",
        deadline - opened_at
    );
    producer
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
    consumer
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
}
