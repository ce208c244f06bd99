//! The harness of this crate's integration test targets: [`purista_test_runner`], every test
//! on a current-thread runtime of its own, as under `#[tokio::test]`. A test whose prerequisite is missing is listed as skipped with the reason, never
//! passed; under `PURISTA_REQUIRE_BROKERS=1` it runs and fails naming the variable.

pub use purista_test_runner::Needs;

/// `fn main` of a test target: `test_main!(NEEDS: [async_fn, …], …)`.
macro_rules! test_main {
    ($($tests:tt)*) => {
        purista_test_runner::test_main!(runtime: purista_test_runner::Runtime::CurrentThread; $($tests)*);
    };
}
pub(crate) use test_main;
