//! What lapin logs from its own I/O thread, filtered.
//!
//! lapin handles each connection on a thread of its own and logs from there. Two of its
//! messages do not belong in an application's warnings and errors:
//!
//! * every message the broker returns as unroutable (a command nobody serves: 502) is logged
//!   at WARN **with its whole body**, a caller's data in the logs. The bridge handles returns
//!   itself (`publish.rs` turns them into a 502 for the caller and logs that without the
//!   body), so lapin's line is dropped.
//! * while the bridge closes a connection itself (shutdown), lapin reports the channels it
//!   finds closing at ERROR. That is the expected end of a connection, so those are dropped
//!   too, but only then.
//!
//! Everything else goes on, unchanged, to the subscriber that was current where the bridge
//! connected (the application's global one, or a test's). The filter is installed as the
//! thread-local default of lapin's I/O thread from the connector lapin runs on that thread
//! (`connect.rs`); a thread of any other name is left alone.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Level, Metadata, Subscriber, span};

/// The name lapin gives the thread that runs a connection.
const LAPIN_IO_THREAD: &str = "lapin-io-loop";

/// The target of lapin's returned-message warning (it carries the body).
const RETURNED_MESSAGES: &str = "lapin::returned_messages";

thread_local! {
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// The filter of one connection's I/O thread.
#[derive(Clone)]
pub(crate) struct LapinLogs {
    inner: Dispatch,
    /// Set by the session before it closes the connection itself.
    closing: Arc<AtomicBool>,
    max_level: LevelFilter,
}

impl LapinLogs {
    /// A filter in front of the subscriber current here.
    pub(crate) fn new(closing: Arc<AtomicBool>) -> Self {
        LapinLogs {
            inner: tracing::dispatcher::get_default(Dispatch::clone),
            closing,
            max_level: LevelFilter::current(),
        }
    }

    /// Makes this filter the default of the current thread, once, if it is lapin's I/O thread.
    pub(crate) fn install_on_this_thread(&self) {
        if std::thread::current().name() != Some(LAPIN_IO_THREAD) || INSTALLED.get() {
            return;
        }
        INSTALLED.set(true);
        let guard = tracing::dispatcher::set_default(&Dispatch::new(self.clone()));
        // The thread runs this connection until it ends: the filter stays its default.
        std::mem::forget(guard);
    }

    fn dropped(&self, metadata: &Metadata<'_>) -> bool {
        let target = metadata.target();
        if target.starts_with(RETURNED_MESSAGES) {
            return true;
        }
        self.closing.load(Ordering::Acquire)
            && target.starts_with("lapin")
            && *metadata.level() <= Level::WARN
    }
}

impl Subscriber for LapinLogs {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if metadata.target().starts_with("lapin") {
            // Decided per event: whether the bridge is closing changes over time.
            let inner = self.inner.register_callsite(metadata);
            return if inner.is_never() {
                inner
            } else {
                Interest::sometimes()
            };
        }
        self.inner.register_callsite(metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max_level)
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        !self.dropped(metadata) && self.inner.enabled(metadata)
    }

    fn new_span(&self, span: &span::Attributes<'_>) -> span::Id {
        self.inner.new_span(span)
    }

    fn record(&self, span: &span::Id, values: &span::Record<'_>) {
        self.inner.record(span, values);
    }

    fn record_follows_from(&self, span: &span::Id, follows: &span::Id) {
        self.inner.record_follows_from(span, follows);
    }

    fn event(&self, event: &Event<'_>) {
        if !self.dropped(event.metadata()) {
            self.inner.event(event);
        }
    }

    fn enter(&self, span: &span::Id) {
        self.inner.enter(span);
    }

    fn exit(&self, span: &span::Id) {
        self.inner.exit(span);
    }

    fn clone_span(&self, id: &span::Id) -> span::Id {
        self.inner.clone_span(id)
    }

    fn try_close(&self, id: span::Id) -> bool {
        self.inner.try_close(id)
    }
}
