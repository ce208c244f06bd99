//! What a job looks like inside KubeMQ: the body of a queue message is a [`JobRecord`] (JSON),
//! the body of a dead letter a [`DeadRecord`]. Everything the bridge needs to plan a job lives
//! in the body — attempt, first enqueue time, the millisecond time it may run from — because
//! KubeMQ keeps no per-message state the bridge could write, and counts time in whole seconds.
//!
//! The one thing KubeMQ adds is its receive count: a message that comes back with a count
//! above one was received before and returned without the bridge settling it (a lessee that
//! died, a lost connection). The bridge counts each such return as an expired lease
//! ([`JobRecord::attempt_at`]).

use purista_core::queue::{DeadLetteredJob, LeasedJob, NewJob};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job as stored in its queue channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecord {
    /// Job id (also the KubeMQ message id).
    pub id: String,
    /// The queue's name (not its channel).
    pub queue: String,
    /// Payload.
    pub payload: Value,
    /// Parameter.
    pub parameter: Value,
    /// The attempt this copy is for when received the first time (1 for a new job).
    pub attempt: u32,
    /// First enqueue (epoch ms): the retry window counts from here.
    pub enqueued_at_ms: u64,
    /// Not to be leased before (epoch ms). KubeMQ delays by whole seconds; the rest the
    /// lessee waits out.
    #[serde(default)]
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

/// A dead-lettered job as stored in the dead-letter queue's channel.
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
    /// A new job of `queue`, enqueued now.
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

    /// The attempt of a copy KubeMQ hands out for the `receive_count`-th time: every receive
    /// before this one ended without the bridge settling it, which counts as an expired lease.
    pub fn attempt_at(&self, receive_count: i32) -> u32 {
        let returns = u32::try_from(receive_count.max(1) - 1).unwrap_or(0);
        self.attempt.saturating_add(returns)
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

    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// From JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl DeadRecord {
    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// From the bytes of a message in a dead-letter channel: a dead record, or a job record
    /// KubeMQ itself moved there after too many receives.
    pub fn decode(bytes: &[u8], rerouted_reason: &str) -> Option<Self> {
        if let Ok(dead) = serde_json::from_slice::<DeadRecord>(bytes) {
            return Some(dead);
        }
        let job = JobRecord::decode(bytes).ok()?;
        Some(DeadRecord {
            job,
            reason: rerouted_reason.to_string(),
            dead_lettered_at_ms: 0,
        })
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_job_survives_its_encoding_and_counts_returns_as_attempts() {
        let job = JobRecord::new(
            "emails",
            NewJob {
                payload: json!({"to": "ada"}),
                run_at_ms: Some(5_000),
                principal_id: Some("u1".into()),
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
    fn a_job_kubemq_rerouted_reads_as_a_dead_letter_with_a_reason() {
        let job = JobRecord::new("q", NewJob::default(), 1);
        let dead = DeadRecord::decode(&job.encode(), "received too often").unwrap();
        assert_eq!(dead.reason, "received too often");
        let record = DeadRecord {
            job: job.clone(),
            reason: "bad".into(),
            dead_lettered_at_ms: 9,
        };
        assert_eq!(DeadRecord::decode(&record.encode(), "x").unwrap(), record);
        assert!(DeadRecord::decode(b"not json", "x").is_none());
    }
}
