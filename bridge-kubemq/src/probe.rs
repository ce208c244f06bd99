//! Readiness: KubeMQ confirms no subscription (a real server sends the stream's headers only
//! with its first message), so a new consumer is known to be routed to only once it has
//! received something. Registration sends probes — an event on a channel its pattern matches
//! and no message uses, or a query on its command channel — tagged with a fresh id, until this
//! consumer reports one (in a group another member may take a probe, hence the repetition).
//! Every consumer drops probes without handing them to a handler.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_core::BridgeError;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long one probe is given before the next is sent.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// What one consumer saw of its probes.
#[derive(Default)]
pub struct ProbeSeen {
    ids: Mutex<Vec<String>>,
    seen: Notify,
}

impl ProbeSeen {
    /// A consumer got probe `id`.
    pub fn saw(&self, id: &str) {
        let mut ids = self.ids.lock();
        ids.push(id.to_string());
        if ids.len() > 64 {
            ids.remove(0);
        }
        drop(ids);
        self.seen.notify_waiters();
    }

    fn has(&self, ids: &[String]) -> bool {
        let seen = self.ids.lock();
        ids.iter().any(|id| seen.contains(id))
    }
}

/// Sends probes with `send(id)` until `seen` has one of them or `timeout` passes.
pub async fn until_routed<F, Fut>(
    seen: &Arc<ProbeSeen>,
    timeout: Duration,
    what: &str,
    send: F,
) -> Result<(), BridgeError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = Instant::now() + timeout;
    let mut sent = Vec::new();
    while Instant::now() < deadline {
        let id = purista_core::ids::new_id();
        sent.push(id.clone());
        let notified = seen.seen.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if seen.has(&sent) {
            return Ok(());
        }
        send(id).await;
        let until = (Instant::now() + PROBE_INTERVAL).min(deadline);
        loop {
            if seen.has(&sent) {
                return Ok(());
            }
            if tokio::time::timeout_at(until, notified.as_mut())
                .await
                .is_err()
            {
                break;
            }
            notified.set(seen.seen.notified());
            notified.as_mut().enable();
        }
    }
    if seen.has(&sent) {
        return Ok(());
    }
    Err(BridgeError::Unavailable(format!(
        "KubeMQ did not route to {what} within {} ms",
        timeout.as_millis()
    )))
}
