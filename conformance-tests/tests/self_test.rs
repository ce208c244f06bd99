//! Tests of the suite itself, on the in-process bridge wrapped in a decorator:
//!
//! * the suite catches broken bridges: each mutant has one deliberate fault, and the case that
//!   pins that behaviour must fail;
//! * the reliability cases, which need broker-control hooks no in-process broker has, run end to
//!   end against hooks that do nothing (a dry run of the cases' own machinery).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use purista_conformance::harnesses::DefaultHarness;
use purista_conformance::plan::Plan;
use purista_conformance::runner::{Case, run_case};
use purista_conformance::{BrokerControl, Deployment, Harness, Offer, TestMode, Verdict};
use purista_core::{
    Address, BridgeError, BridgeHealth, Capabilities, CommandHandler, DeadLetterEntry, Delivery,
    DeliveryGuarantee, DeliveryHandler, DrainReport, Envelope, EventBridge, InFlight,
    PausedConsumer, QueueCapabilities, RegistrationKey, ReplayReport, Settlement,
    StreamConsumerEnd, StreamHandler, SubscriptionOperator, SubscriptionSpec,
};

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `emit` loses fields the envelope does not define.
    DropsUnknownFields,
    /// Declares durable subscriptions it does not have.
    OverclaimsDurable,
    /// Routes as if the subscription had no tenant filter.
    IgnoresTenantFilter,
    /// Treats shared subscriptions as broadcast.
    SharedAsBroadcast,
    /// Reports no in-flight work.
    ReportsNothingInFlight,
    /// Hands out dead letters with their payload replaced.
    CorruptsDeadLetters,
    /// Keeps waiting for a response past the caller's ttl and drops a late one without a word.
    SilentlyDropsLateResponses,
    /// Warns about a late response as it should, then hands it to the next invocation that
    /// waits.
    HandsLateResponsesToTheNextWaiter,
    /// Takes every delivery into a buffer of its own at once (ignoring prefetch) and, when
    /// the subscription is unregistered or the instance shuts down, acks what it had not
    /// handled yet.
    DropsPrefetchedOnUnregister,
    /// Declares at-least-once subscriptions and treats shared subscriptions as broadcast.
    SharedAsBroadcastAtLeastOnce,
    /// Runs many deliveries at once whatever prefetch the subscription asked for.
    IgnoresPrefetch,
    /// Returns from `emit` before the message is published; a shutdown right after loses it.
    LosesUnflushedEmits,
    /// No fault, but claims durable at-least-once subscriptions so the reliability cases run
    /// (harmless: nothing is ever lost when the broker-control hooks do nothing).
    None,
}

struct Mutant {
    inner: Arc<dyn EventBridge>,
    caps: Capabilities,
    fault: Fault,
    /// Late responses kept for the next waiter ([`Fault::HandsLateResponsesToTheNextWaiter`]).
    late: Arc<LateResponses>,
    /// Set when a subscription is unregistered or the instance shuts down
    /// ([`Fault::DropsPrefetchedOnUnregister`]).
    leaving: Arc<AtomicBool>,
}

/// The handler of [`Fault::DropsPrefetchedOnUnregister`]: takes deliveries at once, handles
/// them one by one, and acks the rest unhandled once its instance is leaving.
struct Prefetching {
    buffer: tokio::sync::mpsc::UnboundedSender<Delivery>,
}

impl Prefetching {
    fn new(inner: Arc<dyn DeliveryHandler>, leaving: Arc<AtomicBool>) -> Self {
        let (buffer, mut taken) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
        tokio::spawn(async move {
            while let Some(delivery) = taken.recv().await {
                if leaving.load(Ordering::Acquire) {
                    let _ = delivery.settle.settle(Settlement::Ack).await;
                } else {
                    inner.deliver(delivery).await;
                }
            }
        });
        Prefetching { buffer }
    }
}

#[async_trait]
impl DeliveryHandler for Prefetching {
    async fn deliver(&self, delivery: Delivery) {
        let _ = self.buffer.send(delivery);
    }
}

#[derive(Default)]
struct LateResponses {
    kept: parking_lot::Mutex<Vec<Envelope>>,
    arrived: tokio::sync::Notify,
}

impl LateResponses {
    async fn next(&self) -> Envelope {
        loop {
            let arrived = self.arrived.notified();
            if let Some(e) = self.kept.lock().pop() {
                return e;
            }
            arrived.await;
        }
    }
}

impl Mutant {
    /// The invocation as the two late-response faults do it: the inner bridge waits far past
    /// `ttl`, the caller gets a 504 at `ttl`, and what arrives later is dropped silently or kept
    /// for the next waiter.
    async fn invoke_keeping_late_responses(
        &self,
        command: Envelope,
        ttl: Duration,
    ) -> Result<Envelope, BridgeError> {
        let correlation_id = command.correlation_id.clone().unwrap_or_default();
        let inner = self.inner.clone();
        let (fault, late) = (self.fault, self.late.clone());
        let mut call = tokio::spawn(async move {
            let answer = inner.invoke(command, ttl + Duration::from_secs(30)).await;
            (answer, fault, late)
        });
        let waited = tokio::select! {
            joined = tokio::time::timeout(ttl, &mut call) => joined,
            kept = self.late.next(), if matches!(self.fault, Fault::HandsLateResponsesToTheNextWaiter) => {
                return Ok(kept);
            }
        };
        match waited {
            Ok(joined) => joined.expect("the inner invocation does not panic").0,
            Err(_) => {
                tokio::spawn(async move {
                    if let Ok((Ok(response), Fault::HandsLateResponsesToTheNextWaiter, late)) =
                        call.await
                    {
                        tracing::warn!(
                            correlation_id = correlation_id.as_str(),
                            "response for an unknown or expired invocation ignored"
                        );
                        late.kept.lock().push(response);
                        late.arrived.notify_waiters();
                    }
                });
                Err(BridgeError::Timeout(ttl.as_millis() as u64))
            }
        }
    }
}

fn mutate_caps(mut caps: Capabilities, fault: Fault) -> Capabilities {
    match fault {
        Fault::OverclaimsDurable => caps.durable_subscriptions = true,
        Fault::SharedAsBroadcastAtLeastOnce => {
            caps.subscription_delivery = DeliveryGuarantee::AtLeastOnce;
        }
        Fault::None => {
            caps.durable_subscriptions = true;
            caps.subscription_delivery = DeliveryGuarantee::AtLeastOnce;
        }
        _ => {}
    }
    caps
}

/// Broker-control hooks that do nothing, on the mutant's own (in-process) broker.
struct NoOpControl(Fault);

#[async_trait]
impl BrokerControl for NoOpControl {
    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        MutantHarness(self.0).deployment(prefix, instances).await
    }
    async fn drop_connections(&self, _prefix: &str) {}
    async fn restart(&self) {}
}

#[async_trait]
impl SubscriptionOperator for Mutant {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        self.inner.paused_subscription_consumers()
    }
    async fn resume_subscription_consumer(
        &self,
        key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        self.inner.resume_subscription_consumer(key).await
    }
    async fn inspect_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, BridgeError> {
        let mut entries = self.inner.inspect_dead_letters(target, limit).await?;
        if let Fault::CorruptsDeadLetters = self.fault {
            for e in &mut entries {
                if let Some(env) = e.envelope.as_mut() {
                    env.payload = serde_json::json!({});
                }
            }
        }
        Ok(entries)
    }
    async fn replay_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<ReplayReport, BridgeError> {
        self.inner.replay_dead_letters(target, limit).await
    }
    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        self.inner.purge_dead_letters(target).await
    }
}

#[async_trait]
impl EventBridge for Mutant {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn instance_id(&self) -> &str {
        self.inner.instance_id()
    }
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    fn default_command_timeout(&self) -> Duration {
        self.inner.default_command_timeout()
    }
    async fn start(&self) -> Result<(), BridgeError> {
        self.inner.start().await
    }
    async fn health(&self) -> BridgeHealth {
        self.inner.health().await
    }
    async fn emit(&self, mut message: Envelope) -> Result<(), BridgeError> {
        match self.fault {
            Fault::DropsUnknownFields => message.extra.clear(),
            Fault::LosesUnflushedEmits => {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = inner.emit(message).await;
                });
                return Ok(());
            }
            _ => {}
        }
        self.inner.emit(message).await
    }
    async fn invoke(&self, command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError> {
        match self.fault {
            Fault::SilentlyDropsLateResponses | Fault::HandsLateResponsesToTheNextWaiter => {
                self.invoke_keeping_late_responses(command, ttl).await
            }
            _ => self.inner.invoke(command, ttl).await,
        }
    }
    async fn register_command(
        &self,
        address: Address,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError> {
        self.inner.register_command(address, handler).await
    }
    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        self.inner.unregister_command(address).await
    }
    async fn register_subscription(
        &self,
        mut spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        let handler = match self.fault {
            Fault::IgnoresTenantFilter => {
                spec.filter.tenant_id = None;
                handler
            }
            Fault::SharedAsBroadcast | Fault::SharedAsBroadcastAtLeastOnce => {
                spec.shared = false;
                handler
            }
            Fault::IgnoresPrefetch => {
                spec.prefetch = 64;
                handler
            }
            Fault::DropsPrefetchedOnUnregister => {
                Arc::new(Prefetching::new(handler, self.leaving.clone()))
                    as Arc<dyn DeliveryHandler>
            }
            _ => handler,
        };
        self.inner.register_subscription(spec, handler).await
    }
    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        self.leaving.store(true, Ordering::Release);
        self.inner.unregister_subscription(key).await
    }
    async fn register_stream(
        &self,
        address: Address,
        handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        self.inner.register_stream(address, handler).await
    }
    async fn unregister_stream(&self, address: &Address) -> Result<(), BridgeError> {
        self.inner.unregister_stream(address).await
    }
    async fn open_stream(&self, open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        self.inner.open_stream(open).await
    }
    fn in_flight(&self) -> InFlight {
        match self.fault {
            Fault::ReportsNothingInFlight => InFlight::default(),
            _ => self.inner.in_flight(),
        }
    }
    async fn shutdown(&self, deadline: tokio::time::Instant) -> DrainReport {
        self.leaving.store(true, Ordering::Release);
        self.inner.shutdown(deadline).await
    }
}

struct MutantHarness(Fault);

#[async_trait]
impl Harness for MutantHarness {
    fn name(&self) -> &'static str {
        "mutant"
    }
    fn mode(&self) -> TestMode {
        TestMode::InProcess
    }
    fn capabilities(&self) -> Capabilities {
        mutate_caps(DefaultHarness::new().capabilities(), self.0)
    }
    fn queue_capabilities(&self) -> Option<QueueCapabilities> {
        DefaultHarness::new().queue_capabilities()
    }
    fn offers_raw_publisher(&self) -> bool {
        true
    }
    fn broker_control(&self) -> Offer {
        match self.0 {
            Fault::None => Offer::Available,
            _ => Offer::Absent("only the fault-free mutant has (no-op) broker control".into()),
        }
    }
    async fn control(&self) -> Result<Arc<dyn BrokerControl>, String> {
        Ok(Arc::new(NoOpControl(self.0)))
    }
    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        let fault = self.0;
        DefaultHarness::new()
            .deployment(prefix, instances)
            .await
            .map_bridges(|inner| {
                let caps = mutate_caps(inner.capabilities().clone(), fault);
                Arc::new(Mutant {
                    inner,
                    caps,
                    fault,
                    late: Arc::default(),
                    leaving: Arc::default(),
                }) as Arc<dyn EventBridge>
            })
    }
}

/// The case `group::name` of the suite.
fn case(group: &str, name: &str) -> Case {
    purista_conformance::all_cases()
        .into_iter()
        .find(|c| c.group == group && c.name == name)
        .unwrap_or_else(|| panic!("the suite has no case {group}::{name}"))
}

/// Runs case `group::name` against a bridge with `fault`; the case must run its behaviour (not
/// a strict-check proof or a skip) and fail.
async fn catches(fault: Fault, group: &str, name: &str) {
    purista_conformance::logs::install();
    let harness: Arc<dyn Harness> = Arc::new(MutantHarness(fault));
    let case = case(group, name);
    assert_eq!(
        case.plan(&*harness),
        Plan::Run,
        "{group}::{name} would not run its behaviour on the mutant"
    );
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::spawn(run_case(case, harness)),
    )
    .await
    .unwrap_or_else(|_| panic!("the case hung on a bridge that {fault:?}"));
    match outcome {
        Err(e) if e.is_panic() => {}
        other => panic!("the suite did not notice a bridge that {fault:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_unknown_fields_are_caught() {
    catches(
        Fault::DropsUnknownFields,
        "envelope",
        "unknown_fields_survive_a_round_trip",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overclaimed_capability_is_caught() {
    catches(
        Fault::OverclaimsDurable,
        "subscriptions",
        "durable_subscription_keeps_messages_while_no_consumer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_that_ignores_a_filter_field_is_caught() {
    catches(
        Fault::IgnoresTenantFilter,
        "routing",
        "filter_table_routes_like_the_reference_matcher",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_routing_that_ignores_a_filter_field_is_caught() {
    catches(
        Fault::IgnoresTenantFilter,
        "routing",
        "random_filters_route_like_the_reference_matcher",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_delivered_as_broadcast_is_caught() {
    catches(
        Fault::SharedAsBroadcast,
        "subscriptions",
        "shared_delivers_each_message_to_exactly_one_instance",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_in_flight_counts_are_caught() {
    catches(
        Fault::ReportsNothingInFlight,
        "lifecycle",
        "in_flight_counts_running_handlers_by_kind",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_dead_letters_are_caught() {
    catches(
        Fault::CorruptsDeadLetters,
        "outcomes",
        "retry_up_to_max_attempts_then_dead_letter",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_response_dropped_without_a_warning_is_caught() {
    catches(
        Fault::SilentlyDropsLateResponses,
        "commands",
        "late_response_is_ignored",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_response_handed_to_the_next_waiter_is_caught() {
    catches(
        Fault::HandsLateResponsesToTheNextWaiter,
        "commands",
        "late_response_is_ignored",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_messages_dropped_on_unregister_are_caught() {
    catches(
        Fault::DropsPrefetchedOnUnregister,
        "churn",
        "a_consumer_leaving_with_prefetched_messages_loses_none",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_delivered_as_broadcast_under_at_least_once_is_caught() {
    catches(
        Fault::SharedAsBroadcastAtLeastOnce,
        "subscriptions",
        "shared_delivers_each_message_to_exactly_one_instance",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_delivered_as_broadcast_under_load_is_caught() {
    catches(
        Fault::SharedAsBroadcastAtLeastOnce,
        "concurrency",
        "concurrent_publishers_into_many_instances_deliver_the_exact_set",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignored_prefetch_is_caught() {
    catches(
        Fault::IgnoresPrefetch,
        "concurrency",
        "prefetch_bounds_the_handlers_running_at_once",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emits_lost_on_an_immediate_shutdown_are_caught() {
    catches(
        Fault::LosesUnflushedEmits,
        "churn",
        "an_emit_that_returned_is_delivered_after_an_immediate_shutdown",
    )
    .await;
}

/// Runs case `group::name` against the wrapped bridge without fault; it must pass.
async fn dry_run(group: &str, name: &str) {
    purista_conformance::logs::install();
    let harness: Arc<dyn Harness> = Arc::new(MutantHarness(Fault::None));
    let verdict = tokio::time::timeout(
        Duration::from_secs(60),
        run_case(case(group, name), harness),
    )
    .await
    .expect("the dry run finishes");
    assert_eq!(verdict, Verdict::Passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_drop_case_runs_end_to_end() {
    dry_run("reliability", "connection_drop_loses_no_events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_case_runs_end_to_end() {
    dry_run("reliability", "broker_restart_loses_no_events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_faults_case_runs_end_to_end() {
    dry_run("reliability", "two_faults_in_one_run_lose_no_events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_invocation_case_runs_end_to_end() {
    dry_run(
        "reliability",
        "invocations_during_an_outage_fail_or_complete_within_ttl",
    )
    .await;
}
