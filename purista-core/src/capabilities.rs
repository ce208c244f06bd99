//! What a bridge can do, what a registration needs, and the strict startup check between them.
//!
//! Capabilities are plain data a bridge returns truthfully. At start a service turns each of its
//! registrations into a list of [`Requirement`]s, and [`check`] compares them with the bridge's
//! [`Capabilities`]. In strict mode (the default) any mismatch stops the start with ONE
//! [`StrictCheckError`] listing every mismatch; in non-strict mode each mismatch is a warning and
//! the registration degrades (see each [`Need`] for how).

use serde::{Deserialize, Serialize};

/// How subscriptions can be filtered by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilterSupport {
    /// Every filter field (type, event name, principal, tenant, sender, receiver).
    Complex,
    /// Only `eventName`; subscriptions without one are rejected.
    EventOnly,
}

/// Delivery guarantee for a kind of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryGuarantee {
    /// Delivered at most once: a crash or overflow can lose it.
    AtMostOnce,
    /// Delivered at least once: handlers must be idempotent.
    AtLeastOnce,
}

impl std::fmt::Display for DeliveryGuarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeliveryGuarantee::AtMostOnce => "at-most-once",
            DeliveryGuarantee::AtLeastOnce => "at-least-once",
        })
    }
}

/// Hard limits of a broker. `None` = no limit the bridge knows of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Largest encoded message (the body) the bridge accepts.
    pub max_payload_bytes: Option<usize>,
    /// Largest metadata the bridge sends beside the body (AMQP headers, SQS message
    /// attributes, CloudEvent extensions), measured as the bridge encodes it.
    #[serde(default)]
    pub max_metadata_bytes: Option<usize>,
    /// Most subscriptions one event can reach (EventBridge: 5 targets per rule).
    pub max_targets_per_event: Option<usize>,
    /// Longest resource name.
    pub max_name_len: Option<usize>,
}

/// What an event bridge can do. Returned by [`EventBridge::capabilities`](crate::EventBridge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Bridge name, e.g. `default`.
    pub bridge: String,
    /// Request/reply commands.
    pub commands: bool,
    /// Filter support.
    pub filters: FilterSupport,
    /// Streams.
    pub streams: bool,
    /// Shared (competing) subscriptions.
    pub shared_subscriptions: bool,
    /// Broadcast (every instance) subscriptions.
    pub broadcast_subscriptions: bool,
    /// Messages wait while no consumer is connected.
    pub durable_subscriptions: bool,
    /// The handler's outcome settles the delivery (rather than ack on arrival).
    pub manual_ack: bool,
    /// `max_attempts > 1`.
    pub bounded_retry: bool,
    /// `retry_delay_ms > 0`.
    pub delayed_retry: bool,
    /// A dead-letter target.
    pub dead_letter: bool,
    /// `stop_consumer` and resume.
    pub pause_resume: bool,
    /// Guarantee for commands.
    pub command_delivery: DeliveryGuarantee,
    /// Guarantee for subscriptions (durable ones where the bridge has them).
    pub subscription_delivery: DeliveryGuarantee,
    /// Limits.
    pub limits: Limits,
}

/// What a queue bridge can do. Returned by [`QueueBridge::capabilities`](crate::QueueBridge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueCapabilities {
    /// Bridge name.
    pub bridge: String,
    /// Jobs with a delay or run-at time.
    pub delayed_delivery: bool,
    /// `extend_lease`.
    pub lease_extension: bool,
    /// Listing dead-lettered jobs.
    pub dead_letter_inspect: bool,
    /// Moving dead-lettered jobs back.
    pub dead_letter_replay: bool,
    /// Deleting dead-lettered jobs.
    pub dead_letter_purge: bool,
    /// A repeated enqueue with the same idempotency key returns the first job id.
    pub idempotency_enforcement: bool,
    /// Guarantee for jobs.
    pub delivery: DeliveryGuarantee,
}

/// One thing a registration needs from the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "need")]
pub enum Need {
    /// Request/reply commands. Non-strict: the command is not registered.
    Commands,
    /// Filtering on more than `eventName`. Non-strict: the extra parts are applied in-process.
    ComplexFilter,
    /// An event-only bridge needs `eventName` on every subscription. Non-strict: not registered.
    EventName,
    /// A stream endpoint. Non-strict: not registered.
    Streams,
    /// A shared subscription. Non-strict: broadcast.
    SharedSubscription,
    /// A broadcast subscription. Non-strict: shared.
    BroadcastSubscription,
    /// A durable subscription. Non-strict: non-durable.
    DurableSubscription,
    /// Outcome-driven settlement. Non-strict: the runtime acks each delivery on arrival, before
    /// the handler runs; the handler's outcome is then not applied (a non-`ack` outcome is
    /// logged as a warning), so a failing handler loses the message instead of retrying it.
    ManualAck,
    /// Retries (`max_attempts > 1`). Non-strict: one attempt.
    BoundedRetry {
        /// Requested attempts.
        max_attempts: u32,
    },
    /// Delayed retries. Non-strict: retried at once.
    DelayedRetry {
        /// Requested delay.
        delay_ms: u64,
    },
    /// A dead-letter target. Non-strict: exhausted messages are dropped with an error log.
    DeadLetter,
    /// `stop_consumer` / resume. Non-strict: `stop_consumer` becomes a retry.
    PauseResume,
    /// At-least-once subscription delivery. Non-strict: nothing changes but the startup
    /// warning: deliveries keep the bridge's own (at-most-once) guarantee, and a message lost
    /// by the bridge (a crash, an overflow) stays lost.
    AtLeastOnce,
    /// Jobs scheduled for later. Non-strict: run at once.
    QueueDelayedDelivery,
    /// Lease extension / heartbeats. Non-strict: the lease is not extended.
    QueueLeaseExtension,
    /// Enforced idempotency keys. Non-strict: keys are advisory.
    QueueIdempotency,
    /// Dead-letter inspect, replay and purge. Non-strict: those calls fail.
    QueueDeadLetterOps,
}

impl Need {
    /// True when `caps` satisfies this need (queue needs are never met by event capabilities).
    pub fn met_by(&self, caps: &Capabilities) -> bool {
        match self {
            Need::Commands => caps.commands,
            Need::ComplexFilter => caps.filters == FilterSupport::Complex,
            Need::EventName => caps.filters == FilterSupport::Complex,
            Need::Streams => caps.streams,
            Need::SharedSubscription => caps.shared_subscriptions,
            Need::BroadcastSubscription => caps.broadcast_subscriptions,
            Need::DurableSubscription => caps.durable_subscriptions,
            Need::ManualAck => caps.manual_ack,
            Need::BoundedRetry { .. } => caps.bounded_retry,
            Need::DelayedRetry { .. } => caps.delayed_retry,
            Need::DeadLetter => caps.dead_letter,
            Need::PauseResume => caps.pause_resume,
            Need::AtLeastOnce => caps.subscription_delivery == DeliveryGuarantee::AtLeastOnce,
            Need::QueueDelayedDelivery
            | Need::QueueLeaseExtension
            | Need::QueueIdempotency
            | Need::QueueDeadLetterOps => false,
        }
    }

    /// True when `caps` satisfies this queue need (event needs are never met here).
    pub fn met_by_queue(&self, caps: &QueueCapabilities) -> bool {
        match self {
            Need::QueueDelayedDelivery => caps.delayed_delivery,
            Need::QueueLeaseExtension => caps.lease_extension,
            Need::QueueIdempotency => caps.idempotency_enforcement,
            Need::QueueDeadLetterOps => {
                caps.dead_letter_inspect && caps.dead_letter_replay && caps.dead_letter_purge
            }
            _ => false,
        }
    }

    /// A short plain-language name of the need.
    pub fn describe(&self) -> String {
        match self {
            Need::Commands => "commands".into(),
            Need::ComplexFilter => "filters beyond eventName".into(),
            Need::EventName => "an eventName on the subscription (event-only bridge)".into(),
            Need::Streams => "streams".into(),
            Need::SharedSubscription => "shared subscriptions".into(),
            Need::BroadcastSubscription => "broadcast subscriptions".into(),
            Need::DurableSubscription => "durable subscriptions".into(),
            Need::ManualAck => "manual ack".into(),
            Need::BoundedRetry { max_attempts } => {
                format!("bounded retry (max_attempts = {max_attempts})")
            }
            Need::DelayedRetry { delay_ms } => {
                format!("delayed retry (retry_delay_ms = {delay_ms})")
            }
            Need::DeadLetter => "a dead-letter target".into(),
            Need::PauseResume => "pausing and resuming consumers".into(),
            Need::AtLeastOnce => "at-least-once delivery".into(),
            Need::QueueDelayedDelivery => "delayed jobs".into(),
            Need::QueueLeaseExtension => "lease extension".into(),
            Need::QueueIdempotency => "enforced idempotency keys".into(),
            Need::QueueDeadLetterOps => "dead-letter inspect/replay/purge".into(),
        }
    }
}

/// A need together with the registration that has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Registration, e.g. `subscription orders@1/onPaid`.
    pub registration: String,
    /// What it needs.
    pub need: Need,
}

/// A requirement the bridge does not meet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Registration that has the need.
    pub registration: String,
    /// The need.
    pub need: Need,
    /// The bridge that lacks it.
    pub bridge: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} needs {}, which bridge `{}` does not provide",
            self.registration,
            self.need.describe(),
            self.bridge
        )
    }
}

/// The one error of a strict start: every mismatch, each with registration, need and bridge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct StrictCheckError {
    /// All mismatches, in registration order.
    pub mismatches: Vec<Mismatch>,
}

impl std::fmt::Display for StrictCheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "strict startup check failed with {} mismatch(es):",
            self.mismatches.len()
        )?;
        for m in &self.mismatches {
            write!(f, "\n  - {m}")?;
        }
        Ok(())
    }
}

/// Compares requirements with capabilities; returns the unmet ones in input order.
///
/// ```
/// use purista_core::capabilities::{check, Need, Requirement};
/// let caps = purista_core::capabilities::Capabilities::none("tiny");
/// let reqs = vec![Requirement { registration: "command a@1/x".into(), need: Need::Commands }];
/// let unmet = check(&reqs, Some(&caps), None);
/// assert_eq!(unmet.len(), 1);
/// assert_eq!(unmet[0].bridge, "tiny");
/// ```
pub fn check(
    requirements: &[Requirement],
    events: Option<&Capabilities>,
    queues: Option<&QueueCapabilities>,
) -> Vec<Mismatch> {
    requirements
        .iter()
        .filter_map(|r| {
            let (met, bridge) = if is_queue_need(&r.need) {
                match queues {
                    Some(q) => (r.need.met_by_queue(q), q.bridge.clone()),
                    None => (false, "(no queue bridge)".to_string()),
                }
            } else {
                match events {
                    Some(c) => (r.need.met_by(c), c.bridge.clone()),
                    None => (false, "(no event bridge)".to_string()),
                }
            };
            (!met).then(|| Mismatch {
                registration: r.registration.clone(),
                need: r.need.clone(),
                bridge,
            })
        })
        .collect()
}

fn is_queue_need(n: &Need) -> bool {
    matches!(
        n,
        Need::QueueDelayedDelivery
            | Need::QueueLeaseExtension
            | Need::QueueIdempotency
            | Need::QueueDeadLetterOps
    )
}

impl Capabilities {
    /// A bridge that can do nothing at all; a base for declaring capabilities field by field.
    pub fn none(bridge: impl Into<String>) -> Self {
        Capabilities {
            bridge: bridge.into(),
            commands: false,
            filters: FilterSupport::EventOnly,
            streams: false,
            shared_subscriptions: false,
            broadcast_subscriptions: false,
            durable_subscriptions: false,
            manual_ack: false,
            bounded_retry: false,
            delayed_retry: false,
            dead_letter: false,
            pause_resume: false,
            command_delivery: DeliveryGuarantee::AtMostOnce,
            subscription_delivery: DeliveryGuarantee::AtMostOnce,
            limits: Limits::default(),
        }
    }

    /// The capability rows as `(name, value)` pairs, in a fixed order, for reports.
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let yn = |b: bool| if b { "yes" } else { "no" }.to_string();
        let limit = |l: Option<usize>| l.map_or("-".to_string(), |v| v.to_string());
        vec![
            ("commands", yn(self.commands)),
            (
                "filters",
                match self.filters {
                    FilterSupport::Complex => "complex".into(),
                    FilterSupport::EventOnly => "event-only".into(),
                },
            ),
            ("streams", yn(self.streams)),
            ("shared subscriptions", yn(self.shared_subscriptions)),
            ("broadcast subscriptions", yn(self.broadcast_subscriptions)),
            ("durable subscriptions", yn(self.durable_subscriptions)),
            ("manual ack", yn(self.manual_ack)),
            ("bounded retry", yn(self.bounded_retry)),
            ("delayed retry", yn(self.delayed_retry)),
            ("dead letter", yn(self.dead_letter)),
            ("pause/resume", yn(self.pause_resume)),
            ("command delivery", self.command_delivery.to_string()),
            (
                "subscription delivery",
                self.subscription_delivery.to_string(),
            ),
            ("max payload bytes", limit(self.limits.max_payload_bytes)),
            ("max metadata bytes", limit(self.limits.max_metadata_bytes)),
            (
                "max targets per event",
                limit(self.limits.max_targets_per_event),
            ),
        ]
    }

    /// A markdown table of several bridges' capabilities, one column per bridge.
    pub fn markdown_table(bridges: &[&Capabilities]) -> String {
        let mut out = String::from("| capability |");
        for b in bridges {
            out.push_str(&format!(" {} |", b.bridge));
        }
        out.push_str("\n|---|");
        for _ in bridges {
            out.push_str("---|");
        }
        out.push('\n');
        let rows: Vec<_> = bridges.iter().map(|b| b.rows()).collect();
        if let Some(first) = rows.first() {
            for (i, (name, _)) in first.iter().enumerate() {
                out.push_str(&format!("| {name} |"));
                for r in &rows {
                    out.push_str(&format!(" {} |", r[i].1));
                }
                out.push('\n');
            }
        }
        out
    }
}
