//! Helpers shared by the service-runtime tests on the in-process bridge: awaiting a condition
//! with a deadline, and capturing this test's log events.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

/// Upper bound for every awaited condition; the conditions normally hold within milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One log event: level, message and fields as text.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Level.
    pub level: Level,
    /// Message and every field, `name=value`, space separated.
    pub text: String,
}

/// The log events written while the guard of [`capture_logs`] lives, on this thread (a
/// current-thread test runtime runs every task on it).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<LogLine>>>);

impl Logs {
    /// Events at `level` whose text contains every needle.
    pub fn find(&self, level: Level, needles: &[&str]) -> Vec<LogLine> {
        self.0
            .lock()
            .iter()
            .filter(|l| l.level == level && needles.iter().all(|n| l.text.contains(n)))
            .cloned()
            .collect()
    }

    /// Everything captured, one event per line (for assertion messages).
    pub fn dump(&self) -> String {
        self.0
            .lock()
            .iter()
            .map(|l| format!("{} {}", l.level, l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

struct Capture(Logs);

struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!(" {}={value}", field.name()));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut text = Text(String::new());
        event.record(&mut text);
        self.0.0.lock().push(LogLine {
            level: *event.metadata().level(),
            text: text.0,
        });
    }
}

/// The process's span recorder, installed as the global subscriber on first use. Tests of one
/// binary share it (under `cargo test` they run in one process), so each finds its spans by
/// its own trace ids or service names.
pub fn recorded_spans() -> &'static purista_core::observe::SpanRecorder {
    static RECORDER: std::sync::OnceLock<purista_core::observe::SpanRecorder> =
        std::sync::OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder = purista_core::observe::SpanRecorder::new();
        tracing::subscriber::set_global_default(Registry::default().with(recorder.layer()))
            .expect("no other global subscriber in this test binary");
        recorder
    })
}

/// Captures log events on this thread until the returned guard is dropped.
pub fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let subscriber = Registry::default().with(Capture(logs.clone()));
    let guard = tracing::subscriber::set_default(subscriber);
    (logs, guard)
}
