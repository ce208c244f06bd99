//! Health across a broker outage (issue 10's "health turns error and back"): an operator's
//! probe must see the outage while it lasts and see it end, without restarting anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use purista_core::{BridgeHealth, Service};

use super::{Fault, RECOVERY, broker_control, inject};
use crate::env::TestEnv;
use crate::harness::Harness;
use crate::support::{Collector, Stopwatch, eventually};

/// How often the watcher asks for health: often enough to see a 2-second outage several
/// times, seldom enough not to load the broker (a bridge's health may cost a broker call).
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A health call answers within this, whatever the broker's state: an operator's probe that
/// hangs is no probe.
const HEALTH_ANSWERS_WITHIN: Duration = Duration::from_secs(5);

/// While the broker is down (a restart; on moto, the fault proxy's outage: connections refused,
/// then 503s, throttling, cut connections, 500s), a started bridge's health turns unhealthy;
/// once the broker is back, healthy again without a restart of the bridge. Every health call
/// answers within [`HEALTH_ANSWERS_WITHIN`] throughout.
pub async fn health_turns_unhealthy_during_an_outage_and_back(h: Arc<dyn Harness>) {
    let control = broker_control(&h).await;
    let mut env = TestEnv::on_broker(&h, &control, 1).await;
    env.start(0, Service::builder(env.name("watched"), "1"))
        .await;
    let bridge = env.bridge(0);
    let healthy = |what: &'static str| {
        let bridge = bridge.clone();
        eventually(what, RECOVERY, move || {
            let bridge = bridge.clone();
            async move { bridge.health().await.is_healthy() }
        })
    };
    healthy("the started bridge is healthy before the outage").await;

    // Every unhealthy answer, with its reason; or a call that did not answer in time.
    let unhealthy: Arc<Collector<Result<String, Duration>>> = Collector::new();
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (bridge, unhealthy, watching) = (bridge.clone(), unhealthy.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let clock = Stopwatch::start();
                match tokio::time::timeout(HEALTH_ANSWERS_WITHIN, bridge.health()).await {
                    Ok(BridgeHealth::Healthy) => {}
                    Ok(BridgeHealth::Unhealthy { reason }) => unhealthy.push(Ok(reason)),
                    Err(_) => unhealthy.push(Err(clock.elapsed())),
                }
                tokio::time::sleep(PROBE_EVERY).await;
            }
        })
    };
    let clock = Stopwatch::start();
    inject(&control, &env, Fault::Restart).await;
    let restarted = Stopwatch::start();
    let seen = unhealthy
        .wait_until(RECOVERY, |r| !r.is_empty())
        .await
        .unwrap_or_else(|r| {
            panic!("health stayed healthy throughout a broker restart ({r:?} unhealthy answers)")
        });
    healthy("health turns healthy again after the broker is back").await;
    let back = (restarted.elapsed(), clock.elapsed());
    watching.store(false, Ordering::Relaxed);
    watcher.await.expect("the health watcher panicked");
    let answers = unhealthy.snapshot();
    let hung: Vec<&Duration> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        hung.is_empty(),
        "{} health calls did not answer within {HEALTH_ANSWERS_WITHIN:?} during the outage",
        hung.len()
    );
    println!(
        "unhealthy {} times (probed every {PROBE_EVERY:?}; first: {:?}); healthy again {:?} after the restart returned, {:?} after it began",
        answers.len(),
        seen.first(),
        back.0,
        back.1
    );
    env.finish().await;
}
