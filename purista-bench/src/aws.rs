//! `aws://…` (cargo feature `aws`): the bare SDK clients the raw baseline and the cleanup use,
//! built from the run's URL as the bridge builds its own, and the removal of everything a run
//! left under its prefix.
//!
//! The clients are the bridge's own ([`Clients::load`]: `aws-config`'s chain for region and
//! credentials, the URL's region and endpoint over it, 3 attempts, the bridge's call and
//! connect timeouts), so both sides of a ratio talk to the same endpoint through the same SDK
//! stack.

use std::time::Duration;

use anyhow::Context as _;
use purista::aws::{AwsConfig, Clients};

/// How long the removal of a run's resources may take.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Both SDK clients and the URL's receive settings.
#[derive(Clone, Debug)]
pub struct Sdk {
    /// EventBridge.
    pub events: aws_sdk_eventbridge::Client,
    /// SQS.
    pub sqs: aws_sdk_sqs::Client,
    /// The SQS long-polling wait the URL gives the bridge's receivers.
    pub wait_seconds: i32,
    /// The visibility timeout of the bridge's queues.
    pub visibility_seconds: u64,
}

impl Sdk {
    /// Clients for the AWS (or emulator) an `aws://` URL names.
    pub async fn connect(url: &str) -> anyhow::Result<Sdk> {
        let config = AwsConfig::from_url(url).map_err(|e| anyhow::anyhow!("{e}"))?;
        let clients = Clients::load(&config).await;
        Ok(Sdk {
            events: clients.events,
            sqs: clients.sqs,
            wait_seconds: i32::from(config.wait_seconds),
            visibility_seconds: config.visibility_timeout.as_secs(),
        })
    }
}

/// Removes every bus, rule and queue whose name starts with `prefix`: rules' targets first
/// (a rule whose queue is gone makes moto fail every `PutEvents`), then rules and buses, then
/// queues. What is already gone is fine.
pub async fn sweep(url: &str, prefix: &str) -> anyhow::Result<()> {
    let work = async {
        let sdk = Sdk::connect(url).await?;
        let buses = sdk
            .events
            .list_event_buses()
            .name_prefix(prefix)
            .send()
            .await
            .context("listing the run's event buses")?;
        for bus in buses.event_buses.unwrap_or_default() {
            let Some(bus) = bus.name else { continue };
            remove_bus(&sdk, &bus).await?;
        }
        let queues = sdk
            .sqs
            .list_queues()
            .queue_name_prefix(prefix)
            .max_results(1000)
            .send()
            .await
            .context("listing the run's queues")?;
        for queue in queues.queue_urls.unwrap_or_default() {
            // Gone already (deleted by its bridge meanwhile) is what we want.
            let _ = sdk.sqs.delete_queue().queue_url(&queue).send().await;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(SWEEP_TIMEOUT, work)
        .await
        .map_err(|_| anyhow::anyhow!("removing what is under `{prefix}` timed out"))?
}

/// Removes a bus with its rules and their targets.
pub async fn remove_bus(sdk: &Sdk, bus: &str) -> anyhow::Result<()> {
    let rules = sdk
        .events
        .list_rules()
        .event_bus_name(bus)
        .send()
        .await
        .with_context(|| format!("listing the rules of bus {bus}"))?;
    for rule in rules.rules.unwrap_or_default() {
        let Some(rule) = rule.name else { continue };
        let targets = sdk
            .events
            .list_targets_by_rule()
            .rule(&rule)
            .event_bus_name(bus)
            .send()
            .await
            .with_context(|| format!("listing the targets of rule {rule}"))?;
        let ids: Vec<String> = targets
            .targets
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.id)
            .collect();
        if !ids.is_empty() {
            sdk.events
                .remove_targets()
                .rule(&rule)
                .event_bus_name(bus)
                .set_ids(Some(ids))
                .send()
                .await
                .with_context(|| format!("removing the targets of rule {rule}"))?;
        }
        sdk.events
            .delete_rule()
            .name(&rule)
            .event_bus_name(bus)
            .send()
            .await
            .with_context(|| format!("deleting rule {rule}"))?;
    }
    sdk.events
        .delete_event_bus()
        .name(bus)
        .send()
        .await
        .with_context(|| format!("deleting bus {bus}"))?;
    Ok(())
}
