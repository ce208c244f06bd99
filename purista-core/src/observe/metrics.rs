//! Metrics through the [`metrics`] facade: whatever recorder the application installs
//! (Prometheus, OpenTelemetry, StatsD exporters exist for it) receives them; with none
//! installed every update is a no-op.
//!
//! Why the facade rather than OpenTelemetry metrics: it is one small crate with no exporter in
//! the default build, any exporter can be plugged in by the application (including an
//! OpenTelemetry one), and a handle registered once costs one branch per update when nobody
//! listens. Handles are registered when a service starts, per registration, so **install the
//! recorder before starting services**; no label is built per message.
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `messaging.process.duration` | histogram | s | `messaging.system`, `purista.kind`, `messaging.destination.name` |
//! | `purista.messages.settled` | counter | {message} | the same, plus `purista.outcome` |
//! | `purista.inflight` | gauge | {message} | the same as the duration |
//! | `messaging.client.operation.duration` | histogram | s | `messaging.system`, `messaging.operation.name` (`invoke`), `purista.service.name` |
//! | `messaging.client.sent.messages` | counter | {message} | `messaging.system`, `messaging.operation.name` (`invoke`, `emit`, `enqueue`), `purista.service.name` |
//! | `purista.invoke.failures` | counter | {message} | `messaging.system`, `purista.service.name` |
//!
//!
//! Sampled state, set every [`ServiceBuilder::state_metrics_interval`](crate::ServiceBuilder::state_metrics_interval)
//! (15 s by default) by every running service from its bridges:
//!
//! | name | kind | unit | labels |
//! |---|---|---|---|
//! | `purista.bridge.reconnects` | counter | {reconnect} | `messaging.system`, `purista.instance.id` |
//! | `purista.bridge.poison_messages` | counter | {message} | the same |
//! | `purista.consumers.paused` | gauge | {consumer} | the same |
//! | `purista.queue.depth` | gauge | {job} | `messaging.system` (the queue bridge's), `messaging.destination.name` (the queue) |
//! | `purista.queue.leased` | gauge | {job} | the same |
//! | `purista.queue.delayed` | gauge | {job} | the same |
//! | `purista.queue.dead_lettered` | gauge | {job} | the same |
//!
//! The bridge series are per bridge instance (`purista.instance.id`), whichever of the services
//! on it samples them: services sharing one instance set the same values. The queue series are
//! the queue bridge's view of each queue a service works.
//!
//! `purista.kind` is `command`, `subscription`, `stream` or `job`; `messaging.destination.name`
//! is the registration (`orders@1/place`, a subscription's key, a queue's name).
//! `purista.outcome` is `ok` (answered, acked, completed), `error` (a command or stream that
//! answered with an error), `retry`, `dead_letter`, `drop` or `pause`: handled, failed,
//! retried, dead-lettered and dropped counts are its values. A subscription's outcome is
//! counted once per delivery attempt, when it is settled; a job's once per attempt.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label};

/// How one attempt at a message or job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Answered, acked or completed.
    Ok,
    /// A command or stream that answered with an error.
    Error,
    /// Will come again.
    Retry,
    /// Dead-lettered.
    DeadLetter,
    /// Dropped.
    Drop,
    /// The consumer paused itself.
    Pause,
}

const OUTCOMES: [(Settled, &str); 6] = [
    (Settled::Ok, "ok"),
    (Settled::Error, "error"),
    (Settled::Retry, "retry"),
    (Settled::DeadLetter, "dead_letter"),
    (Settled::Drop, "drop"),
    (Settled::Pause, "pause"),
];

/// The metric names (public so dashboards and tests can refer to them).
pub mod names {
    /// Handler time per registration (histogram, seconds).
    pub const PROCESS_DURATION: &str = "messaging.process.duration";
    /// Attempts by outcome per registration (counter).
    pub const SETTLED: &str = "purista.messages.settled";
    /// Running handlers per registration (gauge).
    pub const IN_FLIGHT: &str = "purista.inflight";
    /// Invocation latency, from sending the command to its response (histogram, seconds).
    pub const CLIENT_OPERATION_DURATION: &str = "messaging.client.operation.duration";
    /// Messages sent by operation (counter).
    pub const SENT: &str = "messaging.client.sent.messages";
    /// Invocations that ended in an error (counter).
    pub const INVOKE_FAILURES: &str = "purista.invoke.failures";
    /// Reconnects of a bridge instance since it started (counter, sampled).
    pub const RECONNECTS: &str = "purista.bridge.reconnects";
    /// Poison deliveries a bridge instance set aside (counter, sampled).
    pub const POISON_MESSAGES: &str = "purista.bridge.poison_messages";
    /// Subscription consumers paused by `stop_consumer` on a bridge instance (gauge, sampled).
    pub const PAUSED_CONSUMERS: &str = "purista.consumers.paused";
    /// Jobs ready to lease (gauge, sampled).
    pub const QUEUE_DEPTH: &str = "purista.queue.depth";
    /// Jobs under lease (gauge, sampled).
    pub const QUEUE_LEASED: &str = "purista.queue.leased";
    /// Jobs waiting for their run-at or retry time (gauge, sampled).
    pub const QUEUE_DELAYED: &str = "purista.queue.delayed";
    /// Jobs in the dead-letter queue (gauge, sampled).
    pub const QUEUE_DEAD_LETTERED: &str = "purista.queue.dead_lettered";
}

/// The sampled meters of one bridge instance.
pub(crate) struct BridgeMeters {
    reconnects: Counter,
    poison: Counter,
    paused: Gauge,
}

impl BridgeMeters {
    /// Registers the meters of bridge instance `instance` on `system`.
    pub fn new(system: &str, instance: &str) -> Self {
        let labels = || {
            vec![
                Label::new("messaging.system", system.to_string()),
                Label::new("purista.instance.id", instance.to_string()),
            ]
        };
        BridgeMeters {
            reconnects: metrics::counter!(names::RECONNECTS, labels()),
            poison: metrics::counter!(names::POISON_MESSAGES, labels()),
            paused: metrics::gauge!(names::PAUSED_CONSUMERS, labels()),
        }
    }

    /// Sets the values read from the bridge.
    pub fn set(&self, counters: &crate::BridgeCounters, paused: usize) {
        self.reconnects.absolute(counters.reconnects);
        self.poison.absolute(counters.poison_messages);
        self.paused.set(paused as f64);
    }
}

/// The sampled meters of one queue.
pub(crate) struct QueueMeters {
    depth: Gauge,
    leased: Gauge,
    delayed: Gauge,
    dead_lettered: Gauge,
}

impl QueueMeters {
    /// Registers the meters of `queue` on the queue bridge `system`.
    pub fn new(system: &str, queue: &str) -> Self {
        let labels = || {
            vec![
                Label::new("messaging.system", system.to_string()),
                Label::new("messaging.destination.name", queue.to_string()),
            ]
        };
        QueueMeters {
            depth: metrics::gauge!(names::QUEUE_DEPTH, labels()),
            leased: metrics::gauge!(names::QUEUE_LEASED, labels()),
            delayed: metrics::gauge!(names::QUEUE_DELAYED, labels()),
            dead_lettered: metrics::gauge!(names::QUEUE_DEAD_LETTERED, labels()),
        }
    }

    /// Sets the values read from the queue bridge.
    pub fn set(&self, m: &crate::QueueMetrics) {
        self.depth.set(m.depth as f64);
        self.leased.set(m.leased as f64);
        self.delayed.set(m.delayed as f64);
        self.dead_lettered.set(m.dead_lettered as f64);
    }
}

/// The meters of one registration, registered once at start.
pub(crate) struct RegistrationMeters {
    settled: [Counter; 6],
    duration: Histogram,
    in_flight: Gauge,
}

impl RegistrationMeters {
    /// Registers the meters of `registration` (a `kind`: command, subscription, stream, job).
    pub fn new(system: &str, kind: &'static str, registration: &str) -> Self {
        let labels = || {
            vec![
                Label::new("messaging.system", system.to_string()),
                Label::new("purista.kind", kind),
                Label::new("messaging.destination.name", registration.to_string()),
            ]
        };
        let settled = OUTCOMES.map(|(_, name)| {
            let mut l = labels();
            l.push(Label::new("purista.outcome", name));
            metrics::counter!(names::SETTLED, l)
        });
        RegistrationMeters {
            settled,
            duration: metrics::histogram!(names::PROCESS_DURATION, labels()),
            in_flight: metrics::gauge!(names::IN_FLIGHT, labels()),
        }
    }

    /// Counts one attempt that ended `how`.
    pub fn settled(&self, how: Settled) {
        if let Some(i) = OUTCOMES.iter().position(|(s, _)| *s == how) {
            self.settled[i].increment(1);
        }
    }

    /// Records one handler's run time.
    pub fn took(&self, d: Duration) {
        self.duration.record(d.as_secs_f64());
    }

    /// Counts one running handler until the guard is dropped.
    pub fn running(&self) -> Running<'_> {
        self.in_flight.increment(1.0);
        Running(&self.in_flight)
    }
}

/// A running handler, counted in `purista.inflight` until dropped.
pub(crate) struct Running<'a>(&'a Gauge);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The client-side meters of one service, registered once at start.
pub(crate) struct ClientMeters {
    invoke_duration: Histogram,
    invoke_failures: Counter,
    sent_invoke: Counter,
    sent_emit: Counter,
    sent_enqueue: Counter,
}

/// What a service sends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SendKind {
    Invoke,
    Emit,
    Enqueue,
}

impl ClientMeters {
    /// Registers the meters of the service `service` on `system`.
    pub fn new(system: &str, service: &str) -> Self {
        let labels = |op: Option<&'static str>| {
            let mut l = vec![
                Label::new("messaging.system", system.to_string()),
                Label::new("purista.service.name", service.to_string()),
            ];
            if let Some(op) = op {
                l.push(Label::new("messaging.operation.name", op));
            }
            l
        };
        ClientMeters {
            invoke_duration: metrics::histogram!(
                names::CLIENT_OPERATION_DURATION,
                labels(Some("invoke"))
            ),
            invoke_failures: metrics::counter!(names::INVOKE_FAILURES, labels(None)),
            sent_invoke: metrics::counter!(names::SENT, labels(Some("invoke"))),
            sent_emit: metrics::counter!(names::SENT, labels(Some("emit"))),
            sent_enqueue: metrics::counter!(names::SENT, labels(Some("enqueue"))),
        }
    }

    /// Counts one message sent.
    pub fn sent(&self, what: SendKind) {
        match what {
            SendKind::Invoke => &self.sent_invoke,
            SendKind::Emit => &self.sent_emit,
            SendKind::Enqueue => &self.sent_enqueue,
        }
        .increment(1);
    }

    /// Records one invocation's latency and whether it failed.
    pub fn invoked(&self, took: Duration, failed: bool) {
        self.invoke_duration.record(took.as_secs_f64());
        if failed {
            self.invoke_failures.increment(1);
        }
    }
}

/// Describes the metrics (units and help texts) to the installed recorder. Optional: call it
/// once after installing a recorder that shows descriptions (Prometheus' `# HELP`).
pub fn describe() {
    use metrics::Unit;
    metrics::describe_histogram!(
        names::PROCESS_DURATION,
        Unit::Seconds,
        "Handler run time per registration"
    );
    metrics::describe_counter!(
        names::SETTLED,
        "Attempts at messages and jobs per registration, by outcome"
    );
    metrics::describe_gauge!(names::IN_FLIGHT, "Running handlers per registration");
    metrics::describe_histogram!(
        names::CLIENT_OPERATION_DURATION,
        Unit::Seconds,
        "Invocation latency, from sending a command to its response"
    );
    metrics::describe_counter!(names::SENT, "Messages sent, by operation");
    metrics::describe_counter!(names::INVOKE_FAILURES, "Invocations that ended in an error");
    metrics::describe_counter!(names::RECONNECTS, "Reconnects of a bridge instance");
    metrics::describe_counter!(
        names::POISON_MESSAGES,
        "Deliveries a bridge instance could not process as what their queue carries"
    );
    metrics::describe_gauge!(
        names::PAUSED_CONSUMERS,
        "Subscription consumers paused by stop_consumer"
    );
    metrics::describe_gauge!(names::QUEUE_DEPTH, "Jobs ready to lease");
    metrics::describe_gauge!(names::QUEUE_LEASED, "Jobs under lease");
    metrics::describe_gauge!(names::QUEUE_DELAYED, "Jobs waiting for their time");
    metrics::describe_gauge!(names::QUEUE_DEAD_LETTERED, "Jobs in the dead-letter queue");
}
