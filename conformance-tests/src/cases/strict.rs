//! Capabilities and the strict startup check (DESIGN §3.7), across all needs at once. Each
//! behaviour case already runs the strict check for the need it exercises when it is undeclared
//! (see [`crate::gate`]); these cases check the declaration itself and the one-error rule.

use std::sync::Arc;

use purista_core::{Mismatch, Need, Service, ServiceBuilder, StartError};

use crate::env::TestEnv;
use crate::gate::{
    bridge_for, declares, expect_mismatch_warning, is_queue_need, probe, probe_needs,
};
use crate::harness::Harness;

/// What the harness declares is what every bridge instance (and the queue bridge) reports.
pub async fn declared_capabilities_are_the_bridges_own(h: Arc<dyn Harness>) {
    let env = TestEnv::new(&h, 2).await;
    let declared = h.capabilities();
    for (i, b) in env.deployment.bridges.iter().enumerate() {
        assert_eq!(
            b.capabilities(),
            &declared,
            "bridge instance {i} reports other capabilities than the harness declares"
        );
        assert_eq!(
            b.capabilities().bridge,
            b.name(),
            "the capabilities name another bridge than the bridge's own name"
        );
    }
    assert_eq!(
        env.deployment
            .queues
            .as_ref()
            .map(|q| q.capabilities().clone()),
        h.queue_capabilities(),
        "the queue bridge reports other capabilities than the harness declares"
    );
    env.finish().await;
}

/// A service of `needs`, one registration per need, with the registration string of each.
fn service_of(
    env: &TestEnv,
    service: &str,
    needs: &[Need],
) -> (Vec<(String, Need)>, ServiceBuilder) {
    let mut builder = Service::builder(service, "1");
    let mut registrations = Vec::new();
    for (i, need) in needs.iter().enumerate() {
        let queue = format!("{}.p{i}", env.prefix);
        let (registration, def) = probe(need, service, &format!("p{i}"), &queue);
        builder = def.add_to(builder);
        registrations.push((registration, need.clone()));
    }
    (registrations, builder)
}

fn undeclared(h: &Arc<dyn Harness>, has_queues: bool) -> (Vec<Need>, Vec<Need>) {
    probe_needs()
        .into_iter()
        .filter(|n| has_queues || !is_queue_need(n))
        .partition(|n| !declares(h, n))
}

/// A service with every need the bridge lacks is refused with one error that lists each of
/// them (registration, need, bridge) and nothing the bridge has; a service with every need it
/// declares starts.
pub async fn strict_start_lists_every_mismatch_in_one_error(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 1).await;
    let (missing, present) = undeclared(&h, env.deployment.queues.is_some());

    let (_, capable) = service_of(&env, &env.name("capable"), &present);
    if let Err(e) = env.try_start(0, capable.strict(true)).await {
        panic!("a service needing only declared capabilities was refused: {e}");
    }

    if !missing.is_empty() {
        let (expected, lacking) = service_of(&env, &env.name("lacking"), &missing);
        match env.try_start(0, lacking.strict(true)).await {
            Ok(_) => panic!(
                "a service needing {} undeclared capabilities started",
                missing.len()
            ),
            Err(StartError::StrictCheck(e)) => {
                for (registration, need) in &expected {
                    let bridge = bridge_for(&h, need);
                    assert!(
                        e.mismatches.contains(&Mismatch {
                            registration: registration.clone(),
                            need: need.clone(),
                            bridge,
                        }),
                        "the strict error does not list {registration} needing {}: {e}",
                        need.describe()
                    );
                }
                for m in &e.mismatches {
                    assert!(
                        !declares(&h, &m.need),
                        "the strict error lists {} although the bridge declares it: {e}",
                        m.need.describe()
                    );
                }
            }
            Err(other) => panic!("the strict start failed with the wrong error: {other}"),
        }
    }
    env.finish().await;
}

/// In non-strict mode the same service starts, with one warning per mismatch.
pub async fn non_strict_start_degrades_with_a_warning_per_mismatch(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 1).await;
    let (missing, _) = undeclared(&h, env.deployment.queues.is_some());
    let (expected, lacking) = service_of(&env, &env.name("lenient"), &missing);
    if let Err(e) = env.try_start(0, lacking.strict(false)).await {
        panic!("a non-strict start must degrade and start, but failed: {e}");
    }
    for (registration, need) in &expected {
        expect_mismatch_warning(registration, need).await;
    }
    env.finish().await;
}
