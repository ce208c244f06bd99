//! # purista-bridge-kubemq
//!
//! The `kubemq` bridge: PURISTA's semantics on KubeMQ, over the `kubemq` crate (gRPC).
//!
//! ## The mapping
//!
//! * **Commands** are KubeMQ *queries*: native request/reply with a mandatory timeout, which
//!   is the invocation's ttl. One channel per command endpoint, every instance serving it in
//!   one responder group (competing consumers). KubeMQ cannot tell a sender that nobody
//!   listens, so a command nobody serves fails with 504 at its ttl. See `commands.rs`.
//! * **Subscriptions** are KubeMQ *Events* (live fan-out, at most once): every message is
//!   published on a channel that spells all its filter fields, and a subscription listens on
//!   the same shape with `*` for what it leaves open — KubeMQ does all the filtering
//!   ([`channels`]). Shared = a KubeMQ group per registration, broadcast = no group.
//! * **Outcomes**: retries wait on a timer in the consumer (never a hot loop) and are lost
//!   with the instance; dead letters are durable KubeMQ queue messages (`<prefix>.dl.<target>`)
//!   with reason, attempts and origin, which the operator calls inspect, replay and purge;
//!   pause closes the stream, resume subscribes again.
//! * **Settlement** is manual: the handler's outcome settles each delivery (ack, retry, dead
//!   letter, drop, pause).
//! * **Queue bridge** ([`KubemqQueues`]): jobs on KubeMQ queues with visibility leases
//!   ([`queues`]).
//! * **Durable subscriptions** (`durable.rs`): a KubeMQ queue per
//!   subscription, filled by the publishers from a registry on Events Store; at least once.
//! * Not provided, and refused by the strict startup check: at-least-once delivery for every
//!   subscription (non-durable ones ride Events, at most once), streams.
//!
//! The in-repo protocol double ([`double`], cargo feature `double`) is the KubeMQ server of
//! the tests and benchmarks here; the same tests run against a real KubeMQ when
//! `KUBEMQ_ADDRESS` is set.

mod bridge;
pub mod channels;
mod commands;
pub mod config;
mod connection;
mod dead_letters;
#[cfg(feature = "double")]
pub mod double;
mod driver;
mod durable;
mod pipe;
mod probe;
mod publish;
pub mod queues;
mod shared;
mod stream;
mod subscriptions;

pub use bridge::{BRIDGE_NAME, KubemqBridge, capabilities};
pub use config::{ConfigError, KubemqConfig};
pub use driver::driver;
/// The KubeMQ Rust SDK the bridge is built on.
pub use kubemq;
pub use purista_core::redact_url;
pub use queues::{KubemqQueues, queue_capabilities};
pub use subscriptions::{TAG_AT, TAG_ATTEMPTS, TAG_ORIGIN, TAG_REASON};
