//! The in-process bridge: every deployment gets a fresh [`MemoryBroker`], so tests are isolated
//! without naming anything under the prefix (the prefix is still used in service names).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_default::{MemoryBridge, MemoryBridgeConfig, MemoryBroker, MemoryQueueBridge};
use purista_core::{Capabilities, EventBridge, QueueBridge, QueueCapabilities};

use crate::harness::{Deployment, Harness, RawPublisher, TestMode};

/// Harness of `purista-bridge-default`.
#[derive(Debug, Default, Clone)]
pub struct DefaultHarness;

impl DefaultHarness {
    /// The harness.
    pub fn new() -> Self {
        DefaultHarness
    }

    fn config() -> MemoryBridgeConfig {
        MemoryBridgeConfig {
            // Cases pass explicit ttls; a short default keeps a forgotten one from stalling.
            default_command_timeout: Duration::from_secs(5),
            // A declared body limit, so that the limits cases run on this bridge too.
            max_payload_bytes: Some(256 * 1024),
            ..MemoryBridgeConfig::default()
        }
    }
}

/// Raw publishing through the hub: decodes like a consumer would, routes without re-stamping.
struct HubPublisher(Arc<MemoryBridge>);

#[async_trait]
impl RawPublisher for HubPublisher {
    async fn publish(&self, bytes: &[u8]) -> Result<(), String> {
        self.0.publish_raw(bytes).await.map_err(|e| e.to_string())
    }
}

#[async_trait]
impl Harness for DefaultHarness {
    fn name(&self) -> &'static str {
        "default"
    }

    fn mode(&self) -> TestMode {
        TestMode::InProcess
    }

    fn capabilities(&self) -> Capabilities {
        MemoryBroker::new()
            .bridge_with(Self::config())
            .capabilities()
            .clone()
    }

    fn queue_capabilities(&self) -> Option<QueueCapabilities> {
        Some(MemoryQueueBridge::new().capabilities().clone())
    }

    fn offers_raw_publisher(&self) -> bool {
        true
    }

    async fn deployment(&self, _prefix: &str, instances: usize) -> Deployment {
        let broker = MemoryBroker::new();
        let bridges: Vec<Arc<MemoryBridge>> = (0..instances)
            .map(|_| Arc::new(broker.bridge_with(Self::config())))
            .collect();
        // A separate instance publishes raw bytes, like a foreign client of the broker.
        let raw = Arc::new(broker.bridge_with(Self::config()));
        raw.start()
            .await
            .expect("the raw publisher's bridge starts");
        Deployment::new(
            bridges
                .into_iter()
                .map(|b| b as Arc<dyn EventBridge>)
                .collect(),
            Some(Arc::new(MemoryQueueBridge::new()) as Arc<dyn QueueBridge>),
            Some(Arc::new(HubPublisher(raw)) as Arc<dyn RawPublisher>),
        )
    }
}
