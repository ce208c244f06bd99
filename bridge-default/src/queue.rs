//! The in-process queue bridge: [`MemoryQueueBridge`] keeps jobs, leases, retries, delays and
//! dead-letter queues in this process's memory.
//!
//! It is the queue half of the `default` bridge, for tests, development and single-process
//! deployments. Everything is lost when the process exits, so it declares at-most-once delivery.
//!
//! How it is built:
//!
//! * Each queue has its own `parking_lot` mutex, so producers and workers of different queues
//!   never wait for each other; the map of queues sits behind a read-write lock that only
//!   `declare_queue` and `shutdown` write. Dead letters, which queues may share, have a lock of
//!   their own, taken only when a job is dead-lettered or the lists are read. Every operation
//!   is one short critical section that never spans an `.await`; the only waiting is in
//!   [`QueueBridge::lease`], outside the locks.
//! * Each queue is a `JobStore` (`store.rs`): pending jobs ordered by `(visible-at, enqueue order)`
//!   (FIFO) and leases ordered by expiry. Expired leases are applied lazily at the start of every
//!   operation that comes after the earliest expiry; what a settlement or an expiry *means* is
//!   decided by core's [`QueueConfig::plan`], never here.
//! * A `lease` first just looks (one critical section). Only when nothing is visible does it
//!   wait, on the queue's [`tokio::sync::Notify`] (woken when a job becomes visible sooner than
//!   planned: an enqueue, a retry, a replay, a shutdown) and on a timer set to the earliest
//!   delayed job or lease expiry, capped by its own deadline. Waiters are counted, so an enqueue
//!   with nobody waiting wakes nobody. It never polls, and it is cancel safe: a job is leased
//!   and returned within one critical section.
//! * An expired lease counts as `Retry { delay: 0, reason: "lease expired" }` settled at the
//!   expiry time, so core's plan decides whether the job is visible again or dead-lettered.
//! * A queue keeps its first [`QueueDeclaration`]; a later one with other settings is refused
//!   by core's rule ([`QueueDeclaration::check_redeclaration`]) and changes nothing, so the
//!   queue's behaviour never depends on which service started last.
//! * Dead letters are kept under `QueueConfig::dead_letter_queue_for(queue)`. Inspect, replay and
//!   purge take the *origin* queue and see only its jobs, even when queues share a dead-letter
//!   queue.
//! * Time: epoch milliseconds are derived from `tokio::time::Instant` relative to one
//!   `(Instant, epoch ms)` pair taken in [`MemoryQueueBridge::new`] (see `clock.rs`), so
//!   `tokio::time::pause()` / `advance()` move the queue's clock in tests. Timestamps start at
//!   the wall-clock time of construction and then follow tokio's clock.

mod clock;
mod dead_letter;
mod idempotency;
mod store;

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use purista_core::capabilities::{DeliveryGuarantee, QueueCapabilities};
use purista_core::queue::{
    DeadLetteredJob, JobSettlement, LeasedJob, NewJob, QueueBridge, QueueDeclaration, QueueError,
    QueueMetrics,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use self::clock::Clock;
use self::dead_letter::DeadLetters;
use self::store::JobStore;
use purista_core::kit::FastMap;

/// The bridge name reported by [`QueueBridge::name`] and in the capabilities.
const BRIDGE_NAME: &str = "default";

/// An in-process [`QueueBridge`]: jobs live in this process's memory and are lost on exit.
///
/// Cloning is cheap and every clone shares the same queues.
///
/// ```
/// use std::time::Duration;
/// use purista_bridge_default::MemoryQueueBridge;
/// use purista_core::queue::{JobSettlement, NewJob, QueueBridge, QueueConfig, QueueDeclaration};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), purista_core::queue::QueueError> {
/// let queues = MemoryQueueBridge::new();
/// queues
///     .declare_queue("emails", QueueDeclaration::new("mailer@1", QueueConfig::default()))
///     .await?;
/// let job = NewJob { payload: serde_json::json!({ "to": "ada@example.com" }), ..Default::default() };
/// let id = queues.enqueue("emails", job).await?;
///
/// let leased = queues.lease("emails", Duration::from_secs(1)).await?;
/// let leased = leased.expect("the job is visible");
/// assert_eq!(leased.id, id);
/// assert_eq!(leased.attempt, 1);
/// queues.settle(&leased, JobSettlement::Complete).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryQueueBridge {
    shared: Arc<Shared>,
}

struct Shared {
    queues: RwLock<Queues>,
    /// Locked after a queue's store, never before.
    dead_letters: Mutex<DeadLetters>,
    clock: Clock,
    capabilities: QueueCapabilities,
}

/// The declared queues.
#[derive(Default)]
struct Queues {
    closed: bool,
    by_name: FastMap<String, Queue>,
}

impl Queues {
    /// The declared queue `queue`, while the bridge is open.
    fn get(&self, queue: &str) -> Result<&Queue, QueueError> {
        if self.closed {
            return Err(shut_down());
        }
        check_name(queue)?;
        self.by_name
            .get(queue)
            .ok_or_else(|| QueueError::UnknownQueue(queue.to_owned()))
    }
}

/// One declared queue: the declaration in force, its jobs under their own lock, and the
/// `lease` calls waiting for them.
struct Queue {
    declaration: QueueDeclaration,
    store: Mutex<JobStore>,
    waiters: Arc<Waiters>,
}

/// The `lease` calls waiting on one queue.
#[derive(Default)]
struct Waiters {
    notify: Notify,
    count: AtomicUsize,
}

impl Waiters {
    /// Wakes every waiting `lease` call so it looks again; nothing to do when none waits.
    ///
    /// A waiter counts itself before its look under the store lock, and a wake follows a
    /// change under that lock, so a waiter that missed the change is always counted here.
    fn wake(&self) {
        if self.count.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }
}

/// One `lease` call counted as waiting, until dropped.
struct Waiting(Arc<Waiters>);

impl Waiting {
    fn new(waiters: Arc<Waiters>) -> Self {
        waiters.count.fetch_add(1, Ordering::SeqCst);
        Waiting(waiters)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemoryQueueBridge {
    /// An empty bridge with no queues declared. Its clock is anchored here (see the module docs).
    pub fn new() -> Self {
        MemoryQueueBridge {
            shared: Arc::new(Shared {
                queues: RwLock::new(Queues::default()),
                dead_letters: Mutex::new(DeadLetters::default()),
                clock: Clock::new(),
                capabilities: QueueCapabilities {
                    bridge: BRIDGE_NAME.to_owned(),
                    delayed_delivery: true,
                    lease_extension: true,
                    dead_letter_inspect: true,
                    dead_letter_replay: true,
                    dead_letter_purge: true,
                    idempotency_enforcement: true,
                    delivery: DeliveryGuarantee::AtMostOnce,
                },
            }),
        }
    }

    /// Runs `f` on the declared queue `queue` (brought up to date) under its lock, then wakes
    /// the queue's waiters if `f` made a job visible.
    fn with_queue<T>(
        &self,
        queue: &str,
        f: impl FnOnce(&mut JobStore, &Mutex<DeadLetters>, u64) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        self.with_queue_and_waiters(queue, |store, dead_letters, now_ms, _| {
            f(store, dead_letters, now_ms)
        })
    }

    /// [`MemoryQueueBridge::with_queue`], also handing `f` the queue's waiters.
    fn with_queue_and_waiters<T>(
        &self,
        queue: &str,
        f: impl FnOnce(&mut JobStore, &Mutex<DeadLetters>, u64, &Arc<Waiters>) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let queues = self.shared.queues.read();
        let queue = queues.get(queue)?;
        let (result, wake) = {
            let mut store = queue.store.lock();
            let now_ms = self.shared.clock.now_ms();
            let dead_letters = &self.shared.dead_letters;
            store.maintain(now_ms, dead_letters);
            let result = f(&mut store, dead_letters, now_ms, &queue.waiters);
            (result, store.take_wake())
        };
        if wake {
            queue.waiters.wake();
        }
        result
    }
}

impl MemoryQueueBridge {
    /// The declaration in force for `queue` (the first one), if it is declared.
    pub fn declaration(&self, queue: &str) -> Option<QueueDeclaration> {
        self.shared
            .queues
            .read()
            .by_name
            .get(queue)
            .map(|q| q.declaration.clone())
    }
}

impl Default for MemoryQueueBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryQueueBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueueBridge")
            .field("bridge", &BRIDGE_NAME)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl QueueBridge for MemoryQueueBridge {
    fn name(&self) -> &str {
        BRIDGE_NAME
    }

    fn capabilities(&self) -> &QueueCapabilities {
        &self.shared.capabilities
    }

    async fn declare_queue(
        &self,
        queue: &str,
        declaration: QueueDeclaration,
    ) -> Result<(), QueueError> {
        let mut queues = self.shared.queues.write();
        if queues.closed {
            return Err(shut_down());
        }
        check_name(queue)?;
        if declaration.config.visibility_timeout.is_zero() {
            return Err(QueueError::InvalidRequest(format!(
                "queue `{queue}`: visibility_timeout must be greater than zero"
            )));
        }
        match queues.by_name.get(queue) {
            Some(existing) => existing
                .declaration
                .check_redeclaration(queue, &declaration)?,
            None => {
                let store = JobStore::new(queue, declaration.config.clone());
                queues.by_name.insert(
                    queue.to_owned(),
                    Queue {
                        declaration,
                        store: Mutex::new(store),
                        waiters: Arc::default(),
                    },
                );
            }
        }
        Ok(())
    }

    async fn enqueue(&self, queue: &str, job: NewJob) -> Result<String, QueueError> {
        self.with_queue(queue, |store, _, now_ms| Ok(store.enqueue(job, now_ms)))
    }

    async fn lease(&self, queue: &str, wait: Duration) -> Result<Option<LeasedJob>, QueueError> {
        // The fast path: one look, one critical section.
        let first = self.with_queue_and_waiters(queue, |store, _, now_ms, waiters| {
            Ok(match store.lease_next(now_ms) {
                Some(job) => ControlFlow::Break(job),
                None => ControlFlow::Continue(waiters.clone()),
            })
        })?;
        let waiters = match first {
            ControlFlow::Break(job) => return Ok(Some(job)),
            ControlFlow::Continue(waiters) => waiters,
        };
        // `None` = a wait too long to represent: wait until woken.
        let deadline = Instant::now().checked_add(wait);
        let waiting = Waiting::new(waiters);
        loop {
            // Registered before looking, so a wake-up between the look and the sleep is not lost.
            let woken = waiting.0.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();

            // Break with a leased job, or continue with when something may become visible.
            let look = self.with_queue(queue, |store, _, now_ms| {
                Ok(match store.lease_next(now_ms) {
                    Some(job) => ControlFlow::Break(job),
                    None => ControlFlow::Continue(store.next_change_ms()),
                })
            })?;
            let next_change_ms = match look {
                ControlFlow::Break(job) => return Ok(Some(job)),
                ControlFlow::Continue(next_change_ms) => next_change_ms,
            };

            if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
                return Ok(None);
            }
            let next_change = next_change_ms.and_then(|ms| self.shared.clock.instant_at(ms));
            let sleep_until = match (deadline, next_change) {
                (Some(deadline), Some(change)) => Some(deadline.min(change)),
                (deadline, change) => deadline.or(change),
            };
            match sleep_until {
                Some(until) => {
                    tokio::select! {
                        () = &mut woken => {}
                        () = tokio::time::sleep_until(until) => {}
                    }
                }
                None => woken.await,
            }
        }
    }

    async fn extend_lease(&self, job: &LeasedJob, by: Option<Duration>) -> Result<u64, QueueError> {
        self.with_queue(&job.queue, |store, _, now_ms| store.extend(job, by, now_ms))
    }

    async fn settle(&self, job: &LeasedJob, settlement: JobSettlement) -> Result<(), QueueError> {
        self.with_queue(&job.queue, |store, dead_letters, now_ms| {
            store.settle(job, &settlement, now_ms, dead_letters)
        })
    }

    async fn metrics(&self, queue: &str) -> Result<QueueMetrics, QueueError> {
        self.with_queue(queue, |store, dead_letters, now_ms| {
            let counts = store.counts(now_ms);
            Ok(QueueMetrics {
                depth: counts.ready,
                leased: counts.leased,
                delayed: counts.delayed,
                dead_lettered: dead_letters.lock().count(store.dead_letter_queue(), queue),
            })
        })
    }

    async fn inspect_dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetteredJob>, QueueError> {
        self.with_queue(queue, |store, dead_letters, _| {
            Ok(dead_letters
                .lock()
                .list(store.dead_letter_queue(), queue, limit))
        })
    }

    async fn replay_dead_letters(
        &self,
        queue: &str,
        ids: Option<Vec<String>>,
    ) -> Result<usize, QueueError> {
        let ids: Option<HashSet<String>> = ids.map(|ids| ids.into_iter().collect());
        self.with_queue(queue, |store, dead_letters, now_ms| {
            let replayed = dead_letters
                .lock()
                .take(store.dead_letter_queue(), queue, ids.as_ref());
            let count = replayed.len();
            for dead in replayed {
                store.requeue(dead, now_ms);
            }
            Ok(count)
        })
    }

    async fn purge_dead_letters(&self, queue: &str) -> Result<usize, QueueError> {
        self.with_queue(queue, |store, dead_letters, _| {
            Ok(dead_letters
                .lock()
                .take(store.dead_letter_queue(), queue, None)
                .len())
        })
    }

    async fn shutdown(&self) {
        let queues = {
            let mut queues = self.shared.queues.write();
            queues.closed = true;
            *self.shared.dead_letters.lock() = DeadLetters::default();
            std::mem::take(&mut queues.by_name)
        };
        // Waiting `lease` calls wake up, look again and find the bridge closed.
        for queue in queues.values() {
            queue.waiters.wake();
        }
        tracing::debug!(
            bridge = BRIDGE_NAME,
            queues = queues.len(),
            "queue bridge shut down"
        );
    }
}

fn check_name(queue: &str) -> Result<(), QueueError> {
    if queue.is_empty() {
        return Err(QueueError::InvalidRequest("empty queue name".to_owned()));
    }
    Ok(())
}

fn shut_down() -> QueueError {
    QueueError::Unavailable(format!("queue bridge `{BRIDGE_NAME}` is shut down"))
}
