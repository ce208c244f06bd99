//! Shutdown awaits its queue workers (issue 8, defect 6): when `RunningService::shutdown`
//! returns, no worker task of the service is left running, also when a job outlived the drain
//! deadline (it is aborted and awaited, and its lease expires for another worker).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use purista_bridge_default::{MemoryBroker, MemoryQueueBridge};
use purista_core::{
    Empty, EventBridge, JobContext, QueueBridge, QueueWorkerDef, Service, WorkerMode,
};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

struct Dropped(Arc<AtomicBool>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_job_still_running_at_the_deadline_is_ended_before_shutdown_returns() {
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let ended = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Notify::new());
    let (flag, running) = (ended.clone(), started.clone());
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    let service = Service::builder("reports", "1")
        .queue_bridge(queues.clone())
        .queue_worker(
            QueueWorkerDef::new("renders", move |_ctx: JobContext, _v: Value, _p: Empty| {
                let guard = Dropped(flag.clone());
                let running = running.clone();
                async move {
                    let _guard = guard;
                    running.notify_one();
                    std::future::pending::<()>().await;
                    Ok(())
                }
            })
            .lease_wait(Duration::from_millis(50)),
        )
        .build()
        .start(bridge)
        .await
        .expect("start");
    queues
        .enqueue("renders", Default::default())
        .await
        .expect("enqueue");
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .expect("the job starts");

    let report = service
        .shutdown(Instant::now() + Duration::from_millis(100))
        .await;
    assert!(
        !report.completed,
        "the job outlived the deadline: {report:?}"
    );
    assert!(
        ended.load(Ordering::SeqCst),
        "the job's handler must be ended when shutdown returns"
    );
}

#[tokio::test]
async fn jobs_of_a_continuous_worker_still_running_at_the_deadline_are_ended_before_shutdown_returns()
 {
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (count_ended, count_started) = (ended.clone(), started.clone());
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    let service = Service::builder("reports", "1")
        .queue_bridge(queues.clone())
        .queue_worker(
            QueueWorkerDef::new("renders", move |_ctx: JobContext, _v: Value, _p: Empty| {
                struct Counted(Arc<std::sync::atomic::AtomicUsize>);
                impl Drop for Counted {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let guard = Counted(count_ended.clone());
                count_started.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                    Ok(())
                }
            })
            .mode(WorkerMode::Continuous { concurrency: 3 })
            .lease_wait(Duration::from_millis(50)),
        )
        .build()
        .start(bridge)
        .await
        .expect("start");
    for _ in 0..3 {
        queues
            .enqueue("renders", Default::default())
            .await
            .expect("enqueue");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while started.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the jobs did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let report = service
        .shutdown(Instant::now() + Duration::from_millis(100))
        .await;
    assert!(
        !report.completed,
        "the jobs outlived the deadline: {report:?}"
    );
    assert_eq!(
        ended.load(Ordering::SeqCst),
        3,
        "every running job must be ended when shutdown returns"
    );
}
