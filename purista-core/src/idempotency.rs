//! Duplicate handling: run a side effect once per key, for at-least-once delivery.
//!
//! Brokers redeliver; publishers retry. An [`IdempotencyGuard`] remembers which keys (a message
//! id, or a deterministic business key derived from the message) have been processed for a TTL,
//! in a pluggable [`IdempotencyStore`]. A key is *claimed* before the work runs, *kept* when the
//! work succeeded and *released* when it failed, so a later redelivery can try again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::envelope::Envelope;

/// Result of claiming a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First time: run the work.
    Claimed,
    /// Already done, or being done right now: skip.
    Duplicate,
}

/// Where processed keys are remembered. Implement it over Redis, a database, … to share the
/// memory between instances; [`MemoryIdempotencyStore`] is the in-process default.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `key` for `ttl` unless it is claimed already.
    async fn claim(&self, key: &str, ttl: Duration) -> Claim;
    /// Forgets `key` (the work failed and may run again).
    async fn release(&self, key: &str);
}

/// In-process store with TTL; expired keys are swept as new ones arrive.
#[derive(Default)]
pub struct MemoryIdempotencyStore {
    keys: Mutex<HashMap<String, Instant>>,
}

impl MemoryIdempotencyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys currently remembered (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.keys.lock().len()
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn claim(&self, key: &str, ttl: Duration) -> Claim {
        let now = Instant::now();
        let mut keys = self.keys.lock();
        if keys.len() >= 1024 && keys.len().is_power_of_two() {
            keys.retain(|_, until| *until > now);
        }
        match keys.get(key) {
            Some(until) if *until > now => Claim::Duplicate,
            _ => {
                keys.insert(key.to_string(), now + ttl);
                Claim::Claimed
            }
        }
    }

    async fn release(&self, key: &str) {
        self.keys.lock().remove(key);
    }
}

type KeyFn = dyn Fn(&Envelope) -> Option<String> + Send + Sync;

/// Runs work once per key. Cheap to clone; clones share the store.
///
/// ```
/// # tokio_test_block(async {
/// use purista_core::idempotency::IdempotencyGuard;
/// let guard = IdempotencyGuard::in_memory(std::time::Duration::from_secs(60));
/// assert_eq!(guard.run_once("order-1", async { Ok::<_, ()>(1) }).await, Some(Ok(1)));
/// assert_eq!(guard.run_once("order-1", async { Ok::<_, ()>(2) }).await, None);
/// # });
/// # fn tokio_test_block<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct IdempotencyGuard {
    store: Arc<dyn IdempotencyStore>,
    ttl: Duration,
    key: Arc<KeyFn>,
}

impl std::fmt::Debug for IdempotencyGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyGuard")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl IdempotencyGuard {
    /// Keyed by message id, remembered in `store` for `ttl`.
    pub fn new(store: Arc<dyn IdempotencyStore>, ttl: Duration) -> Self {
        IdempotencyGuard {
            store,
            ttl,
            key: Arc::new(|e: &Envelope| Some(e.id.clone())),
        }
    }

    /// Keyed by message id, in a fresh in-memory store.
    pub fn in_memory(ttl: Duration) -> Self {
        IdempotencyGuard::new(Arc::new(MemoryIdempotencyStore::new()), ttl)
    }

    /// Keys messages by a deterministic business key instead of the message id (e.g. an order
    /// id in the payload). `None` = no key: the message is always processed.
    pub fn keyed_by(
        mut self,
        key: impl Fn(&Envelope) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.key = Arc::new(key);
        self
    }

    /// The key of a message.
    pub fn key_of(&self, e: &Envelope) -> Option<String> {
        (self.key)(e)
    }

    /// Claims `key`.
    pub async fn claim(&self, key: &str) -> Claim {
        self.store.claim(key, self.ttl).await
    }

    /// Releases `key` so it can run again.
    pub async fn release(&self, key: &str) {
        self.store.release(key).await
    }

    /// Runs `work` unless `key` was claimed before; an `Err` releases the key.
    /// Returns `None` for a duplicate.
    pub async fn run_once<T, E>(
        &self,
        key: &str,
        work: impl Future<Output = Result<T, E>>,
    ) -> Option<Result<T, E>> {
        if self.claim(key).await == Claim::Duplicate {
            tracing::debug!(key, "duplicate skipped by idempotency guard");
            return None;
        }
        let r = work.await;
        if r.is_err() {
            self.release(key).await;
        }
        Some(r)
    }
}
