//! Bridges on the sidecar double, and a recording subscription handler.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_bridge_dapr::double::{DaprDouble, DoubleOptions, Sidecar, SidecarOptions};
use purista_bridge_dapr::{DaprBridge, DaprConfig};
use purista_core::{
    Address, Delivery, DeliveryHandler, EventBridge, FailurePolicy, RegistrationKey, Settlement,
    SubscriptionFilter, SubscriptionSpec,
};

/// A bridge with its own sidecar on `double`, started.
pub async fn bridge(double: &DaprDouble, app_id: &str, prefix: &str) -> (Arc<DaprBridge>, Sidecar) {
    bridge_with(double, app_id, prefix, |_, _| {}).await
}

/// Like [`bridge`], with the sidecar options and config edited first.
pub async fn bridge_with(
    double: &DaprDouble,
    app_id: &str,
    prefix: &str,
    edit: impl FnOnce(&mut SidecarOptions, &mut DaprConfig),
) -> (Arc<DaprBridge>, Sidecar) {
    let mut options = SidecarOptions {
        app_id: app_id.into(),
        ..SidecarOptions::default()
    };
    let mut config = DaprConfig::new("http://127.0.0.1:1", app_id).with_prefix(prefix);
    config.app_port = 0;
    config.connect_timeout = Duration::from_secs(10);
    edit(&mut options, &mut config);
    let sidecar = double.sidecar(options).expect("a sidecar starts");
    config.sidecar = sidecar.address();
    let bridge = Arc::new(DaprBridge::new(config).expect("the bridge takes its config"));
    sidecar.connect_app(bridge.app_port());
    bridge.start().await.expect("the bridge starts");
    (bridge, sidecar)
}

/// A double with default options.
pub fn double() -> DaprDouble {
    DaprDouble::start(DoubleOptions::default()).expect("the double starts")
}

/// Records every delivery's payload `n` and acks it.
#[derive(Default)]
pub struct Recorder {
    pub seen: Mutex<Vec<u64>>,
}

#[async_trait]
impl DeliveryHandler for Recorder {
    async fn deliver(&self, delivery: Delivery) {
        let n = delivery.envelope.payload["n"].as_u64().unwrap_or(u64::MAX);
        self.seen.lock().push(n);
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

impl Recorder {
    /// Waits until `count` deliveries were recorded, at most `within`.
    pub async fn wait_for(&self, count: usize, within: Duration) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let seen = self.seen.lock().clone();
            if seen.len() >= count || tokio::time::Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A subscription on `event` named `name` of service `svc`.
pub fn spec(svc: &str, name: &str, event: &str, shared: bool) -> SubscriptionSpec {
    let mut filter = SubscriptionFilter::new();
    filter.event_name = Some(event.into());
    SubscriptionSpec {
        key: RegistrationKey::new(svc, "1", name),
        subscriber: Address::new(svc, "1", name),
        filter,
        shared,
        durable: false,
        policy: FailurePolicy::default(),
        prefetch: 16,
    }
}

/// Subscribes `recorder` on `bridge`.
pub async fn subscribe(bridge: &DaprBridge, spec: SubscriptionSpec, recorder: Arc<Recorder>) {
    bridge
        .register_subscription(spec, recorder)
        .await
        .expect("the subscription registers");
}
