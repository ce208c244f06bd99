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
use purista_core::{Envelope, MessageType, SubscriptionFilter};
use purista_test_runner::filters::{PairGen, copy_from_message, seed};
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

fn pairs() -> PairGen {
    PairGen::new(pool()).address_odds(0.5)
}

/// What a subscription with `filter` hands its handler of `message`: KubeMQ's routing, then
/// the consumer's own check.
fn delivered(channels: &Channels, filter: &SubscriptionFilter, message: &Envelope) -> (bool, bool) {
    let routed = channel_matches(&channels.pattern(filter), &channels.event(message));
    (routed, routed && filter.matches(message))
}

#[test]
fn random_filters_route_through_kubemq_channels_like_the_reference_matcher() {
    let mut rng = StdRng::seed_from_u64(seed("kubemq"));
    let pairs = pairs();
    let channels = Channels::new("purista").unwrap();
    let mut matched = 0;
    for i in 0..PAIRS {
        // Every other pair copies the message's own values into the filter, so that matches
        // are common, not a rarity of random draws.
        let message = pairs.message(&mut rng);
        let mut filter = pairs.filter(&mut rng);
        if i % 2 == 0 {
            copy_from_message(&mut filter, &message);
            // Now and then one field differs again, so near misses are tried too.
            if rng.random_bool(0.3) {
                filter.principal_id = pairs.maybe(&mut rng);
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
