//! Running cases: the case table entry, one case on one harness ([`run_case`]), and the test
//! harness of each bridge's test target ([`run_suite`], what [`suite!`](crate::suite) expands
//! to).
//!
//! The test targets use their own harness (`harness = false`, built on `libtest-mimic`) so
//! that a case that cannot run here is *listed* as ignored, with its reason in its name, rather
//! than passing: nextest lists every test first and then runs each one by name in a process of
//! its own, so whatever is to be ignored must be known at listing time ([`crate::plan`]).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Failed, Trial};

use crate::gate::rejects_at_startup;
use crate::harness::Harness;
use crate::plan::{Plan, Requires, plan};

/// How a case ended, when it did not fail. A failure is a panic with a message that says what a
/// user would see broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The behaviour holds.
    Passed,
    /// The bridge does not declare the capability the behaviour needs, and the strict check
    /// proved it: a strict start is refused naming it, a non-strict start warns. Carries the
    /// need's description.
    RejectedAsUndeclared(String),
    /// The case did not run here; says why.
    Skipped(String),
}

/// A case body: runs one behaviour on a harness that meets the case's [`Requires`], and panics
/// with what a user would see broken when the behaviour does not hold.
pub type CaseFn = fn(Arc<dyn Harness>) -> BoxFuture<'static, ()>;

/// One behaviour of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// Behaviour group, e.g. `commands`.
    pub group: &'static str,
    /// Behaviour, e.g. `late_response_is_ignored`.
    pub name: &'static str,
    /// What the behaviour needs.
    pub requires: fn() -> Requires,
    /// The case.
    pub run: CaseFn,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}::{}", self.group, self.name)
    }
}

impl Case {
    /// The plan for this case on `h`.
    pub fn plan(&self, h: &dyn Harness) -> Plan {
        plan(&(self.requires)(), h)
    }
}

/// Upper bound of one case; a case that runs longer is broken (something hangs). Generous: the
/// fault cases bound their volume waits by a stall of their own, and a busy 2-core machine
/// takes 30 to 110 s for their 10 000 events on RabbitMQ.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(240);

/// Upper bound of one case when [`crate::harness::FULL_SIZE_ENV`] runs every case at its full
/// size (on moto, 10 000 events through the fault proxy take minutes).
pub const FULL_SIZE_CASE_TIMEOUT: Duration = Duration::from_secs(1_800);

/// The upper bound of one case in this run: [`CASE_TIMEOUT`], or
/// [`FULL_SIZE_CASE_TIMEOUT`] when every case runs at its full size.
pub fn case_timeout() -> Duration {
    if crate::harness::full_size_asked() {
        FULL_SIZE_CASE_TIMEOUT
    } else {
        CASE_TIMEOUT
    }
}

/// Environment variable of the stress mode: `PURISTA_CONFORMANCE_STRESS=N` runs N copies of
/// each case at once (each on its own deployment), to shake out races the single run misses.
pub const STRESS_ENV: &str = "PURISTA_CONFORMANCE_STRESS";

/// Copies of each case to run at once: [`STRESS_ENV`], default 1.
pub fn stress_copies() -> usize {
    std::env::var(STRESS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Runs `case` on `h` according to `plan`: the behaviour, or the strict-check proof. A
/// skipped case that is run anyway (`--ignored`) fails, naming why it was skipped. Panics when
/// the behaviour does not hold.
pub async fn run_planned(case: Case, h: Arc<dyn Harness>, plan: Plan) -> Verdict {
    match plan {
        Plan::Run => {
            if let Err(why) = h.availability() {
                panic!("{}: the harness cannot run here: {why}", h.name());
            }
            (case.run)(h).await;
            Verdict::Passed
        }
        Plan::RejectUndeclared(need) => {
            rejects_at_startup(&h, need.clone()).await;
            Verdict::RejectedAsUndeclared(need.describe())
        }
        Plan::Skip(why) => panic!("this case was listed as skipped: {why}"),
    }
}

/// Plans and runs `case` on `h`; a skip is returned, not run.
pub async fn run_case(case: Case, h: Arc<dyn Harness>) -> Verdict {
    match case.plan(&*h) {
        Plan::Skip(why) => Verdict::Skipped(why),
        plan => run_planned(case, h, plan).await,
    }
}

/// The text of a panic payload.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panicked".to_string()
    }
}

/// The runtime one test runs on: two worker threads, the cores of the machines CI runs on.
fn case_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("no tokio runtime: {e}"))
}

/// Plans and runs `case` on `h` on a runtime of its own, on the calling thread, bounded by
/// `timeout`; `Err` with the failure.
///
/// For a runner that runs many cases at once in one process (the matrix binary): each test of a
/// test target runs like this too (nextest gives each a process of its own), so a case's timing
/// never depends on what the cases next to it do to a shared runtime's worker threads.
pub fn run_case_isolated(
    case: Case,
    h: Arc<dyn Harness>,
    timeout: Duration,
) -> Result<Verdict, String> {
    let runtime = case_runtime()?;
    let outcome = runtime.block_on(async move {
        match tokio::time::timeout(timeout, tokio::spawn(run_case(case, h))).await {
            Ok(Ok(verdict)) => Ok(verdict),
            Ok(Err(e)) if e.is_panic() => Err(panic_text(&*e.into_panic())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("did not finish within {timeout:?}")),
        }
    });
    // Tasks a failed case left behind must not keep the runner waiting.
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// One trial: its own runtime, `copies` copies of the case at once, each bounded by
/// [`case_timeout`].
fn run_trial(
    module: &str,
    case: Case,
    h: Arc<dyn Harness>,
    plan: Plan,
    copies: usize,
) -> Result<(), Failed> {
    let runtime = case_runtime().map_err(Failed::from)?;
    let harness = h.clone();
    let result = runtime.block_on(async move {
        let runs = (0..copies).map(|_| {
            let (h, plan) = (harness.clone(), plan.clone());
            let task = tokio::spawn(tokio::time::timeout(
                case_timeout(),
                run_planned(case, h, plan),
            ));
            async move {
                match task.await {
                    Ok(Ok(verdict)) => Ok(verdict),
                    Ok(Err(_)) => Err(format!("did not finish within {:?}", case_timeout())),
                    Err(e) if e.is_panic() => Err(panic_text(&*e.into_panic())),
                    Err(e) => Err(e.to_string()),
                }
            }
        });
        futures::future::join_all(runs).await
    });
    // Tasks a failed case left behind must not keep the test waiting.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if copies == 1
        && let Some(outcome) = result.first()
    {
        crate::results::record(module, &*h, case, outcome);
    }
    let failures: Vec<String> = result.into_iter().filter_map(Result::err).collect();
    if failures.is_empty() {
        Ok(())
    } else if copies == 1 {
        Err(failures.join("\n").into())
    } else {
        Err(format!(
            "{} of {copies} concurrent copies failed:\n{}",
            failures.len(),
            failures.join("\n")
        )
        .into())
    }
}

/// The test harness of one bridge's test target: one test per case, named
/// `<module>::<group>::<case>`, run through `libtest-mimic` (so `cargo test` and nextest both
/// drive it, with the usual filters and `--list`).
///
/// A case whose plan is a skip is listed as ignored, its name prefixed with
/// `[skipped: <reason>]`; a case that proves an undeclared need is rejected is prefixed with
/// `[proves the strict check rejects undeclared <need>]`. [`STRESS_ENV`] runs copies of each
/// case at once.
pub fn run_suite(module: &str, harness: Arc<dyn Harness>) -> ExitCode {
    crate::logs::install();
    let args = Arguments::from_args();
    let copies = stress_copies();
    let trials = crate::all_cases()
        .into_iter()
        .map(|case| {
            let plan = case.plan(&*harness);
            let name = format!("{module}::{}::{}", case.group, case.name);
            let label = plan.label();
            let skipped = matches!(plan, Plan::Skip(_));
            let h = harness.clone();
            let module = module.to_string();
            let trial = Trial::test(name, move || run_trial(&module, case, h, plan, copies));
            let trial = match label {
                Some(label) => trial.with_kind(label),
                None => trial,
            };
            trial.with_ignored_flag(skipped)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// A test outside the case table, for [`run_tests`]: a name, its body, and the reason it
/// cannot run here (decided when the tests are listed).
pub struct ListedTest {
    /// Test name.
    pub name: &'static str,
    /// `Some(why)`: listed as ignored, its name prefixed with `[skipped: why]`.
    pub skip: Option<String>,
    /// The test body; panics on failure.
    pub run: fn() -> BoxFuture<'static, ()>,
}

/// The test harness for a test target of plain async tests whose environment may be missing
/// (e.g. a private broker node): like [`run_suite`], a test that cannot run here is listed as
/// ignored with its reason instead of passing.
pub fn run_tests(tests: Vec<ListedTest>) -> ExitCode {
    crate::logs::install();
    let args = Arguments::from_args();
    let trials = tests
        .into_iter()
        .map(|t| {
            let run = t.run;
            let trial = Trial::test(t.name, move || {
                let runtime = case_runtime().map_err(Failed::from)?;
                let outcome = runtime.block_on(async move {
                    match tokio::time::timeout(case_timeout(), tokio::spawn(run())).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) if e.is_panic() => Err(panic_text(&*e.into_panic())),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("did not finish within {:?}", case_timeout())),
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
                outcome.map_err(Failed::from)
            });
            match t.skip {
                Some(why) => trial
                    .with_kind(format!("skipped: {why}"))
                    .with_ignored_flag(true),
                None => trial,
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
