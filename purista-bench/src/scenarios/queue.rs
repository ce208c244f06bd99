//! `queue`: jobs enqueued by one service and completed by another service's queue worker.
//!
//! The clock runs from the first enqueue until the last job is settled: the handlers have all
//! run *and* the queue reports nothing ready or leased, so the final settlements are included.

use anyhow::{Context as _, anyhow, bail};
use purista::prelude::*;
use purista::{Connection, QueueConfig};
use tokio::time::Instant;

use super::Deployment;
use crate::drive::{Progress, STUCK_AFTER};
use crate::measurement::Measurement;
use crate::payload::Payload;
use crate::workload::{QueueMode, Scenario, Workload};

/// Runs `queue`: `queue_jobs` jobs through one worker in `mode`.
pub async fn run(
    deployment: &mut Deployment,
    workload: &Workload,
    mode: QueueMode,
) -> anyhow::Result<Measurement> {
    let queue = deployment.name("jobs");
    let completed = Progress::new();

    let worker_connection = deployment.connect().await?;
    let queues = queue_bridge(&worker_connection)?;
    let counter = completed.clone();
    let worker = QueueWorkerDef::new(
        queue.as_str(),
        move |_job: JobContext, _p: Payload, _: Empty| {
            let counter = counter.clone();
            async move {
                counter.add_one();
                Ok(())
            }
        },
    )
    .mode(mode.worker_mode());
    deployment
        .start(
            Service::builder(deployment.name("worker"), "1")
                .queue_worker(worker)
                .queue_bridge(queues.clone())
                .build(),
            &worker_connection,
        )
        .await?;

    let producer_connection = deployment.connect().await?;
    let producer = deployment
        .start(
            Service::builder(deployment.name("producer"), "1")
                .declare_queue(queue.as_str(), QueueConfig::default())
                .queue_bridge(queue_bridge(&producer_connection)?)
                .build(),
            &producer_connection,
        )
        .await?;
    let enqueue_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            producer
                .enqueue(&queue, Payload::new(seq), Empty)
                .await
                .with_context(|| format!("enqueueing job #{seq} on `{queue}`"))?;
        }
        Ok(())
    };

    // Warm-up doubles as the readiness check: the worker is leasing before timing starts.
    let warmup = workload.warmup;
    completed.expect(warmup);
    enqueue_all(0, warmup).await?;
    completed.wait("queue warm-up jobs").await?;
    settled(queues.as_ref(), &queue).await?;

    let jobs = workload.queue_jobs;
    completed.expect(warmup + jobs);
    let start = Instant::now();
    enqueue_all(warmup, jobs).await?;
    let enqueued = start.elapsed();
    completed.wait("queue jobs").await?;
    settled(queues.as_ref(), &queue).await?;
    let elapsed = start.elapsed();
    Ok(
        Measurement::new(&deployment.bridge_name(), Scenario::Queue, jobs, elapsed).with_note(
            format!(
                "worker {mode}; all enqueued after {:.1} ms",
                enqueued.as_secs_f64() * 1e3
            ),
        ),
    )
}

fn queue_bridge(connection: &Connection) -> anyhow::Result<std::sync::Arc<dyn QueueBridge>> {
    connection.queues.clone().ok_or_else(|| {
        anyhow!(
            "bridge `{}` has no queue bridge, which the queue scenario needs",
            connection.events.name()
        )
    })
}

/// Waits until `queue` has nothing ready and nothing leased: every job is settled.
async fn settled(queues: &dyn QueueBridge, queue: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + STUCK_AFTER;
    loop {
        let m = queues
            .metrics(queue)
            .await
            .with_context(|| format!("reading the metrics of `{queue}`"))?;
        if m.depth == 0 && m.leased == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "queue `{queue}`: {} jobs still ready and {} leased after every handler ran",
                m.depth,
                m.leased
            );
        }
        tokio::task::yield_now().await;
    }
}
