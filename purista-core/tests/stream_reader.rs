//! Stream sessions (DESIGN §3.5) at the session ends: the consumer's `StreamReader` yields chunks
//! in order and exactly one terminal item, ignores late frames, times out and notices a vanished
//! producer; the producer's `StreamWriter` refuses to write after a terminal or a cancel.
//! The bridge is replaced by hand-made tokio channels.

use std::time::Duration;

use purista_core::stream::{FrameType, StreamWriteError, frame};
use purista_core::{
    Address, Envelope, ErrorPayload, SenderAddress, StatusCode, StreamConsumerEnd, StreamItem,
    StreamProducerEnd, StreamReader, StreamWriter,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

const SESSION: &str = "session-1";

fn producer() -> SenderAddress {
    SenderAddress {
        service_name: "reports".into(),
        service_version: "1".into(),
        service_target: "export".into(),
        instance_id: "inst-p".into(),
    }
}

fn consumer() -> SenderAddress {
    SenderAddress {
        service_name: "orders".into(),
        service_version: "1".into(),
        service_target: "".into(),
        instance_id: "inst-c".into(),
    }
}

/// Frame `seq` of `kind` with an optional body part.
fn f(kind: FrameType, seq: u64, body: Option<(&str, Value)>) -> Envelope {
    frame(producer(), SESSION, kind, seq, body)
}

struct Session {
    frames: mpsc::Sender<Envelope>,
    cancelled: watch::Receiver<Option<String>>,
    reader: StreamReader,
}

fn session(timeout: Duration) -> Session {
    let (tx, rx) = mpsc::channel(64);
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let end = StreamConsumerEnd {
        frames: rx,
        cancel: cancel_tx,
    };
    Session {
        frames: tx,
        cancelled: cancel_rx,
        reader: StreamReader::new(end, SESSION.into(), Instant::now() + timeout),
    }
}

async fn send(s: &Session, frames: impl IntoIterator<Item = Envelope>) {
    for fr in frames {
        s.frames.send(fr).await.expect("reader alive");
    }
}

/// Reads until the reader returns `None` (bounded, so a bug cannot hang the test).
async fn read_all(reader: &mut StreamReader) -> Vec<StreamItem> {
    let mut items = Vec::new();
    for _ in 0..100 {
        match reader.next().await {
            Some(item) => items.push(item),
            None => return items,
        }
    }
    panic!("reader never ended: {items:?}");
}

fn chunk(seq: u64, v: Value) -> Envelope {
    f(FrameType::Chunk, seq, Some(("chunk", v)))
}

#[tokio::test]
async fn chunks_arrive_in_order_then_complete() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [
            f(FrameType::Start, 0, None),
            chunk(1, json!(1)),
            chunk(2, json!(2)),
            chunk(3, json!({ "n": 3 })),
            f(FrameType::Complete, 4, Some(("final", json!("done")))),
        ],
    )
    .await;
    assert_eq!(
        read_all(&mut s.reader).await,
        vec![
            StreamItem::Chunk(json!(1)),
            StreamItem::Chunk(json!(2)),
            StreamItem::Chunk(json!({ "n": 3 })),
            StreamItem::Complete(Some(json!("done"))),
        ]
    );
}

#[tokio::test]
async fn complete_without_final_value_is_complete_none() {
    let mut s = session(Duration::from_secs(5));
    send(&s, [f(FrameType::Complete, 0, None)]).await;
    assert_eq!(s.reader.next().await, Some(StreamItem::Complete(None)));
}

#[tokio::test]
async fn heartbeats_and_start_frames_are_not_items() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [
            f(FrameType::Start, 0, None),
            f(FrameType::Heartbeat, 1, None),
            chunk(2, json!("a")),
            f(FrameType::Heartbeat, 3, None),
            f(FrameType::Complete, 4, None),
        ],
    )
    .await;
    assert_eq!(
        read_all(&mut s.reader).await,
        vec![StreamItem::Chunk(json!("a")), StreamItem::Complete(None)]
    );
}

#[tokio::test]
async fn exactly_one_terminal_item_is_returned() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [
            chunk(0, json!(0)),
            f(FrameType::Complete, 1, None),
            f(FrameType::Cancel, 2, Some(("reason", json!("late")))),
        ],
    )
    .await;
    let items = read_all(&mut s.reader).await;
    assert_eq!(items.iter().filter(|i| i.is_terminal()).count(), 1);
    assert!(items.last().expect("items").is_terminal());
    assert_eq!(s.reader.next().await, None);
}

#[tokio::test]
async fn frames_after_the_terminal_are_ignored_and_counted() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [
            chunk(0, json!(0)),
            f(FrameType::Complete, 1, None),
            chunk(2, json!("late")),
            chunk(3, json!("later")),
            f(FrameType::Error, 4, None),
        ],
    )
    .await;
    assert_eq!(
        read_all(&mut s.reader).await,
        vec![StreamItem::Chunk(json!(0)), StreamItem::Complete(None)]
    );
    assert_eq!(s.reader.ignored_frames(), 3);
}

#[tokio::test]
async fn frames_arriving_later_after_the_terminal_are_counted_too() {
    let mut s = session(Duration::from_secs(5));
    send(&s, [f(FrameType::Complete, 0, None)]).await;
    assert_eq!(s.reader.next().await, Some(StreamItem::Complete(None)));
    assert_eq!(s.reader.ignored_frames(), 0);
    send(&s, [chunk(1, json!(1))]).await;
    assert_eq!(s.reader.next().await, None);
    send(&s, [chunk(2, json!(2))]).await;
    assert_eq!(s.reader.ignored_frames(), 2);
}

/// Earlier purista-rs versions put `isHandledError` on the envelope of an error frame; a
/// reader still takes it from there when the error itself does not say.
#[tokio::test]
async fn error_frame_with_the_handled_flag_on_the_envelope_yields_a_handled_error() {
    let mut s = session(Duration::from_secs(5));
    let mut err = f(
        FrameType::Error,
        0,
        Some((
            "error",
            serde_json::to_value(ErrorPayload {
                status: StatusCode::CONFLICT,
                message: "export already running".into(),
                data: Some(json!({ "id": 1 })),
                trace_id: Some("t-1".into()),
            })
            .expect("json"),
        )),
    );
    err.is_handled_error = Some(true);
    send(&s, [err]).await;
    match s.reader.next().await {
        Some(StreamItem::Error(e)) => {
            assert_eq!(e.status, StatusCode::CONFLICT);
            assert_eq!(e.message, "export already running");
            assert_eq!(e.data, Some(json!({ "id": 1 })));
            assert!(e.handled);
        }
        other => panic!("expected Error, got {other:?}"),
    }
}

#[tokio::test]
async fn error_frame_without_a_readable_error_is_a_generic_500() {
    let mut s = session(Duration::from_secs(5));
    send(&s, [f(FrameType::Error, 0, Some(("error", json!("boom"))))]).await;
    match s.reader.next().await {
        Some(StreamItem::Error(e)) => {
            assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
            assert!(!e.handled);
            assert!(!e.message.contains("boom"));
        }
        other => panic!("expected Error, got {other:?}"),
    }
}

#[tokio::test]
async fn cancel_frame_yields_cancelled_with_the_reason() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [f(
            FrameType::Cancel,
            0,
            Some(("reason", json!("shutting down"))),
        )],
    )
    .await;
    assert_eq!(
        s.reader.next().await,
        Some(StreamItem::Cancelled("shutting down".into()))
    );
}

#[tokio::test]
async fn frame_without_frame_type_is_skipped() {
    let mut s = session(Duration::from_secs(5));
    let mut odd = chunk(0, json!(0));
    odd.payload = json!({ "sequence": 0, "chunk": "no type" });
    send(
        &s,
        [odd, chunk(1, json!(1)), f(FrameType::Complete, 2, None)],
    )
    .await;
    assert_eq!(
        read_all(&mut s.reader).await,
        vec![StreamItem::Chunk(json!(1)), StreamItem::Complete(None)]
    );
}

#[tokio::test(start_paused = true)]
async fn session_timeout_yields_timed_out_and_cancels_the_producer() {
    let mut s = session(Duration::from_secs(2));
    send(&s, [chunk(0, json!(0))]).await;
    assert_eq!(s.reader.next().await, Some(StreamItem::Chunk(json!(0))));
    let started = Instant::now();
    assert_eq!(s.reader.next().await, Some(StreamItem::TimedOut));
    assert!(started.elapsed() <= Duration::from_secs(2));
    assert!(s.cancelled.borrow().is_some(), "cancel watch not set");
    assert_eq!(s.reader.next().await, None);
}

#[tokio::test(start_paused = true)]
async fn frames_after_the_timeout_are_ignored_and_counted() {
    let mut s = session(Duration::from_secs(1));
    assert_eq!(s.reader.next().await, Some(StreamItem::TimedOut));
    send(
        &s,
        [chunk(0, json!("late")), f(FrameType::Complete, 1, None)],
    )
    .await;
    assert_eq!(s.reader.next().await, None);
    assert_eq!(s.reader.ignored_frames(), 2);
}

#[tokio::test]
async fn producer_dropping_without_terminal_yields_a_503_error() {
    let mut s = session(Duration::from_secs(5));
    send(&s, [chunk(0, json!(0))]).await;
    drop(s.frames);
    assert_eq!(s.reader.next().await, Some(StreamItem::Chunk(json!(0))));
    match s.reader.next().await {
        Some(StreamItem::Error(e)) => assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE),
        other => panic!("expected a 503 Error, got {other:?}"),
    }
    assert_eq!(s.reader.next().await, None);
}

#[tokio::test]
async fn reader_cancel_sets_the_cancel_watch_with_the_reason() {
    let s = session(Duration::from_secs(5));
    s.reader.cancel("user closed the page");
    assert_eq!(
        s.cancelled.borrow().as_deref(),
        Some("user closed the page")
    );
}

// --- writer -------------------------------------------------------------------------------

struct Producer {
    writer: StreamWriter,
    frames: mpsc::Receiver<Envelope>,
    cancel: watch::Sender<Option<String>>,
}

fn open_frame() -> Envelope {
    let mut open = frame(
        consumer(),
        SESSION,
        FrameType::Open,
        0,
        Some(("payload", json!({}))),
    );
    open.receiver = Some(Address::new("reports", "1", "export"));
    open.trace_id = Some("trace-1".into());
    open.tenant_id = Some("acme".into());
    open
}

fn producer_end() -> Producer {
    let (tx, rx) = mpsc::channel(64);
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let end = StreamProducerEnd {
        frames: tx,
        cancelled: cancel_rx,
    };
    Producer {
        writer: StreamWriter::new(end, &open_frame(), producer()),
        frames: rx,
        cancel: cancel_tx,
    }
}

fn drain(rx: &mut mpsc::Receiver<Envelope>) -> Vec<Envelope> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn writer_frames_carry_session_sequence_and_routing() {
    let mut p = producer_end();
    p.writer.start().await.expect("start");
    p.writer.write(json!("a")).await.expect("write");
    p.writer.complete(None).await.expect("complete");
    let frames = drain(&mut p.frames);
    let seqs: Vec<_> = frames
        .iter()
        .map(|e| e.payload["sequence"].clone())
        .collect();
    assert_eq!(seqs, [json!(0), json!(1), json!(2)]);
    for e in &frames {
        assert_eq!(e.correlation_id.as_deref(), Some(SESSION));
        assert_eq!(e.trace_id.as_deref(), Some("trace-1"));
        assert_eq!(e.tenant_id.as_deref(), Some("acme"));
        assert_eq!(e.receiver, Some(consumer().to_address()));
    }
    assert_eq!(frames[1].payload["chunk"], json!("a"));
}

#[tokio::test]
async fn writer_refuses_writes_after_complete() {
    let p = producer_end();
    p.writer.complete(None).await.expect("complete");
    assert!(p.writer.is_closed().await);
    assert_eq!(
        p.writer.write(json!(1)).await,
        Err(StreamWriteError::Closed)
    );
    assert_eq!(p.writer.heartbeat().await, Err(StreamWriteError::Closed));
}

#[tokio::test]
async fn writer_refuses_a_second_terminal_frame() {
    let mut p = producer_end();
    p.writer
        .fail(
            ErrorPayload {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: "Internal Server Error".into(),
                data: None,
                trace_id: None,
            },
            false,
        )
        .await
        .expect("fail");
    assert_eq!(p.writer.complete(None).await, Err(StreamWriteError::Closed));
    assert_eq!(p.writer.cancel("x").await, Err(StreamWriteError::Closed));
    assert_eq!(drain(&mut p.frames).len(), 1);
}

#[tokio::test]
async fn writer_clones_share_the_terminal_state() {
    let p = producer_end();
    let clone = p.writer.clone();
    clone.complete(None).await.expect("complete");
    assert_eq!(
        p.writer.write(json!(1)).await,
        Err(StreamWriteError::Closed)
    );
}

#[tokio::test]
async fn writer_refuses_writes_after_the_consumer_cancels() {
    let p = producer_end();
    p.writer.write(json!(1)).await.expect("write before cancel");
    p.cancel.send(Some("user left".into())).expect("watch");
    assert_eq!(p.writer.cancelled().as_deref(), Some("user left"));
    assert_eq!(
        p.writer.write(json!(2)).await,
        Err(StreamWriteError::Cancelled("user left".into()))
    );
}

#[tokio::test]
async fn writer_can_still_end_a_cancelled_session_with_a_cancel_frame() {
    let mut p = producer_end();
    p.cancel.send(Some("user left".into())).expect("watch");
    p.writer.cancel("user left").await.expect("terminal cancel");
    let frames = drain(&mut p.frames);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].payload["frameType"], json!("cancel"));
}

#[tokio::test]
async fn writer_on_cancel_resolves_with_the_reason() {
    let p = producer_end();
    let cancel = p.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let _ = cancel.send(Some("stop".into()));
    });
    let reason = tokio::time::timeout(Duration::from_secs(5), p.writer.on_cancel())
        .await
        .expect("on_cancel resolves");
    assert_eq!(reason, "stop");
}

#[tokio::test]
async fn writer_to_a_vanished_consumer_reports_cancelled() {
    let p = producer_end();
    drop(p.frames);
    assert!(matches!(
        p.writer.write(json!(1)).await,
        Err(StreamWriteError::Cancelled(_))
    ));
}

#[tokio::test]
async fn writer_and_reader_together_deliver_the_session() {
    let (tx, rx) = mpsc::channel(64);
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let writer = StreamWriter::new(
        StreamProducerEnd {
            frames: tx,
            cancelled: cancel_rx,
        },
        &open_frame(),
        producer(),
    );
    let mut reader = StreamReader::new(
        StreamConsumerEnd {
            frames: rx,
            cancel: cancel_tx,
        },
        SESSION.into(),
        Instant::now() + Duration::from_secs(5),
    );
    writer.start().await.expect("start");
    for i in 0..5 {
        writer.write(i).await.expect("write");
    }
    writer.complete(Some(json!(5))).await.expect("complete");
    drop(writer);
    let items = read_all(&mut reader).await;
    let mut expected: Vec<_> = (0..5).map(|i| StreamItem::Chunk(json!(i))).collect();
    expected.push(StreamItem::Complete(Some(json!(5))));
    assert_eq!(items, expected);
    assert_eq!(reader.ignored_frames(), 0);
}

// --- sequence numbers (issue 8, defect 6) ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_deliver_frames_in_sequence_order() {
    for _round in 0..20 {
        // A channel of one slot makes every writer wait for the reader, so sends interleave.
        let (tx, mut rx) = mpsc::channel(1);
        let (_cancel_tx, cancel_rx) = watch::channel(None);
        let writer = StreamWriter::new(
            StreamProducerEnd {
                frames: tx,
                cancelled: cancel_rx,
            },
            &open_frame(),
            producer(),
        );
        let mut tasks = Vec::new();
        for w in 0..4 {
            let writer = writer.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    writer.write(json!([w, i])).await.expect("write");
                }
            }));
        }
        drop(writer);
        let mut sequences = Vec::new();
        while let Some(frame) = rx.recv().await {
            sequences.push(frame.payload["sequence"].as_u64().expect("numbered frame"));
        }
        for t in tasks {
            t.await.expect("writer task");
        }
        let expected: Vec<u64> = (0..200).collect();
        assert_eq!(sequences, expected, "frames must arrive in sequence order");
    }
}

#[tokio::test]
async fn a_duplicate_frame_is_ignored_with_a_warning() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [
            f(FrameType::Start, 0, None),
            chunk(1, json!("a")),
            chunk(1, json!("a")),
            chunk(2, json!("b")),
            f(FrameType::Complete, 3, None),
        ],
    )
    .await;
    assert_eq!(
        read_all(&mut s.reader).await,
        vec![
            StreamItem::Chunk(json!("a")),
            StreamItem::Chunk(json!("b")),
            StreamItem::Complete(None),
        ]
    );
    assert_eq!(s.reader.ignored_frames(), 1);
}

#[tokio::test]
async fn a_gap_in_the_sequence_ends_the_session_as_frames_lost_and_cancels_the_producer() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [
            f(FrameType::Start, 0, None),
            chunk(1, json!("a")),
            chunk(3, json!("c")),
            f(FrameType::Complete, 4, None),
        ],
    )
    .await;
    assert_eq!(
        read_all(&mut s.reader).await,
        vec![
            StreamItem::Chunk(json!("a")),
            StreamItem::FramesLost {
                expected: 2,
                received: 3
            },
        ]
    );
    assert!(
        s.cancelled.borrow().is_some(),
        "the producer is told to stop"
    );
}

#[tokio::test]
async fn a_gap_before_a_cancel_or_error_yields_that_terminal() {
    let mut s = session(Duration::from_secs(5));
    send(
        &s,
        [
            f(FrameType::Start, 0, None),
            chunk(1, json!("a")),
            f(
                FrameType::Cancel,
                3,
                Some(("reason", json!("connection lost"))),
            ),
        ],
    )
    .await;
    assert_eq!(
        read_all(&mut s.reader).await,
        vec![
            StreamItem::Chunk(json!("a")),
            StreamItem::Cancelled("connection lost".into()),
        ]
    );
}

#[tokio::test]
async fn a_frame_without_a_sequence_number_is_not_checked() {
    // Bridges end a session they lost with an unnumbered error frame of their own.
    let mut s = session(Duration::from_secs(5));
    let mut lost = f(
        FrameType::Error,
        0,
        Some((
            "error",
            json!({"status": 503, "message": "connection lost", "isHandledError": false}),
        )),
    );
    if let Value::Object(p) = &mut lost.payload {
        p.remove("sequence");
    }
    send(&s, [f(FrameType::Start, 0, None), chunk(1, json!(1)), lost]).await;
    let items = read_all(&mut s.reader).await;
    assert_eq!(items[0], StreamItem::Chunk(json!(1)));
    assert!(
        matches!(&items[1], StreamItem::Error(e) if e.status == StatusCode::SERVICE_UNAVAILABLE),
        "{items:?}"
    );
}

// --- PURISTA's frame shape (issue 14, item 1) -------------------------------------------------

#[tokio::test]
async fn frames_are_numbered_in_payload_sequence() {
    let mut p = producer_end();
    p.writer.start().await.expect("start");
    p.writer.write(json!("a")).await.expect("write");
    let frames = drain(&mut p.frames);
    assert_eq!(frames[0].payload["sequence"], json!(0));
    assert_eq!(frames[1].payload["sequence"], json!(1));
    assert!(
        frames[1].payload.get("seq").is_none(),
        "{}",
        frames[1].payload
    );
}

#[tokio::test]
async fn an_error_frame_carries_is_handled_error_inside_payload_error() {
    let mut p = producer_end();
    p.writer
        .fail(
            ErrorPayload {
                status: StatusCode::CONFLICT,
                message: "export already running".into(),
                data: None,
                trace_id: None,
            },
            true,
        )
        .await
        .expect("fail");
    let frames = drain(&mut p.frames);
    assert_eq!(frames[0].payload["error"]["isHandledError"], json!(true));
    assert_eq!(frames[0].payload["error"]["status"], json!(409));
    assert_eq!(frames[0].is_handled_error, None, "not on the envelope");
}

#[tokio::test]
async fn a_purista_error_frame_keeps_its_handled_flag() {
    let mut s = session(Duration::from_secs(5));
    let error = f(
        FrameType::Error,
        0,
        Some((
            "error",
            json!({"status": 400, "message": "bad range", "isHandledError": true, "data": {"max": 10}}),
        )),
    );
    send(&s, [error]).await;
    match s.reader.next().await {
        Some(StreamItem::Error(e)) => {
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.handled, "a handled PURISTA error stays handled");
            assert_eq!(e.message, "bad range");
            assert_eq!(e.data, Some(json!({"max": 10})));
        }
        other => panic!("expected an error, got {other:?}"),
    }
}
