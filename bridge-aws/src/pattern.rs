//! Event patterns from subscription filters: EventBridge does all the filtering (DESIGN §3.3),
//! so a subscription's queue receives exactly what the reference matcher accepts.
//!
//! The whole envelope is the event's `detail`; every set filter field becomes an exact-match
//! list on its path in `detail` (EventBridge matches strings exactly and case-sensitively, and
//! ANDs the fields). Two rules of the reference matcher need more than a path:
//!
//! * info messages never match a filter with a receiver part: such a pattern lists the
//!   non-info message types on `detail-type` (which is the envelope's `messageType`);
//! * stream frames match no filter: the bridge never puts them on the bus.

use purista_core::{AddressFilter, MessageType, SubscriptionFilter};
use serde_json::{Map, Value, json};

/// A `detail-type` no entry on the bus has (every entry's is a message type).
const NOTHING: &str = "-matches-nothing-";

/// The EventBridge event pattern of `filter` on the bridge's bus.
///
/// ```
/// use purista_bridge_aws::event_pattern;
/// use purista_core::SubscriptionFilter;
/// let p = event_pattern(&SubscriptionFilter::new().event_name("orderPlaced").tenant_id("acme"));
/// assert_eq!(p["detail"]["eventName"][0], "orderPlaced");
/// assert_eq!(p["detail"]["tenantId"][0], "acme");
/// ```
pub fn event_pattern(filter: &SubscriptionFilter) -> Value {
    let mut detail = Map::new();
    let mut pattern = Map::new();
    // An empty pattern is refused by EventBridge; every envelope has a message type, so
    // listing all of them (less stream frames) is the wildcard.
    let types: Vec<&str> = match filter.message_type {
        // An info type with a receiver part matches nothing; no entry the bridge puts on the
        // bus has this detail-type.
        Some(t) if t.is_info() && !filter.receiver.is_empty() => vec![NOTHING],
        Some(t) => vec![t.as_str()],
        None if !filter.receiver.is_empty() => MessageType::ALL
            .into_iter()
            .filter(|t| !t.is_info() && *t != MessageType::Stream)
            .map(MessageType::as_str)
            .collect(),
        None => MessageType::ALL
            .into_iter()
            .filter(|t| *t != MessageType::Stream)
            .map(MessageType::as_str)
            .collect(),
    };
    pattern.insert("detail-type".into(), json!(types));
    if let Some(t) = filter.message_type {
        detail.insert("messageType".into(), json!([t.as_str()]));
    }
    for (field, value) in [
        ("eventName", &filter.event_name),
        ("principalId", &filter.principal_id),
        ("tenantId", &filter.tenant_id),
    ] {
        if let Some(v) = value {
            detail.insert(field.into(), json!([v]));
        }
    }
    for (field, part) in [("sender", &filter.sender), ("receiver", &filter.receiver)] {
        if let Some(m) = address_pattern(part) {
            detail.insert(field.into(), Value::Object(m));
        }
    }
    if !detail.is_empty() {
        pattern.insert("detail".into(), Value::Object(detail));
    }
    Value::Object(pattern)
}

fn address_pattern(filter: &AddressFilter) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    for (field, value) in [
        ("serviceName", &filter.service_name),
        ("serviceVersion", &filter.service_version),
        ("serviceTarget", &filter.service_target),
        ("instanceId", &filter.instance_id),
    ] {
        if let Some(v) = value {
            m.insert(field.into(), json!([v]));
        }
    }
    (!m.is_empty()).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_part_excludes_info_messages() {
        let p = event_pattern(&SubscriptionFilter::new().received_by(AddressFilter {
            service_name: Some("orders".into()),
            ..AddressFilter::default()
        }));
        let types = p["detail-type"].as_array().unwrap();
        assert!(!types.iter().any(|t| t == "infoServiceReady"));
        assert!(types.iter().any(|t| t == "command"));
        assert_eq!(p["detail"]["receiver"]["serviceName"][0], "orders");
    }

    #[test]
    fn an_info_type_with_a_receiver_part_matches_nothing() {
        let p = event_pattern(
            &SubscriptionFilter::new()
                .message_type(MessageType::InfoServiceReady)
                .received_by(AddressFilter {
                    service_name: Some("orders".into()),
                    ..AddressFilter::default()
                }),
        );
        assert_eq!(p["detail-type"], json!([NOTHING]));
    }

    #[test]
    fn the_wildcard_lists_every_type_but_stream() {
        let p = event_pattern(&SubscriptionFilter::new());
        let types = p["detail-type"].as_array().unwrap();
        assert_eq!(types.len(), MessageType::ALL.len() - 1);
        assert!(p.get("detail").is_none());
    }
}
