//! The service runtime: define commands, subscriptions, streams and queue workers, start them on
//! a bridge with the strict capability check, observe health and in-flight work, and drain.
//!
//! ```no_run
//! # async fn demo(bridge: std::sync::Arc<dyn purista_core::EventBridge>) -> anyhow::Result<()> {
//! use purista_core::service::{CommandDef, Context, Empty, Service};
//! let running = Service::builder("greeter", "1")
//!     .command(CommandDef::new("hello", |_ctx: Context, name: String, _p: Empty| async move {
//!         Ok(format!("hello {name}"))
//!     }))
//!     .build()
//!     .start(bridge)
//!     .await?;
//! let reply: String = running
//!     .invoke(purista_core::Address::new("greeter", "1", "hello"), "ada", Empty)
//!     .await?;
//! assert_eq!(reply, "hello ada");
//! running.shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

mod command;
mod context;
mod flow;
mod queue_worker;
mod settle;
mod stream;
mod subscription;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use serde::de::{Deserialize, Deserializer, IgnoredAny};
use serde::{Serialize, Serializer};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use command::CommandDef;
pub use context::{Context, InvokeOptions, JobContext, SubscriptionContext};
use queue_worker::WorkerSignal;
pub use queue_worker::{IntoJobSettlement, QueueWorkerDef, WorkerMode};
pub use stream::{PRODUCER_GRACE, StreamDef};
pub use subscription::{IntoReply, Reply, SubscriptionDef, registration_key};

use crate::bridge::{BridgeHealth, DrainReport, EventBridge};
use crate::capabilities::{Need, Requirement, StrictCheckError, check};
use crate::envelope::{Address, Envelope, MessageType};
use crate::error::{BridgeError, CommandError};
use crate::filter::SubscriptionFilter;
use crate::inflight::{InFlight, InFlightTracker, WorkKind};
use crate::operator::{PausedConsumer, RegistrationKey};
use crate::queue::{NewJob, QueueBridge, QueueConfig, QueueDeclaration, QueueError};
use crate::stream::StreamReader;

/// Runs a handler: both the call that builds its future and the future itself are guarded, so
/// a panic anywhere in user code becomes `Err(())` instead of reaching a consumer loop.
pub(crate) async fn run_guarded<T>(
    make: impl FnOnce() -> futures::future::BoxFuture<'static, T>,
) -> Result<T, ()> {
    use futures::FutureExt;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    match catch_unwind(AssertUnwindSafe(make)) {
        Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await.map_err(|_| ()),
        Err(_) => Err(()),
    }
}

/// A parameter or payload type that accepts any JSON and serializes as `{}`: for handlers that
/// take no input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Empty;

impl<'de> Deserialize<'de> for Empty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Empty)
    }
}

impl Serialize for Empty {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        s.serialize_map(Some(0))?.end()
    }
}

/// Why a service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The bridge is not healthy (503).
    #[error("event bridge `{bridge}` is not healthy: {reason}")]
    BridgeUnavailable {
        /// Bridge name.
        bridge: String,
        /// Why.
        reason: String,
    },
    /// Registrations need capabilities the bridge lacks (strict mode).
    #[error(transparent)]
    StrictCheck(#[from] StrictCheckError),
    /// The bridge refused a registration.
    #[error("registering {registration} failed: {source}")]
    Registration {
        /// Which registration.
        registration: String,
        /// Bridge error.
        source: BridgeError,
    },
    /// Queue workers were defined but no queue bridge was given.
    #[error(
        "queue workers for {queues:?} need a queue bridge; pass one with ServiceBuilder::queue_bridge"
    )]
    NoQueueBridge {
        /// Queues without a bridge.
        queues: Vec<String>,
    },
    /// Declaring a queue failed.
    #[error("declaring queue `{queue}` failed: {source}")]
    Queue {
        /// Queue.
        queue: String,
        /// Error.
        source: QueueError,
    },
}

/// Overall health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// All good.
    Ok,
    /// Serving, but a consumer or worker is paused.
    Warn,
    /// The bridge is unhealthy.
    Error,
}

/// A service's health with the reasons.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceHealth {
    /// `ok`, `warn` or `error`.
    pub state: HealthState,
    /// The bridge's own health.
    pub bridge: BridgeHealth,
    /// This service's paused subscription consumers.
    pub paused_consumers: Vec<PausedConsumer>,
    /// This service's paused queue workers: `(queue, reason)`.
    pub paused_workers: Vec<(String, String)>,
    /// Work in flight.
    pub in_flight: InFlight,
}

/// A service definition. Build it with [`Service::builder`], then [`Service::start`] it.
pub struct Service {
    name: String,
    version: String,
    description: String,
    strict: bool,
    commands: Vec<CommandDef>,
    subscriptions: Vec<SubscriptionDef>,
    streams: Vec<StreamDef>,
    workers: Vec<QueueWorkerDef>,
    queues_declared: Vec<(String, QueueConfig)>,
    queue_bridge: Option<Arc<dyn QueueBridge>>,
}

/// Builds a [`Service`].
pub struct ServiceBuilder {
    service: Service,
}

impl Service {
    /// Starts defining service `name` at `version`.
    pub fn builder(name: impl Into<String>, version: impl Into<String>) -> ServiceBuilder {
        ServiceBuilder {
            service: Service {
                name: name.into(),
                version: version.into(),
                description: String::new(),
                strict: true,
                commands: Vec::new(),
                subscriptions: Vec::new(),
                streams: Vec::new(),
                workers: Vec::new(),
                queues_declared: Vec::new(),
                queue_bridge: None,
            },
        }
    }
}

impl ServiceBuilder {
    /// A description (sent in `infoServiceInit`).
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.service.description = d.into();
        self
    }

    /// Strict mode (default `true`): start fails on any capability mismatch. With `false` each
    /// mismatch is a warning and the registration degrades as [`Need`] documents.
    pub fn strict(mut self, strict: bool) -> Self {
        self.service.strict = strict;
        self
    }

    /// Adds a command.
    pub fn command(mut self, def: CommandDef) -> Self {
        self.service.commands.push(def);
        self
    }

    /// Adds a subscription.
    pub fn subscription(mut self, def: SubscriptionDef) -> Self {
        self.service.subscriptions.push(def);
        self
    }

    /// Adds a stream producer.
    pub fn stream(mut self, def: StreamDef) -> Self {
        self.service.streams.push(def);
        self
    }

    /// Adds a queue worker (needs a queue bridge).
    pub fn queue_worker(mut self, def: QueueWorkerDef) -> Self {
        self.service.workers.push(def);
        self
    }

    /// Declares a queue this service enqueues to without working it.
    pub fn declare_queue(mut self, queue: impl Into<String>, config: QueueConfig) -> Self {
        self.service.queues_declared.push((queue.into(), config));
        self
    }

    /// The queue bridge for workers and `enqueue`.
    pub fn queue_bridge(mut self, queues: Arc<dyn QueueBridge>) -> Self {
        self.service.queue_bridge = Some(queues);
        self
    }

    /// Finishes the definition.
    pub fn build(self) -> Service {
        self.service
    }
}

/// What non-strict mode changes about one subscription.
fn degrade(def: &mut SubscriptionDef, need: &Need, event_only: bool) -> Option<SubscriptionFilter> {
    match need {
        Need::SharedSubscription => def.shared = false,
        Need::BroadcastSubscription => def.shared = true,
        Need::DurableSubscription => def.durable = false,
        Need::BoundedRetry { .. } => def.policy.max_attempts = 1,
        Need::DelayedRetry { .. } => def.policy.retry_delay_ms = 0,
        Need::DeadLetter => def.policy.dead_letter_target = None,
        Need::PauseResume => def.pausable = false,
        // The runtime settles on arrival, before the handler runs (see `SubscriptionRuntime`).
        Need::ManualAck => def.ack_on_arrival = true,
        // Nothing to change: deliveries keep the bridge's own guarantee; the warning says so.
        Need::AtLeastOnce => {}
        Need::ComplexFilter if event_only => {
            // Route by eventName on the broker, apply the rest here.
            let full = def.filter.clone();
            def.filter = SubscriptionFilter {
                event_name: full.event_name.clone(),
                ..Default::default()
            };
            return Some(full);
        }
        _ => {}
    }
    None
}

impl Service {
    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every requirement of every registration, in registration order.
    pub fn requirements(&self) -> Vec<Requirement> {
        let mut reqs = Vec::new();
        for c in &self.commands {
            reqs.push(Requirement {
                registration: format!("command {}@{}/{}", self.name, self.version, c.name),
                need: Need::Commands,
            });
        }
        for s in &self.streams {
            reqs.push(Requirement {
                registration: format!("stream {}@{}/{}", self.name, self.version, s.name),
                need: Need::Streams,
            });
        }
        for s in &self.subscriptions {
            for need in s.needs() {
                reqs.push(Requirement {
                    registration: format!("subscription {}@{}/{}", self.name, self.version, s.name),
                    need,
                });
            }
        }
        for w in &self.workers {
            for need in w.needs() {
                reqs.push(Requirement {
                    registration: format!("queue worker {}", w.queue),
                    need,
                });
            }
        }
        reqs
    }

    /// Starts on `bridge`: health check, strict check, queue declarations, `infoServiceInit`,
    /// commands (each followed by `infoServiceFunctionAdded`), streams, subscriptions, queue
    /// workers, `infoServiceReady`.
    ///
    /// A start that fails leaves nothing behind. The checks and the queue declarations come
    /// before anything is registered or announced, so a failure there changes nothing on the
    /// event bridge (queue declarations stay: a queue bridge has no undeclare, and a declaration
    /// repeated with the same settings is harmless). When a registration fails, every
    /// registration made before it is unregistered, and `infoServiceNotReady` (payload
    /// `{serviceName, serviceVersion, reason}`) then `infoServiceShutdown` tell listeners that
    /// the `infoServiceInit` and `infoServiceFunctionAdded` they saw are void. Queue workers are
    /// only spawned once nothing can fail any more.
    pub async fn start(
        mut self,
        bridge: Arc<dyn EventBridge>,
    ) -> Result<RunningService, StartError> {
        bridge
            .start()
            .await
            .map_err(|e| StartError::BridgeUnavailable {
                bridge: bridge.name().to_string(),
                reason: e.to_string(),
            })?;
        if let BridgeHealth::Unhealthy { reason } = bridge.health().await {
            return Err(StartError::BridgeUnavailable {
                bridge: bridge.name().to_string(),
                reason,
            });
        }
        if !self.workers.is_empty() && self.queue_bridge.is_none() {
            return Err(StartError::NoQueueBridge {
                queues: self.workers.iter().map(|w| w.queue.clone()).collect(),
            });
        }
        let caps = bridge.capabilities().clone();
        let queue_caps = self.queue_bridge.as_ref().map(|q| q.capabilities().clone());
        let mismatches = check(&self.requirements(), Some(&caps), queue_caps.as_ref());
        let mut plan = Degraded::default();
        if !mismatches.is_empty() {
            if self.strict {
                return Err(StrictCheckError { mismatches }.into());
            }
            plan = self
                .plan_degradations(&mismatches, caps.filters == crate::FilterSupport::EventOnly);
        }
        self.declare_queues().await?;

        let (reject_tx, _) = watch::channel(false);
        let shared = Arc::new(context::Shared {
            name: self.name.clone(),
            version: self.version.clone(),
            bridge: bridge.clone(),
            queues: self.queue_bridge.clone(),
            inflight: InFlightTracker::new(),
            closing: AtomicBool::new(false),
            reject_pending: reject_tx,
            pending_invocations: AtomicUsize::new(0),
            paused_workers: Mutex::new(BTreeMap::new()),
            workers_resumed: Notify::new(),
        });
        emit_info(
            &shared,
            MessageType::InfoServiceInit,
            "",
            json!({ "serviceName": self.name, "serviceVersion": self.version, "description": self.description }),
        )
        .await;

        let mut registered = Registered::default();
        if let Err(err) = self.register(&shared, &plan, &mut registered).await {
            tracing::warn!(service = %self.name, version = %self.version, error = %err, "start failed; undoing its registrations");
            unregister_all(&bridge, &registered).await;
            emit_info(
                &shared,
                MessageType::InfoServiceNotReady,
                "",
                json!({ "serviceName": self.name, "serviceVersion": self.version, "reason": err.to_string() }),
            )
            .await;
            emit_info(&shared, MessageType::InfoServiceShutdown, "", Value::Null).await;
            return Err(err);
        }

        let (signal_tx, _) = watch::channel(WorkerSignal::Run);
        let mut worker_tasks = Vec::new();
        if let Some(q) = &self.queue_bridge {
            for w in &self.workers {
                let registration: Arc<str> = format!("queue {}", w.queue).into();
                let runtime = Arc::new(queue_worker::WorkerRuntime {
                    shared: shared.clone(),
                    queues: q.clone(),
                    queue: w.queue.clone(),
                    in_flight: shared.inflight.counter(WorkKind::Queue, &registration),
                    registration,
                    config: w.config.clone(),
                    mode: w.mode,
                    lease_wait: w.lease_wait,
                    handler: w.handler.clone(),
                });
                worker_tasks.push(tokio::spawn(runtime.run(signal_tx.subscribe())));
            }
        }
        emit_info(
            &shared,
            MessageType::InfoServiceReady,
            "",
            json!({ "serviceName": self.name, "serviceVersion": self.version }),
        )
        .await;
        tracing::info!(service = %self.name, version = %self.version, bridge = %bridge.name(), "service ready");
        Ok(RunningService {
            degradations: mismatches,
            shared,
            registered: Mutex::new(registered),
            worker_signal: signal_tx,
            worker_tasks: Mutex::new(worker_tasks),
            shutdown_report: tokio::sync::Mutex::new(None),
        })
    }

    /// Applies non-strict mode to `mismatches`: warns once per mismatch and says what is left
    /// out or changed.
    fn plan_degradations(
        &mut self,
        mismatches: &[crate::capabilities::Mismatch],
        event_only: bool,
    ) -> Degraded {
        let mut plan = Degraded::default();
        for m in mismatches {
            tracing::warn!(registration = %m.registration, need = %m.need.describe(), bridge = %m.bridge, "capability mismatch; degrading (non-strict mode)");
            match &m.need {
                Need::Commands => plan.skip_commands = true,
                Need::Streams => plan.skip_streams = true,
                Need::EventName => plan.skip_subscriptions.push(m.registration.clone()),
                need => {
                    for s in &mut self.subscriptions {
                        let reg = format!("subscription {}@{}/{}", self.name, self.version, s.name);
                        if reg == m.registration
                            && let Some(f) = degrade(s, need, event_only)
                        {
                            plan.local_filters.insert(s.name.clone(), f);
                        }
                    }
                }
            }
        }
        plan
    }

    /// Declares every queue this service enqueues to or works, as `name@version`.
    async fn declare_queues(&self) -> Result<(), StartError> {
        let Some(q) = &self.queue_bridge else {
            return Ok(());
        };
        let declarer = format!("{}@{}", self.name, self.version);
        let declared = self.queues_declared.iter().map(|(q, c)| (q, c));
        let worked = self.workers.iter().map(|w| (&w.queue, &w.config));
        for (queue, config) in declared.chain(worked) {
            q.declare_queue(queue, QueueDeclaration::new(&declarer, config.clone()))
                .await
                .map_err(|source| StartError::Queue {
                    queue: queue.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Registers commands, streams and subscriptions, recording each in `registered` as soon
    /// as the bridge accepted it (so a failure can undo exactly what was done).
    async fn register(
        &self,
        shared: &Arc<context::Shared>,
        plan: &Degraded,
        registered: &mut Registered,
    ) -> Result<(), StartError> {
        let bridge = &shared.bridge;
        let reg_err = |registration: String| {
            move |source| StartError::Registration {
                registration,
                source,
            }
        };
        if !plan.skip_commands {
            for c in &self.commands {
                let address = Address::new(&self.name, &self.version, &c.name);
                let registration: Arc<str> = address.to_string().into();
                let runtime = command::CommandRuntime {
                    shared: shared.clone(),
                    in_flight: shared.inflight.counter(WorkKind::Command, &registration),
                    registration: registration.clone(),
                    target: c.name.clone().into(),
                    success_event: c.success_event.clone(),
                    handler: c.handler.clone(),
                };
                bridge
                    .register_command(address.clone(), Arc::new(runtime))
                    .await
                    .map_err(reg_err(format!("command {registration}")))?;
                registered.commands.push(address);
                emit_info(
                    shared,
                    MessageType::InfoServiceFunctionAdded,
                    &c.name,
                    json!({
                        "name": c.name,
                        "description": c.description,
                        "successEventName": c.success_event,
                        "metadata": c.metadata,
                    }),
                )
                .await;
            }
        }
        if !plan.skip_streams {
            for s in &self.streams {
                let address = Address::new(&self.name, &self.version, &s.name);
                let registration: Arc<str> = address.to_string().into();
                let runtime = stream::StreamRuntime {
                    shared: shared.clone(),
                    in_flight: shared.inflight.counter(WorkKind::Stream, &registration),
                    registration: registration.clone(),
                    target: s.name.clone().into(),
                    handler: s.handler.clone(),
                };
                bridge
                    .register_stream(address.clone(), Arc::new(runtime))
                    .await
                    .map_err(reg_err(format!("stream {registration}")))?;
                registered.streams.push(address);
            }
        }
        for s in &self.subscriptions {
            let reg = format!("subscription {}@{}/{}", self.name, self.version, s.name);
            if plan.skip_subscriptions.contains(&reg) {
                continue;
            }
            let spec = subscription::spec_for(s, &self.name, &self.version);
            let spec_key = spec.key.clone();
            let key: Arc<str> = spec.key.as_str().into();
            let runtime = subscription::SubscriptionRuntime {
                shared: shared.clone(),
                in_flight: shared.inflight.counter(WorkKind::Subscription, &key),
                key: key.clone(),
                target: s.name.clone().into(),
                emit_event: s.emit_event.clone(),
                rules: Arc::new(settle::SettleRules {
                    policy: spec.policy.clone(),
                    key: key.clone(),
                    pausable: s.pausable,
                    guard: s.guard.clone(),
                }),
                ack_on_arrival: s.ack_on_arrival,
                local_filter: plan.local_filters.get(&s.name).cloned(),
                handler: s.handler.clone(),
            };
            bridge
                .register_subscription(spec, Arc::new(runtime))
                .await
                .map_err(reg_err(reg))?;
            registered.subscriptions.push(spec_key);
        }
        Ok(())
    }
}

/// What a non-strict start leaves out or changes.
#[derive(Default)]
struct Degraded {
    skip_commands: bool,
    skip_streams: bool,
    skip_subscriptions: Vec<String>,
    /// Filters applied in-process, by subscription name.
    local_filters: BTreeMap<String, SubscriptionFilter>,
}

/// Emits an info message from the service (fresh trace id); a failure is only logged.
async fn emit_info(shared: &context::Shared, t: MessageType, target: &str, payload: Value) {
    let mut e = Envelope::info(t, shared.sender(target), payload);
    e.trace_id = Some(crate::ids::new_id());
    if let Err(err) = shared.bridge.emit(e).await {
        tracing::warn!(error = %err, message_type = %t, "emitting info message failed");
    }
}

/// Unregisters what a service registered: subscriptions, streams, then commands. A failure is
/// logged and the rest still unregistered.
async fn unregister_all(bridge: &Arc<dyn EventBridge>, registered: &Registered) {
    for key in &registered.subscriptions {
        if let Err(e) = bridge.unregister_subscription(key).await {
            tracing::warn!(registration = %key, error = %e, "unregistering subscription failed");
        }
    }
    for a in &registered.streams {
        if let Err(e) = bridge.unregister_stream(a).await {
            tracing::warn!(registration = %a, error = %e, "unregistering stream failed");
        }
    }
    for a in &registered.commands {
        if let Err(e) = bridge.unregister_command(a).await {
            tracing::warn!(registration = %a, error = %e, "unregistering command failed");
        }
    }
}

#[derive(Default)]
struct Registered {
    commands: Vec<Address>,
    streams: Vec<Address>,
    subscriptions: Vec<RegistrationKey>,
}

/// A started service. Call [`RunningService::shutdown`] to stop it gracefully; dropping it only
/// stops its queue workers (its commands and subscriptions stay registered on the bridge until
/// the bridge shuts down).
pub struct RunningService {
    degradations: Vec<crate::capabilities::Mismatch>,
    shared: Arc<context::Shared>,
    registered: Mutex<Registered>,
    worker_signal: watch::Sender<WorkerSignal>,
    worker_tasks: Mutex<Vec<JoinHandle<()>>>,
    shutdown_report: tokio::sync::Mutex<Option<DrainReport>>,
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.worker_signal
            .send_if_modified(|s| raise(s, WorkerSignal::Stop));
    }
}

/// Moves a worker signal forward to `to` (never back). True when it changed.
fn raise(signal: &mut WorkerSignal, to: WorkerSignal) -> bool {
    if *signal < to {
        *signal = to;
        true
    } else {
        false
    }
}

impl RunningService {
    /// A context outside any handler (fresh trace id per call).
    pub fn context(&self) -> Context {
        Context {
            shared: self.shared.clone(),
            flow: flow::Flow::Fresh,
            target: "".into(),
        }
    }

    /// What a non-strict start degraded (empty after a strict start): registration, need and
    /// bridge per mismatch, as warned at start.
    pub fn degradations(&self) -> &[crate::capabilities::Mismatch] {
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
            .send_if_modified(|s| raise(s, WorkerSignal::Stop));
        let registered = std::mem::take(&mut *self.registered.lock());
        unregister_all(bridge, &registered).await;
        let completed = shared.inflight.wait_idle(deadline).await;
        let still_running = shared.inflight.running();
        let rejected = shared.pending_invocations.load(Ordering::Acquire);
        let _ = shared.reject_pending.send(true);
        // Jobs still running past the deadline are ended; their leases expire and the jobs
        // reappear for another worker. Either way every worker task is awaited, so nothing of
        // this service runs on after shutdown returns.
        if !completed {
            self.worker_signal
                .send_if_modified(|s| raise(s, WorkerSignal::Abort));
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
