//! A job as a queue bridge stores it in a broker message: a [`JobRecord`] (JSON) in the job
//! queue, a [`DeadRecord`] in its dead-letter queue.
//!
//! Brokers such as SQS and KubeMQ keep no per-message state a bridge could write and count
//! delays in whole seconds, so everything a bridge plans with — attempt, first enqueue time,
//! the millisecond time the job may run from — lives in the body. The field names are the
//! wire format of messages already sitting in queues: renaming one strands them.
//!
//! What a broker adds is its receive count: a copy handed out again without the bridge
//! settling it (a lessee that died, a lost connection) counts each such return as an expired
//! lease ([`JobRecord::attempt_at`]). How the JSON travels (text or bytes, which envelope) is
//! the bridge's business.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::queue::{DeadLetteredJob, LeasedJob, NewJob};

/// Longest reason [`DeadRecord::new`] keeps (a handler's error text can be long; the job must
/// still fit the message).
pub const MAX_REASON_BYTES: usize = 1024;

/// A job as stored in its queue. Every field the bridge plans with is required, so JSON that
/// merely looks like an object is no job.
///
/// ```
/// use purista_core::kit::JobRecord;
/// use purista_core::queue::NewJob;
/// let job = JobRecord::new("emails", NewJob::default(), 1_000);
/// assert_eq!((job.attempt, job.visible_at_ms), (1, 1_000));
/// assert_eq!(job.attempt_at(3), 3, "two unsettled returns are two attempts");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// Job id (PURISTA's, not the broker's message id).
    pub id: String,
    /// The job queue's name (not the broker's name for it).
    pub queue: String,
    /// Payload.
    pub payload: Value,
    /// Parameter.
    pub parameter: Value,
    /// The attempt this copy is for when received the first time (1 for a new job).
    pub attempt: u32,
    /// First enqueue (epoch ms): the retry window counts from here.
    pub enqueued_at_ms: u64,
    /// Not to be leased before (epoch ms). Brokers delay whole seconds; the rest the
    /// receiving instance waits out or sends on.
    pub visible_at_ms: u64,
    /// Idempotency key (kept, not enforced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C trace-context carrier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otp: Option<String>,
    /// Principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_id: Option<String>,
    /// Tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Per-job attempts override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// A dead-lettered job as stored in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadRecord {
    /// The job as last leased.
    pub job: JobRecord,
    /// Why.
    pub reason: String,
    /// When (epoch ms).
    pub dead_lettered_at_ms: u64,
}

impl JobRecord {
    /// A new job of `queue`, enqueued at `now_ms`; due at its `run_at_ms`, never before now.
    pub fn new(queue: &str, job: NewJob, now_ms: u64) -> Self {
        JobRecord {
            id: crate::ids::new_id(),
            queue: queue.to_string(),
            payload: job.payload,
            parameter: job.parameter,
            attempt: 1,
            enqueued_at_ms: now_ms,
            visible_at_ms: job.run_at_ms.unwrap_or(now_ms).max(now_ms),
            idempotency_key: job.idempotency_key,
            trace_id: job.trace_id,
            otp: job.otp,
            principal_id: job.principal_id,
            tenant_id: job.tenant_id,
            max_attempts: job.max_attempts,
        }
    }

    /// The attempt of a copy the broker hands out for the `receive_count`-th time: every
    /// receive before this one ended without the bridge settling it, which counts as an
    /// expired lease. A count of 0 (a broker that does not count) is the first receive.
    pub fn attempt_at(&self, receive_count: u32) -> u32 {
        self.attempt
            .saturating_add(receive_count.max(1).saturating_sub(1))
    }

    /// The job as a worker sees it under a lease.
    pub fn leased(&self, attempt: u32, lease_token: String, expires_at_ms: u64) -> LeasedJob {
        LeasedJob {
            id: self.id.clone(),
            queue: self.queue.clone(),
            payload: self.payload.clone(),
            parameter: self.parameter.clone(),
            attempt,
            lease_token,
            lease_expires_at_ms: expires_at_ms,
            extensions: 0,
            enqueued_at_ms: self.enqueued_at_ms,
            idempotency_key: self.idempotency_key.clone(),
            trace_id: self.trace_id.clone(),
            otp: self.otp.clone(),
            principal_id: self.principal_id.clone(),
            tenant_id: self.tenant_id.clone(),
            max_attempts: self.max_attempts,
        }
    }

    /// This job again for `attempt`, not before `visible_at_ms`.
    pub fn next(&self, attempt: u32, visible_at_ms: u64) -> Self {
        JobRecord {
            attempt,
            visible_at_ms,
            ..self.clone()
        }
    }

    /// The job put back by a replay: a fresh attempt budget and retry window.
    pub fn replayed(&self, now_ms: u64) -> Self {
        JobRecord {
            attempt: 1,
            enqueued_at_ms: now_ms,
            visible_at_ms: now_ms,
            ..self.clone()
        }
    }
}

impl DeadRecord {
    /// `job` dead-lettered at `now_ms` for `reason` (cut to [`MAX_REASON_BYTES`]).
    pub fn new(job: JobRecord, reason: &str, now_ms: u64) -> Self {
        DeadRecord {
            job,
            reason: cut(reason, MAX_REASON_BYTES),
            dead_lettered_at_ms: now_ms,
        }
    }

    /// As core reports it: the job as last leased, without a lease.
    pub fn to_dead_lettered(&self) -> DeadLetteredJob {
        DeadLetteredJob {
            job: self.job.leased(self.job.attempt, String::new(), 0),
            reason: self.reason.clone(),
            dead_lettered_at_ms: self.dead_lettered_at_ms,
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
///
/// ```
/// assert_eq!(purista_core::kit::cut("héllo", 2), "h");
/// ```
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job() -> JobRecord {
        JobRecord::new(
            "emails",
            NewJob {
                payload: json!({"to": "ada"}),
                run_at_ms: Some(5_000),
                tenant_id: Some("t1".into()),
                ..NewJob::default()
            },
            1_000,
        )
    }

    #[test]
    fn a_new_job_is_attempt_one_due_at_its_run_time_but_never_in_the_past() {
        let job = job();
        assert_eq!(
            (job.attempt, job.enqueued_at_ms, job.visible_at_ms),
            (1, 1_000, 5_000)
        );
        let late = JobRecord::new(
            "q",
            NewJob {
                run_at_ms: Some(10),
                ..NewJob::default()
            },
            1_000,
        );
        assert_eq!(late.visible_at_ms, 1_000);
    }

    #[test]
    fn unsettled_returns_count_as_attempts() {
        let job = job().next(2, 5_000);
        assert_eq!(job.attempt_at(0), 2);
        assert_eq!(job.attempt_at(1), 2);
        assert_eq!(job.attempt_at(3), 4);
        assert_eq!(job.attempt_at(u32::MAX), u32::MAX, "saturates");
    }

    #[test]
    fn the_wire_fields_keep_their_names_and_absent_options_stay_absent() {
        let mut job = job();
        job.id = "j1".into();
        let text = serde_json::to_string(&job).unwrap();
        assert_eq!(
            text,
            r#"{"id":"j1","queue":"emails","payload":{"to":"ada"},"parameter":null,"attempt":1,"enqueuedAtMs":1000,"visibleAtMs":5000,"tenantId":"t1"}"#
        );
        assert_eq!(serde_json::from_str::<JobRecord>(&text).unwrap(), job);
        let dead = DeadRecord::new(job, "bad", 9);
        let text = serde_json::to_string(&dead).unwrap();
        assert!(text.starts_with(r#"{"job":{"id":"j1""#), "{text}");
        assert!(
            text.ends_with(r#""reason":"bad","deadLetteredAtMs":9}"#),
            "{text}"
        );
    }

    #[test]
    fn json_that_is_not_a_job_does_not_decode_as_one() {
        for body in [
            "{}",
            r#"{"id": 7, "queue": "q", "payload": 1, "parameter": 1, "attempt": 1, "enqueuedAtMs": 1, "visibleAtMs": 1}"#,
            r#"{"id": "x", "queue": "q", "payload": 1, "parameter": 1, "attempt": 1, "enqueuedAtMs": 1}"#,
        ] {
            assert!(serde_json::from_str::<JobRecord>(body).is_err(), "{body}");
        }
    }

    #[test]
    fn a_retry_keeps_the_job_and_a_replay_starts_it_afresh() {
        let job = job();
        let retry = job.next(3, 7_000);
        assert_eq!(
            (retry.id.as_str(), retry.attempt, retry.visible_at_ms),
            (job.id.as_str(), 3, 7_000)
        );
        assert_eq!(retry.enqueued_at_ms, job.enqueued_at_ms);
        let replay = retry.replayed(9_000);
        assert_eq!(
            (replay.attempt, replay.enqueued_at_ms, replay.visible_at_ms),
            (1, 9_000, 9_000)
        );
        assert_eq!(replay.payload, job.payload);
    }

    #[test]
    fn a_dead_record_keeps_the_job_and_a_bounded_reason() {
        let job = job();
        let dead = DeadRecord::new(job.clone(), &"é".repeat(2_000), 9);
        assert!(dead.reason.len() <= MAX_REASON_BYTES);
        assert!(dead.reason.chars().all(|c| c == 'é'));
        let reported = dead.to_dead_lettered();
        assert_eq!(reported.job.id, job.id);
        assert_eq!(reported.job.attempt, job.attempt);
        assert_eq!(reported.job.tenant_id, job.tenant_id);
        assert_eq!(reported.dead_lettered_at_ms, 9);
    }

    #[test]
    fn a_lease_carries_the_jobs_fields_and_the_lease() {
        let job = job();
        let leased = job.leased(2, "tok".into(), 42);
        assert_eq!(
            (
                leased.attempt,
                leased.lease_token.as_str(),
                leased.lease_expires_at_ms
            ),
            (2, "tok", 42)
        );
        assert_eq!(
            (leased.queue.as_str(), &leased.payload),
            ("emails", &job.payload)
        );
        assert_eq!(leased.extensions, 0);
    }
}
