//! One queue's jobs (pending, delayed, leased) and the state changes the bridge applies to them.
//!
//! A job is either *pending*, visible from `visible_at_ms` on (before that it is delayed), or
//! *leased*, hidden until its lease expires. Two ordered sets index them: pending jobs by
//! `(visible_at_ms, seq)`, which is exactly the FIFO lease order, and leases by
//! `(expires_at_ms, seq)`, so expired leases are found at the front. `seq` is the enqueue order.
//!
//! Lease expiry is applied lazily at the start of every operation ([`JobStore::maintain`]),
//! using the expiry time as the decision time, so *when* it is applied never changes *what*
//! happens; the store remembers the earliest time anything can expire, so operations before it
//! skip the look. What a settlement or an expiry means is decided by [`QueueConfig::plan`] in
//! core; this file only carries out the resulting [`JobDisposition`]. The plan reads a job's
//! attempt counts and enqueue time, so it is handed a view with just those (see
//! [`StoredJob::planning_view`]) instead of a copy of the payload; a full [`LeasedJob`] is built,
//! by moving the stored job, only when the job goes to the dead-letter queue.

use std::collections::BTreeSet;
use std::time::Duration;

use parking_lot::Mutex;
use purista_core::ids::new_id;
use purista_core::queue::{
    DeadLetteredJob, JobDisposition, JobSettlement, LeasedJob, NewJob, QueueConfig, QueueError,
};
use serde_json::Value;

use super::clock::millis;
use super::dead_letter::DeadLetters;
use super::idempotency::IdempotencyKeys;
use purista_core::kit::FastMap;

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
    otp: Option<String>,
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
            otp: self.otp.clone(),
            principal_id: self.principal_id.clone(),
            tenant_id: self.tenant_id.clone(),
            max_attempts: self.max_attempts,
        }
    }
}

impl StoredJob {
    /// What [`QueueConfig::plan`] reads of the job under `lease`: attempts, the per-job
    /// attempt limit and the enqueue time. Everything else is left empty, so planning a
    /// settlement copies nothing (the `plan_reads_only_what_the_planning_view_keeps` test pins
    /// this down).
    fn planning_view(&self, lease: &Lease) -> LeasedJob {
        LeasedJob {
            id: String::new(),
            queue: String::new(),
            payload: Value::Null,
            parameter: Value::Null,
            attempt: self.attempt,
            lease_token: String::new(),
            lease_expires_at_ms: lease.expires_at_ms,
            extensions: lease.extensions,
            enqueued_at_ms: self.enqueued_at_ms,
            idempotency_key: None,
            trace_id: None,
            otp: None,
            principal_id: None,
            tenant_id: None,
            max_attempts: self.max_attempts,
        }
    }

    /// The job as a worker last saw it under its lease, taking the stored data instead of
    /// copying it. `None` when it is not leased.
    fn into_leased(self, queue: &str) -> Option<LeasedJob> {
        let JobState::Leased(lease) = self.state else {
            return None;
        };
        Some(LeasedJob {
            id: self.id,
            queue: queue.to_owned(),
            payload: self.payload,
            parameter: self.parameter,
            attempt: self.attempt,
            lease_token: lease.token,
            lease_expires_at_ms: lease.expires_at_ms,
            extensions: lease.extensions,
            enqueued_at_ms: self.enqueued_at_ms,
            idempotency_key: self.idempotency_key,
            trace_id: self.trace_id,
            otp: self.otp,
            principal_id: self.principal_id,
            tenant_id: self.tenant_id,
            max_attempts: self.max_attempts,
        })
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

/// One declared queue: its settings and its jobs.
#[derive(Debug)]
pub(crate) struct JobStore {
    name: String,
    config: QueueConfig,
    /// `config.dead_letter_queue_for(name)`, kept with the config.
    dead_letter_queue: String,
    jobs: FastMap<u64, StoredJob>,
    by_id: FastMap<String, u64>,
    pending: BTreeSet<(u64, u64)>,
    leases: BTreeSet<(u64, u64)>,
    idempotency: IdempotencyKeys,
    next_seq: u64,
    /// No lease and no idempotency key expires before this time (it may be earlier than the
    /// first expiry; then [`JobStore::maintain`] looks once for nothing and moves it on).
    maintain_due_ms: u64,
    /// A job became visible sooner than waiters planned for: they should look again.
    wake: bool,
}

impl JobStore {
    /// An empty queue named `name`.
    pub(crate) fn new(name: &str, config: QueueConfig) -> Self {
        JobStore {
            name: name.to_owned(),
            dead_letter_queue: config.dead_letter_queue_for(name),
            config,
            jobs: FastMap::default(),
            by_id: FastMap::default(),
            pending: BTreeSet::new(),
            leases: BTreeSet::new(),
            idempotency: IdempotencyKeys::default(),
            next_seq: 0,
            maintain_due_ms: u64::MAX,
            wake: false,
        }
    }

    /// Whether waiting `lease` calls should look again since the last call; resets the flag.
    pub(crate) fn take_wake(&mut self) -> bool {
        std::mem::take(&mut self.wake)
    }

    /// The name of this queue's dead-letter queue.
    pub(crate) fn dead_letter_queue(&self) -> &str {
        &self.dead_letter_queue
    }

    /// Applies what time has done by `now_ms`: expired leases and expired idempotency keys.
    pub(crate) fn maintain(&mut self, now_ms: u64, dead_letters: &Mutex<DeadLetters>) {
        if now_ms < self.maintain_due_ms {
            return;
        }
        self.idempotency.forget_expired(now_ms);
        self.expire_leases(now_ms, dead_letters);
        let lease = self.leases.first().map_or(u64::MAX, |&(at, _)| at);
        let key = self.idempotency.first_expiry().unwrap_or(u64::MAX);
        self.maintain_due_ms = lease.min(key);
    }

    /// Something will expire at `at_ms`: maintenance is due then at the latest.
    fn expires_at(&mut self, at_ms: u64) {
        self.maintain_due_ms = self.maintain_due_ms.min(at_ms);
    }

    /// Adds a job, or returns the first job's id for a remembered idempotency key.
    pub(crate) fn enqueue(&mut self, job: NewJob, now_ms: u64) -> String {
        if let Some(id) = job
            .idempotency_key
            .as_deref()
            .and_then(|key| self.idempotency.job_id(key))
        {
            return id.to_owned();
        }
        let id = new_id();
        if let Some(key) = &job.idempotency_key {
            let expires_at = now_ms.saturating_add(millis(self.config.retry_window));
            self.idempotency
                .remember(key.clone(), id.clone(), expires_at);
            self.expires_at(expires_at);
        }
        let visible_at_ms = job.run_at_ms.map_or(now_ms, |at| at.max(now_ms));
        self.insert(StoredJob {
            id: id.clone(),
            payload: job.payload,
            parameter: job.parameter,
            idempotency_key: job.idempotency_key,
            trace_id: job.trace_id,
            otp: job.otp,
            principal_id: job.principal_id,
            tenant_id: job.tenant_id,
            max_attempts: job.max_attempts,
            attempt: 0,
            enqueued_at_ms: now_ms,
            state: JobState::Pending { visible_at_ms },
        });
        self.wake = true;
        id
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
            otp: job.otp,
            principal_id: job.principal_id,
            tenant_id: job.tenant_id,
            max_attempts: job.max_attempts,
            attempt: 0,
            enqueued_at_ms: now_ms,
            state: JobState::Pending {
                visible_at_ms: now_ms,
            },
        });
        self.wake = true;
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
        let expires_at_ms = lease.expires_at_ms;
        job.state = JobState::Leased(lease);
        self.expires_at(expires_at_ms);
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

    /// Settles the lease `held` as core's plan says. A job that goes back to pending asks
    /// waiters to look again (see [`JobStore::take_wake`]).
    pub(crate) fn settle(
        &mut self,
        held: &LeasedJob,
        settlement: &JobSettlement,
        now_ms: u64,
        dead_letters: &Mutex<DeadLetters>,
    ) -> Result<(), QueueError> {
        let seq = self.held_lease(held, now_ms)?;
        let Some(job) = self.jobs.get(&seq) else {
            return Err(lease_lost(held));
        };
        let JobState::Leased(lease) = &job.state else {
            return Err(lease_lost(held));
        };
        // Plan on the stored job, not on the caller's copy, which it may have edited.
        let disposition = self
            .config
            .plan(&job.planning_view(lease), settlement, now_ms);
        if self.apply(seq, disposition, now_ms, dead_letters) {
            self.wake = true;
        }
        Ok(())
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
    fn expire_leases(&mut self, now_ms: u64, dead_letters: &Mutex<DeadLetters>) {
        while let Some(&(expires_at_ms, seq)) = self.leases.first() {
            if expires_at_ms > now_ms {
                break;
            }
            let disposition = match self.jobs.get(&seq) {
                Some(
                    job @ StoredJob {
                        state: JobState::Leased(lease),
                        ..
                    },
                ) => self
                    .config
                    .plan_lease_expiry(&job.planning_view(lease), expires_at_ms),
                _ => {
                    // An index entry without its job: nothing left to expire.
                    self.leases.pop_first();
                    continue;
                }
            };
            self.apply(seq, disposition, expires_at_ms, dead_letters);
        }
    }

    /// Carries out `disposition` for the leased job `seq` at `at_ms`. Returns true when the job
    /// is pending again.
    fn apply(
        &mut self,
        seq: u64,
        disposition: JobDisposition,
        at_ms: u64,
        dead_letters: &Mutex<DeadLetters>,
    ) -> bool {
        if let Some(StoredJob {
            state: JobState::Leased(lease),
            ..
        }) = self.jobs.get(&seq)
        {
            self.leases.remove(&(lease.expires_at_ms, seq));
        }
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
                let leased = self.remove(seq).and_then(|job| job.into_leased(&self.name));
                if let Some(job) = leased {
                    dead_letters.lock().push(
                        &self.dead_letter_queue,
                        DeadLetteredJob {
                            job,
                            reason,
                            dead_lettered_at_ms: at_ms,
                        },
                    );
                }
                false
            }
        }
    }

    fn remove(&mut self, seq: u64) -> Option<StoredJob> {
        let job = self.jobs.remove(&seq)?;
        self.by_id.remove(&job.id);
        Some(job)
    }
}

fn lease_lost(held: &LeasedJob) -> QueueError {
    QueueError::LeaseLost {
        job_id: held.id.clone(),
        lease_token: held.lease_token.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use purista_core::queue::{JobSettlement, QueueConfig, RetryStrategy};
    use serde_json::json;

    use super::{JobState, Lease, StoredJob};

    fn job(attempt: u32, max_attempts: Option<u32>, enqueued_at_ms: u64) -> StoredJob {
        StoredJob {
            id: "job-1".into(),
            payload: json!({ "n": 1 }),
            parameter: json!({ "p": true }),
            idempotency_key: Some("key".into()),
            trace_id: Some("trace".into()),
            otp: Some("otp".into()),
            principal_id: Some("principal".into()),
            tenant_id: Some("tenant".into()),
            max_attempts,
            attempt,
            enqueued_at_ms,
            state: JobState::Pending { visible_at_ms: 0 },
        }
    }

    #[test]
    fn plan_reads_only_what_the_planning_view_keeps() {
        let config = QueueConfig {
            max_attempts: 3,
            retry_window: Duration::from_secs(60),
            // Without jitter, so two plans of one retry are equal.
            retry: RetryStrategy {
                jitter_factor: 0.0,
                ..RetryStrategy::default()
            },
            ..QueueConfig::default()
        };
        let lease = Lease {
            token: "token".into(),
            expires_at_ms: 90_000,
            extensions: 1,
        };
        let settlements = [
            JobSettlement::Complete,
            JobSettlement::Retry {
                delay: None,
                reason: Some("again".into()),
            },
            JobSettlement::Retry {
                delay: Some(Duration::from_millis(5)),
                reason: None,
            },
            JobSettlement::Fail {
                fatal: false,
                reason: "flaky".into(),
            },
            JobSettlement::Fail {
                fatal: true,
                reason: "broken".into(),
            },
            JobSettlement::DeadLetter {
                reason: "no".into(),
            },
        ];
        let jobs = [
            job(1, None, 10_000),
            job(3, None, 10_000),
            job(2, Some(2), 10_000),
            job(1, Some(9), 10_000),
            job(1, None, 0),
        ];
        for stored in &jobs {
            let full = stored.leased("q", &lease);
            let view = stored.planning_view(&lease);
            for settlement in &settlements {
                assert_eq!(
                    config.plan(&view, settlement, 61_000),
                    config.plan(&full, settlement, 61_000),
                    "{settlement:?} of a job at attempt {}",
                    stored.attempt
                );
            }
            assert_eq!(
                config.plan_lease_expiry(&view, 61_000),
                config.plan_lease_expiry(&full, 61_000)
            );
        }
    }
}
