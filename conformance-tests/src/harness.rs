//! What a bridge hands the suite: its declared capabilities, a factory for deployments (N bridge
//! instances on one broker) and, where it can, hooks that break the broker on purpose.
//!
//! The suite never names a bridge type. Each case asks the [`Harness`] for a fresh
//! [`Deployment`] under a unique resource prefix, runs one behaviour on it and cleans up, so
//! cases can run in parallel on one real broker exactly as they do on the in-process one.

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use purista_core::{Capabilities, Envelope, EventBridge, QueueBridge, QueueCapabilities};

/// How a bridge is exercised, as printed in the capability matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TestMode {
    /// The bridge is its own broker (the in-process bridge).
    InProcess,
    /// A real broker process (RabbitMQ, …).
    RealBroker,
    /// A third-party emulator of a cloud service, speaking its real API (moto for AWS).
    Emulator,
    /// An in-repo fake that speaks the broker's real protocol.
    ProtocolDouble,
}

impl TestMode {
    /// The wording used in the matrix.
    pub fn describe(self) -> &'static str {
        match self {
            TestMode::InProcess => "in process (the bridge is its own broker)",
            TestMode::RealBroker => "against a real broker",
            TestMode::Emulator => "against an emulator of the service's real API (moto)",
            TestMode::ProtocolDouble => {
                "against a protocol double (an in-repo fake speaking the broker's real protocol)"
            }
        }
    }
}

/// Environment variable (`1`) that runs every case at its full size on every harness, an
/// emulator's scaled ones too: a run by hand, long on moto. Each case's time limit then grows
/// to [`crate::runner::FULL_SIZE_CASE_TIMEOUT`]; the volume waits of the fault cases are
/// bounded by a stall (no progress for their recovery time), not by a deadline, so a slow
/// emulator is not mistaken for a loss.
pub const FULL_SIZE_ENV: &str = "PURISTA_FULL_SIZE";

/// Whether [`FULL_SIZE_ENV`] asks for the full size.
pub fn full_size_asked() -> bool {
    std::env::var(FULL_SIZE_ENV).is_ok_and(|v| v == "1")
}

/// How much of their full size the load cases (many subscriptions, many messages) run on a
/// harness: the full size by default. A harness whose broker is an emulator that serves one
/// request at a time (moto) may declare a smaller share, with why; what the cases assert is the
/// same at every size, and each load case prints the size it ran. The matrix names a scaled
/// harness's share next to its test mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    percent: u32,
    why: Option<String>,
}

impl Workload {
    /// The full size.
    pub fn full() -> Self {
        Workload {
            percent: 100,
            why: None,
        }
    }

    /// `percent` (1..=100, clamped) of the full size, because `why`; the full size all the
    /// same when [`FULL_SIZE_ENV`] is set (a run by hand).
    pub fn scaled(percent: u32, why: impl Into<String>) -> Self {
        let percent = percent.clamp(1, 100);
        if percent == 100 || full_size_asked() {
            return Workload::full();
        }
        Workload {
            percent,
            why: Some(why.into()),
        }
    }

    /// The share of the full size, in percent.
    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// Why the size is scaled; `None` at the full size.
    pub fn why(&self) -> Option<&str> {
        self.why.as_deref()
    }

    /// The share of `full` items (rounded up, at least 1).
    pub fn of(&self, full: usize) -> usize {
        (full.saturating_mul(self.percent as usize))
            .div_ceil(100)
            .max(1)
    }

    /// The side of a square whose area is this share of `full_side`² (rounded up, at least 1):
    /// for cases whose work is the product of two sizes (subscriptions × messages).
    pub fn side_of(&self, full_side: usize) -> usize {
        let area = (full_side * full_side) as f64 * f64::from(self.percent) / 100.0;
        (area.sqrt().ceil() as usize).clamp(1, full_side.max(1))
    }
}

/// Publishes bytes straight to the broker, bypassing a bridge's encoding and stamping: the way
/// to put poison messages and duplicate message ids on the wire.
#[async_trait]
pub trait RawPublisher: Send + Sync + 'static {
    /// Publishes `bytes`, an encoded envelope, as one message, routed by what it contains.
    /// `Err` when the broker refused it; the text says why.
    async fn publish(&self, bytes: &[u8]) -> Result<(), String>;

    /// Publishes `bytes` that are *not* an envelope, routed as `route_as` would be (brokers that
    /// route on headers or attributes need them), so that the poison reaches the consumers of
    /// `route_as`. `Err` when the broker (or the in-process hub, which decodes on publish)
    /// refused the bytes.
    async fn publish_undecodable(&self, bytes: &[u8], route_as: &Envelope) -> Result<(), String> {
        let _ = route_as;
        self.publish(bytes).await
    }
}

/// A broker the reliability cases may break on purpose, and the way to deploy onto it.
///
/// Usually the harness's own broker. A harness whose broker other tests share hands out a
/// broker of its own here (a private node), so that a restart reaches no test but the one that
/// asked for it.
#[async_trait]
pub trait BrokerControl: Send + Sync + 'static {
    /// `instances` bridge instances on this broker, all resources named under `prefix`, like
    /// [`Harness::deployment`].
    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment;
    /// Closes the client connections of the deployment under `prefix` (and no others: other
    /// tests may share the broker); the broker keeps running.
    async fn drop_connections(&self, prefix: &str);
    /// Stops the broker and starts it again; returns once it accepts connections.
    async fn restart(&self);
}

/// Whether a harness offers something (broker control), decided without breaking anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// It does.
    Available,
    /// This harness never offers it; says why. Cases that need it are skipped everywhere.
    Absent(String),
    /// The harness offers it, but not on this machine right now (a program is missing); says
    /// why. Cases that need it are skipped, or fail under `PURISTA_REQUIRE_BROKERS=1`.
    Unreachable(String),
}

/// One bridge under test. Implement it once per bridge; [`crate::suite!`] turns the suite into
/// one test per behaviour for it.
///
/// The methods without `async` are called while the tests are listed, before any case runs
/// (see [`crate::plan`]): keep them cheap — plain data, or a probe that takes a moment at most.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// Bridge name as it appears in test names and the matrix, e.g. `default`.
    fn name(&self) -> &'static str;

    /// How the bridge is exercised here.
    fn mode(&self) -> TestMode;

    /// The event bridge's declared capabilities (the suite checks they are the bridge's own).
    fn capabilities(&self) -> Capabilities;

    /// The queue bridge's declared capabilities, when the bridge has a queue half.
    fn queue_capabilities(&self) -> Option<QueueCapabilities>;

    /// True when every deployment carries a [`RawPublisher`].
    fn offers_raw_publisher(&self) -> bool;

    /// `Err(why)` when the harness cannot run here, e.g. its broker does not answer: its cases
    /// are listed as skipped with `why`, or — with `PURISTA_REQUIRE_BROKERS=1`
    /// ([`crate::env::brokers_required`]) — run and fail. Called when the tests are listed, so
    /// a cheap probe (a TCP connect with a short timeout), not a broker session.
    fn availability(&self) -> Result<(), String> {
        Ok(())
    }

    /// The share of their full size the load cases run here ([`Workload`]): the full size
    /// unless the harness says otherwise (and why).
    fn workload(&self) -> Workload {
        Workload::full()
    }

    /// The share of their full size the reliability cases run at (their 10 000 events across
    /// broker faults): [`Harness::workload`] unless the harness says otherwise, because the
    /// faults, not the volume, are what those cases test and an emulator may take minutes for
    /// the full size. Each case prints the size it ran.
    fn fault_workload(&self) -> Workload {
        self.workload()
    }

    /// Whether [`Harness::control`] can hand out a broker to break.
    fn broker_control(&self) -> Offer {
        Offer::Absent(format!(
            "the `{}` harness has no broker-control hooks (drop connections, restart)",
            self.name()
        ))
    }

    /// `instances` independent bridge instances on one broker, all resources named under
    /// `prefix` (unique per test). Services start the instances (a start is idempotent); a
    /// harness on a real broker may start them already, so that a broker it cannot reach fails
    /// here with a clear message.
    async fn deployment(&self, prefix: &str, instances: usize) -> Deployment;

    /// A broker the reliability cases may break. Called only when [`Harness::broker_control`]
    /// said it is available (or brokers are required); may start that broker, and says why when
    /// it cannot (the case then fails).
    async fn control(&self) -> Result<Arc<dyn BrokerControl>, String> {
        Err(format!(
            "the `{}` harness has no broker control",
            self.name()
        ))
    }
}

type Teardown = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send + Sync>;

/// How long past its deadline a bridge's shutdown may run before the suite calls it hung.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// N bridge instances of one deployment on one broker, plus what the suite needs besides.
pub struct Deployment {
    /// The event bridge instances (one per service instance).
    pub bridges: Vec<Arc<dyn EventBridge>>,
    /// The queue bridge, when the bridge has a queue half.
    pub queues: Option<Arc<dyn QueueBridge>>,
    /// Raw access to the broker, when the harness can offer it.
    pub raw: Option<Arc<dyn RawPublisher>>,
    teardown: Vec<Teardown>,
    cleaned: bool,
    /// Set on the copy that cleans up in the background: it must never spawn another copy (a
    /// runtime that is shutting down drops spawned tasks at once, which would recurse).
    background: bool,
}

impl Deployment {
    /// A deployment of `bridges` with optional queue bridge and raw publisher.
    pub fn new(
        bridges: Vec<Arc<dyn EventBridge>>,
        queues: Option<Arc<dyn QueueBridge>>,
        raw: Option<Arc<dyn RawPublisher>>,
    ) -> Self {
        Deployment {
            bridges,
            queues,
            raw,
            teardown: Vec::new(),
            cleaned: false,
            background: false,
        }
    }

    /// Adds a step that removes broker resources after the bridges are shut down (queues,
    /// exchanges, rules named under the test's prefix).
    pub fn on_cleanup<F>(mut self, step: F) -> Self
    where
        F: FnOnce() -> BoxFuture<'static, ()> + Send + Sync + 'static,
    {
        self.teardown.push(Box::new(step));
        self
    }

    /// The same deployment with every bridge instance replaced by `wrap(instance)`: for
    /// harnesses that decorate another bridge (and for the suite's own mutant tests).
    pub fn map_bridges(
        mut self,
        wrap: impl FnMut(Arc<dyn EventBridge>) -> Arc<dyn EventBridge>,
    ) -> Self {
        self.bridges = std::mem::take(&mut self.bridges)
            .into_iter()
            .map(wrap)
            .collect();
        self
    }

    /// Instance `i`.
    pub fn bridge(&self, i: usize) -> Arc<dyn EventBridge> {
        self.bridges[i].clone()
    }

    /// Shuts every bridge and the queue bridge down, then runs the cleanup steps. Idempotent.
    pub async fn cleanup(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        // All at once, like the instances of a deployment going down together.
        let shutdowns = self.bridges.iter().enumerate().map(|(i, b)| async move {
            let shutdown = b.shutdown(deadline);
            let finished = tokio::time::timeout_at(deadline + SHUTDOWN_GRACE, shutdown).await;
            finished
                .is_err()
                .then(|| format!("{i} ({})", b.instance_id()))
        });
        let hung: Vec<String> = futures::future::join_all(shutdowns)
            .await
            .into_iter()
            .flatten()
            .collect();
        if let Some(q) = &self.queues {
            q.shutdown().await;
        }
        for step in std::mem::take(&mut self.teardown) {
            step().await;
        }
        // Reported after the cleanup steps, so that the broker is left clean all the same.
        if !hung.is_empty() && !self.background {
            panic!(
                "bridge instance {} did not finish shutting down {SHUTDOWN_GRACE:?} after its deadline: a user's process would hang on exit",
                hung.join(", ")
            );
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // A case that panicked never reached its cleanup: do it in the background, best effort,
        // so a failing test does not leave queues behind on a shared broker.
        if self.cleaned || self.background {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = Deployment {
            bridges: std::mem::take(&mut self.bridges),
            queues: self.queues.take(),
            raw: self.raw.take(),
            teardown: std::mem::take(&mut self.teardown),
            cleaned: false,
            background: true,
        };
        self.cleaned = true;
        rt.spawn(async move { rest.cleanup().await });
    }
}

#[cfg(test)]
mod tests {
    use super::Workload;

    #[test]
    fn a_scaled_workload_takes_its_share_and_the_full_one_everything() {
        let full = Workload::full();
        assert_eq!(
            (full.of(500), full.side_of(100), full.why()),
            (500, 100, None)
        );
        let quarter = Workload::scaled(25, "an emulator");
        assert_eq!(quarter.of(500), 125);
        assert_eq!(
            quarter.side_of(100),
            50,
            "50 × 50 is a quarter of 100 × 100"
        );
        assert_eq!(quarter.why(), Some("an emulator"));
        let tiny = Workload::scaled(0, "clamped to 1 %");
        assert_eq!((tiny.percent(), tiny.of(10), tiny.side_of(10)), (1, 1, 1));
        assert_eq!(Workload::scaled(100, "no reason needed"), Workload::full());
    }
}
