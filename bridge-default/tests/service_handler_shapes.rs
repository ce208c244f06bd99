//! Handlers without a parameter need no `Empty` filler (issue 8): a command, a stream producer
//! and a job handler each run with the shorter shape, and the longer one still gets the
//! parameter.

mod common;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_bridge_default::{MemoryBroker, MemoryQueueBridge};
use purista_core::{
    Address, CommandDef, Context, Empty, EventBridge, JobContext, QueueBridge, QueueWorkerDef,
    Service, StreamDef, StreamItem, StreamWriter,
};
use serde_json::json;
use tokio::time::Instant;

use common::eventually;

#[tokio::test]
async fn commands_streams_and_jobs_run_with_and_without_a_parameter() {
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let (short_jobs, long_jobs) = (jobs.clone(), jobs.clone());
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    let service = Service::builder("shapes", "1")
        .queue_bridge(queues.clone())
        .command(CommandDef::new(
            "short",
            |_ctx: Context, n: u32| async move { Ok(n + 1) },
        ))
        .command(CommandDef::new(
            "long",
            |_ctx: Context, n: u32, by: u32| async move { Ok(n + by) },
        ))
        .stream(StreamDef::new(
            "count",
            |_ctx: Context, to: u32, out: StreamWriter| async move {
                for i in 0..to {
                    out.write(i).await?;
                }
                Ok(())
            },
        ))
        .stream(StreamDef::new(
            "countFrom",
            |_ctx: Context, to: u32, from: u32, out: StreamWriter| async move {
                for i in from..to {
                    out.write(i).await?;
                }
                Ok(())
            },
        ))
        .queue_worker(
            QueueWorkerDef::new("short", move |_ctx: JobContext, n: u32| {
                let jobs = short_jobs.clone();
                async move {
                    jobs.lock().push(format!("short {n}"));
                    Ok(())
                }
            })
            .lease_wait(Duration::from_millis(50)),
        )
        .queue_worker(
            QueueWorkerDef::new("long", move |_ctx: JobContext, n: u32, tag: String| {
                let jobs = long_jobs.clone();
                async move {
                    jobs.lock().push(format!("long {n} {tag}"));
                    Ok(())
                }
            })
            .lease_wait(Duration::from_millis(50)),
        )
        .build()
        .start(bridge)
        .await
        .expect("start");

    let at = |name: &str| Address::new("shapes", "1", name);
    assert_eq!(service.invoke::<u32>(at("short"), 1, Empty).await, Ok(2));
    assert_eq!(service.invoke::<u32>(at("long"), 1, 10).await, Ok(11));

    for (name, parameter, expected) in [
        ("count", json!({}), vec![0, 1, 2]),
        ("countFrom", json!(1), vec![1, 2]),
    ] {
        let mut reader = service
            .open_stream(at(name), 3, parameter, None)
            .await
            .expect("open");
        let mut chunks = Vec::new();
        while let Some(item) = reader.next().await {
            match item {
                StreamItem::Chunk(c) => chunks.push(c.as_u64().expect("a number")),
                StreamItem::Complete(_) => break,
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
        assert_eq!(chunks, expected, "{name}");
    }

    service.enqueue("short", 5, Empty).await.expect("enqueue");
    service.enqueue("long", 6, "urgent").await.expect("enqueue");
    eventually("both jobs", || jobs.lock().len() == 2).await;
    let mut done = jobs.lock().clone();
    done.sort();
    assert_eq!(
        done,
        vec!["long 6 urgent".to_string(), "short 5".to_string()]
    );
    assert_eq!(
        queues
            .metrics("short")
            .await
            .expect("metrics")
            .dead_lettered,
        0
    );
    service
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
}
