//! The filter property: on 10 000 random (filter, message) pairs, what EventBridge routes with
//! the bridge's event pattern ([`event_pattern`]) through real rules into real SQS queues is
//! exactly what core's reference matcher says.
//!
//! The pairs are a cross product: 50 rules with random filters (half of them made from one of
//! the messages, so that matches are common) on one bus, each with its own queue, and 200
//! random messages put on the bus — every message meets every rule, so 10 000 pairs are
//! decided by EventBridge (moto's, which does not implement `TestEventPattern`) with only 20
//! `PutEvents` calls. Each queue must then hold exactly the messages the reference matcher
//! gives its filter, each once. Core's filter table (named edge cases) runs the same way.
//!
//! Values come from a pool made to break naive patterns: empty strings, spaces, JSON-special
//! characters, prefixes of one another, case differences, non-ASCII.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use purista_bridge_aws::aws_sdk_eventbridge::types::PutEventsRequestEntry;
use purista_bridge_aws::{AwsBridge, event_pattern};
use purista_core::filter::filter_table;
use purista_core::{Envelope, EventBridge, MessageType, SubscriptionFilter};
use purista_test_runner::filters::{PairGen, copy_from_message, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

common::runner::test_main! {
    common::ENDPOINT: [
        random_filters_route_through_real_rules_like_the_reference_matcher,
        core_filter_table_routes_through_real_rules_as_expected,
    ],
}

const RULES: usize = 50;
const MESSAGES: usize = 200;

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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Message types the bridge puts on the bus (stream frames never go there).
fn bus_types() -> Vec<MessageType> {
    MessageType::ALL
        .into_iter()
        .filter(|t| *t != MessageType::Stream)
        .collect()
}

fn pairs() -> PairGen {
    PairGen::new(pool()).types(bus_types())
}

async fn bridge(endpoint: &str) -> AwsBridge {
    let bridge = AwsBridge::new(common::config(endpoint, &common::prefix()))
        .await
        .unwrap();
    bridge.start().await.unwrap();
    bridge
}

async fn random_filters_route_through_real_rules_like_the_reference_matcher() {
    let endpoint = common::endpoint();
    let mut rng = StdRng::seed_from_u64(seed("aws"));
    let pairs = pairs();
    let messages: Vec<Envelope> = (0..MESSAGES).map(|_| pairs.message(&mut rng)).collect();
    // Half the filters are made from a message (some with one field drawn again), so every
    // queue has something to receive and near misses are tried.
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
    let matched = route_and_compare(&endpoint, &filters, messages).await;
    // Half the rules are made from a message, so about that many pairs match at least.
    assert!(
        matched > RULES / 4,
        "too few matching pairs ({matched}) to prove anything"
    );
}

async fn core_filter_table_routes_through_real_rules_as_expected() {
    let endpoint = common::endpoint();
    let cases: Vec<_> = filter_table()
        .into_iter()
        .filter(|c| c.message.message_type != MessageType::Stream)
        .collect();
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
    route_and_compare(&endpoint, &filters, messages).await;
}

/// Puts a rule and queue per filter on a fresh bus, puts every message on it, and checks that
/// each queue holds exactly what the reference matcher selects. Returns the matching pairs.
async fn route_and_compare(
    endpoint: &str,
    filters: &[SubscriptionFilter],
    mut messages: Vec<Envelope>,
) -> usize {
    for m in &mut messages {
        m.id = purista_core::ids::new_id();
        // Commands and responses need one to decode; the filter does not look at it.
        m.correlation_id
            .get_or_insert_with(purista_core::ids::new_id);
    }
    let bridge = Arc::new(bridge(endpoint).await);
    let mut matched = 0;
    let sqs = bridge.sqs().clone();
    let bus = bridge.config().bus_name().to_string();
    let prefix = bridge.names().prefix().to_string();
    let mut queues = Vec::new();
    for (i, filter) in filters.iter().enumerate() {
        let name = format!("{prefix}-prop-{i}");
        let url = sqs
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let arn = format!("arn:aws:sqs:us-east-1:123456789012:{name}");
        bridge
            .eventbridge()
            .put_rule()
            .name(&name)
            .event_bus_name(&bus)
            .event_pattern(event_pattern(filter).to_string())
            .send()
            .await
            .unwrap();
        bridge
            .eventbridge()
            .put_targets()
            .rule(&name)
            .event_bus_name(&bus)
            .targets(
                purista_bridge_aws::aws_sdk_eventbridge::types::Target::builder()
                    .id("purista-queue")
                    .arn(arn)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        queues.push(url);
    }
    for chunk in messages.chunks(10) {
        let entries: Vec<PutEventsRequestEntry> = chunk
            .iter()
            .map(|m| {
                PutEventsRequestEntry::builder()
                    .event_bus_name(&bus)
                    .source("purista.test")
                    .detail_type(m.message_type.as_str())
                    .detail(String::from_utf8(m.encode()).unwrap())
                    .build()
            })
            .collect();
        let out = bridge
            .eventbridge()
            .put_events()
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap();
        assert_eq!(out.failed_entry_count, 0);
    }
    for (i, (filter, url)) in filters.iter().zip(&queues).enumerate() {
        let expected: HashSet<String> = messages
            .iter()
            .filter(|m| filter.matches(m))
            .map(|m| m.id.clone())
            .collect();
        let mut got: HashMap<String, usize> = HashMap::new();
        // Delivery into SQS is synchronous in moto; drain until a receive comes back empty.
        loop {
            let out = sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .send()
                .await
                .unwrap();
            let batch = out.messages.unwrap_or_default();
            if batch.is_empty() {
                break;
            }
            for m in batch {
                let event: serde_json::Value = serde_json::from_str(m.body().unwrap()).unwrap();
                let id = event["detail"]["id"].as_str().unwrap().to_string();
                *got.entry(id).or_default() += 1;
                sqs.delete_message()
                    .queue_url(url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
        matched += expected.len();
        let got_ids: HashSet<String> = got.keys().cloned().collect();
        assert_eq!(
            got_ids, expected,
            "queue {i} with filter {filter:?} received other messages than the reference matcher selects"
        );
        assert!(
            got.values().all(|n| *n == 1),
            "queue {i} got a message twice: {got:?}"
        );
    }
    common::remove_all(&bridge).await;
    matched
}
