//! The RabbitMQ bridge under broker stalls, alarms and outages, each on a private RabbitMQ node
//! of this test process (`PrivateNode`): frozen (SIGSTOP), in a memory alarm (publishers
//! blocked), and down while the bridge keeps reconnecting.
//!
//! What a user relies on: every call returns by its deadline (an `emit` with 503 after the
//! bridge's `broker_timeout`, a `shutdown` by the deadline it was given) whatever state the
//! broker is in; health is not `ok` while the broker cannot take messages; and the bridge never
//! stops trying to reconnect while it is not shut down.
//!
//! One node per test (under nextest, one process per test): a frozen or alarmed node must not
//! strike another test. Without RabbitMQ installed the tests are listed as skipped, with the
//! reason, unless `PURISTA_REQUIRE_BROKERS=1`. (A `harness = false` target: see
//! `purista_conformance::runner::run_tests`.)

fn main() -> std::process::ExitCode {
    use purista_conformance::runner::{ListedTest, run_tests};
    let skip = match PrivateNode::installed() {
        Err(why) if !purista_conformance::env::brokers_required() => Some(why),
        _ => None,
    };
    let test =
        |name: &'static str, run: fn() -> futures::future::BoxFuture<'static, ()>| ListedTest {
            name,
            skip: skip.clone(),
            run,
        };
    run_tests(vec![
        test(
            "a_frozen_broker_fails_emit_by_its_deadline_and_shutdown_returns_by_its_own",
            || {
                Box::pin(
                    a_frozen_broker_fails_emit_by_its_deadline_and_shutdown_returns_by_its_own(),
                )
            },
        ),
        test(
            "a_memory_alarm_turns_health_not_ok_and_emit_returns_by_its_deadline",
            || Box::pin(a_memory_alarm_turns_health_not_ok_and_emit_returns_by_its_deadline()),
        ),
        test(
            "during_an_outage_shutdown_returns_by_its_deadline_and_the_others_reconnect_after_it",
            || {
                Box::pin(
                    during_an_outage_shutdown_returns_by_its_deadline_and_the_others_reconnect_after_it(),
                )
            },
        ),
    ])
}

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use purista_bridge_amqp::{AmqpBridge, AmqpConfig};
use purista_conformance::harnesses::private_node::PrivateNode;
use purista_conformance::support::new_prefix;
use purista_core::{
    Address, BridgeError, BridgeHealth, CommandHandler, Delivery, DeliveryHandler, Envelope,
    EventBridge, FailurePolicy, SenderAddress, Settlement, SubscriptionFilter, SubscriptionSpec,
};
use serde_json::json;

/// The bridges' deadline for one broker call.
const BROKER_TIMEOUT: Duration = Duration::from_secs(1);

/// What "returns by its deadline" allows beyond the deadline: scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(700);

/// A private node for this test, started now.
async fn node() -> Arc<PrivateNode> {
    tokio::task::spawn_blocking(PrivateNode::start)
        .await
        .expect("starting the node does not panic")
        .unwrap_or_else(|why| panic!("no private RabbitMQ node: {why}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("no panic")
}

fn config(url: &str, prefix: &str) -> AmqpConfig {
    let mut config = AmqpConfig::new(url).with_prefix(prefix);
    config.default_command_timeout = Duration::from_secs(5);
    config.reconnect_initial_delay = Duration::from_millis(50);
    config.reconnect_max_delay = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(2);
    config.broker_timeout = BROKER_TIMEOUT;
    config
}

async fn started(url: &str, prefix: &str) -> Arc<AmqpBridge> {
    let bridge = Arc::new(AmqpBridge::new(config(url, prefix)).expect("valid config"));
    bridge.start().await.expect("the bridge connects");
    bridge
}

fn event(n: u64) -> Envelope {
    Envelope::custom(SenderAddress::default(), "sold", json!({ "n": n }))
}

/// Polls `check` every 20 ms until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

struct Acking;

#[async_trait]
impl DeliveryHandler for Acking {
    async fn deliver(&self, delivery: Delivery) {
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

fn subscription(name: &str) -> SubscriptionSpec {
    SubscriptionSpec {
        key: format!("listener@1/{name}").into(),
        subscriber: Address::new("listener", "1", name),
        filter: SubscriptionFilter::new().event_name("sold"),
        shared: true,
        durable: true,
        policy: FailurePolicy::default(),
        prefetch: 8,
    }
}

/// A bridge serving a command and a subscription, with an invocation in flight.
async fn busy(url: &str, prefix: &str) -> Arc<AmqpBridge> {
    let bridge = started(url, prefix).await;
    bridge
        .register_command(Address::new("echo", "1", "say"), Arc::new(Echo))
        .await
        .expect("command registered");
    bridge
        .register_subscription(subscription("onSold"), Arc::new(Acking))
        .await
        .expect("subscription registered");
    bridge
}

/// Asserts that `call` returns by `deadline` (plus scheduling slack) and gives its result.
async fn by<T>(what: &str, deadline: Duration, call: impl std::future::Future<Output = T>) -> T {
    let began = Instant::now();
    let out = tokio::time::timeout(deadline + Duration::from_secs(30), call)
        .await
        .unwrap_or_else(|_| {
            panic!("{what}: no return even 30 s after its deadline of {deadline:?}")
        });
    let took = began.elapsed();
    assert!(
        took <= deadline + SLACK,
        "{what}: returned after {took:?}, its deadline was {deadline:?}"
    );
    eprintln!("{what}: returned after {took:?} (deadline {deadline:?})");
    out
}

async fn a_frozen_broker_fails_emit_by_its_deadline_and_shutdown_returns_by_its_own() {
    let node = node().await;
    let url = node.url();
    let prefix = new_prefix();
    let emitter = started(&url, &prefix).await;
    let leaving = busy(&url, &prefix).await;
    emitter
        .emit(event(0))
        .await
        .expect("emit while the broker runs");

    let frozen = node.clone();
    blocking(move || frozen.freeze()).await.expect("frozen");
    let err = by(
        "emit to a frozen broker",
        BROKER_TIMEOUT,
        emitter.emit(event(1)),
    )
    .await
    .expect_err("nothing confirms it");
    assert!(
        matches!(err, BridgeError::Unavailable(_)) && err.is_retryable(),
        "503, retry later: {err:?}"
    );
    assert!(
        !emitter.health().await.is_healthy(),
        "health is not ok while the broker does not answer"
    );
    let report = by(
        "shutdown with the broker frozen",
        Duration::from_secs(2),
        leaving.shutdown(tokio::time::Instant::now() + Duration::from_secs(2)),
    )
    .await;
    eprintln!("drain report: {report:?}");

    let thawed = node.clone();
    blocking(move || thawed.thaw()).await.expect("thawed");
    assert!(
        eventually(Duration::from_secs(20), || {
            let emitter = emitter.clone();
            async move { emitter.emit(event(2)).await.is_ok() }
        })
        .await,
        "emit works again once the broker answers"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let emitter = emitter.clone();
            async move { emitter.health().await.is_healthy() }
        })
        .await,
        "health is ok again"
    );
    by(
        "shutdown",
        Duration::from_secs(5),
        emitter.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)),
    )
    .await;
}

async fn a_memory_alarm_turns_health_not_ok_and_emit_returns_by_its_deadline() {
    let node = node().await;
    let url = node.url();
    let prefix = new_prefix();
    let bridge = busy(&url, &prefix).await;
    bridge.emit(event(0)).await.expect("emit before the alarm");

    let alarmed = node.clone();
    blocking(move || alarmed.set_memory_high_watermark(0.000_001))
        .await
        .expect("memory alarm raised");
    // The broker blocks a connection once it publishes during the alarm.
    let err = by(
        "emit during a memory alarm",
        BROKER_TIMEOUT,
        bridge.emit(event(1)),
    )
    .await
    .expect_err("a blocked connection confirms nothing");
    assert_eq!(err.status().0, 503, "{err:?}");
    let blocked = eventually(Duration::from_secs(5), || {
        let bridge = bridge.clone();
        async move { matches!(bridge.health().await, BridgeHealth::Unhealthy { reason } if reason.contains("blocked")) }
    })
    .await;
    assert!(
        blocked,
        "health says the broker blocked publishing: {:?}",
        bridge.health().await
    );

    let cleared = node.clone();
    blocking(move || cleared.set_memory_high_watermark(0.4))
        .await
        .expect("memory alarm cleared");
    assert!(
        eventually(Duration::from_secs(10), || {
            let bridge = bridge.clone();
            async move { bridge.health().await.is_healthy() }
        })
        .await,
        "healthy again once the alarm clears: {:?}",
        bridge.health().await
    );
    bridge.emit(event(2)).await.expect("emit after the alarm");
    by(
        "shutdown",
        Duration::from_secs(5),
        bridge.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)),
    )
    .await;
}

async fn during_an_outage_shutdown_returns_by_its_deadline_and_the_others_reconnect_after_it() {
    let node = node().await;
    let url = node.url();
    let prefix = new_prefix();
    let leaving = busy(&url, &prefix).await;
    let staying = busy(&url, &prefix).await;
    let client = started(&url, &prefix).await;

    let down = node.clone();
    blocking(move || down.take_down()).await;
    assert!(
        eventually(Duration::from_secs(5), || {
            let staying = staying.clone();
            async move { !staying.health().await.is_healthy() }
        })
        .await,
        "health is an error while the broker is down"
    );
    // The outage lasts through this shutdown and the node's boot (seconds): the reconnect
    // backoff reaches its longest wait many times over.
    by(
        "shutdown during the outage",
        Duration::from_secs(2),
        leaving.shutdown(tokio::time::Instant::now() + Duration::from_secs(2)),
    )
    .await;

    let up = node.clone();
    blocking(move || up.bring_up())
        .await
        .expect("the node is back");
    let served = eventually(Duration::from_secs(30), || {
        let client = client.clone();
        let cmd = Envelope::command(
            SenderAddress::default(),
            Address::new("echo", "1", "say"),
            json!("back"),
            json!({}),
        );
        async move { client.invoke(cmd, Duration::from_secs(2)).await.is_ok() }
    })
    .await;
    assert!(served, "the staying instance serves again after the outage");
    assert!(staying.reconnects() >= 1 && staying.health().await.is_healthy());
    for bridge in [&staying, &client] {
        by(
            "shutdown",
            Duration::from_secs(5),
            bridge.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)),
        )
        .await;
    }
}
