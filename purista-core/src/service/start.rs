//! Starting a service on a bridge: the checks, the queue declarations, the registrations in
//! PURISTA's order with their info messages, and the undo of a start that fails halfway.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::builder::Service;
use super::degrade::Degraded;
use super::lifecycle::{Registered, emit_info, unregister_all};
use super::queue_worker::{self, WorkerSignal};
use super::running::RunningService;
use super::settle::SettleRules;
use super::{command, context, sampler, stream, subscription};
use crate::bridge::{BridgeHealth, EventBridge};
use crate::capabilities::{StrictCheckError, check};
use crate::envelope::{Address, MessageType};
use crate::error::BridgeError;
use crate::inflight::{InFlightTracker, WorkKind};
use crate::observe::metrics::{BridgeMeters, ClientMeters, QueueMeters, RegistrationMeters};
use crate::observe::spans::Site;
use crate::queue::{QueueDeclaration, QueueError};

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
    /// A command made from a [`CommandContract`](super::CommandContract) was added to another
    /// service or version than the contract names.
    #[error(
        "command `{command}` follows the contract of `{contract}` but is added to service `{service}`"
    )]
    ContractMismatch {
        /// The command.
        command: String,
        /// `service@version` the contract names.
        contract: String,
        /// `service@version` it was added to.
        service: String,
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

impl Service {
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
        for c in &self.commands {
            if let Some((service, version)) = c.contract
                && (service != self.name || version != self.version)
            {
                return Err(StartError::ContractMismatch {
                    command: c.name.clone(),
                    contract: format!("{service}@{version}"),
                    service: format!("{}@{}", self.name, self.version),
                });
            }
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
            site: Site {
                service: self.name.as_str().into(),
                version: self.version.as_str().into(),
                system: bridge.messaging_system().into(),
                identities: self.trace_identities,
            },
            meters: ClientMeters::new(bridge.messaging_system(), &self.name),
        });
        emit_info(
            &shared,
            MessageType::InfoServiceInit,
            "",
            // PURISTA's init and ready carry no payload.
            Value::Null,
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
                    meters: RegistrationMeters::new(q.name(), "job", &w.queue),
                });
                worker_tasks.push(tokio::spawn(runtime.run(signal_tx.subscribe())));
            }
        }
        if !self.state_metrics_interval.is_zero() {
            let queues = self.queue_bridge.as_ref().map(|q| {
                let meters = self
                    .workers
                    .iter()
                    .map(|w| (w.queue.clone(), QueueMeters::new(q.name(), &w.queue)))
                    .collect();
                (q.clone(), meters)
            });
            let sampler = sampler::StateSampler {
                shared: shared.clone(),
                every: self.state_metrics_interval,
                bridge: BridgeMeters::new(bridge.messaging_system(), bridge.instance_id()),
                queues,
            };
            worker_tasks.push(tokio::spawn(sampler.run(signal_tx.subscribe())));
        }
        emit_info(&shared, MessageType::InfoServiceReady, "", Value::Null).await;
        tracing::info!(service = %self.name, version = %self.version, description = %self.description, bridge = %bridge.name(), "service ready");
        Ok(RunningService::new(
            mismatches,
            shared,
            registered,
            signal_tx,
            worker_tasks,
        ))
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
                    meters: RegistrationMeters::new(&shared.site.system, "command", &registration),
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
                    c.expose.command_info(&c.metadata),
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
                    meters: RegistrationMeters::new(&shared.site.system, "stream", &registration),
                };
                bridge
                    .register_stream(address.clone(), Arc::new(runtime))
                    .await
                    .map_err(reg_err(format!("stream {registration}")))?;
                registered.streams.push(address);
                emit_info(
                    shared,
                    MessageType::InfoServiceFunctionAdded,
                    &s.name,
                    s.expose.stream_info(&Value::Null),
                )
                .await;
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
                rules: Arc::new(SettleRules {
                    policy: spec.policy.clone(),
                    key: key.clone(),
                    pausable: s.pausable,
                    guard: s.guard.clone(),
                    meters: RegistrationMeters::new(&shared.site.system, "subscription", &key),
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
