//! Captured warnings, so a case can check that something "settles with a warning" or "starts
//! and warns".
//!
//! One process-wide `tracing` subscriber records every event at WARN and above with its fields
//! (bounded, newest kept). Cases run in parallel in one process, so a case finds *its*
//! warnings by a value only it uses (its resource prefix in a registration or reason). With
//! `RUST_LOG` set, events are also printed to the test output.
//!
//! The same subscriber records finished spans (core's [`SpanRecorder`]) once a case asks for
//! them ([`spans`]): the observability cases read their traces back by trace id. Until then
//! span recording is off, so the other cases pay nothing for it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use purista_core::observe::SpanRecorder;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Events kept; older ones are forgotten.
const CAPACITY: usize = 50_000;

/// One captured event.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Level.
    pub level: Level,
    /// Module path of the emitter.
    pub target: String,
    /// The message.
    pub message: String,
    /// Every other field, formatted.
    pub fields: BTreeMap<String, String>,
}

impl Captured {
    /// True when the message or any field contains `needle`.
    pub fn mentions(&self, needle: &str) -> bool {
        self.message.contains(needle) || self.fields.values().any(|v| v.contains(needle))
    }

    /// The field `name`, if present.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

type Store = Arc<Mutex<VecDeque<Captured>>>;

static STORE: OnceLock<Option<Store>> = OnceLock::new();

/// Finished spans, recorded while [`RECORDING`] is on.
static SPANS: OnceLock<SpanRecorder> = OnceLock::new();
/// Whether spans are recorded: off until a case asks for them.
static RECORDING: AtomicBool = AtomicBool::new(false);
/// Spans kept; older ones are forgotten.
const SPAN_CAPACITY: usize = 100_000;

fn span_recorder() -> &'static SpanRecorder {
    SPANS.get_or_init(|| SpanRecorder::with_capacity(SPAN_CAPACITY))
}

struct CaptureLayer(Store);

#[derive(Default)]
struct Fields {
    message: String,
    fields: BTreeMap<String, String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields
                .insert(field.name().to_string(), value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        if field.name() == "message" {
            self.message = v;
        } else {
            self.fields.insert(field.name().to_string(), v);
        }
    }
}

impl<S: Subscriber> Layer<S> for CaptureLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut store = self.0.lock();
        if store.len() >= CAPACITY {
            store.pop_front();
        }
        store.push_back(Captured {
            level,
            target: event.metadata().target().to_string(),
            message: fields.message,
            fields: fields.fields,
        });
    }
}

/// Installs the capturing subscriber once per process. False when another global subscriber
/// was installed first (then warnings cannot be checked).
pub fn install() -> bool {
    STORE
        .get_or_init(|| {
            let store: Store = Arc::new(Mutex::new(VecDeque::new()));
            let print = std::env::var_os("RUST_LOG").map(|_| {
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(EnvFilter::from_default_env())
            });
            let spans =
                span_recorder()
                    .layer()
                    .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|_, _| {
                        RECORDING.load(Ordering::Relaxed)
                    }));
            let installed = tracing_subscriber::registry()
                .with(CaptureLayer(store.clone()).with_filter(LevelFilter::WARN))
                .with(spans)
                .with(print)
                .try_init()
                .is_ok();
            installed.then_some(store)
        })
        .is_some()
}

/// Captured warnings and errors for which `pick` holds. Installs the capture if nobody did;
/// panics when it cannot capture (another global subscriber came first): a case that checks a
/// warning must not pass because nothing could be seen.
pub fn warnings(pick: impl Fn(&Captured) -> bool) -> Vec<Captured> {
    install();
    match STORE.get() {
        Some(Some(store)) => store.lock().iter().filter(|c| pick(c)).cloned().collect(),
        _ => panic!("warnings cannot be checked: another tracing subscriber was installed first"),
    }
}

/// True when capturing works in this process.
pub fn capturing() -> bool {
    matches!(STORE.get(), Some(Some(_)))
}

/// The process's span recorder, recording from now on. Installs the capture if nobody did;
/// panics when it cannot record (another global subscriber came first): a case that checks a
/// trace must not pass because nothing could be seen.
pub fn spans() -> &'static SpanRecorder {
    install();
    if !capturing() {
        panic!("spans cannot be recorded: another tracing subscriber was installed first");
    }
    RECORDING.store(true, Ordering::Relaxed);
    span_recorder()
}
