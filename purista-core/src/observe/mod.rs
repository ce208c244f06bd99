//! Observability: spans for every unit of work, W3C trace context through the envelope's `otp`,
//! and metrics — in core, so every bridge has them without a line of adapter code.
//!
//! * **Spans** (`spans.rs`): the service runtime opens one `tracing` span per unit of work
//!   (invoke, command, emit, subscription delivery attempt, stream open and session, enqueue,
//!   job attempt), named and attributed after OpenTelemetry's messaging semantic conventions.
//!   Any `tracing` subscriber sees them; with the `otel` feature, [`otel::layer`] exports them
//!   to OpenTelemetry.
//! * **Propagation** ([`write_otp`], [`read_otp`]): what a unit of work sends carries its span's
//!   [`TraceContext`] in `otp`, in the carrier format PURISTA's TypeScript services write and
//!   read; what it receives continues the context its message carries. Responses, follow-up
//!   events, retries, dead letters (they keep the message), jobs and stream frames stay in the
//!   trace. A flow this service starts takes the W3C trace id as its `traceId`; a `traceId`
//!   that arrives is kept as it is (PURISTA's `traceId` is its own id, not the W3C one).
//!   Bridges only carry `otp` through, unchanged.
//! * **Metrics** ([`metrics`]): handler durations, outcomes (handled, failed, retried,
//!   dead-lettered, dropped, paused), in-flight handlers, invocation latency and messages sent,
//!   through the `metrics` facade.
//!
//! The identity is minted in core (random ids), so propagation works with the default build;
//! under the `otel` feature with its layer installed, the OpenTelemetry span's ids are used.

pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
mod otp;
#[cfg(feature = "recorder")]
mod recorder;
pub(crate) mod spans;
mod trace_context;

pub use otp::{OtpError, TRACEPARENT, TRACESTATE, read_otp, write_otp};
#[cfg(feature = "recorder")]
pub use recorder::{RecordedSpan, RecorderLayer, SpanRecorder};
pub use trace_context::{TraceContext, TraceContextError};
