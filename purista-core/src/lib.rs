//! # purista-core
//!
//! PURISTA's programming model for Rust, independent of any broker.
//!
//! * [`Envelope`] is the wire format, compatible with PURISTA's TypeScript services.
//! * [`SubscriptionFilter::matches`] is the reference matcher every bridge's routing must equal.
//! * [`EventBridge`] and [`QueueBridge`] are the small traits a broker adapter implements.
//! * [`Capabilities`] and the strict startup check make a deployment refuse to start when a
//!   registration asks for something its bridge cannot do.
//! * [`Service`] runs commands, subscriptions, streams and queue workers on any bridge.
//!
//! Semantics live here once: adapters translate them onto a broker and never re-decide what a
//! timeout, a retry or a filter means.
#![warn(missing_docs)]

pub mod bridge;
pub mod capabilities;
pub mod driver;
pub mod envelope;
pub mod error;
pub mod filter;
pub mod idempotency;
pub mod ids;
pub mod inflight;
pub mod kit;
pub mod observe;
pub mod operator;
pub mod outcome;
pub mod queue;
pub mod redact;
pub mod service;
pub mod stream;

pub use bridge::{
    BridgeCounters, BridgeHealth, CommandHandler, Delivery, DeliveryHandler, DrainReport,
    EventBridge, SettleOnce, Settler, StreamConsumerEnd, StreamHandler, StreamProducerEnd,
    SubscriptionSpec,
};
pub use capabilities::{
    Capabilities, DeliveryGuarantee, FilterSupport, Limits, Mismatch, Need, QueueCapabilities,
    Requirement, StrictCheckError,
};
pub use driver::{ConnectRequest, Connected, Driver, DriverError};
pub use envelope::{Address, Envelope, MessageType, SenderAddress};
pub use error::{
    BridgeError, BusinessError, ClientError, CommandError, CommandErrorKind, DecodeError,
    ErrorPayload, Failure, HandledError, IntoFailure, MessagePart, SettleError, StatusCode,
};
pub use filter::{AddressFilter, SubscriptionFilter};
pub use idempotency::{IdempotencyGuard, IdempotencyStore, MemoryIdempotencyStore};
pub use inflight::{InFlight, InFlightTracker, WorkKind};
pub use operator::{
    LeftDeadLetter, NotReplayed, PausedConsumer, RegistrationKey, ReplayReport,
    SubscriptionOperator,
};
pub use outcome::{DeadLetterEntry, DeadLetterNote, FailurePolicy, Outcome, Settlement};
pub use queue::{
    DeadLetteredJob, JobDisposition, JobSettlement, LeasedJob, NewJob, QueueBridge, QueueConfig,
    QueueDeclaration, QueueError, QueueMetrics, RetryStrategy,
};
pub use redact::redact_url;
pub use service::{
    CommandContract, CommandDef, Context, Empty, HealthState, InvokeOptions, JobContext,
    QueueWorkerDef, Reply, RunningService, Service, ServiceBuilder, ServiceHealth, StartError,
    StreamDef, SubscriptionContext, SubscriptionDef, WorkerMode,
};
pub use stream::{StreamItem, StreamReader, StreamWriter};
