//! The RabbitMQ bridge (`purista-bridge-amqp`) against a real broker.
//!
//! * **Broker**: `PURISTA_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`. When it
//!   cannot be reached every case is skipped loudly (failed under `PURISTA_REQUIRE_BROKERS=1`);
//!   with the `testcontainers` feature, no URL given and nothing on 5672, a RabbitMQ container
//!   is started instead (one per test process). Whether the broker answers is probed when the
//!   tests are listed (a TCP connect), so that its cases are listed as skipped, not passed.
//! * **Deployments**: N bridge instances under the case's unique prefix (which is also the
//!   exchange name), started; cleanup deletes every queue they declared and the exchange. The
//!   raw publisher publishes into that exchange on a connection of its own.
//! * **Faults**: a restart cannot be done on the broker every other test shares, so the
//!   reliability cases run on a private node of this test process (`private_node.rs`);
//!   dropping connections closes only the deployment's own (named `purista <prefix> <instance>`
//!   by the bridge).
//! * No queue bridge: AMQP has none, so the queue cases are not applicable.

#[cfg(unix)]
pub mod private_node;
mod raw;

use std::collections::BTreeSet;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_amqp::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use purista_bridge_amqp::lapin::{Connection, ConnectionProperties};
use purista_bridge_amqp::{AmqpBridge, AmqpConfig, TopologyMode, redact_url};
use purista_core::{Capabilities, EventBridge, QueueCapabilities};
use tokio::sync::OnceCell;

use crate::harness::{BrokerControl, Deployment, Harness, Offer, RawPublisher, TestMode};

use raw::AmqpRawPublisher;

/// Environment variable holding the broker URL the suite runs against.
pub const URL_ENV: &str = "PURISTA_AMQP_URL";
/// The broker on the project's machines (DESIGN §5).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long cleanup may take before it gives up (a broker that went away).
const CLEANUP_DEADLINE: Duration = Duration::from_secs(15);

/// Harness of `purista-bridge-amqp`. Cheap to make: the broker is resolved once per process, on
/// first use.
#[derive(Debug, Default, Clone)]
pub struct AmqpHarness {
    topology: TopologyMode,
}

impl AmqpHarness {
    /// The harness, bridges in their native topology.
    pub fn new() -> Self {
        AmqpHarness::default()
    }

    /// The harness, bridges in the PURISTA topology mode ([`TopologyMode::Purista`]): queues
    /// declared as PURISTA's TypeScript AMQP bridge declares them.
    pub fn purista() -> Self {
        AmqpHarness {
            topology: TopologyMode::Purista,
        }
    }

    /// Whether the matrix can list this harness: `Err(why)` when no broker is configured and
    /// none answers on the default address (and no container can be started).
    pub fn probe() -> Result<(), String> {
        let url = configured_url().unwrap_or_else(|| DEFAULT_URL.to_string());
        if tcp_reachable(&url) || cfg!(feature = "testcontainers") {
            Ok(())
        } else {
            Err(unreachable(&url))
        }
    }

    /// The broker URL of this process, resolved once: `Err` says why there is none.
    async fn url() -> Result<String, String> {
        static BROKER: OnceCell<Result<String, String>> = OnceCell::const_new();
        BROKER.get_or_init(resolve_broker).await.clone()
    }

    /// A bridge config under `prefix` with timings fit for tests: a forgotten ttl does not
    /// stall a case, reconnects are quick, and queues a failed run leaves behind expire.
    fn config(url: &str, prefix: &str, topology: TopologyMode) -> AmqpConfig {
        let mut config = AmqpConfig::new(url)
            .with_prefix(prefix)
            .with_topology(topology);
        config.default_command_timeout = Duration::from_secs(5);
        config.reconnect_initial_delay = Duration::from_millis(50);
        config.reconnect_max_delay = Duration::from_millis(500);
        config.idle_queue_expiry = Duration::from_secs(5 * 60);
        config
    }
}

fn configured_url() -> Option<String> {
    std::env::var(URL_ENV)
        .ok()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
}

fn unreachable(url: &str) -> String {
    format!(
        "RabbitMQ is not reachable at {} (the address comes from {URL_ENV})",
        redact_url(url)
    )
}

/// `host:port` of an amqp URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_string()
    } else {
        let port = if url.starts_with("amqps") { 5671 } else { 5672 };
        format!("{host}:{port}")
    }
}

fn tcp_reachable(url: &str) -> bool {
    host_port(url)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

async fn resolve_broker() -> Result<String, String> {
    let configured = configured_url();
    let url = configured
        .clone()
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let probe = url.clone();
    let reachable = tokio::task::spawn_blocking(move || tcp_reachable(&probe))
        .await
        .unwrap_or(false);
    if reachable {
        return Ok(url);
    }
    #[cfg(feature = "testcontainers")]
    if configured.is_none() {
        return container_broker().await;
    }
    Err(unreachable(&url))
}

/// RabbitMQ in a container, kept for the rest of the process.
#[cfg(feature = "testcontainers")]
async fn container_broker() -> Result<String, String> {
    static CONTAINER: std::sync::OnceLock<crate::containers::RabbitMqContainer> =
        std::sync::OnceLock::new();
    match crate::containers::rabbitmq().await {
        Ok(container) => {
            let url = container.url.clone();
            let _ = CONTAINER.set(container);
            Ok(url)
        }
        Err(e) => Err(format!(
            "RabbitMQ is not reachable at {} and no container could be started: {e}",
            redact_url(DEFAULT_URL)
        )),
    }
}

/// `instances` started bridges on `url` under `prefix`, a raw publisher, and a cleanup that
/// removes every queue they declared and the exchange. `hold` is released after the cleanup.
async fn deploy<H: Send + Sync + 'static>(
    url: &str,
    prefix: &str,
    instances: usize,
    topology: TopologyMode,
    hold: H,
) -> Deployment {
    let bridges: Vec<Arc<AmqpBridge>> = (0..instances)
        .map(|_| {
            Arc::new(
                AmqpBridge::new(AmqpHarness::config(url, prefix, topology))
                    .unwrap_or_else(|e| panic!("the amqp bridge refused its test config: {e}")),
            )
        })
        .collect();
    let exchange = bridges
        .first()
        .map(|b| b.topology().exchange().to_string())
        .unwrap_or_else(|| prefix.to_string());
    let raw = Arc::new(AmqpRawPublisher::new(url, &exchange, prefix));
    let cleanup = {
        let (bridges, raw, url) = (bridges.clone(), raw.clone(), url.to_string());
        move || {
            Box::pin(async move {
                let queues: BTreeSet<String> =
                    bridges.iter().flat_map(|b| b.declared_queues()).collect();
                let removed = tokio::time::timeout(CLEANUP_DEADLINE, async {
                    raw.close().await;
                    remove(&url, &queues, &exchange).await;
                })
                .await;
                if removed.is_err() {
                    tracing::debug!(%exchange, "cleanup of broker resources timed out");
                }
                drop(hold);
            }) as futures::future::BoxFuture<'static, ()>
        }
    };
    let started = futures::future::try_join_all(bridges.iter().map(|b| b.start())).await;
    let mut deployment = Deployment::new(
        bridges
            .into_iter()
            .map(|b| b as Arc<dyn EventBridge>)
            .collect(),
        None,
        Some(raw as Arc<dyn RawPublisher>),
    )
    .on_cleanup(cleanup);
    if let Err(e) = started {
        // What the instances that did connect declared goes before the case fails.
        deployment.cleanup().await;
        panic!("an amqp bridge did not connect to {}: {e}", redact_url(url));
    }
    deployment
}

/// Deletes `queues` and `exchange`, best effort, on a connection of its own.
async fn remove(url: &str, queues: &BTreeSet<String>, exchange: &str) {
    let properties = ConnectionProperties::default().with_connection_name("purista-cleanup".into());
    let Ok(connection) = Connection::connect(url, properties).await else {
        return;
    };
    let mut channel = connection.create_channel().await.ok();
    for queue in queues {
        // A failed delete closes the channel: the next one gets a fresh channel.
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = connection.create_channel().await.ok();
        }
        if let Some(c) = &channel {
            let _ = c
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    if let Ok(c) = connection.create_channel().await {
        let _ = c
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "OK".into()).await;
}

#[async_trait]
impl Harness for AmqpHarness {
    fn name(&self) -> &'static str {
        match self.topology {
            TopologyMode::Native => "amqp",
            TopologyMode::Purista => "amqp-purista",
        }
    }

    fn mode(&self) -> TestMode {
        TestMode::RealBroker
    }

    fn capabilities(&self) -> Capabilities {
        AmqpBridge::new(AmqpHarness::config(
            DEFAULT_URL,
            "capabilities",
            self.topology,
        ))
        .expect("the test config is valid")
        .capabilities()
        .clone()
    }

    fn queue_capabilities(&self) -> Option<QueueCapabilities> {
        None
    }

    fn offers_raw_publisher(&self) -> bool {
        true
    }

    fn availability(&self) -> Result<(), String> {
        AmqpHarness::probe()
    }

    fn broker_control(&self) -> Offer {
        #[cfg(unix)]
        {
            match private_node::PrivateNode::installed() {
                Ok(()) => Offer::Available,
                Err(why) => Offer::Unreachable(why),
            }
        }
        #[cfg(not(unix))]
        Offer::Absent("private RabbitMQ nodes are started on unix hosts only".into())
    }

    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        let url = AmqpHarness::url()
            .await
            .unwrap_or_else(|why| panic!("no broker for the amqp harness: {why}"));
        deploy(&url, prefix, instances, self.topology, ()).await
    }

    async fn control(&self) -> Result<Arc<dyn BrokerControl>, String> {
        #[cfg(unix)]
        {
            private_node_control(self.topology).await
        }
        #[cfg(not(unix))]
        Err("private RabbitMQ nodes are started on unix hosts only".into())
    }
}

/// The private node of this process, started on first use.
#[cfg(unix)]
async fn private_node_control(topology: TopologyMode) -> Result<Arc<dyn BrokerControl>, String> {
    use private_node::PrivateNode;
    static NODE: OnceCell<Result<Arc<PrivateNode>, String>> = OnceCell::const_new();
    static ONE_AT_A_TIME: std::sync::OnceLock<Arc<tokio::sync::Mutex<()>>> =
        std::sync::OnceLock::new();
    let node = NODE
        .get_or_init(|| async {
            tokio::task::spawn_blocking(PrivateNode::start)
                .await
                .unwrap_or_else(|e| Err(format!("starting the private node panicked: {e}")))
        })
        .await
        .clone()?;
    Ok(Arc::new(PrivateNodeControl {
        node,
        topology,
        one_at_a_time: ONE_AT_A_TIME.get_or_init(Default::default).clone(),
    }))
}

/// Breaks the private node: closes one deployment's connections, or restarts the node.
///
/// Fault cases on one node take turns (a deployment holds the turn until its cleanup): a
/// restart must not strike a case that did not ask for it. Under nextest every test is a
/// process with a node of its own, so they still run in parallel there.
#[cfg(unix)]
struct PrivateNodeControl {
    node: Arc<private_node::PrivateNode>,
    topology: TopologyMode,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

#[cfg(unix)]
#[async_trait]
impl BrokerControl for PrivateNodeControl {
    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        let turn = self.one_at_a_time.clone().lock_owned().await;
        deploy(&self.node.url(), prefix, instances, self.topology, turn).await
    }

    async fn drop_connections(&self, prefix: &str) {
        let node = self.node.clone();
        // The bridge names its connections `purista <prefix> <instance id>`.
        let name_part = format!("purista {prefix} ");
        let closed = tokio::task::spawn_blocking(move || {
            node.close_connections(&name_part, "conformance: connection dropped on purpose")
        })
        .await
        .expect("closing connections does not panic");
        match closed {
            Ok(0) => panic!("no connection of deployment {prefix} was open to drop"),
            Ok(_) => {}
            Err(e) => panic!("dropping the connections of {prefix} failed: {e}"),
        }
    }

    async fn restart(&self) {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || node.restart())
            .await
            .expect("restarting does not panic")
            .unwrap_or_else(|e| panic!("restarting the private RabbitMQ node failed: {e}"));
    }
}
