//! Stream sessions on RabbitMQ beyond the generic conformance cases: fail-fast when nobody
//! serves a stream, competing producers, cancel, a reader that falls behind, and sessions
//! dying with the opener's connection.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use purista_bridge_amqp::{AmqpBridge, STREAM_FRAME_BUFFER};
use purista_core::stream::{FrameType, StreamWriteError, frame};
use purista_core::{
    Address, BridgeError, Envelope, EventBridge, SenderAddress, StatusCode, StreamHandler,
    StreamItem, StreamProducerEnd, StreamReader, StreamWriter, ids,
};
use serde_json::{Value, json};

use common::{close_connection_of, eventually};

common::runner::test_main! {
    common::BROKER: [
        a_stream_nobody_serves_fails_with_502_at_once,
        instances_serving_one_stream_share_its_sessions_and_each_completes_in_order,
        a_consumer_cancel_reaches_the_producer_and_it_stops,
        a_reader_that_falls_behind_fails_its_session_and_the_producer_is_cancelled,
        a_producer_that_leaves_without_a_terminal_frame_fails_the_session_at_once,
        shutdown_lets_a_running_session_finish_before_the_deadline,
        shutdown_reports_a_session_still_running_at_the_deadline_and_ends_it_for_the_opener,
        no_stream_frame_reaches_a_subscription_queue,
    ],
    common::BROKER_AND_RABBITMQCTL: [
        losing_the_openers_connection_ends_its_session_at_once_and_cancels_the_producer,
        losing_the_producers_connection_cancels_its_session_and_the_opener_learns_it_at_once,
    ],
}

/// How long any single wait in these tests may take.
const WITHIN: Duration = Duration::from_secs(5);

/// An open frame from `opener` to `to` with `payload`.
fn open_frame(to: &Address, payload: Value) -> (Envelope, String) {
    let correlation_id = ids::new_id();
    let sender = SenderAddress {
        service_name: "reader".into(),
        service_version: "1".into(),
        service_target: "read".into(),
        instance_id: String::new(),
    };
    let mut open = frame(
        sender,
        &correlation_id,
        FrameType::Open,
        0,
        Some(("payload", payload)),
    );
    open.receiver = Some(to.clone());
    (open, correlation_id)
}

/// Opens a session from `opener` to `to`, ending at the latest after `timeout`.
async fn open(
    opener: &AmqpBridge,
    to: &Address,
    payload: Value,
    timeout: Duration,
) -> StreamReader {
    let (open, correlation_id) = open_frame(to, payload);
    let end = opener.open_stream(open).await.expect("the stream opens");
    StreamReader::new(end, correlation_id, tokio::time::Instant::now() + timeout)
}

/// A producer instance serving an endless ticker at `ticker.1.<target>`, an opener instance, and
/// a session from the opener (ending at the latest after `timeout`) whose first chunk arrived.
async fn endless_session(
    broker: &common::TestBroker,
    target: &str,
    timeout: Duration,
) -> (Arc<AmqpBridge>, Arc<AmqpBridge>, Arc<Endless>, StreamReader) {
    let producer = broker.bridge().await;
    let opener = broker.bridge().await;
    let endless = Arc::new(Endless::default());
    let feed = Address::new("ticker", "1", target);
    producer
        .register_stream(feed.clone(), endless.clone())
        .await
        .expect("the stream registers");
    let mut reader = open(&opener, &feed, json!(null), timeout).await;
    let first = tokio::time::timeout(WITHIN, reader.next())
        .await
        .expect("in time");
    assert_eq!(first, Some(StreamItem::Chunk(json!(0))));
    (producer, opener, endless, reader)
}

/// Reads until the terminal item, each read bounded; returns the chunks and the terminal.
async fn read_all(reader: &mut StreamReader) -> (Vec<Value>, StreamItem) {
    let mut chunks = Vec::new();
    loop {
        let item = tokio::time::timeout(WITHIN, reader.next())
            .await
            .expect("the next stream item in time");
        match item {
            Some(StreamItem::Chunk(c)) => chunks.push(c),
            Some(terminal) => return (chunks, terminal),
            None => panic!("the session ended without a terminal item"),
        }
    }
}

fn writer_for(open: &Envelope, end: StreamProducerEnd, instance: &str) -> StreamWriter {
    let mut sender = SenderAddress::from(open.receiver.as_ref().expect("a receiver"));
    sender.instance_id = instance.to_string();
    StreamWriter::new(end, open, sender)
}

/// Writes `payload` (a count) chunks `0..n`, then completes; records which instance served.
struct Counter {
    instance: String,
    served: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl StreamHandler for Counter {
    async fn open(&self, open: Arc<Envelope>, end: StreamProducerEnd) {
        self.served.lock().push(self.instance.clone());
        let out = writer_for(&open, end, &self.instance);
        let n = open.payload["payload"].as_u64().unwrap_or(0);
        let _ = out.start().await;
        for i in 0..n {
            if out.write(i).await.is_err() {
                return;
            }
        }
        let _ = out.complete(Some(json!(n))).await;
    }
}

/// Writes a chunk every few ms until the consumer cancels (or a write fails); records the
/// reason and that it stopped, and ends the session as cancelled like core's runtime does.
#[derive(Default)]
struct Endless {
    reasons: Mutex<Vec<String>>,
    stopped: Mutex<bool>,
}

#[async_trait]
impl StreamHandler for Endless {
    async fn open(&self, open: Arc<Envelope>, end: StreamProducerEnd) {
        let out = writer_for(&open, end, "endless");
        let mut i = 0u64;
        let reason = loop {
            tokio::select! {
                reason = out.on_cancel() => break reason,
                () = tokio::time::sleep(Duration::from_millis(5)) => {
                    if let Err(StreamWriteError::Cancelled(r)) = out.write(i).await {
                        break r;
                    }
                    i += 1;
                }
            }
        };
        self.reasons.lock().push(reason.clone());
        let _ = out.cancel(reason).await;
        *self.stopped.lock() = true;
    }
}

impl Endless {
    fn reasons(&self) -> Vec<String> {
        self.reasons.lock().clone()
    }

    fn stopped(&self) -> bool {
        *self.stopped.lock()
    }
}

async fn a_stream_nobody_serves_fails_with_502_at_once() {
    let broker = common::TestBroker::new("stream502");
    let opener = broker.bridge().await;
    let (open, _) = open_frame(&Address::new("nobody", "1", "feed"), json!(1));
    let started = Instant::now();
    let err = opener
        .open_stream(open)
        .await
        .err()
        .expect("no session without a producer");
    assert!(matches!(err, BridgeError::NoHandler(_)), "{err:?}");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed at once, not at a timeout"
    );
    assert_eq!(opener.in_flight().by_kind.stream, 0, "nothing left pending");
    broker.finish().await;
}

async fn instances_serving_one_stream_share_its_sessions_and_each_completes_in_order() {
    let broker = common::TestBroker::new("streamshare");
    let feed = Address::new("feed", "1", "count");
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut producers = Vec::new();
    for instance in ["a", "b"] {
        let bridge = broker.bridge().await;
        bridge
            .register_stream(
                feed.clone(),
                Arc::new(Counter {
                    instance: instance.into(),
                    served: served.clone(),
                }),
            )
            .await
            .expect("the stream registers");
        producers.push(bridge);
    }
    let opener = broker.bridge().await;
    let sessions = (0..16).map(|_| {
        let opener = opener.clone();
        let feed = feed.clone();
        async move {
            let mut reader = open(&opener, &feed, json!(50), WITHIN).await;
            read_all(&mut reader).await
        }
    });
    for (chunks, terminal) in futures::future::join_all(sessions).await {
        let expected: Vec<Value> = (0..50).map(|i| json!(i)).collect();
        assert_eq!(chunks, expected, "chunks lost, duplicated or out of order");
        assert_eq!(terminal, StreamItem::Complete(Some(json!(50))));
    }
    let served = served.lock().clone();
    assert_eq!(served.len(), 16, "each session served exactly once");
    for instance in ["a", "b"] {
        assert!(
            served.iter().any(|s| s == instance),
            "instance {instance} served no session: {served:?}"
        );
    }
    assert!(
        eventually(WITHIN, || opener.in_flight().by_kind.stream == 0).await,
        "every session ended"
    );
    broker.finish().await;
}

async fn a_consumer_cancel_reaches_the_producer_and_it_stops() {
    let broker = common::TestBroker::new("streamcancel");
    let producer = broker.bridge().await;
    let opener = broker.bridge().await;
    let endless = Arc::new(Endless::default());
    let feed = Address::new("ticker", "1", "ticks");
    producer
        .register_stream(feed.clone(), endless.clone())
        .await
        .expect("the stream registers");
    let mut reader = open(&opener, &feed, json!(null), WITHIN).await;
    for expected in 0..3u64 {
        let item = tokio::time::timeout(WITHIN, reader.next())
            .await
            .expect("in time");
        assert_eq!(item, Some(StreamItem::Chunk(json!(expected))));
    }
    reader.cancel("enough");
    let (_, terminal) = read_all(&mut reader).await;
    assert_eq!(terminal, StreamItem::Cancelled("enough".into()));
    assert!(
        eventually(WITHIN, || endless.stopped()).await,
        "the producer stopped"
    );
    assert_eq!(endless.reasons(), vec!["enough".to_string()]);
    broker.finish().await;
}

/// Writes `payload` chunks as fast as it may; records why a write was refused, if one was.
#[derive(Default)]
struct Flood {
    refused: Mutex<Option<String>>,
}

#[async_trait]
impl StreamHandler for Flood {
    async fn open(&self, open: Arc<Envelope>, end: StreamProducerEnd) {
        let out = writer_for(&open, end, "flood");
        let n = open.payload["payload"].as_u64().unwrap_or(0);
        for i in 0..n {
            if let Err(StreamWriteError::Cancelled(reason)) = out.write(i).await {
                *self.refused.lock() = Some(reason.clone());
                let _ = out.cancel(reason).await;
                return;
            }
        }
        let _ = out.complete(None).await;
    }
}

async fn a_reader_that_falls_behind_fails_its_session_and_the_producer_is_cancelled() {
    let broker = common::TestBroker::new("streamslow");
    let producer = broker.bridge().await;
    let opener = broker.bridge().await;
    let feed = Address::new("flood", "1", "all");
    let flood = Arc::new(Flood::default());
    producer
        .register_stream(feed.clone(), flood.clone())
        .await
        .expect("the stream registers");
    // Far more than the buffer, and nobody reads until the producer was stopped.
    let total = STREAM_FRAME_BUFFER as u64 * 4;
    let mut reader = open(&opener, &feed, json!(total), WITHIN).await;
    assert!(
        eventually(WITHIN, || flood.refused.lock().is_some()).await,
        "the producer was cancelled"
    );
    assert_eq!(
        flood.refused.lock().as_deref(),
        Some("stream consumer fell behind")
    );
    let (chunks, terminal) = read_all(&mut reader).await;
    assert!(chunks.len() < total as usize, "not everything was buffered");
    let expected: Vec<Value> = (0..chunks.len()).map(|i| json!(i)).collect();
    assert_eq!(chunks, expected, "what was buffered came in order");
    match terminal {
        StreamItem::Error(e) => {
            assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE, "{e}");
            assert!(e.message.contains("fell behind"), "{e}");
        }
        other => panic!("the session ended with {other:?}"),
    }
    broker.finish().await;
}

/// A producer that drops its end without writing a terminal frame.
struct Quitter;

#[async_trait]
impl StreamHandler for Quitter {
    async fn open(&self, open: Arc<Envelope>, end: StreamProducerEnd) {
        let out = writer_for(&open, end, "quitter");
        let _ = out.write("only").await;
    }
}

async fn a_producer_that_leaves_without_a_terminal_frame_fails_the_session_at_once() {
    let broker = common::TestBroker::new("streamquit");
    let producer = broker.bridge().await;
    let opener = broker.bridge().await;
    let feed = Address::new("quitter", "1", "once");
    producer
        .register_stream(feed.clone(), Arc::new(Quitter))
        .await
        .expect("the stream registers");
    let mut reader = open(&opener, &feed, json!(null), Duration::from_secs(30)).await;
    let started = Instant::now();
    let (chunks, terminal) = read_all(&mut reader).await;
    assert_eq!(chunks, vec![json!("only")]);
    assert!(
        matches!(&terminal, StreamItem::Error(e) if e.status == StatusCode::SERVICE_UNAVAILABLE),
        "{terminal:?}"
    );
    assert!(started.elapsed() < WITHIN, "not at the session timeout");
    broker.finish().await;
}

async fn losing_the_openers_connection_ends_its_session_at_once_and_cancels_the_producer() {
    let broker = common::TestBroker::new("streamlost");
    let (_producer, opener, endless, mut reader) =
        endless_session(&broker, "forever", Duration::from_secs(30)).await;

    close_connection_of(&opener).expect("connection closed by the broker");
    // rabbitmqctl itself takes a second or two; the clock starts once the broker closed it.
    let closed_at = Instant::now();
    let (_, terminal) = read_all(&mut reader).await;
    match &terminal {
        StreamItem::Error(e) => assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE, "{e}"),
        other => panic!("the session ended with {other:?}"),
    }
    assert!(
        closed_at.elapsed() < Duration::from_secs(2),
        "ended at once, not at the 30 s session timeout"
    );
    assert!(
        eventually(WITHIN, || endless.stopped()).await,
        "the producer was cancelled"
    );
    assert_eq!(endless.reasons().len(), 1, "{:?}", endless.reasons());
    assert!(
        eventually(WITHIN, || opener.in_flight().by_kind.stream == 0).await,
        "the opener counts no session any more"
    );
    broker.finish().await;
}

/// Writes `payload` chunks slowly, then completes.
struct Slow;

#[async_trait]
impl StreamHandler for Slow {
    async fn open(&self, open: Arc<Envelope>, end: StreamProducerEnd) {
        let out = writer_for(&open, end, "slow");
        let n = open.payload["payload"].as_u64().unwrap_or(0);
        for i in 0..n {
            tokio::time::sleep(Duration::from_millis(40)).await;
            if out.write(i).await.is_err() {
                return;
            }
        }
        let _ = out.complete(None).await;
    }
}

async fn shutdown_lets_a_running_session_finish_before_the_deadline() {
    let broker = common::TestBroker::new("streamdrain");
    let producer = broker.bridge().await;
    let opener = broker.bridge().await;
    let feed = Address::new("slow", "1", "drip");
    producer
        .register_stream(feed.clone(), Arc::new(Slow))
        .await
        .expect("the stream registers");
    let mut reader = open(&opener, &feed, json!(8), WITHIN).await;
    let first = tokio::time::timeout(WITHIN, reader.next())
        .await
        .expect("in time");
    assert_eq!(first, Some(StreamItem::Chunk(json!(0))));
    let report = producer
        .shutdown(tokio::time::Instant::now() + WITHIN)
        .await;
    let (chunks, terminal) = read_all(&mut reader).await;
    assert_eq!(chunks, (1..8).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(terminal, StreamItem::Complete(None));
    assert!(report.completed, "{report:?}");
    broker.finish().await;
}

/// Writes one chunk, then never ends and ignores cancels.
struct Stubborn;

#[async_trait]
impl StreamHandler for Stubborn {
    async fn open(&self, open: Arc<Envelope>, end: StreamProducerEnd) {
        let out = writer_for(&open, end, "stubborn");
        let _ = out.write("hello").await;
        std::future::pending::<()>().await;
    }
}

async fn shutdown_reports_a_session_still_running_at_the_deadline_and_ends_it_for_the_opener() {
    let broker = common::TestBroker::new("streamabandon");
    let producer = broker.bridge().await;
    let opener = broker.bridge().await;
    let feed = Address::new("stubborn", "1", "hang");
    producer
        .register_stream(feed.clone(), Arc::new(Stubborn))
        .await
        .expect("the stream registers");
    let mut reader = open(&opener, &feed, json!(null), Duration::from_secs(30)).await;
    let first = tokio::time::timeout(WITHIN, reader.next())
        .await
        .expect("in time");
    assert_eq!(first, Some(StreamItem::Chunk(json!("hello"))));
    let report = producer
        .shutdown(tokio::time::Instant::now() + Duration::from_millis(300))
        .await;
    assert!(!report.completed);
    assert!(
        report
            .still_running
            .contains(&(purista_core::WorkKind::Stream, feed.to_string())),
        "{report:?}"
    );
    let started = Instant::now();
    let (_, terminal) = read_all(&mut reader).await;
    assert!(
        matches!(&terminal, StreamItem::Error(e) if e.status == StatusCode::SERVICE_UNAVAILABLE),
        "{terminal:?}"
    );
    assert!(
        started.elapsed() < WITHIN,
        "not at the 30 s session timeout"
    );
    let (again, _) = open_frame(&feed, json!(null));
    let err = opener
        .open_stream(again)
        .await
        .err()
        .expect("nobody serves it any more");
    assert!(matches!(err, BridgeError::NoHandler(_)), "{err:?}");
    broker.finish().await;
}

async fn losing_the_producers_connection_cancels_its_session_and_the_opener_learns_it_at_once() {
    let broker = common::TestBroker::new("streamprodlost");
    let (producer, _opener, endless, mut reader) =
        endless_session(&broker, "fragile", Duration::from_secs(30)).await;

    close_connection_of(&producer).expect("connection closed by the broker");
    let closed_at = Instant::now();
    assert!(
        eventually(WITHIN, || endless.stopped()).await,
        "the producer was cancelled"
    );
    assert_eq!(
        endless.reasons(),
        vec!["connection to the broker lost".to_string()]
    );
    let (_, terminal) = read_all(&mut reader).await;
    assert_eq!(
        terminal,
        StreamItem::Cancelled("connection to the broker lost".into())
    );
    assert!(
        closed_at.elapsed() < WITHIN,
        "ended once reconnected, not at the 30 s session timeout"
    );
    broker.finish().await;
}

async fn no_stream_frame_reaches_a_subscription_queue() {
    let broker = common::TestBroker::new("streamnosub");
    let producer = broker.bridge().await;
    let opener = broker.bridge().await;
    // A durable catch-all subscription without a consumer: whatever is routed to it stays.
    let mut everything = common::spec("everything", purista_core::SubscriptionFilter::new());
    everything.durable = true;
    let queue = producer.topology().subscription_queue(&everything).unwrap();
    producer
        .register_subscription(everything.clone(), common::Recorder::acking(&everything))
        .await
        .expect("the subscription registers");
    producer
        .unregister_subscription(&everything.key)
        .await
        .expect("the subscription unregisters");
    let feed = Address::new("feed", "1", "private");
    let served = Arc::new(Mutex::new(Vec::new()));
    producer
        .register_stream(
            feed.clone(),
            Arc::new(Counter {
                instance: "p".into(),
                served,
            }),
        )
        .await
        .expect("the stream registers");
    let mut reader = open(&opener, &feed, json!(5), WITHIN).await;
    let (chunks, terminal) = read_all(&mut reader).await;
    assert_eq!(chunks.len(), 5);
    assert_eq!(terminal, StreamItem::Complete(Some(json!(5))));
    assert_eq!(
        broker.ready_messages(&queue).await,
        Some(0),
        "a frame was routed to it"
    );
    // The queue does take everything else.
    let sender = SenderAddress {
        service_name: "feed".into(),
        service_version: "1".into(),
        service_target: "note".into(),
        instance_id: String::new(),
    };
    opener
        .emit(Envelope::custom(sender, "noted", json!(1)))
        .await
        .expect("emitted");
    let deadline = Instant::now() + WITHIN;
    while broker.ready_messages(&queue).await != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the event never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.finish().await;
}
