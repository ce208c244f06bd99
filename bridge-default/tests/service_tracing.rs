//! Traces through the service runtime (issue 13) on the in-process bridge: every unit of work
//! has its span, named and attributed after OpenTelemetry's messaging conventions, and one
//! request is one W3C trace across commands, events, retries, dead letters, jobs and streams,
//! because every message carries its sender's span in `otp`.
//!
//! The spans are read back with core's in-memory recorder, by the W3C ids they carry.

mod common;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_bridge_default::{MemoryBroker, MemoryQueueBridge};
use purista_core::observe::{RecordedSpan, TraceContext, read_otp, write_otp};
use purista_core::service::SubscriptionContext;
use purista_core::stream::StreamWriter;
use purista_core::{
    Address, CommandDef, Context, Empty, Envelope, EventBridge, HandledError, JobContext, Outcome,
    QueueWorkerDef, SenderAddress, Service, StatusCode, StreamDef, StreamItem, SubscriptionDef,
    SubscriptionOperator,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use common::{eventually, recorded_spans};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// The one span named `name` in `spans` for which `pick` holds; fails the test otherwise.
fn one<'a>(
    spans: &'a [RecordedSpan],
    name: &str,
    pick: impl Fn(&RecordedSpan) -> bool,
) -> &'a RecordedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name && pick(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {name} span, found {}:\n{}",
        found.len(),
        purista_core::observe::SpanRecorder::render_tree(spans, &["purista.attempt"])
    );
    found[0]
}

fn assert_child(child: &RecordedSpan, parent: &RecordedSpan) {
    assert_eq!(
        child.parent_span_id(),
        parent.span_id(),
        "{} must be a child of {}",
        child.name,
        parent.name
    );
    assert_eq!(child.trace_id(), parent.trace_id());
}

/// A caller outside any service, on its own bridge instance of `broker`.
async fn raw_caller(broker: &MemoryBroker) -> purista_bridge_default::MemoryBridge {
    let caller = broker.bridge();
    caller.start().await.expect("caller bridge starts");
    caller
}

fn command_to(receiver: Address, payload: Value) -> Envelope {
    Envelope::command(
        SenderAddress {
            service_name: "web".into(),
            service_version: "1".into(),
            service_target: "checkout".into(),
            instance_id: String::new(),
        },
        receiver,
        payload,
        json!({}),
    )
}

#[tokio::test]
async fn one_request_is_one_trace_across_command_event_retried_subscription_and_job() {
    let recorder = recorded_spans();
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let job_done = Arc::new(Mutex::new(false));

    let orders = Service::builder("trace-orders", "1")
        .command(CommandDef::new(
            "place",
            |ctx: Context, order: String| async move {
                ctx.emit("orderPlaced", json!({ "order": order })).await?;
                Ok(format!("placed {order}"))
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("orders starts");

    let done = job_done.clone();
    let shipping = Service::builder("trace-shipping", "1")
        .queue_bridge(queues.clone())
        .subscription(
            SubscriptionDef::new(
                "onPlaced",
                |ctx: SubscriptionContext, e: Value| async move {
                    if ctx.attempt() == 1 {
                        return Ok(Outcome::retry());
                    }
                    ctx.enqueue("labels", e["order"].clone(), Empty).await?;
                    Ok(Outcome::Ack)
                },
            )
            .event_name("orderPlaced")
            .max_attempts(2),
        )
        .queue_worker(
            QueueWorkerDef::new("labels", move |_ctx: JobContext, _order: String| {
                let done = done.clone();
                async move {
                    *done.lock() = true;
                    Ok(())
                }
            })
            .lease_wait(Duration::from_millis(20)),
        )
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("shipping starts");

    let placed: String = orders
        .invoke(Address::new("trace-orders", "1", "place"), "o-1", Empty)
        .await
        .expect("place answers");
    assert_eq!(placed, "placed o-1");
    eventually("the label job ran", || *job_done.lock()).await;

    // The invocation started here is the trace's root; find its trace and wait for all seven.
    let root = recorder
        .finished()
        .into_iter()
        .find(|s| {
            s.name == "purista.invoke"
                && s.field("messaging.destination.name") == Some("trace-orders@1/place")
        })
        .expect("the invoke span");
    let trace_id = root.trace_id().expect("a trace id").to_string();
    eventually("seven spans in the trace", || {
        recorder.trace(&trace_id).len() == 7
    })
    .await;
    let spans = recorder.trace(&trace_id);

    let invoke = one(&spans, "purista.invoke", |_| true);
    let command = one(&spans, "purista.command", |_| true);
    let emit = one(&spans, "purista.emit", |_| true);
    let first = one(&spans, "purista.subscription", |s| {
        s.field("purista.attempt") == Some("1")
    });
    let second = one(&spans, "purista.subscription", |s| {
        s.field("purista.attempt") == Some("2")
    });
    let enqueue = one(&spans, "purista.enqueue", |_| true);
    let job = one(&spans, "purista.job", |_| true);

    assert_eq!(
        invoke.parent_span_id(),
        None,
        "a fresh invocation is a root"
    );
    assert_child(command, invoke);
    assert_child(emit, command);
    assert_child(first, emit);
    assert_child(second, emit);
    assert_child(enqueue, second);
    assert_child(job, enqueue);

    // Kinds and operations after OpenTelemetry's messaging conventions.
    for (span, kind, op) in [
        (invoke, "client", "send"),
        (command, "server", "process"),
        (emit, "producer", "send"),
        (first, "consumer", "process"),
        (enqueue, "producer", "send"),
        (job, "consumer", "process"),
    ] {
        assert_eq!(span.field("otel.kind"), Some(kind), "{}", span.name);
        assert_eq!(
            span.field("messaging.operation.type"),
            Some(op),
            "{}",
            span.name
        );
        assert_eq!(
            span.field("messaging.system"),
            Some("default"),
            "{}",
            span.name
        );
    }
    assert_eq!(
        invoke.field("otel.name"),
        Some("invoke trace-orders@1/place")
    );
    assert_eq!(
        command.field("messaging.destination.name"),
        Some("trace-orders@1/place")
    );
    assert_eq!(command.field("purista.service.name"), Some("trace-orders"));
    assert_eq!(
        command.field("messaging.message.conversation_id"),
        invoke.field("messaging.message.conversation_id"),
        "the correlation id is the conversation id on both sides"
    );
    assert!(command.field("messaging.message.id").is_some());
    assert_eq!(
        emit.field("messaging.destination.name"),
        Some("orderPlaced")
    );
    assert_eq!(emit.field("purista.eventName"), Some("orderPlaced"));
    assert_eq!(
        first.field("messaging.consumer.group.name"),
        Some("trace-shipping@1/onPlaced")
    );
    assert_eq!(first.field("purista.outcome"), Some("retry"));
    assert_eq!(second.field("purista.outcome"), Some("ack"));
    assert_eq!(
        first.field("messaging.message.id"),
        second.field("messaging.message.id"),
        "a retry is the same message"
    );
    assert_eq!(job.field("messaging.destination.name"), Some("labels"));
    assert_eq!(
        job.field("messaging.message.id"),
        enqueue.field("messaging.message.id"),
        "the job span names the job the enqueue span created"
    );
    assert_eq!(job.field("purista.attempt"), Some("1"));
    assert_eq!(job.field("purista.outcome"), Some("complete"));
    // A flow started here takes the W3C trace id as its PURISTA trace id.
    for span in &spans {
        assert_eq!(
            span.field("purista.traceId"),
            Some(trace_id.as_str()),
            "{}",
            span.name
        );
    }

    shipping.shutdown(deadline()).await;
    orders.shutdown(deadline()).await;
}

#[tokio::test]
async fn the_command_span_continues_the_callers_otp_and_the_response_continues_the_command_span() {
    let recorder = recorded_spans();
    let broker = MemoryBroker::new();
    let service = Service::builder("trace-echo", "1")
        .command(CommandDef::new(
            "echo",
            |_ctx: Context, v: Value| async move { Ok(v) },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("echo starts");
    let caller = raw_caller(&broker).await;

    let sender = TraceContext::new_root();
    let mut command = command_to(Address::new("trace-echo", "1", "echo"), json!("hi"));
    command.otp = Some(write_otp(&sender));
    command.trace_id = Some("business-trace-7".into());
    let response = caller
        .invoke(command, Duration::from_secs(5))
        .await
        .expect("echo answers");

    let trace_id = sender.trace_id_hex();
    eventually("the command span", || !recorder.trace(&trace_id).is_empty()).await;
    let spans = recorder.trace(&trace_id);
    let command_span = one(&spans, "purista.command", |_| true);
    assert_eq!(
        command_span.parent_span_id(),
        Some(sender.span_id_hex().as_str()),
        "the handler's span is a child of the sender's"
    );
    let carried = read_otp(response.otp.as_deref().expect("the response carries otp"))
        .expect("a W3C carrier")
        .expect("a trace context");
    assert_eq!(
        carried.trace_id(),
        sender.trace_id(),
        "the response stays in the trace"
    );
    assert_eq!(
        Some(carried.span_id_hex().as_str()),
        command_span.span_id(),
        "the response names the command's span"
    );
    assert_eq!(
        response.trace_id.as_deref(),
        Some("business-trace-7"),
        "an arriving traceId is kept, not replaced by the W3C trace id"
    );
    assert_eq!(
        command_span.field("purista.traceId"),
        Some("business-trace-7")
    );

    service.shutdown(deadline()).await;
    caller.shutdown(deadline()).await;
}

#[tokio::test]
async fn an_unusable_otp_starts_a_new_trace_and_the_command_still_answers() {
    let recorder = recorded_spans();
    let broker = MemoryBroker::new();
    let service = Service::builder("trace-garbled", "1")
        .command(CommandDef::new(
            "echo",
            |_ctx: Context, v: Value| async move { Ok(v) },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("service starts");
    let caller = raw_caller(&broker).await;

    for garbled in [
        "wrong_input",
        r#"{"traceparent":"00-zz-zz-01"}"#,
        "{}",
        r#"{"traceparent":"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#,
    ] {
        let mut command = command_to(Address::new("trace-garbled", "1", "echo"), json!(garbled));
        command.otp = Some(garbled.into());
        let response = caller
            .invoke(command, Duration::from_secs(5))
            .await
            .expect("the command answers whatever its otp");
        assert_eq!(response.payload, json!(garbled));
        let carried = read_otp(response.otp.as_deref().expect("otp"))
            .expect("the response's otp is a carrier")
            .expect("with a context");
        let trace_id = carried.trace_id_hex();
        eventually("the command span", || !recorder.trace(&trace_id).is_empty()).await;
        let span = one(&recorder.trace(&trace_id), "purista.command", |_| true).clone();
        assert_eq!(span.parent_span_id(), None, "{garbled}: a new trace's root");
    }

    service.shutdown(deadline()).await;
    caller.shutdown(deadline()).await;
}

#[tokio::test]
async fn failures_mark_their_spans_with_status_and_error_type() {
    let recorder = recorded_spans();
    let broker = MemoryBroker::new();
    let service = Service::builder("trace-failing", "1")
        .command(CommandDef::new(
            "refuse",
            |_ctx: Context, _v: Value| async move {
                Err::<Value, _>(HandledError::new(StatusCode(409), "already there").into())
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("service starts");

    let err = service
        .invoke::<Value>(Address::new("trace-failing", "1", "refuse"), 1, Empty)
        .await
        .expect_err("a handled error");
    assert_eq!(err.status, StatusCode(409));
    let timeout = service
        .invoke_with::<Value>(
            Address::new("trace-failing", "1", "nobody"),
            1,
            Empty,
            purista_core::InvokeOptions::ttl(Duration::from_millis(50)),
        )
        .await
        .expect_err("nobody serves it");

    eventually("both invoke spans", || {
        recorder
            .finished()
            .iter()
            .filter(|s| {
                s.name == "purista.invoke"
                    && s.field("purista.service.name") == Some("trace-failing")
            })
            .count()
            == 2
    })
    .await;
    let spans = recorder.finished();
    let refused = one(&spans, "purista.invoke", |s| {
        s.field("messaging.destination.name") == Some("trace-failing@1/refuse")
    });
    assert_eq!(refused.field("otel.status_code"), Some("ERROR"));
    assert_eq!(refused.field("error.type"), Some("409"));
    let trace = refused.trace_id().unwrap().to_string();
    eventually("the command span", || recorder.trace(&trace).len() == 2).await;
    let server = one(&recorder.trace(&trace), "purista.command", |_| true).clone();
    assert_eq!(server.field("otel.status_code"), Some("ERROR"));
    assert_eq!(server.field("purista.statusCode"), Some("409"));
    let nobody = one(&spans, "purista.invoke", |s| {
        s.field("messaging.destination.name") == Some("trace-failing@1/nobody")
    });
    assert_eq!(
        nobody.field("error.type"),
        Some(timeout.status.0.to_string().as_str())
    );

    service.shutdown(deadline()).await;
}

#[tokio::test]
async fn principal_and_tenant_are_on_spans_only_when_the_service_opts_in() {
    let recorder = recorded_spans();
    let broker = MemoryBroker::new();
    let quiet = Service::builder("trace-quiet", "1")
        .command(CommandDef::new(
            "who",
            |_ctx: Context, _v: Value| async move { Ok(()) },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("quiet starts");
    let open = Service::builder("trace-open", "1")
        .trace_identities(true)
        .command(CommandDef::new(
            "who",
            |_ctx: Context, _v: Value| async move { Ok(()) },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("open starts");
    let caller = raw_caller(&broker).await;

    let mut traces = Vec::new();
    for service in ["trace-quiet", "trace-open"] {
        let sender = TraceContext::new_root();
        let mut command = command_to(Address::new(service, "1", "who"), json!(1));
        command.otp = Some(write_otp(&sender));
        command.principal_id = Some("user-42".into());
        command.tenant_id = Some("tenant-42".into());
        caller
            .invoke(command, Duration::from_secs(5))
            .await
            .expect("who answers");
        traces.push(sender.trace_id_hex());
    }
    for trace in &traces {
        eventually("the command span", || !recorder.trace(trace).is_empty()).await;
    }
    let quiet_span = one(&recorder.trace(&traces[0]), "purista.command", |_| true).clone();
    let open_span = one(&recorder.trace(&traces[1]), "purista.command", |_| true).clone();
    assert_eq!(quiet_span.field("purista.principalId"), None);
    assert_eq!(quiet_span.field("purista.tenantId"), None);
    assert_eq!(open_span.field("purista.principalId"), Some("user-42"));
    assert_eq!(open_span.field("purista.tenantId"), Some("tenant-42"));

    quiet.shutdown(deadline()).await;
    open.shutdown(deadline()).await;
    caller.shutdown(deadline()).await;
}

#[tokio::test]
async fn a_dead_letter_keeps_the_trace_and_its_replay_continues_it() {
    let recorder = recorded_spans();
    let broker = MemoryBroker::new();
    let bridge = Arc::new(broker.bridge());
    let replayed = Arc::new(Mutex::new(false));
    let seen = replayed.clone();
    let service = Service::builder("trace-dlq", "1")
        .subscription(
            SubscriptionDef::new("onBad", move |ctx: SubscriptionContext, _e: Value| {
                let seen = seen.clone();
                async move {
                    // Dead-letter the first delivery; take the replayed one.
                    if *seen.lock() || ctx.attempt() > 1 {
                        return Ok(Outcome::Ack);
                    }
                    *seen.lock() = true;
                    Ok(Outcome::dead_letter("rejected once"))
                }
            })
            .event_name("badThing")
            .dead_letter_target("trace-dlq.dead-letter"),
        )
        .build()
        .start(bridge.clone())
        .await
        .expect("service starts");

    service
        .emit("badThing", json!({ "n": 1 }))
        .await
        .expect("emitted");
    let entry = {
        let deadline = deadline();
        loop {
            let entries = bridge
                .inspect_dead_letters("trace-dlq.dead-letter", 10)
                .await
                .expect("dead letters can be inspected");
            if let Some(e) = entries.into_iter().next() {
                break e;
            }
            assert!(Instant::now() < deadline, "nothing was dead-lettered");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let envelope = entry.envelope.expect("the dead letter is an envelope");
    let carried = read_otp(envelope.otp.as_deref().expect("otp"))
        .expect("carrier")
        .expect("context");
    let trace_id = carried.trace_id_hex();
    let emit = recorder
        .trace(&trace_id)
        .into_iter()
        .find(|s| s.name == "purista.emit")
        .expect("the emit span");
    assert_eq!(
        Some(carried.span_id_hex().as_str()),
        emit.span_id(),
        "the dead letter still names the span that emitted it"
    );

    bridge
        .replay_dead_letters("trace-dlq.dead-letter", 10)
        .await
        .expect("replayed");
    eventually("two delivery spans", || {
        recorder
            .trace(&trace_id)
            .iter()
            .filter(|s| s.name == "purista.subscription")
            .count()
            == 2
    })
    .await;
    let spans = recorder.trace(&trace_id);
    let deliveries: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "purista.subscription")
        .collect();
    for d in &deliveries {
        assert_child(d, &emit);
    }
    let outcomes: Vec<_> = deliveries
        .iter()
        .map(|d| d.field("purista.outcome"))
        .collect();
    assert_eq!(outcomes, vec![Some("dead_letter"), Some("ack")]);

    service.shutdown(deadline()).await;
}

#[tokio::test]
async fn stream_frames_continue_the_session_which_continues_the_open() {
    let recorder = recorded_spans();
    let broker = MemoryBroker::new();
    let producer = Service::builder("trace-stream", "1")
        .stream(StreamDef::new(
            "count",
            |_ctx: Context, to: u32, out: StreamWriter| async move {
                for i in 0..to {
                    out.write(i).await?;
                }
                Ok(to)
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("producer starts");

    let mut reader = producer
        .open_stream(Address::new("trace-stream", "1", "count"), 2, Empty, None)
        .await
        .expect("opened");
    let mut last = None;
    while let Some(item) = reader.next().await {
        last = Some(item);
    }
    assert_eq!(last, Some(StreamItem::Complete(Some(json!(2)))));

    let open = recorder
        .finished()
        .into_iter()
        .find(|s| {
            s.name == "purista.stream.open"
                && s.field("messaging.destination.name") == Some("trace-stream@1/count")
        })
        .expect("the open span");
    let trace = open.trace_id().unwrap().to_string();
    eventually("the session span", || recorder.trace(&trace).len() == 2).await;
    let session = one(&recorder.trace(&trace), "purista.stream", |_| true).clone();
    assert_child(&session, &open);
    assert_eq!(session.field("purista.outcome"), Some("complete"));
    assert_eq!(
        session.field("messaging.message.conversation_id"),
        open.field("messaging.message.conversation_id")
    );

    // Every frame the producer writes names the session's span.
    let caller = raw_caller(&broker).await;
    let consumer = TraceContext::new_root();
    let mut open_frame = purista_core::stream::open_frame(
        SenderAddress {
            service_name: "web".into(),
            service_version: "1".into(),
            service_target: "report".into(),
            instance_id: String::new(),
        },
        "trace-stream-session-2",
        json!(3),
        json!({}),
        Duration::from_secs(5),
    );
    open_frame.receiver = Some(Address::new("trace-stream", "1", "count"));
    open_frame.otp = Some(write_otp(&consumer));
    let mut end = caller.open_stream(open_frame).await.expect("opened raw");
    let mut frames = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), end.frames.recv())
        .await
        .expect("frames arrive")
    {
        let terminal = purista_core::stream::frame_type(&frame).is_some_and(|t| t.is_terminal());
        frames.push(frame);
        if terminal {
            break;
        }
    }
    assert_eq!(frames.len(), 5, "start, three chunks, complete");
    let trace = consumer.trace_id_hex();
    eventually("the second session span", || {
        !recorder.trace(&trace).is_empty()
    })
    .await;
    let session = one(&recorder.trace(&trace), "purista.stream", |_| true).clone();
    assert_eq!(
        session.parent_span_id(),
        Some(consumer.span_id_hex().as_str()),
        "the session continues the open frame's context"
    );
    for frame in &frames {
        let carried = read_otp(frame.otp.as_deref().expect("each frame carries otp"))
            .expect("carrier")
            .expect("context");
        assert_eq!(carried.trace_id(), consumer.trace_id());
        assert_eq!(
            Some(carried.span_id_hex().as_str()),
            session.span_id(),
            "frames name the session's span"
        );
    }
    caller.shutdown(deadline()).await;

    producer.shutdown(deadline()).await;
}
