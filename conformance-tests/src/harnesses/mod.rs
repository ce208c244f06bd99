//! One harness per bridge. A new bridge adds a file here, a `tests/<bridge>.rs` with
//! `purista_conformance::suite!(<bridge>, …)` and an entry in [`available`].

mod amqp;
mod default;

use std::sync::Arc;

pub use amqp::AmqpHarness;
/// Private RabbitMQ nodes (restart faults, TLS listeners), for tests beyond the suite.
#[cfg(unix)]
pub use amqp::private_node;
pub use default::DefaultHarness;

use crate::harness::Harness;

/// Every harness that can run on this machine right now, in matrix column order.
///
/// A broker bridge is listed when its broker is reachable; otherwise it is left out with a loud
/// notice, or — with `PURISTA_REQUIRE_BROKERS=1` — its absence is an error (a panic).
pub fn available() -> Vec<Arc<dyn Harness>> {
    let mut harnesses: Vec<Arc<dyn Harness>> = vec![Arc::new(DefaultHarness::new())];
    match AmqpHarness::probe() {
        Ok(()) => harnesses.push(Arc::new(AmqpHarness::new())),
        Err(why) => crate::env::skip_or_fail("the amqp bridge", &why),
    }
    harnesses
}
