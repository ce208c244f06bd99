//! A case's world: a fresh deployment under a unique prefix, the services the case started on
//! it, and one call that takes all of it down again.

use std::sync::Arc;
use std::time::Duration;

use purista_core::{
    Capabilities, EventBridge, QueueBridge, RunningService, ServiceBuilder, StartError,
};
use tokio::time::Instant;

use crate::harness::{BrokerControl, Deployment, Harness, RawPublisher};
use crate::support::new_prefix;

/// Environment variable that turns a missing broker from a loud skip into a failure (CI).
pub const REQUIRE_BROKERS_ENV: &str = "PURISTA_REQUIRE_BROKERS";

/// True when `PURISTA_REQUIRE_BROKERS=1`: a broker that cannot be reached (or started) fails the
/// test instead of skipping it.
pub fn brokers_required() -> bool {
    std::env::var(REQUIRE_BROKERS_ENV).as_deref() == Ok("1")
}

/// Skips `what` loudly because `why` — or panics with `why` when brokers are required.
///
/// The notice goes straight to the process's stderr, past the test harness's output capture,
/// so that `cargo test` shows it even for a test that passes. (nextest keeps a passing test's
/// output; `--success-output immediate` shows it.)
pub fn skip_or_fail(what: &str, why: &str) {
    if brokers_required() {
        panic!("{what}: {why} ({REQUIRE_BROKERS_ENV}=1)");
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {what}: {why} (set {REQUIRE_BROKERS_ENV}=1 to fail instead) ***\n"
    );
}

/// One case's deployment and services.
pub struct TestEnv {
    /// The harness.
    pub harness: Arc<dyn Harness>,
    /// Unique resource prefix of this case.
    pub prefix: String,
    /// The bridge instances.
    pub deployment: Deployment,
    services: Vec<Arc<RunningService>>,
}

impl TestEnv {
    /// A deployment of `instances` bridge instances under a fresh prefix.
    pub async fn new(harness: &Arc<dyn Harness>, instances: usize) -> Self {
        let prefix = new_prefix();
        let deployment = harness.deployment(&prefix, instances).await;
        Self::with(harness, prefix, deployment, instances)
    }

    /// Like [`TestEnv::new`], on the broker `control` may break (the reliability cases).
    pub async fn on_broker(
        harness: &Arc<dyn Harness>,
        control: &Arc<dyn BrokerControl>,
        instances: usize,
    ) -> Self {
        let prefix = new_prefix();
        let deployment = control.deployment(&prefix, instances).await;
        Self::with(harness, prefix, deployment, instances)
    }

    fn with(
        harness: &Arc<dyn Harness>,
        prefix: String,
        deployment: Deployment,
        instances: usize,
    ) -> Self {
        assert_eq!(
            deployment.bridges.len(),
            instances,
            "the harness made the wrong number of bridge instances"
        );
        TestEnv {
            harness: harness.clone(),
            prefix,
            deployment,
            services: Vec::new(),
        }
    }

    /// A name unique to this case: `<prefix>-<name>`.
    pub fn name(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Bridge instance `i`.
    pub fn bridge(&self, i: usize) -> Arc<dyn EventBridge> {
        self.deployment.bridge(i)
    }

    /// The declared capabilities.
    pub fn caps(&self) -> Capabilities {
        self.harness.capabilities()
    }

    /// The queue bridge; panics when there is none (queue cases check first).
    pub fn queues(&self) -> Arc<dyn QueueBridge> {
        self.deployment
            .queues
            .clone()
            .expect("this deployment has a queue bridge")
    }

    /// The raw publisher, if the harness has one.
    pub fn raw(&self) -> Option<Arc<dyn RawPublisher>> {
        self.deployment.raw.clone()
    }

    /// The raw publisher of a harness that offers one (cases that require it); panics when the
    /// deployment lacks it although the harness said it offers one.
    pub fn raw_publisher(&self) -> Arc<dyn RawPublisher> {
        self.raw().unwrap_or_else(|| {
            panic!(
                "the `{}` harness offers a raw publisher, but its deployment has none",
                self.harness.name()
            )
        })
    }

    /// Starts `service` on instance `i` (with the queue bridge, if any) and keeps it for
    /// [`TestEnv::finish`]. Panics with the start error: a case only starts what must start.
    pub async fn start(&mut self, i: usize, service: ServiceBuilder) -> Arc<RunningService> {
        match self.try_start(i, service).await {
            Ok(s) => s,
            Err(e) => panic!("a service the bridge declares support for did not start: {e}"),
        }
    }

    /// Like [`TestEnv::start`] but returns the start error.
    pub async fn try_start(
        &mut self,
        i: usize,
        service: ServiceBuilder,
    ) -> Result<Arc<RunningService>, StartError> {
        let service = match &self.deployment.queues {
            Some(q) => service.queue_bridge(q.clone()),
            None => service,
        };
        let running = Arc::new(service.build().start(self.bridge(i)).await?);
        self.services.push(running.clone());
        Ok(running)
    }

    /// Starts every `(instance, service)` at once, like a deployment whose services come up
    /// together; each result in order. Started services are kept for [`TestEnv::finish`].
    pub async fn start_concurrently(
        &mut self,
        services: Vec<(usize, ServiceBuilder)>,
    ) -> Vec<Result<Arc<RunningService>, StartError>> {
        let starts = services.into_iter().map(|(i, service)| {
            let service = match &self.deployment.queues {
                Some(q) => service.queue_bridge(q.clone()),
                None => service,
            };
            let bridge = self.bridge(i);
            async move { service.build().start(bridge).await.map(Arc::new) }
        });
        let results = futures::future::join_all(starts).await;
        for s in results.iter().flatten() {
            self.services.push(s.clone());
        }
        results
    }

    /// Shuts every started service down, then the deployment (bridges, broker resources).
    pub async fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        for s in std::mem::take(&mut self.services) {
            s.shutdown(deadline).await;
        }
        self.deployment.cleanup().await;
    }
}
