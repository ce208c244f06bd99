//! What a job looks like inside KubeMQ: the body of a queue message is a [`JobRecord`] (JSON),
//! the body of a dead letter a [`DeadRecord`]. Everything the bridge needs to plan a job lives
//! in the body — attempt, first enqueue time, the millisecond time it may run from — because
//! KubeMQ keeps no per-message state the bridge could write, and counts time in whole seconds.
//!
//! The one thing KubeMQ adds is its receive count: a message that comes back with a count
//! above one was received before and returned without the bridge settling it (a lessee that
//! died, a lost connection). The bridge counts each such return as an expired lease
//! ([`JobRecord::attempt_at`]).
//!
//! The records and what they mean are core's ([`purista_core::kit::JobRecord`]); this file
//! says how they travel as KubeMQ message bytes ([`JobBody`], [`DeadBody`]).

pub use purista_core::kit::{DeadRecord, JobRecord};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A [`JobRecord`] as the bytes of a KubeMQ queue message.
pub trait JobBody: Sized {
    /// JSON bytes.
    fn encode(&self) -> Vec<u8>;
    /// From JSON bytes. A record without `visibleAtMs` is due at once.
    fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error>;
}

impl JobBody for JobRecord {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        lenient(bytes, |record| Some(record))
    }
}

/// A [`DeadRecord`] as the bytes of a message in a dead-letter channel.
pub trait DeadBody: Sized {
    /// JSON bytes.
    fn encode(&self) -> Vec<u8>;
    /// From the bytes of a message in a dead-letter channel: a dead record, or a job record
    /// KubeMQ itself moved there after too many receives.
    fn decode(bytes: &[u8], rerouted_reason: &str) -> Option<Self>;
}

impl DeadBody for DeadRecord {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn decode(bytes: &[u8], rerouted_reason: &str) -> Option<Self> {
        let dead = lenient(bytes, |record| match record {
            Value::Object(fields) => fields.get_mut("job"),
            _ => None,
        });
        if let Ok(dead) = dead {
            return Some(dead);
        }
        let job = JobRecord::decode(bytes).ok()?;
        Some(DeadRecord {
            job,
            reason: rerouted_reason.to_string(),
            dead_lettered_at_ms: 0,
        })
    }
}

/// `T` from `bytes`. This bridge has always read a job record without `visibleAtMs` as due at
/// once, while core's record requires the field: when the strict read fails, the job that
/// `job_of` finds in the JSON gets `visibleAtMs: 0` if it lacks one, and is read again.
fn lenient<T: DeserializeOwned>(
    bytes: &[u8],
    job_of: impl FnOnce(&mut Value) -> Option<&mut Value>,
) -> Result<T, serde_json::Error> {
    let error = match serde_json::from_slice(bytes) {
        Ok(record) => return Ok(record),
        Err(error) => error,
    };
    let Ok(mut record) = serde_json::from_slice::<Value>(bytes) else {
        return Err(error);
    };
    match job_of(&mut record) {
        Some(Value::Object(job)) if !job.contains_key("visibleAtMs") => {
            job.insert("visibleAtMs".into(), Value::from(0_u64));
        }
        _ => return Err(error),
    }
    serde_json::from_value(record).map_err(|_| error)
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
                principal_id: Some("u1".into()),
                ..NewJob::default()
            },
            1_000,
        );
        let back = JobRecord::decode(&job.encode()).unwrap();
        assert_eq!(back, job);
        assert_eq!(back.visible_at_ms, 5_000);
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

    #[test]
    fn a_record_without_visible_at_reads_as_due_at_once() {
        let job = JobRecord::new("q", NewJob::default(), 1);
        let mut fields = serde_json::to_value(&job).unwrap();
        fields.as_object_mut().unwrap().remove("visibleAtMs");
        let bytes = serde_json::to_vec(&fields).unwrap();
        let back = JobRecord::decode(&bytes).unwrap();
        assert_eq!(back, job.next(1, 0));
        let dead = json!({"job": fields, "reason": "bad", "deadLetteredAtMs": 9});
        let dead = DeadRecord::decode(&serde_json::to_vec(&dead).unwrap(), "x").unwrap();
        assert_eq!((dead.job, dead.reason.as_str()), (job.next(1, 0), "bad"));
        assert!(JobRecord::decode(br#"{"id": "x"}"#).is_err());
    }
}
