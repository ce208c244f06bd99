//! [`DaprBridge`]: the [`EventBridge`] on a Dapr sidecar.
//!
//! * Messages (events, info, responses) are published as structured CloudEvents on one topic,
//!   `<prefix>.messages`, of the pub/sub component. Dapr delivers each once per consumer group
//!   (by default the app id) to the app server, which hands it to every local subscription
//!   whose filter matches.
//! * Commands travel by service invocation to an app that serves them. Which apps serve an
//!   endpoint is kept in the state store (one key per endpoint, a list of app ids, written with
//!   first-write concurrency), so a caller needs no configuration per service.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use purista_core::kit::{self, endpoint_label};
use purista_core::{
    Address, BridgeCounters, BridgeError, BridgeHealth, Capabilities, CommandHandler,
    DeadLetterEntry, DeliveryGuarantee, DeliveryHandler, DrainReport, Envelope, EventBridge,
    FilterSupport, InFlight, PausedConsumer, RegistrationKey, ReplayReport, StreamConsumerEnd,
    StreamHandler, SubscriptionOperator, SubscriptionSpec, WorkKind,
};
use rand::Rng;
use serde_json::Value;
use tokio::sync::{OnceCell, watch};
use tokio::time::Instant;

use crate::app::{self, COMMAND_METHOD};
use crate::cloudevent;
use crate::config::DaprConfig;
use crate::copies;
use crate::shared::Shared;
use crate::sidecar::{InvokeFailure, Sidecar};
use crate::subscriptions::Consumer;

/// How long past the caller's ttl an invocation's request stays open, so that a late response
/// is seen (and ignored with a warning) rather than cut off.
const LATE_RESPONSE_GRACE: Duration = Duration::from_secs(30);

/// Apps an invocation tries at most when one does not serve the endpoint (any more).
const MAX_APPS_TRIED: usize = 3;

/// The bridge's name in capabilities and the matrix.
pub const BRIDGE_NAME: &str = "dapr";

/// What the bridge provides on Dapr (each line proven by the conformance suite; everything
/// else is refused by the strict check).
///
/// * Broadcast and shared: Dapr delivers a topic message once per consumer group, which is
///   the app id unless the component sets `consumerID`. The bridge expects each instance to be
///   its own consumer group (its own app id, or `consumerID: "{podName}"`), so every instance
///   gets every message:
///   broadcast subscriptions run on each; a shared subscription runs on the one instance
///   whose claim of the message in the state store is first (see [`crate::subscriptions`]
///   and [`DaprConfig::consumer`]). Instances sharing one
///   consumer group would split the messages of *every* subscription, broadcast ones included.
/// * Filters: every filter of DESIGN §3.3, matched by the app server with core's matcher.
/// * Subscriptions are at least once, with manual ack: the sidecar gets its answer to a
///   delivery only once every matching subscription has settled it, so a delivery the app
///   never answered (the app server restarted, the handler's task was cut off) is delivered
///   again by the sidecar. A handler may run more than once for one message.
/// * Bounded and delayed retry, in the bridge, with the subscription's own `max_attempts` and
///   `retry_delay_ms`: a retry is a copy of the message for that one subscription published
///   on the topic with the attempt and its earliest start as CloudEvent extensions, so the
///   count lives in the broker, not in the app's memory, and survives a restart. Dapr's
///   `RETRY` status is not used for this: it redelivers the whole event to every matching
///   subscription and carries no attempt count, and its count and delay are the deployment's
///   resiliency policy, not the subscription's. The resiliency policy still governs what the
///   bridge answers `RETRY` (a copy the sidecar refused, a failed claim).
/// * Dead letters: on the pub/sub component's dead-letter topic `<prefix>.dead-letters`, also
///   the app subscription's `deadLetterTopic` (see [`crate::dead_letters`]); inspect, replay
///   and purge work on what the apps recorded from it.
/// * Pause/resume is not provided: holding a delivery open while paused ties up the
///   sidecar's deliveries, and answering `RETRY` while paused is a retry loop.
/// * An app configured with `events=off` ([`DaprConfig::receive_events`]) is not subscribed
///   to the events topic and declares no subscriptions (neither shared nor broadcast), so the
///   strict check refuses a service that has one.
pub fn capabilities(config: &DaprConfig) -> Capabilities {
    let mut caps = Capabilities::none(BRIDGE_NAME);
    caps.commands = true;
    caps.filters = FilterSupport::Complex;
    caps.shared_subscriptions = config.receive_events;
    caps.broadcast_subscriptions = config.receive_events;
    caps.manual_ack = true;
    caps.bounded_retry = true;
    caps.delayed_retry = true;
    caps.dead_letter = true;
    caps.command_delivery = DeliveryGuarantee::AtMostOnce;
    caps.subscription_delivery = DeliveryGuarantee::AtLeastOnce;
    caps.limits.max_payload_bytes = Some(config.max_payload_bytes);
    caps
}

/// One bridge instance on a Dapr sidecar.
pub struct DaprBridge {
    shared: Arc<Shared>,
    capabilities: Capabilities,
    listener: parking_lot::Mutex<Option<std::net::TcpListener>>,
    app_port: u16,
    endpoints: crate::endpoints::EndpointCache,
    stop_server: watch::Sender<bool>,
    started: OnceCell<()>,
    drained: OnceCell<DrainReport>,
}

impl std::fmt::Debug for DaprBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaprBridge")
            .field("instance_id", &self.shared.instance_id)
            .field("config", &self.shared.config)
            .field("app_port", &self.app_port)
            .finish_non_exhaustive()
    }
}

/// Characters of a state key part kept as they are; others are escaped. A key travels in the
/// path of `GET /v1.0/state/<store>/<key>`, so the characters a URL path gives a meaning
/// (`/`, `?`, `#`, `%`) are escaped too, the same way (`~` and two hex digits): a
/// registration key `svc@1/sub` unescaped made the read of a claim a 404.
pub(crate) fn key_part(raw: &str) -> String {
    let mut part = String::with_capacity(raw.len());
    push_key_part(&mut part, raw);
    part
}

/// [`key_part`], written at the end of `out`.
fn push_key_part(out: &mut String, raw: &str) {
    // Most names are letters, digits, `-`, `_` and `.`, which both steps below keep as they
    // are: every invocation computes its endpoint's key, so that case skips them.
    if raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        out.push_str(raw);
    } else {
        out.push_str(&escaped_key_part(raw));
    }
}

/// [`key_part`] without its shortcut for plain names.
fn escaped_key_part(raw: &str) -> String {
    let escaped = kit::NameRules::permissive('|', '~', 1024).component(raw);
    let mut out = String::with_capacity(escaped.len());
    for c in escaped.chars() {
        match c {
            '/' => out.push_str("~2f"),
            '?' => out.push_str("~3f"),
            '#' => out.push_str("~23"),
            '%' => out.push_str("~25"),
            c => out.push(c),
        }
    }
    out
}

impl DaprBridge {
    /// A bridge instance for `config`. Binds the app server's port at once (so that
    /// [`DaprBridge::app_port`] is known before the sidecar is pointed at it); serving and
    /// talking to the sidecar begin with [`EventBridge::start`].
    pub fn new(config: DaprConfig) -> Result<Self, BridgeError> {
        config
            .validate()
            .map_err(|e| BridgeError::InvalidRequest(e.to_string()))?;
        let listener = crate::listen(&config.app_host, config.app_port).map_err(|e| {
            BridgeError::Unavailable(format!(
                "the app server cannot listen on {}:{}: {e}",
                config.app_host, config.app_port
            ))
        })?;
        let app_port = listener
            .local_addr()
            .map_err(|e| BridgeError::Unavailable(format!("app server socket: {e}")))?
            .port();
        let sidecar = Sidecar::new(&config.sidecar, config.api_token.clone())?;
        let capabilities = capabilities(&config);
        let (stop_server, _) = watch::channel(false);
        Ok(DaprBridge {
            shared: Shared::new(config, purista_core::ids::new_id(), sidecar),
            capabilities,
            listener: parking_lot::Mutex::new(Some(listener)),
            app_port,
            endpoints: crate::endpoints::EndpointCache::default(),
            stop_server,
            started: OnceCell::new(),
            drained: OnceCell::new(),
        })
    }

    /// The port the app server listens on (the app port the sidecar must be given).
    pub fn app_port(&self) -> u16 {
        self.app_port
    }

    /// The topic every message travels on.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The settings.
    pub fn config(&self) -> &DaprConfig {
        &self.shared.config
    }

    fn endpoint_key(&self, address: &Address) -> String {
        let prefix = &self.shared.config.prefix;
        let parts = [
            &address.service_name,
            &address.service_version,
            &address.service_target,
        ];
        let mut key = String::with_capacity(
            prefix.len() + 7 + parts.iter().map(|p| p.len() + 2).sum::<usize>(),
        );
        key.push_str(prefix);
        key.push_str("||cmd");
        for part in parts {
            key.push_str("||");
            push_key_part(&mut key, part);
        }
        key
    }

    /// Adds (`add = true`) or removes this app id in the endpoint's list in the state store.
    async fn update_endpoint(&self, address: &Address, add: bool) -> Result<(), BridgeError> {
        let me = Value::String(self.shared.config.app_id.clone());
        self.shared
            .update_list(&self.endpoint_key(address), |apps| {
                let present = apps.contains(&me);
                if present == add {
                    return false;
                }
                if add {
                    apps.push(me.clone());
                } else {
                    apps.retain(|a| *a != me);
                }
                true
            })
            .await
    }

    /// One invocation through the sidecar. The request runs in a task of its own: past the
    /// ttl the caller gets its 504 at once, and a response that still comes is ignored with a
    /// warning naming its correlation id.
    async fn attempt(
        &self,
        app_id: &str,
        body: axum::body::Bytes,
        correlation: &str,
        deadline: Instant,
        ttl: Duration,
    ) -> Result<crate::sidecar::Invoked, BridgeError> {
        let timeout = || BridgeError::Timeout(kit::millis(ttl));
        let within = deadline.saturating_duration_since(Instant::now()) + LATE_RESPONSE_GRACE;
        let shared = self.shared.clone();
        let app = app_id.to_string();
        // Boxed, so that a request still open at the ttl can be handed to a task of its own,
        // which waits for the late answer (and warns about it) while the caller hears 504.
        let mut request = Box::pin(async move {
            shared
                .sidecar
                .invoke(&app, COMMAND_METHOD, body, within)
                .await
        });
        let answered = tokio::select! {
            answered = &mut request => answered,
            () = tokio::time::sleep_until(deadline) => {
                let shared = self.shared.clone();
                let (app_id, correlation) = (app_id.to_string(), correlation.to_string());
                tokio::spawn(async move {
                    if let Ok(late) = request.await
                        && late.status == StatusCode::OK
                    {
                        shared.count_late_response();
                        tracing::warn!(
                            correlation_id = %correlation,
                            app_id = %app_id,
                            "ignored a command response that came after its caller's ttl"
                        );
                    }
                });
                return Err(timeout());
            }
        };
        match answered {
            Ok(invoked) => Ok(invoked),
            Err(InvokeFailure::Timeout) => Err(timeout()),
            Err(InvokeFailure::Unreachable(e)) => Err(e),
        }
    }

    async fn drain(&self, deadline: Instant) -> DrainReport {
        let started = Instant::now();
        let shared = &self.shared;
        // Leave the registry first, so callers stop choosing this app for new commands.
        let addresses: Vec<String> = shared.commands.read().keys().cloned().collect();
        let _ = tokio::time::timeout_at(
            deadline,
            futures::future::join_all(addresses.iter().filter_map(|label| {
                parse_label(label).map(|a| async move {
                    let _ = self.update_endpoint(&a, false).await;
                })
            })),
        )
        .await;
        let watching: Vec<SubscriptionSpec> = shared
            .consumers
            .read()
            .values()
            .filter(|c| copies::wants_copies(&c.spec.filter))
            .map(|c| c.spec.clone())
            .collect();
        let _ = tokio::time::timeout_at(
            deadline,
            futures::future::join_all(
                watching
                    .iter()
                    .map(|spec| copies::announce(shared, spec, false)),
            ),
        )
        .await;
        shared
            .closing
            .store(true, std::sync::atomic::Ordering::Release);
        let idle = shared.tracker.wait_idle(deadline).await;
        let still_running = if idle {
            Vec::new()
        } else {
            shared.tracker.running()
        };
        shared.tasks.close();
        let tasks_done = shared.tasks.wait_empty(deadline).await;
        shared.tasks.abort_all();
        let _ = self.stop_server.send(true);
        DrainReport {
            completed: idle && tasks_done,
            still_running,
            rejected_invocations: 0,
            waited_ms: kit::millis(started.elapsed()),
        }
    }
}

/// `service@version/target` back into an address (labels are made by `endpoint_label`).
fn parse_label(label: &str) -> Option<Address> {
    let (service, rest) = label.split_once('@')?;
    let (version, target) = rest.split_once('/')?;
    Some(Address::new(service, version, target))
}

#[async_trait]
impl SubscriptionOperator for DaprBridge {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        Vec::new()
    }

    async fn resume_subscription_consumer(
        &self,
        _key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        Ok(false)
    }

    async fn inspect_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetterEntry>, BridgeError> {
        crate::dead_letters::inspect(&self.shared, target, limit).await
    }

    async fn replay_dead_letters(
        &self,
        target: &str,
        limit: usize,
    ) -> Result<ReplayReport, BridgeError> {
        crate::dead_letters::replay(&self.shared, target, limit).await
    }

    async fn purge_dead_letters(&self, target: &str) -> Result<usize, BridgeError> {
        crate::dead_letters::purge(&self.shared, target).await
    }
}

#[async_trait]
impl EventBridge for DaprBridge {
    fn name(&self) -> &str {
        BRIDGE_NAME
    }

    fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn default_command_timeout(&self) -> Duration {
        self.shared.config.default_command_timeout
    }

    /// Serves the app server, waits until the sidecar answers its health check and has read
    /// the app's subscriptions (at most the connect timeout). Idempotent.
    async fn start(&self) -> Result<(), BridgeError> {
        if self.shared.is_closing() {
            return Err(BridgeError::Unavailable("the bridge was shut down".into()));
        }
        self.started
            .get_or_try_init(|| async {
                let listener = self.listener.lock().take().ok_or_else(|| {
                    BridgeError::Unavailable("the app server socket is gone".into())
                })?;
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| BridgeError::Unavailable(format!("app server socket: {e}")))?;
                let router = app::router(self.shared.clone());
                let _ = self.shared.serving_since.set(Instant::now());
                let mut stop = self.stop_server.subscribe();
                tokio::spawn(async move {
                    let served = axum::serve(
                        axum::serve::ListenerExt::tap_io(listener, |tcp| {
                            let _ = tcp.set_nodelay(true);
                        }),
                        router,
                    )
                        .with_graceful_shutdown(async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "the Dapr app server stopped");
                    }
                });
                let shared = &self.shared;
                let deadline = Instant::now() + shared.config.connect_timeout;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match shared
                        .sidecar
                        .healthz(left.min(shared.config.call_timeout))
                        .await
                    {
                        Ok(()) => {
                            let meta = shared.sidecar.metadata(shared.config.call_timeout).await?;
                            if meta.app_id != shared.config.app_id {
                                tracing::warn!(sidecar_app_id = %meta.app_id, configured_app_id = %shared.config.app_id, "the sidecar serves another app id than the bridge is configured with");
                            }
                            break;
                        }
                        Err(e) if Instant::now() >= deadline => {
                            return Err(BridgeError::Unavailable(format!(
                                "the Dapr sidecar at {} does not answer: {e}",
                                shared.config.sidecar
                            )));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                // The sidecar reads /dapr/subscribe once the app port is open; messages
                // published before that would not reach this app.
                loop {
                    let read = shared.subscribe_read.notified();
                    if shared
                        .subscribe_read_once
                        .load(std::sync::atomic::Ordering::Acquire)
                    {
                        break;
                    }
                    if tokio::time::timeout_at(deadline, read).await.is_err() {
                        return Err(BridgeError::Unavailable(format!(
                            "the Dapr sidecar at {} did not read the app's subscriptions from port {} within {} ms",
                            shared.config.sidecar,
                            self.app_port,
                            kit::millis(shared.config.connect_timeout)
                        )));
                    }
                }
                // Reading the subscriptions is not yet subscribing: the sidecar subscribes to
                // the broker after it has the answer, and a message published in between does
                // not reach this app. The metadata lists the topic once it is subscribed.
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let meta = shared
                        .sidecar
                        .metadata(left.min(shared.config.call_timeout))
                        .await;
                    if let Ok(meta) = &meta
                        && meta.subscribed(&shared.config.pubsub, &shared.subscribed_topic())
                    {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        let why = match meta {
                            Ok(_) => "it does not list the app's subscription".to_string(),
                            Err(e) => e.to_string(),
                        };
                        return Err(BridgeError::Unavailable(format!(
                            "the Dapr sidecar at {} did not subscribe the app to topic {} of {} within {} ms: {why}",
                            shared.config.sidecar,
                            shared.subscribed_topic(),
                            shared.config.pubsub,
                            kit::millis(shared.config.connect_timeout)
                        )));
                    }
                    // Dapr has no notification for this: ask again shortly.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .map(|_| ())
    }

    async fn health(&self) -> BridgeHealth {
        if self.shared.is_closing() {
            return BridgeHealth::Unhealthy {
                reason: "the bridge is shut down".into(),
            };
        }
        if self.started.get().is_none() {
            return BridgeHealth::Unhealthy {
                reason: "the bridge is not started".into(),
            };
        }
        match self.shared.sidecar.healthz(Duration::from_secs(2)).await {
            Ok(()) => BridgeHealth::Healthy,
            Err(e) => BridgeHealth::Unhealthy {
                reason: e.to_string(),
            },
        }
    }

    async fn emit(&self, mut message: Envelope) -> Result<(), BridgeError> {
        let shared = &self.shared;
        if shared.is_closing() {
            return Err(BridgeError::Unavailable("the bridge is shut down".into()));
        }
        kit::check_emittable(&message)?;
        kit::stamp(&mut message, &shared.instance_id);
        let encoded = message.encode();
        kit::check_body(encoded.len(), &self.capabilities.limits)?;
        let event = cloudevent::wrap(&message, &encoded, &shared.config.app_id)
            .map_err(BridgeError::InvalidRequest)?;
        shared
            .sidecar
            .publish(
                &shared.config.pubsub,
                &shared.topic,
                event,
                shared.config.call_timeout,
            )
            .await
    }

    async fn invoke(&self, mut command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError> {
        let shared = &self.shared;
        if shared.is_closing() {
            return Err(BridgeError::Unavailable("the bridge is shut down".into()));
        }
        let deadline = kit::deadline_after(ttl);
        let receiver = kit::check_command(&command)?;
        let label: Arc<str> = endpoint_label(receiver).into();
        let key = self.endpoint_key(receiver);
        kit::stamp(&mut command, &shared.instance_id);
        kit::correlation_id(&mut command);
        let body = axum::body::Bytes::from(command.encode());
        kit::check_body(body.len(), &self.capabilities.limits)?;
        let _pending = shared.tracker.start(WorkKind::Command, &label);
        let timeout = || BridgeError::Timeout(kit::millis(ttl));
        let left = || deadline.saturating_duration_since(Instant::now());
        let correlation = command.correlation_id.clone().unwrap_or_default();
        // An app that answers 404 (it no longer serves the endpoint), 503 (it is shutting
        // down) or that Dapr cannot reach did not run the command: another is tried, with a
        // fresh list of apps.
        let mut last = BridgeError::NoHandler(label.to_string());
        for _ in 0..MAX_APPS_TRIED {
            let apps = match tokio::time::timeout_at(deadline, self.endpoints.lookup(shared, &key))
                .await
            {
                Err(_) => return Err(timeout()),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(apps)) => apps,
            };
            if apps.is_empty() {
                return Err(BridgeError::NoHandler(label.to_string()));
            }
            let app_id = apps[rand::rng().random_range(0..apps.len())].clone();
            if left().is_zero() {
                return Err(timeout());
            }
            let invoked = self
                .attempt(&app_id, body.clone(), &correlation, deadline, ttl)
                .await?;
            match invoked.status {
                StatusCode::OK => {
                    return Envelope::decode_with_limit(&invoked.body, usize::MAX).map_err(|e| {
                        BridgeError::Broker(format!(
                            "the response of {label} is not an envelope: {e}"
                        ))
                    });
                }
                StatusCode::NOT_FOUND => {
                    last = BridgeError::NoHandler(label.to_string());
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    last = BridgeError::Unavailable(format!(
                        "the app serving {label} is shutting down"
                    ));
                }
                StatusCode::PAYLOAD_TOO_LARGE => {
                    return Err(BridgeError::InvalidRequest(format!(
                        "the app serving {label} refused the command's size"
                    )));
                }
                status => {
                    let text = String::from_utf8_lossy(&invoked.body);
                    if !text.contains("ERR_DIRECT_INVOKE") {
                        return Err(BridgeError::Broker(format!(
                            "invoking {label} on app {app_id} failed with {status}"
                        )));
                    }
                    last =
                        BridgeError::NoHandler(format!("{label}: Dapr cannot reach app {app_id}"));
                }
            }
            self.endpoints.forget(&key);
        }
        Err(last)
    }

    async fn register_command(
        &self,
        address: Address,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError> {
        let label = endpoint_label(&address);
        {
            let mut commands = self.shared.commands.write();
            if commands.contains_key(&label) {
                return Err(BridgeError::AlreadyRegistered(label));
            }
            commands.insert(label.clone(), handler);
        }
        if let Err(e) = self.update_endpoint(&address, true).await {
            self.shared.commands.write().remove(&label);
            return Err(e);
        }
        Ok(())
    }

    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        let label = endpoint_label(address);
        if self.shared.commands.read().contains_key(&label) {
            self.update_endpoint(address, false).await?;
            self.shared.commands.write().remove(&label);
        }
        Ok(())
    }

    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        if spec.durable {
            return Err(BridgeError::Unsupported(
                "durable subscriptions on the dapr bridge".into(),
            ));
        }
        if !self.shared.config.receive_events {
            return Err(BridgeError::Unsupported(format!(
                "subscription {}: this Dapr app is configured with events=off, so the sidecar delivers it no events",
                spec.key
            )));
        }
        if self.shared.consumers.read().contains_key(&spec.key) {
            return Err(BridgeError::AlreadyRegistered(spec.key.to_string()));
        }
        if copies::wants_copies(&spec.filter) {
            copies::announce(&self.shared, &spec, true).await?;
            copies::settle_after_adding().await;
        }
        let mut consumers = self.shared.consumers.write();
        if consumers.contains_key(&spec.key) {
            return Err(BridgeError::AlreadyRegistered(spec.key.to_string()));
        }
        self.shared.leaving.write().remove(&spec.key);
        let consumer = Consumer::new(&self.shared, spec, handler);
        consumers.insert(consumer.spec.key.clone(), consumer);
        Ok(())
    }

    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        let consumer = self.shared.consumers.write().remove(key);
        if let Some(c) = &consumer
            && c.spec.shared
        {
            self.shared
                .leaving
                .write()
                .insert(c.spec.key.clone(), c.spec.clone());
            // What the sidecar still delivers to this app for the subscription is handed on to
            // the instances that hold it; return once that has gone quiet.
            let give_up = Instant::now() + crate::subscriptions::HANDOVER_MAX_WAIT;
            while Instant::now() < give_up
                && tokio::time::timeout(
                    crate::subscriptions::HANDOVER_QUIET,
                    self.shared.handed_on.notified(),
                )
                .await
                .is_ok()
            {}
        }
        if let Some(c) = consumer
            && copies::wants_copies(&c.spec.filter)
        {
            copies::announce(&self.shared, &c.spec, false).await?;
        }
        Ok(())
    }

    async fn register_stream(
        &self,
        _address: Address,
        _handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        Err(BridgeError::Unsupported(
            "streams on the dapr bridge".into(),
        ))
    }

    async fn unregister_stream(&self, _address: &Address) -> Result<(), BridgeError> {
        Ok(())
    }

    async fn open_stream(&self, _open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        Err(BridgeError::Unsupported(
            "streams on the dapr bridge".into(),
        ))
    }

    fn in_flight(&self) -> InFlight {
        self.shared.tracker.snapshot()
    }

    fn counters(&self) -> BridgeCounters {
        self.shared.counters()
    }

    async fn shutdown(&self, deadline: Instant) -> DrainReport {
        self.drained
            .get_or_init(|| self.drain(deadline))
            .await
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_key_parts_carry_no_url_path_characters_and_stay_distinct() {
        let part = key_part("svc@1/sub?x#y%z");
        assert!(
            !part.contains(['/', '?', '#', '%']),
            "a key part keeps a URL path character: {part}"
        );
        assert_ne!(key_part("a/b"), key_part("a~2fb"));
        assert_ne!(key_part("a/b"), key_part("a|b"));
        assert_eq!(key_part("orders"), "orders");
    }

    #[test]
    fn a_plain_name_makes_the_key_part_the_escaping_makes() {
        for name in [
            "orders",
            "Orders-v2.1_x",
            "0",
            "",
            "a.b.c",
            "UPPER_lower-09",
        ] {
            assert_eq!(key_part(name), escaped_key_part(name), "{name}");
        }
        assert_eq!(key_part("a~b"), escaped_key_part("a~b"));
        assert_ne!(
            key_part("a~b"),
            "a~b",
            "the escape character itself is escaped"
        );
    }
}
