//! An in-repo double of Dapr sidecars (feature `double`), for tests and benchmarks where no
//! `daprd` can run. It implements the documented HTTP contract of the parts the bridge uses:
//!
//! * `POST /v1.0/publish/{pubsub}/{topic}`: a structured CloudEvent (`application/cloudevents+json`)
//!   is taken as is (missing `id`, `source`, `type`, `specversion` filled in); any other body is
//!   wrapped as the `data` of a new CloudEvent. The event gets `topic` and `pubsubname`.
//! * Subscriptions: once its app port is known, each sidecar reads `GET /dapr/subscribe` from
//!   the app (until it answers 2xx, like daprd at startup). Entries are `{pubsubname, topic,
//!   route | routes: {rules: [{match, path}], default}, deadLetterTopic}`. Each rule's `match`
//!   is a CEL expression over the CloudEvent (the variable `event`, its JSON `data` as nested
//!   fields, every JSON number a double as Go's decoder gives daprd), evaluated with a real CEL
//!   implementation (the `cel` crate) exactly as daprd routes: the first rule that matches
//!   (or has no `match`) wins, then `routes.default`; no match at all is acknowledged and not
//!   delivered; a rule that fails to evaluate, or gives no boolean, fails the delivery (retried
//!   by the resiliency policy, then dead-lettered). An expression that does not parse refuses
//!   the subscription with a warning.
//! * Delivery: each published event goes once to each consumer group (the app id) subscribed
//!   to its topic, to one of the group's sidecars (round robin). The pub/sub broker behind the
//!   sidecars outlives them (`double/broker.rs`): what is published while none of a group's
//!   sidecars is subscribed waits for the group, and what a sidecar took but had not
//!   acknowledged when it stopped is delivered again once one of the group subscribes
//!   ([`Sidecar::stop`], [`Sidecar::start_again`]), as with a durable component (Redis
//!   Streams, Kafka). Each sidecar delivers to its app in publish order, one delivery at a
//!   time (like one partition of a log), or up to [`SidecarOptions::concurrency`] at once
//!   (like a component's `concurrency` setting). The app answers 2xx with
//!   `{"status": "SUCCESS"}` (or no body): done; `"RETRY"` or any non-2xx but 404: retried by
//!   the resiliency policy ([`Resiliency`]), then sent to the `deadLetterTopic` or dropped;
//!   `"DROP"` or 404: dropped.
//! * `/v1.0/invoke/{app-id}/method/{method}`: proxied to one sidecar of that app id (round
//!   robin), with the app's status, content type and body passed through. An unknown app id,
//!   or an app that cannot be reached, is Dapr's 500 `ERR_DIRECT_INVOKE`.
//! * `GET /v1.0/state/{store}/{key}` (200 with an `ETag`, or 204) and `POST /v1.0/state/{store}`
//!   with ETags (409 on a mismatch; with `first-write` concurrency and no ETag, 409 when the
//!   key exists) and `metadata.ttlInSeconds`, like a state store with `keyPrefix: none`.
//! * `GET /v1.0/metadata`: the app id and the subscriptions read from the app (`subscriptions:
//!   [{pubsubname, topic, deadLetterTopic, rules: [{match, path}], type}]`, the default route
//!   last with an empty `match`), as daprd reports them.
//! * `GET /v1.0/healthz` (204). With an API token set, every other call needs the header
//!   `dapr-api-token` (401 otherwise); with an app token set, the sidecar sends it to its app.
//!
//! The double runs on a runtime of its own (four threads), so it outlives the tests' runtimes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::app::TOKEN_HEADER;
use crate::cloudevent::CLOUDEVENT_CONTENT_TYPE;

mod broker;

use broker::{Broker, ConsumerId, Handout};

/// Dapr's default largest request (`--max-body-size`, 4 MiB); larger is 413.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Delivery retries, as a Dapr resiliency policy's constant retry for a pub/sub component's
/// inbound direction says them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resiliency {
    /// Retries after the first delivery.
    pub max_retries: u32,
    /// Wait before each retry.
    pub interval: Duration,
}

impl Default for Resiliency {
    fn default() -> Self {
        Resiliency {
            max_retries: 3,
            interval: Duration::from_millis(20),
        }
    }
}

/// How long a delivery is out before the next one of its sidecar may start, when the sidecar
/// delivers several at once ([`SidecarOptions::concurrency`]).
pub const OVERTAKE_AFTER: Duration = Duration::from_millis(20);

/// Settings of one double.
#[derive(Debug, Clone, Default)]
pub struct DoubleOptions {
    /// Retries of deliveries.
    pub resiliency: Resiliency,
    /// How long a sidecar takes from reading its app's subscriptions to being subscribed
    /// (daprd subscribes to the broker after it has the answer); default none.
    pub subscribe_delay: Duration,
}

/// One sidecar's settings.
#[derive(Debug, Clone, Default)]
pub struct SidecarOptions {
    /// The app id.
    pub app_id: String,
    /// Consumer group; empty = the app id (Dapr's default `consumerID`).
    pub consumer_id: String,
    /// `DAPR_API_TOKEN`: what the app must send to this sidecar.
    pub api_token: Option<String>,
    /// `APP_API_TOKEN`: what this sidecar sends to its app.
    pub app_api_token: Option<String>,
    /// Deliveries to the app in flight at once, like a pub/sub component's `concurrency`
    /// (Redis Streams: 10 by default; daprd's `--app-max-concurrency` bounds it too). 0 or 1:
    /// one at a time, in publish order (like one partition of a log). With more, deliveries
    /// start in publish order, each once the one before was answered or has been out for
    /// [`OVERTAKE_AFTER`]: a delivery the app holds does not hold up the next ones.
    pub concurrency: usize,
}

#[derive(Debug, Clone)]
struct Subscription {
    pubsub: String,
    topic: String,
    /// The routing rules in order; the default route (or `route`) last, without a match.
    rules: Vec<Rule>,
    dead_letter_topic: Option<String>,
}

/// One routing rule of a subscription.
#[derive(Clone)]
struct Rule {
    /// The CEL expression as given (empty: matches everything).
    source: String,
    matcher: Option<Arc<cel::Program>>,
    path: String,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("match", &self.source)
            .field("path", &self.path)
            .finish()
    }
}

/// Where a delivery goes, as daprd's routing decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// To this path of the app.
    To(String),
    /// No rule matched and there is no default: acknowledged, not delivered.
    Nowhere,
}

impl Subscription {
    /// daprd's routing: the rules in order, the first whose expression is true (or that has
    /// none) wins. An expression that fails to evaluate, or whose result is not a boolean, is
    /// an error of the delivery.
    /// `event` gives the CloudEvent as JSON, asked only when a rule has an expression.
    fn route_with(&self, event: impl FnOnce() -> Value) -> Result<Route, String> {
        let mut event = Some(event);
        let mut context: Option<cel::Context<'_, '_>> = None;
        for rule in &self.rules {
            let Some(matcher) = &rule.matcher else {
                return Ok(Route::To(rule.path.clone()));
            };
            let context = context.get_or_insert_with(|| {
                let mut context = cel::Context::default();
                let json = event.take().map_or(Value::Null, |event| event());
                context.add_variable_from_value("event", cel_value(&json));
                context
            });
            match matcher.execute(context) {
                Ok(cel::Value::Bool(true)) => return Ok(Route::To(rule.path.clone())),
                Ok(cel::Value::Bool(false)) => {}
                Ok(other) => {
                    return Err(format!(
                        "the result of match expression {} was not a boolean: {other:?}",
                        rule.source
                    ));
                }
                Err(e) => return Err(format!("match expression {}: {e}", rule.source)),
            }
        }
        Ok(Route::Nowhere)
    }

    /// The subscription as daprd's metadata endpoint lists it.
    fn metadata(&self) -> Value {
        let rules: Vec<Value> = self
            .rules
            .iter()
            .map(|r| json!({ "match": r.source, "path": r.path }))
            .collect();
        json!({
            "pubsubname": self.pubsub,
            "topic": self.topic,
            "deadLetterTopic": self.dead_letter_topic.clone().unwrap_or_default(),
            "rules": rules,
            "type": "PROGRAMMATIC",
        })
    }
}

/// A JSON value as CEL sees the CloudEvent daprd decoded: objects are maps, arrays lists, and
/// every number a double (Go's `encoding/json` into `interface{}`).
fn cel_value(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(cel_value).collect())),
        Value::Object(map) => {
            let map: HashMap<String, cel::Value> =
                map.iter().map(|(k, v)| (k.clone(), cel_value(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// Compiles a rule; an empty (or blank) expression matches everything, as in daprd.
fn rule(source: &str, path: &str) -> Result<Rule, String> {
    let trimmed = source.trim();
    let matcher = if trimmed.is_empty() {
        None
    } else {
        Some(Arc::new(
            cel::Program::compile(trimmed).map_err(|e| format!("{trimmed}: {e}"))?,
        ))
    };
    Ok(Rule {
        source: trimmed.to_string(),
        matcher,
        path: path.to_string(),
    })
}

struct SidecarState {
    /// This sidecar as a consumer of the broker (the same across restarts).
    id: ConsumerId,
    options: SidecarOptions,
    app_port: Mutex<Option<u16>>,
    subscriptions: Mutex<Option<Vec<Subscription>>>,
    cluster: Arc<Cluster>,
    /// Bumped when the sidecar stops; a loader of an older generation gives up.
    generation: AtomicU64,
    /// While the sidecar runs: where the broker hands it messages, and the task delivering
    /// them to the app (aborted when the sidecar stops, like a process that is gone).
    delivering: Mutex<Option<Delivering>>,
}

/// The delivery side of a running sidecar.
struct Delivering {
    handouts: tokio::sync::mpsc::UnboundedSender<Handout>,
    task: tokio::task::AbortHandle,
}

impl SidecarState {
    fn group(&self) -> &str {
        if self.options.consumer_id.is_empty() {
            &self.options.app_id
        } else {
            &self.options.consumer_id
        }
    }

    fn app_url(&self, path: &str) -> Option<String> {
        let port = (*self.app_port.lock())?;
        let path = path.trim_start_matches('/');
        Some(format!("http://127.0.0.1:{port}/{path}"))
    }
}

#[derive(Default)]
struct Cluster {
    /// Sidecars serving (started and not stopped).
    sidecars: Mutex<Vec<Arc<SidecarState>>>,
    /// The pub/sub broker: outlives every sidecar.
    broker: Broker,
    next_sidecar: AtomicU64,
    /// The state store's items.
    state: Mutex<HashMap<String, StateItem>>,
    etags: AtomicU64,
    round_robin: AtomicUsize,
    resiliency: Mutex<Resiliency>,
    subscribe_delay: Mutex<Duration>,
    client: std::sync::OnceLock<reqwest::Client>,
    published: AtomicU64,
    delivered: AtomicU64,
    dead_lettered: AtomicU64,
    unrouted: AtomicU64,
    given_up: AtomicU64,
}

impl Cluster {
    fn client(&self) -> &reqwest::Client {
        self.client.get_or_init(|| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default()
        })
    }

    fn serving(&self) -> Vec<Arc<SidecarState>> {
        self.sidecars
            .lock()
            .iter()
            .filter(|s| s.app_port.lock().is_some())
            .cloned()
            .collect()
    }

    fn pick<T: Clone>(&self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let n = self.round_robin.fetch_add(1, Ordering::Relaxed);
        Some(items[n % items.len()].clone())
    }

    /// Publishes `event` on `pubsub`/`topic`: one delivery per consumer group.
    fn publish(&self, pubsub: &str, topic: &str, event: Value) {
        self.published.fetch_add(1, Ordering::Relaxed);
        self.broker.publish(pubsub, topic, event);
    }

    /// Delivers `event` to the sidecar's app per the resiliency policy; returns once the
    /// delivery is done (the broker's acknowledgement is the caller's).
    async fn deliver(&self, sidecar: &SidecarState, sub: &Subscription, event: &broker::Event) {
        let resiliency = *self.resiliency.lock();
        let body = &event.body;
        let mut last = String::new();
        let route = sub.route_with(|| event.value());
        for attempt in 0..=resiliency.max_retries {
            if attempt > 0 {
                tokio::time::sleep(resiliency.interval).await;
            }
            let answer = match &route {
                Ok(Route::To(path)) => self.attempt(sidecar, path, body).await,
                Ok(Route::Nowhere) => {
                    self.unrouted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::warn!(topic = %sub.topic, error = %e, "the double could not route an event");
                    Answer::Retry(format!("routing failed: {e}"))
                }
            };
            match answer {
                Answer::Done => {
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Answer::Drop => return,
                Answer::Retry(why) => last = why,
            }
        }
        tracing::warn!(app_id = %sidecar.options.app_id, topic = %sub.topic, last_answer = %last, "the double gave up a delivery after its resiliency retries");
        self.given_up.fetch_add(1, Ordering::Relaxed);
        if let Some(dead_letter_topic) = &sub.dead_letter_topic {
            self.dead_lettered.fetch_add(1, Ordering::Relaxed);
            self.publish(&sub.pubsub, dead_letter_topic, event.value());
        }
    }

    async fn attempt(&self, sidecar: &SidecarState, path: &str, body: &Bytes) -> Answer {
        let Some(url) = sidecar.app_url(path) else {
            return Answer::Retry("no app connected".into());
        };
        let mut request = self
            .client()
            .post(url)
            .header(header::CONTENT_TYPE, CLOUDEVENT_CONTENT_TYPE)
            .body(body.clone());
        if let Some(token) = &sidecar.options.app_api_token {
            request = request.header(TOKEN_HEADER, token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::Retry(format!("{e:?}")),
        };
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Answer::Drop;
        }
        if !status.is_success() {
            return Answer::Retry(format!("status {status}"));
        }
        let bytes = response.bytes().await.unwrap_or_default();
        let verdict = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_string));
        match verdict.as_deref() {
            None | Some("SUCCESS") => Answer::Done,
            Some("DROP") => Answer::Drop,
            // RETRY, and anything Dapr does not know, is retried.
            Some(other) => Answer::Retry(format!("status {other}")),
        }
    }
}

#[derive(Clone)]
struct StateItem {
    value: Value,
    etag: u64,
    expires: Option<std::time::Instant>,
}

impl StateItem {
    fn live(&self) -> bool {
        self.expires.is_none_or(|at| at > std::time::Instant::now())
    }
}

enum Answer {
    Done,
    /// Carries what the app answered, for the log when the retries run out.
    Retry(String),
    Drop,
}

/// The double's runtime, shut down in the background when the last holder goes (dropping a
/// runtime inside a test's async context would panic).
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(tokio::runtime::Runtime::handle)
    }

    fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(
        &self,
        future: F,
    ) -> Option<tokio::task::AbortHandle> {
        self.handle()
            .map(|handle| handle.spawn(future).abort_handle())
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A running double: a set of sidecars sharing one pub/sub broker and one state store.
pub struct DaprDouble {
    cluster: Arc<Cluster>,
    runtime: Arc<OwnedRuntime>,
}

impl std::fmt::Debug for DaprDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaprDouble").finish_non_exhaustive()
    }
}

impl DaprDouble {
    /// A double with no sidecars yet.
    pub fn start(options: DoubleOptions) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("dapr-double")
            .enable_all()
            .build()?;
        let cluster = Arc::new(Cluster::default());
        *cluster.resiliency.lock() = options.resiliency;
        *cluster.subscribe_delay.lock() = options.subscribe_delay;
        Ok(DaprDouble {
            cluster,
            runtime: Arc::new(OwnedRuntime(Some(runtime))),
        })
    }

    /// A new sidecar on a free loopback port. Point it at its app with [`Sidecar::connect_app`].
    pub fn sidecar(&self, options: SidecarOptions) -> std::io::Result<Sidecar> {
        let state = Arc::new(SidecarState {
            id: self.cluster.next_sidecar.fetch_add(1, Ordering::Relaxed),
            options,
            app_port: Mutex::new(None),
            subscriptions: Mutex::new(None),
            cluster: self.cluster.clone(),
            generation: AtomicU64::new(0),
            delivering: Mutex::new(None),
        });
        let sidecar = Sidecar {
            state,
            runtime: self.runtime.clone(),
            server: Mutex::new(None),
            port: Mutex::new(0),
        };
        sidecar.serve(0)?;
        Ok(sidecar)
    }

    /// Events published so far.
    pub fn published(&self) -> u64 {
        self.cluster.published.load(Ordering::Relaxed)
    }

    /// Deliveries the apps answered with SUCCESS.
    pub fn delivered(&self) -> u64 {
        self.cluster.delivered.load(Ordering::Relaxed)
    }

    /// Events sent to a dead-letter topic after their retries.
    pub fn dead_lettered(&self) -> u64 {
        self.cluster.dead_lettered.load(Ordering::Relaxed)
    }

    /// Deliveries given up after the resiliency policy's retries (dead-lettered or dropped).
    pub fn given_up(&self) -> u64 {
        self.cluster.given_up.load(Ordering::Relaxed)
    }

    /// Deliveries that matched no routing rule and had no default route (acknowledged, not
    /// delivered).
    pub fn unrouted(&self) -> u64 {
        self.cluster.unrouted.load(Ordering::Relaxed)
    }

    /// Events the sidecars accepted on `topic` of the pub/sub component `pubsub` (answered
    /// 2xx to their publisher), dead letters the double sent there included.
    pub fn accepted(&self, pubsub: &str, topic: &str) -> u64 {
        self.cluster.broker.accepted(pubsub, topic)
    }

    /// Deliveries the broker still has for consumer group `group` (an app id, or the
    /// sidecars' [`SidecarOptions::consumer_id`]): handed to one of its sidecars and not
    /// acknowledged yet, or waiting while none of them is subscribed.
    pub fn unacknowledged(&self, group: &str) -> usize {
        self.cluster.broker.unacknowledged(group)
    }
}

impl Drop for DaprDouble {
    fn drop(&mut self) {
        for s in self.cluster.sidecars.lock().drain(..) {
            *s.app_port.lock() = None;
        }
    }
}

/// One sidecar of a [`DaprDouble`].
pub struct Sidecar {
    state: Arc<SidecarState>,
    runtime: Arc<OwnedRuntime>,
    /// Stops the server, and hears when it has closed its last connection.
    server: Mutex<Option<(watch::Sender<bool>, std::sync::mpsc::Receiver<()>)>>,
    port: Mutex<u16>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("app_id", &self.state.options.app_id)
            .field("port", &*self.port.lock())
            .finish()
    }
}

impl Sidecar {
    fn serve(&self, port: u16) -> std::io::Result<()> {
        let handle = self
            .runtime
            .handle()
            .ok_or_else(|| std::io::Error::other("the double's runtime is gone"))?;
        let _guard = handle.enter();
        let listener = crate::listen("127.0.0.1", port)?;
        let bound = listener.local_addr()?.port();
        let (stop, mut stopped) = watch::channel(false);
        let router = router(self.state.clone());
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (closed, all_closed) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            // Small request/response pairs: without TCP_NODELAY, Nagle's algorithm and delayed
            // acknowledgements stall each exchange by tens of milliseconds.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await;
            let _ = closed.send(());
        });
        *self.server.lock() = Some((stop, all_closed));
        *self.port.lock() = bound;
        Ok(())
    }

    /// `http://127.0.0.1:<port>`: what the app's `DAPR_HTTP_ENDPOINT` would be.
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", *self.port.lock())
    }

    /// Points the sidecar at its app on `app_port` and, like daprd, reads the app's
    /// subscriptions as soon as the app answers; then the broker hands it what waited for its
    /// consumer group, and what is published from then on.
    pub fn connect_app(&self, app_port: u16) {
        *self.state.app_port.lock() = Some(app_port);
        {
            let mut sidecars = self.state.cluster.sidecars.lock();
            if !sidecars.iter().any(|s| Arc::ptr_eq(s, &self.state)) {
                sidecars.push(self.state.clone());
            }
        }
        let state = self.state.clone();
        let generation = state.generation.load(Ordering::Acquire);
        {
            // Once per run of the sidecar: pointed at its app again (the app restarted), it
            // goes on delivering what it holds, to the new port.
            let mut delivering = state.delivering.lock();
            if delivering.is_none() {
                let (handouts, deliveries) = tokio::sync::mpsc::unbounded_channel();
                if let Some(task) = self.runtime.spawn(deliver_all(state.clone(), deliveries)) {
                    *delivering = Some(Delivering { handouts, task });
                }
            }
        }
        self.runtime.spawn(async move {
            for _ in 0..600 {
                if state.generation.load(Ordering::Acquire) != generation {
                    return;
                }
                if let Some(subs) = read_subscriptions(&state).await {
                    let delay = *state.cluster.subscribe_delay.lock();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    // Under the lock `stop` takes: a sidecar that stopped meanwhile does not
                    // subscribe.
                    let delivering = state.delivering.lock();
                    if let Some(delivering) = delivering.as_ref()
                        && state.generation.load(Ordering::Acquire) == generation
                    {
                        *state.subscriptions.lock() = Some(subs.clone());
                        state.cluster.broker.subscribe(
                            state.id,
                            state.group(),
                            subs,
                            delivering.handouts.clone(),
                        );
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::warn!(app_id = %state.options.app_id, "the double sidecar never read its app's subscriptions");
        });
    }

    /// Stops, as a daprd process that is gone: its deliveries to the app are cut off, what
    /// it held unacknowledged goes back to the broker (to another sidecar of its consumer
    /// group, or waits for the group), and it stops serving (every connection to it closed).
    /// Nothing is delivered to its app until [`Sidecar::start_again`].
    pub fn stop(&self) {
        let delivering = {
            let mut delivering = self.state.delivering.lock();
            self.state.generation.fetch_add(1, Ordering::AcqRel);
            *self.state.subscriptions.lock() = None;
            delivering.take()
        };
        if let Some(delivering) = delivering {
            delivering.task.abort();
        }
        self.state.cluster.broker.unsubscribe(self.state.id);
        self.state
            .cluster
            .sidecars
            .lock()
            .retain(|s| !Arc::ptr_eq(s, &self.state));
        let server = self.server.lock().take();
        if let Some((stop, all_closed)) = server {
            let _ = stop.send(true);
            // Gone means gone: no keep-alive connection of the app's still answers after this
            // returns (the server closes idle ones at once and lets running requests finish).
            let _ = all_closed.recv_timeout(Duration::from_secs(5));
        }
    }

    /// Serves again on the same port and reads the app's subscriptions again, like daprd
    /// started again: once subscribed, it delivers what waited for its consumer group (what it
    /// had not acknowledged when it stopped, and what was published meanwhile), then the rest.
    pub fn start_again(&self) -> std::io::Result<()> {
        let port = *self.port.lock();
        let mut tries = 0;
        loop {
            match self.serve(port) {
                Ok(()) => break,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        let app_port = *self.state.app_port.lock();
        if let Some(port) = app_port {
            self.connect_app(port);
        }
        Ok(())
    }

    /// Whether the sidecar has read its app's subscriptions.
    pub fn subscribed(&self) -> bool {
        self.state.subscriptions.lock().is_some()
    }
}

impl Drop for Sidecar {
    /// Dropping a sidecar removes its app for good: when it was the last of its consumer
    /// group, the group and what waits for it are deleted (a stopped sidecar's group keeps
    /// its messages for [`Sidecar::start_again`]).
    fn drop(&mut self) {
        self.stop();
        self.state
            .cluster
            .broker
            .forget_if_unused(self.state.group());
    }
}

/// A sidecar's deliveries to its app, in the order the broker hands them out: one at a time
/// (like one partition of a log), or up to [`SidecarOptions::concurrency`] at once, each
/// acknowledged to the broker once done. Aborting this task cuts off every delivery in flight.
async fn deliver_all(
    state: Arc<SidecarState>,
    mut handouts: tokio::sync::mpsc::UnboundedReceiver<Handout>,
) {
    let concurrency = state.options.concurrency.max(1);
    if concurrency == 1 {
        while let Some(handout) = handouts.recv().await {
            let cluster = &state.cluster;
            cluster
                .deliver(&state, &handout.subscription, &handout.event)
                .await;
            cluster.broker.ack(handout.tag);
        }
        return;
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    // Owned here, so that aborting this task aborts the deliveries in flight too.
    let mut running = tokio::task::JoinSet::new();
    while let Some(handout) = handouts.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        while running.try_join_next().is_some() {}
        let state = state.clone();
        let (answered, heard) = tokio::sync::oneshot::channel::<()>();
        running.spawn(async move {
            let _slot = slot;
            let cluster = &state.cluster;
            cluster
                .deliver(&state, &handout.subscription, &handout.event)
                .await;
            cluster.broker.ack(handout.tag);
            let _ = answered.send(());
        });
        // The next starts once this one was answered or has been out for a while:
        // deliveries reach the app in publish order unless one is held.
        let _ = tokio::time::timeout(OVERTAKE_AFTER, heard).await;
    }
}

async fn read_subscriptions(state: &SidecarState) -> Option<Vec<Subscription>> {
    let url = state.app_url("/dapr/subscribe")?;
    // Each try is short: one that hangs must not hold up the next (the loader tries again).
    let mut request = state
        .cluster
        .client()
        .get(url)
        .timeout(Duration::from_secs(2));
    if let Some(token) = &state.options.app_api_token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = request.send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let entries: Vec<Value> = response.json().await.ok()?;
    let mut subscriptions = Vec::new();
    for entry in entries {
        let text = |k: &str| entry.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(pubsub), Some(topic)) = (text("pubsubname"), text("topic")) else {
            tracing::warn!("the double ignored a subscription without pubsubname or topic");
            continue;
        };
        let rules = match subscription_rules(&entry) {
            Ok(rules) => rules,
            Err(e) => {
                tracing::warn!(%topic, error = %e, "the double refused a subscription whose routing rules do not compile");
                continue;
            }
        };
        if rules.is_empty() {
            tracing::warn!(%topic, "the double ignored a subscription without a route");
            continue;
        }
        subscriptions.push(Subscription {
            pubsub,
            topic,
            rules,
            dead_letter_topic: text("deadLetterTopic").filter(|t| !t.is_empty()),
        });
    }
    Some(subscriptions)
}

/// A programmatic subscription's routes as daprd builds them: `routes.rules` in order, then
/// `routes.default`; without `routes`, the single `route`.
fn subscription_rules(entry: &Value) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    match entry.get("routes") {
        Some(routes) => {
            for r in routes
                .get("rules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let source = r.get("match").and_then(Value::as_str).unwrap_or("");
                let path = r.get("path").and_then(Value::as_str).unwrap_or("");
                rules.push(rule(source, path)?);
            }
            if let Some(default) = routes.get("default").and_then(Value::as_str)
                && !default.is_empty()
            {
                rules.push(rule("", default)?);
            }
        }
        None => {
            if let Some(route) = entry.get("route").and_then(Value::as_str)
                && !route.is_empty()
            {
                rules.push(rule("", route)?);
            }
        }
    }
    Ok(rules)
}

fn router(state: Arc<SidecarState>) -> Router {
    Router::new()
        .route("/v1.0/healthz", get(|| async { StatusCode::NO_CONTENT }))
        .route("/v1.0/metadata", get(metadata))
        .route("/v1.0/publish/{pubsub}/{topic}", post(publish))
        .route("/v1.0/invoke/{app_id}/method/{*method}", any(invoke))
        .route("/v1.0/state/{store}/{key}", get(get_state))
        .route("/v1.0/state/{store}", post(save_state))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

fn authorized(state: &SidecarState, headers: &HeaderMap) -> bool {
    match &state.options.api_token {
        None => true,
        Some(token) => headers
            .get(TOKEN_HEADER)
            .is_some_and(|v| v.as_bytes() == token.as_bytes()),
    }
}

fn dapr_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(json!({ "errorCode": code, "message": message })),
    )
        .into_response()
}

fn unauthorized() -> Response {
    dapr_error(
        StatusCode::UNAUTHORIZED,
        "ERR_API_TOKEN",
        "invalid api token".into(),
    )
}

async fn metadata(State(state): State<Arc<SidecarState>>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    // Like daprd, the subscriptions are listed once they are active: a message published
    // after an app sees its topic here reaches the app.
    let subscriptions: Vec<Value> = state
        .subscriptions
        .lock()
        .iter()
        .flatten()
        .map(Subscription::metadata)
        .collect();
    axum::Json(json!({
        "id": state.options.app_id,
        "runtimeVersion": "double",
        "subscriptions": subscriptions,
    }))
    .into_response()
}

async fn publish(
    State(state): State<Arc<SidecarState>>,
    Path((pubsub, topic)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let mut event: Map<String, Value> = if content_type == CLOUDEVENT_CONTENT_TYPE {
        match serde_json::from_slice(&body) {
            Ok(Value::Object(event)) => event,
            _ => {
                return dapr_error(
                    StatusCode::BAD_REQUEST,
                    "ERR_PUBSUB_CLOUD_EVENTS_SER",
                    "the body is not a JSON CloudEvent".into(),
                );
            }
        }
    } else {
        let data = if content_type.ends_with("json") {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()))
        } else {
            Value::String(String::from_utf8_lossy(&body).into())
        };
        let mut event = Map::new();
        event.insert("data".into(), data);
        event.insert("datacontenttype".into(), Value::String(content_type));
        event
    };
    let id = purista_core::ids::new_id();
    let defaults = [
        ("specversion", "1.0"),
        ("id", id.as_str()),
        ("source", state.options.app_id.as_str()),
        ("type", "com.dapr.event.sent"),
    ];
    for (k, v) in defaults {
        event
            .entry(k.to_string())
            .or_insert_with(|| Value::String(v.to_string()));
    }
    event.insert("topic".into(), Value::String(topic.clone()));
    event.insert("pubsubname".into(), Value::String(pubsub.clone()));
    state.cluster.publish(&pubsub, &topic, Value::Object(event));
    StatusCode::NO_CONTENT.into_response()
}

async fn invoke(
    State(state): State<Arc<SidecarState>>,
    Path((app_id, method)): Path<(String, String)>,
    request_method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let targets: Vec<Arc<SidecarState>> = state
        .cluster
        .serving()
        .into_iter()
        .filter(|s| s.options.app_id == app_id)
        .collect();
    let Some(target) = state.cluster.pick(&targets) else {
        return dapr_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_DIRECT_INVOKE",
            format!("failed to invoke, id: {app_id}, err: couldn't find service: {app_id}"),
        );
    };
    let Some(url) = target.app_url(&method) else {
        return dapr_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "ERR_DIRECT_INVOKE",
            format!("failed to invoke, id: {app_id}: app not connected"),
        );
    };
    let mut request = state
        .cluster
        .client()
        .request(request_method, url)
        .body(body.to_vec());
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        request = request.header(header::CONTENT_TYPE, ct.clone());
    }
    if let Some(token) = &target.options.app_api_token {
        request = request.header(TOKEN_HEADER, token);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            return dapr_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_DIRECT_INVOKE",
                format!("failed to invoke, id: {app_id}: {e}"),
            );
        }
    };
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let bytes = response.bytes().await.unwrap_or_default();
    let mut out = (status, bytes).into_response();
    if let Some(ct) = content_type {
        out.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    out
}

async fn get_state(
    State(state): State<Arc<SidecarState>>,
    Path((store, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let entry = state
        .cluster
        .state
        .lock()
        .get(&format!("{store}\u{0}{key}"))
        .filter(|item| item.live())
        .cloned();
    match entry {
        None => StatusCode::NO_CONTENT.into_response(),
        Some(item) => {
            let mut response = (StatusCode::OK, axum::Json(item.value)).into_response();
            if let Ok(v) = HeaderValue::from_str(&item.etag.to_string()) {
                response.headers_mut().insert(header::ETAG, v);
            }
            response
        }
    }
}

async fn save_state(
    State(state): State<Arc<SidecarState>>,
    Path(store): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&body) else {
        return dapr_error(
            StatusCode::BAD_REQUEST,
            "ERR_MALFORMED_REQUEST",
            "expected a JSON array of state items".into(),
        );
    };
    let mut table = state.cluster.state.lock();
    // All items are checked before any is written.
    for item in &items {
        let Some(key) = item.get("key").and_then(Value::as_str) else {
            return dapr_error(
                StatusCode::BAD_REQUEST,
                "ERR_MALFORMED_REQUEST",
                "a state item needs a key".into(),
            );
        };
        let current = table
            .get(&format!("{store}\u{0}{key}"))
            .filter(|item| item.live())
            .map(|item| item.etag);
        let given = item.get("etag").and_then(Value::as_str);
        let first_write =
            item.pointer("/options/concurrency").and_then(Value::as_str) == Some("first-write");
        let conflict = match (given, current) {
            (Some(given), Some(current)) => given != current.to_string(),
            (Some(_), None) => true,
            (None, Some(_)) => first_write,
            (None, None) => false,
        };
        if conflict {
            return dapr_error(
                StatusCode::CONFLICT,
                "ERR_STATE_SAVE",
                format!("possible etag mismatch for key {key}"),
            );
        }
    }
    if table.len() > 50_000 {
        table.retain(|_, item| item.live());
    }
    for item in items {
        let key = item.get("key").and_then(Value::as_str).unwrap_or_default();
        let value = item.get("value").cloned().unwrap_or(Value::Null);
        let etag = state.cluster.etags.fetch_add(1, Ordering::Relaxed) + 1;
        let expires = item
            .pointer("/metadata/ttlInSeconds")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<u64>().ok())
            .map(|secs| std::time::Instant::now() + Duration::from_secs(secs));
        table.insert(
            format!("{store}\u{0}{key}"),
            StateItem {
                value,
                etag,
                expires,
            },
        );
    }
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(rules: &[(&str, &str)]) -> Subscription {
        Subscription {
            pubsub: "pubsub".into(),
            topic: "t".into(),
            rules: rules
                .iter()
                .map(|(m, p)| rule(m, p).expect("the rule compiles"))
                .collect(),
            dead_letter_topic: None,
        }
    }

    impl Subscription {
        fn route(&self, event: &Value) -> Result<Route, String> {
            self.route_with(|| event.clone())
        }
    }

    fn event(data: Value) -> Value {
        json!({ "specversion": "1.0", "id": "1", "source": "s", "type": "widget", "data": data })
    }

    #[test]
    fn the_first_matching_rule_wins_then_the_default() {
        let s = subscription(&[
            (r#"event.type == "widget""#, "/a"),
            ("event.data.n > 1", "/b"),
            ("", "/default"),
        ]);
        assert_eq!(s.route(&event(json!({"n": 5}))), Ok(Route::To("/a".into())));
        let gadget = json!({ "type": "gadget", "data": { "n": 5 } });
        assert_eq!(s.route(&gadget), Ok(Route::To("/b".into())));
        let small = json!({ "type": "gadget", "data": { "n": 1 } });
        assert_eq!(s.route(&small), Ok(Route::To("/default".into())));
    }

    #[test]
    fn no_match_and_no_default_is_nowhere() {
        let s = subscription(&[(r#"event.data.kind == "x""#, "/a")]);
        assert_eq!(s.route(&event(json!({"kind": "y"}))), Ok(Route::Nowhere));
    }

    #[test]
    fn json_numbers_are_doubles_and_compare_with_int_literals() {
        let s = subscription(&[
            ("event.data.n == 2", "/eq"),
            ("event.data.n == 2.5", "/half"),
        ]);
        assert_eq!(
            s.route(&event(json!({"n": 2}))),
            Ok(Route::To("/eq".into()))
        );
        assert_eq!(
            s.route(&event(json!({"n": 2.5}))),
            Ok(Route::To("/half".into()))
        );
        let typed = subscription(&[("type(event.data.n) == double", "/double")]);
        assert_eq!(
            typed.route(&event(json!({"n": 2}))),
            Ok(Route::To("/double".into()))
        );
    }

    #[test]
    fn has_guards_a_missing_field_and_a_bare_missing_field_is_an_error() {
        let guarded = subscription(&[("has(event.data.p) && event.data.p > 1", "/a")]);
        assert_eq!(guarded.route(&event(json!({}))), Ok(Route::Nowhere));
        let bare = subscription(&[("event.data.p > 1", "/a"), ("", "/default")]);
        assert!(bare.route(&event(json!({}))).is_err());
    }

    #[test]
    fn a_non_boolean_result_is_an_error() {
        let s = subscription(&[("event.data.n", "/a")]);
        assert!(s.route(&event(json!({"n": 1}))).is_err());
    }

    #[test]
    fn routes_are_read_as_daprd_reads_them() {
        let entry = json!({
            "pubsubname": "p", "topic": "t",
            "routes": { "rules": [{ "match": " event.type == \"a\" ", "path": "/a" }, { "match": "", "path": "/any" }], "default": "/d" },
        });
        let rules = subscription_rules(&entry).expect("the rules compile");
        let paths: Vec<_> = rules
            .iter()
            .map(|r| (r.source.as_str(), r.path.as_str()))
            .collect();
        assert_eq!(
            paths,
            [("event.type == \"a\"", "/a"), ("", "/any"), ("", "/d")]
        );
        let single = json!({ "pubsubname": "p", "topic": "t", "route": "/r" });
        assert_eq!(subscription_rules(&single).map(|r| r.len()), Ok(1));
        let broken = json!({ "pubsubname": "p", "topic": "t", "routes": { "rules": [{ "match": "event.type ==", "path": "/a" }] } });
        assert!(subscription_rules(&broken).is_err());
    }
}
