//! Shared support of the integration tests: the broker gate, bridges under a unique prefix per
//! test, recording handlers, and cleanup of everything a test declared.
//!
//! Every test runs against the real RabbitMQ at `amqp://guest:guest@127.0.0.1:5672/%2f`
//! (override with `PURISTA_AMQP_TEST_URL`). When it cannot be reached, [`runner`] lists each
//! test as ignored with the reason in its name (a skip, never a pass), unless
//! `PURISTA_REQUIRE_BROKERS=1`, which makes the tests run and fail.
#![allow(dead_code)]

pub mod logs;
pub mod runner;

use std::net::{TcpStream, ToSocketAddrs};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use purista_bridge_amqp::{AmqpBridge, AmqpConfig};
use purista_core::{
    Address, CommandHandler, Delivery, DeliveryHandler, Envelope, EventBridge, FailurePolicy,
    Outcome, SubscriptionFilter, SubscriptionOperator, SubscriptionSpec,
};

use runner::Needs;

/// The broker the tests use.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub fn broker_url() -> String {
    std::env::var("PURISTA_AMQP_TEST_URL").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// `host:port` of an amqp URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

/// What most tests need: the broker ([`broker_url`]).
pub const BROKER: Needs = Needs::new("RabbitMQ", broker_reachable);

/// What the connection-loss tests need: the broker, and `rabbitmqctl` reaching its node (they
/// close connections with it).
pub const BROKER_AND_RABBITMQCTL: Needs = Needs::new("RabbitMQ and rabbitmqctl", || {
    broker_reachable()?;
    rabbitmqctl_usable()
});

/// `Ok` when the broker accepts TCP connections, else why not.
pub fn broker_reachable() -> Result<(), String> {
    let url = broker_url();
    let reachable = host_port(&url)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if reachable {
        Ok(())
    } else {
        Err(format!(
            "RabbitMQ is not reachable at {}",
            purista_bridge_amqp::redact_url(&url)
        ))
    }
}

/// Logs to the test output, filtered by `RUST_LOG` (default: warnings).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// One test's corner of the broker: a unique prefix, the bridges made for it, and cleanup.
pub struct TestBroker {
    pub url: String,
    pub prefix: String,
    bridges: Mutex<Vec<Arc<AmqpBridge>>>,
    extra_queues: Mutex<Vec<String>>,
    finished: bool,
}

impl TestBroker {
    /// A corner named after `test`. The broker's presence was checked when the test was
    /// listed ([`runner`]).
    pub fn new(test: &str) -> Self {
        init_logs();
        let unique = format!(
            "{:x}{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
                ^ (NEXT.fetch_add(1, Ordering::Relaxed) as u32)
        );
        TestBroker {
            url: broker_url(),
            prefix: format!("t.{test}.{unique}"),
            bridges: Mutex::new(Vec::new()),
            extra_queues: Mutex::new(Vec::new()),
            finished: false,
        }
    }

    /// A config under this test's prefix, with test-friendly timings.
    pub fn config(&self) -> AmqpConfig {
        let mut config = AmqpConfig::new(&self.url).with_prefix(&self.prefix);
        config.default_command_timeout = Duration::from_secs(5);
        config.reconnect_initial_delay = Duration::from_millis(50);
        config.reconnect_max_delay = Duration::from_millis(500);
        config.connect_timeout = Duration::from_secs(5);
        config
    }

    /// A started bridge.
    pub async fn bridge(&self) -> Arc<AmqpBridge> {
        self.bridge_with(|_| {}).await
    }

    /// A started bridge with an adjusted config.
    pub async fn bridge_with(&self, adjust: impl FnOnce(&mut AmqpConfig)) -> Arc<AmqpBridge> {
        let mut config = self.config();
        adjust(&mut config);
        let bridge = Arc::new(AmqpBridge::new(config).expect("valid config"));
        bridge.start().await.expect("bridge starts");
        self.bridges.lock().push(bridge.clone());
        bridge
    }

    /// A plain lapin connection for raw publishes and inspection.
    pub async fn raw_connection(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("raw connection")
    }

    /// A queue the test declared itself, deleted at cleanup.
    pub fn track_queue(&self, queue: impl Into<String>) {
        self.extra_queues.lock().push(queue.into());
    }

    fn resources(&self) -> (Vec<String>, String) {
        let mut queues: Vec<String> = self.extra_queues.lock().clone();
        for b in self.bridges.lock().iter() {
            queues.extend(b.declared_queues());
        }
        queues.sort();
        queues.dedup();
        (queues, self.prefix.clone())
    }

    /// Shuts every bridge down and deletes every queue and the exchange the test declared.
    pub async fn finish(mut self) {
        let bridges: Vec<_> = self.bridges.lock().clone();
        for b in &bridges {
            b.shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
                .await;
        }
        let (queues, exchange) = self.resources();
        delete_resources(&self.url, &queues, &exchange).await;
        self.finished = true;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // The test failed before `finish`: still leave the broker clean.
        let (queues, exchange) = self.resources();
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_resources(&url, &queues, &exchange));
            }
        })
        .join();
    }
}

async fn delete_resources(url: &str, queues: &[String], exchange: &str) {
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    for queue in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A command handler that echoes `payload` and counts its calls.
pub struct Echo {
    pub calls: AtomicUsize,
    pub delay: Duration,
}

impl Echo {
    pub fn new() -> Arc<Self> {
        Echo::slow(Duration::ZERO)
    }

    pub fn slow(delay: Duration) -> Arc<Self> {
        Arc::new(Echo {
            calls: AtomicUsize::new(0),
            delay,
        })
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        command.success_response(command.payload["payload"].clone(), None)
    }
}

/// One recorded delivery.
#[derive(Clone, Debug)]
pub struct Seen {
    pub envelope: Arc<Envelope>,
    pub attempt: u32,
    pub at: Instant,
}

type Decide = dyn Fn(&Envelope, u32) -> Outcome + Send + Sync;

/// A subscription handler that records deliveries and settles each with core's failure policy
/// applied to the outcome `decide` returns (what the service runtime does).
pub struct Recorder {
    pub key: String,
    pub policy: FailurePolicy,
    pub seen: Mutex<Vec<Seen>>,
    decide: Box<Decide>,
}

impl Recorder {
    pub fn acking(spec: &SubscriptionSpec) -> Arc<Self> {
        Recorder::deciding(spec, |_, _| Outcome::Ack)
    }

    pub fn deciding(
        spec: &SubscriptionSpec,
        decide: impl Fn(&Envelope, u32) -> Outcome + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Recorder {
            key: spec.key.to_string(),
            policy: spec.policy.clone(),
            seen: Mutex::new(Vec::new()),
            decide: Box::new(decide),
        })
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().len()
    }

    pub fn ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .map(|s| s.envelope.id.clone())
            .collect()
    }
}

#[async_trait]
impl DeliveryHandler for Recorder {
    async fn deliver(&self, delivery: Delivery) {
        self.seen.lock().push(Seen {
            envelope: delivery.envelope.clone(),
            attempt: delivery.attempt,
            at: Instant::now(),
        });
        let outcome = (self.decide)(&delivery.envelope, delivery.attempt);
        let settlement = self.policy.settle(delivery.attempt, &outcome, &self.key);
        delivery
            .settle
            .settle(settlement)
            .await
            .expect("settlement carried out");
    }
}

/// A subscription spec for `service@1/name`.
pub fn spec(name: &str, filter: SubscriptionFilter) -> SubscriptionSpec {
    SubscriptionSpec {
        key: format!("listener@1/{name}").into(),
        subscriber: Address::new("listener", "1", name),
        filter,
        shared: true,
        durable: false,
        policy: FailurePolicy::default(),
        prefetch: 8,
    }
}

/// A bridge as the trait object services take.
pub fn dyn_bridge(b: &Arc<AmqpBridge>) -> Arc<dyn EventBridge> {
    b.clone()
}

/// Reads a dead-letter target until it holds `n` entries or 5 s of reading pass. While the
/// bridge reconnects it cannot read: that is waited out for up to 30 s more (a reconnect after
/// a forced close can take seconds on a busy machine), then it fails naming the error.
pub async fn dead_letters(
    bridge: &AmqpBridge,
    target: &str,
    n: usize,
) -> Vec<purista_core::DeadLetterEntry> {
    let mut end = Instant::now() + Duration::from_secs(5);
    let reconnected_by = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = match bridge.inspect_dead_letters(target, n + 10).await {
            Ok(entries) => entries,
            Err(error) if error.is_retryable() && Instant::now() < reconnected_by => {
                // Reading starts over once the bridge is back.
                end = end.max(Instant::now() + Duration::from_secs(5));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(error) => panic!("dead letters readable: {error:?}"),
        };
        if entries.len() >= n || Instant::now() >= end {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl TestBroker {
    /// Publishes `body` as-is through the default exchange straight into `queue` (no headers,
    /// no envelope checks), as a foreign or broken publisher would, and waits for the broker's
    /// confirm.
    pub async fn publish_into(&self, queue: &str, bodies: &[&[u8]]) {
        let conn = self.raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        for body in bodies {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    lapin::options::BasicPublishOptions::default(),
                    body,
                    lapin::BasicProperties::default(),
                )
                .await
                .expect("raw publish")
                .await
                .expect("raw publish confirmed");
            assert!(confirm.is_ack(), "the broker took the raw publish");
        }
        let _ = conn.close(200, "OK".into()).await;
    }

    /// Messages ready in `queue` (a passive declare); `None` when the queue does not exist or
    /// belongs exclusively to another connection.
    pub async fn ready_messages(&self, queue: &str) -> Option<u32> {
        let conn = self.raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        let declared = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..lapin::options::QueueDeclareOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .ok()
            .map(|q| q.message_count());
        let _ = conn.close(200, "OK".into()).await;
        declared
    }
}

/// The RabbitMQ CLI the connection-loss tests close connections with.
pub const RABBITMQCTL: &str = "rabbitmqctl";

/// Closes the broker connection of `bridge` (found by its connection name), as an operator or a
/// network fault would. Only this bridge's connection: other tests share the broker.
pub fn close_connection_of(bridge: &AmqpBridge) -> Result<(), String> {
    close_connection_named(&connection_name(bridge))
}

/// The name the bridge gives its broker connection.
pub fn connection_name(bridge: &AmqpBridge) -> String {
    format!(
        "purista {} {}",
        bridge.topology().prefix(),
        bridge.instance_id()
    )
}

/// Closes the broker connection named `name` (see [`connection_name`]).
pub fn close_connection_named(name: &str) -> Result<(), String> {
    // Table output: one connection per line, `pid<TAB>client_properties`; the pid is in the
    // `<node.x.y.z>` form `close_connection` takes (the JSON formatter renders it differently).
    let listing = Command::new(RABBITMQCTL)
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .map_err(|e| format!("{RABBITMQCTL} not runnable: {e}"))?;
    if !listing.status.success() {
        return Err(String::from_utf8_lossy(&listing.stderr).into_owned());
    }
    let listing = String::from_utf8_lossy(&listing.stdout);
    let pid = listing
        .lines()
        .find(|line| line.contains(name))
        .and_then(|line| line.split('\t').next())
        .map(str::trim)
        .ok_or_else(|| format!("no connection named `{name}` in:\n{listing}"))?
        .to_string();
    let closed = Command::new(RABBITMQCTL)
        .args(["close_connection", &pid, "test"])
        .output()
        .map_err(|e| e.to_string())?;
    if closed.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&closed.stderr).into_owned())
    }
}

/// `Ok` when `rabbitmqctl` reaches the broker's node (the connection-loss tests close
/// connections with it), else why not.
pub fn rabbitmqctl_usable() -> Result<(), String> {
    match Command::new(RABBITMQCTL)
        .args(["list_connections", "pid", "-q"])
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(_) => Err(format!(
            "{RABBITMQCTL} cannot reach the broker node (this test closes connections with it)"
        )),
        Err(e) => Err(format!(
            "{RABBITMQCTL} does not run: {e} (this test closes connections with it)"
        )),
    }
}

impl TestBroker {
    /// Publishes `body` with `properties` through the default exchange straight into `queue`,
    /// as a foreign publisher would, and waits for the broker's confirm.
    pub async fn publish_with(&self, queue: &str, body: &[u8], properties: lapin::BasicProperties) {
        let conn = self.raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("raw publish")
            .await
            .expect("raw publish confirmed");
        assert!(confirm.is_ack(), "the broker took the raw publish");
        let _ = conn.close(200, "OK".into()).await;
    }

    /// Declares a plain queue of the test's own (deleted at cleanup).
    pub async fn own_queue(&self, name: &str) -> String {
        let queue = format!("{}.own.{name}", self.prefix);
        let conn = self.raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue declared");
        let _ = conn.close(200, "OK".into()).await;
        self.track_queue(queue.clone());
        queue
    }

    /// Declares a queue of the test's own bound to `exchange` the way a caller's reply queue
    /// is: responses whose `replyTo` header names it reach it.
    pub async fn own_reply_queue(&self, name: &str, exchange: &str) -> String {
        let queue = self.own_queue(name).await;
        let conn = self.raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        let mut args = lapin::types::FieldTable::default();
        args.insert(
            "x-match".into(),
            lapin::types::AMQPValue::LongString("all".into()),
        );
        args.insert(
            "replyTo".into(),
            lapin::types::AMQPValue::LongString(queue.as_str().into()),
        );
        ch.queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "".into(),
            lapin::options::QueueBindOptions::default(),
            args,
        )
        .await
        .expect("reply queue bound");
        let _ = conn.close(200, "OK".into()).await;
        queue
    }

    /// Takes one message from `queue`, waiting up to `within` for one to arrive.
    pub async fn take_one(&self, queue: &str, within: Duration) -> Option<Vec<u8>> {
        let conn = self.raw_connection().await;
        let ch = conn.create_channel().await.expect("channel");
        let end = Instant::now() + within;
        let got = loop {
            let message = ch
                .basic_get(
                    queue.into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            if let Some(message) = message {
                break Some(message.delivery.data);
            }
            if Instant::now() >= end {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = conn.close(200, "OK".into()).await;
        got
    }
}
