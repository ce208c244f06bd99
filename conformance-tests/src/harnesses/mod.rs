//! One harness per bridge. A new bridge adds a file here, a `tests/<bridge>.rs` with
//! `purista_conformance::suite!(<bridge>, …)` and an entry in [`available`].

mod default;

use std::sync::Arc;

pub use default::DefaultHarness;

use crate::harness::Harness;

/// Every harness that can run on this machine right now, in matrix column order.
///
/// Broker bridges plug in here: a harness for `amqp` is listed when its broker is reachable
/// (and, with `PURISTA_REQUIRE_BROKERS=1`, its absence is an error rather than a skip).
pub fn available() -> Vec<Arc<dyn Harness>> {
    vec![Arc::new(DefaultHarness::new())]
}
