//! The filter property: on 10 000 random (filter, message) pairs, what the sidecar double's
//! CEL routing delivers with the rules [`cel_match`] makes is exactly what core's reference
//! matcher says.
//!
//! The pairs are a cross product: 50 apps, each behind its own sidecar (its own consumer
//! group) and announcing one routing rule made from a random filter (half of them made from one
//! of the messages, so that matches are common), and 200 random messages published as the
//! bridge publishes them (structured CloudEvents whose `data` is the envelope) — every message
//! meets every rule, so 10 000 routing decisions are taken by the double's CEL implementation
//! with 200 publishes. Each app must then have received exactly the messages the reference
//! matcher gives its filter, each once, and no rule may have failed to evaluate. Core's filter
//! table (named edge cases) runs the same way.
//!
//! Values come from a pool made to break naive rules: empty strings, spaces, quotes and
//! backslashes, prefixes of one another, case differences, non-ASCII, CEL keywords.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use parking_lot::Mutex;
use purista_bridge_dapr::cloudevent::{self, CLOUDEVENT_CONTENT_TYPE};
use purista_bridge_dapr::double::{DaprDouble, DoubleOptions, SidecarOptions};
use purista_bridge_dapr::routing::cel_match;
use purista_core::filter::filter_table;
use purista_core::{Envelope, SubscriptionFilter};
use purista_test_runner::filters::{PairGen, copy_from_message, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const RULES: usize = 50;
const MESSAGES: usize = 200;
const PUBSUB: &str = "pubsub";
const TOPIC: &str = "purista.messages";

fn pool() -> Vec<String> {
    [
        "a",
        "b",
        "A",
        "orders",
        "orders-v2",
        "1",
        "1.0",
        "",
        " ",
        "a b",
        "\"q\"",
        "x\\y",
        "[1]",
        "{}",
        "ü",
        "*",
        "prefix",
        "prefix-longer",
        "null",
        "true",
        "0",
        "'s'",
        "\n",
        "in",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn pairs() -> PairGen {
    PairGen::new(pool())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_filters_route_through_the_doubles_cel_like_the_reference_matcher() {
    let mut rng = StdRng::seed_from_u64(seed("dapr"));
    let pairs = pairs();
    let messages: Vec<Envelope> = (0..MESSAGES).map(|_| pairs.message(&mut rng)).collect();
    // Half the filters are made from a message (some with one field drawn again), so every
    // app has something to receive and near misses are tried.
    let filters: Vec<SubscriptionFilter> = (0..RULES)
        .map(|i| {
            let mut f = pairs.filter(&mut rng);
            if i % 2 == 0 {
                copy_from_message(&mut f, &messages[rng.random_range(0..MESSAGES)]);
                if rng.random_bool(0.3) {
                    f.principal_id = pairs.maybe(&mut rng);
                }
            }
            f
        })
        .collect();
    let matched = route_and_compare(&filters, messages).await;
    assert!(
        matched > RULES / 4,
        "too few matching pairs ({matched}) to prove anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_filter_table_routes_through_the_doubles_cel_as_expected() {
    let cases = filter_table();
    for case in &cases {
        assert_eq!(
            case.filter.matches(&case.message),
            case.expected,
            "{}",
            case.name
        );
    }
    let filters: Vec<SubscriptionFilter> = cases.iter().map(|c| c.filter.clone()).collect();
    let messages: Vec<Envelope> = cases.iter().map(|c| c.message.clone()).collect();
    route_and_compare(&filters, messages).await;
}

/// What one app received: CloudEvent ids, with their count.
type Received = Arc<Mutex<HashMap<String, usize>>>;

/// An app that announces one subscription with `rule` and records what it is delivered.
async fn app(rule: String, received: Received) -> u16 {
    let subscription = json!([{
        "pubsubname": PUBSUB,
        "topic": TOPIC,
        "routes": { "rules": [{ "match": rule, "path": "/matched" }] },
    }]);
    let router = Router::new()
        .route(
            "/dapr/subscribe",
            get(move || {
                let subscription = subscription.clone();
                async move { axum::Json(subscription) }
            }),
        )
        .route(
            "/matched",
            post(|State(received): State<Received>, body: Bytes| async move {
                let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let id = event["id"].as_str().unwrap_or_default().to_string();
                *received.lock().entry(id).or_default() += 1;
                axum::Json(json!({ "status": "SUCCESS" }))
            }),
        )
        .with_state(received);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    port
}

/// One app and sidecar per filter, every message published once; each app must receive
/// exactly what the reference matcher selects for its filter. Returns the matching pairs.
async fn route_and_compare(filters: &[SubscriptionFilter], mut messages: Vec<Envelope>) -> usize {
    for m in &mut messages {
        m.id = purista_core::ids::new_id();
    }
    let double = DaprDouble::start(DoubleOptions::default()).expect("the double starts");
    let mut apps = Vec::new();
    for (i, filter) in filters.iter().enumerate() {
        let received: Received = Arc::default();
        let port = app(cel_match(filter), received.clone()).await;
        let sidecar = double
            .sidecar(SidecarOptions {
                app_id: format!("rule-{i}"),
                ..SidecarOptions::default()
            })
            .expect("a sidecar starts");
        sidecar.connect_app(port);
        apps.push((sidecar, received));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !apps.iter().all(|(s, _)| s.subscribed()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a sidecar did not read its app's subscription (does its rule compile?)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let publisher = double
        .sidecar(SidecarOptions {
            app_id: "publisher".into(),
            ..SidecarOptions::default()
        })
        .expect("a sidecar starts");
    let client = reqwest::Client::new();
    let url = format!("{}/v1.0/publish/{PUBSUB}/{TOPIC}", publisher.address());
    for m in &messages {
        let body = cloudevent::wrap(m, &m.encode(), "property").expect("the CloudEvent");
        let status = client
            .post(&url)
            .header("content-type", CLOUDEVENT_CONTENT_TYPE)
            .body(body)
            .send()
            .await
            .expect("the publish")
            .status();
        assert!(status.is_success(), "publish answered {status}");
    }
    // Every (filter, message) pair is decided: delivered, not routed, or given up.
    let pairs = (filters.len() * messages.len()) as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while double.delivered() + double.unrouted() + double.given_up() < pairs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {pairs} routing decisions after 30 s",
            double.delivered() + double.unrouted() + double.given_up()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        double.given_up(),
        0,
        "a rule failed to evaluate on a PURISTA CloudEvent"
    );
    let mut matched = 0;
    for (i, (filter, (_, received))) in filters.iter().zip(&apps).enumerate() {
        let expected: HashSet<String> = messages
            .iter()
            .filter(|m| filter.matches(m))
            .map(|m| m.id.clone())
            .collect();
        let got = received.lock().clone();
        matched += expected.len();
        let got_ids: HashSet<String> = got.keys().cloned().collect();
        assert_eq!(
            got_ids,
            expected,
            "app {i} with filter {filter:?} (rule {}) received other messages than the reference matcher selects",
            cel_match(filter)
        );
        assert!(
            got.values().all(|n| *n == 1),
            "app {i} got a message twice: {got:?}"
        );
    }
    matched
}
