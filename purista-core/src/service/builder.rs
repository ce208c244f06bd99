//! Defining a service: its name and version, and what it registers (commands, streams,
//! subscriptions, queue workers, declared queues). A definition does nothing until
//! [`Service::start`] runs it on a bridge; [`Service::requirements`] is what the strict check
//! compares with the bridge's capabilities.

use std::sync::Arc;
use std::time::Duration;

use super::command::CommandDef;
use super::queue_worker::QueueWorkerDef;
use super::stream::StreamDef;
use super::subscription::SubscriptionDef;
use crate::capabilities::{Need, Requirement};
use crate::queue::{QueueBridge, QueueConfig};

/// A service definition. Build it with [`Service::builder`], then [`Service::start`] it.
pub struct Service {
    pub(super) name: String,
    pub(super) version: String,
    pub(super) description: String,
    pub(super) strict: bool,
    pub(super) commands: Vec<CommandDef>,
    pub(super) subscriptions: Vec<SubscriptionDef>,
    pub(super) streams: Vec<StreamDef>,
    pub(super) workers: Vec<QueueWorkerDef>,
    pub(super) queues_declared: Vec<(String, QueueConfig)>,
    pub(super) queue_bridge: Option<Arc<dyn QueueBridge>>,
    pub(super) trace_identities: bool,
    pub(super) state_metrics_interval: Duration,
}

/// How often a running service samples its bridges' state into the metrics by default.
pub const DEFAULT_STATE_METRICS_INTERVAL: Duration = Duration::from_secs(15);

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
                trace_identities: false,
                state_metrics_interval: DEFAULT_STATE_METRICS_INTERVAL,
            },
        }
    }
}

impl ServiceBuilder {
    /// A description, for the logs (PURISTA's `infoServiceInit` carries no payload).
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

    /// Records principal and tenant ids on this service's spans (`purista.principalId`,
    /// `purista.tenantId`). Off by default: they may be personal data, and spans leave the
    /// process for a tracing backend. They travel in the envelope either way.
    pub fn trace_identities(mut self, record: bool) -> Self {
        self.service.trace_identities = record;
        self
    }

    /// How often the running service samples its bridges' state into the metrics: reconnects,
    /// poison messages and paused consumers of its event bridge, and the depth, leased, delayed
    /// and dead-lettered jobs of every queue it works ([`observe::metrics`](crate::observe::metrics)).
    /// 15 s by default; `Duration::ZERO` turns sampling off (the other metrics stay).
    ///
    /// ```
    /// use std::time::Duration;
    /// use purista_core::Service;
    /// let service = Service::builder("billing", "1")
    ///     .state_metrics_interval(Duration::from_secs(5))
    ///     .build();
    /// # let _ = service;
    /// ```
    pub fn state_metrics_interval(mut self, every: Duration) -> Self {
        self.service.state_metrics_interval = every;
        self
    }

    /// Finishes the definition.
    pub fn build(self) -> Service {
        self.service
    }
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
}
