//! The harness of purista-rs's broker integration test targets: each is `harness = false` in
//! its Cargo.toml and names its tests, with what each needs, in [`test_main!`] (libtest-mimic,
//! so `cargo test` and nextest list and filter them as usual).
//!
//! Every test runs on a tokio runtime of its own ([`Runtime`]). A test whose prerequisite
//! ([`Needs`]) is missing is listed as ignored with the reason in its name
//! (`[skipped: RabbitMQ is not reachable at …] name`): a skip, never a pass. Under
//! `PURISTA_REQUIRE_BROKERS=1` it runs instead, and fails naming the variable. Run anyway
//! (`--include-ignored`), a skipped test fails: a test that did not run cannot pass.
//!
//! [`filters`] holds what the bridges' filter property tests share: random filters and
//! messages, and the seed handling.

pub mod filters;

use std::collections::HashMap;
use std::future::Future;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Trial};

/// Set to `1` (CI), a missing prerequisite fails its tests instead of skipping them.
pub const REQUIRE_ENV: &str = "PURISTA_REQUIRE_BROKERS";

/// What a test needs from the machine: a name for it and its check (`Ok` when it is there,
/// else why not). The tests define the ones they use.
#[derive(Clone, Copy)]
pub struct Needs {
    what: &'static str,
    check: fn() -> Result<(), String>,
}

impl Needs {
    /// A test that needs nothing runs everywhere.
    pub const NOTHING: Needs = Needs {
        what: "nothing",
        check: || Ok(()),
    };

    /// The prerequisite `what`, present when `check` says so.
    pub const fn new(what: &'static str, check: fn() -> Result<(), String>) -> Needs {
        Needs { what, check }
    }
}

/// One test of a target.
pub struct Test {
    name: &'static str,
    needs: Needs,
    run: Box<dyn FnOnce() + Send>,
}

/// The tokio runtime each test of a target gets, a fresh one per test.
#[derive(Clone, Copy, Debug)]
pub enum Runtime {
    /// One thread, as under `#[tokio::test]`.
    CurrentThread,
    /// A multi-thread runtime with this many workers, as under
    /// `#[tokio::test(flavor = "multi_thread", worker_threads = n)]`.
    MultiThread(usize),
}

impl Runtime {
    fn build(self) -> tokio::runtime::Runtime {
        let mut builder = match self {
            Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            Runtime::MultiThread(workers) => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(workers);
                b
            }
        };
        builder
            .enable_all()
            .build()
            .expect("a tokio runtime for the test")
    }
}

/// The test `name`: `body` (an `async fn`) on a runtime of its own.
pub fn test<F>(name: &'static str, needs: Needs, runtime: Runtime, body: fn() -> F) -> Test
where
    F: Future<Output = ()> + 'static,
{
    Test {
        name,
        needs,
        run: Box::new(move || runtime.build().block_on(body())),
    }
}

/// Lists or runs `tests` as the command line asks; the exit code of the run.
pub fn run(tests: Vec<Test>) -> ExitCode {
    let args = Arguments::from_args();
    let required = std::env::var(REQUIRE_ENV).as_deref() == Ok("1");
    // Each prerequisite is checked once, and only when a test needing it may be selected:
    // nextest starts the target once per test, and a check such as `rabbitmqctl` takes a
    // second.
    let mut checked: HashMap<&'static str, Result<(), String>> = HashMap::new();
    let trials = tests
        .into_iter()
        .map(|Test { name, needs, run }| {
            let runs = move || {
                run();
                Ok(())
            };
            if !may_be_selected(&args, name) {
                // The filter leaves it out whatever it is listed as.
                return Trial::test(name, runs);
            }
            let present = checked.entry(needs.what).or_insert_with(needs.check);
            match present.clone() {
                Ok(()) => Trial::test(name, runs),
                Err(why) if required => Trial::test(name, move || {
                    Err(format!("{why}, and {REQUIRE_ENV}=1 requires it").into())
                }),
                Err(why) => {
                    let kind = format!("skipped: {why}");
                    // Run anyway (`--include-ignored`), it fails: a test that did not run
                    // cannot pass.
                    Trial::test(name, move || Err(format!("not run: {why}").into()))
                        .with_kind(kind)
                        .with_ignored_flag(true)
                }
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// False only when an exact filter (nextest runs each test so) names another test, with or
/// without the `[kind] ` libtest-mimic puts before a name.
fn may_be_selected(args: &Arguments, name: &str) -> bool {
    match &args.filter {
        Some(filter) if args.exact => {
            filter == name
                || filter
                    .strip_suffix(name)
                    .is_some_and(|kind| kind.starts_with('[') && kind.ends_with("] "))
        }
        _ => true,
    }
}

/// `fn main` of a test target: `test_main!(runtime: RUNTIME; NEEDS: [async_fn, …], …)` with a
/// [`Runtime`] and [`Needs`] values; each test is named after its function.
#[macro_export]
macro_rules! test_main {
    (runtime: $runtime:expr; $($needs:path: [$($test:ident),* $(,)?]),* $(,)?) => {
        fn main() -> std::process::ExitCode {
            $crate::run(vec![$($(
                $crate::test(stringify!($test), $needs, $runtime, $test),
            )*)*])
        }
    };
}
