//! # purista-bridge-aws
//!
//! The `aws` bridge: PURISTA's semantics on AWS, with EventBridge routing and SQS delivering,
//! over the official SDK (`aws-sdk-eventbridge`, `aws-sdk-sqs`, `aws-config`).
//!
//! ## The mapping
//!
//! * **Events**: every event and info message is put on a custom bus (`PutEvents`; the whole
//!   envelope is the event's `detail`, `detail-type` its `messageType`, `source` =
//!   `purista.<sender service>`); commands and responses too, while a subscription can match
//!   them (see `copies.rs`).
//! * **Subscriptions**: one rule per subscription whose event pattern is built from the whole
//!   filter ([`event_pattern`]), so EventBridge does all the filtering; its single target is
//!   an SQS queue — one per subscription when shared (instances compete), one per instance
//!   when broadcast. A rule per subscription means no 5-targets ceiling per event: what bounds
//!   fan-out is the bus's rule quota (300 by default, raisable). The queue's policy lets only
//!   that rule send to it (`aws:SourceArn`). See `subscriptions.rs`.
//! * **Delivery** is SQS's: at least once, long polling, a bounded number of handlers per
//!   consumer; outcomes (retry with the attempt carried in the message, delayed retry,
//!   dead-letter queue with reason, drop, pause/resume) in `subscriptions.rs`.
//! * **Commands**: a command queue per endpoint (competing consumers), a reply queue per
//!   instance, the caller's expiry carried so that nobody runs a command its caller gave up.
//!   See `commands.rs`. Stale per-instance queues of crashed instances are removed by the
//!   janitor (`janitor.rs`).
//! * **Queue jobs** ([`AwsQueues`], from [`AwsBridge::queue_bridge`]): a job is an SQS
//!   message on `<prefix>-q-<queue>`; a lease is SQS's visibility (the bridge keeps the
//!   millisecond deadline, SQS's visibility outlasts it), `extend_lease` is
//!   `ChangeMessageVisibility` up to the queue's extension cap; retries back off exponentially
//!   with jitter within `max_attempts` and the 24 h retry window, then `<queue>.dead-letter`
//!   (inspect, replay, purge); delays past SQS's 15-minute `DelaySeconds` are sent on in
//!   15-minute copies; metrics come from SQS's queue attributes. Idempotency keys are carried,
//!   not enforced (declared so). See `queues/mod.rs`.
//! * Not provided, and refused by the strict startup check: streams; commands are at most
//!   once (deleted when received, never retried); enforced idempotency keys of queue jobs.
//!
//! ```no_run
//! # async fn run() -> Result<(), purista_core::BridgeError> {
//! use purista_bridge_aws::{AwsBridge, AwsConfig};
//! use purista_core::EventBridge;
//! let bridge = AwsBridge::new(AwsConfig::from_url("aws://eu-central-1?prefix=shop").unwrap()).await?;
//! bridge.start().await?;
//! # Ok(()) }
//! ```

mod batch;
mod bridge;
mod client;
mod commands;
pub mod config;
mod copies;
mod dead_letters;
mod driver;
mod janitor;
pub mod names;
mod pattern;
mod publish;
pub mod queues;
mod receive;
mod shared;
mod subscriptions;
mod topology;

pub use bridge::{AwsBridge, BRIDGE_NAME, capabilities};
pub use client::{Clients, install_crypto_provider};
pub use config::{AwsConfig, ConfigError};
pub use copies::COPIES_MARK;
pub use driver::driver;
pub use pattern::event_pattern;
pub use publish::MAX_ENTRIES_PER_PUT;
pub use queues::{AwsQueues, queue_capabilities};
pub use shared::{ATTR_ATTEMPT, PACK_ITEMS, TAG_OWNER, TAG_RULE, TAG_SEEN, pack_body, unpack};
pub use subscriptions::{ATTR_AT, ATTR_ATTEMPTS, ATTR_ORIGIN, ATTR_REASON, decode_body};
pub use topology::rule_policy;
/// The SDK crates the bridge is built on.
pub use {aws_sdk_eventbridge, aws_sdk_sqs};
