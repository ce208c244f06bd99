//! A started service: calls on behalf of the service (invoke, emit, streams, jobs), health and
//! paused work, and the graceful shutdown that drains it.

use std::borrow::Borrow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::context::{Context, InvokeOptions, Shared};
use super::contract::CommandContract;
use super::flow::Flow;
use super::health::{HealthState, ServiceHealth};
use super::lifecycle::{Registered, emit_info, unregister_all};
use super::queue_worker::WorkerSignal;
use crate::bridge::{DrainReport, EventBridge};
use crate::capabilities::Mismatch;
use crate::envelope::{Address, MessageType};
use crate::error::{BridgeError, CommandError};
use crate::inflight::InFlight;
use crate::operator::{PausedConsumer, RegistrationKey};
use crate::queue::{NewJob, QueueBridge, QueueError};
use crate::stream::StreamReader;

/// A started service. Call [`RunningService::shutdown`] to stop it gracefully; dropping it only
/// stops its queue workers (its commands and subscriptions stay registered on the bridge until
/// the bridge shuts down).
pub struct RunningService {
    degradations: Vec<Mismatch>,
    shared: Arc<Shared>,
    registered: Mutex<Registered>,
    worker_signal: watch::Sender<WorkerSignal>,
    worker_tasks: Mutex<Vec<JoinHandle<()>>>,
    shutdown_report: tokio::sync::Mutex<Option<DrainReport>>,
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.worker_signal
            .send_if_modified(|s| s.advance_to(WorkerSignal::Stop));
    }
}

impl RunningService {
    pub(super) fn new(
        degradations: Vec<Mismatch>,
        shared: Arc<Shared>,
        registered: Registered,
        worker_signal: watch::Sender<WorkerSignal>,
        worker_tasks: Vec<JoinHandle<()>>,
    ) -> Self {
        RunningService {
            degradations,
            shared,
            registered: Mutex::new(registered),
            worker_signal,
            worker_tasks: Mutex::new(worker_tasks),
            shutdown_report: tokio::sync::Mutex::new(None),
        }
    }

    /// A context outside any handler (fresh trace id per call).
    pub fn context(&self) -> Context {
        Context {
            shared: self.shared.clone(),
            flow: Flow::Fresh,
            target: "".into(),
            trace: None,
        }
    }

    /// What a non-strict start degraded (empty after a strict start): registration, need and
    /// bridge per mismatch, as warned at start.
    pub fn degradations(&self) -> &[Mismatch] {
        &self.degradations
    }

    /// Invocations this service has sent that await their response.
    pub fn pending_invocations(&self) -> usize {
        self.shared.pending_invocations.load(Ordering::Acquire)
    }

    /// The bridge.
    pub fn bridge(&self) -> &Arc<dyn EventBridge> {
        &self.shared.bridge
    }

    /// Invokes a command (default ttl) and deserializes the result.
    pub async fn invoke<O: serde::de::DeserializeOwned>(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
    ) -> Result<O, CommandError> {
        self.context().invoke(receiver, payload, parameter).await
    }

    /// Calls the command of `contract` (see [`Context::call`]).
    pub async fn call<I, O, P, E>(
        &self,
        contract: &CommandContract<I, O, P, E>,
        input: impl Borrow<I>,
    ) -> Result<O, CommandError>
    where
        I: Serialize,
        O: DeserializeOwned,
        P: Serialize + Default,
    {
        self.context().call(contract, input).await
    }

    /// Calls the command of `contract` with a parameter and options (see
    /// [`Context::call_with`]).
    pub async fn call_with<I, O, P, E>(
        &self,
        contract: &CommandContract<I, O, P, E>,
        input: impl Borrow<I>,
        parameter: impl Borrow<P>,
        opts: InvokeOptions,
    ) -> Result<O, CommandError>
    where
        I: Serialize,
        O: DeserializeOwned,
        P: Serialize,
    {
        self.context()
            .call_with(contract, input, parameter, opts)
            .await
    }

    /// Invokes a command with options.
    pub async fn invoke_with<O: serde::de::DeserializeOwned>(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
        opts: InvokeOptions,
    ) -> Result<O, CommandError> {
        self.context()
            .invoke_with(receiver, payload, parameter, opts)
            .await
    }

    /// Emits a custom event.
    pub async fn emit(&self, event_name: &str, payload: impl Serialize) -> Result<(), BridgeError> {
        self.context().emit(event_name, payload).await
    }

    /// Emits a custom event addressed to `receiver` (see [`Context::emit_to`]).
    pub async fn emit_to(
        &self,
        receiver: Address,
        event_name: &str,
        payload: impl Serialize,
    ) -> Result<(), BridgeError> {
        self.context().emit_to(receiver, event_name, payload).await
    }

    /// Opens a stream session with options: session timeout (`ttl`), trace, principal and
    /// tenant (see [`Context::open_stream_with`]).
    pub async fn open_stream_with(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
        opts: InvokeOptions,
    ) -> Result<StreamReader, CommandError> {
        self.context()
            .open_stream_with(receiver, payload, parameter, opts)
            .await
    }

    /// Opens a stream session.
    pub async fn open_stream(
        &self,
        receiver: Address,
        payload: impl Serialize,
        parameter: impl Serialize,
        timeout: Option<std::time::Duration>,
    ) -> Result<StreamReader, CommandError> {
        self.context()
            .open_stream(receiver, payload, parameter, timeout)
            .await
    }

    /// Enqueues a job.
    pub async fn enqueue(
        &self,
        queue: &str,
        payload: impl Serialize,
        parameter: impl Serialize,
    ) -> Result<String, QueueError> {
        self.context().enqueue(queue, payload, parameter).await
    }

    /// Enqueues a fully specified job.
    pub async fn enqueue_job(&self, queue: &str, job: NewJob) -> Result<String, QueueError> {
        self.context().enqueue_job(queue, job).await
    }

    /// The queue bridge, if any (for metrics and dead-letter operations).
    pub fn queue_bridge(&self) -> Option<&Arc<dyn QueueBridge>> {
        self.shared.queues.as_ref()
    }

    /// Handlers running now, by kind.
    pub fn in_flight(&self) -> InFlight {
        self.shared.inflight.snapshot()
    }

    /// This service's paused subscription consumers.
    pub fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        let mine = self.registered.lock().subscriptions.clone();
        self.shared
            .bridge
            .paused_subscription_consumers()
            .into_iter()
            .filter(|p| mine.contains(&p.key))
            .collect()
    }

    /// Resumes a paused consumer by registration key. `Ok(false)` when it was not paused.
    pub async fn resume_subscription_consumer(
        &self,
        key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        let resumed = self.shared.bridge.resume_subscription_consumer(key).await?;
        if resumed {
            tracing::info!(registration = %key, "subscription consumer resumed");
        }
        Ok(resumed)
    }

    /// Pauses the worker of `queue` (it finishes its current job, then takes no more).
    pub fn pause_queue_worker(&self, queue: &str, reason: impl Into<String>) {
        self.shared
            .paused_workers
            .lock()
            .insert(queue.to_string(), reason.into());
    }

    /// Resumes the worker of `queue`. `false` when it was not paused.
    pub fn resume_queue_worker(&self, queue: &str) -> bool {
        let was = self.shared.paused_workers.lock().remove(queue).is_some();
        self.shared.workers_resumed.notify_waiters();
        was
    }

    /// `error` when the bridge is unhealthy, `warn` when a consumer or worker is paused, else `ok`.
    pub async fn health(&self) -> ServiceHealth {
        let bridge = self.shared.bridge.health().await;
        let paused_consumers = self.paused_subscription_consumers();
        let paused_workers: Vec<(String, String)> = self
            .shared
            .paused_workers
            .lock()
            .iter()
            .map(|(q, r)| (q.clone(), r.clone()))
            .collect();
        let state = if !bridge.is_healthy() {
            HealthState::Error
        } else if !paused_consumers.is_empty() || !paused_workers.is_empty() {
            HealthState::Warn
        } else {
            HealthState::Ok
        };
        ServiceHealth {
            state,
            bridge,
            paused_consumers,
            paused_workers,
            in_flight: self.in_flight(),
        }
    }

    /// Graceful shutdown: `infoServiceDrain`, stop intake (unregister, stop workers), wait for
    /// running handlers until `deadline`, reject pending invocations with 503,
    /// `infoServiceShutdown`. Returns what was still running at the deadline. Idempotent.
    /// The bridge is not shut down (other services may share it).
    pub async fn shutdown(&self, deadline: Instant) -> DrainReport {
        let mut cached = self.shutdown_report.lock().await;
        if let Some(r) = cached.as_ref() {
            return r.clone();
        }
        let started = Instant::now();
        let shared = &self.shared;
        let bridge = &shared.bridge;
        emit_info(shared, MessageType::InfoServiceDrain, "", Value::Null).await;
        shared.closing.store(true, Ordering::Release);
        self.worker_signal
            .send_if_modified(|s| s.advance_to(WorkerSignal::Stop));
        let registered = std::mem::take(&mut *self.registered.lock());
        unregister_all(bridge, &registered).await;
        let completed = shared.inflight.wait_idle(deadline).await;
        let still_running = shared.inflight.running();
        let rejected = shared.pending_invocations.load(Ordering::Acquire);
        // `send_replace`: the flag must stick even when nobody waits right now, so later calls fail too.
        shared.reject_pending.send_replace(true);
        // Jobs still running past the deadline are ended; their leases expire and the jobs
        // reappear for another worker. Either way every worker task is awaited, so nothing of
        // this service runs on after shutdown returns.
        if !completed {
            self.worker_signal
                .send_if_modified(|s| s.advance_to(WorkerSignal::Abort));
        }
        let workers = std::mem::take(&mut *self.worker_tasks.lock());
        for task in workers {
            if let Err(e) = task.await
                && e.is_panic()
            {
                tracing::error!("a queue worker task panicked");
            }
        }
        emit_info(shared, MessageType::InfoServiceShutdown, "", Value::Null).await;
        let report = DrainReport {
            completed,
            still_running,
            rejected_invocations: rejected,
            waited_ms: started.elapsed().as_millis() as u64,
        };
        tracing::info!(service = %shared.name, completed, rejected, "service shut down");
        *cached = Some(report.clone());
        report
    }
}
