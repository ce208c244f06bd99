//! What a bridge run leaves on a broker, and its removal.
//!
//! Every run names its broker resources under a prefix of its own (`purista-bench-<id>`), so it
//! never meets another run's or a deployment's. On RabbitMQ the run's queues are gone by the
//! time its services and bridges have shut down (command queues auto-delete, reply queues are
//! exclusive, the bridge deletes non-durable broadcast queues at shutdown); the durable headers
//! exchange named after the prefix stays, and is deleted here. On AWS nothing deletes itself
//! when a process ends (SQS has no auto-delete), so everything whose name starts with the prefix
//! — the bridges' bus, rules and queues, and anything a failed raw baseline left — is removed
//! here. The raw baselines delete their own resources.

/// How long the removal may take.
#[cfg(feature = "amqp")]
const CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the removal also runs after a run of raw baselines alone (a baseline that failed
/// midway may leave resources on a broker that keeps them).
pub fn sweeps_baselines(url: &str) -> bool {
    cfg!(feature = "aws")
        && url
            .get(..6)
            .is_some_and(|s| s.eq_ignore_ascii_case("aws://"))
}

/// Removes what a bridge run under `prefix` left on the broker `url` names.
#[cfg_attr(not(any(feature = "amqp", feature = "aws")), allow(unused_variables))]
pub async fn after_bridge_run(url: &str, prefix: &str) -> anyhow::Result<()> {
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => delete_exchange(url, prefix).await,
        #[cfg(feature = "aws")]
        "aws" => crate::aws::sweep(url, prefix).await,
        // The in-process bridge keeps nothing beyond the process.
        _ => Ok(()),
    }
}

#[cfg(feature = "amqp")]
async fn delete_exchange(url: &str, exchange: &str) -> anyhow::Result<()> {
    use anyhow::{Context as _, anyhow};
    use lapin::options::ExchangeDeleteOptions;
    use lapin::types::ShortString;
    use lapin::{Connection, ConnectionProperties};

    let name = ShortString::try_new(exchange)
        .map_err(|_| anyhow!("exchange name `{exchange}` is too long"))?;
    let work = async {
        let properties =
            ConnectionProperties::default().with_connection_name("purista-bench cleanup".into());
        let connection = Connection::connect(url, properties).await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_delete(name, ExchangeDeleteOptions::default())
            .await
            .with_context(|| format!("deleting exchange `{exchange}`"))?;
        let _ = connection.close(200, "OK".into()).await;
        anyhow::Ok(())
    };
    tokio::time::timeout(CLEANUP_TIMEOUT, work)
        .await
        .map_err(|_| anyhow!("deleting exchange `{exchange}` timed out"))?
}
