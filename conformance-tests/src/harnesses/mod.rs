//! One harness per bridge. A new bridge adds a file here, a `tests/<bridge>.rs` with
//! `purista_conformance::suite!(<bridge>, …)` (a `[[test]]` target with `harness = false`) and
//! an entry in [`all`].

mod amqp;
mod aws;
pub mod aws_faults;
mod dapr;
mod default;
mod kubemq;

use std::sync::Arc;

pub use amqp::AmqpHarness;
/// Private RabbitMQ nodes (restart faults, TLS listeners), for tests beyond the suite.
#[cfg(unix)]
pub use amqp::private_node;
pub use aws::{AwsHarness, remove_all as remove_aws_resources};
pub use dapr::DaprHarness;
pub use default::DefaultHarness;
pub use kubemq::KubemqHarness;

use crate::harness::Harness;

/// Every harness, in matrix column order. Whether each can run here is its
/// [`Harness::availability`]: the matrix shows the cases of one that cannot as skipped.
pub fn all() -> Vec<Arc<dyn Harness>> {
    vec![
        Arc::new(DefaultHarness::new()),
        Arc::new(AmqpHarness::new()),
        Arc::new(KubemqHarness::new()),
        Arc::new(DaprHarness::new()),
        Arc::new(AwsHarness::new()),
    ]
}
