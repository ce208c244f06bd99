//! Property test (DESIGN §5): on 10 000 random (filter, message) pairs, what a bridge with
//! complex filters delivers equals core's reference matcher.
//!
//! 100 broadcast subscriptions with random filters and 100 random messages (every family,
//! published raw so senders, receivers and types are exactly as generated) give 10 000 pairs per
//! bridge. Alphabets are small so that matches are common. The seed is printed; set
//! `PURISTA_PROPERTY_SEED` to replay a failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use purista_conformance::Harness;
use purista_conformance::env::TestEnv;
use purista_conformance::harnesses;
use purista_conformance::runner::CASE_TIMEOUT;
use purista_conformance::support::{Collector, quiet_period};
use purista_core::stream::{FrameType, frame};
use purista_core::{
    Address, AddressFilter, Envelope, ErrorPayload, FilterSupport, MessageType, SenderAddress,
    Service, StatusCode, SubscriptionContext, SubscriptionDef, SubscriptionFilter,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const SUBSCRIPTIONS: usize = 100;
const MESSAGES: usize = 100;
const DEFAULT_SEED: u64 = 0x5eed_f117_e125;

fn pick<'a>(rng: &mut StdRng, options: &[&'a str]) -> &'a str {
    options[rng.random_range(0..options.len())]
}

/// `Some(one of options)` with probability `p`, else `None`.
fn maybe(rng: &mut StdRng, p: f64, options: &[&str]) -> Option<String> {
    rng.random_bool(p).then(|| pick(rng, options).to_string())
}

const SERVICES: &[&str] = &["s1", "s2"];
const VERSIONS: &[&str] = &["1", "2"];
const TARGETS: &[&str] = &["x", "y"];
const INSTANCES: &[&str] = &["i1", "i2"];
const EVENTS: &[&str] = &["a", "b"];
const PRINCIPALS: &[&str] = &["p1", "p2"];
const TENANTS: &[&str] = &["t1", "t2"];

fn random_address_filter(rng: &mut StdRng, p: f64) -> AddressFilter {
    AddressFilter {
        service_name: maybe(rng, p, SERVICES),
        service_version: maybe(rng, p, VERSIONS),
        service_target: maybe(rng, p, TARGETS),
        instance_id: maybe(rng, p, INSTANCES),
    }
}

fn random_filter(rng: &mut StdRng) -> SubscriptionFilter {
    let types = [
        MessageType::CustomMessage,
        MessageType::Command,
        MessageType::CommandSuccessResponse,
        MessageType::CommandErrorResponse,
        MessageType::InfoServiceReady,
        MessageType::InfoServiceInit,
    ];
    SubscriptionFilter {
        message_type: rng
            .random_bool(0.3)
            .then(|| types[rng.random_range(0..types.len())]),
        event_name: maybe(rng, 0.3, EVENTS),
        principal_id: maybe(rng, 0.25, PRINCIPALS),
        tenant_id: maybe(rng, 0.25, TENANTS),
        sender: if rng.random_bool(0.4) {
            random_address_filter(rng, 0.35)
        } else {
            AddressFilter::default()
        },
        receiver: if rng.random_bool(0.3) {
            random_address_filter(rng, 0.35)
        } else {
            AddressFilter::default()
        },
    }
}

fn random_sender(rng: &mut StdRng, target: bool) -> SenderAddress {
    SenderAddress {
        service_name: pick(rng, SERVICES).into(),
        service_version: pick(rng, VERSIONS).into(),
        service_target: if target {
            pick(rng, TARGETS).into()
        } else {
            String::new()
        },
        instance_id: pick(rng, INSTANCES).into(),
    }
}

fn random_receiver(rng: &mut StdRng) -> Address {
    Address {
        service_name: pick(rng, SERVICES).into(),
        service_version: pick(rng, VERSIONS).into(),
        service_target: pick(rng, TARGETS).into(),
        instance_id: maybe(rng, 0.6, INSTANCES),
    }
}

fn random_message(rng: &mut StdRng) -> Envelope {
    let mut m = match rng.random_range(0..10) {
        0..=3 => {
            let mut e = Envelope::custom(random_sender(rng, true), pick(rng, EVENTS), json!({}));
            if rng.random_bool(0.3) {
                e.receiver = Some(random_receiver(rng));
            }
            e
        }
        4 | 5 => Envelope::command(
            random_sender(rng, true),
            random_receiver(rng),
            json!({}),
            json!({}),
        ),
        6 => {
            let command = Envelope::command(
                random_sender(rng, true),
                random_receiver(rng),
                json!({}),
                json!({}),
            );
            let mut r = command.success_response(json!({}), maybe(rng, 0.5, EVENTS));
            r.sender.instance_id = pick(rng, INSTANCES).into();
            r
        }
        7 => {
            let command = Envelope::command(
                random_sender(rng, true),
                random_receiver(rng),
                json!({}),
                json!({}),
            );
            let error = ErrorPayload {
                status: StatusCode::CONFLICT,
                message: "no".into(),
                data: None,
                trace_id: None,
            };
            let mut r = command.error_response(&error, true);
            r.sender.instance_id = pick(rng, INSTANCES).into();
            r
        }
        8 => {
            let t = if rng.random_bool(0.5) {
                MessageType::InfoServiceReady
            } else {
                MessageType::InfoServiceInit
            };
            let mut e = Envelope::info(t, random_sender(rng, false), json!({}));
            if rng.random_bool(0.2) {
                // A receiver on an info message must not make it match a receiver filter.
                e.receiver = Some(random_receiver(rng));
            }
            e
        }
        _ => frame(
            random_sender(rng, true),
            &purista_core::ids::new_id(),
            FrameType::Chunk,
            0,
            Some(("chunk", json!(1))),
        ),
    };
    m.principal_id = maybe(rng, 0.6, PRINCIPALS);
    m.tenant_id = maybe(rng, 0.6, TENANTS);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_route_like_the_reference_matcher() {
    purista_conformance::logs::install();
    let seed = std::env::var("PURISTA_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    println!("filter property test seed: {seed} (replay with PURISTA_PROPERTY_SEED={seed})");

    for harness in harnesses::available() {
        if harness.capabilities().filters != FilterSupport::Complex {
            println!(
                "{}: event-only filters, property test not applicable",
                harness.name()
            );
            continue;
        }
        let name = harness.name();
        if let Err(why) = harness.availability().await {
            purista_conformance::env::skip_or_fail(&format!("{name}: filter property test"), &why);
            continue;
        }
        // A real broker bounds nothing by itself: a stuck one fails the test, not hangs it.
        tokio::time::timeout(
            CASE_TIMEOUT,
            routes_like_the_reference_matcher(harness, seed),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("{name}: the property test did not finish within {CASE_TIMEOUT:?}")
        });
    }
}

/// One bridge's 10 000 pairs.
async fn routes_like_the_reference_matcher(harness: Arc<dyn Harness>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let filters: Vec<SubscriptionFilter> = (0..SUBSCRIPTIONS)
        .map(|_| random_filter(&mut rng))
        .collect();
    let messages: Vec<Envelope> = (0..MESSAGES).map(|_| random_message(&mut rng)).collect();

    let mut env = TestEnv::new(&harness, 1).await;
    let Some(raw) = env.raw() else {
        println!(
            "{}: no raw publisher, property test not applicable",
            harness.name()
        );
        env.finish().await;
        return;
    };
    let received: Arc<Collector<(usize, String)>> = Collector::new();
    let mut service = Service::builder(env.name("property"), "1");
    for (i, filter) in filters.iter().enumerate() {
        let sink = received.clone();
        service = service.subscription(
            SubscriptionDef::new(
                format!("f{i:03}"),
                move |ctx: SubscriptionContext, _v: Value| {
                    let sink = sink.clone();
                    async move {
                        if let Some(e) = ctx.envelope() {
                            sink.push((i, e.id.clone()));
                        }
                        Ok(())
                    }
                },
            )
            .filter(filter.clone())
            .broadcast(),
        );
    }
    env.start(0, service).await;

    let index_of: BTreeMap<&str, usize> = messages
        .iter()
        .enumerate()
        .map(|(j, m)| (m.id.as_str(), j))
        .collect();
    let mut expected: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (i, f) in filters.iter().enumerate() {
        for (j, m) in messages.iter().enumerate() {
            if f.matches(m) {
                expected.insert((i, j));
            }
        }
    }
    println!(
        "{}: {} pairs, {} expected deliveries",
        harness.name(),
        SUBSCRIPTIONS * MESSAGES,
        expected.len()
    );
    for m in &messages {
        raw.publish(&m.encode())
            .await
            .unwrap_or_else(|e| panic!("raw publish of a valid envelope failed: {e}"));
    }
    let ours = |items: &[(usize, String)]| -> BTreeSet<(usize, usize)> {
        items
            .iter()
            .filter_map(|(i, id)| index_of.get(id.as_str()).map(|j| (*i, *j)))
            .collect()
    };
    let _ = received
        .wait_until(std::time::Duration::from_secs(30), |items| {
            ours(items).len() >= expected.len()
        })
        .await;
    quiet_period().await;
    let actual = ours(&received.snapshot());
    let describe = |(i, j): &(usize, usize)| {
        format!(
            "filter {}\n      message {}",
            serde_json::to_string(&filters[*i]).unwrap_or_default(),
            String::from_utf8_lossy(&messages[*j].encode())
        )
    };
    let missed: Vec<String> = expected.difference(&actual).map(describe).collect();
    let extra: Vec<String> = actual.difference(&expected).map(describe).collect();
    assert!(
        missed.is_empty() && extra.is_empty(),
        "{}: routing differs from the reference matcher (seed {seed}):\n  {} missed, e.g.:\n    {}\n  {} extra, e.g.:\n    {}",
        harness.name(),
        missed.len(),
        missed
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n    "),
        extra.len(),
        extra
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n    "),
    );
    env.finish().await;
}
