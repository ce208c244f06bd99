//! A log capture for tests that assert what is (and is not) logged at WARN and ERROR.
//!
//! [`install`] makes a capturing subscriber the process-wide default, so that events from
//! every thread are seen, lapin's own I/O thread included (a thread-local default would miss
//! them). With `RUST_LOG` set, events are also printed as usual.

use std::fmt::Debug;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// One captured event: level, target, message and its other fields, formatted.
#[derive(Debug, Clone)]
pub struct Line {
    pub level: Level,
    pub target: String,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl Line {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the message or a field contains `needle`.
    pub fn mentions(&self, needle: &str) -> bool {
        self.message.contains(needle) || self.fields.iter().any(|(_, v)| v.contains(needle))
    }

    pub fn is_warning(&self) -> bool {
        self.level == Level::WARN
    }

    pub fn is_error(&self) -> bool {
        self.level == Level::ERROR
    }
}

struct Recorder(Line);

impl Visit for Recorder {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.record(field, format!("{value:?}"));
    }
}

impl Recorder {
    fn record(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.0.message = value;
        } else {
            self.0.fields.push((field.name().to_string(), value));
        }
    }
}

type Store = Arc<Mutex<Vec<Line>>>;

static STORE: OnceLock<Store> = OnceLock::new();

struct Capture(Store);

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let metadata = event.metadata();
        let mut line = Recorder(Line {
            level: *metadata.level(),
            target: metadata.target().to_string(),
            message: String::new(),
            fields: Vec::new(),
        });
        event.record(&mut line);
        self.0.lock().push(line.0);
    }
}

/// Installs the capturing subscriber (WARN and ERROR) once per process; panics when another
/// subscriber came first.
pub fn install() {
    STORE.get_or_init(|| {
        let store = Store::default();
        let print = std::env::var_os("RUST_LOG").map(|_| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(EnvFilter::from_default_env())
        });
        tracing_subscriber::registry()
            .with(Capture(store.clone()).with_filter(LevelFilter::WARN))
            .with(print)
            .try_init()
            .expect("the log capture is the first subscriber of this test binary");
        store
    });
}

/// The captured WARN and ERROR lines for which `pick` holds.
pub fn matching(pick: impl Fn(&Line) -> bool) -> Vec<Line> {
    STORE
        .get()
        .map(|s| s.lock().iter().filter(|l| pick(l)).cloned().collect())
        .unwrap_or_default()
}

/// The captured WARN lines for which `pick` holds.
pub fn warnings(pick: impl Fn(&Line) -> bool) -> Vec<Line> {
    matching(|l| l.is_warning() && pick(l))
}

/// Every captured ERROR line.
pub fn errors() -> Vec<Line> {
    matching(Line::is_error)
}

/// How many lines are captured so far: a mark to look only at what came after.
pub fn mark() -> usize {
    STORE.get().map_or(0, |s| s.lock().len())
}

/// The lines captured after `mark` for which `pick` holds.
pub fn since(mark: usize, pick: impl Fn(&Line) -> bool) -> Vec<Line> {
    STORE
        .get()
        .map(|s| {
            s.lock()
                .iter()
                .skip(mark)
                .filter(|l| pick(l))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}
