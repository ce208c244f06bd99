//! The Dapr bridge (`purista-bridge-dapr`).
//!
//! * **Sidecars**: the in-repo sidecar double (`purista_bridge_dapr::double`), one per test
//!   process, started on first use; each bridge instance gets a sidecar of its own with its
//!   own app id (`<prefix>-<i>`), like one daprd per app instance. A real `daprd` serves one
//!   app: the suite's deployments need several, so with `DAPR_HTTP_ENDPOINT` set the harness
//!   says so and its cases are skipped (the bridge's own tests cover a single sidecar).
//! * **Deployments**: N bridge instances under the case's prefix (topic `<prefix>.messages`,
//!   state keys under the prefix), each app server on a free loopback port.
//! * **Raw publisher**: publishes through the sidecar API of one more sidecar (no app), as a
//!   structured CloudEvent whose `data` is the given bytes (a JSON envelope as JSON, anything
//!   else as a string), on the deployment's topic.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_dapr::double::{DaprDouble, DoubleOptions, Sidecar, SidecarOptions};
use purista_bridge_dapr::{DaprBridge, DaprConfig};
use purista_core::{Capabilities, Envelope, EventBridge, QueueCapabilities};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::harness::{Deployment, Harness, RawPublisher, TestMode, Workload};

/// Environment variable naming a real sidecar (`http://host:port`).
pub const ENDPOINT_ENV: &str = "DAPR_HTTP_ENDPOINT";

/// The share of the load cases' full size run on the sidecar double, in percent.
pub const DOUBLE_WORKLOAD_PERCENT: u32 = 25;

/// Deliveries each sidecar has in flight to its app at once, like a pub/sub component's
/// `concurrency` (Redis Streams: 10 by default). The bridge answers a delivery once its
/// handlers settled it (at least once): with one delivery at a time, a subscription holding a
/// message would hold every other subscription of the app.
pub const DELIVERY_CONCURRENCY: usize = 10;

/// Harness of `purista-bridge-dapr`.
#[derive(Debug, Default, Clone)]
pub struct DaprHarness;

impl DaprHarness {
    /// The harness.
    pub fn new() -> Self {
        DaprHarness
    }

    fn config(sidecar: &str, app_id: &str, prefix: &str) -> DaprConfig {
        let mut config = DaprConfig::new(sidecar, app_id).with_prefix(prefix);
        config.app_port = 0;
        // Cases pass explicit ttls; a short default keeps a forgotten one from stalling.
        config.default_command_timeout = Duration::from_secs(5);
        config.connect_timeout = Duration::from_secs(10);
        // Each instance is its own consumer group: its app id.
        config.consumer = Some(app_id.to_string());
        config
    }

    async fn double() -> &'static DaprDouble {
        static DOUBLE: OnceCell<DaprDouble> = OnceCell::const_new();
        DOUBLE
            .get_or_init(|| async {
                DaprDouble::start(DoubleOptions::default()).expect("the Dapr sidecar double starts")
            })
            .await
    }
}

fn real_endpoint() -> Option<String> {
    std::env::var(ENDPOINT_ENV)
        .ok()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
}

/// Publishes through a sidecar of its own.
struct SidecarPublisher {
    client: purista_bridge_dapr::sidecar::Sidecar,
    topic: String,
}

impl SidecarPublisher {
    async fn send(&self, data: Value) -> Result<(), String> {
        let event = json!({
            "specversion": "1.0",
            "id": purista_core::ids::new_id(),
            "source": "raw",
            "type": "io.purista.message",
            "datacontenttype": "application/json",
            "data": data,
        });
        let bytes = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
        self.client
            .publish("pubsub", &self.topic, bytes, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl RawPublisher for SidecarPublisher {
    async fn publish(&self, bytes: &[u8]) -> Result<(), String> {
        let data: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        self.send(data).await
    }

    async fn publish_undecodable(&self, bytes: &[u8], _route_as: &Envelope) -> Result<(), String> {
        self.send(Value::String(String::from_utf8_lossy(bytes).into_owned()))
            .await
    }
}

fn app_id(prefix: &str, i: &str) -> String {
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{clean}-{i}")
}

#[async_trait]
impl Harness for DaprHarness {
    fn name(&self) -> &'static str {
        "dapr"
    }

    fn mode(&self) -> TestMode {
        TestMode::ProtocolDouble
    }

    /// A quarter of the full size. Every event of a shared subscription costs each instance
    /// one HTTP delivery from its sidecar and one claim in the state store, all of it in this
    /// process (the double, five sidecars, five app servers) in a debug build: 4 000 events
    /// into 5 instances are 40 000 HTTP exchanges on the test's own cores. With the machine
    /// busy (CI building beside it, load 5) only 2 571 of 4 000 events had arrived after 60 s,
    /// at the start of this change as after it.
    fn workload(&self) -> Workload {
        Workload::scaled(
            DOUBLE_WORKLOAD_PERCENT,
            "every event costs each instance a delivery and a claim over HTTP, all in the test's process",
        )
    }

    fn capabilities(&self) -> Capabilities {
        purista_bridge_dapr::capabilities(&DaprHarness::config(
            "http://127.0.0.1:3500",
            "caps",
            "caps",
        ))
    }

    fn queue_capabilities(&self) -> Option<QueueCapabilities> {
        None
    }

    fn offers_raw_publisher(&self) -> bool {
        true
    }

    fn availability(&self) -> Result<(), String> {
        match real_endpoint() {
            Some(_) => Err(format!(
                "{ENDPOINT_ENV} names one real sidecar, which serves one app; the suite's deployments need a sidecar per bridge instance"
            )),
            None => Ok(()),
        }
    }

    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        let double = DaprHarness::double().await;
        let mut sidecars: Vec<Sidecar> = Vec::new();
        let mut bridges: Vec<Arc<dyn EventBridge>> = Vec::new();
        for i in 0..instances {
            let id = app_id(prefix, &i.to_string());
            let sidecar = double
                .sidecar(SidecarOptions {
                    app_id: id.clone(),
                    concurrency: DELIVERY_CONCURRENCY,
                    ..SidecarOptions::default()
                })
                .expect("a double sidecar starts");
            let bridge = DaprBridge::new(DaprHarness::config(&sidecar.address(), &id, prefix))
                .unwrap_or_else(|e| panic!("the dapr bridge refused its test config: {e}"));
            sidecar.connect_app(bridge.app_port());
            bridges.push(Arc::new(bridge));
            sidecars.push(sidecar);
        }
        let raw_sidecar = double
            .sidecar(SidecarOptions {
                app_id: app_id(prefix, "raw"),
                ..SidecarOptions::default()
            })
            .expect("a double sidecar starts");
        let client = purista_bridge_dapr::sidecar::Sidecar::new(&raw_sidecar.address(), None)
            .expect("an HTTP client");
        sidecars.push(raw_sidecar);
        let raw = SidecarPublisher {
            client,
            topic: format!("{prefix}.messages"),
        };
        Deployment::new(bridges, None, Some(Arc::new(raw) as Arc<dyn RawPublisher>)).on_cleanup(
            move || {
                Box::pin(async move {
                    drop(sidecars);
                })
            },
        )
    }
}
