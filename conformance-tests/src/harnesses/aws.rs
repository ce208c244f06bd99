//! The AWS bridge (`purista-bridge-aws`) against moto, the AWS emulator that speaks the real
//! EventBridge and SQS APIs (DESIGN §5), or against real AWS.
//!
//! * **Broker**: `PURISTA_AWS_ENDPOINT` (`http://127.0.0.1:PORT`, set by `scripts/test`, which
//!   starts moto); with `PURISTA_AWS_LIVE=1` and no endpoint, real AWS through the usual
//!   credential chain and `AWS_REGION`. Without either, every case is skipped loudly (failed
//!   under `PURISTA_REQUIRE_BROKERS=1`).
//! * **Deployments**: N bridge instances under the case's prefix (bus, queues and rules all
//!   named with it), started; cleanup removes every rule on the case's bus, the bus, and every
//!   queue under the prefix.
//! * **Raw publisher**: `PutEvents` of the bytes as the `detail` on the case's bus (routed by
//!   the rules like anything a bridge puts there); bytes that are no JSON cannot be an
//!   EventBridge event, so they are sent with `SendMessage` straight into every subscription
//!   queue of the case, as poison would arrive there.
//! * **Queue bridge**: the SQS queue bridge ([`AwsBridge::queue_bridge`]) on the raw
//!   publisher's instance, like a separate process; its job queues are named under the case's
//!   prefix, so the cleanup removes them with the rest.
//! * **Broker control**: a fault-injecting HTTP proxy of the case's own in front of one moto
//!   server ([`super::aws_faults`]); the case's bridges reach moto only through it. Dropping
//!   connections cuts every open connection; a "restart" is an outage: connections refused for
//!   2 s, then 503, throttling, cut connections, 500 and slow answers in turn. The reliability
//!   cases run at [`MOTO_FAULT_WORKLOAD_PERCENT`] % on moto ([`Harness::fault_workload`]).
//!
//! **Status** (issue 10, the SQS queue bridge and the fault proxy): the `aws` target runs 81
//! cases on moto (72 behaviours, 12 of them the queue bridge's and 7 under faults, among them
//! 200 queue jobs and health through the proxy's outage; 9 proofs
//! that the strict check refuses undeclared streams and enforced idempotency keys; 3 are
//! skipped with their reason: no metadata limit). Before the fault proxy, 74 passed on moto
//! 5.2.5 (the target alone, 4 moto servers, a shared 2-core machine at load 10 to 12: 257 s of
//! wall time); the 5 reliability cases alone take 137 s of wall time there at load 10. The 61
//! cases before the queue bridge passed in the default run
//! (`cargo nextest run --workspace`; the `aws` target alone, with `scripts/test`'s 4 moto
//! servers on a shared 2-core machine at load 7 to 8: 105 to 108 s of wall time, 208 to 217 s
//! of case time; 195 s and 371 s before the load cases were scaled and teardown parallelised). moto handles one request at a time
//! per process, so on moto the two load cases run at [`MOTO_WORKLOAD_PERCENT`] % of their full
//! size ([`Harness::workload`]): `routing::random_filters_route_like_the_reference_matcher` with
//! 50 subscriptions × 50 messages instead of 100 × 100, and
//! `concurrency::concurrent_publishers_into_many_instances_deliver_the_exact_set` with 8 × 125
//! emits instead of 8 × 500; at full size they take 70 to 95 s each there, against a 120 s case
//! timeout. Real AWS (`PURISTA_AWS_LIVE=1`) runs the full size. The bridge's own filter property
//! test (`bridge-aws/tests`) routes its 10 000 pairs through moto at full size.
//!
//! The harness is a column of the README matrix: the matrix check takes the outcomes the `aws`
//! target recorded in the same run (`purista_conformance::results`), so the suite runs once.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_aws::{AwsBridge, AwsConfig};
use purista_core::{Capabilities, Envelope, EventBridge, QueueBridge, QueueCapabilities};

use super::aws_faults::FaultProxy;
use crate::harness::{BrokerControl, Deployment, Harness, Offer, RawPublisher, TestMode, Workload};

/// Environment variable with the emulator endpoint (moto).
pub const ENDPOINT_ENV: &str = "PURISTA_AWS_ENDPOINT";
/// Environment variable that runs the suite against real AWS.
pub const LIVE_ENV: &str = "PURISTA_AWS_LIVE";
/// The share of their full size the load cases run on moto ([`Harness::workload`]).
pub const MOTO_WORKLOAD_PERCENT: u32 = 25;
/// The share of their full size the reliability cases run on moto
/// ([`Harness::fault_workload`]): 1 000 of their 10 000 events, through the fault proxy.
pub const MOTO_FAULT_WORKLOAD_PERCENT: u32 = 10;
/// Region of the emulator runs.
const EMULATOR_REGION: &str = "us-east-1";

/// Harness of `purista-bridge-aws`.
#[derive(Debug, Default, Clone)]
pub struct AwsHarness;

/// The emulator endpoints: `PURISTA_AWS_ENDPOINT` may list several moto servers, comma
/// separated; each case's deployment goes to one of them (chosen by its prefix), so that cases
/// running at once share the load of moto, which serves one request at a time per process.
fn endpoints() -> Vec<String> {
    std::env::var(ENDPOINT_ENV)
        .unwrap_or_default()
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

fn endpoint() -> Option<String> {
    endpoints().into_iter().next()
}

/// The slot nextest gives the running test (`NEXTEST_TEST_GLOBAL_SLOT`): tests running at the
/// same time have different slots. Each test is a process of its own there, so a counter in
/// the process cannot spread them over the servers; the slot does.
fn nextest_slot() -> Option<usize> {
    std::env::var("NEXTEST_TEST_GLOBAL_SLOT")
        .ok()
        .and_then(|s| s.parse().ok())
}

fn endpoint_for(prefix: &str) -> Option<String> {
    let all = endpoints();
    if all.is_empty() {
        return None;
    }
    if let Some(slot) = nextest_slot() {
        let index = slot % all.len();
        return all.into_iter().nth(index);
    }
    let hash = prefix.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let index = usize::try_from(hash % all.len() as u64).unwrap_or(0);
    all.into_iter().nth(index)
}

fn live() -> bool {
    std::env::var(LIVE_ENV).as_deref() == Ok("1")
}

fn host_port(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(endpoint);
    rest.split('/').next().unwrap_or(rest).to_string()
}

impl AwsHarness {
    /// The harness.
    pub fn new() -> Self {
        AwsHarness
    }

    /// A bridge config under `prefix`, timed for tests: a forgotten ttl does not stall a case
    /// and receivers poll briefly, so shutdowns are quick.
    pub fn config(prefix: &str) -> AwsConfig {
        AwsHarness::config_on(endpoint_for(prefix), prefix)
    }

    /// [`AwsHarness::config`] on `endpoint` (an emulator; real AWS when `None`).
    fn config_on(endpoint: Option<String>, prefix: &str) -> AwsConfig {
        let mut config = match endpoint {
            Some(e) => AwsConfig::new(EMULATOR_REGION).with_emulator(e),
            None => AwsConfig::default(),
        }
        .with_prefix(prefix);
        config.default_command_timeout = Duration::from_secs(5);
        config.wait_seconds = 5;
        // The bridge's default lease (renewed while a handler runs). Not shorter: moto serves
        // one request at a time, and under a burst a renewal waited more than the 5 s a 10 s
        // lease leaves it, so a message still being settled reappeared at another instance.
        // No case here waits for a dead consumer's lease to run out.
        config.visibility_timeout = Duration::from_secs(30);
        config.connect_timeout = Duration::from_secs(10);
        config
    }
}

/// Raw publishing through a bridge instance's SDK clients.
struct SdkPublisher(Arc<AwsBridge>);

#[async_trait]
impl RawPublisher for SdkPublisher {
    async fn publish(&self, bytes: &[u8]) -> Result<(), String> {
        let envelope = Envelope::decode(bytes).map_err(|e| e.to_string())?;
        let detail = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        let entry =
            purista_bridge_aws::aws_sdk_eventbridge::types::PutEventsRequestEntry::builder()
                .event_bus_name(self.0.config().bus_name())
                .source("purista.raw")
                .detail_type(envelope.message_type.as_str())
                .detail(detail)
                .build();
        let out = self
            .0
            .eventbridge()
            .put_events()
            .entries(entry)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if out.failed_entry_count > 0 {
            return Err("EventBridge refused the entry".into());
        }
        Ok(())
    }

    async fn publish_undecodable(&self, bytes: &[u8], _route_as: &Envelope) -> Result<(), String> {
        let body = String::from_utf8_lossy(bytes).into_owned();
        let prefix = self.0.names().prefix().to_string();
        let mut sent = 0;
        for start in [format!("{prefix}-s-"), format!("{prefix}-b-")] {
            let urls = self
                .0
                .sqs()
                .list_queues()
                .queue_name_prefix(start)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .queue_urls
                .unwrap_or_default();
            for url in urls {
                self.0
                    .sqs()
                    .send_message()
                    .queue_url(url)
                    .message_body(body.clone())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                sent += 1;
            }
        }
        if sent == 0 {
            return Err("no subscription queue to put the bytes into".into());
        }
        Ok(())
    }
}

/// Calls the cleanup makes at once.
const CLEANUP_AT_ONCE: usize = 8;

/// Removes everything a case left under its prefix: rules (targets first), the bus, queues.
/// Several calls at once: a case with many subscriptions leaves many rules and queues.
pub async fn remove_all(bridge: &AwsBridge) {
    use futures::StreamExt;
    let bus = bridge.config().bus_name().to_string();
    let events = bridge.eventbridge();
    if let Ok(out) = events.list_rules().event_bus_name(&bus).send().await {
        futures::stream::iter(
            out.rules
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r.name),
        )
        .for_each_concurrent(CLEANUP_AT_ONCE, |name| {
            let bus = bus.clone();
            async move {
                let _ = events
                    .remove_targets()
                    .rule(&name)
                    .event_bus_name(&bus)
                    .ids("purista-queue")
                    .send()
                    .await;
                let _ = events
                    .delete_rule()
                    .name(&name)
                    .event_bus_name(&bus)
                    .send()
                    .await;
            }
        })
        .await;
    }
    let _ = events.delete_event_bus().name(&bus).send().await;
    let prefix = format!("{}-", bridge.names().prefix());
    if let Ok(out) = bridge
        .sqs()
        .list_queues()
        .queue_name_prefix(prefix)
        .send()
        .await
    {
        futures::stream::iter(out.queue_urls.unwrap_or_default())
            .for_each_concurrent(CLEANUP_AT_ONCE, |url| async move {
                let _ = bridge.sqs().delete_queue().queue_url(url).send().await;
            })
            .await;
    }
}

#[async_trait]
impl Harness for AwsHarness {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn mode(&self) -> TestMode {
        // Real AWS when no emulator endpoint is given (`PURISTA_AWS_LIVE=1`).
        if endpoint().is_some() {
            TestMode::Emulator
        } else {
            TestMode::RealBroker
        }
    }

    fn capabilities(&self) -> Capabilities {
        purista_bridge_aws::capabilities(&AwsHarness::config("caps"))
    }

    fn queue_capabilities(&self) -> Option<QueueCapabilities> {
        Some(purista_bridge_aws::queue_capabilities())
    }

    /// Real AWS: the full size. moto: a quarter of it, because moto serves one request at a
    /// time per process and the two load cases (10 000 routed pairs over 100 rules and queues;
    /// 4 000 events into one queue) take it a minute or more each on a 2-core machine.
    fn workload(&self) -> Workload {
        if endpoint().is_some() {
            Workload::scaled(
                MOTO_WORKLOAD_PERCENT,
                "moto serves one request at a time per process; real AWS runs the full size",
            )
        } else {
            Workload::full()
        }
    }

    fn offers_raw_publisher(&self) -> bool {
        true
    }

    fn availability(&self) -> Result<(), String> {
        match endpoint() {
            Some(_) => {
                for e in endpoints() {
                    let reachable = host_port(&e)
                        .to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.next())
                        .is_some_and(|addr| {
                            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
                        });
                    if !reachable {
                        return Err(format!("moto does not answer at {e} ({ENDPOINT_ENV})"));
                    }
                }
                Ok(())
            }
            None if live() => Ok(()),
            None => Err(format!(
                "no AWS endpoint: scripts/test starts moto and sets {ENDPOINT_ENV} (or set {LIVE_ENV}=1 with AWS credentials)"
            )),
        }
    }

    fn fault_workload(&self) -> Workload {
        if endpoint().is_some() {
            Workload::scaled(
                MOTO_FAULT_WORKLOAD_PERCENT,
                "moto serves one request at a time per process, and the faults, not the volume, are under test; real AWS runs the full size",
            )
        } else {
            Workload::full()
        }
    }

    fn broker_control(&self) -> Offer {
        if endpoint().is_some() {
            Offer::Available
        } else {
            Offer::Absent(
                "real AWS is not broken from the tests: the fault proxy stands in front of moto"
                    .into(),
            )
        }
    }

    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        deploy(endpoint_for(prefix), prefix, instances).await
    }

    async fn control(&self) -> Result<Arc<dyn BrokerControl>, String> {
        let all = endpoints();
        if all.is_empty() {
            return Err("no moto endpoint to put the fault proxy in front of".into());
        }
        let pick = nextest_slot()
            .unwrap_or_else(|| CONTROLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
            % all.len();
        let proxy = FaultProxy::start(&all[pick])
            .await
            .map_err(|e| format!("the fault proxy did not start: {e}"))?;
        Ok(Arc::new(ProxiedMoto(proxy)))
    }
}

/// Broker controls handed out so far (spreads them over the moto servers).
static CONTROLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One case's moto behind a fault proxy of its own: the case's bridges reach moto only through
/// it, so its faults strike that case alone.
struct ProxiedMoto(FaultProxy);

#[async_trait]
impl BrokerControl for ProxiedMoto {
    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment {
        deploy(Some(self.0.endpoint()), prefix, instances).await
    }

    async fn drop_connections(&self, _prefix: &str) {
        self.0.drop_connections();
    }

    async fn restart(&self) {
        self.0.outage().await.unwrap_or_else(|e| {
            panic!("the fault proxy did not listen again after its outage: {e}")
        });
    }
}

/// `instances` started bridges (and one for raw access) under `prefix` on `endpoint`.
async fn deploy(endpoint: Option<String>, prefix: &str, instances: usize) -> Deployment {
    let mut bridges = Vec::new();
    for _ in 0..instances + 1 {
        let bridge = AwsBridge::new(AwsHarness::config_on(endpoint.clone(), prefix))
            .await
            .unwrap_or_else(|e| panic!("the aws bridge refused its test config: {e}"));
        bridges.push(Arc::new(bridge));
    }
    let raw = bridges.pop().expect("one bridge for raw access");
    let started = futures::future::try_join_all(bridges.iter().map(|b| b.start())).await;
    let raw_bridge = raw.clone();
    let queues: Arc<dyn QueueBridge> = Arc::new(raw.queue_bridge());
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
            let _ = tokio::time::timeout(Duration::from_secs(20), remove_all(&raw_bridge)).await;
        })
    });
    if let Err(e) = started {
        panic!("an aws bridge did not start against {endpoint:?}: {e}");
    }
    deployment
}
