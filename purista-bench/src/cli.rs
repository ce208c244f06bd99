//! Command-line options.
//!
//! Hand-parsed: the bench has a handful of flags and should build with nothing but the
//! workspace's own dependencies.

use std::fmt;

use crate::workload::{QueueMode, Scenario};

/// What to run, as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The bridge URL handed to `purista::connect`.
    pub url: String,
    /// Scenarios in the order given; empty = all.
    pub scenarios: Vec<Scenario>,
    /// Run the bridge scenarios.
    pub bridge: bool,
    /// Run the raw baselines.
    pub raw: bool,
    /// Every count is divided by this (1 = the full workload; `--quick` = 10).
    pub divisor: u64,
    /// How the `queue` scenario's worker takes jobs.
    pub queue_mode: QueueMode,
}

/// Why the command line was not understood, or a request for help.
#[derive(Debug, Clone, PartialEq)]
pub enum CliError {
    /// `--help`.
    Help,
    /// Anything else, with the reason.
    Invalid(String),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Help => f.write_str(USAGE),
            CliError::Invalid(reason) => write!(f, "{reason}\n\n{USAGE}"),
        }
    }
}

/// The usage text.
pub const USAGE: &str = "\
usage: purista-bench <BRIDGE_URL> [--scenario NAME]... [--raw | --no-raw] [--quick | --divide N]
                     [--queue-mode sequential|continuous=N]

  BRIDGE_URL          e.g. memory://bench or amqp://guest:guest@127.0.0.1:5672/%2f
                      (anything purista::connect accepts); kubemq://double and
                      dapr://double start an in-process double; aws://REGION?endpoint=URL
                      (feature aws) runs against AWS or an emulator such as moto
  --scenario NAME     cmd-seq, cmd-conc, fanout or queue; repeatable (default: all)
  --raw               run only the raw baselines (bare broker / tokio primitives)
  --no-raw            skip the raw baselines (and so the ratio table)
  --quick             divide every count by 10 (smoke runs)
  --divide N          divide every count by N (for slow brokers, e.g. moto: --divide 20)
  --queue-mode MODE   the queue worker's mode (default: sequential)

One JSON line per scenario goes to stdout; progress and tables go to stderr.";

impl Options {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, CliError> {
        let mut url = None;
        let mut scenarios = Vec::new();
        let mut raw_only = false;
        let mut no_raw = false;
        let mut divisor = 1;
        let mut queue_mode = QueueMode::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Err(CliError::Help),
                "--raw" => raw_only = true,
                "--no-raw" => no_raw = true,
                "--quick" => divisor = 10,
                "--divide" => {
                    divisor = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| {
                            CliError::Invalid("--divide needs a number ≥ 1".to_string())
                        })?;
                }
                "--scenario" => {
                    let name = args
                        .next()
                        .ok_or_else(|| CliError::Invalid("--scenario needs a name".to_string()))?;
                    let scenario = Scenario::parse(&name).ok_or_else(|| {
                        CliError::Invalid(format!(
                            "unknown scenario `{name}` (known: {})",
                            Scenario::ALL.map(|s| s.name()).join(", ")
                        ))
                    })?;
                    if !scenarios.contains(&scenario) {
                        scenarios.push(scenario);
                    }
                }
                "--queue-mode" => {
                    let mode = args.next().ok_or_else(|| {
                        CliError::Invalid("--queue-mode needs a mode".to_string())
                    })?;
                    queue_mode = QueueMode::parse(&mode).ok_or_else(|| {
                        CliError::Invalid(format!(
                            "unknown queue mode `{mode}` (sequential or continuous=N with N ≥ 1)"
                        ))
                    })?;
                }
                flag if flag.starts_with('-') => {
                    return Err(CliError::Invalid(format!("unknown option `{flag}`")));
                }
                _ if url.is_none() => url = Some(arg),
                _ => {
                    return Err(CliError::Invalid(format!(
                        "unexpected argument `{arg}` (only one bridge URL)"
                    )));
                }
            }
        }
        if raw_only && no_raw {
            return Err(CliError::Invalid(
                "--raw and --no-raw exclude each other".to_string(),
            ));
        }
        let url = url.ok_or_else(|| CliError::Invalid("missing <BRIDGE_URL>".to_string()))?;
        Ok(Options {
            url,
            scenarios: if scenarios.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                scenarios
            },
            bridge: !raw_only,
            raw: !no_raw,
            divisor,
            queue_mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, CliError> {
        Options::parse(args.iter().map(|a| a.to_string()))
    }

    #[test]
    fn default_runs_every_scenario_and_the_raw_baselines() {
        let o = parse(&["memory://bench"]).expect("valid");
        assert_eq!(o.scenarios, Scenario::ALL.to_vec());
        assert!(o.bridge && o.raw);
        assert_eq!(o.divisor, 1);
    }

    #[test]
    fn raw_alone_runs_only_the_baselines() {
        let o = parse(&["memory://bench", "--raw", "--scenario", "fanout"]).expect("valid");
        assert!(!o.bridge && o.raw);
        assert_eq!(o.scenarios, vec![Scenario::Fanout]);
    }

    #[test]
    fn unknown_scenario_is_rejected() {
        assert!(matches!(
            parse(&["memory://", "--scenario", "nope"]),
            Err(CliError::Invalid(_))
        ));
    }

    #[test]
    fn missing_url_is_rejected() {
        assert!(matches!(parse(&["--quick"]), Err(CliError::Invalid(_))));
    }

    #[test]
    fn quick_divides_by_ten_and_divide_by_what_it_is_given() {
        assert_eq!(parse(&["memory://", "--quick"]).expect("valid").divisor, 10);
        assert_eq!(
            parse(&["memory://", "--divide", "50"])
                .expect("valid")
                .divisor,
            50
        );
        assert!(parse(&["memory://", "--divide", "0"]).is_err());
    }

    #[test]
    fn queue_mode_is_parsed() {
        let o = parse(&["memory://", "--queue-mode", "sequential"]).expect("valid");
        assert_eq!(o.queue_mode, QueueMode::Sequential);
        let o = parse(&["memory://", "--queue-mode", "continuous=4"]).expect("valid");
        assert_eq!(o.queue_mode, QueueMode::Continuous(4));
    }
}
