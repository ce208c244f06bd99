//! The strict startup check (DESIGN §3.7): every registration's needs are compared with the
//! bridge's capabilities, and a strict start refuses with ONE error listing every mismatch
//! (registration, need, bridge). Non-strict mode starts and degrades.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_core::capabilities::{
    Capabilities, FilterSupport, Mismatch, Need, QueueCapabilities, Requirement, StrictCheckError,
    check,
};
use purista_core::service::{CommandDef, Context, Empty, Service, StreamDef, SubscriptionDef};
use purista_core::stream::StreamWriter;
use purista_core::{
    Address, BridgeError, BridgeHealth, CommandHandler, DeliveryGuarantee, DeliveryHandler,
    DrainReport, Envelope, EventBridge, InFlight, PausedConsumer, RegistrationKey, StartError,
    StreamConsumerEnd, StreamHandler, SubscriptionContext, SubscriptionFilter,
    SubscriptionOperator, SubscriptionSpec,
};
use serde_json::Value;

/// A bridge that declares commands and nothing else, and accepts every call.
struct CommandsOnlyBridge {
    caps: Capabilities,
}

impl CommandsOnlyBridge {
    fn shared() -> Arc<dyn EventBridge> {
        Arc::new(CommandsOnlyBridge {
            caps: commands_only(),
        })
    }
}

fn commands_only() -> Capabilities {
    Capabilities {
        commands: true,
        ..Capabilities::none("fake")
    }
}

#[async_trait]
impl SubscriptionOperator for CommandsOnlyBridge {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        Vec::new()
    }
    async fn resume_subscription_consumer(
        &self,
        _key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        Ok(false)
    }
}

#[async_trait]
impl EventBridge for CommandsOnlyBridge {
    fn name(&self) -> &str {
        "fake"
    }
    fn instance_id(&self) -> &str {
        "fake-1"
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    fn default_command_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
    async fn start(&self) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn health(&self) -> BridgeHealth {
        BridgeHealth::Healthy
    }
    async fn emit(&self, _message: Envelope) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn invoke(&self, _command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError> {
        Err(BridgeError::Timeout(ttl.as_millis() as u64))
    }
    async fn register_command(
        &self,
        _address: Address,
        _handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn unregister_command(&self, _address: &Address) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn register_subscription(
        &self,
        _spec: SubscriptionSpec,
        _handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn unregister_subscription(&self, _key: &RegistrationKey) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn register_stream(
        &self,
        _address: Address,
        _handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn unregister_stream(&self, _address: &Address) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn open_stream(&self, _open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        Err(BridgeError::Unsupported("streams".into()))
    }
    fn in_flight(&self) -> InFlight {
        InFlight::default()
    }
    async fn shutdown(&self, _deadline: tokio::time::Instant) -> DrainReport {
        DrainReport {
            completed: true,
            ..DrainReport::default()
        }
    }
}

fn echo(name: &str) -> CommandDef {
    CommandDef::new(
        name,
        |_ctx: Context, v: Value, _p: Empty| async move { Ok(v) },
    )
}

fn ignore(name: &str) -> SubscriptionDef {
    SubscriptionDef::new(name, |_ctx: SubscriptionContext, _v: Value| async move {
        Ok(())
    })
}

fn count_stream(name: &str) -> StreamDef {
    StreamDef::new(
        name,
        |_ctx: Context, _v: Value, _p: Empty, _out: StreamWriter| async move { Ok(()) },
    )
}

/// Two commands (supported) and registrations that need five different things the fake lacks.
fn demanding_service(strict: bool) -> Service {
    Service::builder("orders", "1")
        .strict(strict)
        .command(echo("placeOrder"))
        .command(echo("cancelOrder"))
        .stream(count_stream("exportOrders"))
        .subscription(ignore("onPaid").event_name("orderPaid").durable(true))
        .subscription(ignore("audit").max_attempts(3))
        .build()
}

fn expected_mismatches() -> Vec<Mismatch> {
    let m = |registration: &str, need: Need| Mismatch {
        registration: registration.into(),
        need,
        bridge: "fake".into(),
    };
    vec![
        m("stream orders@1/exportOrders", Need::Streams),
        m("subscription orders@1/onPaid", Need::SharedSubscription),
        m("subscription orders@1/onPaid", Need::DurableSubscription),
        m("subscription orders@1/audit", Need::EventName),
        m("subscription orders@1/audit", Need::SharedSubscription),
        m(
            "subscription orders@1/audit",
            Need::BoundedRetry { max_attempts: 3 },
        ),
    ]
}

fn req(registration: &str, need: Need) -> Requirement {
    Requirement {
        registration: registration.into(),
        need,
    }
}

#[test]
fn check_returns_one_mismatch_per_unmet_requirement() {
    let reqs = vec![
        req("command a@1/x", Need::Commands),
        req("stream a@1/s", Need::Streams),
        req("subscription a@1/y", Need::DurableSubscription),
        req("subscription a@1/y", Need::DeadLetter),
    ];
    let unmet = check(&reqs, Some(&commands_only()), None);
    assert_eq!(
        unmet,
        vec![
            Mismatch {
                registration: "stream a@1/s".into(),
                need: Need::Streams,
                bridge: "fake".into(),
            },
            Mismatch {
                registration: "subscription a@1/y".into(),
                need: Need::DurableSubscription,
                bridge: "fake".into(),
            },
            Mismatch {
                registration: "subscription a@1/y".into(),
                need: Need::DeadLetter,
                bridge: "fake".into(),
            },
        ]
    );
}

#[test]
fn check_reports_nothing_when_every_need_is_met() {
    let caps = Capabilities {
        commands: true,
        streams: true,
        filters: FilterSupport::Complex,
        shared_subscriptions: true,
        durable_subscriptions: true,
        dead_letter: true,
        ..Capabilities::none("full")
    };
    let reqs = vec![
        req("command a@1/x", Need::Commands),
        req("stream a@1/s", Need::Streams),
        req("subscription a@1/y", Need::ComplexFilter),
        req("subscription a@1/y", Need::SharedSubscription),
        req("subscription a@1/y", Need::DurableSubscription),
        req("subscription a@1/y", Need::DeadLetter),
    ];
    assert_eq!(check(&reqs, Some(&caps), None), vec![]);
}

#[test]
fn check_keeps_duplicate_needs_of_different_registrations_apart() {
    let reqs = vec![
        req("subscription a@1/y", Need::DurableSubscription),
        req("subscription a@1/z", Need::DurableSubscription),
    ];
    let unmet = check(&reqs, Some(&commands_only()), None);
    let regs: Vec<_> = unmet.iter().map(|m| m.registration.as_str()).collect();
    assert_eq!(regs, ["subscription a@1/y", "subscription a@1/z"]);
}

#[test]
fn event_only_bridge_rejects_complex_filters_and_missing_event_names() {
    let reqs = vec![
        req("subscription a@1/y", Need::ComplexFilter),
        req("subscription a@1/y", Need::EventName),
    ];
    let unmet = check(&reqs, Some(&commands_only()), None);
    assert_eq!(unmet.len(), 2);
}

#[test]
fn queue_needs_without_a_queue_bridge_name_the_missing_bridge() {
    let reqs = vec![req("queue worker jobs", Need::QueueIdempotency)];
    let unmet = check(&reqs, Some(&commands_only()), None);
    assert_eq!(unmet.len(), 1);
    assert_eq!(unmet[0].bridge, "(no queue bridge)");
}

#[test]
fn queue_needs_are_checked_against_queue_capabilities() {
    let queues = QueueCapabilities {
        bridge: "q".into(),
        delayed_delivery: true,
        lease_extension: false,
        dead_letter_inspect: true,
        dead_letter_replay: true,
        dead_letter_purge: false,
        idempotency_enforcement: true,
        delivery: DeliveryGuarantee::AtLeastOnce,
    };
    let reqs = vec![
        req("queue worker jobs", Need::QueueDelayedDelivery),
        req("queue worker jobs", Need::QueueIdempotency),
        req("queue worker jobs", Need::QueueLeaseExtension),
        req("queue worker jobs", Need::QueueDeadLetterOps),
    ];
    let unmet = check(&reqs, Some(&commands_only()), Some(&queues));
    let needs: Vec<_> = unmet.iter().map(|m| m.need.clone()).collect();
    assert_eq!(needs, [Need::QueueLeaseExtension, Need::QueueDeadLetterOps]);
    assert!(unmet.iter().all(|m| m.bridge == "q"));
}

#[test]
fn event_needs_without_an_event_bridge_name_the_missing_bridge() {
    let unmet = check(&[req("command a@1/x", Need::Commands)], None, None);
    assert_eq!(unmet[0].bridge, "(no event bridge)");
}

#[test]
fn strict_check_error_lists_every_mismatch_on_its_own_line() {
    let err = StrictCheckError {
        mismatches: expected_mismatches(),
    };
    let text = err.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + err.mismatches.len(), "{text}");
    assert!(
        lines[0].contains(&err.mismatches.len().to_string()),
        "{text}"
    );
    for (line, m) in lines[1..].iter().zip(&err.mismatches) {
        assert!(line.contains(&m.to_string()), "{line:?} vs {m}");
    }
}

#[test]
fn mismatch_display_names_registration_need_and_bridge() {
    let m = Mismatch {
        registration: "subscription orders@1/onPaid".into(),
        need: Need::DelayedRetry { delay_ms: 10 },
        bridge: "fake".into(),
    };
    let text = m.to_string();
    assert!(text.contains("subscription orders@1/onPaid"), "{text}");
    assert!(text.contains("retry_delay_ms = 10"), "{text}");
    assert!(text.contains("fake"), "{text}");
}

#[test]
fn requirements_of_a_fully_specified_subscription_are_exactly_its_needs() {
    let service = Service::builder("orders", "1")
        .subscription(
            ignore("onPaid")
                .event_name("orderPaid")
                .durable(true)
                .max_attempts(3)
                .retry_delay_ms(10)
                .dead_letter_target("orders.failed")
                .pausable()
                .broadcast(),
        )
        .build();
    let reg = "subscription orders@1/onPaid";
    assert_eq!(
        service.requirements(),
        vec![
            req(reg, Need::BroadcastSubscription),
            req(reg, Need::DurableSubscription),
            req(reg, Need::BoundedRetry { max_attempts: 3 }),
            req(reg, Need::DelayedRetry { delay_ms: 10 }),
            req(reg, Need::DeadLetter),
            req(reg, Need::PauseResume),
        ]
    );
}

#[test]
fn requirements_of_a_default_subscription_with_event_name_are_only_shared() {
    let service = Service::builder("orders", "1")
        .subscription(ignore("onPaid").event_name("orderPaid"))
        .build();
    assert_eq!(
        service.requirements(),
        vec![req(
            "subscription orders@1/onPaid",
            Need::SharedSubscription
        )]
    );
}

#[test]
fn requirements_of_a_complex_filter_include_complex_filter() {
    let service = Service::builder("orders", "1")
        .subscription(
            ignore("onPaid").filter(SubscriptionFilter::new().event_name("p").tenant_id("acme")),
        )
        .build();
    assert!(
        service
            .requirements()
            .contains(&req("subscription orders@1/onPaid", Need::ComplexFilter))
    );
}

#[test]
fn retry_delay_without_retries_is_not_a_need() {
    let service = Service::builder("orders", "1")
        .subscription(ignore("onPaid").event_name("p").retry_delay_ms(10))
        .build();
    assert!(
        !service
            .requirements()
            .iter()
            .any(|r| matches!(r.need, Need::DelayedRetry { .. }))
    );
}

#[test]
fn requirements_list_commands_and_streams_by_registration() {
    let reqs = demanding_service(true).requirements();
    assert!(reqs.contains(&req("command orders@1/placeOrder", Need::Commands)));
    assert!(reqs.contains(&req("command orders@1/cancelOrder", Need::Commands)));
    assert!(reqs.contains(&req("stream orders@1/exportOrders", Need::Streams)));
}

#[tokio::test]
async fn strict_start_fails_with_one_error_listing_every_mismatch() {
    let result = demanding_service(true)
        .start(CommandsOnlyBridge::shared())
        .await;
    match result {
        Err(StartError::StrictCheck(err)) => {
            assert_eq!(err.mismatches, expected_mismatches());
            assert_eq!(err.to_string().lines().count(), 1 + 6);
        }
        Err(other) => panic!("expected StrictCheck, got {other}"),
        Ok(_) => panic!("strict start on an incapable bridge must fail"),
    }
}

#[tokio::test]
async fn strict_start_mismatches_equal_the_check_of_the_requirements() {
    let reqs = demanding_service(true).requirements();
    let expected = check(&reqs, Some(&commands_only()), None);
    let Err(StartError::StrictCheck(err)) = demanding_service(true)
        .start(CommandsOnlyBridge::shared())
        .await
    else {
        panic!("expected a strict-check failure");
    };
    assert_eq!(err.mismatches, expected);
    // The two supported commands produce no mismatch.
    assert!(err.mismatches.iter().all(|m| m.need != Need::Commands));
}

#[tokio::test]
async fn non_strict_start_succeeds_on_the_same_bridge() {
    let running = demanding_service(false)
        .start(CommandsOnlyBridge::shared())
        .await
        .expect("non-strict start degrades instead of failing");
    let report = running
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(1))
        .await;
    assert!(report.completed);
}

#[tokio::test]
async fn strict_start_with_only_supported_registrations_succeeds() {
    let running = Service::builder("orders", "1")
        .command(echo("placeOrder"))
        .build()
        .start(CommandsOnlyBridge::shared())
        .await
        .expect("commands are supported");
    running
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(1))
        .await;
}
