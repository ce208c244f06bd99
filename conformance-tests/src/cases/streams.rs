//! Streams (DESIGN §3.5): ordered chunks, exactly one terminal frame, cancel, session timeout.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_core::stream::{FrameType, StreamWriteError, frame};
use purista_core::{
    Address, Context, Empty, Envelope, HandledError, RunningService, SenderAddress, Service,
    StatusCode, StreamDef, StreamHandler, StreamItem, StreamProducerEnd, StreamReader,
    StreamWriter,
};
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{ARRIVAL, Collector, Stopwatch, eventually};

/// A producer service with `streams` on instance 1 and a consumer service on instance 0.
async fn producer_and_consumer(
    env: &mut TestEnv,
    streams: Vec<StreamDef>,
) -> (Arc<RunningService>, Arc<RunningService>) {
    let mut producer = Service::builder(env.name("producer"), "1");
    for s in streams {
        producer = producer.stream(s);
    }
    let producer = env.start(1, producer).await;
    let consumer = env
        .start(0, Service::builder(env.name("consumer"), "1"))
        .await;
    (producer, consumer)
}

fn addr(env: &TestEnv, stream: &str) -> Address {
    Address::new(env.name("producer"), "1", stream)
}

async fn open(
    consumer: &RunningService,
    to: Address,
    payload: Value,
    timeout: Duration,
) -> StreamReader {
    consumer
        .open_stream(to, payload, Empty, Some(timeout))
        .await
        .unwrap_or_else(|e| panic!("opening a stream session failed: {e}"))
}

/// Reads until the terminal item; returns the chunks and the terminal.
async fn read_all(reader: &mut StreamReader) -> (Vec<Value>, StreamItem) {
    let mut chunks = Vec::new();
    loop {
        match reader.next().await {
            Some(StreamItem::Chunk(c)) => chunks.push(c),
            Some(terminal) => return (chunks, terminal),
            None => panic!("the session ended without a terminal item"),
        }
    }
}

/// After the producer's handlers finished, one more session to it, read to its end: frames of
/// an earlier session sent after its terminal travel the same path before this one's, so
/// they have been delivered (and counted as ignored) once it is over.
async fn sentinel_session(
    producer: &RunningService,
    consumer: &RunningService,
    to: Address,
    payload: Value,
) {
    eventually("the producer's stream handlers finish", ARRIVAL, || {
        let n = producer.in_flight().by_kind.stream;
        async move { n == 0 }
    })
    .await;
    let mut reader = open(consumer, to, payload, ARRIVAL).await;
    let _ = read_all(&mut reader).await;
}

/// Chunks arrive in the order they were written, then the final value.
pub async fn chunks_arrive_in_order(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let count = StreamDef::new(
        "count",
        |_ctx: Context, to: u64, _p: Empty, out: StreamWriter| async move {
            for i in 0..to {
                out.write(json!({ "i": i })).await?;
            }
            Ok(json!({ "total": to }))
        },
    );
    let (_, consumer) = producer_and_consumer(&mut env, vec![count]).await;
    let mut reader = open(&consumer, addr(&env, "count"), json!(200), ARRIVAL).await;
    let (chunks, terminal) = read_all(&mut reader).await;
    let expected: Vec<Value> = (0..200).map(|i| json!({ "i": i })).collect();
    assert_eq!(
        chunks, expected,
        "chunks arrived out of order, lost or duplicated"
    );
    assert_eq!(
        terminal,
        StreamItem::Complete(Some(json!({ "total": 200 }))),
        "the session did not complete with the final value"
    );
    env.finish().await;
}

/// Every way a producer ends (return, handled error, unhandled error, panic) yields exactly one
/// terminal item; nothing follows it.
pub async fn exactly_one_terminal_frame(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let ends = StreamDef::new(
        "ends",
        |_ctx: Context, how: String, _p: Empty, out: StreamWriter| async move {
            out.write(1).await?;
            match how.as_str() {
                "complete" => Ok(json!("done")),
                "handled" => Err(HandledError::new(StatusCode::CONFLICT, "no more").into()),
                "unhandled" => Err(anyhow::anyhow!("internal detail hunter2")),
                _ => panic!("producer panicked"),
            }
        },
    );
    let (producer, consumer) = producer_and_consumer(&mut env, vec![ends]).await;
    let mut readers = Vec::new();
    for how in ["complete", "handled", "unhandled", "panic"] {
        let mut reader = open(&consumer, addr(&env, "ends"), json!(how), ARRIVAL).await;
        let (chunks, terminal) = read_all(&mut reader).await;
        assert_eq!(chunks, vec![json!(1)], "`{how}`: chunks lost");
        match (how, &terminal) {
            ("complete", StreamItem::Complete(Some(v))) => assert_eq!(v, &json!("done")),
            ("handled", StreamItem::Error(e)) => {
                assert_eq!(
                    (e.status, e.message.as_str()),
                    (StatusCode::CONFLICT, "no more")
                );
            }
            ("unhandled" | "panic", StreamItem::Error(e)) => {
                assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR, "`{how}`: {e}");
                assert_eq!(
                    e.message,
                    StatusCode::INTERNAL_SERVER_ERROR.generic_text(),
                    "`{how}`: an unhandled stream error leaked its text"
                );
            }
            _ => panic!("`{how}` ended the session with {terminal:?}"),
        }
        assert_eq!(
            reader.next().await,
            None,
            "`{how}`: an item after the terminal"
        );
        readers.push((how, reader));
    }
    sentinel_session(&producer, &consumer, addr(&env, "ends"), json!("complete")).await;
    for (how, reader) in &mut readers {
        assert_eq!(
            reader.ignored_frames(),
            0,
            "`{how}`: the producer side sent frames after its terminal frame"
        );
    }
    env.finish().await;
}

/// A producer that speaks frames itself and keeps talking after its terminal frame.
struct Chatterbox;

#[async_trait]
impl StreamHandler for Chatterbox {
    async fn open(&self, open: Arc<Envelope>, producer: StreamProducerEnd) {
        let correlation = open.correlation_id.clone().unwrap_or_default();
        let sender = SenderAddress {
            instance_id: "chatterbox".into(),
            ..SenderAddress::from(
                open.receiver
                    .as_ref()
                    .expect("an open frame has a receiver"),
            )
        };
        let frames = [
            (FrameType::Start, None),
            (FrameType::Chunk, Some(("chunk", json!(1)))),
            (
                FrameType::Complete,
                Some(("final", json!("first terminal"))),
            ),
            (FrameType::Chunk, Some(("chunk", json!(2)))),
            (
                FrameType::Error,
                Some(("error", json!({"status": 500, "message": "late"}))),
            ),
            (FrameType::Cancel, Some(("reason", json!("late cancel")))),
        ];
        for (seq, (kind, body)) in frames.into_iter().enumerate() {
            let f = frame(sender.clone(), &correlation, kind, seq as u64, body);
            if producer.frames.send(f).await.is_err() {
                return;
            }
        }
    }
}

/// Frames after the terminal frame are ignored by the consumer, and a producer cannot write
/// after its terminal frame.
pub async fn frames_after_the_terminal_are_ignored(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let write_after: Arc<Collector<Result<(), StreamWriteError>>> = Collector::new();
    let sink = write_after.clone();
    let closes = StreamDef::new(
        "closes",
        move |_ctx: Context, _i: Empty, _p: Empty, out: StreamWriter| {
            let sink = sink.clone();
            async move {
                out.complete(Some(json!("closed by hand"))).await?;
                sink.push(out.write(2).await);
                Ok(json!("returned after close"))
            }
        },
    );
    let (producer, consumer) = producer_and_consumer(&mut env, vec![closes]).await;

    // Through the writer: the write after the terminal fails, no second terminal is sent.
    let mut reader = open(&consumer, addr(&env, "closes"), json!({}), ARRIVAL).await;
    let (_, terminal) = read_all(&mut reader).await;
    assert_eq!(
        terminal,
        StreamItem::Complete(Some(json!("closed by hand")))
    );
    let writes = write_after
        .wait_for_len(1, ARRIVAL, "the write after close")
        .await;
    assert_eq!(
        writes[0],
        Err(StreamWriteError::Closed),
        "a producer could write after its terminal frame"
    );
    assert_eq!(reader.next().await, None);
    sentinel_session(&producer, &consumer, addr(&env, "closes"), json!({})).await;
    assert_eq!(
        reader.ignored_frames(),
        0,
        "a second terminal frame was sent"
    );

    // Through a producer that ignores the rules: the consumer ignores what follows.
    let chatty = Address::new(env.name("chatty"), "1", "talk");
    env.bridge(1)
        .register_stream(chatty.clone(), Arc::new(Chatterbox))
        .await
        .expect("registering a stream handler succeeds");
    let mut reader = open(&consumer, chatty, json!({}), ARRIVAL).await;
    let (chunks, terminal) = read_all(&mut reader).await;
    assert_eq!(chunks, vec![json!(1)]);
    assert_eq!(
        terminal,
        StreamItem::Complete(Some(json!("first terminal")))
    );
    assert_eq!(reader.next().await, None, "an item after the terminal");
    eventually(
        "the 3 frames after the terminal are delivered to be ignored",
        ARRIVAL,
        || {
            let n = reader.ignored_frames();
            async move { n >= 3 }
        },
    )
    .await;
    assert_eq!(reader.next().await, None, "an item after the terminal");
    env.finish().await;
}

/// A consumer's cancel reaches the producer and the session ends in `cancel`.
pub async fn consumer_cancel_reaches_the_producer(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let saw_cancel: Arc<Collector<String>> = Collector::new();
    let sink = saw_cancel.clone();
    let endless = StreamDef::new(
        "endless",
        move |_ctx: Context, _i: Empty, _p: Empty, out: StreamWriter| {
            let sink = sink.clone();
            async move {
                let mut i = 0u64;
                let reason = loop {
                    tokio::select! {
                        reason = out.on_cancel() => break reason,
                        _ = tokio::time::sleep(Duration::from_millis(5)) => {
                            if let Err(StreamWriteError::Cancelled(r)) = out.write(i).await {
                                break r;
                            }
                            i += 1;
                        }
                    }
                };
                sink.push(reason);
                Ok(())
            }
        },
    );
    let (producer, consumer) = producer_and_consumer(&mut env, vec![endless]).await;
    let mut reader = open(&consumer, addr(&env, "endless"), json!({}), ARRIVAL).await;
    for expected in 0..3u64 {
        match reader.next().await {
            Some(StreamItem::Chunk(c)) => assert_eq!(c, json!(expected)),
            other => panic!("expected chunk {expected}, got {other:?}"),
        }
    }
    let reason = format!("{} enough", env.prefix);
    reader.cancel(reason.clone());
    let (_, terminal) = read_all(&mut reader).await;
    assert_eq!(
        terminal,
        StreamItem::Cancelled(reason.clone()),
        "the session did not end in cancel"
    );
    let seen = saw_cancel
        .wait_for_len(1, ARRIVAL, "the producer seeing the consumer's cancel")
        .await;
    assert_eq!(seen[0], reason, "the producer saw another cancel reason");
    eventually("the producer's stream work ends", ARRIVAL, || {
        let n = producer.in_flight().by_kind.stream;
        async move { n == 0 }
    })
    .await;
    env.finish().await;
}

/// A session that outlives its timeout ends with `TimedOut` at the timeout; the producer is told.
pub async fn session_timeout_ends_the_session(h: Arc<dyn Harness>) {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let mut env = TestEnv::new(&h, 2).await;
    let saw_cancel: Arc<Collector<String>> = Collector::new();
    let sink = saw_cancel.clone();
    let stalls = StreamDef::new(
        "stalls",
        move |_ctx: Context, _i: Empty, _p: Empty, out: StreamWriter| {
            let sink = sink.clone();
            async move {
                out.write("only chunk").await?;
                let reason = tokio::time::timeout(ARRIVAL, out.on_cancel()).await;
                sink.push(reason.unwrap_or_else(|_| "never cancelled".into()));
                Ok(())
            }
        },
    );
    let (producer, consumer) = producer_and_consumer(&mut env, vec![stalls]).await;
    let clock = Stopwatch::start();
    let mut reader = open(&consumer, addr(&env, "stalls"), json!({}), TIMEOUT).await;
    let (chunks, terminal) = read_all(&mut reader).await;
    clock.assert_on_time("the session timeout", TIMEOUT);
    assert_eq!(chunks, vec![json!("only chunk")]);
    assert_eq!(
        terminal,
        StreamItem::TimedOut,
        "the session did not time out"
    );
    assert_eq!(reader.next().await, None, "an item after the timeout");
    let seen = saw_cancel
        .wait_for_len(1, ARRIVAL, "the producer learning of the timeout")
        .await;
    assert_ne!(
        seen[0], "never cancelled",
        "the producer was never told the session timed out"
    );
    eventually("the producer's stream work ends", ARRIVAL, || {
        let n = producer.in_flight().by_kind.stream;
        async move { n == 0 }
    })
    .await;
    env.finish().await;
}

/// The session deadline binds the producer too: a producer that ignores the cancel (it never
/// looks at it and never writes again) is stopped within the grace period after the deadline,
/// so it does not keep running (in-flight returns to 0).
pub async fn a_producer_ignoring_the_deadline_is_stopped(h: Arc<dyn Harness>) {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let mut env = TestEnv::new(&h, 2).await;
    let stubborn = StreamDef::new(
        "stubborn",
        |_ctx: Context, _i: Empty, _p: Empty, out: StreamWriter| async move {
            out.write("only chunk").await?;
            std::future::pending::<()>().await;
            Ok(())
        },
    );
    let (producer, consumer) = producer_and_consumer(&mut env, vec![stubborn]).await;
    let clock = Stopwatch::start();
    let mut reader = open(&consumer, addr(&env, "stubborn"), json!({}), TIMEOUT).await;
    let (_, terminal) = read_all(&mut reader).await;
    assert_eq!(
        terminal,
        StreamItem::TimedOut,
        "the session did not time out"
    );
    eventually(
        "the producer that ignored the deadline is stopped",
        TIMEOUT + purista_core::service::PRODUCER_GRACE + ARRIVAL,
        || {
            let n = producer.in_flight().by_kind.stream;
            async move { n == 0 }
        },
    )
    .await;
    let stopped_after = clock.elapsed();
    // Two timers in a row (the deadline, then the grace): each may be late by the slack.
    clock.assert_by_at(
        &format!(
            "the producer ignoring its {TIMEOUT:?} deadline being stopped after the {:?} grace",
            purista_core::service::PRODUCER_GRACE
        ),
        stopped_after,
        TIMEOUT + purista_core::service::PRODUCER_GRACE + crate::support::LATE_SLACK,
    );
    env.finish().await;
}

/// From the runbook: a reader that stops reading never lets its producer run unboundedly ahead.
/// Either the producer is held until the reader reads again (and then every frame arrives in
/// order), or the session fails with 503 and the producer is stopped; the frames read before
/// the failure are in order without a gap.
pub async fn a_reader_that_stops_reading_holds_or_fails_the_producer(h: Arc<dyn Harness>) {
    /// Frames the producer tries to write.
    const TOTAL: u64 = 5_000;
    /// How far a producer may run ahead of a reader that stopped (broker and client buffers).
    const MAX_AHEAD: u64 = 2_048;
    const QUIET: Duration = Duration::from_millis(500);
    let mut env = TestEnv::new(&h, 2).await;
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let firehose = {
        let written = written.clone();
        StreamDef::new(
            "firehose",
            move |_ctx: Context, _i: Empty, _p: Empty, out: StreamWriter| {
                let written = written.clone();
                async move {
                    for i in 0..TOTAL {
                        out.write(json!({ "i": i })).await?;
                        written.store(i + 1, std::sync::atomic::Ordering::Release);
                    }
                    Ok(json!({ "total": TOTAL }))
                }
            },
        )
    };
    let (producer, consumer) = producer_and_consumer(&mut env, vec![firehose]).await;
    let mut reader = open(
        &consumer,
        addr(&env, "firehose"),
        json!({}),
        Duration::from_secs(60),
    )
    .await;
    match reader.next().await {
        Some(StreamItem::Chunk(c)) => assert_eq!(c, json!({ "i": 0 }), "the first chunk"),
        other => panic!("expected the first chunk, got {other:?}"),
    }

    // The reader stops; wait until the producer stops making progress (held or stopped).
    let mut last = u64::MAX;
    let mut still_since = tokio::time::Instant::now();
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    loop {
        let now = written.load(std::sync::atomic::Ordering::Acquire);
        if now != last {
            last = now;
            still_since = tokio::time::Instant::now();
        } else if still_since.elapsed() >= QUIET {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the producer kept writing for {ARRIVAL:?} to a reader that stopped ({now} frames)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        last <= MAX_AHEAD,
        "the producer wrote {last} frames to a reader that read one: a slow reader must hold \
         its producer or fail its session, not buffer without bound"
    );

    // The reader reads again: the rest in order, then the end of the session.
    let mut next = 1u64;
    let terminal = loop {
        match reader.next().await {
            Some(StreamItem::Chunk(c)) => {
                assert_eq!(
                    c,
                    json!({ "i": next }),
                    "a chunk out of order, lost or repeated"
                );
                next += 1;
            }
            Some(terminal) => break terminal,
            None => panic!("the session ended without a terminal item"),
        }
    };
    match terminal {
        StreamItem::Complete(v) => {
            assert_eq!(next, TOTAL, "the session completed without every chunk");
            assert_eq!(v, Some(json!({ "total": TOTAL })), "the final value");
        }
        StreamItem::Error(e) => {
            assert_eq!(
                e.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "a reader that fell behind failed with {e}, not 503"
            );
            eventually("the producer of a failed session stops", ARRIVAL, || {
                let n = producer.in_flight().by_kind.stream;
                async move { n == 0 }
            })
            .await;
        }
        other => panic!("a reader that stopped reading ended with {other:?}, not complete or 503"),
    }
    env.finish().await;
}
