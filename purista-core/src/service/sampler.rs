//! The state sampler of a running service: every interval it reads what the bridges know about
//! themselves (reconnects, poison messages, paused consumers, each worked queue's depth) into
//! the sampled metrics of [`observe::metrics`](crate::observe::metrics). It stops with the
//! service's queue workers.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::context::Shared;
use super::queue_worker::WorkerSignal;
use crate::QueueBridge;
use crate::observe::metrics::{BridgeMeters, QueueMeters};

/// How long one queue-metrics call may take before the sample skips that queue.
const QUEUE_CALL_LIMIT: Duration = Duration::from_secs(5);

/// A queue bridge and the meters of each queue a service works on it.
pub(crate) type WorkedQueues = (Arc<dyn QueueBridge>, Vec<(String, QueueMeters)>);

pub(crate) struct StateSampler {
    pub shared: Arc<Shared>,
    pub every: Duration,
    pub bridge: BridgeMeters,
    /// The queue bridge and the meters of each queue this service works.
    pub queues: Option<WorkedQueues>,
}

impl StateSampler {
    /// Samples at once, then every interval until the service stops its workers.
    pub async fn run(self, mut signal: watch::Receiver<WorkerSignal>) {
        loop {
            self.sample().await;
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = signal.wait_for(|s| *s != WorkerSignal::Run) => return,
            }
        }
    }

    async fn sample(&self) {
        let bridge = &self.shared.bridge;
        self.bridge.set(
            &bridge.counters(),
            bridge.paused_subscription_consumers().len(),
        );
        let Some((queues, meters)) = &self.queues else {
            return;
        };
        for (queue, meter) in meters {
            match tokio::time::timeout(QUEUE_CALL_LIMIT, queues.metrics(queue)).await {
                Ok(Ok(m)) => meter.set(&m),
                Ok(Err(error)) => {
                    tracing::debug!(%queue, %error, "queue metrics not sampled");
                }
                Err(_) => tracing::debug!(%queue, "queue metrics not sampled: the call timed out"),
            }
        }
    }
}
