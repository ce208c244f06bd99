//! Traces across instances of one bridge (issue 13): every message carries its sender's span
//! in `otp`, so one request is one W3C trace whatever broker carries it, with the parents a
//! trace viewer draws. The spans are read back from the process's recorder
//! ([`logs::spans`](crate::logs::spans)) by the trace id of the case's root span.

use std::sync::Arc;
use std::time::Duration;

use purista_core::observe::{RecordedSpan, SpanRecorder, read_otp};
use purista_core::{
    Address, CommandDef, Context, Empty, JobContext, Outcome, QueueWorkerDef, Service,
    SubscriptionContext, SubscriptionDef,
};
use serde_json::{Value, json};

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::logs;
use crate::support::{ARRIVAL, Collector, eventually_some};

/// The root span named `name` whose destination is `destination`: the case's own, since every
/// destination carries the case's unique prefix.
async fn root(recorder: &SpanRecorder, name: &str, destination: &str) -> RecordedSpan {
    let what = format!("a {name} span for {destination}");
    eventually_some(&what, ARRIVAL, || {
        let found = recorder
            .finished()
            .into_iter()
            .find(|s| s.name == name && s.field("messaging.destination.name") == Some(destination));
        async move { found }
    })
    .await
}

/// The spans of `trace` once `count` of them have finished (more may follow).
async fn trace_of(recorder: &SpanRecorder, trace: &str, count: usize) -> Vec<RecordedSpan> {
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    loop {
        let spans = recorder.trace(trace);
        if spans.len() >= count {
            return spans;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "expected {count} spans in trace {trace}, found {}:\n{}",
                spans.len(),
                SpanRecorder::render_tree(&spans, &["purista.attempt", "purista.outcome"])
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The one span named `name` in `spans` for which `pick` holds.
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
        SpanRecorder::render_tree(spans, &["purista.attempt", "purista.outcome"])
    );
    found[0]
}

fn assert_child(child: &RecordedSpan, parent: &RecordedSpan) {
    assert!(
        child.parent_span_id().is_some() && child.parent_span_id() == parent.span_id(),
        "{} must be a child of {} (its parent is {:?}, the {} is {:?})",
        child.name,
        parent.name,
        child.parent_span_id(),
        parent.name,
        parent.span_id()
    );
    assert_eq!(child.trace_id(), parent.trace_id());
}

/// Every span names the messaging system of the bridge that carried its message (the bridge's
/// `messaging_system`, OpenTelemetry's value such as `rabbitmq`).
fn assert_system(spans: &[&RecordedSpan], system: &str) {
    for span in spans {
        assert_eq!(
            span.field("messaging.system"),
            Some(system),
            "{} names another messaging system",
            span.name
        );
    }
}

/// An invocation from one instance, handled on a second, whose handler emits an event that a
/// third handles: four spans, one trace, each the child of the one before, on any broker.
pub async fn one_request_is_one_trace_across_instances(h: Arc<dyn Harness>) {
    let recorder = logs::spans();
    let mut env = TestEnv::new(&h, 3).await;
    let orders = env.name("orders");
    let placed = env.name("placed");
    let event = placed.clone();
    env.start(
        1,
        Service::builder(&orders, "1").command(CommandDef::new(
            "place",
            move |ctx: Context, order: String| {
                let event = event.clone();
                async move {
                    ctx.emit(&event, json!({ "order": order })).await?;
                    Ok(format!("placed {order}"))
                }
            },
        )),
    )
    .await;
    let seen: Arc<Collector<Value>> = Collector::new();
    let sink = seen.clone();
    env.start(
        2,
        Service::builder(env.name("shipping"), "1").subscription(
            SubscriptionDef::new("onPlaced", move |_ctx: SubscriptionContext, e: Value| {
                let sink = sink.clone();
                async move {
                    sink.push(e);
                    Ok(Outcome::Ack)
                }
            })
            .event_name(&placed),
        ),
    )
    .await;
    let client = env.start(0, Service::builder(env.name("web"), "1")).await;

    let answer: String = client
        .invoke(Address::new(&orders, "1", "place"), "o-1", Empty)
        .await
        .unwrap_or_else(|e| panic!("the command failed: {e}"));
    assert_eq!(answer, "placed o-1");
    seen.wait_for_len(1, ARRIVAL, "the event reaching the subscription")
        .await;

    let invoke = root(recorder, "purista.invoke", &format!("{orders}@1/place")).await;
    assert_eq!(
        invoke.parent_span_id(),
        None,
        "a fresh invocation is a root"
    );
    let trace = invoke.trace_id().expect("a trace id").to_string();
    let spans = trace_of(recorder, &trace, 4).await;
    let invoke = one(&spans, "purista.invoke", |_| true);
    let command = one(&spans, "purista.command", |_| true);
    let emit = one(&spans, "purista.emit", |_| true);
    let delivery = one(&spans, "purista.subscription", |_| true);
    assert_child(command, invoke);
    assert_child(emit, command);
    assert_child(delivery, emit);
    let system = env.bridge(0).messaging_system().to_string();
    assert_system(&[invoke, command, emit, delivery], &system);
    assert_eq!(delivery.field("purista.outcome"), Some("ack"));
    env.finish().await;
}

/// A delivery that is retried and then dead-lettered stays in its sender's trace: each attempt
/// is a child of the emit that sent it, with its attempt number and outcome, and the
/// dead-lettered message still carries the trace in `otp`.
pub async fn retries_and_dead_letters_stay_in_the_trace(h: Arc<dyn Harness>) {
    let recorder = logs::spans();
    let mut env = TestEnv::new(&h, 2).await;
    let event = env.name("failing");
    let target = env.name("dead-letters");
    let attempts: Arc<Collector<u32>> = Collector::new();
    let sink = attempts.clone();
    env.start(
        1,
        Service::builder(env.name("consumer"), "1").subscription(
            SubscriptionDef::new("retries", move |ctx: SubscriptionContext, _v: Value| {
                let sink = sink.clone();
                async move {
                    sink.push(ctx.attempt());
                    Ok(Outcome::retry())
                }
            })
            .event_name(&event)
            .max_attempts(2)
            .dead_letter_target(&target),
        ),
    )
    .await;
    let publisher = env
        .start(0, Service::builder(env.name("publisher"), "1"))
        .await;
    publisher
        .emit(&event, json!({ "n": 1 }))
        .await
        .unwrap_or_else(|e| panic!("emit failed: {e}"));
    attempts.wait_for_len(2, ARRIVAL, "both attempts").await;

    let emit = root(recorder, "purista.emit", &event).await;
    let trace = emit.trace_id().expect("a trace id").to_string();
    let spans = trace_of(recorder, &trace, 3).await;
    let emit = one(&spans, "purista.emit", |_| true);
    let first = one(&spans, "purista.subscription", |s| {
        s.field("purista.attempt") == Some("1")
    });
    let second = one(&spans, "purista.subscription", |s| {
        s.field("purista.attempt") == Some("2")
    });
    assert_child(first, emit);
    assert_child(second, emit);
    assert_eq!(first.field("purista.outcome"), Some("retry"));
    assert_eq!(second.field("purista.outcome"), Some("dead_letter"));

    let bridge = env.bridge(0);
    let dead = eventually_some("the message in its dead-letter target", ARRIVAL, || {
        let (bridge, target) = (bridge.clone(), target.clone());
        async move {
            let entries = bridge.inspect_dead_letters(&target, 10).await.ok()?;
            entries.into_iter().find_map(|e| e.envelope)
        }
    })
    .await;
    let carried = read_otp(dead.otp.as_deref().expect("the dead letter carries otp"))
        .expect("a W3C carrier")
        .expect("a trace context");
    assert_eq!(
        carried.trace_id_hex(),
        trace,
        "the dead-lettered message left the trace"
    );
    env.finish().await;
}

/// A job enqueued by a command handler runs in the command's trace: invoke → command →
/// enqueue → job, whatever broker carries the command.
pub async fn a_job_continues_the_trace_of_the_command_that_enqueued_it(h: Arc<dyn Harness>) {
    let recorder = logs::spans();
    let mut env = TestEnv::new(&h, 2).await;
    let queue = format!("{}.traced", env.prefix);
    let ran: Arc<Collector<u64>> = Collector::new();
    let sink = ran.clone();
    let worker = QueueWorkerDef::new(&queue, move |_ctx: JobContext, n: u64, _p: Empty| {
        let sink = sink.clone();
        async move {
            sink.push(n);
            Ok(())
        }
    })
    .lease_wait(Duration::from_millis(100));
    let q = queue.clone();
    let enqueue = CommandDef::new("enqueue", move |ctx: Context, n: u64, _p: Empty| {
        let q = q.clone();
        async move {
            ctx.enqueue(&q, n, Empty).await?;
            Ok(())
        }
    });
    let worker_service = env.name("worker");
    env.start(
        0,
        Service::builder(&worker_service, "1")
            .queue_worker(worker)
            .command(enqueue),
    )
    .await;
    let client = env
        .start(1, Service::builder(env.name("client"), "1"))
        .await;
    client
        .invoke::<Value>(Address::new(&worker_service, "1", "enqueue"), 7u64, Empty)
        .await
        .unwrap_or_else(|e| panic!("the enqueuing command failed: {e}"));
    ran.wait_for_len(1, ARRIVAL, "the job running").await;

    let invoke = root(
        recorder,
        "purista.invoke",
        &format!("{worker_service}@1/enqueue"),
    )
    .await;
    let trace = invoke.trace_id().expect("a trace id").to_string();
    let spans = trace_of(recorder, &trace, 4).await;
    let invoke = one(&spans, "purista.invoke", |_| true);
    let command = one(&spans, "purista.command", |_| true);
    let enqueued = one(&spans, "purista.enqueue", |_| true);
    let job = one(&spans, "purista.job", |_| true);
    assert_child(command, invoke);
    assert_child(enqueued, command);
    assert_child(job, enqueued);
    env.finish().await;
}
