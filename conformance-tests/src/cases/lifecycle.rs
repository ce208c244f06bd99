//! Lifecycle, in-flight work and drain (DESIGN §3.8).

use std::sync::Arc;
use std::time::Duration;

use purista_core::{
    AddressFilter, CommandDef, CommandError, Context, Empty, InvokeOptions, JobContext,
    MessageType, Need, QueueConfig, QueueWorkerDef, Service, StatusCode, StreamDef, StreamItem,
    StreamWriter, SubscriptionContext, SubscriptionDef, SubscriptionFilter, WorkKind,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::env::TestEnv;
use crate::gate::declares;
use crate::harness::Harness;
use crate::support::{ARRIVAL, Collector, Stopwatch, eventually, recording};

/// A gate handlers wait on until the case opens it.
#[derive(Clone)]
struct Gate(watch::Receiver<bool>);

impl Gate {
    fn new() -> (watch::Sender<bool>, Gate) {
        let (tx, rx) = watch::channel(false);
        (tx, Gate(rx))
    }

    async fn wait(mut self) {
        let _ = self.0.wait_for(|open| *open).await;
    }
}

/// Info messages arrive in start order (init, one function-added per command with its
/// metadata, ready), and drain then shutdown on shutdown.
pub async fn info_messages_arrive_in_order_with_function_metadata(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let watched = env.name("watched");
    let seen = Collector::new();
    env.start(
        0,
        Service::builder(env.name("observer"), "1").subscription(
            recording("lifecycle", seen.clone())
                .filter(SubscriptionFilter::new().sent_from(AddressFilter {
                    service_name: Some(watched.clone()),
                    ..AddressFilter::default()
                }))
                .prefetch(1),
        ),
    )
    .await;
    let noop = |name: &str| {
        CommandDef::new(
            name,
            |_ctx: Context, _p: Empty, _q: Empty| async move { Ok(()) },
        )
    };
    let service = env
        .start(
            1,
            Service::builder(&watched, "1")
                .description("watched service")
                .command(
                    noop("placeOrder")
                        .description("places an order")
                        .metadata(json!({"schema": {"type": "object"}}))
                        .success_event("orderPlaced"),
                )
                .command(noop("cancelOrder").description("cancels an order")),
        )
        .await;
    let started = seen
        .wait_for_len(4, ARRIVAL, "init, two function-added and ready")
        .await;
    let types: Vec<MessageType> = started.iter().map(|e| e.message_type).collect();
    assert_eq!(
        types,
        vec![
            MessageType::InfoServiceInit,
            MessageType::InfoServiceFunctionAdded,
            MessageType::InfoServiceFunctionAdded,
            MessageType::InfoServiceReady,
        ],
        "info messages out of order"
    );
    let added = &started[1];
    assert_eq!(
        added.sender.service_target, "placeOrder",
        "function-added names no target"
    );
    // PURISTA's shape: the expose block, the definition's metadata merged beside it.
    assert_eq!(
        added.payload["expose"]["contentTypeRequest"],
        json!("application/json"),
        "function-added without PURISTA's expose block: {}",
        added.payload
    );
    assert_eq!(added.payload["schema"], json!({"type": "object"}));
    assert_eq!(started[2].sender.service_target, "cancelOrder");
    assert!(
        started[0].payload.is_null() && started[3].payload.is_null(),
        "init and ready carry no payload"
    );
    assert!(
        started
            .iter()
            .all(|e| e.sender.instance_id == env.bridge(1).instance_id()),
        "info messages do not carry the service's instance"
    );

    service
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
    let all = seen.wait_for_len(6, ARRIVAL, "drain and shutdown").await;
    assert_eq!(
        all[4..].iter().map(|e| e.message_type).collect::<Vec<_>>(),
        vec![
            MessageType::InfoServiceDrain,
            MessageType::InfoServiceShutdown
        ],
        "drain and shutdown notices out of order"
    );
    env.finish().await;
}

/// While handlers run, in-flight counts them by kind; when they finish it returns to 0.
pub async fn in_flight_counts_running_handlers_by_kind(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let streams = declares(&h, &Need::Streams);
    let queues = env.deployment.queues.is_some();
    let (open, gate) = Gate::new();
    let event = env.name("busy");
    let queue = format!("{}.busy", env.prefix);

    let g = gate.clone();
    let mut busy = Service::builder(env.name("busy"), "1")
        .command(CommandDef::new(
            "block",
            move |_ctx: Context, _p: Empty, _q: Empty| {
                let g = g.clone();
                async move {
                    g.wait().await;
                    Ok(())
                }
            },
        ))
        .subscription({
            let g = gate.clone();
            SubscriptionDef::new("block", move |_ctx: SubscriptionContext, _v: Value| {
                let g = g.clone();
                async move {
                    g.wait().await;
                    Ok(())
                }
            })
            .event_name(&event)
        });
    if streams {
        let g = gate.clone();
        busy = busy.stream(StreamDef::new(
            "block",
            move |_ctx: Context, _p: Empty, _q: Empty, _w: StreamWriter| {
                let g = g.clone();
                async move {
                    g.wait().await;
                    Ok(())
                }
            },
        ));
    }
    if queues {
        let g = gate.clone();
        busy = busy.queue_worker(
            QueueWorkerDef::new(&queue, move |_ctx: JobContext, _p: Value, _q: Empty| {
                let g = g.clone();
                async move {
                    g.wait().await;
                    Ok(())
                }
            })
            .config(QueueConfig {
                visibility_timeout: Duration::from_secs(30),
                ..QueueConfig::default()
            })
            .lease_wait(Duration::from_millis(100)),
        );
    }
    let busy = env.start(1, busy).await;
    let client = env
        .start(0, Service::builder(env.name("client"), "1"))
        .await;
    assert_eq!(
        busy.in_flight().total,
        0,
        "in-flight is not 0 before any work"
    );

    let invoking = {
        let client = client.clone();
        let to = purista_core::Address::new(env.name("busy"), "1", "block");
        tokio::spawn(async move {
            client
                .invoke_with::<Value>(to, Empty, Empty, InvokeOptions::ttl(ARRIVAL))
                .await
        })
    };
    client.emit(&event, json!({})).await.expect("emit succeeds");
    let mut reader = if streams {
        Some(
            client
                .open_stream(
                    purista_core::Address::new(env.name("busy"), "1", "block"),
                    Empty,
                    Empty,
                    Some(ARRIVAL),
                )
                .await
                .expect("opening the stream succeeds"),
        )
    } else {
        None
    };
    if queues {
        busy.enqueue(&queue, json!({}), Empty)
            .await
            .expect("enqueue");
    }
    let expected = |stream: usize, queue: usize| (1usize, 1usize, stream, queue);
    let want = expected(usize::from(streams), usize::from(queues));
    eventually(
        "in-flight counts each running handler by kind",
        ARRIVAL,
        || {
            let k = busy.in_flight().by_kind;
            async move { (k.command, k.subscription, k.stream, k.queue) == want }
        },
    )
    .await;
    let now = busy.in_flight();
    assert_eq!(
        now.total,
        want.0 + want.1 + want.2 + want.3,
        "total is not the sum by kind"
    );
    assert!(
        client.bridge().in_flight().by_kind.command >= 1,
        "the caller's bridge does not count its pending invocation"
    );

    let _ = open.send(true);
    eventually(
        "in-flight returns to 0 when the handlers finish",
        ARRIVAL,
        || {
            let total = busy.in_flight().total;
            async move { total == 0 }
        },
    )
    .await;
    invoking
        .await
        .expect("the invoking task did not panic")
        .expect("the blocked command completes once released");
    if let Some(r) = reader.as_mut() {
        assert!(
            matches!(r.next().await, Some(StreamItem::Complete(_))),
            "the released stream did not complete"
        );
    }
    eventually("the caller's pending invocation is gone", ARRIVAL, || {
        let n = client.bridge().in_flight().by_kind.command;
        async move { n == 0 }
    })
    .await;
    env.finish().await;
}

/// Shutdown waits for running handlers (up to its deadline): the handler finishes, its caller
/// gets the answer, the report says everything completed.
pub async fn shutdown_waits_for_running_handlers(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let finished: Arc<Collector<()>> = Collector::new();
    let sink = finished.clone();
    let slow = CommandDef::new("slow", move |_ctx: Context, _p: Empty, _q: Empty| {
        let sink = sink.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            sink.push(());
            Ok(json!("finished"))
        }
    });
    let server = env
        .start(1, Service::builder(env.name("server"), "1").command(slow))
        .await;
    let client = env
        .start(0, Service::builder(env.name("client"), "1"))
        .await;
    let invoking = {
        let to = purista_core::Address::new(env.name("server"), "1", "slow");
        tokio::spawn(async move {
            client
                .invoke_with::<Value>(to, Empty, Empty, InvokeOptions::ttl(ARRIVAL))
                .await
        })
    };
    eventually("the slow handler is running", ARRIVAL, || {
        let n = server.in_flight().by_kind.command;
        async move { n == 1 }
    })
    .await;
    let report = server
        .shutdown(Instant::now() + Duration::from_secs(5))
        .await;
    assert_eq!(
        finished.len(),
        1,
        "shutdown returned before the running handler finished"
    );
    assert!(
        report.completed,
        "the drain report says work was left: {report:?}"
    );
    assert!(
        report.still_running.is_empty(),
        "the drain report lists work: {report:?}"
    );
    assert_eq!(server.in_flight().total, 0);
    let answer = invoking.await.expect("the invoking task did not panic");
    assert_eq!(
        answer.expect("the caller of a drained handler gets its answer"),
        json!("finished")
    );
    env.finish().await;
}

/// At the deadline shutdown stops waiting: pending invocations of the service fail with 503,
/// and the report names the handlers still running.
pub async fn shutdown_rejects_pending_invocations_and_reports_what_still_runs(h: Arc<dyn Harness>) {
    const DEADLINE: Duration = Duration::from_millis(300);
    let mut env = TestEnv::new(&h, 3).await;
    let (open, gate) = Gate::new();
    let stuck = |name: &str, gate: Gate| {
        CommandDef::new(name, move |_ctx: Context, _p: Empty, _q: Empty| {
            let g = gate.clone();
            async move {
                g.wait().await;
                Ok(())
            }
        })
    };
    let draining_name = env.name("draining");
    let draining = env
        .start(
            0,
            Service::builder(&draining_name, "1").command(stuck("stuck", gate.clone())),
        )
        .await;
    env.start(
        1,
        Service::builder(env.name("remote"), "1").command(stuck("hang", gate.clone())),
    )
    .await;
    let outsider = env
        .start(2, Service::builder(env.name("outsider"), "1"))
        .await;

    let pending = {
        let draining = draining.clone();
        let to = purista_core::Address::new(env.name("remote"), "1", "hang");
        tokio::spawn(async move {
            draining
                .invoke_with::<Value>(to, Empty, Empty, InvokeOptions::ttl(ARRIVAL))
                .await
        })
    };
    let running = {
        let to = purista_core::Address::new(&draining_name, "1", "stuck");
        tokio::spawn(async move {
            outsider
                .invoke_with::<Value>(to, Empty, Empty, InvokeOptions::ttl(ARRIVAL))
                .await
        })
    };
    eventually(
        "the stuck handler runs and the invocation is pending",
        ARRIVAL,
        || {
            let running = draining.in_flight().by_kind.command;
            let pending = draining.bridge().in_flight().by_kind.command;
            async move { running == 1 && pending >= 1 }
        },
    )
    .await;

    let clock = Stopwatch::start();
    let report = draining.shutdown(clock.began() + DEADLINE).await;
    clock.assert_on_time("shutdown at its deadline", DEADLINE);
    assert!(
        !report.completed,
        "the report claims everything completed: {report:?}"
    );
    assert!(
        report
            .still_running
            .contains(&(WorkKind::Command, format!("{draining_name}@1/stuck"))),
        "the report does not name the handler still running: {report:?}"
    );
    assert_eq!(
        report.rejected_invocations, 1,
        "the report does not count the rejected invocation: {report:?}"
    );
    let rejected: Result<Value, CommandError> =
        tokio::time::timeout(Duration::from_secs(2), pending)
            .await
            .expect("a pending invocation is rejected at the deadline, not left hanging")
            .expect("the invoking task did not panic");
    let err = rejected.expect_err("a pending invocation of a drained service cannot succeed");
    assert_eq!(
        err.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "wrong status: {err}"
    );

    let after = draining
        .invoke_with::<Value>(
            purista_core::Address::new(env.name("remote"), "1", "hang"),
            Empty,
            Empty,
            InvokeOptions::ttl(Duration::from_secs(2)),
        )
        .await
        .expect_err("a shut-down service cannot invoke");
    assert_eq!(
        after.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "wrong status: {after}"
    );

    let _ = open.send(true);
    let _ = running.await;
    env.finish().await;
}

/// A start that fails part-way undoes what it registered: a service whose subscription clashes
/// with one already registered on its instance (the start fails) leaves no command behind —
/// invoking the command it had registered before the failure fails with 502 at once or 504 at
/// the ttl, it is not served.
pub async fn a_failed_start_leaves_nothing_registered(h: Arc<dyn Harness>) {
    const TTL: Duration = Duration::from_millis(500);
    let mut env = TestEnv::new(&h, 2).await;
    let name = env.name("clashing");
    let event = env.name("clash");
    let noop = || {
        SubscriptionDef::new("clash", |_ctx: SubscriptionContext, _v: Value| async move {
            Ok(())
        })
        .event_name(&event)
    };
    env.start(0, Service::builder(&name, "1").subscription(noop()))
        .await;
    let leftover = CommandDef::new(
        "leftover",
        |_ctx: Context, _p: Empty, _q: Empty| async move { Ok(json!("served")) },
    );
    let second = Service::builder(&name, "1")
        .command(leftover)
        .subscription(noop());
    if let Ok(_started) = env.try_start(0, second).await {
        panic!(
            "a second registration of subscription {name}@1/clash on one instance started; the case needs that start to fail"
        );
    }
    let client = env
        .start(1, Service::builder(env.name("client"), "1"))
        .await;
    let clock = Stopwatch::start();
    let result = client
        .invoke_with::<Value>(
            purista_core::Address::new(&name, "1", "leftover"),
            Empty,
            Empty,
            InvokeOptions::ttl(TTL),
        )
        .await;
    let took = clock.elapsed();
    match result {
        Ok(v) => panic!("a command of a service whose start failed is still served: {v}"),
        Err(e) if e.status == StatusCode::BAD_GATEWAY => clock.assert_by_at("the 502", took, TTL),
        Err(e) if e.status == StatusCode::GATEWAY_TIMEOUT => {
            clock.assert_on_time_at("the 504", took, TTL)
        }
        Err(e) => panic!("the leftover command failed with {e}, not 502 or 504"),
    }
    env.finish().await;
}
