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

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
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
                Some(p) => {
                    opentelemetry::Context::new().with_remote_span_context(to_span_context(p, true))
                }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    use super::super::otp::write_otp;
    use super::super::spans::{self, Site};
    use super::*;
    use crate::envelope::{Address, Envelope, SenderAddress};

    #[derive(Clone, Default, Debug)]
    struct Collect(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collect {
        async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
            if let Ok(mut spans) = self.0.lock() {
                spans.append(&mut batch);
            }
            Ok(())
        }
    }

    fn site() -> Site {
        Site {
            service: "orders".into(),
            version: "1".into(),
            system: "default".into(),
            identities: false,
        }
    }

    fn sender() -> SenderAddress {
        SenderAddress {
            service_name: "web".into(),
            service_version: "1".into(),
            service_target: "checkout".into(),
            instance_id: String::new(),
        }
    }

    /// The exported span whose own span id is `span_id`.
    fn exported(spans: &[SpanData], span_id: u64) -> &SpanData {
        spans
            .iter()
            .find(|s| s.span_context.span_id() == SpanId::from(span_id))
            .expect("the identity that travels is an exported OpenTelemetry span's")
    }

    #[test]
    fn what_travels_in_otp_is_the_opentelemetry_spans_identity_and_parents_follow_it() {
        let exporter = Collect::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(layer(provider.tracer("test")));
        let site = site();

        let (invoke, command, emit, nested) = tracing::subscriber::with_default(subscriber, || {
            let mut cmd = Envelope::command(
                sender(),
                Address::new("orders", "1", "place"),
                serde_json::json!(1),
                serde_json::json!({}),
            );
            // A call outside any handler and any span: a new trace.
            let invoke = spans::invoke(&site, "checkout", &cmd, None);
            cmd.otp = Some(write_otp(&invoke.cx));
            // The receiver continues what the command carries.
            let command = spans::command(&site, "orders@1/place", "place", &cmd);
            // Code that left the handler's span (a spawned task) still starts a child of it.
            let event = Envelope::custom(sender(), "placed", serde_json::json!(1));
            let emit = spans::emit(&site, "place", &event, Some(&command.cx));
            // Inside the handler's span, the current span is the parent.
            let nested = command
                .span
                .in_scope(|| spans::emit(&site, "place", &event, Some(&command.cx)));
            let ids = |t: &spans::Traced| (t.cx.clone(), t.span.clone());
            (ids(&invoke), ids(&command), ids(&emit), ids(&nested))
        });
        drop((invoke.1, command.1, emit.1, nested.1));
        provider.shutdown().expect("flushed");
        let spans = exporter.0.lock().expect("not poisoned").clone();
        assert_eq!(spans.len(), 4, "{spans:#?}");

        let root = exported(&spans, invoke.0.span_id());
        assert_eq!(root.parent_span_id, SpanId::INVALID, "a new trace's root");
        assert_eq!(
            root.span_context.trace_id(),
            TraceId::from(invoke.0.trace_id())
        );
        assert_eq!(root.name, "invoke orders@1/place");

        let served = exported(&spans, command.0.span_id());
        assert_eq!(
            served.span_context.trace_id(),
            TraceId::from(invoke.0.trace_id())
        );
        assert_eq!(served.parent_span_id, SpanId::from(invoke.0.span_id()));
        assert!(
            served.parent_span_is_remote,
            "the sender is another process"
        );

        for child in [&emit.0, &nested.0] {
            let e = exported(&spans, child.span_id());
            assert_eq!(
                e.span_context.trace_id(),
                TraceId::from(invoke.0.trace_id())
            );
            assert_eq!(e.parent_span_id, SpanId::from(command.0.span_id()));
        }
    }

    #[test]
    fn contexts_convert_both_ways() {
        let cx = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("congo=t61rcWkgMzE"),
        )
        .expect("valid");
        let sc = to_span_context(&cx, true);
        assert!(sc.is_remote());
        assert_eq!(from_span_context(&sc), Some(cx));
        assert_eq!(from_span_context(&SpanContext::empty_context()), None);
    }
}
