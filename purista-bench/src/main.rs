//! `purista-bench`: throughput and latency of a bridge, through the service runtime a user
//! would use, next to a raw baseline of the same broker (DESIGN §6).
//!
//! ```text
//! cargo run --release -p purista-bench -- <BRIDGE_URL> [--scenario NAME]... [--raw | --no-raw] [--quick]
//! ```
//!
//! Every scenario prints one JSON line on stdout,
//! `{"bridge","scenario","ops","seconds","ops_per_s","p50_us","p99_us","peak_rss_kb"}`;
//! progress and the summary table (ratio of each scenario to its raw baseline) go to stderr.
//! Without `--raw` the bridge scenarios run first, then (unless `--no-raw`) the raw baselines;
//! `--raw` runs only the baselines.
//!
//! The layout: [`scenarios`] drives a [`purista::Connection`] and knows no broker; [`raw`] has
//! one baseline per broker; [`drive`] is the timing harness both share, so the harness's own
//! cost is on both sides of every ratio.
//!
//! No tracing subscriber is installed, so the runtime's logging costs what it costs a user who
//! turned logging off.

mod cli;
mod drive;
mod measurement;
mod payload;
mod raw;
mod scenarios;
mod table;
mod workload;

use std::process::ExitCode;

use anyhow::Context as _;
use tokio::time::Instant;

use crate::cli::{CliError, Options};
use crate::measurement::{Measurement, peak_rss_kb};
use crate::raw::Baseline;
use crate::workload::Workload;

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(CliError::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("purista-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The default multi-thread runtime: one worker per core, as a user's `#[tokio::main]`.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("purista-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The bench runs as a task on the runtime's workers, like a service's own code; `block_on`
    // would keep it on the main thread and add a thread hop to every sequential call.
    let outcome = runtime.block_on(async move { tokio::spawn(bench(options)).await });
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("purista-bench: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("purista-bench: the bench task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(options: Options) -> anyhow::Result<()> {
    let workload = if options.quick {
        Workload::quick()
    } else {
        Workload::FULL
    };
    let url = purista::redact_url(&options.url);
    if options.bridge {
        check_connect(&options.url).await?;
    }
    let baseline = if options.raw {
        match Baseline::for_url(&options.url) {
            Ok(baseline) => Some(baseline),
            // A full run still measures the bridge; only the ratios are missing.
            Err(e) if options.bridge => {
                eprintln!("purista-bench: {e}; running without ratios");
                None
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let began = Instant::now();
    eprintln!(
        "purista-bench: {url}, {} workload, {} tokio workers",
        if options.quick {
            "quick (1/10)"
        } else {
            "full"
        },
        tokio::runtime::Handle::current().metrics().num_workers(),
    );

    let mut measured = Vec::new();
    if options.bridge {
        for &scenario in &options.scenarios {
            eprintln!("running {scenario} on {url} …");
            let m = scenarios::run(scenario, &options.url, &workload, options.queue_mode)
                .await
                .with_context(|| format!("scenario {scenario} on {url}"))?;
            report(&m);
            measured.push(m);
        }
    }
    let mut raw = Vec::new();
    if let Some(baseline) = baseline {
        for &scenario in &options.scenarios {
            eprintln!("running {scenario} on {} …", baseline.label());
            let m = baseline
                .run(scenario, &workload)
                .await
                .with_context(|| format!("raw baseline {scenario} ({})", baseline.label()))?;
            report(&m);
            raw.push(m);
        }
    }

    eprintln!();
    if !measured.is_empty() {
        eprint!("{}", table::summary(&measured, &raw));
    }
    eprintln!("{}", table::rss_line(peak_rss_kb()));
    eprintln!(
        "done in {:.1} s",
        Instant::now().duration_since(began).as_secs_f64()
    );
    Ok(())
}

/// Connects once before any scenario, so a bad URL fails with the facade's own message.
async fn check_connect(url: &str) -> anyhow::Result<()> {
    let connection = purista::connect(url).await?;
    connection
        .events
        .shutdown(Instant::now() + std::time::Duration::from_secs(1))
        .await;
    Ok(())
}

fn report(m: &Measurement) {
    println!("{}", m.json_line());
    eprintln!("{}", table::progress_line(m));
}
