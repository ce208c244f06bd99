//! Faults: the KubeMQ double is stopped (every connection cut, new ones refused) and started
//! again mid-run with its store kept, as a real KubeMQ keeps its store on disk.
//!
//! * The double itself: 10 000 events-store events and 2 000 queue messages sent across a
//!   restart are all there afterwards, in order (what the bridge relies on KubeMQ for).
//! * The bridge: invocations during the outage fail with 503 or 504 within their ttl, health
//!   is an error while KubeMQ is down and ok again after, and commands and subscriptions work
//!   again once it is back (their streams are re-established by the bridge).
#![cfg(feature = "double")]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_bridge_kubemq::double::{DoubleOptions, KubemqDouble};
use purista_bridge_kubemq::kubemq::{
    EventStore, EventsStoreSubscription, KubemqClient, QueueMessage,
};
use purista_bridge_kubemq::{KubemqBridge, KubemqConfig};
use purista_core::{
    Address, BridgeHealth, CommandHandler, Delivery, DeliveryHandler, Envelope, EventBridge,
    FailurePolicy, RegistrationKey, SenderAddress, Settlement, StatusCode, SubscriptionFilter,
    SubscriptionSpec,
};
use tokio::time::Instant;

const EVENTS: usize = 10_000;
const JOBS: usize = 2_000;
/// Events through a durable subscription across a restart (see its test for the size).
const DURABLE_EVENTS: u64 = 2_000;

async fn restart(double: &Arc<KubemqDouble>) {
    let d = double.clone();
    tokio::task::spawn_blocking(move || {
        d.stop();
        d.start_again()
    })
    .await
    .unwrap()
    .expect("the double serves again");
}

async fn client(double: &KubemqDouble) -> KubemqClient {
    KubemqClient::builder()
        .host("127.0.0.1")
        .port(double.port())
        .client_id("faults-test")
        .retry_policy(purista_bridge_kubemq::kubemq::RetryPolicy {
            max_retries: 0,
            ..Default::default()
        })
        .build()
        .await
        .expect("client")
}

async fn retrying<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = purista_bridge_kubemq::kubemq::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_keeps_its_events_store_and_queues_across_a_restart() {
    let double = Arc::new(KubemqDouble::start(DoubleOptions::default()).unwrap());
    let sdk = client(&double).await;
    for n in 0..EVENTS {
        if n == EVENTS / 2 {
            restart(&double).await;
        }
        let event = EventStore::builder()
            .channel("faults.store")
            .body(n.to_string().into_bytes())
            .build();
        retrying("storing an event", || sdk.send_event_store(event.clone())).await;
    }
    let messages: Vec<QueueMessage> = (0..JOBS)
        .map(|n| {
            QueueMessage::builder()
                .channel("faults.jobs")
                .body(n.to_string().into_bytes())
                .build()
        })
        .collect();
    let (first, second) = messages.split_at(JOBS / 2);
    retrying("sending jobs", || sdk.send_queue_messages(first.to_vec())).await;
    restart(&double).await;
    retrying("sending jobs", || sdk.send_queue_messages(second.to_vec())).await;
    restart(&double).await;

    assert_eq!(double.stored_events("faults.store"), EVENTS);
    // The SDK's subscribe returns before its stream is open, and a stream that cannot open (the
    // client's connection still coming back from the restart) ends the subscription without a
    // word: subscribe again until the replay begins.
    let replay_by = Instant::now() + Duration::from_secs(30);
    let (_sub, mut rx, first) = loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = retrying("subscribing", || {
            let tx = tx.clone();
            sdk.subscribe_to_events_store(
                "faults.store",
                "",
                EventsStoreSubscription::StartFromFirst,
                move |e| {
                    let _ = tx.send((e.sequence, String::from_utf8_lossy(&e.body).into_owned()));
                    Box::pin(async {})
                },
                None,
            )
        })
        .await;
        let first = tokio::select! {
            got = rx.recv() => got,
            () = sub.done() => None,
            () = tokio::time::sleep(Duration::from_secs(5)) => None,
        };
        match first {
            Some(first) => break (sub, rx, first),
            None if Instant::now() < replay_by => sub.unsubscribe().await,
            None => panic!("the stored events are not replayed within 30 s of subscribing"),
        }
    };
    let mut first = Some(first);
    for expected in 0..EVENTS {
        let (sequence, body) = match first.take() {
            Some(first) => first,
            None => tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("the stored events are replayed")
                .expect("subscription open"),
        };
        assert_eq!(
            (sequence, body),
            (expected as u64 + 1, expected.to_string())
        );
    }
    let mut taken = Vec::new();
    while taken.len() < JOBS {
        let got = retrying("receiving jobs", || {
            sdk.receive_queue_messages("faults.jobs", 1000, 1, false)
        })
        .await;
        assert!(
            !got.is_empty(),
            "jobs lost: {} of {JOBS} received",
            taken.len()
        );
        taken.extend(
            got.into_iter()
                .map(|m| String::from_utf8_lossy(&m.body).into_owned()),
        );
    }
    assert_eq!(taken, (0..JOBS).map(|n| n.to_string()).collect::<Vec<_>>());
}

struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

struct Collect(Mutex<Vec<u64>>);

#[async_trait]
impl DeliveryHandler for Collect {
    async fn deliver(&self, delivery: Delivery) {
        self.0
            .lock()
            .push(delivery.envelope.payload["n"].as_u64().unwrap_or(u64::MAX));
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

fn command(address: &Address, n: u64) -> Envelope {
    Envelope::command(
        SenderAddress::default(),
        address.clone(),
        serde_json::json!(n),
        serde_json::json!({}),
    )
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_fails_fast_while_kubemq_is_down_and_works_again_after() {
    let double = Arc::new(KubemqDouble::start(DoubleOptions::default()).unwrap());
    let config = KubemqConfig::new("127.0.0.1", double.port()).with_prefix("faults");
    let server = KubemqBridge::new(config.clone()).await.unwrap();
    let caller = KubemqBridge::new(config).await.unwrap();
    server.start().await.unwrap();
    caller.start().await.unwrap();
    let address = Address::new("svc", "1", "echo");
    server
        .register_command(address.clone(), Arc::new(Echo))
        .await
        .unwrap();
    let got = Arc::new(Collect(Mutex::new(Vec::new())));
    server
        .register_subscription(
            SubscriptionSpec {
                key: RegistrationKey::new("svc", "1", "watch"),
                subscriber: Address::new("svc", "1", "watch"),
                filter: SubscriptionFilter::new().event_name("tick"),
                shared: true,
                durable: false,
                policy: FailurePolicy::default(),
                prefetch: 1,
            },
            got.clone(),
        )
        .await
        .unwrap();
    let ttl = Duration::from_millis(500);
    assert_eq!(
        caller
            .invoke(command(&address, 1), ttl)
            .await
            .unwrap()
            .payload,
        1
    );

    double.stop();
    assert!(
        matches!(caller.health().await, BridgeHealth::Unhealthy { .. }),
        "health is an error while KubeMQ is down"
    );
    for n in 0..5 {
        let began = Instant::now();
        let err = caller
            .invoke(command(&address, n), ttl)
            .await
            .expect_err("no command succeeds while KubeMQ is down");
        assert!(
            matches!(
                err.status(),
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
            ),
            "{err}"
        );
        assert!(
            began.elapsed() <= ttl + Duration::from_millis(500),
            "{:?}",
            began.elapsed()
        );
    }

    let d = double.clone();
    tokio::task::spawn_blocking(move || d.start_again())
        .await
        .unwrap()
        .unwrap();
    eventually("health ok again", async || {
        caller.health().await.is_healthy()
    })
    .await;
    eventually("the server's streams are back", async || {
        server.health().await.is_healthy()
    })
    .await;
    assert_eq!(
        caller
            .invoke(command(&address, 7), Duration::from_secs(5))
            .await
            .unwrap()
            .payload,
        7
    );
    let mut n = 0;
    eventually("events reach the re-established subscription", async || {
        n += 1;
        let mut tick = Envelope::custom(
            SenderAddress::default(),
            "tick",
            serde_json::json!({ "n": n }),
        );
        tick.sender.service_name = "p".into();
        let _ = caller.emit(tick).await;
        !got.0.lock().is_empty()
    })
    .await;
    server
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
    caller
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
}

/// 2 000 jobs through the queue bridge, with KubeMQ restarted while workers lease and
/// complete them: every job is completed (at least once: a lease cut by the restart comes
/// back), none is lost or dead-lettered, and the queue ends empty.
///
/// A job counts as completed when its worker settled it as complete, whatever the settlement
/// call answered: a restart can cut the answer to an acknowledgement KubeMQ had already
/// applied (the job is done and gone, its worker hears an error). An acknowledgement that
/// was not applied leaves the job to come back and be completed again; one lost by the
/// broker shows as a job nobody completed, or as a queue that does not end empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_jobs_through_the_queue_bridge_survive_a_restart() {
    use purista_core::QueueBridge;
    use purista_core::queue::{JobSettlement, NewJob, QueueConfig, QueueDeclaration};
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};

    const WORKERS: usize = 8;
    let double = Arc::new(KubemqDouble::start(DoubleOptions::default()).unwrap());
    let mut config = KubemqConfig::new("127.0.0.1", double.port()).with_prefix("jobs");
    config.publish_timeout = Duration::from_secs(2);
    let bridge = KubemqBridge::new(config).await.unwrap();
    bridge.start().await.unwrap();
    let queues: Arc<dyn QueueBridge> = Arc::new(bridge.queue_bridge());
    let queue = "restart-jobs";
    let declaration = QueueConfig {
        visibility_timeout: Duration::from_secs(2),
        ..QueueConfig::default()
    };
    queues
        .declare_queue(queue, QueueDeclaration::new("faults@1", declaration))
        .await
        .unwrap();
    let enqueue = |n: usize| {
        let queues = queues.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let job = NewJob {
                    payload: serde_json::json!({ "n": n }),
                    ..NewJob::default()
                };
                match queues.enqueue(queue, job).await {
                    Ok(_) => return,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("job {n} could not be enqueued 30 s after the restart: {e}"),
                }
            }
        }
    };
    for n in 0..JOBS / 2 {
        enqueue(n).await;
    }
    let done: Arc<Mutex<Vec<usize>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (queues, done, stop) = (queues.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    match queues.lease(queue, Duration::from_millis(200)).await {
                        Ok(Some(job)) => {
                            let n = job.payload["n"].as_u64().expect("a job number") as usize;
                            done.lock().push(n);
                            let _ = queues.settle(&job, JobSettlement::Complete).await;
                        }
                        Ok(None) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        })
        .collect();
    eventually(
        "a quarter of the jobs are done before the restart",
        async || done.lock().len() >= JOBS / 4,
    )
    .await;
    restart(&double).await;
    for n in JOBS / 2..JOBS {
        enqueue(n).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let distinct: BTreeSet<usize> = done.lock().iter().copied().collect();
        if distinct.len() == JOBS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {JOBS} jobs were completed 60 s after the restart; e.g. missing {:?}",
            distinct.len(),
            (0..JOBS)
                .filter(|n| !distinct.contains(n))
                .take(5)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Jobs whose acknowledgement the restart cut before KubeMQ applied it come back: the
    // workers complete them again, and KubeMQ ends with nothing of the queue.
    let channel = bridge.channels().queue(queue);
    eventually("the queue is empty once every job is done", async || {
        let held = double.queue_depth(&channel);
        (held.ready, held.delayed, held.held) == (0, 0, 0)
            && queues
                .metrics(queue)
                .await
                .is_ok_and(|m| m.depth == 0 && m.leased == 0 && m.delayed == 0)
    })
    .await;
    stop.store(true, Ordering::Release);
    for w in workers {
        w.await.expect("a worker panicked");
    }
    let metrics = queues.metrics(queue).await.unwrap();
    assert_eq!(
        metrics.dead_lettered, 0,
        "jobs were dead-lettered: {metrics:?}"
    );

    queues.shutdown().await;
    bridge
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
}

/// Counts what a durable consumer instance handled, by `n`.
struct Tally(Mutex<Vec<u64>>);

#[async_trait]
impl DeliveryHandler for Tally {
    async fn deliver(&self, delivery: Delivery) {
        self.0
            .lock()
            .push(delivery.envelope.payload["n"].as_u64().unwrap_or(u64::MAX));
        let _ = delivery.settle.settle(Settlement::Ack).await;
    }
}

/// Events published to a durable subscription with two competing instances, KubeMQ restarted
/// halfway: every event is handled (at least once: a lease cut by the restart comes back, and
/// a publish that failed during the outage is retried), by one of the two instances.
///
/// [`DURABLE_EVENTS`] events: each is an Events publish plus a queue send, and a lease, a
/// hand-over and an acknowledgement on the consumer side; this many take a few seconds on a
/// loaded 2-core machine, and the restart falls in the middle of a steady flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_subscription_events_survive_a_restart() {
    use std::collections::BTreeSet;
    let double = Arc::new(KubemqDouble::start(DoubleOptions::default()).unwrap());
    let config = KubemqConfig::new("127.0.0.1", double.port()).with_prefix("faults-durable");
    let publisher = KubemqBridge::new(config.clone()).await.unwrap();
    let first = KubemqBridge::new(config.clone()).await.unwrap();
    let second = KubemqBridge::new(config).await.unwrap();
    for bridge in [&publisher, &first, &second] {
        bridge.start().await.unwrap();
    }
    let spec = || SubscriptionSpec {
        key: RegistrationKey::new("svc", "1", "durable"),
        subscriber: Address::new("svc", "1", "durable"),
        filter: SubscriptionFilter::new().event_name("tick"),
        shared: true,
        durable: true,
        policy: FailurePolicy::default(),
        prefetch: 16,
    };
    let tallies = [
        Arc::new(Tally(Mutex::new(Vec::new()))),
        Arc::new(Tally(Mutex::new(Vec::new()))),
    ];
    first
        .register_subscription(spec(), tallies[0].clone())
        .await
        .unwrap();
    second
        .register_subscription(spec(), tallies[1].clone())
        .await
        .unwrap();

    let began = Instant::now();
    for n in 0..DURABLE_EVENTS {
        if n == DURABLE_EVENTS / 2 {
            restart(&double).await;
        }
        let mut tick = Envelope::custom(
            SenderAddress::default(),
            "tick",
            serde_json::json!({ "n": n }),
        );
        tick.sender.service_name = "p".into();
        let deadline = Instant::now() + Duration::from_secs(15);
        // Like a real publisher: retried until KubeMQ took it.
        while let Err(e) = publisher.emit(tick.clone()).await {
            assert!(Instant::now() < deadline, "publishing still fails: {e}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let distinct = || {
        tallies
            .iter()
            .flat_map(|t| t.0.lock().clone())
            .collect::<BTreeSet<u64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while distinct().len() < DURABLE_EVENTS as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = distinct();
    let missing: Vec<u64> = (0..DURABLE_EVENTS).filter(|n| !got.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{} of {DURABLE_EVENTS} events lost across the restart, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        got.iter().all(|n| *n < DURABLE_EVENTS),
        "an event arrived that was not published"
    );
    let handled: Vec<usize> = tallies.iter().map(|t| t.0.lock().len()).collect();
    assert!(
        handled.iter().all(|h| *h > 0),
        "both instances of the shared durable subscription take deliveries: {handled:?}"
    );
    eprintln!(
        "{DURABLE_EVENTS} durable events across a restart in {:?}: handled {handled:?} (duplicates: {})",
        began.elapsed(),
        handled.iter().sum::<usize>() - DURABLE_EVENTS as usize
    );
    for bridge in [&publisher, &first, &second] {
        bridge
            .shutdown(Instant::now() + Duration::from_secs(2))
            .await;
    }
}
