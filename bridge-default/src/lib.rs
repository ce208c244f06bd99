//! # purista-bridge-default
//!
//! The `default` bridge: PURISTA's transport inside one process, for development, tests and
//! single-process deployments. It is the reference the broker adapters are compared with, so it
//! implements every capability a process can honestly offer.
//!
//! * [`MemoryBroker`] is the in-process "broker": a hub shared by several bridge instances.
//!   [`MemoryBroker::named`] gives one hub per name in the process (`memory://orders` twice is
//!   one hub).
//! * [`MemoryBridge`] is one [`EventBridge`](purista_core::EventBridge) instance on a hub, with
//!   its own instance id. Several instances on one hub compete for commands and shared
//!   subscriptions and each receive broadcast subscriptions, like service instances on a broker.
//! * [`MemoryQueueBridge`] is the in-process [`QueueBridge`](purista_core::QueueBridge).
//!
//! The model: messages are never encoded in process. An emitted envelope is stamped, wrapped in
//! one `Arc` and shared by every delivery. Subscription filters are core's reference matcher,
//! so routing equals the definition by construction. Settlements (retry with delay, dead
//! letter, pause) are carried out in memory; nothing is durable, and the bridge declares
//! at-most-once delivery. Publishing waits while a consumer's buffer is full (backpressure); see
//! [`MemoryBridge`] for the bounded behaviour while a consumer is paused.
#![warn(missing_docs)]

mod bridge;
mod broker;
mod commands;
mod config;
mod consumer_queue;
mod dead_letters;
mod driver;
pub mod queue;
mod streams;
mod subscriptions;

pub use bridge::{BRIDGE_NAME, MemoryBridge};
pub use broker::MemoryBroker;
pub use config::{DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONSUMER_BUFFER, MemoryBridgeConfig};
pub use dead_letters::DEAD_LETTER_CAPACITY;
pub use driver::driver;
pub use queue::MemoryQueueBridge;
pub use streams::STREAM_FRAME_BUFFER;
