//! The tasks that hold leases, by lease token: how a queue bridge routes `extend_lease` and
//! `settle` to the one task that holds the broker's handle on the job.
//!
//! A bridge whose broker ties a leased message to a receipt or a stream runs one task per
//! lease. That task registers its command channel here under the lease token, and removes it
//! when the lease ends; a call for a token nobody holds, or whose holder ended before it
//! answered, is [`QueueError::LeaseLost`].

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::queue::{JobSettlement, LeasedJob, QueueError};

/// A request to the task that holds a lease.
#[derive(Debug)]
pub enum LeaseCommand {
    /// `extend_lease`.
    Extend {
        /// By how much (the queue's visibility timeout when `None`).
        by: Option<Duration>,
        /// The new expiry (epoch ms).
        reply: oneshot::Sender<Result<u64, QueueError>>,
    },
    /// `settle`.
    Settle {
        /// How.
        settlement: JobSettlement,
        /// Done.
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
}

/// The command channels of the tasks holding leases, by lease token.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use purista_core::kit::{JobRecord, LeaseCommand, LeaseHolders};
/// use purista_core::queue::{NewJob, QueueError};
/// let holders = LeaseHolders::new();
/// let job = JobRecord::new("q", NewJob::default(), 0).leased(1, "t1".into(), 0);
/// let lost = holders
///     .call(&job, |reply| LeaseCommand::Extend { by: None, reply })
///     .await;
/// assert!(matches!(lost, Err(QueueError::LeaseLost { .. })));
/// # }
/// ```
#[derive(Debug, Default)]
pub struct LeaseHolders {
    holders: Mutex<HashMap<String, mpsc::Sender<LeaseCommand>>>,
}

impl LeaseHolders {
    /// No lease held.
    pub fn new() -> Self {
        LeaseHolders::default()
    }

    /// The task behind `commands` holds lease `token`.
    pub fn insert(&self, token: String, commands: mpsc::Sender<LeaseCommand>) {
        self.holders.lock().insert(token, commands);
    }

    /// Lease `token` ended.
    pub fn remove(&self, token: &str) {
        self.holders.lock().remove(token);
    }

    /// Sends the command `make` builds to the task holding `job`'s lease and waits for its
    /// answer. No holder, or a holder that ended first: [`QueueError::LeaseLost`].
    pub async fn call<T>(
        &self,
        job: &LeasedJob,
        make: impl FnOnce(oneshot::Sender<Result<T, QueueError>>) -> LeaseCommand,
    ) -> Result<T, QueueError> {
        let lost = || QueueError::LeaseLost {
            job_id: job.id.clone(),
            lease_token: job.lease_token.clone(),
        };
        let holder = self.holders.lock().get(&job.lease_token).cloned();
        let holder = holder.ok_or_else(lost)?;
        let (tx, rx) = oneshot::channel();
        holder.send(make(tx)).await.map_err(|_| lost())?;
        rx.await.map_err(|_| lost())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(token: &str) -> LeasedJob {
        let mut record = crate::kit::JobRecord::new("q", crate::queue::NewJob::default(), 0);
        record.id = "j1".into();
        record.leased(1, token.into(), 0)
    }

    fn is_lost(result: &Result<u64, QueueError>, token: &str) -> bool {
        matches!(result, Err(QueueError::LeaseLost { job_id, lease_token }) if job_id == "j1" && lease_token == token)
    }

    #[tokio::test]
    async fn a_call_reaches_the_holder_of_its_token_and_gets_its_answer() {
        let holders = LeaseHolders::new();
        let (tx, mut rx) = mpsc::channel(1);
        holders.insert("t1".into(), tx);
        let holder = tokio::spawn(async move {
            if let Some(LeaseCommand::Extend { by, reply }) = rx.recv().await {
                let _ = reply.send(Ok(by.map_or(0, |b| b.as_secs())));
            }
        });
        let extended = holders
            .call(&job("t1"), |reply| LeaseCommand::Extend {
                by: Some(Duration::from_secs(7)),
                reply,
            })
            .await;
        assert_eq!(extended.unwrap(), 7);
        holder.await.unwrap();
    }

    #[tokio::test]
    async fn an_unknown_or_removed_token_is_a_lost_lease() {
        let holders = LeaseHolders::new();
        let (tx, _rx) = mpsc::channel(1);
        holders.insert("t1".into(), tx);
        holders.remove("t1");
        let extend = |reply| LeaseCommand::Extend { by: None, reply };
        assert!(is_lost(&holders.call(&job("t1"), extend).await, "t1"));
        assert!(is_lost(&holders.call(&job("t2"), extend).await, "t2"));
    }

    #[tokio::test]
    async fn a_holder_that_ends_without_answering_is_a_lost_lease() {
        let holders = LeaseHolders::new();
        let (tx, mut rx) = mpsc::channel(1);
        holders.insert("t1".into(), tx);
        let holder = tokio::spawn(async move {
            drop(rx.recv().await);
        });
        let extend = |reply| LeaseCommand::Extend { by: None, reply };
        assert!(is_lost(&holders.call(&job("t1"), extend).await, "t1"));
        holder.await.unwrap();
    }
}
