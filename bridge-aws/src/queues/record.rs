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
//!
//! The records and what they mean are core's ([`purista_core::kit::JobRecord`]); this file
//! says how they travel as SQS message text ([`JobBody`], [`DeadBody`]).

pub use purista_core::kit::{DeadRecord, JobRecord, MAX_REASON_BYTES, cut};

/// Room a dead record needs beyond its job: the wrapper and a reason of at most
/// [`MAX_REASON_BYTES`] (JSON-escaped, so up to 6 bytes a character in the worst case is not
/// assumed: reasons are cut at [`MAX_REASON_BYTES`] of escaped text).
pub const DEAD_RECORD_OVERHEAD: usize = 2 * 1024;

/// A [`JobRecord`] as the text body of an SQS message.
pub trait JobBody: Sized {
    /// The JSON body.
    fn encode(&self) -> String;
    /// From a message body.
    fn decode(body: &str) -> Result<Self, serde_json::Error>;
}

impl JobBody for JobRecord {
    fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn decode(body: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(body)
    }
}

/// A [`DeadRecord`] as the text body of a message in a dead-letter queue.
pub trait DeadBody: Sized {
    /// The JSON body.
    fn encode(&self) -> String;
    /// From a dead-letter queue's message body.
    fn decode(body: &str) -> Option<Self>;
}

impl DeadBody for DeadRecord {
    fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn decode(body: &str) -> Option<Self> {
        serde_json::from_str(body).ok()
    }
}

#[cfg(test)]
mod tests {
    use purista_core::queue::NewJob;
    use serde_json::json;

    use super::*;

    #[test]
    fn a_job_survives_its_encoding() {
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
