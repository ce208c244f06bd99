//! Every task this bridge instance spawns, so that shutdown can wait for them and stop the rest.
//!
//! Consumer loops, handler runs and cleanups all go through [`TaskSet::spawn`]. Shutdown closes
//! the set (nothing new starts), waits until it is empty or the deadline passes, then aborts
//! what is left and names it in the drain report. A panicking task is caught and logged here.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use parking_lot::Mutex;
use purista_core::WorkKind;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// The tasks of one bridge instance, labelled by kind and registration.
pub(crate) struct TaskSet {
    state: Mutex<State>,
    empty: Notify,
}

struct State {
    open: bool,
    next: u64,
    running: BTreeMap<u64, (WorkKind, Arc<str>, AbortHandle)>,
}

impl TaskSet {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(TaskSet {
            state: Mutex::new(State {
                open: true,
                next: 0,
                running: BTreeMap::new(),
            }),
            empty: Notify::new(),
        })
    }

    /// Spawns `fut`; `false` (and `fut` dropped) once the set is closed.
    pub(crate) fn spawn<F>(self: &Arc<Self>, kind: WorkKind, label: Arc<str>, fut: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut state = self.state.lock();
        if !state.open {
            return false;
        }
        let ticket = state.next;
        state.next += 1;
        let set = Arc::clone(self);
        let task_label = label.clone();
        let handle = tokio::spawn(async move {
            // Created inside the task: its drop takes the lock that `spawn` holds right now.
            let _done = Done { set, ticket };
            if AssertUnwindSafe(fut).catch_unwind().await.is_err() {
                tracing::error!(registration = %task_label, kind = ?kind, "bridge task panicked");
            }
        });
        state
            .running
            .insert(ticket, (kind, label, handle.abort_handle()));
        true
    }

    /// Refuses new tasks from now on.
    pub(crate) fn close(&self) {
        self.state.lock().open = false;
    }

    /// Waits until no task runs or `deadline` passes; true when empty.
    pub(crate) async fn wait_empty(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state.lock().running.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.state.lock().running.is_empty();
            }
        }
    }

    /// Aborts every running task; returns what they were, oldest first.
    pub(crate) fn abort_all(&self) -> Vec<(WorkKind, String)> {
        let running = std::mem::take(&mut self.state.lock().running);
        running
            .into_values()
            .map(|(kind, label, abort)| {
                abort.abort();
                (kind, label.to_string())
            })
            .collect()
    }
}

struct Done {
    set: Arc<TaskSet>,
    ticket: u64,
}

impl Drop for Done {
    fn drop(&mut self) {
        let empty = {
            let mut state = self.set.state.lock();
            state.running.remove(&self.ticket);
            state.running.is_empty()
        };
        if empty {
            self.set.empty.notify_waiters();
        }
    }
}

/// Counts one registration's running handlers, so that unregistering can let them settle on
/// their channel before it closes.
#[derive(Default)]
pub(crate) struct Activity {
    running: AtomicUsize,
    idle: Notify,
}

impl Activity {
    /// Counts one handler run until the guard drops.
    pub(crate) fn enter(self: &Arc<Self>) -> ActivityGuard {
        self.running.fetch_add(1, Ordering::AcqRel);
        ActivityGuard(self.clone())
    }

    /// Waits until nothing runs or `deadline` passes; true when idle.
    pub(crate) async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.running.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.running.load(Ordering::Acquire) == 0;
            }
        }
    }
}

/// Decrements its [`Activity`] when dropped.
pub(crate) struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
