//! What the AWS bridge costs in calls (AWS bills per request), counted by the fault proxy in
//! front of moto:
//!
//! * a subscription whose handlers are quick takes a batch of messages per receive and settles
//!   a batch per delete, instead of a receive and a delete per message;
//! * commands and responses are put on the bus only while a subscription can match them, and a
//!   subscription on commands gets a copy of every command invoked after its registration
//!   returned, however fresh the caller's last look at the bus's rules was.
//!
//! Without moto (`PURISTA_AWS_ENDPOINT`, set by `scripts/test`) the test is listed as skipped
//! with the reason, unless `PURISTA_REQUIRE_BROKERS=1`. (A `harness = false` target: see
//! `purista_conformance::runner::run_tests`.)

fn main() -> std::process::ExitCode {
    use purista_conformance::runner::{ListedTest, run_tests};
    let skip = match upstream() {
        None if !purista_conformance::env::brokers_required() => Some(format!(
            "no moto endpoint in {ENDPOINT_ENV} (scripts/test starts moto and sets it)"
        )),
        _ => None,
    };
    run_tests(vec![
        ListedTest {
            name: "quick_subscription_handlers_take_a_batch_per_receive_and_per_delete",
            skip: skip.clone(),
            run: || Box::pin(quick_subscription_handlers_take_a_batch_per_receive_and_per_delete()),
        },
        ListedTest {
            name: "command_copies_go_on_the_bus_only_while_a_subscription_wants_them",
            skip,
            run: || Box::pin(command_copies_go_on_the_bus_only_while_a_subscription_wants_them()),
        },
    ])
}

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_aws::aws_sdk_sqs::types::QueueAttributeName;
use purista_bridge_aws::{AwsBridge, AwsConfig};
use purista_conformance::harnesses::aws_faults::FaultProxy;
use purista_conformance::support::{eventually, new_prefix};
use purista_core::{
    Address, AddressFilter, CommandHandler, Delivery, DeliveryHandler, Envelope, EventBridge,
    FailurePolicy, MessageType, RegistrationKey, SenderAddress, Settlement, SubscriptionFilter,
    SubscriptionSpec,
};
use tokio::sync::Notify;

const ENDPOINT_ENV: &str = "PURISTA_AWS_ENDPOINT";
/// Messages waiting in the queue when the subscriber starts.
const MESSAGES: u64 = 40;
/// The subscription's prefetch: messages per receive at most.
const PREFETCH: u16 = 8;

/// moto's first endpoint.
fn upstream() -> Option<String> {
    std::env::var(ENDPOINT_ENV)
        .ok()?
        .split(',')
        .map(str::trim)
        .find(|e| !e.is_empty())
        .map(str::to_string)
}

fn config(endpoint: &str, prefix: &str) -> AwsConfig {
    let mut config = AwsConfig::new("us-east-1")
        .with_emulator(endpoint)
        .with_prefix(prefix);
    config.wait_seconds = 1;
    config.connect_timeout = Duration::from_secs(10);
    config
}

fn spec() -> SubscriptionSpec {
    let mut filter = SubscriptionFilter::new();
    filter.event_name = Some("tick".into());
    SubscriptionSpec {
        key: RegistrationKey::new("meter", "1", "onTick"),
        subscriber: Address::new("meter", "1", "onTick"),
        filter,
        shared: true,
        durable: true,
        policy: FailurePolicy::default(),
        prefetch: PREFETCH,
    }
}

/// Acks at once, counting what it settled.
#[derive(Default)]
struct Quick {
    settled: AtomicU64,
    changed: Notify,
}

#[async_trait]
impl DeliveryHandler for Quick {
    async fn deliver(&self, delivery: Delivery) {
        if delivery.settle.settle(Settlement::Ack).await.is_ok() {
            self.settled.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_waiters();
        }
    }
}

/// The filling instance's handler: it unregisters before the messages are put, so it must see
/// none of them.
#[derive(Default)]
struct Untouched(AtomicU64);

#[async_trait]
impl DeliveryHandler for Untouched {
    async fn deliver(&self, delivery: Delivery) {
        self.0.fetch_add(1, Ordering::SeqCst);
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

async fn quick_subscription_handlers_take_a_batch_per_receive_and_per_delete() {
    let upstream = upstream().expect("moto's endpoint");
    let prefix = new_prefix();

    // The shared subscription's queue and rule, then the messages, with no receiver running:
    // the subscriber below starts with all of them waiting.
    let filler = started(&upstream, &prefix).await;
    let untouched = Arc::new(Untouched::default());
    filler
        .register_subscription(spec(), untouched.clone())
        .await
        .expect("the subscription registers");
    let queue_url = filler
        .subscription_queue_url(&spec().key)
        .expect("the subscription's queue");
    filler
        .unregister_subscription(&spec().key)
        .await
        .expect("the receiver stops");
    let sends = (0..MESSAGES).map(|n| {
        filler.emit(Envelope::custom(
            SenderAddress::default(),
            "tick",
            serde_json::json!({ "n": n }),
        ))
    });
    for sent in futures::future::join_all(sends).await {
        sent.expect("the event is put");
    }
    // SQS tells nobody when a message arrives: its queue's depth is asked until it is full.
    eventually(
        "the events reach the subscription's queue",
        Duration::from_secs(60),
        || async {
            let attributes = filler
                .sqs()
                .get_queue_attributes()
                .queue_url(&queue_url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .send()
                .await
                .expect("the queue's attributes");
            let ready = attributes
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            ready >= MESSAGES
        },
    )
    .await;

    // The subscriber, through the counting proxy.
    let proxy = FaultProxy::start(&upstream).await.expect("the proxy");
    let subscriber = started(&proxy.endpoint(), &prefix).await;
    let quick = Arc::new(Quick::default());
    subscriber
        .register_subscription(spec(), quick.clone())
        .await
        .expect("the subscription registers");
    let all_settled = async {
        loop {
            let changed = quick.changed.notified();
            if quick.settled.load(Ordering::SeqCst) >= MESSAGES {
                return;
            }
            changed.await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all_settled)
        .await
        .expect("every message is handled and deleted within 60 s");
    let queue = queue_url.rsplit('/').next().unwrap_or_default().to_string();
    let receives = proxy.calls("ReceiveMessage", &queue);
    let deletes = proxy.calls("DeleteMessageBatch", &queue) + proxy.calls("DeleteMessage", &queue);
    eprintln!("{MESSAGES} messages: {receives} receives, {deletes} deletes");

    // 40 messages at 8 per receive are 5 receives and 5 deletes; a little slack for a receive
    // that moto answers with fewer than it holds, and the one that may be waiting now. A
    // receive and a delete per message would be 40 of each.
    let batches = MESSAGES / u64::from(PREFETCH);
    assert!(
        receives <= 2 * batches + 1,
        "{receives} receives for {MESSAGES} waiting messages, {PREFETCH} per receive"
    );
    assert!(
        deletes <= 2 * batches,
        "{deletes} delete calls for {MESSAGES} messages settled in batches of up to {PREFETCH}"
    );

    assert_eq!(
        untouched.0.load(Ordering::SeqCst),
        0,
        "the unregistered receiver took messages"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    subscriber.shutdown(deadline).await;
    filler.shutdown(deadline).await;
    purista_conformance::harnesses::remove_aws_resources(&filler).await;
}

struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

/// Records the `payload` of each command copy it gets.
#[derive(Default)]
struct CommandCopies {
    seen: parking_lot::Mutex<Vec<u64>>,
    arrived: Notify,
}

#[async_trait]
impl DeliveryHandler for CommandCopies {
    async fn deliver(&self, delivery: Delivery) {
        if let Some(n) = delivery.envelope.payload["payload"].as_u64() {
            self.seen.lock().push(n);
            self.arrived.notify_waiters();
        }
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

fn echo_command(n: u64) -> Envelope {
    Envelope::command(
        SenderAddress::default(),
        Address::new("echo", "1", "say"),
        serde_json::json!(n),
        serde_json::json!({}),
    )
}

async fn started(endpoint: &str, prefix: &str) -> Arc<AwsBridge> {
    let bridge = Arc::new(
        AwsBridge::new(config(endpoint, prefix))
            .await
            .expect("the bridge"),
    );
    bridge.start().await.expect("the bridge starts");
    bridge
}

async fn command_copies_go_on_the_bus_only_while_a_subscription_wants_them() {
    let upstream = upstream().expect("moto's endpoint");
    let prefix = new_prefix();
    let proxy = FaultProxy::start(&upstream).await.expect("the proxy");
    let caller = started(&proxy.endpoint(), &prefix).await;
    let responder = started(&proxy.endpoint(), &prefix).await;
    responder
        .register_command(Address::new("echo", "1", "say"), Arc::new(Echo))
        .await
        .expect("the command registers");

    // No subscription at all: after the first look at the rules, no copies.
    let puts_before = proxy.calls("PutEvents", "");
    let started_at = tokio::time::Instant::now();
    const CALLS: u64 = 20;
    for n in 0..CALLS {
        caller
            .invoke(echo_command(n), Duration::from_secs(10))
            .await
            .expect("the echo answers");
    }
    let took = started_at.elapsed();
    let puts = proxy.calls("PutEvents", "") - puts_before;
    // A look at the rules is trusted for half a second; without a trusted one the caller and
    // the responder each put their copy (and look again).
    let looks = (took.as_millis() / 500 + 1) as u64;
    eprintln!("{CALLS} invocations in {took:?}: {puts} PutEvents calls");
    assert!(
        puts <= 2 * looks,
        "{puts} PutEvents for {CALLS} invocations in {took:?} with no subscription on the bus (at most {} expected)",
        2 * looks
    );

    // The caller keeps invoking (so its look at the rules is always fresh) while a subscription
    // on the echo's commands registers on a third instance: every command invoked after the
    // registration returned must reach it.
    let watcher = started(&upstream, &prefix).await;
    let copies = Arc::new(CommandCopies::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let (caller, stop) = (caller.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 1_000;
            while !stop.load(Ordering::SeqCst) {
                let _ = caller
                    .invoke(echo_command(n), Duration::from_secs(10))
                    .await;
                n += 1;
            }
        })
    };
    let filter = SubscriptionFilter::new()
        .message_type(MessageType::Command)
        .received_by(AddressFilter {
            service_name: Some("echo".into()),
            ..AddressFilter::default()
        });
    watcher
        .register_subscription(
            SubscriptionSpec {
                key: RegistrationKey::new("watcher", "1", "onEcho"),
                subscriber: Address::new("watcher", "1", "onEcho"),
                filter,
                shared: false,
                durable: false,
                policy: FailurePolicy::default(),
                prefetch: 16,
            },
            copies.clone(),
        )
        .await
        .expect("the subscription registers");
    let after: Vec<u64> = (10_000..10_005).collect();
    for &n in &after {
        caller
            .invoke(echo_command(n), Duration::from_secs(10))
            .await
            .expect("the echo answers");
    }
    stop.store(true, Ordering::SeqCst);
    let _ = background.await;
    let all_seen = async {
        loop {
            let arrived = copies.arrived.notified();
            let seen = copies.seen.lock().clone();
            if after.iter().all(|n| seen.contains(n)) {
                return;
            }
            arrived.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), all_seen)
        .await
        .is_err()
    {
        let seen = copies.seen.lock().clone();
        let missing: Vec<_> = after.iter().filter(|n| !seen.contains(n)).collect();
        panic!(
            "copies of the commands {missing:?}, invoked after the subscription registered, never arrived"
        );
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for bridge in [&watcher, &responder, &caller] {
        bridge.shutdown(deadline).await;
    }
    purista_conformance::harnesses::remove_aws_resources(&caller).await;
}
