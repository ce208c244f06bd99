//! What a job looks like inside SQS: the body of a job queue's message is a [`JobRecord`]
//! (JSON), the body of a dead letter a [`DeadRecord`].
//!
//! SQS cannot change a message's body or attributes once sent, and counts delays and
//! visibility in whole seconds. So everything the bridge plans with — attempt, first enqueue
//! time, the millisecond time the job may run from — lives in the body, and every change
//! (a retry, a long delay continued, a dead letter) is a new message followed by the delete of
//! the old one.
//!
//! The one thing SQS adds is its receive count: every copy the bridge sends is received once
//! when all goes well, so a count above one means the copy came back without the bridge
//! settling it (a lessee that died). Each such return counts as an expired lease
//! ([`JobRecord::attempt_at`]).

use purista_core::queue::{DeadLetteredJob, LeasedJob, NewJob};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job as stored in its queue. Every field the bridge plans with is required, so JSON that
/// merely looks like an object is no job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// Job id (PURISTA's; SQS gives each copy a message id of its own).
    pub id: String,
    /// The job queue's name (not its SQS name).
    pub queue: String,
    /// Payload.
    pub payload: Value,
    /// Parameter.
    pub parameter: Value,
    /// The attempt this copy is for when received the first time (1 for a new job).
    pub attempt: u32,
    /// First enqueue (epoch ms): the retry window counts from here.
    pub enqueued_at_ms: u64,
    /// Not to be leased before (epoch ms). SQS delays whole seconds, at most 15 minutes; the
    /// rest the receiving instance waits out or sends on.
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

/// Longest reason kept with a dead letter (a handler's error text can be long; the job must
/// still fit the message).
pub const MAX_REASON_BYTES: usize = 1024;

/// Room a dead record needs beyond its job: the wrapper and a reason of at most
/// [`MAX_REASON_BYTES`] (JSON-escaped, so up to 6 bytes a character in the worst case is not
/// assumed: reasons are cut at [`MAX_REASON_BYTES`] of escaped text).
pub const DEAD_RECORD_OVERHEAD: usize = 2 * 1024;

impl JobRecord {
    /// A new job of `queue`, enqueued at `now_ms`.
    pub fn new(queue: &str, job: NewJob, now_ms: u64) -> Self {
        JobRecord {
            id: purista_core::ids::new_id(),
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

    /// The attempt of a copy SQS hands out for the `receive_count`-th time: every receive
    /// before this one ended without the bridge settling it, which counts as an expired lease.
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

    /// The JSON body.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From a message body.
    pub fn decode(body: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(body)
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

    /// The JSON body.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From a dead-letter queue's message body.
    pub fn decode(body: &str) -> Option<Self> {
        serde_json::from_str(body).ok()
    }

    /// As core reports it.
    pub fn to_dead_lettered(&self) -> DeadLetteredJob {
        DeadLetteredJob {
            job: self.job.leased(self.job.attempt, String::new(), 0),
            reason: self.reason.clone(),
            dead_lettered_at_ms: self.dead_lettered_at_ms,
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
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

    #[test]
    fn a_job_survives_its_encoding_and_counts_unsettled_returns_as_attempts() {
        let job = JobRecord::new(
            "emails",
            NewJob {
                payload: json!({"to": "ada"}),
                run_at_ms: Some(5_000),
                tenant_id: Some("t1".into()),
                ..NewJob::default()
            },
            1_000,
        );
        let back = JobRecord::decode(&job.encode()).unwrap();
        assert_eq!(back, job);
        assert_eq!(back.visible_at_ms, 5_000);
        assert_eq!(back.attempt_at(1), 1);
        assert_eq!(
            back.attempt_at(3),
            3,
            "two unsettled returns are two attempts"
        );
        assert_eq!(back.attempt_at(0), 1);
    }

    #[test]
    fn json_that_is_not_a_job_does_not_decode_as_one() {
        for body in [
            "not json",
            "{}",
            r#"{"id": 7, "queue": "q", "payload": 1, "parameter": 1, "attempt": 1, "enqueuedAtMs": 1, "visibleAtMs": 1}"#,
            r#"{"messageType": "somethingElse", "id": "x"}"#,
        ] {
            assert!(JobRecord::decode(body).is_err(), "{body} decoded as a job");
        }
    }

    #[test]
    fn a_dead_record_keeps_the_job_and_a_bounded_reason() {
        let job = JobRecord::new("q", NewJob::default(), 1);
        let dead = DeadRecord::new(job.clone(), &"é".repeat(2_000), 9);
        assert!(dead.reason.len() <= MAX_REASON_BYTES);
        assert_eq!(DeadRecord::decode(&dead.encode()).unwrap(), dead);
        assert!(DeadRecord::decode(&job.encode()).is_none());
        assert!(DeadRecord::decode("not json").is_none());
    }
}
