//! The reference matcher (DESIGN §3.3) against the shared filter table, plus rows the table
//! does not have: stream frames, responses whose receiver has no instance id, and the
//! wildcard / monotonicity properties every row relies on.

use purista_core::filter::filter_table;
use purista_core::stream::{FrameType, frame};
use purista_core::{
    Address, AddressFilter, Envelope, MessageType, SenderAddress, SubscriptionFilter,
};
use serde_json::json;

fn orders() -> SenderAddress {
    SenderAddress {
        service_name: "orders".into(),
        service_version: "1".into(),
        service_target: "placeOrder".into(),
        instance_id: "inst-a".into(),
    }
}

fn instance(id: &str) -> AddressFilter {
    AddressFilter {
        instance_id: Some(id.into()),
        ..AddressFilter::default()
    }
}

fn name(n: &str) -> AddressFilter {
    AddressFilter {
        service_name: Some(n.into()),
        ..AddressFilter::default()
    }
}

/// A success response whose receiver carries no instance id (e.g. from a bridge that routes
/// responses by service, not by instance).
fn response_without_receiver_instance() -> Envelope {
    let mut r = Envelope::new(
        MessageType::CommandSuccessResponse,
        SenderAddress {
            service_name: "billing".into(),
            service_version: "2".into(),
            service_target: "charge".into(),
            instance_id: "inst-b".into(),
        },
    );
    r.correlation_id = Some("c-1".into());
    r.receiver = Some(Address::new("orders", "1", "placeOrder"));
    r.payload = json!({ "ok": true });
    r
}

fn stream_frame() -> Envelope {
    let mut f = frame(
        orders(),
        "c-1",
        FrameType::Chunk,
        1,
        Some(("chunk", json!(1))),
    );
    f.event_name = Some("orderPlaced".into());
    f.receiver = Some(Address::new("billing", "2", "charge").with_instance("inst-b"));
    f
}

#[test]
fn every_filter_table_row_matches_as_expected() {
    let table = filter_table();
    assert!(!table.is_empty());
    let failures: Vec<String> = table
        .iter()
        .filter(|c| c.filter.matches(&c.message) != c.expected)
        .map(|c| format!("{} (expected {})", c.name, c.expected))
        .collect();
    assert!(failures.is_empty(), "rows failed: {failures:#?}");
}

#[test]
fn filter_table_row_names_are_unique() {
    let table = filter_table();
    let mut names: Vec<_> = table.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), table.len());
}

#[test]
fn filter_table_has_matching_and_non_matching_rows() {
    let table = filter_table();
    assert!(table.iter().any(|c| c.expected));
    assert!(table.iter().any(|c| !c.expected));
}

#[test]
fn stream_frame_never_matches_an_empty_filter() {
    assert!(!SubscriptionFilter::new().matches(&stream_frame()));
}

#[test]
fn stream_frame_never_matches_even_a_filter_equal_to_its_fields() {
    let f = stream_frame();
    let filter = SubscriptionFilter::new()
        .message_type(MessageType::Stream)
        .event_name("orderPlaced")
        .sent_from(name("orders"))
        .received_by(name("billing"));
    assert!(!filter.matches(&f));
}

#[test]
fn stream_open_frame_never_matches() {
    let mut open = frame(orders(), "c-1", FrameType::Open, 0, None);
    open.receiver = Some(Address::new("billing", "2", "charge"));
    assert!(!SubscriptionFilter::new().matches(&open));
    assert!(
        !SubscriptionFilter::new()
            .message_type(MessageType::Stream)
            .matches(&open)
    );
}

#[test]
fn receiver_instance_filter_fails_a_response_without_receiver_instance() {
    let filter = SubscriptionFilter::new().received_by(instance("inst-a"));
    assert!(!filter.matches(&response_without_receiver_instance()));
}

#[test]
fn receiver_filter_without_instance_matches_a_response_without_receiver_instance() {
    let filter = SubscriptionFilter::new().received_by(AddressFilter {
        service_name: Some("orders".into()),
        service_version: Some("1".into()),
        service_target: Some("placeOrder".into()),
        instance_id: None,
    });
    assert!(filter.matches(&response_without_receiver_instance()));
}

#[test]
fn receiver_instance_filter_is_exact_on_a_response_with_instance() {
    let mut r = response_without_receiver_instance();
    r.receiver = r.receiver.map(|a| a.with_instance("inst-a"));
    assert!(
        SubscriptionFilter::new()
            .received_by(instance("inst-a"))
            .matches(&r)
    );
    assert!(
        !SubscriptionFilter::new()
            .received_by(instance("INST-A"))
            .matches(&r)
    );
}

#[test]
fn empty_string_filter_value_is_not_a_wildcard() {
    let msg = Envelope::custom(orders(), "orderPlaced", json!({}));
    assert!(!SubscriptionFilter::new().event_name("").matches(&msg));
    assert!(!SubscriptionFilter::new().tenant_id("").matches(&msg));
}

#[test]
fn info_message_with_empty_target_matches_an_empty_target_sender_filter() {
    let mut s = orders();
    s.service_target = String::new();
    let info = Envelope::info(MessageType::InfoServiceReady, s, json!({}));
    let filter = SubscriptionFilter::new().sent_from(AddressFilter {
        service_target: Some(String::new()),
        ..AddressFilter::default()
    });
    assert!(filter.matches(&info));
}

#[test]
fn info_messages_never_match_a_receiver_instance_filter() {
    for t in MessageType::ALL.into_iter().filter(|t| t.is_info()) {
        let mut info = Envelope::info(t, orders(), json!({}));
        // Even an info message that somehow carries a receiver.
        info.receiver = Some(Address::new("orders", "1", "").with_instance("inst-a"));
        assert!(
            !SubscriptionFilter::new()
                .received_by(instance("inst-a"))
                .matches(&info),
            "{t}"
        );
    }
}

#[test]
fn empty_filter_matches_every_non_stream_family() {
    for t in MessageType::ALL {
        let mut msg = Envelope::new(t, orders());
        msg.correlation_id = Some("c-1".into());
        msg.event_name = Some("e".into());
        msg.receiver = Some(Address::new("billing", "2", "charge"));
        assert_eq!(
            SubscriptionFilter::new().matches(&msg),
            t != MessageType::Stream,
            "{t}"
        );
    }
}

#[test]
fn removing_a_field_from_a_matching_row_keeps_it_matching() {
    // Unset = wildcard: a filter that matches keeps matching with any part cleared.
    for case in filter_table().into_iter().filter(|c| c.expected) {
        let f = &case.filter;
        let mut looser = vec![
            SubscriptionFilter {
                message_type: None,
                ..f.clone()
            },
            SubscriptionFilter {
                event_name: None,
                ..f.clone()
            },
            SubscriptionFilter {
                principal_id: None,
                ..f.clone()
            },
            SubscriptionFilter {
                tenant_id: None,
                ..f.clone()
            },
            SubscriptionFilter {
                sender: AddressFilter::default(),
                ..f.clone()
            },
            SubscriptionFilter {
                receiver: AddressFilter::default(),
                ..f.clone()
            },
        ];
        looser.push(SubscriptionFilter::new());
        for l in looser {
            assert!(l.matches(&case.message), "{}: {l:?}", case.name);
        }
    }
}

#[test]
fn filter_serializes_in_camel_case_without_unset_parts() {
    let f = SubscriptionFilter::new()
        .message_type(MessageType::CustomMessage)
        .event_name("orderPlaced")
        .sent_from(name("orders"));
    assert_eq!(
        serde_json::to_value(&f).expect("json"),
        json!({
            "messageType": "customMessage",
            "eventName": "orderPlaced",
            "sender": { "serviceName": "orders" }
        })
    );
}

#[test]
fn filter_table_rows_survive_a_json_round_trip() {
    for case in filter_table() {
        let json = serde_json::to_string(&case.filter).expect("json");
        let back: SubscriptionFilter = serde_json::from_str(&json).expect("filter");
        assert_eq!(back, case.filter, "{}", case.name);
    }
}
