//! The set of tasks one bridge instance has spawned, so that shutdown can wait for them and
//! stop what is left; and [`Activity`], one registration's running handlers.
//!
//! Every task a bridge starts for a registration (a subscription consumer, a command handler
//! run, a stream producer, a cleanup) goes through [`TaskSet::spawn`] or [`TaskSet::reserve`]. Shutdown
//! closes the set, waits until it is empty or the deadline passes, and then aborts the rest and
//! names them in the drain report. A task panicking is caught and logged here; it never takes
//! anything else down.
//!
//! Tasks are started on every command, so the bookkeeping is a slab: a task owns one slot (its
//! kind, label and abort handle) for as long as it runs. Taking and freeing a slot is an index
//! operation under a short lock, with no hashing and no allocation once the slab has grown to
//! the number of tasks that run at once. A slot carries a ticket, so a stale index (a task
//! finishing after `abort_all` emptied the slab) never frees somebody else's slot, and tickets
//! give the drain report its oldest-first order.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::inflight::WorkKind;

/// Tasks of one bridge instance, labelled by kind and registration.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use purista_core::kit::TaskSet;
/// use purista_core::WorkKind;
/// let tasks = TaskSet::new();
/// assert!(tasks.spawn(WorkKind::Subscription, "orders@1/onPaid".into(), std::future::pending()));
/// tasks.close(); // nothing new starts
/// let deadline = tokio::time::Instant::now() + Duration::from_millis(10);
/// assert!(!tasks.wait_empty(deadline).await);
/// let aborted = tasks.abort_all(); // named in the drain report
/// assert_eq!(aborted, vec![(WorkKind::Subscription, "orders@1/onPaid".to_string())]);
/// # }
/// ```
pub struct TaskSet {
    state: Mutex<State>,
    empty: Notify,
}

struct State {
    open: bool,
    next_ticket: u64,
    /// `None` = a free slot, listed in `free`.
    slots: Vec<Option<Running>>,
    free: Vec<usize>,
    running: usize,
}

struct Running {
    ticket: u64,
    kind: WorkKind,
    label: Arc<str>,
    /// `None` between [`TaskSet::reserve`] and the spawn.
    abort: Option<AbortHandle>,
}

impl State {
    /// The slot `index` when it still belongs to `ticket`.
    fn slot_of(&mut self, index: usize, ticket: u64) -> Option<&mut Running> {
        self.slots
            .get_mut(index)
            .and_then(Option::as_mut)
            .filter(|running| running.ticket == ticket)
    }
}

impl TaskSet {
    /// An open, empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(TaskSet {
            state: Mutex::new(State {
                open: true,
                next_ticket: 0,
                slots: Vec::new(),
                free: Vec::new(),
                running: 0,
            }),
            empty: Notify::new(),
        })
    }

    /// Spawns `fut` as a task of this set. `false` (and `fut` dropped) once the set is closed.
    pub fn spawn<F>(self: &Arc<Self>, kind: WorkKind, label: Arc<str>, fut: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.reserve(kind, label) {
            Some(reservation) => {
                reservation.spawn(fut);
                true
            }
            None => false,
        }
    }

    /// Spawns `fut` like [`TaskSet::spawn`] and returns once the task has polled it once
    /// (`false`, at once, when the set is closed). For a bridge that spawns a task per
    /// delivery: awaiting this before taking the next delivery makes handlers start in
    /// delivery order, and because core counts a handler as running in its delivery's first
    /// poll, a service that counts its running handlers never sees none while a delivery taken
    /// before a later one has not been counted yet.
    pub async fn spawn_started<F>(self: &Arc<Self>, kind: WorkKind, label: Arc<str>, fut: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (started, begun) = tokio::sync::oneshot::channel::<()>();
        let spawned = self.spawn(kind, label, async move {
            let mut fut = std::pin::pin!(fut);
            let first = futures::poll!(fut.as_mut());
            let _ = started.send(());
            if first.is_pending() {
                fut.await;
            }
        });
        // A task dropped before its first poll (aborted) drops the sender: no wait forever.
        spawned && begun.await.is_ok()
    }

    /// Takes a slot for a task about to be spawned; `None` once the set is closed. The caller
    /// keeps everything it would move into the task until it knows the task will run.
    pub fn reserve(self: &Arc<Self>, kind: WorkKind, label: Arc<str>) -> Option<Reservation> {
        let mut state = self.state.lock();
        if !state.open {
            return None;
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let running = Running {
            ticket,
            kind,
            label,
            abort: None,
        };
        let index = match state.free.pop() {
            Some(index) => {
                state.slots[index] = Some(running);
                index
            }
            None => {
                state.slots.push(Some(running));
                state.slots.len() - 1
            }
        };
        state.running += 1;
        drop(state);
        Some(Reservation {
            finished: Finished {
                set: Arc::clone(self),
                index,
                ticket,
            },
        })
    }

    /// Refuses new tasks from now on.
    pub fn close(&self) {
        self.state.lock().open = false;
    }

    /// Waits until no task runs or `deadline` passes. True when the set became empty.
    pub async fn wait_empty(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.lock().running == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.state.lock().running == 0;
            }
        }
    }

    /// Aborts every running task and returns what they were, oldest first.
    pub fn abort_all(&self) -> Vec<(WorkKind, String)> {
        let mut running: Vec<Running> = {
            let mut state = self.state.lock();
            state.free.clear();
            state.running = 0;
            std::mem::take(&mut state.slots)
                .into_iter()
                .flatten()
                .collect()
        };
        self.empty.notify_waiters();
        running.sort_by_key(|r| r.ticket);
        running
            .into_iter()
            .map(|r| {
                // A task without handle is being spawned: its spawner sees the slot gone and
                // aborts it (see `Reservation::spawn`).
                if let Some(abort) = &r.abort {
                    abort.abort();
                }
                (r.kind, r.label.to_string())
            })
            .collect()
    }

    /// Kind and label of a running task, for its panic log.
    fn describe(&self, index: usize, ticket: u64) -> Option<(WorkKind, Arc<str>)> {
        self.state
            .lock()
            .slot_of(index, ticket)
            .map(|running| (running.kind, running.label.clone()))
    }
}

/// A slot of a [`TaskSet`] taken for one task; freed again if the task is never spawned.
pub struct Reservation {
    finished: Finished,
}

impl Reservation {
    /// Spawns `fut` as the task of this slot.
    pub fn spawn<F>(self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Reservation { finished } = self;
        let set = finished.set.clone();
        let (index, ticket) = (finished.index, finished.ticket);
        let handle = tokio::spawn(async move {
            // Moved in (not created inside), so a task aborted before its first poll still
            // frees its slot when its future is dropped.
            let finished = finished;
            if AssertUnwindSafe(fut).catch_unwind().await.is_err() {
                match finished.set.describe(finished.index, finished.ticket) {
                    Some((kind, label)) => {
                        tracing::error!(registration = %label, kind = ?kind, "bridge task panicked");
                    }
                    None => tracing::error!("bridge task panicked"),
                }
            }
        });
        let mut state = set.state.lock();
        match state.slot_of(index, ticket) {
            Some(running) => running.abort = Some(handle.abort_handle()),
            // Either the task already finished (aborting it is a no-op) or `abort_all` emptied
            // the set meanwhile and reported this task: it must not outlive that.
            None => {
                drop(state);
                handle.abort();
            }
        }
    }
}

/// Frees a task's slot when the task ends, however it ends.
struct Finished {
    set: Arc<TaskSet>,
    index: usize,
    ticket: u64,
}

impl Drop for Finished {
    fn drop(&mut self) {
        let (freed, now_empty) = {
            let mut state = self.set.state.lock();
            let freed = state
                .slot_of(self.index, self.ticket)
                .is_some()
                .then(|| state.slots[self.index].take())
                .flatten();
            if freed.is_some() {
                state.free.push(self.index);
                state.running -= 1;
            }
            (freed, state.running == 0)
        };
        // Label and abort handle are released outside the lock.
        if freed.is_some() && now_empty {
            self.set.empty.notify_waiters();
        }
    }
}

/// Counts one registration's running handlers, so that unregistering can let them settle on
/// their channel before the channel closes.
#[derive(Default)]
pub struct Activity {
    running: AtomicUsize,
    idle: Notify,
}

impl Activity {
    /// Counts one handler run until the guard drops.
    pub fn enter(self: &Arc<Self>) -> ActivityGuard {
        self.running.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    /// Handler runs now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Waits until nothing runs or `deadline` passes; true when idle.
    pub async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.running() == 0;
            }
        }
    }
}

/// Decrements its [`Activity`] when dropped.
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::TaskSet;
    use crate::inflight::WorkKind;

    #[tokio::test]
    async fn abort_all_stops_and_names_what_still_runs_oldest_first() {
        let set = TaskSet::new();
        assert!(set.spawn(WorkKind::Command, "a".into(), std::future::pending()));
        assert!(set.spawn(WorkKind::Subscription, "done".into(), async {}));
        assert!(set.spawn(WorkKind::Stream, "b".into(), std::future::pending()));
        set.close();
        assert!(!set.spawn(WorkKind::Command, "late".into(), async {}));

        let soon = Instant::now() + Duration::from_millis(20);
        assert!(!set.wait_empty(soon).await, "two tasks never end");
        assert_eq!(
            set.abort_all(),
            vec![
                (WorkKind::Command, "a".to_string()),
                (WorkKind::Stream, "b".to_string())
            ]
        );
        assert!(set.wait_empty(Instant::now()).await);
        assert!(set.abort_all().is_empty());
    }

    #[tokio::test]
    async fn finished_tasks_free_their_slots_for_later_ones() {
        let set = TaskSet::new();
        for round in 0..3 {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            assert!(
                set.spawn(WorkKind::Command, format!("r{round}").into(), async {
                    let _ = rx.await;
                })
            );
            drop(tx);
            assert!(
                set.wait_empty(Instant::now() + Duration::from_secs(5))
                    .await
            );
        }
        assert_eq!(set.state.lock().slots.len(), 1);
    }

    #[tokio::test]
    async fn spawn_started_returns_once_the_task_began_and_not_before() {
        let set = TaskSet::new();
        let began = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let task = {
            let (began, release) = (began.clone(), release.clone());
            async move {
                // Work before the first await: done in the first poll.
                began.store(true, std::sync::atomic::Ordering::SeqCst);
                release.notified().await;
            }
        };
        assert!(
            set.spawn_started(WorkKind::Subscription, "s".into(), task)
                .await
        );
        assert!(
            began.load(std::sync::atomic::Ordering::SeqCst),
            "returned before the task's first poll"
        );
        assert!(
            !set.wait_empty(Instant::now() + Duration::from_millis(20))
                .await,
            "returned only when the task had finished, not when it began"
        );
        release.notify_one();
        assert!(
            set.wait_empty(Instant::now() + Duration::from_secs(5))
                .await
        );

        set.close();
        assert!(
            !set.spawn_started(WorkKind::Subscription, "late".into(), async {})
                .await,
            "a closed set spawns nothing and does not wait"
        );
    }
}
