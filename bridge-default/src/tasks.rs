//! The set of tasks one bridge instance has spawned, so that shutdown can wait for them and
//! stop what is left.
//!
//! Every task the bridge starts for a registration (a subscription consumer, a delivery, a
//! command handler run, a stream producer) goes through [`TaskSet::spawn`]. Shutdown closes the
//! set, waits until it is empty or the deadline passes, and then aborts the rest and names them
//! in the drain report. A task panicking is caught and logged here; it never takes anything
//! else down.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use parking_lot::Mutex;
use purista_core::WorkKind;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

/// Tasks of one bridge instance, labelled by kind and registration.
pub(crate) struct TaskSet {
    state: Mutex<State>,
    empty: Notify,
}

struct State {
    open: bool,
    next_ticket: u64,
    running: HashMap<u64, Running>,
}

struct Running {
    kind: WorkKind,
    label: Arc<str>,
    abort: AbortHandle,
}

impl TaskSet {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(TaskSet {
            state: Mutex::new(State {
                open: true,
                next_ticket: 0,
                running: HashMap::new(),
            }),
            empty: Notify::new(),
        })
    }

    /// Spawns `fut` as a task of this set. `false` (and `fut` dropped) once the set is closed.
    pub(crate) fn spawn<F>(self: &Arc<Self>, kind: WorkKind, label: Arc<str>, fut: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut state = self.state.lock();
        if !state.open {
            return false;
        }
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let set = Arc::clone(self);
        let task_label = label.clone();
        // The guard is created inside the task: dropping a never-polled future must not try to
        // take the lock that is held right here.
        let handle = tokio::spawn(async move {
            let _finished = Finished { set, ticket };
            if AssertUnwindSafe(fut).catch_unwind().await.is_err() {
                tracing::error!(registration = %task_label, kind = ?kind, "bridge task panicked");
            }
        });
        state.running.insert(
            ticket,
            Running {
                kind,
                label,
                abort: handle.abort_handle(),
            },
        );
        true
    }

    /// Refuses new tasks from now on.
    pub(crate) fn close(&self) {
        self.state.lock().open = false;
    }

    /// Waits until no task runs or `deadline` passes. True when the set became empty.
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

    /// Aborts every running task and returns what they were, oldest first.
    pub(crate) fn abort_all(&self) -> Vec<(WorkKind, String)> {
        let mut running: Vec<(u64, Running)> = self.state.lock().running.drain().collect();
        running.sort_by_key(|(ticket, _)| *ticket);
        running
            .into_iter()
            .map(|(_, r)| {
                r.abort.abort();
                (r.kind, r.label.to_string())
            })
            .collect()
    }
}

/// Removes a task's entry when the task ends, however it ends.
struct Finished {
    set: Arc<TaskSet>,
    ticket: u64,
}

impl Drop for Finished {
    fn drop(&mut self) {
        let now_empty = {
            let mut state = self.set.state.lock();
            state.running.remove(&self.ticket);
            state.running.is_empty()
        };
        if now_empty {
            self.set.empty.notify_waiters();
        }
    }
}
