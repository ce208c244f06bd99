//! An in-memory span recorder (feature `recorder`): a `tracing-subscriber` layer that keeps
//! every finished span with its fields, for tests that assert a trace and for examples that
//! print one. It needs no OpenTelemetry: purista's spans carry their W3C ids as fields
//! (`trace_id`, `span_id`, `parent_span_id`), so a trace can be put together from them.
//!
//! ```
//! use purista_core::observe::SpanRecorder;
//! use tracing_subscriber::layer::SubscriberExt;
//! let recorder = SpanRecorder::new();
//! let subscriber = tracing_subscriber::registry().with(recorder.layer());
//! tracing::subscriber::with_default(subscriber, || {
//!     let _span = tracing::info_span!("work", answer = 42).entered();
//! });
//! let spans = recorder.finished();
//! assert_eq!(spans[0].name, "work");
//! assert_eq!(spans[0].field("answer"), Some("42"));
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use parking_lot::Mutex;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Finished spans kept by default; older ones are forgotten.
const DEFAULT_CAPACITY: usize = 100_000;

/// One finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedSpan {
    /// The span's name (`purista.command`, …).
    pub name: &'static str,
    /// Its target (module path).
    pub target: &'static str,
    /// Every recorded field, as text.
    pub fields: BTreeMap<&'static str, String>,
}

impl RecordedSpan {
    /// The field `name`, if recorded.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// The W3C trace id (`trace_id`).
    pub fn trace_id(&self) -> Option<&str> {
        self.field("trace_id")
    }

    /// The W3C span id (`span_id`).
    pub fn span_id(&self) -> Option<&str> {
        self.field("span_id")
    }

    /// The parent's W3C span id (`parent_span_id`; absent on a trace's root).
    pub fn parent_span_id(&self) -> Option<&str> {
        self.field("parent_span_id")
    }
}

/// Records finished spans in memory. Cheap to clone; clones share the record.
#[derive(Clone)]
pub struct SpanRecorder {
    inner: Arc<Inner>,
}

struct Inner {
    finished: Mutex<VecDeque<RecordedSpan>>,
    capacity: usize,
}

impl Default for SpanRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl SpanRecorder {
    /// A recorder that keeps the last 100 000 finished spans.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A recorder that keeps the last `capacity` finished spans.
    pub fn with_capacity(capacity: usize) -> Self {
        SpanRecorder {
            inner: Arc::new(Inner {
                finished: Mutex::new(VecDeque::new()),
                capacity: capacity.max(1),
            }),
        }
    }

    /// The layer to install (`tracing_subscriber::registry().with(recorder.layer())`).
    pub fn layer(&self) -> RecorderLayer {
        RecorderLayer {
            inner: self.inner.clone(),
        }
    }

    /// Every finished span, oldest first.
    pub fn finished(&self) -> Vec<RecordedSpan> {
        self.inner.finished.lock().iter().cloned().collect()
    }

    /// The finished spans of the W3C trace `trace_id`, oldest first.
    pub fn trace(&self, trace_id: &str) -> Vec<RecordedSpan> {
        self.inner
            .finished
            .lock()
            .iter()
            .filter(|s| s.trace_id() == Some(trace_id))
            .cloned()
            .collect()
    }

    /// Forgets every finished span.
    pub fn clear(&self) {
        self.inner.finished.lock().clear();
    }

    /// `spans` as an indented tree by `parent_span_id`, one line per span: its name, its
    /// `otel.name` and the fields `show` names. Siblings keep the order of `spans`; a span
    /// whose parent is not among them is a root.
    pub fn render_tree(spans: &[RecordedSpan], show: &[&str]) -> String {
        let ids: Vec<Option<&str>> = spans.iter().map(RecordedSpan::span_id).collect();
        let is_known = |id: Option<&str>| id.is_some() && ids.contains(&id);
        let mut out = String::new();
        let mut stack: Vec<(usize, usize)> = spans
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, s)| !is_known(s.parent_span_id()))
            .map(|(i, _)| (i, 0))
            .collect();
        let mut seen = vec![false; spans.len()];
        while let Some((i, depth)) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            let s = &spans[i];
            let _ = write!(out, "{}{}", "  ".repeat(depth), s.name);
            if let Some(name) = s.field("otel.name") {
                let _ = write!(out, " \"{name}\"");
            }
            for key in show {
                if let Some(v) = s.field(key) {
                    let _ = write!(out, " {key}={v}");
                }
            }
            out.push('\n');
            let children =
                spans.iter().enumerate().rev().filter(|(_, c)| {
                    c.parent_span_id().is_some() && c.parent_span_id() == s.span_id()
                });
            stack.extend(children.map(|(c, _)| (c, depth + 1)));
        }
        out
    }
}

/// The layer of a [`SpanRecorder`].
pub struct RecorderLayer {
    inner: Arc<Inner>,
}

/// A span's fields while it is open (kept in the span's extensions).
struct Open(RecordedSpan);

struct FieldText<'a>(&'a mut BTreeMap<&'static str, String>);

impl Visit for FieldText<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
}

impl<S> Layer<S> for RecorderLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else {
            return;
        };
        let meta = attrs.metadata();
        let mut fields = BTreeMap::new();
        attrs.record(&mut FieldText(&mut fields));
        span.extensions_mut().insert(Open(RecordedSpan {
            name: meta.name(),
            target: meta.target(),
            fields,
        }));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(open) = span.extensions_mut().get_mut::<Open>()
        {
            values.record(&mut FieldText(&mut open.0.fields));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        let Some(Open(finished)) = span.extensions_mut().remove::<Open>() else {
            return;
        };
        let mut kept = self.inner.finished.lock();
        if kept.len() >= self.inner.capacity {
            kept.pop_front();
        }
        kept.push_back(finished);
    }
}
