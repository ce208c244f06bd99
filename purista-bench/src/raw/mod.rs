//! Raw baselines: the same work as each scenario, done with the broker's bare primitives and
//! none of purista, so a scenario's figure can be read as a ratio to what the broker alone does
//! on this machine in this run.
//!
//! One module per broker; [`Baseline::for_url`] picks by URL scheme. The in-process bridge's
//! "broker" is tokio itself, so its baseline is bare tokio channels ([`tokio`](self::tokio));
//! RabbitMQ's is bare `lapin` publish/consume with the bridge's confirm, ack and prefetch
//! settings (`lapin`, cargo feature `amqp`); Dapr's is plain reqwest and axum against the
//! same sidecar double (`dapr`, cargo feature `dapr`); AWS's is the bare SDK's PutEvents, SendMessage,
//! ReceiveMessage and DeleteMessageBatch with the bridge's receive settings (`aws`, cargo feature
//! `aws`). A further broker brings its own module and one arm
//! in [`Baseline`].

#[cfg(feature = "aws")]
mod aws;
#[cfg(feature = "dapr")]
mod dapr;
#[cfg(feature = "kubemq")]
mod kubemq;
#[cfg(feature = "amqp")]
mod lapin;
mod tokio;

use anyhow::bail;

use crate::measurement::Measurement;
use crate::workload::{Scenario, Workload};

/// The raw baseline for one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Baseline {
    /// Bare tokio channels and tasks in this process (for `memory://`).
    Tokio,
    /// Bare lapin on the RabbitMQ broker at `url`, with resources named `<prefix>.raw…`.
    #[cfg(feature = "amqp")]
    Lapin {
        /// The broker URL.
        url: String,
        /// The run's resource prefix.
        prefix: String,
    },
    /// The bare `kubemq` SDK on the KubeMQ at `address` (`host:port`), channels under `prefix`.
    #[cfg(feature = "kubemq")]
    Kubemq {
        /// `host:port`.
        address: String,
        /// The run's channel prefix.
        prefix: String,
    },
    /// The bare AWS SDK against the AWS (or emulator) the `aws://` URL names, resources under
    /// `<prefix>-raw-…`.
    #[cfg(feature = "aws")]
    Aws {
        /// The `aws://` URL.
        url: String,
        /// The run's resource prefix.
        prefix: String,
    },
    /// Plain reqwest and axum through sidecars of the `dapr://double` run's sidecar double.
    #[cfg(feature = "dapr")]
    Dapr {
        /// The double the bridge's sidecars come from too.
        double: std::sync::Arc<crate::dapr::DoubleSidecars>,
        /// The run's topic prefix.
        prefix: String,
    },
}

impl Baseline {
    /// The baseline for the broker `url` names; a broker baseline names what it creates on
    /// the broker under `prefix`.
    #[cfg_attr(not(feature = "amqp"), allow(unused_variables))]
    pub fn for_url(url: &str, prefix: &str) -> anyhow::Result<Baseline> {
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "memory" => Ok(Baseline::Tokio),
            #[cfg(feature = "amqp")]
            "amqp" | "amqps" => Ok(Baseline::Lapin {
                url: url.to_string(),
                prefix: prefix.to_string(),
            }),
            #[cfg(not(feature = "amqp"))]
            "amqp" | "amqps" => bail!(
                "the raw baseline for `{scheme}://` needs the cargo feature `amqp` of purista-bench"
            ),
            #[cfg(feature = "kubemq")]
            "kubemq" => Ok(Baseline::Kubemq {
                address: purista::kubemq::KubemqConfig::from_url(url)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .address(),
                prefix: prefix.to_string(),
            }),
            #[cfg(feature = "aws")]
            "aws" => Ok(Baseline::Aws {
                url: url.to_string(),
                prefix: prefix.to_string(),
            }),
            #[cfg(not(feature = "aws"))]
            "aws" => bail!(
                "the raw baseline for `aws://` needs the cargo feature `aws` of purista-bench"
            ),
            "dapr" => bail!(
                "the raw Dapr baseline runs only against the sidecar double (`dapr://double`)"
            ),
            other => bail!(
                "no raw baseline for `{other}://` yet; it is added together with that bridge's adapter"
            ),
        }
    }

    /// The baseline for `target`: on `dapr://double`, plain HTTP through the same double.
    pub fn for_target(target: &crate::target::Target) -> anyhow::Result<Baseline> {
        #[cfg(feature = "dapr")]
        if let Some(double) = target.dapr_double() {
            return Ok(Baseline::Dapr {
                double,
                prefix: target.prefix().to_string(),
            });
        }
        Baseline::for_url(target.url(), target.prefix())
    }

    /// The `bridge` field of the baseline's JSON lines.
    pub fn label(&self) -> &'static str {
        match self {
            Baseline::Tokio => "raw-tokio",
            #[cfg(feature = "amqp")]
            Baseline::Lapin { .. } => "raw-lapin",
            #[cfg(feature = "kubemq")]
            Baseline::Kubemq { .. } => "raw-kubemq",
            #[cfg(feature = "dapr")]
            Baseline::Dapr { .. } => "raw-dapr",
            #[cfg(feature = "aws")]
            Baseline::Aws { .. } => "raw-aws",
        }
    }

    /// Why the baseline has no equivalent of `scenario`, if it has none.
    #[cfg_attr(not(feature = "amqp"), allow(clippy::match_single_binding))]
    pub fn lacks(&self, scenario: Scenario) -> Option<&'static str> {
        match (self, scenario) {
            #[cfg(feature = "amqp")]
            (Baseline::Lapin { .. }, Scenario::Queue) => {
                Some("RabbitMQ has no queue bridge, so there is nothing to compare")
            }
            #[cfg(feature = "kubemq")]
            (Baseline::Kubemq { .. }, Scenario::Queue) => {
                Some("there is no bare-SDK KubeMQ queue baseline yet, so nothing to compare")
            }
            #[cfg(feature = "dapr")]
            (Baseline::Dapr { .. }, Scenario::Queue) => {
                Some("the Dapr bridge has no queue bridge, so there is nothing to compare")
            }
            _ => None,
        }
    }

    /// Runs `scenario`'s raw equivalent and measures it.
    pub async fn run(
        &self,
        scenario: Scenario,
        workload: &Workload,
    ) -> anyhow::Result<Measurement> {
        let measured = match self {
            Baseline::Tokio => self::tokio::run(scenario, workload).await?,
            #[cfg(feature = "amqp")]
            Baseline::Lapin { url, prefix } => {
                self::lapin::run(scenario, workload, url, prefix).await?
            }
            #[cfg(feature = "kubemq")]
            Baseline::Kubemq { address, prefix } => {
                self::kubemq::run(scenario, workload, address, prefix).await?
            }
            #[cfg(feature = "aws")]
            Baseline::Aws { url, prefix } => {
                self::aws::run(scenario, workload, url, prefix).await?
            }
            #[cfg(feature = "dapr")]
            Baseline::Dapr { double, prefix } => {
                self::dapr::run(scenario, workload, double, prefix).await?
            }
        };
        Ok(measured)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_urls_use_the_tokio_baseline() {
        assert_eq!(
            Baseline::for_url("memory://bench", "p").ok(),
            Some(Baseline::Tokio)
        );
        assert_eq!(
            Baseline::for_url("MEMORY://", "p").ok(),
            Some(Baseline::Tokio)
        );
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn amqp_urls_use_the_lapin_baseline_which_has_no_queue_scenario() {
        let baseline = Baseline::for_url("amqps://mq:5671/%2f", "bench-1").expect("amqp baseline");
        assert_eq!(baseline.label(), "raw-lapin");
        assert!(baseline.lacks(Scenario::Queue).is_some());
        assert!(baseline.lacks(Scenario::Fanout).is_none());
    }

    #[test]
    fn brokers_without_a_baseline_say_so() {
        let err = Baseline::for_url("nats://localhost", "p").expect_err("no baseline yet");
        assert!(err.to_string().contains("nats://"), "{err}");
    }

    #[test]
    fn a_real_dapr_sidecar_has_no_baseline_only_the_double_has() {
        let err = Baseline::for_url("dapr://localhost", "p").expect_err("one real sidecar");
        assert!(err.to_string().contains("dapr://double"), "{err}");
    }

    #[cfg(feature = "dapr")]
    #[test]
    fn the_dapr_double_uses_the_plain_http_baseline_which_has_no_queue_scenario() {
        let target = crate::target::Target::new("dapr://double", "bench-1").expect("the double");
        let baseline = Baseline::for_target(&target).expect("dapr baseline");
        assert_eq!(baseline.label(), "raw-dapr");
        assert!(baseline.lacks(Scenario::Queue).is_some());
        assert!(baseline.lacks(Scenario::Fanout).is_none());
    }

    #[cfg(feature = "aws")]
    #[test]
    fn aws_urls_use_the_sdk_baseline_which_has_every_scenario() {
        let baseline = Baseline::for_url("aws://us-east-1?endpoint=http://127.0.0.1:1", "bench-1")
            .expect("aws baseline");
        assert_eq!(baseline.label(), "raw-aws");
        assert!(Scenario::ALL.iter().all(|s| baseline.lacks(*s).is_none()));
    }

    #[cfg(feature = "kubemq")]
    #[test]
    fn kubemq_urls_use_the_sdk_baseline_which_has_no_queue_scenario() {
        let baseline = Baseline::for_url("kubemq://mq:50001", "bench-1").expect("kubemq baseline");
        assert_eq!(baseline.label(), "raw-kubemq");
        assert!(baseline.lacks(Scenario::Queue).is_some());
        assert!(baseline.lacks(Scenario::CmdSeq).is_none());
    }
}
