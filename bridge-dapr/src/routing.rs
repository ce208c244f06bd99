//! Subscription filters (DESIGN §3.3) as Dapr routing rules: a CEL expression over the
//! CloudEvent the bridge publishes, whose `data` is the PURISTA envelope in its wire form
//! (camelCase fields; absent optional fields are left out).
//!
//! [`cel_match`] is true for exactly the messages core's matcher
//! ([`SubscriptionFilter::matches`]) selects; `tests/filter_property.rs` proves it on random
//! (filter, message) pairs routed by the double's CEL implementation. Every field access is
//! guarded with `has()` (and a `null` check for the receiver), so a rule never fails to
//! evaluate on a PURISTA envelope: in daprd a failing rule fails the delivery.
//!
//! The bridge does not announce these rules to the sidecar (yet): daprd reads an app's
//! programmatic subscriptions once, when the app starts, while PURISTA services register
//! subscriptions on a running bridge, so a rule set read at start would hide every later
//! registration. Filtering stays in the app server with core's matcher.

use purista_core::{AddressFilter, MessageType, SubscriptionFilter};

/// A CEL string literal of `value` (JSON's escapes are a subset of CEL's).
fn literal(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into())
}

/// `event.data.<field> == value`, false when the field is absent.
fn optional_field(parts: &mut Vec<String>, field: &str, value: &Option<String>) {
    if let Some(v) = value {
        parts.push(format!(
            "has(event.data.{field}) && event.data.{field} == {}",
            literal(v)
        ));
    }
}

/// The conditions of an address filter on `event.data.<at>`; `required` fields are always
/// on the wire (a sender's), the others may be absent (a receiver's `instanceId`).
fn address(parts: &mut Vec<String>, at: &str, filter: &AddressFilter, all_required: bool) {
    let fields = [
        ("serviceName", &filter.service_name, true),
        ("serviceVersion", &filter.service_version, true),
        ("serviceTarget", &filter.service_target, true),
        ("instanceId", &filter.instance_id, all_required),
    ];
    for (name, value, required) in fields {
        if let Some(v) = value {
            let path = format!("event.data.{at}.{name}");
            if required {
                parts.push(format!("{path} == {}", literal(v)));
            } else {
                parts.push(format!(
                    "has(event.data.{at}.{name}) && {path} == {}",
                    literal(v)
                ));
            }
        }
    }
}

/// The CEL match expression of `filter`: true for a PURISTA CloudEvent exactly when core's
/// matcher accepts its envelope.
pub fn cel_match(filter: &SubscriptionFilter) -> String {
    let mut parts = vec![format!(
        "event.data.messageType != {}",
        literal(MessageType::Stream.as_str())
    )];
    if let Some(t) = filter.message_type {
        parts.push(format!("event.data.messageType == {}", literal(t.as_str())));
    }
    optional_field(&mut parts, "principalId", &filter.principal_id);
    optional_field(&mut parts, "tenantId", &filter.tenant_id);
    optional_field(&mut parts, "eventName", &filter.event_name);
    address(&mut parts, "sender", &filter.sender, true);
    if !filter.receiver.is_empty() {
        // Info messages have no receiver: any receiver filter excludes them.
        let infos: Vec<String> = MessageType::ALL
            .into_iter()
            .filter(|t| t.is_info())
            .map(|t| literal(t.as_str()))
            .collect();
        parts.push(format!(
            "!(event.data.messageType in [{}])",
            infos.join(", ")
        ));
        parts.push("has(event.data.receiver) && event.data.receiver != null".into());
        address(&mut parts, "receiver", &filter.receiver, false);
    }
    parts
        .into_iter()
        .map(|p| format!("({p})"))
        .collect::<Vec<_>>()
        .join(" && ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(literal(r#"a"b\c"#), r#""a\"b\\c""#);
        let f = SubscriptionFilter::new().event_name("x\"y");
        assert!(cel_match(&f).contains(r#"event.data.eventName == "x\"y""#));
    }
}
