//! What non-strict mode does to a subscription whose need the bridge lacks (DESIGN §3.7):
//! each [`Need`] documents its degradation, and this file checks the ones that change how a
//! delivery is settled. The bridge is a fake that hands its deliveries to the test. The fake
//! also counts how many unregistrations run at once, for the check that a shutdown unregisters
//! concurrently, with a bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_core::capabilities::{Capabilities, FilterSupport, Need};
use purista_core::service::{Service, SubscriptionDef};
use purista_core::{
    Address, BridgeError, BridgeHealth, CommandHandler, Delivery, DeliveryHandler, DrainReport,
    Envelope, EventBridge, InFlight, Outcome, PausedConsumer, RegistrationKey, SenderAddress,
    SettleOnce, Settlement, Settler, StreamConsumerEnd, StreamHandler, SubscriptionContext,
    SubscriptionOperator, SubscriptionSpec,
};
use serde_json::{Value, json};

/// A bridge with every subscription capability except manual ack; it keeps the delivery
/// handlers so the test can deliver by hand.
struct NoManualAck {
    caps: Capabilities,
    handlers: Mutex<Vec<(String, Arc<dyn DeliveryHandler>)>>,
    /// Subscription unregistrations running now, the most that ran at once, and all done.
    unregistering: AtomicUsize,
    most_unregistering: AtomicUsize,
    unregistered: AtomicUsize,
}

impl NoManualAck {
    fn new() -> Arc<NoManualAck> {
        let mut caps = Capabilities::none("fake");
        caps.filters = FilterSupport::Complex;
        caps.shared_subscriptions = true;
        caps.broadcast_subscriptions = true;
        caps.bounded_retry = true;
        Arc::new(NoManualAck {
            caps,
            handlers: Mutex::new(Vec::new()),
            unregistering: AtomicUsize::new(0),
            most_unregistering: AtomicUsize::new(0),
            unregistered: AtomicUsize::new(0),
        })
    }

    fn handler(&self, key_suffix: &str) -> Arc<dyn DeliveryHandler> {
        self.handlers
            .lock()
            .iter()
            .find(|(k, _)| k.ends_with(key_suffix))
            .map(|(_, h)| h.clone())
            .expect("registered")
    }
}

#[async_trait]
impl SubscriptionOperator for NoManualAck {
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
impl EventBridge for NoManualAck {
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
        Err(BridgeError::Unsupported("commands".into()))
    }
    async fn unregister_command(&self, _address: &Address) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        self.handlers.lock().push((spec.key.to_string(), handler));
        Ok(())
    }
    async fn unregister_subscription(&self, _key: &RegistrationKey) -> Result<(), BridgeError> {
        let now = self.unregistering.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_unregistering.fetch_max(now, Ordering::SeqCst);
        // A broker round trip.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.unregistering.fetch_sub(1, Ordering::SeqCst);
        self.unregistered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn register_stream(
        &self,
        _address: Address,
        _handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        Err(BridgeError::Unsupported("streams".into()))
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

/// What happened, in order: `handler` when the handler ran, `settled <settlement>` per
/// settlement.
type Log = Arc<Mutex<Vec<String>>>;

struct Recorder(Log);

#[async_trait]
impl Settler for Recorder {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), BridgeError> {
        self.0.lock().push(format!("settled {settlement:?}"));
        Ok(())
    }
}

/// A subscription to `orderPaid` that logs when it runs and then asks for a retry.
fn retrying(log: Log) -> SubscriptionDef {
    SubscriptionDef::new("onPaid", move |_ctx: SubscriptionContext, _v: Value| {
        let log = log.clone();
        async move {
            log.lock().push("handler".into());
            Ok(Outcome::retry())
        }
    })
    .event_name("orderPaid")
    .max_attempts(3)
}

async fn deliver(handler: &Arc<dyn DeliveryHandler>, log: &Log) {
    let mut event = Envelope::custom(SenderAddress::default(), "orderPaid", json!({}));
    event.id = "m-1".into();
    handler
        .deliver(Delivery {
            envelope: Arc::new(event),
            attempt: 1,
            settle: SettleOnce::new("m-1", Box::new(Recorder(log.clone()))),
        })
        .await;
}

#[tokio::test]
async fn without_manual_ack_a_delivery_is_acked_on_arrival_before_the_handler_runs() {
    let bridge = NoManualAck::new();
    let log: Log = Arc::default();
    let running = Service::builder("billing", "1")
        .strict(false)
        .subscription(retrying(log.clone()).require(Need::ManualAck))
        .build()
        .start(bridge.clone())
        .await
        .expect("non-strict start degrades");
    assert_eq!(running.degradations().len(), 1);

    deliver(&bridge.handler("onPaid"), &log).await;
    assert_eq!(
        *log.lock(),
        vec!["settled Ack".to_string(), "handler".to_string()],
        "acked on arrival; the handler's retry is not applied"
    );
}

#[tokio::test]
async fn with_manual_ack_not_asked_for_the_outcome_settles_after_the_handler() {
    let bridge = NoManualAck::new();
    let log: Log = Arc::default();
    let _running = Service::builder("billing", "1")
        .strict(false)
        .subscription(retrying(log.clone()))
        .build()
        .start(bridge.clone())
        .await
        .expect("start");

    deliver(&bridge.handler("onPaid"), &log).await;
    let log = log.lock().clone();
    assert_eq!(log[0], "handler");
    assert!(log[1].starts_with("settled Redeliver"), "{log:?}");
}

#[tokio::test]
async fn shutdown_unregisters_many_subscriptions_at_once_but_at_most_eight() {
    let bridge = NoManualAck::new();
    let log: Log = Arc::default();
    let mut service = Service::builder("billing", "1");
    for i in 0..20 {
        let log = log.clone();
        service = service.subscription(
            SubscriptionDef::new(
                format!("on{i}"),
                move |_ctx: SubscriptionContext, _v: Value| {
                    let log = log.clone();
                    async move {
                        log.lock().push("handler".into());
                        Ok(Outcome::Ack)
                    }
                },
            )
            .event_name("orderPaid"),
        );
    }
    let running = service.build().start(bridge.clone()).await.expect("start");
    running
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(
        bridge.unregistered.load(Ordering::SeqCst),
        20,
        "every subscription is unregistered"
    );
    let most = bridge.most_unregistering.load(Ordering::SeqCst);
    assert!(
        (2..=8).contains(&most),
        "unregistrations ran {most} at once; expected several, at most 8"
    );
}
