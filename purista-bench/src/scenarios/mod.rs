//! The scenarios run against a bridge URL, through the service runtime a user would use.
//!
//! Nothing here knows which broker is behind the URL: every scenario opens its own
//! [`purista::Connection`]s with [`purista::connect`], starts ordinary services on them and
//! shuts everything down at the end. Connecting several times to one URL gives several bridge
//! instances, so commands and events really cross instances (with `memory://NAME` all instances
//! share the hub `NAME`; with a broker URL they share the broker).
//!
//! Names are suffixed with a per-run id so that scenarios never see each other's services,
//! queues or events, even on a broker that keeps state between runs; on a broker, every
//! resource is also named under the bench run's prefix ([`purista::ConnectOptions::prefix`]).

mod commands;
mod fanout;
mod queue;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use purista::prelude::*;
use purista::{Connection, RunningService};
use tokio::time::Instant;

use crate::measurement::Measurement;
use crate::target::{self, Role, Target};
use crate::workload::{QueueMode, Scenario, Workload};

/// How long shutting a scenario's services and bridges down may take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long one scenario may run at all; waits inside it give up sooner when stuck.
const SCENARIO_LIMIT: Duration = Duration::from_secs(600);

/// Runs `scenario` against the bridge `target` names and measures it.
pub async fn run(
    scenario: Scenario,
    target: &Target,
    workload: &Workload,
    queue_mode: QueueMode,
) -> anyhow::Result<Measurement> {
    let mut deployment = Deployment::new(target, scenario);
    let work = async {
        match scenario {
            Scenario::CmdSeq => commands::sequential(&mut deployment, workload).await,
            Scenario::CmdConc => commands::concurrent(&mut deployment, workload).await,
            Scenario::Fanout => fanout::run(&mut deployment, workload).await,
            Scenario::Queue => queue::run(&mut deployment, workload, queue_mode).await,
        }
    };
    let result = tokio::time::timeout(SCENARIO_LIMIT, work)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "gave up after {} s",
                SCENARIO_LIMIT.as_secs()
            ))
        });
    deployment.shutdown().await;
    result
}

/// The connections and services one scenario started, shut down together at its end.
pub struct Deployment {
    target: Target,
    /// Unique suffix for this scenario's names.
    run_id: String,
    connections: Vec<Connection>,
    services: Vec<Arc<RunningService>>,
    /// What the connections need until they are shut down (their sidecars, on Dapr).
    keep: Vec<Box<dyn std::any::Any + Send>>,
}

impl Deployment {
    fn new(target: &Target, scenario: Scenario) -> Self {
        Deployment {
            target: target.clone(),
            run_id: format!("{}-{}", scenario.name(), &purista::ids::new_id()[..8]),
            connections: Vec::new(),
            services: Vec::new(),
            keep: Vec::new(),
        }
    }

    /// `base` made unique to this scenario run, for service, event and queue names.
    pub fn name(&self, base: &str) -> String {
        format!("bench-{base}-{}", self.run_id)
    }

    /// Opens one more bridge instance on the URL.
    pub async fn connect(&mut self) -> anyhow::Result<Connection> {
        self.connect_as(Role::Any).await
    }

    /// Opens one more bridge instance for `role` and keeps it for shutdown.
    pub async fn connect_as(&mut self, role: Role) -> anyhow::Result<Connection> {
        let instance = self.target.connect_as(role).await?;
        self.connections.push(instance.connection.clone());
        self.keep.extend(instance.keep);
        Ok(instance.connection)
    }

    /// Starts `service` on `connection` and keeps it for shutdown.
    pub async fn start(
        &mut self,
        service: Service,
        connection: &Connection,
    ) -> anyhow::Result<Arc<RunningService>> {
        let name = service.name().to_string();
        let running = service
            .start(connection.events.clone())
            .await
            .with_context(|| format!("starting service `{name}`"))?;
        let running = Arc::new(running);
        self.services.push(running.clone());
        Ok(running)
    }

    /// The bridge's name, for the JSON output.
    pub fn bridge_name(&self) -> String {
        self.connections
            .first()
            .map(|c| c.events.name().to_string())
            .unwrap_or_else(|| "unknown".to_string())
    }

    /// Shuts every service down, then every bridge instance.
    ///
    /// Queue bridges are left alone: on `memory://` one queue bridge is shared by every
    /// connection to the hub, and later scenarios still use it.
    async fn shutdown(self) {
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        for service in &self.services {
            let report = service.shutdown(deadline).await;
            if !report.completed {
                eprintln!(
                    "  warning: a service did not drain in time (still running: {:?})",
                    report.still_running
                );
            }
        }
        for connection in &self.connections {
            connection.events.shutdown(deadline).await;
        }
        target::release(self.keep).await;
    }
}
