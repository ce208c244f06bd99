//! Writes the capability matrix from what actually ran.
//!
//! ```text
//! cargo run -p purista-conformance --bin matrix                      # markdown to stdout
//! cargo run -p purista-conformance --bin matrix -- --write README.md # replace the marked section
//! cargo run -p purista-conformance --bin matrix -- --check README.md # exit 1 if it differs
//! ```
//!
//! Every case of the suite runs against every harness (`purista_conformance::harnesses::all`),
//! several at once, each in its own task with a timeout; a panic or a timeout counts as failed,
//! a case that cannot run here (its broker does not answer, the harness lacks what it needs)
//! is shown as skipped with its reason. Progress goes to stderr.

use std::process::ExitCode;
use std::time::Duration;

use purista_conformance::matrix::{self, Outcome};
use purista_conformance::{all_cases, harnesses, logs, runner};

const USAGE: &str = "usage: matrix [--write FILE | --check FILE] [--jobs N] [--bridge NAME]...";

enum Mode {
    Print,
    Write(String),
    Check(String),
}

struct Args {
    mode: Mode,
    jobs: usize,
    /// Only these bridges (all when empty).
    bridges: Vec<String>,
    /// Outcomes the test targets recorded (`purista_conformance::results`).
    results: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut mode = Mode::Print;
    let mut jobs = 4;
    let mut bridges = Vec::new();
    let mut results = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--write" => mode = Mode::Write(value()?),
            "--check" => mode = Mode::Check(value()?),
            "--jobs" => {
                jobs = value()?
                    .parse()
                    .map_err(|e| format!("--jobs: {e}\n{USAGE}"))?
            }
            "--bridge" => bridges.push(value()?),
            "--results" => results = Some(std::path::PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(Args {
        mode,
        jobs,
        bridges,
        results,
    })
}

fn main() -> ExitCode {
    let Args {
        mode,
        jobs,
        bridges,
        results: recorded,
    } = match parse_args() {
        Ok(parsed) => parsed,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    logs::install();
    // Some cases make handlers panic on purpose; one line each is enough (no backtraces).
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("  panic at {at}: {what}");
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut harnesses = harnesses::all();
    if !bridges.is_empty() {
        if !matches!(mode, Mode::Print) {
            eprintln!("--bridge prints a partial matrix; it cannot --write or --check a file");
            return ExitCode::from(2);
        }
        if let Some(unknown) = bridges
            .iter()
            .find(|b| !harnesses.iter().any(|h| h.name() == b.as_str()))
        {
            eprintln!("no bridge named `{unknown}` in the matrix");
            return ExitCode::from(2);
        }
        harnesses.retain(|h| bridges.iter().any(|b| b == h.name()));
    }
    let cases = all_cases();
    eprintln!(
        "running {} cases on {} bridge(s): {}",
        cases.len(),
        harnesses.len(),
        harnesses
            .iter()
            .map(|h| h.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(dir) = &recorded {
        eprintln!(
            "taking the outcomes the test targets recorded in {} where there are any",
            dir.display()
        );
    }
    let results = runtime.block_on(matrix::run(
        &harnesses,
        &cases,
        jobs,
        runner::case_timeout(),
        recorded.as_deref(),
        |r| {
            let what = match &r.outcome {
                Outcome::Passed => "passed".to_string(),
                Outcome::Rejected(need) => format!("rejected as undeclared ({need})"),
                Outcome::Skipped(why) => format!("skipped ({why})"),
                Outcome::Failed(why) => format!("FAILED: {why}"),
            };
            eprintln!("{}::{}::{}: {what}", r.bridge, r.group, r.name);
        },
    ));
    // Tasks a failed case left behind must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    let failed = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .count();
    eprintln!("{} case runs, {failed} failed", results.len());
    let table = matrix::render(&harnesses, &cases, &results);
    print!("{table}");

    match mode {
        Mode::Print => ExitCode::SUCCESS,
        Mode::Write(file) => {
            let doc = match std::fs::read_to_string(&file) {
                Ok(doc) => doc,
                Err(e) => {
                    eprintln!("reading {file}: {e}");
                    return ExitCode::from(2);
                }
            };
            let Some(updated) = matrix::replace_section(&doc, &table) else {
                eprintln!(
                    "{file} has no `{}` … `{}` section",
                    matrix::START_MARKER,
                    matrix::END_MARKER
                );
                return ExitCode::from(2);
            };
            if let Err(e) = std::fs::write(&file, updated) {
                eprintln!("writing {file}: {e}");
                return ExitCode::from(2);
            }
            eprintln!("updated the matrix in {file}");
            ExitCode::SUCCESS
        }
        Mode::Check(file) => {
            let doc = std::fs::read_to_string(&file).unwrap_or_default();
            let Some(committed) = matrix::section(&doc) else {
                eprintln!(
                    "{file} has no `{}` … `{}` section",
                    matrix::START_MARKER,
                    matrix::END_MARKER
                );
                return ExitCode::FAILURE;
            };
            // A bridge that could not run here (and is not required to) is not checked, loudly;
            // the other columns still are.
            let unchecked: Vec<&str> = harnesses
                .iter()
                .filter(|h| {
                    h.availability().is_err() && !purista_conformance::env::brokers_required()
                })
                .map(|h| h.name())
                .collect();
            let (committed, fresh) = if unchecked.is_empty() {
                (committed.to_string(), table.trim().to_string())
            } else {
                eprintln!(
                    "\n*** NOT CHECKED: the matrix column(s) of {} (the bridge could not run here; set {}=1 to fail instead) ***\n",
                    unchecked.join(", "),
                    purista_conformance::env::REQUIRE_BROKERS_ENV
                );
                (
                    matrix::without_bridges(committed, &unchecked),
                    matrix::without_bridges(table.trim(), &unchecked),
                )
            };
            if committed == fresh {
                eprintln!("the matrix in {file} matches this run");
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "the matrix in {file} differs from this run (- committed, + fresh):\n{}\nrun `cargo run -p purista-conformance --bin matrix -- --write {file}` and commit the result",
                    matrix::line_diff(&committed, &fresh)
                );
                ExitCode::FAILURE
            }
        }
    }
}
