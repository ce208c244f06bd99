//! `cmd-seq` and `cmd-conc`: invocations of an echo command across two bridge instances.
//!
//! The echo service runs on one connection and the calling service on another, so every
//! request leaves the caller's instance, is handled by the server's, and the response comes
//! back through the caller's reply path — what a user's service-to-service call does.

use std::sync::Arc;

use anyhow::{Context as _, ensure};
use purista::RunningService;
use purista::prelude::*;

use super::Deployment;
use crate::drive;
use crate::measurement::{Measurement, Percentiles};
use crate::payload::Payload;
use crate::workload::{Scenario, Workload};

/// An echo server and a client on two bridge instances.
struct Echo {
    client: Arc<RunningService>,
    address: Address,
}

impl Echo {
    async fn start(deployment: &mut Deployment) -> anyhow::Result<Echo> {
        let server_connection = deployment.connect().await?;
        let client_connection = deployment.connect().await?;
        let service = deployment.name("echo");
        let echo = CommandDef::new("echo", |_ctx: Context, p: Payload, _: Empty| async move {
            Ok(p)
        })
        .description("returns its input");
        deployment
            .start(
                Service::builder(service.as_str(), "1")
                    .command(echo)
                    .build(),
                &server_connection,
            )
            .await?;
        let client = deployment
            .start(
                Service::builder(deployment.name("client"), "1").build(),
                &client_connection,
            )
            .await?;
        Ok(Echo {
            client,
            address: Address::new(service, "1", "echo"),
        })
    }

    /// One invocation, checked to come back with its own payload.
    async fn call(&self, seq: u64) -> anyhow::Result<()> {
        let reply: Payload = self
            .client
            .invoke(self.address.clone(), Payload::new(seq), Empty)
            .await
            .with_context(|| format!("invoking {} (call {seq})", self.address))?;
        ensure!(
            reply.seq == seq,
            "call {seq} answered with the reply to call {}",
            reply.seq
        );
        Ok(())
    }
}

/// `cmd-seq`: one invocation after the other.
pub async fn sequential(
    deployment: &mut Deployment,
    workload: &Workload,
) -> anyhow::Result<Measurement> {
    let echo = Echo::start(deployment).await?;
    drive::sequential(workload.warmup, |i| echo.call(i)).await?;
    let timed = drive::sequential(workload.cmd_seq_calls, |i| echo.call(i)).await?;
    Ok(Measurement::new(
        &deployment.bridge_name(),
        Scenario::CmdSeq,
        workload.cmd_seq_calls,
        timed.elapsed,
    )
    .with_latency(Percentiles::of(timed.latencies_ns)))
}

/// `cmd-conc`: many invocations in flight at once.
pub async fn concurrent(
    deployment: &mut Deployment,
    workload: &Workload,
) -> anyhow::Result<Measurement> {
    let echo = Arc::new(Echo::start(deployment).await?);
    let in_flight = workload.cmd_conc_in_flight;
    let call = {
        let echo = echo.clone();
        move |i| {
            let echo = echo.clone();
            async move { echo.call(i).await }
        }
    };
    drive::concurrent(workload.warmup, in_flight, call.clone()).await?;
    let timed = drive::concurrent(workload.cmd_conc_calls, in_flight, call).await?;
    Ok(Measurement::new(
        &deployment.bridge_name(),
        Scenario::CmdConc,
        workload.cmd_conc_calls,
        timed.elapsed,
    )
    .with_latency(Percentiles::of(timed.latencies_ns))
    .with_note(format!("{in_flight} in flight")))
}
