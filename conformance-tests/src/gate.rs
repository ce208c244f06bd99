//! Capability gating: a declared capability runs its behaviour; an undeclared one runs the
//! strict check instead.
//!
//! The strict check for a need builds the smallest service that has exactly that need (a
//! *probe*), and proves both sides of DESIGN §3.7: a strict start fails with one
//! [`StrictCheckError`](purista_core::StrictCheckError) naming the need and the registration,
//! and a non-strict start succeeds with a warning naming them.

use std::sync::Arc;

use purista_core::{
    CommandDef, Context, Empty, JobContext, Need, QueueConfig, QueueDeclaration, QueueError,
    QueueWorkerDef, Service, ServiceBuilder, StartError, StreamDef, SubscriptionContext,
    SubscriptionDef, SubscriptionFilter,
};

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::logs;
use crate::support::eventually;

/// True for needs a queue bridge meets.
pub fn is_queue_need(need: &Need) -> bool {
    matches!(
        need,
        Need::QueueDelayedDelivery
            | Need::QueueLeaseExtension
            | Need::QueueIdempotency
            | Need::QueueDeadLetterOps
    )
}

/// Whether the harness declares `need`.
pub fn declares(h: &Arc<dyn Harness>, need: &Need) -> bool {
    declares_on(&**h, need)
}

/// [`declares`] on a borrowed harness.
pub fn declares_on(h: &dyn Harness, need: &Need) -> bool {
    if is_queue_need(need) {
        h.queue_capabilities()
            .is_some_and(|q| need.met_by_queue(&q))
    } else {
        need.met_by(&h.capabilities())
    }
}

/// One registration of a probe service.
pub enum ProbeDef {
    /// A command.
    Command(CommandDef),
    /// A stream.
    Stream(StreamDef),
    /// A subscription.
    Subscription(Box<SubscriptionDef>),
    /// A queue worker.
    Worker(QueueWorkerDef),
}

impl ProbeDef {
    /// Adds the registration to `builder`.
    pub fn add_to(self, builder: ServiceBuilder) -> ServiceBuilder {
        match self {
            ProbeDef::Command(d) => builder.command(d),
            ProbeDef::Stream(d) => builder.stream(d),
            ProbeDef::Subscription(d) => builder.subscription(*d),
            ProbeDef::Worker(d) => builder.queue_worker(d),
        }
    }
}

/// Every need a registration can declare, with the values the probes use.
pub fn probe_needs() -> Vec<Need> {
    vec![
        Need::Commands,
        Need::Streams,
        Need::ComplexFilter,
        Need::EventName,
        Need::SharedSubscription,
        Need::BroadcastSubscription,
        Need::DurableSubscription,
        Need::ManualAck,
        Need::BoundedRetry { max_attempts: 3 },
        Need::DelayedRetry { delay_ms: 100 },
        Need::DeadLetter,
        Need::PauseResume,
        Need::AtLeastOnce,
        Need::QueueDelayedDelivery,
        Need::QueueLeaseExtension,
        Need::QueueIdempotency,
        Need::QueueDeadLetterOps,
    ]
}

/// A registration named `name` of service `service` that needs `need` (and as little else as
/// possible), with the registration string the strict check reports for it.
pub fn probe(need: &Need, service: &str, name: &str, queue: &str) -> (String, ProbeDef) {
    let event = format!("{service}-{name}-probed");
    let sub = |def: SubscriptionDef| {
        (
            format!("subscription {service}@1/{name}"),
            ProbeDef::Subscription(Box::new(def)),
        )
    };
    let handler = |_ctx: SubscriptionContext, _v: serde_json::Value| async move { Ok(()) };
    let worker = |def: QueueWorkerDef| (format!("queue worker {queue}"), ProbeDef::Worker(def));
    let job = |_ctx: JobContext, _p: serde_json::Value, _q: Empty| async move { Ok(()) };
    match need {
        Need::Commands => (
            format!("command {service}@1/{name}"),
            ProbeDef::Command(CommandDef::new(
                name,
                |_ctx: Context, _p: Empty, _q: Empty| async move { Ok(()) },
            )),
        ),
        Need::Streams => (
            format!("stream {service}@1/{name}"),
            ProbeDef::Stream(StreamDef::new(
                name,
                |_ctx: Context, _p: Empty, _q: Empty, _w| async move { Ok(()) },
            )),
        ),
        Need::ComplexFilter => sub(SubscriptionDef::new(name, handler).filter(
            SubscriptionFilter::new()
                .event_name(event)
                .tenant_id("probe-tenant"),
        )),
        Need::EventName => sub(SubscriptionDef::new(name, handler).filter(
            SubscriptionFilter::new().message_type(purista_core::MessageType::CustomMessage),
        )),
        Need::SharedSubscription => sub(SubscriptionDef::new(name, handler).event_name(event)),
        Need::BroadcastSubscription => sub(SubscriptionDef::new(name, handler)
            .event_name(event)
            .broadcast()),
        Need::DurableSubscription => sub(SubscriptionDef::new(name, handler)
            .event_name(event)
            .durable(true)),
        Need::BoundedRetry { max_attempts } => sub(SubscriptionDef::new(name, handler)
            .event_name(event)
            .max_attempts(*max_attempts)),
        Need::DelayedRetry { delay_ms } => sub(SubscriptionDef::new(name, handler)
            .event_name(event)
            .max_attempts(2)
            .retry_delay_ms(*delay_ms)),
        Need::DeadLetter => sub(SubscriptionDef::new(name, handler)
            .event_name(event)
            .dead_letter_target(format!("{service}.dead-letter"))),
        Need::PauseResume => sub(SubscriptionDef::new(name, handler)
            .event_name(event)
            .pausable()),
        Need::ManualAck | Need::AtLeastOnce => sub(SubscriptionDef::new(name, handler)
            .event_name(event)
            .require(need.clone())),
        Need::QueueDelayedDelivery => worker(QueueWorkerDef::new(queue, job).delayed_jobs()),
        Need::QueueIdempotency => worker(QueueWorkerDef::new(queue, job).enforce_idempotency()),
        Need::QueueLeaseExtension => worker(QueueWorkerDef::new(queue, job).config(QueueConfig {
            auto_heartbeat: true,
            ..QueueConfig::default()
        })),
        Need::QueueDeadLetterOps => worker(QueueWorkerDef::new(queue, job).dead_letter_ops()),
    }
}

/// The bridge name a mismatch of `need` must report.
pub fn bridge_for(h: &Arc<dyn Harness>, need: &Need) -> String {
    if is_queue_need(need) {
        h.queue_capabilities()
            .map(|q| q.bridge)
            .unwrap_or_else(|| "(no queue bridge)".into())
    } else {
        h.capabilities().bridge
    }
}

/// Waits until a warning names `registration` and `need` (a non-strict start's degrade notice).
pub async fn expect_mismatch_warning(registration: &str, need: &Need) {
    let describe = need.describe();
    eventually(
        &format!("a non-strict start warns that {registration} needs {describe}"),
        crate::support::ARRIVAL,
        || {
            let found = !logs::warnings(|c| {
                c.field("registration") == Some(registration)
                    && c.field("need") == Some(describe.as_str())
            })
            .is_empty();
            async move { found }
        },
    )
    .await;
}

/// The strict check for an undeclared `need`. Panics (fails the case) when a strict start
/// accepts the need, names it wrongly, or a non-strict start fails or does not warn. For
/// undeclared dead-letter operations on a queue bridge, the calls themselves must also fail
/// with `Unsupported`.
pub async fn rejects_at_startup(h: &Arc<dyn Harness>, need: Need) {
    let mut env = TestEnv::new(h, 1).await;
    if let (Need::QueueDeadLetterOps, Some(q)) = (&need, env.deployment.queues.clone()) {
        let queue = format!("{}.undeclared-ops", env.prefix);
        q.declare_queue(
            &queue,
            QueueDeclaration::new("conformance@1", QueueConfig::default()),
        )
        .await
        .unwrap_or_else(|e| panic!("declaring queue `{queue}` failed: {e}"));
        let listed = q.inspect_dead_letters(&queue, 10).await;
        assert!(
            matches!(listed, Err(QueueError::Unsupported(_))),
            "undeclared dead-letter operations must fail with Unsupported, got {listed:?}"
        );
    }
    let service = env.name("probe");
    let queue = format!("{}.probe", env.prefix);
    let (registration, strict) = probe(&need, &service, "probe", &queue);
    let expected_bridge = bridge_for(h, &need);
    let strict = strict.add_to(Service::builder(&service, "1")).strict(true);
    match env.try_start(0, strict).await {
        Ok(_) => panic!(
            "a strict start accepted {registration}, which needs {} that bridge `{}` does not declare",
            need.describe(),
            h.name()
        ),
        Err(StartError::StrictCheck(e)) => {
            assert!(
                e.mismatches.iter().any(|m| m.need == need
                    && m.registration == registration
                    && m.bridge == expected_bridge),
                "the strict check refused the start but does not name {registration} needing {} on `{expected_bridge}`: {e}",
                need.describe()
            );
        }
        Err(other) => panic!(
            "a strict start of {registration} (needing undeclared {}) failed with the wrong error: {other}",
            need.describe()
        ),
    }

    let (_, lenient) = probe(&need, &service, "probe", &queue);
    let lenient = lenient
        .add_to(Service::builder(&service, "1"))
        .strict(false);
    if let Err(e) = env.try_start(0, lenient).await {
        panic!("a non-strict start of {registration} must degrade and start, but failed: {e}");
    }
    expect_mismatch_warning(&registration, &need).await;
    env.finish().await;
}
