//! `fanout`: events emitted by one service, received by every instance of a broadcast
//! subscription.
//!
//! The subscribing service runs as several instances, each on its own bridge instance, with a
//! broadcast subscription, so every instance receives every event; the producer is a further
//! instance. The clock runs from the first emit until the last delivery's handler has run.

use anyhow::Context as _;
use purista::prelude::*;
use tokio::time::Instant;

use super::Deployment;
use crate::drive::Progress;
use crate::measurement::Measurement;
use crate::payload::Payload;
use crate::target::Role;
use crate::workload::{Scenario, Workload};

/// Runs `fanout`: `fanout_events` events, each delivered to `fanout_subscribers` instances.
pub async fn run(deployment: &mut Deployment, workload: &Workload) -> anyhow::Result<Measurement> {
    let event = deployment.name("tick");
    let subscribers = workload.fanout_subscribers;
    let delivered = Progress::new();
    let sink = deployment.name("sink");
    for _ in 0..subscribers {
        let connection = deployment.connect().await?;
        let delivered = delivered.clone();
        let on_tick = SubscriptionDef::new(
            "onTick",
            move |_ctx: SubscriptionContext, _tick: Payload| {
                let delivered = delivered.clone();
                async move {
                    delivered.add_one();
                    Ok(())
                }
            },
        )
        .event_name(event.as_str())
        .broadcast();
        deployment
            .start(
                Service::builder(sink.as_str(), "1")
                    .subscription(on_tick)
                    .build(),
                &connection,
            )
            .await?;
    }
    let connection = deployment.connect_as(Role::Publisher).await?;
    let producer = deployment
        .start(
            Service::builder(deployment.name("source"), "1").build(),
            &connection,
        )
        .await?;
    let emit_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            producer
                .emit(&event, Payload::new(seq))
                .await
                .with_context(|| format!("emitting `{event}` #{seq}"))?;
        }
        Ok(())
    };

    // Warm-up doubles as the readiness check: every subscription is routed before timing.
    let warmup = workload.warmup;
    delivered.expect(warmup * subscribers);
    emit_all(0, warmup).await?;
    delivered.wait("fanout warm-up deliveries").await?;

    let events = workload.fanout_events;
    let ops = events * subscribers;
    delivered.expect(delivered.done() + ops);
    let start = Instant::now();
    emit_all(warmup, events).await?;
    delivered.wait("fanout deliveries").await?;
    let elapsed = start.elapsed();
    Ok(
        Measurement::new(&deployment.bridge_name(), Scenario::Fanout, ops, elapsed).with_note(
            format!("{events} events × {subscribers} broadcast subscribers"),
        ),
    )
}
