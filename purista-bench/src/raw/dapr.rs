//! The Dapr baseline: the same HTTP exchanges through the same sidecar double, with plain
//! `reqwest` as the client and plain axum as the app server, and none of purista.
//!
//! * `cmd-seq` / `cmd-conc`: service invocation. The caller posts the JSON payload to its own
//!   sidecar (`POST /v1.0/invoke/<app>/method/echo`); the sidecar of the echo app proxies it to
//!   the app, whose handler reads the request's JSON and writes it back (as the RabbitMQ
//!   baseline's responder does); the caller reads the reply's `seq`.
//! * `fanout`: 4 receiver apps, each with a sidecar of its own, subscribe to one topic
//!   (`GET /dapr/subscribe`); the producer publishes each event to its own sidecar
//!   (`POST /v1.0/publish/pubsub/<topic>`, the JSON payload, which Dapr wraps in a CloudEvent);
//!   each receiver reads the CloudEvent's `data.seq`, counts it and answers `SUCCESS`.
//! * `queue`: none (the Dapr bridge has no queue bridge).
//!
//! The bridge's side has one app per bridge instance. Its producer is configured as a
//! publish-only app (`events=off`), as the baseline's producer is one: its sidecar delivers it
//! no events, so both sides make 4 deliveries per event. (An app that may subscribe later is
//! subscribed to the run's one topic from its start and gets every event: that is the
//! bridge's design, and a 5th delivery per event here before `events=off` existed.)

use std::sync::Arc;

use anyhow::{Context as _, bail, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use purista::dapr::double::Sidecar;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::dapr::DoubleSidecars;
use crate::drive::{self, Progress};
use crate::measurement::Measurement;
use crate::payload;
use crate::workload::{Scenario, Workload};

const LABEL: &str = "raw-dapr";

/// How long the raw apps' sidecars may take to read their subscriptions.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// Runs `scenario` against the double's sidecars, names under `prefix`.
pub async fn run(
    scenario: Scenario,
    workload: &Workload,
    double: &DoubleSidecars,
    prefix: &str,
) -> anyhow::Result<Measurement> {
    match scenario {
        Scenario::CmdSeq | Scenario::CmdConc => commands(scenario, workload, double).await,
        Scenario::Fanout => fanout(workload, double, prefix).await,
        Scenario::Queue => bail!("no raw Dapr queue baseline"),
    }
}

/// A plain axum app server on a free loopback port.
struct App {
    port: u16,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl App {
    async fn serve(router: Router) -> anyhow::Result<App> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a raw app server")?;
        let port = listener.local_addr()?.port();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            // Small request/response pairs: without TCP_NODELAY each exchange waits for
            // delayed acknowledgements (the bridge's app server sets it too).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok(App { port, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// An app with its sidecar, pointed at each other.
struct Deployed {
    app: App,
    sidecar: Sidecar,
    app_id: String,
}

impl Deployed {
    async fn start(double: &DoubleSidecars, role: &str, router: Router) -> anyhow::Result<Self> {
        let app = App::serve(router).await?;
        let (sidecar, app_id) = double.sidecar(role)?;
        sidecar.connect_app(app.port);
        Ok(Deployed {
            app,
            sidecar,
            app_id,
        })
    }

    async fn stop(self) {
        self.app.stop().await;
        // The sidecar waits for its connections to close.
        let sidecar = self.sidecar;
        let _ = tokio::task::spawn_blocking(move || drop(sidecar)).await;
    }
}

/// Waits until every sidecar has read its app's subscriptions (the double polls for them).
async fn ready(apps: &[Deployed]) -> anyhow::Result<()> {
    let until = Instant::now() + READY_WITHIN;
    while !apps.iter().all(|a| a.sidecar.subscribed()) {
        ensure!(
            Instant::now() < until,
            "a raw app's sidecar never read its subscriptions"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The HTTP client a user would build for a sidecar on loopback.
fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
        .context("building the raw HTTP client")
}

async fn commands(
    scenario: Scenario,
    workload: &Workload,
    double: &DoubleSidecars,
) -> anyhow::Result<Measurement> {
    let echo = Router::new()
        .route("/dapr/subscribe", get(|| async { axum::Json(json!([])) }))
        .route("/echo", post(echo));
    let server = Deployed::start(double, "raw-echo", echo).await?;
    ready(std::slice::from_ref(&server)).await?;
    // The caller's own sidecar: it serves the sidecar API only (no app behind it).
    let (caller_sidecar, _) = double.sidecar("raw-caller")?;
    let url: Arc<str> = format!(
        "{}/v1.0/invoke/{}/method/echo",
        caller_sidecar.address(),
        server.app_id
    )
    .into();
    let http = client()?;
    let call = {
        move |seq: u64| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let body = serde_json::to_vec(&payload::value(seq))?;
                let response = http
                    .post(&*url)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await
                    .with_context(|| format!("invoking echo (call {seq})"))?;
                let status = response.status();
                let bytes = response.bytes().await?;
                ensure!(status.is_success(), "call {seq} answered {status}");
                let reply: Value = serde_json::from_slice(&bytes)?;
                ensure!(
                    payload::seq_of(&reply) == Some(seq),
                    "call {seq} got a wrong answer: {reply}"
                );
                Ok(())
            }
        }
    };
    let measured = drive::commands(LABEL, scenario, workload, call).await?;
    server.stop().await;
    let _ = tokio::task::spawn_blocking(move || drop(caller_sidecar)).await;
    Ok(measured)
}

async fn fanout(
    workload: &Workload,
    double: &DoubleSidecars,
    prefix: &str,
) -> anyhow::Result<Measurement> {
    let topic = format!("{prefix}.raw.tick");
    let delivered = Progress::new();
    let subscribers = workload.fanout_subscribers;
    let mut receivers = Vec::new();
    for i in 0..subscribers {
        let subscription = json!([{ "pubsubname": "pubsub", "topic": topic, "route": "/tick" }]);
        let receiver = Router::new()
            .route(
                "/dapr/subscribe",
                get(move || async move { axum::Json(subscription) }),
            )
            .route("/tick", post(tick))
            .with_state(delivered.clone());
        receivers.push(Deployed::start(double, &format!("raw-receiver-{i}"), receiver).await?);
    }
    ready(&receivers).await?;
    let (producer_sidecar, _) = double.sidecar("raw-producer")?;
    let url = format!("{}/v1.0/publish/pubsub/{topic}", producer_sidecar.address());
    let http = client()?;
    let emit_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            let body = serde_json::to_vec(&payload::value(seq))?;
            let response = http
                .post(&url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .with_context(|| format!("publishing event {seq}"))?;
            let status = response.status();
            ensure!(status.is_success(), "publishing event {seq}: {status}");
        }
        Ok(())
    };
    let (ops, elapsed) = drive::fanout_rounds!(delivered, workload, subscribers, emit_all);
    let events = workload.fanout_events;
    for receiver in receivers {
        receiver.stop().await;
    }
    let _ = tokio::task::spawn_blocking(move || drop(producer_sidecar)).await;
    Ok(Measurement::new(LABEL, Scenario::Fanout, ops, elapsed)
        .with_note(format!("{events} events × {subscribers} receiver apps")))
}

/// The echo app's handler: looks at the request, as a handler would, and answers with it (as
/// the RabbitMQ baseline's responder does: JSON read and written, not bytes passed through).
async fn echo(body: Bytes) -> axum::response::Response {
    match serde_json::from_slice::<Value>(&body) {
        Ok(request) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&request).unwrap_or_default(),
        )
            .into_response(),
        Err(_) => axum::http::StatusCode::BAD_REQUEST.into_response(),
    }
}

/// A receiver's delivery: the CloudEvent's `data` is the payload; counted when it has a `seq`.
async fn tick(State(delivered): State<Arc<Progress>>, body: Bytes) -> impl IntoResponse {
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if event.get("data").and_then(payload::seq_of).is_some() {
        delivered.add_one();
        axum::Json(json!({ "status": "SUCCESS" }))
    } else {
        // Redelivering bytes without a payload cannot help.
        axum::Json(json!({ "status": "DROP" }))
    }
}
