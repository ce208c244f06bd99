//! Running one case: the verdict type, the case table entry and the per-test entry point the
//! [`suite!`](crate::suite) macro expands to.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::harness::Harness;

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
    /// The behaviour cannot be exercised with this harness (no broker-control hooks, no queue
    /// bridge, …); says why.
    NotApplicable(&'static str),
}

/// A case as a plain function pointer, so the case table is a `Vec` of data.
pub type CaseFn = fn(Arc<dyn Harness>) -> BoxFuture<'static, Verdict>;

/// One behaviour of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// Behaviour group, e.g. `commands`.
    pub group: &'static str,
    /// Behaviour, e.g. `late_response_is_ignored`.
    pub name: &'static str,
    /// The case.
    pub run: CaseFn,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}::{}", self.group, self.name)
    }
}

/// Upper bound of one case; a case that runs longer is broken (something hangs).
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// The body of each generated test: runs the case, prints a verdict that is not a pass, fails
/// on a panic (propagated) or on [`CASE_TIMEOUT`]. A harness that cannot run here (its broker
/// is unreachable) skips the case loudly, or fails it under `PURISTA_REQUIRE_BROKERS=1`.
pub async fn run_test(harness: Arc<dyn Harness>, group: &str, name: &str, case: CaseFn) {
    crate::logs::install();
    let bridge = harness.name();
    if let Err(why) = harness.availability().await {
        crate::env::skip_or_fail(&format!("{bridge}::{group}::{name}"), &why);
        return;
    }
    match tokio::time::timeout(CASE_TIMEOUT, case(harness)).await {
        Ok(Verdict::Passed) => {}
        Ok(Verdict::RejectedAsUndeclared(need)) => {
            println!(
                "{bridge}::{group}::{name}: `{bridge}` does not declare {need}; the strict startup check rejects it as it must"
            );
        }
        Ok(Verdict::NotApplicable(why)) => {
            println!("{bridge}::{group}::{name}: not applicable: {why}");
        }
        Err(_) => panic!("{bridge}::{group}::{name} did not finish within {CASE_TIMEOUT:?}"),
    }
}
