//! Behaviour of the in-process event bridge, one behaviour per test.
//!
//! Several `MemoryBridge`s on one `MemoryBroker` stand for several service instances on one
//! broker. The handlers here are small test doubles of core's runtime: they implement the
//! bridge-facing traits directly and settle with explicit `Settlement`s.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_bridge_default::{MemoryBridge, MemoryBridgeConfig, MemoryBroker};
use purista_core::{
    Address, BridgeError, BridgeHealth, CommandHandler, DeadLetterNote, Delivery, DeliveryHandler,
    Envelope, EventBridge, FailurePolicy, MessagePart, MessageType, SenderAddress, SettleError,
    Settlement, StatusCode, StreamHandler, StreamProducerEnd, SubscriptionFilter,
    SubscriptionOperator, SubscriptionSpec, WorkKind,
};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

/// Upper bound for every awaited condition; the conditions normally hold within milliseconds.
const PATIENCE: Duration = Duration::from_secs(5);

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn sender(service: &str) -> SenderAddress {
    SenderAddress {
        service_name: service.into(),
        service_version: "1".into(),
        service_target: "test".into(),
        instance_id: String::new(),
    }
}

fn echo_address() -> Address {
    Address::new("echo", "1", "say")
}

fn command_to(receiver: Address, payload: Value) -> Envelope {
    Envelope::command(sender("caller"), receiver, payload, json!({}))
}

fn event(name: &str, payload: Value) -> Envelope {
    Envelope::custom(sender("emitter"), name, payload)
}

fn spec(key: &str, filter: SubscriptionFilter, shared: bool) -> SubscriptionSpec {
    SubscriptionSpec {
        key: key.into(),
        subscriber: Address::new("listener", "1", key),
        filter,
        shared,
        durable: false,
        policy: FailurePolicy::default(),
        prefetch: 1,
    }
}

/// Answers with the command's payload.
struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

/// Answers only when the test adds a permit; counts answers.
struct Gated {
    gate: Arc<Semaphore>,
    answered: Arc<AtomicUsize>,
}

#[async_trait]
impl CommandHandler for Gated {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        if let Ok(permit) = self.gate.acquire().await {
            permit.forget();
        }
        self.answered.fetch_add(1, Ordering::SeqCst);
        command.success_response(json!("late"), None)
    }
}

/// Panics instead of answering.
struct Panics;

#[async_trait]
impl CommandHandler for Panics {
    async fn handle(&self, _command: Arc<Envelope>) -> Envelope {
        panic!("handler bug")
    }
}

/// Answers with a success event, so the response is an event for subscriptions too.
struct AnswersWithEvent;

#[async_trait]
impl CommandHandler for AnswersWithEvent {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(json!({"ok": true}), Some("orderPlaced".into()))
    }
}

/// A delivery as a test saw it.
#[derive(Clone)]
struct Seen {
    instance: usize,
    envelope: Arc<Envelope>,
    attempt: u32,
    at: Instant,
}

type Decide = dyn Fn(&Delivery) -> Settlement + Send + Sync;

/// Records every delivery and settles it as `decide` says.
struct Recorder {
    instance: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    decide: Box<Decide>,
}

impl Recorder {
    fn acking(instance: usize, seen: &Arc<Mutex<Vec<Seen>>>) -> Arc<Self> {
        Recorder::deciding(instance, seen, |_| Settlement::Ack)
    }

    fn deciding(
        instance: usize,
        seen: &Arc<Mutex<Vec<Seen>>>,
        decide: impl Fn(&Delivery) -> Settlement + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Recorder {
            instance,
            seen: seen.clone(),
            decide: Box::new(decide),
        })
    }
}

#[async_trait]
impl DeliveryHandler for Recorder {
    async fn deliver(&self, delivery: Delivery) {
        self.seen.lock().push(Seen {
            instance: self.instance,
            envelope: delivery.envelope.clone(),
            attempt: delivery.attempt,
            at: Instant::now(),
        });
        let settlement = (self.decide)(&delivery);
        delivery
            .settle
            .settle(settlement)
            .await
            .expect("first settle succeeds");
    }
}

fn seen_ids(seen: &Arc<Mutex<Vec<Seen>>>) -> Vec<String> {
    seen.lock().iter().map(|s| s.envelope.id.clone()).collect()
}

async fn bridges(broker: &MemoryBroker, n: usize) -> Vec<MemoryBridge> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let bridge = broker.bridge();
        bridge.start().await.expect("start");
        out.push(bridge);
    }
    out
}

#[tokio::test]
async fn invoke_round_trip_reaches_a_handler_on_another_instance() {
    let broker = MemoryBroker::new();
    let (server, client) = (broker.bridge(), broker.bridge());
    server
        .register_command(echo_address(), Arc::new(Echo))
        .await
        .unwrap();

    let command = command_to(echo_address(), json!({"hello": "world"}));
    let correlation_id = command.correlation_id.clone();
    let response = client
        .invoke(command, Duration::from_secs(2))
        .await
        .expect("response");

    assert_eq!(response.message_type, MessageType::CommandSuccessResponse);
    assert_eq!(response.payload, json!({"hello": "world"}));
    assert_eq!(response.correlation_id, correlation_id);
    assert_eq!(response.sender.instance_id, server.instance_id());
    assert_eq!(
        response.receiver.and_then(|r| r.instance_id).as_deref(),
        Some(client.instance_id())
    );
    assert_eq!(client.in_flight().total, 0);
}

#[tokio::test]
async fn invoke_without_handler_fails_at_once_with_no_handler() {
    let client = MemoryBroker::new().bridge();
    let command = command_to(echo_address(), json!(1));

    let result = tokio::time::timeout(
        Duration::from_secs(1),
        client.invoke(command, Duration::from_secs(30)),
    )
    .await
    .expect("fails fast, long before the ttl");

    let error = result.unwrap_err();
    assert_eq!(error, BridgeError::NoHandler("echo@1/say".into()));
    assert_eq!(error.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn invoke_times_out_and_ignores_the_late_response() {
    let broker = MemoryBroker::new();
    let (server, client) = (broker.bridge(), broker.bridge());
    let gate = Arc::new(Semaphore::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let handler = Gated {
        gate: gate.clone(),
        answered: answered.clone(),
    };
    server
        .register_command(echo_address(), Arc::new(handler))
        .await
        .unwrap();

    let result = client
        .invoke(
            command_to(echo_address(), json!(1)),
            Duration::from_millis(30),
        )
        .await;
    assert_eq!(result.unwrap_err(), BridgeError::Timeout(30));
    assert_eq!(
        client.in_flight().total,
        0,
        "no pending entry is left behind"
    );

    gate.add_permits(1);
    eventually("the late response to arrive", || {
        answered.load(Ordering::SeqCst) == 1 && client.unmatched_responses() == 1
    })
    .await;
    // The bridge still serves invocations afterwards.
    gate.add_permits(1);
    let response = client
        .invoke(command_to(echo_address(), json!(2)), Duration::from_secs(2))
        .await
        .expect("next invocation succeeds");
    assert_eq!(response.payload, json!("late"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_invokes_over_four_instances_never_cross_correlate() {
    let broker = MemoryBroker::new();
    let instances = bridges(&broker, 4).await;
    for bridge in &instances {
        bridge
            .register_command(echo_address(), Arc::new(Echo))
            .await
            .unwrap();
    }

    let calls = (0..1000).map(|i| {
        let caller = &instances[i % instances.len()];
        let command = command_to(echo_address(), json!(i));
        let correlation_id = command.correlation_id.clone();
        async move {
            let response = caller
                .invoke(command, Duration::from_secs(10))
                .await
                .expect("response");
            (i, correlation_id, response)
        }
    });
    let results = futures::future::join_all(calls).await;

    let mut responders = HashSet::new();
    for (i, correlation_id, response) in results {
        assert_eq!(
            response.payload,
            json!(i),
            "response {i} belongs to its own call"
        );
        assert_eq!(response.correlation_id, correlation_id);
        responders.insert(response.sender.instance_id);
    }
    assert_eq!(responders.len(), 4, "every instance served some commands");
    for bridge in &instances {
        assert_eq!(bridge.in_flight().total, 0);
    }
}

#[tokio::test]
async fn shared_subscription_delivers_each_message_to_exactly_one_of_three_instances() {
    let broker = MemoryBroker::new();
    let instances = bridges(&broker, 3).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let filter = SubscriptionFilter::new().event_name("orderPlaced");
    for (i, bridge) in instances.iter().enumerate() {
        bridge
            .register_subscription(
                spec("listener@1/onOrder", filter.clone(), true),
                Recorder::acking(i, &seen),
            )
            .await
            .unwrap();
    }
    let publisher = broker.bridge();

    for n in 0..30 {
        publisher
            .emit(event("orderPlaced", json!(n)))
            .await
            .unwrap();
    }
    eventually("30 deliveries", || seen.lock().len() >= 30).await;

    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 30);
    let unique: HashSet<_> = seen.iter().map(|s| s.envelope.id.clone()).collect();
    assert_eq!(unique.len(), 30, "no message was delivered twice");
    let mut per_instance = HashMap::new();
    for s in &seen {
        *per_instance.entry(s.instance).or_insert(0) += 1;
    }
    assert_eq!(
        per_instance.len(),
        3,
        "the group shares the work: {per_instance:?}"
    );
}

#[tokio::test]
async fn broadcast_subscription_delivers_every_message_to_all_three_instances() {
    let broker = MemoryBroker::new();
    let instances = bridges(&broker, 3).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let filter = SubscriptionFilter::new().event_name("cacheInvalidated");
    for (i, bridge) in instances.iter().enumerate() {
        bridge
            .register_subscription(
                spec("cache@1/onInvalidate", filter.clone(), false),
                Recorder::acking(i, &seen),
            )
            .await
            .unwrap();
    }

    for n in 0..10 {
        instances[0]
            .emit(event("cacheInvalidated", json!(n)))
            .await
            .unwrap();
    }
    eventually("30 deliveries", || seen.lock().len() >= 30).await;

    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 30);
    for instance in 0..3 {
        let ids: HashSet<_> = seen
            .iter()
            .filter(|s| s.instance == instance)
            .map(|s| s.envelope.id.clone())
            .collect();
        assert_eq!(ids.len(), 10, "instance {instance} got every message");
    }
}

#[tokio::test]
async fn subscription_sees_only_messages_its_filter_matches() {
    let broker = MemoryBroker::new();
    let bridge = broker.bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let filter = SubscriptionFilter::new()
        .event_name("orderPlaced")
        .tenant_id("acme");
    bridge
        .register_subscription(
            spec("listener@1/acme", filter, true),
            Recorder::acking(0, &seen),
        )
        .await
        .unwrap();

    bridge
        .emit(event("orderPlaced", json!("other tenant")))
        .await
        .unwrap();
    bridge
        .emit(event("orderShipped", json!("other event")))
        .await
        .unwrap();
    let mut wanted = event("orderPlaced", json!("wanted"));
    wanted.tenant_id = Some("acme".into());
    bridge.emit(wanted).await.unwrap();
    // Routing happens at emit time, so once the matching message arrived the others are decided.
    eventually("the matching message", || !seen.lock().is_empty()).await;

    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].envelope.payload, json!("wanted"));
}

#[tokio::test]
async fn invoked_command_and_its_success_event_reach_matching_subscriptions() {
    let broker = MemoryBroker::new();
    let (server, client) = (broker.bridge(), broker.bridge());
    let orders = Address::new("orders", "1", "placeOrder");
    server
        .register_command(orders.clone(), Arc::new(AnswersWithEvent))
        .await
        .unwrap();
    let commands_seen = Arc::new(Mutex::new(Vec::new()));
    let events_seen = Arc::new(Mutex::new(Vec::new()));
    let audit = SubscriptionFilter::new().message_type(MessageType::Command);
    let placed = SubscriptionFilter::new().event_name("orderPlaced");
    server
        .register_subscription(
            spec("audit@1/commands", audit, true),
            Recorder::acking(0, &commands_seen),
        )
        .await
        .unwrap();
    server
        .register_subscription(
            spec("mail@1/onPlaced", placed, true),
            Recorder::acking(0, &events_seen),
        )
        .await
        .unwrap();

    let command = command_to(orders, json!({"sku": "A-1"}));
    let correlation_id = command.correlation_id.clone();
    client
        .invoke(command, Duration::from_secs(2))
        .await
        .unwrap();

    eventually("command and event deliveries", || {
        commands_seen.lock().len() == 1 && events_seen.lock().len() == 1
    })
    .await;
    let command_seen = commands_seen.lock()[0].envelope.clone();
    let event_seen = events_seen.lock()[0].envelope.clone();
    assert_eq!(command_seen.correlation_id, correlation_id);
    assert_eq!(event_seen.message_type, MessageType::CommandSuccessResponse);
    assert_eq!(event_seen.correlation_id, correlation_id);
}

#[tokio::test]
async fn redelivery_waits_for_its_delay_and_carries_the_next_attempt() {
    let broker = MemoryBroker::new();
    let bridge = broker.bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let delay = Duration::from_millis(100);
    let handler = Recorder::deciding(0, &seen, move |d| {
        if d.attempt == 1 {
            Settlement::Redeliver {
                delay,
                next_attempt: 2,
            }
        } else {
            Settlement::Ack
        }
    });
    bridge
        .register_subscription(
            spec("listener@1/retry", SubscriptionFilter::new(), true),
            handler,
        )
        .await
        .unwrap();

    bridge.emit(event("orderPlaced", json!(1))).await.unwrap();
    eventually("the redelivery", || seen.lock().len() == 2).await;

    let seen = seen.lock().clone();
    assert_eq!(seen[0].envelope.id, seen[1].envelope.id);
    assert_eq!((seen[0].attempt, seen[1].attempt), (1, 2));
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= delay,
        "redelivered after {waited:?}, before the {delay:?} delay"
    );
}

#[tokio::test]
async fn dead_lettered_message_is_readable_with_inspect() {
    let broker = MemoryBroker::new();
    let bridge = broker.bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Recorder::deciding(0, &seen, |d| {
        Settlement::DeadLetter(DeadLetterNote {
            target: "orders.dead-letter".into(),
            reason: "cannot parse".into(),
            attempts: d.attempt,
            origin: "listener@1/dlq".into(),
        })
    });
    bridge
        .register_subscription(
            spec("listener@1/dlq", SubscriptionFilter::new(), true),
            handler,
        )
        .await
        .unwrap();

    bridge
        .emit(event("orderPlaced", json!({"bad": true})))
        .await
        .unwrap();
    eventually("the delivery", || seen.lock().len() == 1).await;
    let id = seen.lock()[0].envelope.id.clone();

    let mut entries = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while entries.is_empty() && Instant::now() < deadline {
        entries = bridge
            .inspect_dead_letters("orders.dead-letter", 10)
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry.note.reason, "cannot parse");
    assert_eq!(entry.note.attempts, 1);
    assert_eq!(entry.note.origin, "listener@1/dlq");
    let envelope = entry.envelope.as_ref().expect("the message is kept");
    assert_eq!(envelope.id, id);
    assert_eq!(envelope.payload, json!({"bad": true}));
    // Another instance on the hub sees the same target.
    let other = broker.bridge();
    assert_eq!(
        other
            .inspect_dead_letters("orders.dead-letter", 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Dead-letters the first delivery of every message into `orders.dead-letter`, acks any later
/// one (a replayed copy).
fn dead_letters_first_attempts(seen: &Arc<Mutex<Vec<Seen>>>) -> Arc<Recorder> {
    let first_seen = Mutex::new(std::collections::HashSet::new());
    Recorder::deciding(0, seen, move |d| {
        if first_seen.lock().insert(d.envelope.id.clone()) {
            Settlement::DeadLetter(DeadLetterNote {
                target: "orders.dead-letter".into(),
                reason: "downstream rejected it".into(),
                attempts: d.attempt,
                origin: "listener@1/dlq".into(),
            })
        } else {
            Settlement::Ack
        }
    })
}

async fn dead_letters_of(bridge: &MemoryBridge, n: usize) -> Vec<purista_core::DeadLetterEntry> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let entries = bridge
            .inspect_dead_letters("orders.dead-letter", 100)
            .await
            .unwrap();
        if entries.len() >= n || Instant::now() >= deadline {
            return entries;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn replay_hands_dead_letters_back_to_their_subscription_as_attempt_one() {
    let broker = MemoryBroker::new();
    let bridge = broker.bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    bridge
        .register_subscription(
            spec(
                "listener@1/dlq",
                SubscriptionFilter::new().event_name("orderPlaced"),
                true,
            ),
            dead_letters_first_attempts(&seen),
        )
        .await
        .unwrap();
    // Another subscription on the same event must not see the replayed copies.
    let bystander = Arc::new(Mutex::new(Vec::new()));
    bridge
        .register_subscription(
            spec(
                "audit@1/all",
                SubscriptionFilter::new().event_name("orderPlaced"),
                true,
            ),
            Recorder::deciding(0, &bystander, |_| Settlement::Ack),
        )
        .await
        .unwrap();
    for n in 0..3 {
        bridge.emit(event("orderPlaced", json!(n))).await.unwrap();
    }
    assert_eq!(dead_letters_of(&bridge, 3).await.len(), 3);
    eventually("the bystander saw the three originals", || {
        bystander.lock().len() == 3
    })
    .await;

    let report = bridge
        .replay_dead_letters("orders.dead-letter", 2)
        .await
        .unwrap();
    assert_eq!(report.replayed, 2);
    assert!(report.left.is_empty(), "{report:?}");
    eventually("two replayed deliveries", || seen.lock().len() == 5).await;
    let replayed: Vec<(Value, u32)> = seen.lock()[3..]
        .iter()
        .map(|s| (s.envelope.payload.clone(), s.attempt))
        .collect();
    assert_eq!(
        replayed,
        vec![(json!(0), 1), (json!(1), 1)],
        "oldest first, as attempt 1"
    );
    let left = dead_letters_of(&bridge, 1).await;
    assert_eq!(left.len(), 1, "only the unreplayed one stays");
    assert_eq!(left[0].envelope.as_ref().unwrap().payload, json!(2));

    // The replayed copies were acked (their second delivery says attempt 1, the recorder only
    // dead-letters attempt 1 of non-replayed payloads... so they came back dead-lettered).
    assert_eq!(
        bystander.lock().len(),
        3,
        "no other subscription sees a replay"
    );
}

#[tokio::test]
async fn replay_leaves_dead_letters_whose_subscription_is_gone_and_purge_removes_all() {
    let broker = MemoryBroker::new();
    let bridge = broker.bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let key = "listener@1/dlq";
    bridge
        .register_subscription(
            spec(
                key,
                SubscriptionFilter::new().event_name("orderPlaced"),
                true,
            ),
            dead_letters_first_attempts(&seen),
        )
        .await
        .unwrap();
    bridge.emit(event("orderPlaced", json!("a"))).await.unwrap();
    bridge.emit(event("orderPlaced", json!("b"))).await.unwrap();
    assert_eq!(dead_letters_of(&bridge, 2).await.len(), 2);
    bridge.unregister_subscription(&key.into()).await.unwrap();

    let report = bridge
        .replay_dead_letters("orders.dead-letter", 10)
        .await
        .unwrap();
    assert_eq!(report.replayed, 0);
    assert_eq!(report.left.len(), 2);
    assert!(report.left.iter().all(|l| matches!(
        &l.reason,
        purista_core::NotReplayed::SourceGone { source } if source == key
    )));
    let kept: Vec<Value> = dead_letters_of(&bridge, 2)
        .await
        .iter()
        .map(|e| e.envelope.as_ref().unwrap().payload.clone())
        .collect();
    assert_eq!(kept, vec![json!("a"), json!("b")], "kept in their order");

    assert_eq!(
        bridge
            .purge_dead_letters("orders.dead-letter")
            .await
            .unwrap(),
        2
    );
    assert!(dead_letters_of(&bridge, 0).await.is_empty());
    assert_eq!(
        bridge
            .purge_dead_letters("orders.dead-letter")
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn paused_consumer_keeps_messages_until_resumed() {
    let broker = MemoryBroker::new();
    let bridge = broker.bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let paused_once = Arc::new(AtomicBool::new(false));
    let flag = paused_once.clone();
    let handler = Recorder::deciding(0, &seen, move |_| {
        if flag.swap(true, Ordering::SeqCst) {
            Settlement::Ack
        } else {
            Settlement::Pause {
                reason: "downstream is down".into(),
            }
        }
    });
    let key = "listener@1/pausing";
    bridge
        .register_subscription(spec(key, SubscriptionFilter::new(), true), handler)
        .await
        .unwrap();

    bridge.emit(event("orderPlaced", json!(1))).await.unwrap();
    eventually("the pause", || {
        !bridge.paused_subscription_consumers().is_empty()
    })
    .await;
    let paused = bridge.paused_subscription_consumers();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].key, key);
    assert_eq!(paused[0].reason, "downstream is down");

    bridge.emit(event("orderPlaced", json!(2))).await.unwrap();
    bridge.emit(event("orderPlaced", json!(3))).await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(
        seen.lock().len(),
        1,
        "a paused consumer takes no deliveries"
    );

    assert!(
        bridge
            .resume_subscription_consumer(&key.into())
            .await
            .unwrap()
    );
    eventually("every message after resume", || seen.lock().len() == 4).await;
    let seen = seen.lock().clone();
    let payloads: Vec<_> = seen.iter().map(|s| s.envelope.payload.clone()).collect();
    assert_eq!(payloads, vec![json!(1), json!(1), json!(2), json!(3)]);
    assert_eq!(
        seen[1].attempt, 1,
        "the paused delivery keeps its attempt number"
    );
    assert!(bridge.paused_subscription_consumers().is_empty());
    assert!(
        !bridge
            .resume_subscription_consumer(&key.into())
            .await
            .unwrap()
    );
    assert_eq!(bridge.dropped_while_paused(), 0);
}

#[tokio::test]
async fn paused_consumer_with_a_full_buffer_drops_the_newest_instead_of_blocking() {
    let broker = MemoryBroker::new();
    let bridge = broker.bridge_with(MemoryBridgeConfig {
        consumer_buffer: 2,
        ..MemoryBridgeConfig::default()
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Recorder::deciding(0, &seen, |_| Settlement::Pause {
        reason: "stop".into(),
    });
    bridge
        .register_subscription(
            spec("listener@1/full", SubscriptionFilter::new(), true),
            handler,
        )
        .await
        .unwrap();
    bridge.emit(event("e", json!(1))).await.unwrap();
    eventually("the pause", || {
        !bridge.paused_subscription_consumers().is_empty()
    })
    .await;

    // The buffer holds the paused delivery and one more; the third must not block.
    tokio::time::timeout(Duration::from_secs(1), async {
        bridge.emit(event("e", json!(2))).await.unwrap();
        bridge.emit(event("e", json!(3))).await.unwrap();
    })
    .await
    .expect("emit does not block on a paused consumer");
    assert_eq!(bridge.dropped_while_paused(), 1);
}

/// Settles every delivery twice and reports the second result.
struct SettlesTwice {
    second: Mutex<Option<oneshot::Sender<Result<(), SettleError>>>>,
}

#[async_trait]
impl DeliveryHandler for SettlesTwice {
    async fn deliver(&self, delivery: Delivery) {
        delivery.settle.settle(Settlement::Ack).await.unwrap();
        let second = delivery.settle.settle(Settlement::Ack).await;
        if let Some(tx) = self.second.lock().take() {
            let _ = tx.send(second);
        }
    }
}

#[tokio::test]
async fn settling_twice_returns_already_settled() {
    let bridge = MemoryBroker::new().bridge();
    let (tx, rx) = oneshot::channel();
    let handler = Arc::new(SettlesTwice {
        second: Mutex::new(Some(tx)),
    });
    bridge
        .register_subscription(
            spec("listener@1/twice", SubscriptionFilter::new(), true),
            handler,
        )
        .await
        .unwrap();

    let message = event("orderPlaced", json!(1));
    bridge.emit(message).await.unwrap();
    let second = tokio::time::timeout(PATIENCE, rx).await.unwrap().unwrap();

    assert!(
        matches!(second, Err(SettleError::AlreadySettled { .. })),
        "got {second:?}"
    );
}

/// Sends two chunks, then waits for the consumer's cancel and reports its reason.
struct TwoChunksThenWait {
    cancelled: Mutex<Option<oneshot::Sender<String>>>,
}

#[async_trait]
impl StreamHandler for TwoChunksThenWait {
    async fn open(&self, open: Arc<Envelope>, mut producer: StreamProducerEnd) {
        for n in 0..2 {
            let mut frame = Envelope::new(MessageType::Stream, sender("numbers"));
            frame.correlation_id = open.correlation_id.clone();
            frame.payload = json!({"frame": "chunk", "n": n});
            if producer.frames.send(frame).await.is_err() {
                return;
            }
        }
        let reason = match producer.cancelled.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "consumer gone".to_string(),
        };
        if let Some(tx) = self.cancelled.lock().take() {
            let _ = tx.send(reason);
        }
    }
}

#[tokio::test]
async fn stream_frames_reach_the_consumer_and_cancel_reaches_the_producer() {
    let broker = MemoryBroker::new();
    let (producer, consumer) = (broker.bridge(), broker.bridge());
    let numbers = Address::new("numbers", "1", "count");
    let (tx, cancelled) = oneshot::channel();
    producer
        .register_stream(
            numbers.clone(),
            Arc::new(TwoChunksThenWait {
                cancelled: Mutex::new(Some(tx)),
            }),
        )
        .await
        .unwrap();

    let mut open = purista_core::stream::frame(
        sender("reader"),
        "session-1",
        purista_core::stream::FrameType::Open,
        0,
        None,
    );
    open.receiver = Some(numbers);
    let mut session = consumer.open_stream(open).await.unwrap();

    for n in 0..2 {
        let frame = tokio::time::timeout(PATIENCE, session.frames.recv())
            .await
            .unwrap()
            .expect("a frame");
        assert_eq!(frame.correlation_id.as_deref(), Some("session-1"));
        assert_eq!(frame.payload["n"], json!(n));
    }
    assert_eq!(producer.in_flight().by_kind.stream, 1);

    session.cancel.send(Some("enough".into())).unwrap();
    let reason = tokio::time::timeout(PATIENCE, cancelled)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason, "enough");
    eventually("the session to end", || {
        producer.in_flight().by_kind.stream == 0
    })
    .await;
}

#[tokio::test]
async fn shutdown_rejects_pending_invocations_with_unavailable() {
    let broker = MemoryBroker::new();
    let (server, client) = (broker.bridge(), broker.bridge());
    let gate = Arc::new(Semaphore::new(0));
    let handler = Gated {
        gate: gate.clone(),
        answered: Arc::new(AtomicUsize::new(0)),
    };
    server
        .register_command(echo_address(), Arc::new(handler))
        .await
        .unwrap();
    client.start().await.unwrap();

    let pending = client.invoke(
        command_to(echo_address(), json!(1)),
        Duration::from_secs(30),
    );
    let shutdown = async {
        eventually("the invocation to be pending", || {
            client.in_flight().by_kind.command == 1
        })
        .await;
        client
            .shutdown(Instant::now() + Duration::from_millis(50))
            .await
    };
    let (result, report) = tokio::join!(pending, shutdown);

    assert_eq!(
        result.unwrap_err(),
        BridgeError::Unavailable("bridge shutting down".into())
    );
    assert_eq!(report.rejected_invocations, 1);
    assert!(!report.completed);
    assert_eq!(
        report.still_running,
        vec![(WorkKind::Command, "echo@1/say".to_string())]
    );
    assert!(matches!(
        client
            .invoke(command_to(echo_address(), json!(2)), Duration::from_secs(1))
            .await,
        Err(BridgeError::Unavailable(_))
    ));
    assert_eq!(
        client.health().await,
        BridgeHealth::Unhealthy {
            reason: "shut down".into()
        }
    );
    // Idempotent: a second shutdown reports the same drain.
    assert_eq!(client.shutdown(Instant::now()).await, report);

    // The server's handler never answers: its shutdown aborts it at the deadline.
    let server_report = server
        .shutdown(Instant::now() + Duration::from_millis(20))
        .await;
    assert!(!server_report.completed);
    assert_eq!(
        server_report.still_running,
        vec![(WorkKind::Command, "echo@1/say".to_string())]
    );
}

#[tokio::test]
async fn shutdown_unregisters_this_instance_from_the_hub() {
    let broker = MemoryBroker::new();
    let (server, client) = (broker.bridge(), broker.bridge());
    server
        .register_command(echo_address(), Arc::new(Echo))
        .await
        .unwrap();

    let report = server
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
    assert!(report.completed);

    let result = client
        .invoke(command_to(echo_address(), json!(1)), Duration::from_secs(1))
        .await;
    assert_eq!(
        result.unwrap_err(),
        BridgeError::NoHandler("echo@1/say".into())
    );
}

#[tokio::test]
async fn command_handler_panic_answers_500() {
    let broker = MemoryBroker::new();
    let (server, client) = (broker.bridge(), broker.bridge());
    server
        .register_command(echo_address(), Arc::new(Panics))
        .await
        .unwrap();

    let response = client
        .invoke(command_to(echo_address(), json!(1)), Duration::from_secs(2))
        .await
        .expect("an error response, not a transport failure");

    assert_eq!(response.message_type, MessageType::CommandErrorResponse);
    assert_eq!(response.payload["status"], json!(500));
    assert_eq!(response.payload["message"], json!("Internal Server Error"));
    assert_eq!(response.is_handled_error, Some(false));
    // The server lives on.
    server
        .register_command(Address::new("echo", "1", "other"), Arc::new(Echo))
        .await
        .unwrap();
    client
        .invoke(
            command_to(Address::new("echo", "1", "other"), json!(2)),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn undecodable_raw_message_is_counted_and_rejected() {
    let bridge = MemoryBroker::new().bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    bridge
        .register_subscription(
            spec("listener@1/raw", SubscriptionFilter::new(), true),
            Recorder::acking(0, &seen),
        )
        .await
        .unwrap();

    assert!(bridge.publish_raw(b"{not json").await.is_err());
    assert!(
        bridge
            .publish_raw(br#"{"messageType":"bogus"}"#)
            .await
            .is_err()
    );
    assert_eq!(bridge.poison_messages(), 2);
    assert_eq!(
        bridge.counters(),
        purista_core::BridgeCounters {
            reconnects: 0,
            poison_messages: 2,
            unmatched_responses: 0
        },
        "the same count through the trait"
    );

    // The consumer lives on, and a valid raw message keeps its id (no re-stamping).
    let mut valid = event("orderPlaced", json!(1));
    valid.sender.instance_id = "elsewhere".into();
    let bytes = valid.encode();
    bridge.publish_raw(&bytes).await.unwrap();
    bridge.publish_raw(&bytes).await.unwrap();
    eventually("both copies", || seen.lock().len() == 2).await;
    assert_eq!(seen_ids(&seen), vec![valid.id.clone(), valid.id]);
}

#[tokio::test]
async fn oversize_message_is_rejected_as_too_large_before_anything_is_sent() {
    let bridge = MemoryBroker::new().bridge_with(MemoryBridgeConfig {
        max_payload_bytes: Some(512),
        ..MemoryBridgeConfig::default()
    });
    assert_eq!(bridge.capabilities().limits.max_payload_bytes, Some(512));

    let big = event("orderPlaced", json!("x".repeat(1024)));
    let error = bridge.emit(big).await.unwrap_err();

    assert!(
        matches!(error, BridgeError::TooLarge { part: MessagePart::Body, size, limit: 512 } if size > 1024),
        "got {error:?}"
    );
    assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    bridge
        .emit(event("orderPlaced", json!("small")))
        .await
        .unwrap();
}

#[tokio::test]
async fn emit_stamps_id_timestamp_and_sender_instance() {
    let bridge = MemoryBroker::new().bridge();
    let seen = Arc::new(Mutex::new(Vec::new()));
    bridge
        .register_subscription(
            spec("listener@1/stamp", SubscriptionFilter::new(), true),
            Recorder::acking(0, &seen),
        )
        .await
        .unwrap();
    let mut message = event("orderPlaced", json!(1));
    message.id = "chosen".into();
    message.timestamp = 0;

    bridge.emit(message).await.unwrap();
    eventually("the delivery", || seen.lock().len() == 1).await;

    let delivered = seen.lock()[0].envelope.clone();
    assert_ne!(delivered.id, "chosen");
    assert_eq!(delivered.id.len(), 32);
    assert!(delivered.timestamp > 0);
    assert_eq!(delivered.sender.instance_id, bridge.instance_id());
}

#[tokio::test]
async fn named_brokers_share_one_hub() {
    let server = MemoryBroker::named("event-bridge-test-shared").bridge();
    let client = MemoryBroker::named("event-bridge-test-shared").bridge();
    server
        .register_command(echo_address(), Arc::new(Echo))
        .await
        .unwrap();

    let response = client
        .invoke(
            command_to(echo_address(), json!("same hub")),
            Duration::from_secs(2),
        )
        .await
        .unwrap();

    assert_eq!(response.payload, json!("same hub"));
    assert!(!MemoryBroker::named("event-bridge-test-other").same_hub(&server.broker()));
}

#[tokio::test]
async fn health_follows_start_and_shutdown() {
    let bridge = MemoryBroker::new().bridge();
    assert!(!bridge.health().await.is_healthy());
    bridge.start().await.unwrap();
    bridge.start().await.unwrap();
    assert_eq!(bridge.health().await, BridgeHealth::Healthy);

    bridge
        .shutdown(Instant::now() + Duration::from_millis(10))
        .await;

    assert!(!bridge.health().await.is_healthy());
    assert!(matches!(
        bridge.emit(event("orderPlaced", json!(1))).await,
        Err(BridgeError::Unavailable(_))
    ));
}

#[tokio::test]
async fn capabilities_declare_what_process_memory_can_do() {
    let caps = MemoryBroker::new().bridge().capabilities().clone();
    assert_eq!(caps.bridge, "default");
    assert!(caps.commands && caps.streams);
    assert!(caps.shared_subscriptions && caps.broadcast_subscriptions);
    assert!(!caps.durable_subscriptions);
    assert!(caps.manual_ack && caps.bounded_retry && caps.delayed_retry);
    assert!(caps.dead_letter && caps.pause_resume);
}
