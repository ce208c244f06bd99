//! The filter property: on 10 000 random (filter, message) pairs, what KubeMQ routes through
//! the bridge's channel naming — a subscription on `Channels::pattern(filter)` receives an event
//! on `Channels::event(message)` by KubeMQ's documented wildcard rules — is exactly what core's
//! reference matcher says, and so is the consumer's result after its client-side check. Values
//! are drawn from a pool made to break naive naming: separators, wildcards, the escape
//! character, empty strings, absent fields, long values that get shortened, non-ASCII.
//! The `complex` filter capability of the bridge rests on this test.
#![cfg(feature = "double")]

use purista_bridge_kubemq::channels::Channels;
use purista_bridge_kubemq::double::channel_matches;
use purista_core::filter::filter_table;
use purista_core::{
    Address, AddressFilter, Envelope, MessageType, SenderAddress, SubscriptionFilter,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PAIRS: usize = 10_000;

fn pool() -> Vec<String> {
    let mut v: Vec<String> = [
        "a",
        "b",
        "orders",
        "orders.v2",
        "v2.1",
        "1",
        "*",
        ">",
        "a*b",
        "a>b",
        "_",
        "__",
        "_2e",
        "_h",
        "~",
        "-",
        "",
        " ",
        "a b",
        "ü",
        "x/y",
        "A",
        "tenant-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("x".repeat(40));
    v.push(format!("{}y", "x".repeat(39)));
    v.push("long.value.with.dots.and.more.than.eighteen".into());
    v
}

fn pick(rng: &mut StdRng, pool: &[String]) -> String {
    pool[rng.random_range(0..pool.len())].clone()
}

/// Set with probability 1/2 (wildcard otherwise); biased towards values messages use.
fn maybe(rng: &mut StdRng, pool: &[String]) -> Option<String> {
    rng.random_bool(0.5).then(|| pick(rng, pool))
}

fn random_filter(rng: &mut StdRng, pool: &[String]) -> SubscriptionFilter {
    let address = |rng: &mut StdRng| AddressFilter {
        service_name: maybe(rng, pool),
        service_version: maybe(rng, pool),
        service_target: maybe(rng, pool),
        instance_id: maybe(rng, pool),
    };
    SubscriptionFilter {
        message_type: rng
            .random_bool(0.4)
            .then(|| MessageType::ALL[rng.random_range(0..MessageType::ALL.len())]),
        event_name: maybe(rng, pool),
        principal_id: maybe(rng, pool),
        tenant_id: maybe(rng, pool),
        sender: if rng.random_bool(0.5) {
            address(rng)
        } else {
            AddressFilter::default()
        },
        receiver: if rng.random_bool(0.5) {
            address(rng)
        } else {
            AddressFilter::default()
        },
    }
}

fn random_message(rng: &mut StdRng, pool: &[String]) -> Envelope {
    let sender = SenderAddress {
        service_name: pick(rng, pool),
        service_version: pick(rng, pool),
        service_target: pick(rng, pool),
        instance_id: pick(rng, pool),
    };
    let mut e = Envelope::custom(sender, "x", serde_json::json!({}));
    e.message_type = MessageType::ALL[rng.random_range(0..MessageType::ALL.len())];
    e.event_name = maybe(rng, pool);
    e.principal_id = maybe(rng, pool);
    e.tenant_id = maybe(rng, pool);
    e.receiver = rng.random_bool(0.6).then(|| {
        let a = Address::new(pick(rng, pool), pick(rng, pool), pick(rng, pool));
        if rng.random_bool(0.5) {
            a.with_instance(pick(rng, pool))
        } else {
            a
        }
    });
    e
}

/// Every field the filter sets takes the message's value (where the message has one).
fn copy_from_message(filter: &mut SubscriptionFilter, m: &Envelope) {
    fn take(slot: &mut Option<String>, value: Option<&str>) {
        if slot.is_some()
            && let Some(v) = value
        {
            *slot = Some(v.to_string());
        }
    }
    if filter.message_type.is_some() {
        filter.message_type = Some(m.message_type);
    }
    take(&mut filter.event_name, m.event_name.as_deref());
    take(&mut filter.principal_id, m.principal_id.as_deref());
    take(&mut filter.tenant_id, m.tenant_id.as_deref());
    let s = &m.sender;
    take(&mut filter.sender.service_name, Some(&s.service_name));
    take(&mut filter.sender.service_version, Some(&s.service_version));
    take(&mut filter.sender.service_target, Some(&s.service_target));
    take(&mut filter.sender.instance_id, Some(&s.instance_id));
    if let Some(r) = &m.receiver {
        take(&mut filter.receiver.service_name, Some(&r.service_name));
        take(
            &mut filter.receiver.service_version,
            Some(&r.service_version),
        );
        take(&mut filter.receiver.service_target, Some(&r.service_target));
        take(&mut filter.receiver.instance_id, r.instance_id.as_deref());
    }
}

/// What a subscription with `filter` hands its handler of `message`: KubeMQ's routing, then
/// the consumer's own check.
fn delivered(channels: &Channels, filter: &SubscriptionFilter, message: &Envelope) -> (bool, bool) {
    let routed = channel_matches(&channels.pattern(filter), &channels.event(message));
    (routed, routed && filter.matches(message))
}

#[test]
fn random_filters_route_through_kubemq_channels_like_the_reference_matcher() {
    let seed: u64 = std::env::var("PURISTA_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("kubemq filter property seed: {seed} (replay with PURISTA_PROPERTY_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = pool();
    let channels = Channels::new("purista").unwrap();
    let mut matched = 0;
    for i in 0..PAIRS {
        // Every other pair copies the message's own values into the filter, so that matches
        // are common, not a rarity of random draws.
        let message = random_message(&mut rng, &pool);
        let mut filter = random_filter(&mut rng, &pool);
        if i % 2 == 0 {
            copy_from_message(&mut filter, &message);
            // Now and then one field differs again, so near misses are tried too.
            if rng.random_bool(0.3) {
                filter.principal_id = maybe(&mut rng, &pool);
            }
        }
        let reference = filter.matches(&message);
        matched += usize::from(reference);
        let (routed, handed) = delivered(&channels, &filter, &message);
        assert_eq!(
            handed, reference,
            "pair {i}: filter {filter:?}, message {message:?}"
        );
        // The bridge never publishes stream frames (emit refuses them); for everything it
        // publishes, KubeMQ's routing alone already equals the reference.
        if message.message_type != MessageType::Stream {
            assert_eq!(
                routed,
                reference,
                "pair {i}: KubeMQ would route differently from the reference matcher: filter {filter:?}, message {message:?}\npattern {}\nchannel {}",
                channels.pattern(&filter),
                channels.event(&message)
            );
        }
    }
    assert!(
        matched > PAIRS / 20,
        "too few matching pairs ({matched}) to prove anything"
    );
}

#[test]
fn core_filter_table_routes_through_kubemq_channels_as_expected() {
    let channels = Channels::new("purista").unwrap();
    for case in filter_table() {
        let (routed, handed) = delivered(&channels, &case.filter, &case.message);
        assert_eq!(handed, case.expected, "{}", case.name);
        if case.message.message_type != MessageType::Stream {
            assert_eq!(
                routed, case.expected,
                "{} (KubeMQ routing alone)",
                case.name
            );
        }
    }
}
