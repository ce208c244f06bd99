//! One queue's jobs (pending, delayed, leased) and the state changes the bridge applies to them.
//!
//! A job is either *pending*, visible from `visible_at_ms` on (before that it is delayed), or
//! *leased*, hidden until its lease expires. Two ordered sets index them: pending jobs by
//! `(visible_at_ms, seq)`, which is exactly the FIFO lease order, and leases by
//! `(expires_at_ms, seq)`, so expired leases are found at the front. `seq` is the enqueue order.
//!
//! Lease expiry is applied lazily at the start of every operation ([`JobStore::maintain`]),
//! using the expiry time as the decision time, so *when* it is applied never changes *what*
//! happens. What a settlement or an expiry means is decided by [`QueueConfig::plan`] in core;
//! this file only carries out the resulting [`JobDisposition`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use purista_core::ids::new_id;
use purista_core::queue::{
    DeadLetteredJob, JobDisposition, JobSettlement, LeasedJob, NewJob, QueueConfig, QueueError,
};
use serde_json::Value;
use tokio::sync::Notify;

use super::clock::millis;
use super::dead_letter::DeadLetters;
use super::idempotency::IdempotencyKeys;

/// A job's place in its lifecycle.
#[derive(Debug, Clone)]
enum JobState {
    /// Waiting; visible (leasable) from `visible_at_ms` on.
    Pending { visible_at_ms: u64 },
    /// Hidden under a lease.
    Leased(Lease),
}

/// The current lease of a job.
#[derive(Debug, Clone)]
struct Lease {
    token: String,
    expires_at_ms: u64,
    extensions: u32,
}

/// A job as the store keeps it.
#[derive(Debug)]
struct StoredJob {
    id: String,
    payload: Value,
    parameter: Value,
    idempotency_key: Option<String>,
    trace_id: Option<String>,
    principal_id: Option<String>,
    tenant_id: Option<String>,
    max_attempts: Option<u32>,
    /// Leases handed out so far (0 until the first lease).
    attempt: u32,
    enqueued_at_ms: u64,
    state: JobState,
}

impl StoredJob {
    /// The job as a worker sees it under `lease`.
    fn leased(&self, queue: &str, lease: &Lease) -> LeasedJob {
        LeasedJob {
            id: self.id.clone(),
            queue: queue.to_owned(),
            payload: self.payload.clone(),
            parameter: self.parameter.clone(),
            attempt: self.attempt,
            lease_token: lease.token.clone(),
            lease_expires_at_ms: lease.expires_at_ms,
            extensions: lease.extensions,
            enqueued_at_ms: self.enqueued_at_ms,
            idempotency_key: self.idempotency_key.clone(),
            trace_id: self.trace_id.clone(),
            principal_id: self.principal_id.clone(),
            tenant_id: self.tenant_id.clone(),
            max_attempts: self.max_attempts,
        }
    }
}

/// Counts of one queue's live jobs at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct JobCounts {
    /// Visible now.
    pub(crate) ready: usize,
    /// Under lease.
    pub(crate) leased: usize,
    /// Not yet visible and not leased.
    pub(crate) delayed: usize,
}

/// One declared queue: its settings, its jobs and the waiters for new work.
#[derive(Debug)]
pub(crate) struct JobStore {
    name: String,
    config: QueueConfig,
    /// Woken whenever a job may have become visible earlier than waiters planned for.
    notify: Arc<Notify>,
    jobs: HashMap<u64, StoredJob>,
    by_id: HashMap<String, u64>,
    pending: BTreeSet<(u64, u64)>,
    leases: BTreeSet<(u64, u64)>,
    idempotency: IdempotencyKeys,
    next_seq: u64,
}

impl JobStore {
    /// An empty queue named `name`.
    pub(crate) fn new(name: &str, config: QueueConfig) -> Self {
        JobStore {
            name: name.to_owned(),
            config,
            notify: Arc::new(Notify::new()),
            jobs: HashMap::new(),
            by_id: HashMap::new(),
            pending: BTreeSet::new(),
            leases: BTreeSet::new(),
            idempotency: IdempotencyKeys::default(),
            next_seq: 0,
        }
    }

    /// Replaces the settings; jobs and their leases stay as they are.
    pub(crate) fn set_config(&mut self, config: QueueConfig) {
        self.config = config;
    }

    /// The name of this queue's dead-letter queue.
    pub(crate) fn dead_letter_queue(&self) -> String {
        self.config.dead_letter_queue_for(&self.name)
    }

    /// The notifier lease waiters listen on.
    pub(crate) fn notify(&self) -> Arc<Notify> {
        Arc::clone(&self.notify)
    }

    /// Wakes every waiting `lease` call so it looks again.
    pub(crate) fn wake_waiters(&self) {
        self.notify.notify_waiters();
    }

    /// Applies what time has done by `now_ms`: expired leases and expired idempotency keys.
    pub(crate) fn maintain(&mut self, now_ms: u64, dead_letters: &mut DeadLetters) {
        self.idempotency.forget_expired(now_ms);
        self.expire_leases(now_ms, dead_letters);
    }

    /// Adds a job, or returns the first job's id for a remembered idempotency key.
    /// The flag is true when a job was created.
    pub(crate) fn enqueue(&mut self, job: NewJob, now_ms: u64) -> (String, bool) {
        if let Some(id) = job
            .idempotency_key
            .as_deref()
            .and_then(|key| self.idempotency.job_id(key))
        {
            return (id.to_owned(), false);
        }
        let id = new_id();
        if let Some(key) = &job.idempotency_key {
            let expires_at = now_ms.saturating_add(millis(self.config.retry_window));
            self.idempotency
                .remember(key.clone(), id.clone(), expires_at);
        }
        let visible_at_ms = job.run_at_ms.map_or(now_ms, |at| at.max(now_ms));
        self.insert(StoredJob {
            id: id.clone(),
            payload: job.payload,
            parameter: job.parameter,
            idempotency_key: job.idempotency_key,
            trace_id: job.trace_id,
            principal_id: job.principal_id,
            tenant_id: job.tenant_id,
            max_attempts: job.max_attempts,
            attempt: 0,
            enqueued_at_ms: now_ms,
            state: JobState::Pending { visible_at_ms },
        });
        (id, true)
    }

    /// Puts a dead-lettered job back as a fresh job: attempts start over and the retry window
    /// restarts now. It keeps its id unless that id is in use again.
    pub(crate) fn requeue(&mut self, dead: DeadLetteredJob, now_ms: u64) {
        let job = dead.job;
        let id = if self.by_id.contains_key(&job.id) {
            new_id()
        } else {
            job.id
        };
        self.insert(StoredJob {
            id,
            payload: job.payload,
            parameter: job.parameter,
            idempotency_key: job.idempotency_key,
            trace_id: job.trace_id,
            principal_id: job.principal_id,
            tenant_id: job.tenant_id,
            max_attempts: job.max_attempts,
            attempt: 0,
            enqueued_at_ms: now_ms,
            state: JobState::Pending {
                visible_at_ms: now_ms,
            },
        });
    }

    /// Leases the first job visible at `now_ms`, if any.
    pub(crate) fn lease_next(&mut self, now_ms: u64) -> Option<LeasedJob> {
        let &(visible_at_ms, seq) = self.pending.first()?;
        if visible_at_ms > now_ms {
            return None;
        }
        self.pending.pop_first();
        let job = self.jobs.get_mut(&seq)?;
        let lease = Lease {
            token: new_id(),
            expires_at_ms: now_ms.saturating_add(millis(self.config.visibility_timeout)),
            extensions: 0,
        };
        job.attempt = job.attempt.saturating_add(1);
        self.leases.insert((lease.expires_at_ms, seq));
        let leased = job.leased(&self.name, &lease);
        job.state = JobState::Leased(lease);
        Some(leased)
    }

    /// Extends the lease `held` by `by` (default: the visibility timeout) from `now_ms`.
    /// Returns the new expiry.
    pub(crate) fn extend(
        &mut self,
        held: &LeasedJob,
        by: Option<Duration>,
        now_ms: u64,
    ) -> Result<u64, QueueError> {
        let seq = self.held_lease(held, now_ms)?;
        let cap = self.config.max_lease_extensions;
        let by = by.unwrap_or(self.config.visibility_timeout);
        let Some(StoredJob {
            state: JobState::Leased(lease),
            ..
        }) = self.jobs.get_mut(&seq)
        else {
            return Err(lease_lost(held));
        };
        if lease.extensions >= cap {
            return Err(QueueError::ExtensionCapReached {
                job_id: held.id.clone(),
                cap,
            });
        }
        // An extension never shortens the lease it extends.
        let expires_at_ms = now_ms.saturating_add(millis(by)).max(lease.expires_at_ms);
        self.leases.remove(&(lease.expires_at_ms, seq));
        self.leases.insert((expires_at_ms, seq));
        lease.expires_at_ms = expires_at_ms;
        lease.extensions += 1;
        Ok(expires_at_ms)
    }

    /// Settles the lease `held` as core's plan says. Returns true when the job went back to
    /// pending (waiters may want to look again).
    pub(crate) fn settle(
        &mut self,
        held: &LeasedJob,
        settlement: &JobSettlement,
        now_ms: u64,
        dead_letters: &mut DeadLetters,
    ) -> Result<bool, QueueError> {
        let seq = self.held_lease(held, now_ms)?;
        let Some(job) = self.jobs.get(&seq) else {
            return Err(lease_lost(held));
        };
        let JobState::Leased(lease) = &job.state else {
            return Err(lease_lost(held));
        };
        // Plan on the stored job, not on the caller's copy, which it may have edited.
        let snapshot = job.leased(&self.name, lease);
        let disposition = self.config.plan(&snapshot, settlement, now_ms);
        Ok(self.apply(seq, snapshot, disposition, now_ms, dead_letters))
    }

    /// Counts the live jobs at `now_ms`.
    pub(crate) fn counts(&self, now_ms: u64) -> JobCounts {
        let ready = self.pending.range(..(now_ms.saturating_add(1), 0)).count();
        JobCounts {
            ready,
            leased: self.leases.len(),
            delayed: self.pending.len() - ready,
        }
    }

    /// The earliest time something may become visible: a delayed job or a lease running out.
    pub(crate) fn next_change_ms(&self) -> Option<u64> {
        let pending = self.pending.first().map(|&(at, _)| at);
        let lease = self.leases.first().map(|&(at, _)| at);
        match (pending, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn insert(&mut self, job: StoredJob) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let JobState::Pending { visible_at_ms } = job.state {
            self.pending.insert((visible_at_ms, seq));
        }
        self.by_id.insert(job.id.clone(), seq);
        self.jobs.insert(seq, job);
    }

    /// The job's sequence number when `held` is its current, unexpired lease.
    fn held_lease(&self, held: &LeasedJob, now_ms: u64) -> Result<u64, QueueError> {
        let seq = self.by_id.get(&held.id).copied();
        let state = seq
            .and_then(|seq| self.jobs.get(&seq))
            .map(|job| &job.state);
        match (seq, state) {
            (Some(seq), Some(JobState::Leased(lease)))
                if lease.token == held.lease_token && lease.expires_at_ms > now_ms =>
            {
                Ok(seq)
            }
            _ => Err(lease_lost(held)),
        }
    }

    /// Leases that ran out by `now_ms` count as a retry without delay at their expiry time.
    fn expire_leases(&mut self, now_ms: u64, dead_letters: &mut DeadLetters) {
        while let Some(&(expires_at_ms, seq)) = self.leases.first() {
            if expires_at_ms > now_ms {
                break;
            }
            let snapshot = match self.jobs.get(&seq) {
                Some(
                    job @ StoredJob {
                        state: JobState::Leased(lease),
                        ..
                    },
                ) => Some(job.leased(&self.name, lease)),
                _ => None,
            };
            let Some(snapshot) = snapshot else {
                // An index entry without its job: nothing left to expire.
                self.leases.pop_first();
                continue;
            };
            let disposition = self.config.plan_lease_expiry(&snapshot, expires_at_ms);
            self.apply(seq, snapshot, disposition, expires_at_ms, dead_letters);
        }
    }

    /// Carries out `disposition` for the leased job `seq` at `at_ms`. Returns true when the job
    /// is pending again.
    fn apply(
        &mut self,
        seq: u64,
        snapshot: LeasedJob,
        disposition: JobDisposition,
        at_ms: u64,
        dead_letters: &mut DeadLetters,
    ) -> bool {
        self.leases.remove(&(snapshot.lease_expires_at_ms, seq));
        match disposition {
            JobDisposition::RetryAfter { delay, .. } => {
                let visible_at_ms = at_ms.saturating_add(millis(delay));
                if let Some(job) = self.jobs.get_mut(&seq) {
                    job.state = JobState::Pending { visible_at_ms };
                    self.pending.insert((visible_at_ms, seq));
                    return true;
                }
                false
            }
            JobDisposition::Complete => {
                self.remove(seq);
                false
            }
            JobDisposition::DeadLetter { reason } => {
                self.remove(seq);
                let dlq = self.dead_letter_queue();
                dead_letters.push(
                    &dlq,
                    DeadLetteredJob {
                        job: snapshot,
                        reason,
                        dead_lettered_at_ms: at_ms,
                    },
                );
                false
            }
        }
    }

    fn remove(&mut self, seq: u64) {
        if let Some(job) = self.jobs.remove(&seq) {
            self.by_id.remove(&job.id);
        }
    }
}

fn lease_lost(held: &LeasedJob) -> QueueError {
    QueueError::LeaseLost {
        job_id: held.id.clone(),
        lease_token: held.lease_token.clone(),
    }
}
