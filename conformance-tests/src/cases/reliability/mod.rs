//! Reliability under broker faults (DESIGN §4: reconnect, re-establish topology and consumers,
//! fail in-flight invocations with 503). Runs only for harnesses with broker-control hooks.
//! Events and invocations here; queue jobs in [`jobs`], health in [`health`].

mod health;
mod jobs;

pub use health::health_turns_unhealthy_during_an_outage_and_back;
pub use jobs::queue_jobs_survive_broker_faults;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use purista_core::{
    Address, CommandDef, Context, Empty, InvokeOptions, Need, Service, StatusCode,
    SubscriptionContext, SubscriptionDef,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::env::TestEnv;
use crate::harness::{BrokerControl, Harness};
use crate::support::{Collector, Stopwatch, eventually, until_reached};

/// The harness's broker control; panics when it cannot hand one out (the case was planned to
/// run, so the harness said it could).
async fn broker_control(h: &Arc<dyn Harness>) -> Arc<dyn BrokerControl> {
    h.control()
        .await
        .unwrap_or_else(|why| panic!("no broker to break for the `{}` harness: {why}", h.name()))
}

/// How long the suite gives a bridge to ride out one fault.
const RECOVERY: Duration = Duration::from_secs(50);

#[derive(Clone, Copy, Debug)]
enum Fault {
    DropConnections,
    Restart,
}

/// Strikes `faults` one after another while work goes on: the k-th of n once `done` (work
/// finished so far, e.g. events published) reached k/(n+1) of `total`. `what` names the work
/// in the failure message ("events are published").
async fn strike_along(
    control: &Arc<dyn BrokerControl>,
    env: &TestEnv,
    faults: &[Fault],
    total: usize,
    what: &str,
    done: &Arc<AtomicUsize>,
) {
    for (k, fault) in faults.iter().enumerate() {
        let share = total * (k + 1) / (faults.len() + 1);
        until_reached(
            &format!("{share} of the {what} before the {fault:?}"),
            RECOVERY,
            share,
            || done.load(Ordering::Relaxed),
        )
        .await;
        inject(control, env, *fault).await;
    }
}

async fn inject(control: &Arc<dyn BrokerControl>, env: &TestEnv, fault: Fault) {
    match fault {
        Fault::DropConnections => control.drop_connections(&env.prefix).await,
        Fault::Restart => control.restart().await,
    }
}

/// 10 000 at-least-once events from 4 publishers (the harness's [`Harness::fault_workload`]
/// share of them); the faults strike one after another, the k-th of n after k/(n+1) of the events were
/// published. Every event must arrive (duplicates allowed), consumed by the service that was
/// running before the faults.
async fn events_survive(h: Arc<dyn Harness>, faults: &[Fault]) {
    const PUBLISHERS: usize = 4;
    const FULL_PER_PUBLISHER: usize = 2_500;
    let workload = h.fault_workload();
    let per_publisher = workload.of(FULL_PER_PUBLISHER) as u64;
    let total = PUBLISHERS * per_publisher as usize;
    println!(
        "{PUBLISHERS} publishers × {per_publisher} events ({} % of the full {FULL_PER_PUBLISHER} each{}) across {faults:?}",
        workload.percent(),
        workload.why().map(|w| format!(": {w}")).unwrap_or_default()
    );
    let control = broker_control(&h).await;
    let mut env = TestEnv::on_broker(&h, &control, PUBLISHERS + 1).await;
    let event = env.name("reliable");
    let received: Arc<Collector<Result<(u64, u64), String>>> = Collector::new();
    let sink = received.clone();
    let consumer = SubscriptionDef::new("reliable", move |_ctx: SubscriptionContext, v: Value| {
        let sink = sink.clone();
        async move {
            sink.push(match (v["p"].as_u64(), v["n"].as_u64()) {
                (Some(p), Some(n)) => Ok((p, n)),
                _ => Err(v.to_string()),
            });
            Ok(())
        }
    })
    .event_name(&event)
    .durable(true)
    .require(Need::AtLeastOnce)
    .prefetch(64);
    env.start(
        PUBLISHERS,
        Service::builder(env.name("consumer"), "1").subscription(consumer),
    )
    .await;
    let mut publishers = Vec::new();
    for i in 0..PUBLISHERS {
        publishers.push(
            env.start(i, Service::builder(env.name("publisher"), "1"))
                .await,
        );
    }

    let published = Arc::new(AtomicUsize::new(0));
    // Publishing must work again RECOVERY after the last fault is over (set then). Not counted
    // from the start: a restart on a busy machine takes its time (a graceful stop, a boot),
    // and the case's own time limit bounds the whole.
    let recovered_by: Arc<parking_lot::Mutex<Option<Instant>>> = Arc::default();
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, service)| {
            let (event, published) = (event.clone(), published.clone());
            let recovered_by = recovered_by.clone();
            tokio::spawn(async move {
                for n in 0..per_publisher {
                    // Like a real publisher: retry until the broker takes it (duplicates are
                    // the consumer's business, losses are the bridge's).
                    while let Err(e) = service.emit(&event, json!({ "p": p, "n": n })).await {
                        let by = *recovered_by.lock();
                        assert!(
                            by.is_none_or(|by| Instant::now() < by),
                            "publishing still fails {RECOVERY:?} after the faults: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    published.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    strike_along(
        &control,
        &env,
        faults,
        total,
        "events are published",
        &published,
    )
    .await;
    *recovered_by.lock() = Some(Instant::now() + RECOVERY);
    for t in futures::future::join_all(tasks).await {
        t.expect("a publisher task panicked");
    }
    let expected: BTreeSet<(u64, u64)> = (0..PUBLISHERS as u64)
        .flat_map(|p| (0..per_publisher).map(move |n| (p, n)))
        .collect();
    // Bounded by a stall, not a deadline: at full size on an emulator the consumer may
    // still be working through the backlog when the last event is published.
    let got = received
        .wait_while_growing(RECOVERY, total, |r| {
            r.iter()
                .filter_map(|x| x.as_ref().ok())
                .collect::<BTreeSet<_>>()
                .len()
        })
        .await;
    let got = match got {
        Ok(r) | Err(r) => r,
    };
    let undecodable: Vec<&String> = got.iter().filter_map(|x| x.as_ref().err()).collect();
    assert!(
        undecodable.is_empty(),
        "{} events arrived with their payload changed across {faults:?}, e.g. {:?}",
        undecodable.len(),
        undecodable.first()
    );
    let distinct: BTreeSet<(u64, u64)> = got.into_iter().filter_map(Result::ok).collect();
    let missing: Vec<_> = expected.difference(&distinct).collect();
    let extra: Vec<_> = distinct.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "across {faults:?}, {} of {} at-least-once events were lost (e.g. {:?}) and {} arrived that nobody published (e.g. {:?})",
        missing.len(),
        total,
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>()
    );
    env.finish().await;
}

/// A dropped connection in the middle of 10 000 events loses none of them.
pub async fn connection_drop_loses_no_events(h: Arc<dyn Harness>) {
    events_survive(h, &[Fault::DropConnections]).await
}

/// A broker restart in the middle of 10 000 events loses none of them.
pub async fn broker_restart_loses_no_events(h: Arc<dyn Harness>) {
    events_survive(h, &[Fault::Restart]).await
}

/// Two faults in one run — dropped connections, then a broker restart — in the middle of
/// 10 000 events lose none of them.
pub async fn two_faults_in_one_run_lose_no_events(h: Arc<dyn Harness>) {
    events_survive(h, &[Fault::DropConnections, Fault::Restart]).await
}

/// Invocations made while the broker is away fail with 503 (or 504 at their ttl) or complete;
/// none hangs past its ttl, and invocations succeed again afterwards without a restart.
///
/// 502 ("nobody serves this") is a failure here: after a fault a caller may be back before the
/// serving instance has re-created its broker state (RabbitMQ: the command queue it consumes),
/// and a bridge must not report the handler as gone because of that race.
pub async fn invocations_during_an_outage_fail_or_complete_within_ttl(h: Arc<dyn Harness>) {
    const TTL: Duration = Duration::from_millis(500);
    let control = broker_control(&h).await;
    let mut env = TestEnv::on_broker(&h, &control, 2).await;
    let echo = CommandDef::new(
        "echo",
        |_ctx: Context, n: u64, _p: Empty| async move { Ok(n) },
    );
    env.start(1, Service::builder(env.name("server"), "1").command(echo))
        .await;
    let client = env
        .start(0, Service::builder(env.name("client"), "1"))
        .await;
    let to = Address::new(env.name("server"), "1", "echo");

    for fault in [Fault::DropConnections, Fault::Restart] {
        let faulted = Arc::new(AtomicUsize::new(0));
        // Invocations must succeed again RECOVERY after the fault is over (set then).
        let recovered_by: Arc<parking_lot::Mutex<Option<Instant>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let caller = {
            let (client, to, faulted) = (client.clone(), to.clone(), faulted.clone());
            let (calls, recovered_by) = (calls.clone(), recovered_by.clone());
            tokio::spawn(async move {
                let mut successes_after = 0;
                let mut n = 0u64;
                while successes_after < 20 {
                    let by = *recovered_by.lock();
                    assert!(
                        by.is_none_or(|by| Instant::now() < by),
                        "invocations do not succeed again {RECOVERY:?} after a {fault:?}"
                    );
                    n += 1;
                    let clock = Stopwatch::start();
                    let r = client
                        .invoke_with::<u64>(to.clone(), n, Empty, InvokeOptions::ttl(TTL))
                        .await;
                    let took = clock.elapsed();
                    calls.fetch_add(1, Ordering::Relaxed);
                    clock.assert_by_at(
                        &format!("an invocation during a {fault:?} (ttl {TTL:?}) returning"),
                        took,
                        TTL,
                    );
                    match r {
                        Ok(v) => {
                            assert_eq!(v, n, "an invocation got another invocation's answer");
                            if faulted.load(Ordering::Acquire) == 1 {
                                successes_after += 1;
                            }
                        }
                        Err(e) => {
                            assert!(
                                matches!(
                                    e.status,
                                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
                                ),
                                "an invocation during a {fault:?} failed with {e}, not 503/504"
                            );
                        }
                    }
                }
            })
        };
        eventually("invocations run before the fault", RECOVERY, || {
            let n = calls.load(Ordering::Relaxed);
            async move { n >= 10 }
        })
        .await;
        inject(&control, &env, fault).await;
        *recovered_by.lock() = Some(Instant::now() + RECOVERY);
        faulted.store(1, Ordering::Release);
        caller.await.expect("the invoking task panicked");
    }
    env.finish().await;
}

/// From the runbook: a command whose serving instance loses its connection while the handler
/// runs is not run a second time when the broker hands it out again (it is answered 503, or
/// not at all), and its caller hears 503 or 504 (or the one run's answer, where its own link
/// survived) within its ttl, never a hang. Commands served afterwards run normally.
pub async fn a_command_cut_off_mid_handling_is_not_run_twice(h: Arc<dyn Harness>) {
    const TTL: Duration = Duration::from_secs(5);
    const AFTER: u64 = 5;
    let control = broker_control(&h).await;
    let mut env = TestEnv::on_broker(&h, &control, 2).await;
    let runs: Arc<Collector<u64>> = Collector::new();
    let release = Arc::new(tokio::sync::Notify::new());
    let handler = {
        let (runs, release) = (runs.clone(), release.clone());
        CommandDef::new("slow", move |_ctx: Context, n: u64, _p: Empty| {
            let (runs, release) = (runs.clone(), release.clone());
            async move {
                runs.push(n);
                if n == 0 {
                    release.notified().await;
                }
                Ok(n)
            }
        })
    };
    env.start(
        1,
        Service::builder(env.name("server"), "1").command(handler),
    )
    .await;
    let client = env
        .start(0, Service::builder(env.name("client"), "1"))
        .await;
    let to = Address::new(env.name("server"), "1", "slow");

    let clock = Stopwatch::start();
    let first = {
        let (client, to, began) = (client.clone(), to.clone(), clock.began());
        tokio::spawn(async move {
            let answer = client
                .invoke_with::<u64>(to, 0u64, Empty, InvokeOptions::ttl(TTL))
                .await;
            // Timed where it returns: dropping the connections may take the broker longer.
            (answer, began.elapsed())
        })
    };
    runs.wait_for_len(1, RECOVERY, "the first command reaching its handler")
        .await;
    inject(&control, &env, Fault::DropConnections).await;
    release.notify_one();
    let (answer, took) = first.await.expect("the invoking task panicked");
    clock.assert_by_at("the answer to a command cut off mid-handling", took, TTL);
    match answer {
        // A bridge whose caller kept its link may still hear the one run's answer.
        Ok(v) => assert_eq!(v, 0, "the cut-off command got another command's answer"),
        Err(e) => assert!(
            matches!(
                e.status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
            ),
            "a command cut off mid-handling failed with {e}, not 503/504"
        ),
    }

    // Commands sent after the fault are served again; they queue behind anything the broker
    // hands out again, so once they were served, a second run of the first would have happened.
    let mut served = 0;
    let mut n = 0;
    let deadline = Instant::now() + RECOVERY;
    while served < AFTER {
        assert!(
            Instant::now() < deadline,
            "commands are not served again {RECOVERY:?} after the connection drop"
        );
        n += 1;
        match client
            .invoke_with::<u64>(to.clone(), n, Empty, InvokeOptions::ttl(TTL))
            .await
        {
            Ok(v) => {
                assert_eq!(v, n, "an invocation got another invocation's answer");
                served += 1;
            }
            // While the bridge reconnects, calls fail at once: pace them instead of spinning
            // on the runtime the reconnect needs.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let first_runs = runs.snapshot().iter().filter(|&&r| r == 0).count();
    assert_eq!(
        first_runs, 1,
        "the command cut off mid-handling ran {first_runs} times; commands are never run twice"
    );
    env.finish().await;
}
