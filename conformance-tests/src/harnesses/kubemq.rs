//! The KubeMQ bridge (`purista-bridge-kubemq`).
//!
//! * **Broker**: a real KubeMQ when `KUBEMQ_ADDRESS` (`host:port`) is set — with
//!   `KUBEMQ_AUTH_TOKEN` if it needs one — else the in-repo protocol double
//!   (`purista_bridge_kubemq::double`), one per test process, started on first use. The
//!   matrix says which was used.
//! * **Deployments**: N bridge instances under the case's prefix (every channel starts with
//!   it, so cases on one broker never meet), started. Nothing to clean up on the broker:
//!   Events leave nothing behind, and dead-letter queues are named under the prefix.
//! * **Raw publisher**: publishes bytes as an Events event on the channel the bridge would
//!   use, through the KubeMQ SDK client of a bridge instance of its own.
//! * **Queue bridge**: the KubeMQ queue bridge on that same extra instance's connection.
//! * **Faults** (double only): each case that breaks the broker gets a private double; a
//!   restart stops it (every connection cut), keeps it down for a second, as a broker's
//!   restart takes a while, and serves again with its store kept.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_kubemq::double::{DoubleOptions, KubemqDouble};
use purista_bridge_kubemq::kubemq::Event;
use purista_bridge_kubemq::{KubemqBridge, KubemqConfig};
use purista_core::{Capabilities, Envelope, EventBridge, QueueBridge, QueueCapabilities};
use tokio::sync::OnceCell;

use crate::harness::{BrokerControl, Deployment, Harness, Offer, RawPublisher, TestMode, Workload};

/// Environment variable naming a real KubeMQ (`host:port`).
pub const ADDRESS_ENV: &str = "KUBEMQ_ADDRESS";
/// Environment variable with the real KubeMQ's auth token.
pub const TOKEN_ENV: &str = "KUBEMQ_AUTH_TOKEN";

/// Harness of `purista-bridge-kubemq`.
#[derive(Debug, Default, Clone)]
pub struct KubemqHarness;

fn real_address() -> Option<String> {
    std::env::var(ADDRESS_ENV)
        .ok()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
}

impl KubemqHarness {
    /// The harness.
    pub fn new() -> Self {
        KubemqHarness
    }

    fn config(address: &str, prefix: &str, token: Option<String>) -> KubemqConfig {
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
            .unwrap_or_else(|| (address.to_string(), 50000));
        let mut config = KubemqConfig::new(host, port).with_prefix(prefix);
        config.auth_token = token;
        // Cases pass explicit ttls; a short default keeps a forgotten one from stalling.
        config.default_command_timeout = Duration::from_secs(5);
        config.connect_timeout = Duration::from_secs(5);
        config
    }

    /// The shared broker of this process: a real KubeMQ, or the double.
    async fn broker() -> (String, Option<String>) {
        if let Some(address) = real_address() {
            return (
                address,
                std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
            );
        }
        static DOUBLE: OnceCell<KubemqDouble> = OnceCell::const_new();
        let double = DOUBLE
            .get_or_init(|| async {
                KubemqDouble::start(DoubleOptions::default())
                    .expect("the KubeMQ double starts on a free port")
            })
            .await;
        (double.address(), None)
    }
}

/// Raw publishing through a bridge instance's SDK client.
struct SdkPublisher(Arc<KubemqBridge>);

impl SdkPublisher {
    async fn send(&self, channel: String, bytes: &[u8]) -> Result<(), String> {
        let event = Event::builder()
            .channel(channel)
            .body(bytes.to_vec())
            .build();
        self.0
            .client()
            .send_event(event)
            .await
            .map_err(|e| e.to_string())
    }
}

#[async_trait]
impl RawPublisher for SdkPublisher {
    async fn publish(&self, bytes: &[u8]) -> Result<(), String> {
        let envelope = Envelope::decode(bytes).map_err(|e| e.to_string())?;
        self.send(self.0.channels().event(&envelope), bytes).await
    }

    async fn publish_undecodable(&self, bytes: &[u8], route_as: &Envelope) -> Result<(), String> {
        self.send(self.0.channels().event(route_as), bytes).await
    }
}

async fn deploy<H: Send + Sync + 'static>(
    address: &str,
    token: Option<String>,
    prefix: &str,
    instances: usize,
    hold: H,
) -> Deployment {
    let mut bridges = Vec::new();
    for _ in 0..instances + 1 {
        let bridge = KubemqBridge::new(KubemqHarness::config(address, prefix, token.clone()))
            .await
            .unwrap_or_else(|e| panic!("the kubemq bridge refused its test config: {e}"));
        bridges.push(Arc::new(bridge));
    }
    let raw = bridges.pop().expect("one bridge for raw publishing");
    let started = futures::future::try_join_all(bridges.iter().map(|b| b.start())).await;
    // The queue half rides on the raw publisher's connection, like a separate process.
    let queues: Arc<dyn QueueBridge> = Arc::new(raw.queue_bridge());
    let raw_bridge = raw.clone();
    let deployment = Deployment::new(
        bridges
            .into_iter()
            .map(|b| b as Arc<dyn EventBridge>)
            .collect(),
        Some(queues),
        Some(Arc::new(SdkPublisher(raw)) as Arc<dyn RawPublisher>),
    )
    .on_cleanup(move || {
        Box::pin(async move {
            raw_bridge
                .shutdown(tokio::time::Instant::now() + Duration::from_secs(1))
                .await;
            drop(hold);
        })
    });
    if let Err(e) = started {
        panic!("a kubemq bridge did not connect to {address}: {e}");
    }
    deployment
}

#[async_trait]
impl Harness for KubemqHarness {
    fn name(&self) -> &'static str {
        "kubemq"
    }

    fn mode(&self) -> TestMode {
        if real_address().is_some() {
            TestMode::RealBroker
        } else {
            TestMode::ProtocolDouble
        }
    }

    fn capabilities(&self) -> Capabilities {
        purista_bridge_kubemq::capabilities(&KubemqHarness::config("localhost:50000", "caps", None))
    }

    fn queue_capabilities(&self) -> Option<QueueCapabilities> {
        Some(purista_bridge_kubemq::queue_capabilities())
    }

    fn offers_raw_publisher(&self) -> bool {
        true
    }

    /// The private doubles the fault cases break serve queue jobs at some 150 a second in a
    /// debug build (leases and settlements each a round trip through the double), so the
    /// queue's fault case would spend half a minute on its 2 000 jobs; the faults, not the
    /// volume, are under test.
    fn fault_workload(&self) -> Workload {
        Workload::scaled(
            FAULT_WORKLOAD_PERCENT,
            "the private double works some 150 queue jobs a second in a debug build, and the faults, not the volume, are under test",
        )
    }

    fn broker_control(&self) -> Offer {
        if real_address().is_some() {
            Offer::Absent(
                "a real KubeMQ given by KUBEMQ_ADDRESS is not restarted from the tests".into(),
            )
        } else {
            Offer::Available
        }
    }

    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        let (address, token) = KubemqHarness::broker().await;
        deploy(&address, token, prefix, instances, ()).await
    }

    async fn control(&self) -> Result<Arc<dyn BrokerControl>, String> {
        if real_address().is_some() {
            return Err("a real KubeMQ is not restarted from the tests".into());
        }
        let double = KubemqDouble::start(DoubleOptions::default())
            .map_err(|e| format!("a private KubeMQ double did not start: {e}"))?;
        Ok(Arc::new(PrivateDouble(Arc::new(double))))
    }
}

/// The share of their full size the fault cases run at ([`Harness::fault_workload`]).
pub const FAULT_WORKLOAD_PERCENT: u32 = 25;

/// How long a restart keeps the private double down.
const RESTART_DOWNTIME: Duration = Duration::from_secs(1);

/// A double of one case's own, to break.
struct PrivateDouble(Arc<KubemqDouble>);

#[async_trait]
impl BrokerControl for PrivateDouble {
    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        deploy(&self.0.address(), None, prefix, instances, self.0.clone()).await
    }

    async fn drop_connections(&self, _prefix: &str) {
        // The double is this case's alone: cutting every connection cuts only the case's.
        self.restart().await;
    }

    async fn restart(&self) {
        let double = self.0.clone();
        tokio::task::spawn_blocking(move || {
            double.stop();
            // A broker's restart takes it away for a while; the double's own restart takes
            // microseconds, too short for a probe (health) to see the broker gone.
            std::thread::sleep(RESTART_DOWNTIME);
            double.start_again()
        })
        .await
        .expect("restarting the double does not panic")
        .unwrap_or_else(|e| panic!("the KubeMQ double did not serve again: {e}"));
    }
}
