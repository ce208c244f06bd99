//! Metrics of the service runtime (issue 13) on the in-process bridge: the counters, gauges and
//! histograms of `purista_core::observe::metrics` move as the behaviours happen — commands
//! answered and failed, a subscription's retry and dead letter, a pause, a job, invocations.
//!
//! A small recorder is installed as the process's `metrics` recorder; tests of this binary
//! tell their series apart by their service names.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use parking_lot::Mutex;
use purista_bridge_default::{MemoryBroker, MemoryQueueBridge};
use purista_core::observe::metrics::names;
use purista_core::service::SubscriptionContext;
use purista_core::{
    Address, CommandDef, Context, Empty, EventBridge, HandledError, JobContext, JobSettlement,
    Outcome, QueueWorkerDef, Service, StatusCode, SubscriptionDef, SubscriptionOperator,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use common::eventually;

type Labels = BTreeMap<String, String>;

/// One series: its name and labels.
type Series = (String, Labels);

#[derive(Default)]
struct Values {
    counters: BTreeMap<Series, Arc<AtomicU64>>,
    gauges: BTreeMap<Series, Arc<AtomicU64>>,
    histograms: BTreeMap<Series, Arc<Samples>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().push(value);
    }
}

/// Keeps every series in memory.
#[derive(Default, Clone)]
struct Memory(Arc<Mutex<Values>>);

fn series(key: &Key) -> Series {
    let labels = key
        .labels()
        .map(|l| (l.key().to_string(), l.value().to_string()))
        .collect();
    (key.name().to_string(), labels)
}

impl Recorder for Memory {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let cell = self
            .0
            .lock()
            .counters
            .entry(series(key))
            .or_default()
            .clone();
        Counter::from_arc(cell)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let cell = self.0.lock().gauges.entry(series(key)).or_default().clone();
        Gauge::from_arc(cell)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let cell = self
            .0
            .lock()
            .histograms
            .entry(series(key))
            .or_default()
            .clone();
        Histogram::from_arc(cell)
    }
}

fn matches(labels: &Labels, want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
}

impl Memory {
    /// The sum of the counters `name` whose labels include `want`.
    fn counter(&self, name: &str, want: &[(&str, &str)]) -> u64 {
        let values = self.0.lock();
        values
            .counters
            .iter()
            .filter(|((n, l), _)| n == name && matches(l, want))
            .map(|(_, c)| CounterValue(c).get())
            .sum()
    }

    /// The sum of the gauges `name` whose labels include `want`.
    fn gauge(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let values = self.0.lock();
        values
            .gauges
            .iter()
            .filter(|((n, l), _)| n == name && matches(l, want))
            .map(|(_, g)| f64::from_bits(g.load(Ordering::Acquire)))
            .sum()
    }

    /// Every sample of the histograms `name` whose labels include `want`.
    fn samples(&self, name: &str, want: &[(&str, &str)]) -> Vec<f64> {
        let values = self.0.lock();
        values
            .histograms
            .iter()
            .filter(|((n, l), _)| n == name && matches(l, want))
            .flat_map(|(_, h)| h.0.lock().clone())
            .collect()
    }
}

struct CounterValue<'a>(&'a AtomicU64);

impl CounterValue<'_> {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// The process's recorder, installed on first use.
fn recorder() -> &'static Memory {
    static MEMORY: OnceLock<Memory> = OnceLock::new();
    MEMORY.get_or_init(|| {
        let memory = Memory::default();
        metrics::set_global_recorder(memory.clone())
            .expect("no other metrics recorder in this test binary");
        memory
    })
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test]
async fn commands_count_answers_and_failures_with_durations_and_invocations_their_latency() {
    let m = recorder();
    let broker = MemoryBroker::new();
    let service = Service::builder("metrics-cmd", "1")
        .command(CommandDef::new(
            "check",
            |_ctx: Context, n: u32| async move {
                if n == 0 {
                    return Err(HandledError::new(StatusCode(422), "zero").into());
                }
                Ok(n)
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("starts");
    let at = Address::new("metrics-cmd", "1", "check");
    let ok: u32 = service.invoke(at.clone(), 7, Empty).await.expect("answers");
    assert_eq!(ok, 7);
    service
        .invoke::<u32>(at, 0, Empty)
        .await
        .expect_err("a handled error");

    let reg = [
        ("messaging.destination.name", "metrics-cmd@1/check"),
        ("purista.kind", "command"),
        ("messaging.system", "default"),
    ];
    let outcome = |o: &'static str| {
        let mut w = reg.to_vec();
        w.push(("purista.outcome", o));
        m.counter(names::SETTLED, &w)
    };
    assert_eq!(outcome("ok"), 1);
    assert_eq!(outcome("error"), 1);
    assert_eq!(m.samples(names::PROCESS_DURATION, &reg).len(), 2);
    assert_eq!(
        m.gauge(names::IN_FLIGHT, &reg),
        0.0,
        "nothing runs any more"
    );

    let client = [("purista.service.name", "metrics-cmd")];
    let mut invoke = client.to_vec();
    invoke.push(("messaging.operation.name", "invoke"));
    assert_eq!(m.counter(names::SENT, &invoke), 2);
    assert_eq!(m.counter(names::INVOKE_FAILURES, &client), 1);
    let latencies = m.samples(names::CLIENT_OPERATION_DURATION, &invoke);
    assert_eq!(latencies.len(), 2);
    assert!(
        latencies.iter().all(|s| *s >= 0.0 && *s < 5.0),
        "{latencies:?}"
    );

    service.shutdown(deadline()).await;
}

#[tokio::test]
async fn a_running_handler_is_in_flight_until_it_returns() {
    let m = recorder();
    let broker = MemoryBroker::new();
    let gate = Arc::new(tokio::sync::Notify::new());
    let release = gate.clone();
    let service = Service::builder("metrics-slow", "1")
        .command(CommandDef::new("wait", move |_ctx: Context, _v: Value| {
            let gate = gate.clone();
            async move {
                gate.notified().await;
                Ok(())
            }
        }))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("starts");
    let reg = [("messaging.destination.name", "metrics-slow@1/wait")];
    let caller = {
        let s = service.context();
        tokio::spawn(async move {
            s.invoke::<()>(Address::new("metrics-slow", "1", "wait"), 1, Empty)
                .await
        })
    };
    eventually("the handler to be in flight", || {
        m.gauge(names::IN_FLIGHT, &reg) == 1.0
    })
    .await;
    release.notify_one();
    caller.await.expect("joined").expect("answers");
    assert_eq!(m.gauge(names::IN_FLIGHT, &reg), 0.0);

    service.shutdown(deadline()).await;
}

#[tokio::test]
async fn a_subscription_counts_its_retry_its_dead_letter_and_a_pause() {
    let m = recorder();
    let broker = MemoryBroker::new();
    let service = Service::builder("metrics-sub", "1")
        .subscription(
            SubscriptionDef::new(
                "alwaysFails",
                |_ctx: SubscriptionContext, _e: Value| async move { Ok(Outcome::retry()) },
            )
            .event_name("metricsFailing")
            .max_attempts(2)
            .dead_letter_target("metrics-sub.dead-letter"),
        )
        .subscription(
            SubscriptionDef::new("stops", |_ctx: SubscriptionContext, _e: Value| async move {
                Ok(Outcome::StopConsumer {
                    reason: "downstream is down".into(),
                })
            })
            .event_name("metricsStop")
            .pausable(),
        )
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("starts");

    service
        .emit("metricsFailing", json!({ "n": 1 }))
        .await
        .expect("emitted");
    service
        .emit("metricsStop", json!({ "n": 1 }))
        .await
        .expect("emitted");

    let kind = ("purista.kind", "subscription");
    let failing = |o: &'static str| {
        m.counter(
            names::SETTLED,
            &[
                kind,
                ("messaging.destination.name", "metrics-sub@1/alwaysFails"),
                ("purista.outcome", o),
            ],
        )
    };
    eventually("the dead letter to be counted", || {
        failing("dead_letter") == 1
    })
    .await;
    assert_eq!(failing("retry"), 1, "the first attempt was retried");
    assert_eq!(failing("ok"), 0);
    eventually("the pause to be counted", || {
        m.counter(
            names::SETTLED,
            &[
                kind,
                ("messaging.destination.name", "metrics-sub@1/stops"),
                ("purista.outcome", "pause"),
            ],
        ) == 1
    })
    .await;
    assert_eq!(
        m.samples(
            names::PROCESS_DURATION,
            &[("messaging.destination.name", "metrics-sub@1/alwaysFails")]
        )
        .len(),
        2,
        "one handler run per attempt"
    );
    assert_eq!(
        m.counter(
            names::SENT,
            &[
                ("purista.service.name", "metrics-sub"),
                ("messaging.operation.name", "emit")
            ]
        ),
        2
    );

    service.shutdown(deadline()).await;
}

#[tokio::test]
async fn jobs_count_their_attempts_and_enqueues() {
    let m = recorder();
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let done = Arc::new(Mutex::new(0u32));
    let seen = done.clone();
    let service = Service::builder("metrics-jobs", "1")
        .queue_bridge(queues.clone())
        .queue_worker(
            QueueWorkerDef::new("metrics-labels", move |_ctx: JobContext, _n: u32| {
                let seen = seen.clone();
                async move {
                    *seen.lock() += 1;
                    Ok(())
                }
            })
            .lease_wait(Duration::from_millis(20)),
        )
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("starts");
    let ctx = service.context();
    for n in 0..3u32 {
        ctx.enqueue("metrics-labels", n, Empty)
            .await
            .expect("enqueued");
    }
    eventually("three jobs done", || *done.lock() == 3).await;
    let job = [
        ("purista.kind", "job"),
        ("messaging.destination.name", "metrics-labels"),
    ];
    eventually("three completions counted", || {
        let mut w = job.to_vec();
        w.push(("purista.outcome", "ok"));
        m.counter(names::SETTLED, &w) == 3
    })
    .await;
    assert_eq!(m.samples(names::PROCESS_DURATION, &job).len(), 3);
    assert_eq!(
        m.counter(
            names::SENT,
            &[
                ("purista.service.name", "metrics-jobs"),
                ("messaging.operation.name", "enqueue")
            ]
        ),
        3
    );

    service.shutdown(deadline()).await;
}

#[tokio::test]
async fn sampled_state_follows_paused_consumers_and_each_queue_s_jobs() {
    let m = recorder();
    let broker = MemoryBroker::new();
    let bridge = Arc::new(broker.bridge());
    let queues = Arc::new(MemoryQueueBridge::new());
    let gate = Arc::new(tokio::sync::Notify::new());
    let held = gate.clone();
    let paused_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = Service::builder("metrics-state", "1")
        .state_metrics_interval(Duration::from_millis(20))
        .queue_bridge(queues.clone())
        .subscription(
            SubscriptionDef::new("pauses", move |_ctx: SubscriptionContext, _e: Value| {
                let first = !paused_once.swap(true, std::sync::atomic::Ordering::SeqCst);
                async move {
                    // Pauses once; the redelivery after the resume is settled.
                    Ok(if first {
                        Outcome::StopConsumer {
                            reason: "downstream is down".into(),
                        }
                    } else {
                        Outcome::Ack
                    })
                }
            })
            .event_name("metricsStatePause")
            .pausable(),
        )
        .queue_worker(
            QueueWorkerDef::new("metrics-state-jobs", move |_ctx: JobContext, n: u32| {
                let held = held.clone();
                async move {
                    Ok(match n {
                        0 => JobSettlement::DeadLetter {
                            reason: "unusable".into(),
                        },
                        1 => JobSettlement::Retry {
                            delay: Some(Duration::from_secs(600)),
                            reason: None,
                        },
                        _ => {
                            held.notified().await;
                            JobSettlement::Complete
                        }
                    })
                }
            })
            .lease_wait(Duration::from_millis(20)),
        )
        .build()
        .start(bridge.clone())
        .await
        .expect("starts");
    let instance = bridge.instance_id().to_string();
    let on_bridge = [
        ("messaging.system", "default"),
        ("purista.instance.id", instance.as_str()),
    ];
    let queue = [("messaging.destination.name", "metrics-state-jobs")];
    assert_eq!(m.gauge(names::PAUSED_CONSUMERS, &on_bridge), 0.0);

    // One job dead-lettered, one waiting for its retry, one held in its handler, two waiting
    // for the one worker slot.
    let ctx = service.context();
    for n in 0..5u32 {
        ctx.enqueue("metrics-state-jobs", n, Empty)
            .await
            .expect("enqueued");
    }
    eventually("the queue's state sampled", || {
        m.gauge(names::QUEUE_DEAD_LETTERED, &queue) == 1.0
            && m.gauge(names::QUEUE_DELAYED, &queue) == 1.0
            && m.gauge(names::QUEUE_LEASED, &queue) == 1.0
            && m.gauge(names::QUEUE_DEPTH, &queue) == 2.0
    })
    .await;

    // A consumer that pauses itself shows up, and goes once resumed.
    service
        .emit("metricsStatePause", json!({ "n": 1 }))
        .await
        .expect("emitted");
    eventually("the paused consumer sampled", || {
        m.gauge(names::PAUSED_CONSUMERS, &on_bridge) == 1.0
    })
    .await;
    let paused = bridge.paused_subscription_consumers();
    assert_eq!(paused.len(), 1);
    assert!(
        bridge
            .resume_subscription_consumer(&paused[0].key)
            .await
            .expect("resumes")
    );
    eventually("the resumed consumer sampled", || {
        m.gauge(names::PAUSED_CONSUMERS, &on_bridge) == 0.0
    })
    .await;
    assert_eq!(m.counter(names::RECONNECTS, &on_bridge), 0);

    gate.notify_waiters();
    service.shutdown(deadline()).await;
}
