//! An early settle through `SubscriptionContext::settle` and a returned outcome take one path
//! (issue 8, defect 5): the same strict check, the same warnings, the same release of the
//! idempotency claim.

mod common;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_bridge_default::MemoryBroker;
use purista_core::{
    EventBridge, IdempotencyGuard, Outcome, RunningService, Service, SubscriptionContext,
    SubscriptionDef,
};
use serde_json::Value;
use tokio::time::Instant;
use tracing::Level;

use common::{capture_logs, eventually};

/// A subscription to `ticketSold` whose handler settles early with `first` on attempt 1 and
/// records every attempt it runs.
fn settles_early(first: Outcome, attempts: Arc<Mutex<Vec<u32>>>) -> SubscriptionDef {
    SubscriptionDef::new("onSold", move |ctx: SubscriptionContext, _v: Value| {
        let attempts = attempts.clone();
        let first = first.clone();
        async move {
            attempts.lock().push(ctx.attempt());
            if ctx.attempt() == 1 {
                ctx.settle(first).await?;
            }
            Ok(())
        }
    })
    .event_name("ticketSold")
}

async fn start(broker: &MemoryBroker, def: SubscriptionDef) -> RunningService {
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    Service::builder("box-office", "1")
        .subscription(def)
        .build()
        .start(bridge)
        .await
        .expect("start")
}

async fn finish(service: RunningService) {
    service
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
}

#[tokio::test]
async fn an_early_stop_consumer_on_a_subscription_not_declared_pausable_is_a_retry() {
    let (logs, _guard) = capture_logs();
    let broker = MemoryBroker::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let service = start(
        &broker,
        settles_early(Outcome::stop_consumer("sold out"), attempts.clone()).max_attempts(2),
    )
    .await;
    service.emit("ticketSold", "t-1").await.expect("emit");
    eventually("the retry", || attempts.lock().len() == 2).await;
    assert_eq!(*attempts.lock(), vec![1, 2]);
    assert!(
        service.paused_subscription_consumers().is_empty(),
        "a subscription not declared pausable must not be paused"
    );
    assert!(
        !logs
            .find(Level::ERROR, &["not declared pausable"])
            .is_empty(),
        "{}",
        logs.dump()
    );
    finish(service).await;
}

#[tokio::test]
async fn an_early_drop_warns_like_a_returned_one() {
    let (logs, _guard) = capture_logs();
    let broker = MemoryBroker::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let service = start(
        &broker,
        settles_early(Outcome::drop_message("duplicate ticket"), attempts.clone()),
    )
    .await;
    service.emit("ticketSold", "t-1").await.expect("emit");
    eventually("the drop warning", || {
        !logs
            .find(Level::WARN, &["message dropped", "duplicate ticket"])
            .is_empty()
    })
    .await;
    finish(service).await;
}

#[tokio::test]
async fn an_early_dead_letter_warns_like_a_returned_one() {
    let (logs, _guard) = capture_logs();
    let broker = MemoryBroker::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let service = start(
        &broker,
        settles_early(Outcome::dead_letter("forged ticket"), attempts.clone())
            .dead_letter_target("box-office.rejected"),
    )
    .await;
    service.emit("ticketSold", "t-1").await.expect("emit");
    eventually("the dead-letter warning", || {
        !logs
            .find(Level::WARN, &["dead-lettered", "forged ticket"])
            .is_empty()
    })
    .await;
    finish(service).await;
}

#[tokio::test]
async fn an_early_retry_releases_the_idempotency_claim_so_the_redelivery_runs() {
    let broker = MemoryBroker::new();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let service = start(
        &broker,
        settles_early(Outcome::retry(), attempts.clone())
            .max_attempts(2)
            .idempotent(IdempotencyGuard::in_memory(Duration::from_secs(60))),
    )
    .await;
    service.emit("ticketSold", "t-1").await.expect("emit");
    eventually("the redelivery to run the handler", || {
        attempts.lock().len() == 2
    })
    .await;
    assert_eq!(*attempts.lock(), vec![1, 2]);
    finish(service).await;
}

#[tokio::test]
async fn a_returned_drop_warns() {
    let (logs, _guard) = capture_logs();
    let broker = MemoryBroker::new();
    let service = start(
        &broker,
        SubscriptionDef::new("onSold", |_c: SubscriptionContext, _v: Value| async move {
            Ok(Outcome::drop_message("duplicate ticket"))
        })
        .event_name("ticketSold"),
    )
    .await;
    service.emit("ticketSold", "t-1").await.expect("emit");
    eventually("the drop warning", || {
        !logs
            .find(Level::WARN, &["message dropped", "duplicate ticket"])
            .is_empty()
    })
    .await;
    finish(service).await;
}
