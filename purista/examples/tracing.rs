//! One request, one trace: `cargo run -p purista --example tracing`.
//!
//! Two services on the in-memory bridge. `orders.place` emits `orderPlaced`; `shipping`'s
//! subscription retries it once, then enqueues a `labels` job, which its worker runs. The
//! example prints the span tree of that request (every span carries the same W3C trace id,
//! because each message carries its sender's span in `otp`) and a snapshot of the metrics.
//!
//! The spans are kept by core's in-memory recorder (`purista-core` feature `recorder`); a
//! deployment installs `tracing-opentelemetry` instead (feature `otel`, see the `otel` example).
//! The metrics go to a ten-line recorder of the `metrics` facade here; a deployment installs
//! a Prometheus or OpenTelemetry exporter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use parking_lot::Mutex;
use purista::observe::SpanRecorder;
use purista::prelude::*;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Counters and the number of histogram samples, by series.
#[derive(Default, Clone)]
struct Snapshot(Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>);

impl Snapshot {
    fn cell(&self, key: &Key) -> Arc<AtomicU64> {
        let labels: Vec<String> = key
            .labels()
            .filter(|l| l.key() != "messaging.system")
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let series = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().entry(series).or_default().clone()
    }
}

/// A histogram sample counts as one (the snapshot shows how many runs were timed).
struct Samples(Arc<AtomicU64>);

impl metrics::HistogramFn for Samples {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Recorder for Snapshot {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(Arc::new(Samples(self.cell(key))))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let spans = SpanRecorder::new();
    tracing_subscriber::registry().with(spans.layer()).init();
    // Before the services start: their meters are registered at start.
    let snapshot = Snapshot::default();
    metrics::set_global_recorder(snapshot.clone())?;

    let conn = purista::connect("memory://tracing-example").await?;
    let queues = conn.queues.clone().expect("the memory bridge has queues");
    let orders = Service::builder("orders", "1")
        .command(CommandDef::new(
            "place",
            |ctx: Context, order: String| async move {
                ctx.emit("orderPlaced", json!({ "order": order })).await?;
                Ok(format!("placed {order}"))
            },
        ))
        .build()
        .start(conn.events.clone())
        .await?;
    let labelled = Arc::new(Notify::new());
    let done = labelled.clone();
    let shipping = Service::builder("shipping", "1")
        .queue_bridge(queues)
        .subscription(
            SubscriptionDef::new(
                "onPlaced",
                |ctx: SubscriptionContext, e: Value| async move {
                    if ctx.attempt() == 1 {
                        return Ok(Outcome::retry()); // the carrier is busy: once
                    }
                    ctx.enqueue("labels", e["order"].clone(), Empty).await?;
                    Ok(Outcome::Ack)
                },
            )
            .event_name("orderPlaced")
            .max_attempts(3),
        )
        .queue_worker(
            QueueWorkerDef::new("labels", move |_ctx: JobContext, _order: String| {
                let done = done.clone();
                async move {
                    done.notify_one();
                    Ok(())
                }
            })
            .lease_wait(Duration::from_millis(20)),
        )
        .build()
        .start(conn.events.clone())
        .await?;

    let placed: String = orders
        .invoke(Address::new("orders", "1", "place"), "o-1", Empty)
        .await?;
    println!("reply: {placed}");
    tokio::time::timeout(Duration::from_secs(5), labelled.notified()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    shipping.shutdown(deadline).await;
    orders.shutdown(deadline).await;

    let finished = spans.finished();
    let root = finished
        .iter()
        .find(|s| s.name == "purista.invoke")
        .and_then(|s| s.trace_id())
        .expect("the request's root span");
    println!("\ntrace {root}:");
    print!(
        "{}",
        SpanRecorder::render_tree(
            &spans.trace(root),
            &["span_id", "purista.attempt", "purista.outcome"]
        )
    );
    println!("\nmetrics that moved (histograms: number of samples):");
    for (series, value) in snapshot.0.lock().iter() {
        let value = value.load(Ordering::Relaxed);
        if value > 0 {
            println!("  {series} {value}");
        }
    }
    Ok(())
}
