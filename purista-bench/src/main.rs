//! `purista-bench`: throughput and latency of a bridge, through the service runtime a user
//! would use, next to a raw baseline of the same broker (DESIGN §6).
//!
//! ```text
//! cargo run --release -p purista-bench -- <BRIDGE_URL> [--scenario NAME]... [--raw | --no-raw] [--quick | --divide N]
//! ```
//!
//! Every scenario prints one JSON line on stdout,
//! `{"bridge","scenario","ops","seconds","ops_per_s","p50_us","p99_us","peak_rss_kb"}`;
//! progress and the summary table (ratio of each scenario to its raw baseline) go to stderr.
//! Without `--raw` each bridge scenario runs and then (unless `--no-raw`) its raw baseline, so
//! both sides of a ratio run under the same machine load; `--raw` runs only the baselines.
//!
//! The layout: [`scenarios`] drives a [`purista::Connection`] and knows no broker; [`raw`] has
//! one baseline per broker; [`drive`] is the timing harness both share, so the harness's own
//! cost is on both sides of every ratio; [`target`] says where bridge instances come from (the
//! URL, or on `dapr://double` a sidecar of the in-process Dapr double each). A scenario a bridge cannot run (`queue` on a bridge
//! without a queue bridge, e.g. RabbitMQ) is skipped with a line on stderr and a row in the
//! table, and prints no JSON line.
//!
//! Each run names its broker resources under a prefix of its own (`purista-bench-<id>`) and
//! deletes them at the end ([`cleanup`]).
//!
//! No tracing subscriber is installed, so the runtime's logging costs what it costs a user who
//! turned logging off. With `PURISTA_BENCH_SPANS=1` a subscriber that keeps every `info` span
//! (a `tracing-subscriber` registry, no exporter) is installed: the spans' cost (issue 13).

#[cfg(feature = "aws")]
mod aws;
mod cleanup;
mod cli;
#[cfg(feature = "dapr")]
mod dapr;
mod drive;
mod measurement;
mod payload;
mod raw;
mod scenarios;
mod table;
mod target;
mod workload;

use std::process::ExitCode;

use anyhow::Context as _;
use tokio::time::Instant;

use crate::cli::{CliError, Options};
use crate::measurement::{Measurement, peak_rss_kb, reset_peak_rss};
use crate::raw::Baseline;
use crate::table::Skipped;
use crate::target::Target;
use crate::workload::{Scenario, Workload};

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
    if std::env::var_os("PURISTA_BENCH_SPANS").is_some_and(|v| v == "1") {
        use tracing_subscriber::layer::SubscriberExt;
        let spans =
            tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::INFO);
        if tracing::subscriber::set_global_default(spans).is_err() {
            eprintln!("purista-bench: a tracing subscriber is already installed");
        }
        eprintln!("purista-bench: spans on (registry, no exporter)");
    }
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

async fn bench(mut options: Options) -> anyhow::Result<()> {
    let workload = Workload::divided(options.divisor);
    // `kubemq://double`: KubeMQ's protocol double in this process, for the whole run.
    #[cfg(feature = "kubemq")]
    let _double = if options.url.starts_with("kubemq://double") {
        let double = purista_bridge_kubemq::double::KubemqDouble::start(Default::default())?;
        options.url = options.url.replacen(
            "kubemq://double",
            &format!("kubemq://{}", double.address()),
            1,
        );
        eprintln!(
            "purista-bench: KubeMQ protocol double on {}",
            double.address()
        );
        Some(double)
    } else {
        None
    };
    let url = purista::redact_url(&options.url);
    let prefix = format!("purista-bench-{}", &purista::ids::new_id()[..8]);
    // `dapr://double`: Dapr's sidecar double in this process, a sidecar per bridge instance.
    let target = Target::new(&options.url, &prefix)?;
    let bridge = if options.bridge {
        Some(probe(&target).await?)
    } else {
        None
    };
    let baseline = if options.raw {
        match Baseline::for_target(&target) {
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
        "purista-bench: {url}, {} workload, {} tokio workers, broker resources under `{prefix}`",
        if options.divisor == 1 {
            "full".to_string()
        } else {
            format!("1/{}", options.divisor)
        },
        tokio::runtime::Handle::current().metrics().num_workers(),
    );

    let mut measured = Vec::new();
    let mut raw = Vec::new();
    let mut skipped = Vec::new();
    // Each scenario's raw baseline runs right after it, so both sides of a ratio see the same
    // machine load (on a busy machine the load drifts over minutes).
    let run = async {
        for &scenario in &options.scenarios {
            if let Some(bridge) = &bridge {
                match run_bridge(bridge, scenario, &target, &options, &workload).await? {
                    Ran::Measured(m) => measured.push(m),
                    Ran::Skipped(s) => skipped.push(s),
                }
            }
            if let Some(baseline) = &baseline {
                if let Some(reason) = baseline.lacks(scenario) {
                    eprintln!("skipping {scenario} on {}: {reason}", baseline.label());
                    continue;
                }
                eprintln!("running {scenario} on {} …", baseline.label());
                reset_peak_rss();
                let m = baseline
                    .run(scenario, &workload)
                    .await
                    .with_context(|| format!("raw baseline {scenario} ({})", baseline.label()))?;
                report(&m);
                raw.push(m);
            }
        }
        anyhow::Ok(())
    };
    let result = run.await;
    if bridge.is_some() || cleanup::sweeps_baselines(&options.url) {
        // Whatever happened, leave the broker as it was.
        if let Err(e) = cleanup::after_bridge_run(&options.url, &prefix).await {
            eprintln!("purista-bench: warning: cleaning up `{prefix}` failed: {e:#}");
        }
    }
    result?;

    eprintln!();
    if !measured.is_empty() || !skipped.is_empty() {
        eprint!("{}", table::summary(&measured, &raw, &skipped));
    }
    let peak = |ms: &[Measurement]| ms.iter().filter_map(|m| m.peak_rss_kb).max();
    let per_phase = reset_peak_rss();
    let purista_peak = if per_phase {
        peak(&measured)
    } else {
        peak_rss_kb()
    };
    eprintln!("{}", table::rss_line(purista_peak, peak(&raw), per_phase));
    eprintln!(
        "done in {:.1} s",
        Instant::now().duration_since(began).as_secs_f64()
    );
    Ok(())
}

/// What became of one bridge scenario.
enum Ran {
    Measured(Measurement),
    Skipped(Skipped),
}

/// Runs one bridge scenario, or skips it when the bridge cannot run it.
async fn run_bridge(
    bridge: &Probe,
    scenario: Scenario,
    target: &Target,
    options: &Options,
    workload: &Workload,
) -> anyhow::Result<Ran> {
    let url = purista::redact_url(&options.url);
    if scenario == Scenario::Queue && !bridge.has_queue_bridge {
        let reason = format!(
            "bridge `{}` has no queue bridge (DESIGN §4); nothing measured",
            bridge.name
        );
        eprintln!("skipping {scenario} on {url}: {reason}");
        return Ok(Ran::Skipped(Skipped { scenario, reason }));
    }
    eprintln!("running {scenario} on {url} …");
    reset_peak_rss();
    let m = scenarios::run(scenario, target, workload, options.queue_mode)
        .await
        .with_context(|| format!("scenario {scenario} on {url}"))?;
    report(&m);
    Ok(Ran::Measured(m))
}

/// What the bench needs to know about a bridge before running scenarios on it.
struct Probe {
    name: String,
    has_queue_bridge: bool,
}

/// Connects once before any scenario, so a bad URL fails with the facade's own message.
async fn probe(target: &Target) -> anyhow::Result<Probe> {
    let instance = target.connect().await?;
    let connection = &instance.connection;
    let probe = Probe {
        name: connection.events.name().to_string(),
        has_queue_bridge: connection.queues.is_some(),
    };
    connection
        .events
        .shutdown(Instant::now() + std::time::Duration::from_secs(1))
        .await;
    target::release(instance.keep.into_iter().collect()).await;
    Ok(probe)
}

fn report(m: &Measurement) {
    println!("{}", m.json_line());
    eprintln!("{}", table::progress_line(m));
}
