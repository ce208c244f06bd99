//! The pool of received jobs waiting for a `lease` call, for queue bridges whose broker hands
//! out one message at a time and counts delays in whole seconds (SQS, KubeMQ).
//!
//! Such a bridge receives a message only for a waiting `lease` call, in a task of its own, and
//! that task holds the message until a `lease` call claims it once due: the broker counts
//! seconds, the pool milliseconds. A job nobody claims soon after it is due goes back to the
//! broker, so a `lease` call that gave up never leaves a message hidden. What a message is and
//! how it goes back stay with the bridge; the pool only matches waiting calls with held jobs.
//!
//! The flow, per queue:
//!
//! 1. [`JobPool::lease`] waits for a due job and asks the bridge to start one receive task per
//!    waiting call that has none.
//! 2. The receive task reports back ([`JobPool::receiver_ended`], [`JobPool::fail`],
//!    [`JobPool::wake`]) and, with a job, calls [`JobPool::hold`]: it gets the [`Claim`] of
//!    the `lease` call that took the job, or `None` when nobody did in time.
//! 3. The task answers the claim with the [`LeasedJob`] (or an error) and serves the lease.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::envelope::now_ms;
use crate::queue::{LeasedJob, QueueError};

/// Where the task holding a job answers the `lease` call that claimed it.
pub type Claim = oneshot::Sender<Result<LeasedJob, QueueError>>;

/// A held job: when it is due, and where a `lease` call sends its claim.
struct Entry {
    id: u64,
    due_ms: u64,
    claim: oneshot::Sender<Claim>,
}

/// How many jobs a pool holds right now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    /// Held and due: ready for the next lease.
    pub ready: usize,
    /// Held, not yet due.
    pub early: usize,
}

/// The received jobs of one queue waiting for a `lease` call, and the calls waiting for them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use purista_core::kit::JobPool;
/// let pool = JobPool::new();
/// let (_open, closed) = tokio::sync::watch::channel(false);
/// // No receive task comes back with a job: the call ends empty at its deadline.
/// let leased = pool
///     .lease(Duration::from_millis(10), &closed, || true, || unreachable!())
///     .await;
/// assert!(matches!(leased, Ok(None)));
/// # }
/// ```
#[derive(Default)]
pub struct JobPool {
    entries: Mutex<Vec<Entry>>,
    next_entry: AtomicU64,
    arrived: Notify,
    receivers: AtomicUsize,
    waiting: AtomicUsize,
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for JobPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobPool")
            .field("held", &self.entries.lock().len())
            .field("receivers", &self.receivers.load(Ordering::SeqCst))
            .field("waiting", &self.waiting.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// Counts a waiting `lease` call until dropped.
struct Waiting<'a>(&'a JobPool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl JobPool {
    /// An empty pool.
    pub fn new() -> Self {
        JobPool::default()
    }

    /// What the pool holds at `now_ms`.
    pub fn counts(&self, now_ms: u64) -> PoolCounts {
        let entries = self.entries.lock();
        let ready = entries.iter().filter(|e| e.due_ms <= now_ms).count();
        PoolCounts {
            ready,
            early: entries.len() - ready,
        }
    }

    /// Waits at most `wait` (`Duration::MAX`: no deadline) for a due job and claims it.
    ///
    /// While this call has no receive task of its own, it counts one and calls
    /// `start_receiver`, which spawns a task that receives from the broker (and ends with
    /// [`JobPool::receiver_ended`]); `false` means the bridge can start no task and this call
    /// fails with `shut_down()`, as it does once `closed` turns true. A failure a receive task
    /// reported ([`JobPool::fail`]) is this call's error. `Ok(None)`: nothing came in time.
    pub async fn lease(
        &self,
        wait: Duration,
        closed: &watch::Receiver<bool>,
        mut start_receiver: impl FnMut() -> bool,
        shut_down: impl Fn() -> QueueError,
    ) -> Result<Option<LeasedJob>, QueueError> {
        let deadline = Instant::now().checked_add(wait);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        let mut closed = closed.clone();
        loop {
            if *closed.borrow() {
                return Err(shut_down());
            }
            // Enabled before looking, so an arrival between the look and the wait wakes us.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(entry) = self.pop_due(now_ms()) {
                let (tx, rx) = oneshot::channel();
                if entry.claim.send(tx).is_err() {
                    continue;
                }
                match rx.await {
                    Ok(Ok(job)) => return Ok(Some(job)),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => continue,
                }
            }
            if let Some(failure) = self.failure.lock().take() {
                return Err(QueueError::Unavailable(failure));
            }
            while self.receivers.load(Ordering::SeqCst) < self.waiting.load(Ordering::SeqCst) {
                self.receivers.fetch_add(1, Ordering::SeqCst);
                if !start_receiver() {
                    self.receivers.fetch_sub(1, Ordering::SeqCst);
                    return Err(shut_down());
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Ok(None);
            }
            let next_due = self
                .next_due()
                .map(|due| now + Duration::from_millis(due.saturating_sub(now_ms())));
            let until = match (deadline, next_due) {
                (Some(d), Some(n)) => Some(d.min(n)),
                (d, n) => d.or(n),
            };
            let sleep = async {
                match until {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut arrived => {}
                () = sleep => {}
                _ = closed.changed() => {}
            }
        }
    }

    /// Holds a received job due at `due_ms` until a `lease` call claims it. Unclaimed for
    /// `hold_for` past its due time (counted from `now_ms`, the time the bridge checked the
    /// job against), or once `closed` turns true, it is withdrawn and `None` is returned: the
    /// bridge puts the job back.
    pub async fn hold(
        &self,
        due_ms: u64,
        now_ms: u64,
        hold_for: Duration,
        closed: &watch::Receiver<bool>,
    ) -> Option<Claim> {
        let id = self.next_entry.fetch_add(1, Ordering::Relaxed);
        let (claim_tx, mut claim_rx) = oneshot::channel::<Claim>();
        self.entries.lock().push(Entry {
            id,
            due_ms,
            claim: claim_tx,
        });
        self.arrived.notify_waiters();
        let give_back_at =
            Instant::now() + Duration::from_millis(due_ms.saturating_sub(now_ms)) + hold_for;
        let mut closed = closed.clone();
        enum Next {
            Claimed(Option<Claim>),
            GiveBackTime,
            Closing,
        }
        let next = tokio::select! {
            claim = &mut claim_rx => Next::Claimed(claim.ok()),
            () = tokio::time::sleep_until(give_back_at) => Next::GiveBackTime,
            _ = closed.wait_for(|c| *c) => Next::Closing,
        };
        match next {
            Next::Claimed(claim) => claim,
            Next::GiveBackTime if self.withdraw(id) => None,
            // A lease call took it from the pool just now: its claim is on the way.
            Next::GiveBackTime => tokio::time::timeout(Duration::from_secs(1), claim_rx)
                .await
                .ok()
                .and_then(Result::ok),
            Next::Closing => {
                self.withdraw(id);
                None
            }
        }
    }

    /// A receive task started by [`JobPool::lease`] no longer waits on the broker.
    pub fn receiver_ended(&self) {
        self.receivers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes the waiting `lease` calls to look again (a receive came back, or failed).
    pub fn wake(&self) {
        self.arrived.notify_waiters();
    }

    /// Reports a failed receive: the next `lease` call that finds no due job fails with
    /// `failure` ([`QueueError::Unavailable`]). Call [`JobPool::wake`] after it.
    pub fn fail(&self, failure: String) {
        *self.failure.lock() = Some(failure);
    }

    /// The first due entry (earliest due, then earliest held), taken out of the pool.
    fn pop_due(&self, now: u64) -> Option<Entry> {
        let mut entries = self.entries.lock();
        let at = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.due_ms <= now)
            .min_by_key(|(_, e)| (e.due_ms, e.id))
            .map(|(i, _)| i)?;
        Some(entries.remove(at))
    }

    fn next_due(&self) -> Option<u64> {
        self.entries.lock().iter().map(|e| e.due_ms).min()
    }

    /// Takes entry `id` out of the pool; `false` when a `lease` call took it first.
    fn withdraw(&self, id: u64) -> bool {
        let mut entries = self.entries.lock();
        match entries.iter().position(|e| e.id == id) {
            Some(at) => {
                entries.remove(at);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;

    fn job(id: &str) -> LeasedJob {
        LeasedJob {
            id: id.into(),
            queue: "q".into(),
            payload: Value::Null,
            parameter: Value::Null,
            attempt: 1,
            lease_token: format!("lease-{id}"),
            lease_expires_at_ms: 0,
            extensions: 0,
            enqueued_at_ms: 0,
            idempotency_key: None,
            trace_id: None,
            otp: None,
            principal_id: None,
            tenant_id: None,
            max_attempts: None,
        }
    }

    fn shut_down() -> QueueError {
        QueueError::Unavailable("shut down".into())
    }

    /// A held job that answers its claim with `job(id)`.
    fn serve_held(
        pool: &Arc<JobPool>,
        id: &'static str,
        due_ms: u64,
    ) -> tokio::task::JoinHandle<bool> {
        let pool = pool.clone();
        let (open, closed) = watch::channel(false);
        tokio::spawn(async move {
            let _open = open;
            match pool
                .hold(due_ms, now_ms(), Duration::from_secs(60), &closed)
                .await
            {
                Some(claim) => claim.send(Ok(job(id))).is_ok(),
                None => false,
            }
        })
    }

    #[tokio::test]
    async fn a_lease_call_starts_a_receiver_and_takes_the_job_it_brings() {
        let pool = Arc::new(JobPool::new());
        let (_open, closed) = watch::channel(false);
        let started = Arc::new(AtomicUsize::new(0));
        let leased = {
            let (pool2, started) = (pool.clone(), started.clone());
            pool.lease(
                Duration::from_secs(30),
                &closed,
                move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    let pool = pool2.clone();
                    tokio::spawn(async move {
                        pool.receiver_ended();
                        pool.wake();
                        let held = serve_held(&pool, "j1", 0);
                        assert!(held.await.unwrap(), "the claim was answered");
                    });
                    true
                },
                shut_down,
            )
            .await
        };
        assert_eq!(leased.unwrap().unwrap().id, "j1");
        assert_eq!(started.load(Ordering::SeqCst), 1);
        assert_eq!(pool.counts(now_ms()), PoolCounts::default());
    }

    #[tokio::test]
    async fn the_earliest_due_job_is_leased_first_and_an_early_one_waits() {
        let pool = Arc::new(JobPool::new());
        let (_open, closed) = watch::channel(false);
        let later = serve_held(&pool, "later", 2);
        let first = serve_held(&pool, "first", 1);
        let early = serve_held(&pool, "early", now_ms() + 3_600_000);
        while pool.counts(now_ms()) != (PoolCounts { ready: 2, early: 1 }) {
            tokio::task::yield_now().await;
        }
        let lease = || pool.lease(Duration::ZERO, &closed, || true, shut_down);
        assert_eq!(lease().await.unwrap().unwrap().id, "first");
        assert_eq!(lease().await.unwrap().unwrap().id, "later");
        assert!(lease().await.unwrap().is_none(), "the early job is not due");
        assert!(first.await.unwrap() && later.await.unwrap());
        early.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_unclaimed_job_is_given_back_after_its_hold() {
        let pool = JobPool::new();
        let (_open, closed) = watch::channel(false);
        let now = now_ms();
        let claim = pool.hold(now, now, Duration::from_secs(1), &closed).await;
        assert!(claim.is_none());
        assert_eq!(pool.counts(now_ms()), PoolCounts::default());
    }

    #[tokio::test]
    async fn closing_gives_back_held_jobs_and_fails_lease_calls() {
        let pool = JobPool::new();
        let (close, closed) = watch::channel(false);
        let now = now_ms();
        let held = pool.hold(now, now, Duration::from_secs(60), &closed);
        let closing = async {
            close.send_replace(true);
        };
        let (claim, ()) = tokio::join!(held, closing);
        assert!(claim.is_none());
        assert_eq!(pool.counts(now_ms()), PoolCounts::default());
        let leased = pool
            .lease(Duration::from_secs(60), &closed, || true, shut_down)
            .await;
        assert!(matches!(leased, Err(QueueError::Unavailable(m)) if m == "shut down"));
    }

    #[tokio::test]
    async fn a_failed_receive_is_the_next_lease_calls_error_once() {
        let pool = JobPool::new();
        let (_open, closed) = watch::channel(false);
        pool.fail("broker away".into());
        pool.wake();
        let leased = pool
            .lease(Duration::ZERO, &closed, || true, shut_down)
            .await;
        assert!(matches!(leased, Err(QueueError::Unavailable(m)) if m == "broker away"));
        let again = pool
            .lease(Duration::ZERO, &closed, || true, shut_down)
            .await;
        assert!(matches!(again, Ok(None)));
    }

    #[tokio::test]
    async fn a_bridge_that_cannot_start_a_receiver_fails_the_call() {
        let pool = JobPool::new();
        let (_open, closed) = watch::channel(false);
        let leased = pool
            .lease(Duration::from_secs(60), &closed, || false, shut_down)
            .await;
        assert!(matches!(leased, Err(QueueError::Unavailable(_))));
        assert_eq!(pool.receivers.load(Ordering::SeqCst), 0);
        assert_eq!(pool.waiting.load(Ordering::SeqCst), 0);
    }
}
