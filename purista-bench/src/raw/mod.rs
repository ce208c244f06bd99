//! Raw baselines: the same work as each scenario, done with the broker's bare primitives and
//! none of purista, so a scenario's figure can be read as a ratio to what the broker alone does
//! on this machine in this run.
//!
//! One module per broker; [`Baseline::for_url`] picks by URL scheme. The in-process bridge's
//! "broker" is tokio itself, so its baseline is bare tokio channels ([`tokio`](self::tokio)). A
//! broker adapter brings its own module (e.g. `raw::lapin`: bare publish/consume with the same
//! confirm and ack settings) and one arm in [`Baseline`].

mod tokio;

use anyhow::bail;

use crate::measurement::Measurement;
use crate::workload::{Scenario, Workload};

/// The raw baseline for one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Bare tokio channels and tasks in this process (for `memory://`).
    Tokio,
}

impl Baseline {
    /// The baseline for the broker `url` names.
    pub fn for_url(url: &str) -> anyhow::Result<Baseline> {
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "memory" => Ok(Baseline::Tokio),
            other => bail!(
                "no raw baseline for `{other}://` yet; it is added together with that bridge's adapter"
            ),
        }
    }

    /// The `bridge` field of the baseline's JSON lines.
    pub fn label(self) -> &'static str {
        match self {
            Baseline::Tokio => "raw-tokio",
        }
    }

    /// Runs `scenario`'s raw equivalent and measures it.
    pub async fn run(self, scenario: Scenario, workload: &Workload) -> anyhow::Result<Measurement> {
        let measured = match self {
            Baseline::Tokio => self::tokio::run(scenario, workload).await?,
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
            Baseline::for_url("memory://bench").ok(),
            Some(Baseline::Tokio)
        );
        assert_eq!(Baseline::for_url("MEMORY://").ok(), Some(Baseline::Tokio));
    }

    #[test]
    fn brokers_without_a_baseline_say_so() {
        let err = Baseline::for_url("amqp://localhost").expect_err("no baseline yet");
        assert!(err.to_string().contains("amqp://"), "{err}");
    }
}
