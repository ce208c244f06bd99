//! The service runtime: define commands, subscriptions, streams and queue workers, start them on
//! a bridge with the strict capability check, observe health and in-flight work, and drain.
//!
//! One file per concern, arrows running one way: `builder.rs` defines a service from the
//! definitions (`command.rs`, `stream.rs`, `subscription.rs`, `queue_worker.rs`); `start.rs`
//! runs a definition on a bridge (with `degrade.rs` for non-strict mode) and hands back the
//! `running.rs` service, which shutdown drains; `lifecycle.rs` holds what start and shutdown
//! share. Below them, `context.rs` is what a handler can do, `flow.rs` the ids it carries on,
//! `settle.rs` the one path from outcome to settlement, `contract.rs` the typed command
//! contracts server and client share, and `handler.rs` what every handler runtime shares.
//!
//! ```no_run
//! # async fn demo(bridge: std::sync::Arc<dyn purista_core::EventBridge>) -> anyhow::Result<()> {
//! use purista_core::service::{CommandDef, Context, Empty, Service};
//! let running = Service::builder("greeter", "1")
//!     .command(CommandDef::new("hello", |_ctx: Context, name: String| async move {
//!         Ok(format!("hello {name}"))
//!     }))
//!     .build()
//!     .start(bridge)
//!     .await?;
//! let reply: String = running
//!     .invoke(purista_core::Address::new("greeter", "1", "hello"), "ada", Empty)
//!     .await?;
//! assert_eq!(reply, "hello ada");
//! running.shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

mod builder;
mod command;
mod context;
mod contract;
mod degrade;
mod expose;
mod flow;
mod handler;
mod health;
mod lifecycle;
mod queue_worker;
mod running;
mod sampler;
mod settle;
mod start;
mod stream;
mod subscription;

pub use builder::{DEFAULT_STATE_METRICS_INTERVAL, Service, ServiceBuilder};
pub use command::{CommandDef, CommandFn, ContractArgs};
pub use context::{Context, InvokeOptions, JobContext, SubscriptionContext};
pub use contract::CommandContract;
pub use expose::Expose;
#[cfg(feature = "schemars")]
pub use expose::schema_of;
pub use handler::{Empty, HandlerArgs};
pub use health::{HealthState, ServiceHealth};
pub use queue_worker::{IntoJobSettlement, JobFn, QueueWorkerDef, WorkerMode};
pub use running::RunningService;
pub use start::StartError;
pub use stream::{PRODUCER_GRACE, StreamDef, StreamFn};
pub use subscription::{IntoReply, Reply, SubscriptionDef, registration_key};
