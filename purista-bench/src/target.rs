//! What the bench connects its bridge instances to.
//!
//! Usually a URL: every instance connects to it, and instances meet on the broker behind it.
//! A Dapr app talks to a sidecar of its own, so `dapr://double` is different: each instance
//! gets a sidecar of its own from the in-process sidecar double ([`crate::dapr`]), with an app
//! id and an app port of its own, and connects through the facade with that sidecar's URL.

use std::any::Any;

use anyhow::Context as _;
use purista::{ConnectOptions, Connection};

/// Where bridge instances come from. Cheap to clone.
#[derive(Clone)]
pub struct Target {
    /// The URL as given (after `kubemq://double` was replaced by the double's address).
    options: ConnectOptions,
    /// The run's resource prefix.
    prefix: String,
    /// `dapr://double`: the sidecar double every instance gets its sidecar from.
    #[cfg(feature = "dapr")]
    dapr: Option<std::sync::Arc<crate::dapr::DoubleSidecars>>,
}

/// What a bridge instance is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Anything.
    Any,
    /// Publishing and calling only: it registers no subscription. On Dapr it is configured
    /// `events=off`, as such an app is deployed (the sidecar then delivers it no events);
    /// elsewhere it is an instance like any other.
    Publisher,
}

/// One connected bridge instance and what must outlive it (its sidecar, on `dapr://double`).
pub struct Instance {
    /// The facade's connection.
    pub connection: Connection,
    /// Dropped only after the connection's bridge has shut down.
    pub keep: Option<Box<dyn Any + Send>>,
}

impl Target {
    /// Connects to `url`, naming broker resources under `prefix`. `dapr://double` starts the
    /// Dapr sidecar double in this process for as long as the target (and its clones) live.
    pub fn new(url: &str, prefix: &str) -> anyhow::Result<Target> {
        let options = ConnectOptions::new(url).prefix(prefix);
        #[cfg(feature = "dapr")]
        let dapr = if crate::dapr::is_double(url) {
            Some(std::sync::Arc::new(crate::dapr::DoubleSidecars::start(
                prefix,
            )?))
        } else {
            crate::dapr::refuse_single_sidecar(url)?;
            None
        };
        Ok(Target {
            options,
            prefix: prefix.to_string(),
            #[cfg(feature = "dapr")]
            dapr,
        })
    }

    /// The URL as given.
    pub fn url(&self) -> &str {
        self.options.url()
    }

    /// The run's resource prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Dapr sidecar double of a `dapr://double` run.
    #[cfg(feature = "dapr")]
    pub fn dapr_double(&self) -> Option<std::sync::Arc<crate::dapr::DoubleSidecars>> {
        self.dapr.clone()
    }

    /// Opens one more bridge instance.
    pub async fn connect(&self) -> anyhow::Result<Instance> {
        self.connect_as(Role::Any).await
    }

    /// Opens one more bridge instance for `role`.
    pub async fn connect_as(&self, role: Role) -> anyhow::Result<Instance> {
        #[cfg(feature = "dapr")]
        if let Some(double) = &self.dapr {
            let (connection, sidecar) = double.connect(&self.prefix, role).await?;
            return Ok(Instance {
                connection,
                keep: Some(Box::new(sidecar)),
            });
        }
        let _ = role;
        let connection = purista::connect_with(&self.options)
            .await
            .with_context(|| format!("connecting to {}", purista::redact_url(self.url())))?;
        Ok(Instance {
            connection,
            keep: None,
        })
    }
}

/// Drops what instances kept (sidecars wait for their connections to close) off the runtime's
/// workers.
pub async fn release(keep: Vec<Box<dyn Any + Send>>) {
    if keep.is_empty() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || drop(keep)).await;
}

#[cfg(all(test, feature = "dapr"))]
mod tests {
    use super::*;
    use crate::raw::Baseline;
    use crate::workload::{QueueMode, Scenario, Workload};

    /// A few operations of each scenario, enough to cross every instance.
    const TINY: Workload = Workload {
        cmd_seq_calls: 20,
        cmd_conc_calls: 60,
        cmd_conc_in_flight: 8,
        fanout_events: 20,
        fanout_subscribers: 3,
        queue_jobs: 10,
        warmup: 5,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dapr_double_runs_each_scenario_through_the_bridge_and_the_baseline() {
        let target = Target::new("dapr://double", "bench-selftest").expect("the double starts");
        let baseline = Baseline::for_target(&target).expect("the raw Dapr baseline");
        for scenario in [Scenario::CmdSeq, Scenario::CmdConc, Scenario::Fanout] {
            let bridge = crate::scenarios::run(scenario, &target, &TINY, QueueMode::Sequential)
                .await
                .unwrap_or_else(|e| panic!("{scenario} on the bridge: {e:#}"));
            assert_eq!(bridge.bridge, "dapr");
            let raw = baseline
                .run(scenario, &TINY)
                .await
                .unwrap_or_else(|e| panic!("{scenario} on the baseline: {e:#}"));
            assert_eq!(raw.bridge, "raw-dapr");
            let ops = match scenario {
                Scenario::CmdSeq => TINY.cmd_seq_calls,
                Scenario::CmdConc => TINY.cmd_conc_calls,
                _ => TINY.fanout_events * TINY.fanout_subscribers,
            };
            assert_eq!((bridge.ops, raw.ops), (ops, ops), "{scenario}");
        }
    }

    #[test]
    fn a_real_dapr_sidecar_is_refused_as_a_target() {
        let err = Target::new("dapr://localhost:3500", "p")
            .err()
            .expect("one sidecar serves one app");
        assert!(err.to_string().contains("dapr://double"), "{err}");
    }
}
