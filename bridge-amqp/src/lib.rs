//! # purista-bridge-amqp
//!
//! The `amqp` bridge: PURISTA's semantics on RabbitMQ (AMQP 0-9-1, via `lapin`).
//!
//! ## The mapping
//!
//! * **One headers exchange** (`x-match: all`) carries every message. The body is the full
//!   JSON envelope; the AMQP headers are PURISTA's header projection (`messageType`,
//!   `senderServiceName`, `senderServiceVersion`, `senderServiceTarget`, `senderInstanceId`,
//!   `receiverServiceName`, `receiverServiceVersion`, `receiverServiceTarget`,
//!   `receiverInstanceId`, `eventName`, `principalId`, `tenantId`); the properties carry
//!   `message_id`, `correlation_id`, `reply_to`, `timestamp`, `type`, `content_type`,
//!   `content_encoding` and persistent delivery. See [`headers`].
//! * **Commands**: a queue per command endpoint with competing consumers, manual ack and a
//!   prefetch. Commands are published `mandatory` with publisher confirms, so a command no
//!   instance serves comes back at once as 502 instead of a 504 later; they expire after their
//!   ttl, so no command is served after its caller gave up. Responses go through the exchange
//!   (subscriptions see them, e.g. a success event) to the caller's exclusive reply queue.
//!   A command queue is deleted by its last server when that server leaves; a server that only
//!   lost its connection keeps it (until [`AmqpConfig::command_queue_expiry`]) and finds the
//!   commands waiting when it is back. For [`AmqpConfig::reconnect_grace`] after the caller's
//!   own reconnect, a command without a route is tried again within its ttl instead of failing
//!   with 502 (after a broker restart the servers re-create their queues a moment later).
//! * **Subscriptions**: shared = one named queue per subscription (durable when asked),
//!   broadcast = one queue per instance; each bound with its filter, where an unset filter part
//!   is simply absent from the binding.
//! * **Streams**: the one family that bypasses the headers exchange, so no subscription ever
//!   sees a frame. A queue per stream endpoint (`<prefix>.stream.<service>.<version>.<stream>`,
//!   competing consumers, deleted by its last server when it leaves) takes open frames,
//!   published `mandatory` with confirms through the default exchange, so a stream nobody
//!   serves fails at once with 502. The instance that takes one runs the session and publishes
//!   its frames in order, each confirmed, straight to the opener's reply queue, which routes
//!   them by `correlationId`; a cancel goes back the same way to the producer's reply queue.
//!   Sessions are at most once: one ends at once (503 for the reader, a cancel for the producer) when either end's
//!   connection drops, and a reader that lets [`STREAM_FRAME_BUFFER`] frames pile up fails its
//!   session rather than stall the instance's responses.
//! * **Outcomes**: the attempt count travels in a header; delayed retries wait in a TTL queue
//!   that dead-letters back to the source queue; dead letters go to `<prefix>.<target>.dead-letter`
//!   with reason, attempts, origin and source-queue headers; pause cancels the consumer and
//!   resume consumes again. No message is ever requeued to a running consumer: no hot
//!   redelivery loop.
//! * **Operator calls**: [`inspect_dead_letters`](purista_core::SubscriptionOperator::inspect_dead_letters)
//!   reads a dead-letter queue without removing anything;
//!   [`replay_dead_letters`](purista_core::SubscriptionOperator::replay_dead_letters) sends its messages back to the subscription queues
//!   they came from with a fresh retry budget and reports what it left behind
//!   ([`ReplayReport`](purista_core::ReplayReport)); paused consumers are listed and resumed through
//!   [`EventBridge`](purista_core::EventBridge).
//! * **Connection**: a supervisor reconnects with backoff, for as long as the bridge is not
//!   shut down, and re-declares every queue, binding and consumer; invocations in flight when
//!   the connection drops fail with 503; health is an error while disconnected, while the
//!   broker blocks publishing (a memory or disk alarm) and while it does not answer. Every
//!   broker call is bounded by [`AmqpConfig::broker_timeout`], so `emit` returns by it (503)
//!   and `shutdown` by its deadline whatever the broker's state. Wrong credentials or an
//!   unknown virtual host fail `start` at the broker's first answer with a non-retryable
//!   error. The URL's password never reaches a log, and no message body does either (lapin's
//!   warning about returned messages, which carries the body, is filtered out: the bridge
//!   handles returns itself).
//! * **Sizes**: a body over [`AmqpConfig::max_payload_bytes`] or metadata (the AMQP properties
//!   with the headers) over [`AmqpConfig::max_metadata_bytes`] is a 400 at the caller before
//!   anything is sent; the metadata limit leaves room in RabbitMQ's frame for the bridge's own
//!   headers and the broker's, so what a caller could send can always be retried and
//!   dead-lettered, and a message that arrives too large for that (a foreign publisher's) is
//!   dead-lettered without the extra headers or dropped with one warning — never a broker
//!   protocol error, never a reconnect.
//! * **Poison isolation**: one message never costs more than two reconnects: a delivery that
//!   was in hand at two connection losses is quarantined (dead-lettered with the reason, or
//!   dropped) instead of reaching its handler again, and counted as poison.
//! * **TLS**: `amqps://` URLs use TLS (rustls), trusting the platform's root certificates
//!   plus, for a broker whose certificate a private CA signed, the CA certificates of a PEM file
//!   ([`AmqpConfig::with_ca_certificate_file`], `PURISTA_AMQP_CA_FILE`). For a broker that
//!   requires client certificates, [`AmqpConfig::with_client_identity_files`]
//!   (`PURISTA_AMQP_CLIENT_CERT_FILE`, `PURISTA_AMQP_CLIENT_KEY_FILE`) presents one. A missing or
//!   unusable file is a [`ConfigError`] naming it, and TLS settings on a plain `amqp://` URL are
//!   refused; a certificate the bridge does not trust (or one the broker rejects) makes the
//!   connect fail with an `Unavailable` error, and health an error, that says it is a TLS
//!   certificate problem and what to check.
//!
//! [`Topology`] is the one place that names broker resources; they all live under
//! [`AmqpConfig::prefix`], and the naming is injective: each part (service, version, target,
//! instance, dead-letter target) is escaped before the parts are joined with dots (`.` → `~2e`,
//! `~` → `~7e`, other characters RabbitMQ would not take → `~` and their UTF-8 hex), so
//! `orders.v2@1/get` and `orders@v2.1/get` never share `P.cmd.orders.v2.1.get`.
//!
//! ```no_run
//! use std::sync::Arc;
//! use purista_bridge_amqp::{AmqpBridge, AmqpConfig};
//! use purista_core::EventBridge;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let bridge = Arc::new(AmqpBridge::new(AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f"))?);
//! bridge.start().await?;
//! assert!(bridge.health().await.is_healthy());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod bridge;
mod budget;
mod config;
mod connect;
mod consume;
mod dead_letters;
mod delivery;
mod driver;
pub mod headers;
mod lapin_logs;
mod ledger;
mod link;
mod publish;
mod reconnect;
mod registry;
mod reply;
mod serve;
mod session;
mod settle;
mod shared;
mod shutdown;
mod stream_table;
mod streams;
mod suspects;
mod topology;
mod work;

pub use bridge::{AmqpBridge, BRIDGE_NAME};
pub use budget::{DEFAULT_MAX_METADATA_BYTES, LARGEST_MAX_METADATA_BYTES};
pub use config::{
    AmqpConfig, CA_FILE_ENV, CLIENT_CERT_FILE_ENV, CLIENT_KEY_FILE_ENV, ClientIdentity,
    ConfigError, DEFAULT_COMMAND_PREFETCH, DEFAULT_COMMAND_TIMEOUT, DEFAULT_PREFIX, PREFIX_ENV,
    TOPOLOGY_ENV, TlsFile, TlsSettings, TopologyMode, URL_ENV, redact_url,
};
pub use driver::driver;
pub use stream_table::STREAM_FRAME_BUFFER;
pub use topology::{MAX_NAME_LEN, Topology};

/// The `lapin` this bridge is built on, for tests and tools that talk to the broker directly.
pub use lapin;
