//! OpenTelemetry (feature `otel`): the spans of `spans.rs` become OpenTelemetry spans through
//! `tracing-opentelemetry`, and the identity a message carries on is the OpenTelemetry span's,
//! so what an exporter reports and what travels in `otp` are the same ids.
//!
//! Install the layer once, with any tracer (an OTLP exporter, a test's in-memory one):
//!
//! ```no_run
//! # fn demo<T>(tracer: T)
//! # where
//! #     T: opentelemetry::trace::Tracer + Send + Sync + 'static,
//! #     T::Span: Send + Sync,
//! # {
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//! // `tracer`: e.g. an `opentelemetry_sdk` tracer provider's, with an OTLP exporter.
//! tracing_subscriber::registry()
//!     .with(purista_core::observe::otel::layer(tracer))
//!     .init();
//! # }
//! ```
//!
//! A received message's span gets the carried context as its (remote) parent; work a handler
//! starts is a child of the current `tracing` span, so a user's own span inside a handler, or
//! the request span of an HTTP server calling [`RunningService::invoke`](crate::RunningService::invoke),
//! is the parent. Without the layer installed, spans keep core's own ids, as without the feature.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use opentelemetry;
pub use tracing_opentelemetry;

use super::spans::Parent;
use super::trace_context::TraceContext;

/// The `tracing` layer that turns purista's spans (and every other `tracing` span) into
/// OpenTelemetry spans of `tracer`.
pub fn layer<S, T>(tracer: T) -> tracing_opentelemetry::OpenTelemetryLayer<S, T>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    T: opentelemetry::trace::Tracer + 'static,
    T::Span: Send + Sync,
{
    tracing_opentelemetry::layer().with_tracer(tracer)
}

/// An OpenTelemetry span context for `cx`.
pub fn to_span_context(cx: &TraceContext, remote: bool) -> SpanContext {
    let state = cx
        .trace_state()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from(cx.trace_id()),
        SpanId::from(cx.span_id()),
        TraceFlags::new(cx.flags()),
        remote,
        state,
    )
}

/// The trace context of an OpenTelemetry span context (`None` when it is not valid).
pub fn from_span_context(sc: &SpanContext) -> Option<TraceContext> {
    if !sc.is_valid() {
        return None;
    }
    let state = sc.trace_state().header();
    TraceContext::from_parts(
        u128::from_be_bytes(sc.trace_id().to_bytes()),
        u64::from_be_bytes(sc.span_id().to_bytes()),
        sc.trace_flags().to_u8(),
        Some(state.as_str()).filter(|s| !s.is_empty()),
    )
}

/// The identity OpenTelemetry gives `span` under `parent`, with the parent's span id; `None`
/// when no OpenTelemetry layer builds the span.
pub(crate) fn identify(span: &Span, parent: &Parent<'_>) -> Option<(TraceContext, Option<u64>)> {
    if span.is_disabled() {
        return None;
    }
    let parent_id = match parent {
        Parent::Carried(carried) => {
            let cx = match carried {
                Some(p) => opentelemetry::Context::new()
                    .with_remote_span_context(to_span_context(p, true)),
                // A message without context starts a trace of its own, whatever span the
                // bridge's task happens to be in.
                None => opentelemetry::Context::new(),
            };
            span.set_parent(cx).ok()?;
            carried.as_ref().map(TraceContext::span_id)
        }
        Parent::Local(handler) => {
            let current = Span::current().context();
            let current = current.span().span_context().clone();
            if current.is_valid() {
                Some(u64::from_be_bytes(current.span_id().to_bytes()))
            } else if let Some(p) = handler {
                // Code of a handler that left its span (a spawned task): the handler's span
                // is the parent all the same.
                span.set_parent(
                    opentelemetry::Context::new()
                        .with_remote_span_context(to_span_context(p, false)),
                )
                .ok()?;
                Some(p.span_id())
            } else {
                None
            }
        }
    };
    let built = span.context();
    let cx = from_span_context(built.span().span_context())?;
    Some((cx, parent_id))
}
