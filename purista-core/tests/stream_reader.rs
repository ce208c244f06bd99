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

#[tokio::test]
async fn error_frame_yields_the_error_with_status_and_handled_flag() {
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
    odd.payload = json!({ "seq": 0, "chunk": "no type" });
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
    let seqs: Vec<_> = frames.iter().map(|e| e.payload["seq"].clone()).collect();
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
