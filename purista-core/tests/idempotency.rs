//! The idempotency guard: at-least-once delivery made safe by running work once per key within a
//! TTL. A failure releases the key so a redelivery can try again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use purista_core::idempotency::Claim;
use purista_core::{
    Envelope, IdempotencyGuard, IdempotencyStore, MemoryIdempotencyStore, SenderAddress,
};
use serde_json::json;

const TTL: Duration = Duration::from_secs(60);

fn order_event(order_id: &str) -> Envelope {
    Envelope::custom(
        SenderAddress::default(),
        "orderPlaced",
        json!({ "orderId": order_id }),
    )
}

/// Work that counts its runs and returns the run number.
fn counted(runs: &Arc<AtomicUsize>) -> impl Future<Output = Result<usize, String>> + use<> {
    let runs = runs.clone();
    async move { Ok(runs.fetch_add(1, Ordering::SeqCst) + 1) }
}

#[tokio::test]
async fn run_once_runs_the_work_once_per_key() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let runs = Arc::new(AtomicUsize::new(0));
    assert_eq!(guard.run_once("k", counted(&runs)).await, Some(Ok(1)));
    assert_eq!(guard.run_once("k", counted(&runs)).await, None);
    assert_eq!(guard.run_once("k", counted(&runs)).await, None);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn run_once_runs_different_keys_independently() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let runs = Arc::new(AtomicUsize::new(0));
    assert!(guard.run_once("a", counted(&runs)).await.is_some());
    assert!(guard.run_once("b", counted(&runs)).await.is_some());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_error_releases_the_key_so_the_work_runs_again() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let failed = guard
        .run_once("k", async { Err::<u32, _>("db down") })
        .await;
    assert_eq!(failed, Some(Err("db down")));
    assert_eq!(
        guard.run_once("k", async { Ok::<_, &str>(7) }).await,
        Some(Ok(7))
    );
    assert_eq!(guard.run_once("k", async { Ok::<_, &str>(8) }).await, None);
}

#[tokio::test]
async fn a_duplicate_does_not_poll_the_work() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let runs = Arc::new(AtomicUsize::new(0));
    let _ = guard.run_once("k", counted(&runs)).await;
    let second = counted(&runs);
    assert_eq!(guard.run_once("k", second).await, None);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_default_key_is_the_message_id() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let e = order_event("o-1");
    assert_eq!(guard.key_of(&e), Some(e.id.clone()));
}

#[tokio::test]
async fn keyed_by_uses_the_business_key() {
    let guard = IdempotencyGuard::in_memory(TTL)
        .keyed_by(|e: &Envelope| e.payload["orderId"].as_str().map(|s| format!("order:{s}")));
    let first = order_event("o-1");
    let redelivered_with_new_id = order_event("o-1");
    assert_ne!(first.id, redelivered_with_new_id.id);
    let k1 = guard.key_of(&first).expect("key");
    let k2 = guard.key_of(&redelivered_with_new_id).expect("key");
    assert_eq!(k1, "order:o-1");
    assert_eq!(k1, k2);

    let runs = Arc::new(AtomicUsize::new(0));
    assert!(guard.run_once(&k1, counted(&runs)).await.is_some());
    assert!(guard.run_once(&k2, counted(&runs)).await.is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn keyed_by_returning_none_means_no_key() {
    let guard = IdempotencyGuard::in_memory(TTL).keyed_by(|_: &Envelope| None);
    assert_eq!(guard.key_of(&order_event("o-1")), None);
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_lets_the_work_run_again() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let runs = Arc::new(AtomicUsize::new(0));
    assert!(guard.run_once("k", counted(&runs)).await.is_some());

    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    assert!(guard.run_once("k", counted(&runs)).await.is_none());

    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(guard.run_once("k", counted(&runs)).await, Some(Ok(2)));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn clones_share_the_store() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let clone = guard.clone();
    let runs = Arc::new(AtomicUsize::new(0));
    assert!(guard.run_once("k", counted(&runs)).await.is_some());
    assert!(clone.run_once("k", counted(&runs)).await.is_none());
}

#[tokio::test]
async fn a_key_in_progress_is_a_duplicate() {
    let guard = IdempotencyGuard::in_memory(TTL);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let g = guard.clone();
    let first = tokio::spawn(async move {
        g.run_once("k", async move {
            let _ = started_tx.send(());
            let _ = release_rx.await;
            Ok::<_, ()>(1)
        })
        .await
    });
    started_rx.await.expect("first run started");
    assert_eq!(guard.run_once("k", async { Ok::<_, ()>(2) }).await, None);
    let _ = release_tx.send(());
    assert_eq!(first.await.expect("task"), Some(Ok(1)));
}

#[tokio::test]
async fn memory_store_claims_and_releases() {
    let store = MemoryIdempotencyStore::new();
    assert!(store.is_empty());
    assert_eq!(store.claim("k", TTL).await, Claim::Claimed);
    assert_eq!(store.claim("k", TTL).await, Claim::Duplicate);
    assert_eq!(store.len(), 1);
    store.release("k").await;
    assert!(store.is_empty());
    assert_eq!(store.claim("k", TTL).await, Claim::Claimed);
}

#[tokio::test(start_paused = true)]
async fn memory_store_sweeps_expired_keys_as_new_ones_arrive() {
    let store = MemoryIdempotencyStore::new();
    for i in 0..1_024 {
        store.claim(&format!("k{i}"), Duration::from_secs(1)).await;
    }
    assert_eq!(store.len(), 1_024);
    tokio::time::advance(Duration::from_secs(2)).await;
    store.claim("fresh", TTL).await;
    assert_eq!(store.len(), 1);
}
