//! The filter table: one row per matching rule, shared by core's matcher tests and the
//! conformance suite (which checks that every bridge routes each row the same way).

use serde_json::json;

use super::{AddressFilter, SubscriptionFilter};
use crate::envelope::{Address, Envelope, MessageType, SenderAddress};

/// One row: does `message` reach a subscription with `filter`?
#[derive(Debug, Clone)]
pub struct FilterCase {
    /// What the row pins down.
    pub name: &'static str,
    /// The subscription's filter.
    pub filter: SubscriptionFilter,
    /// The message.
    pub message: Envelope,
    /// Whether it matches.
    pub expected: bool,
}

fn sender() -> SenderAddress {
    SenderAddress {
        service_name: "orders".into(),
        service_version: "1".into(),
        service_target: "placeOrder".into(),
        instance_id: "inst-a".into(),
    }
}

fn event() -> Envelope {
    let mut e = Envelope::custom(sender(), "orderPlaced", json!({"orderId": "o-1"}));
    e.principal_id = Some("user-1".into());
    e.tenant_id = Some("acme".into());
    e
}

fn command() -> Envelope {
    let mut c = Envelope::command(
        sender(),
        Address::new("billing", "2", "charge").with_instance("inst-b"),
        json!({"amount": 3}),
        json!({}),
    );
    c.principal_id = Some("user-1".into());
    c.tenant_id = Some("acme".into());
    c
}

fn info() -> Envelope {
    let mut s = sender();
    s.service_target = String::new();
    Envelope::info(MessageType::InfoServiceReady, s, json!({}))
}

fn addr(
    name: Option<&str>,
    version: Option<&str>,
    target: Option<&str>,
    inst: Option<&str>,
) -> AddressFilter {
    AddressFilter {
        service_name: name.map(Into::into),
        service_version: version.map(Into::into),
        service_target: target.map(Into::into),
        instance_id: inst.map(Into::into),
    }
}

/// Every rule of the reference matcher, as rows.
pub fn filter_table() -> Vec<FilterCase> {
    let f = SubscriptionFilter::new;
    let success = command().success_response(json!({"ok": true}), Some("charged".into()));
    let error = command().error_response(
        &crate::error::ErrorPayload {
            status: crate::StatusCode::CONFLICT,
            message: "no".into(),
            data: None,
            trace_id: None,
        },
        true,
    );
    let row = |name, filter, message, expected| FilterCase {
        name,
        filter,
        message,
        expected,
    };
    vec![
        row("empty filter matches an event", f(), event(), true),
        row("empty filter matches a command", f(), command(), true),
        row("empty filter matches an info message", f(), info(), true),
        row(
            "eventName equal matches",
            f().event_name("orderPlaced"),
            event(),
            true,
        ),
        row(
            "eventName differs",
            f().event_name("orderShipped"),
            event(),
            false,
        ),
        row(
            "eventName is case-sensitive",
            f().event_name("orderplaced"),
            event(),
            false,
        ),
        row(
            "eventName set but message has none",
            f().event_name("orderPlaced"),
            command(),
            false,
        ),
        row(
            "messageType equal matches",
            f().message_type(MessageType::CustomMessage),
            event(),
            true,
        ),
        row(
            "messageType differs",
            f().message_type(MessageType::Command),
            event(),
            false,
        ),
        row(
            "principalId equal matches",
            f().principal_id("user-1"),
            event(),
            true,
        ),
        row(
            "principalId differs",
            f().principal_id("user-2"),
            event(),
            false,
        ),
        row(
            "principalId set but message has none",
            f().principal_id("user-1"),
            info(),
            false,
        ),
        row(
            "tenantId equal matches",
            f().tenant_id("acme"),
            event(),
            true,
        ),
        row(
            "tenantId differs",
            f().tenant_id("umbrella"),
            event(),
            false,
        ),
        row(
            "sender name matches",
            f().sent_from(addr(Some("orders"), None, None, None)),
            event(),
            true,
        ),
        row(
            "sender name differs",
            f().sent_from(addr(Some("billing"), None, None, None)),
            event(),
            false,
        ),
        row(
            "sender version differs",
            f().sent_from(addr(None, Some("2"), None, None)),
            event(),
            false,
        ),
        row(
            "sender target matches",
            f().sent_from(addr(None, None, Some("placeOrder"), None)),
            event(),
            true,
        ),
        row(
            "sender instance matches",
            f().sent_from(addr(None, None, None, Some("inst-a"))),
            event(),
            true,
        ),
        row(
            "sender instance differs",
            f().sent_from(addr(None, None, None, Some("inst-z"))),
            event(),
            false,
        ),
        row(
            "receiver filter fails an event without receiver",
            f().received_by(addr(Some("billing"), None, None, None)),
            event(),
            false,
        ),
        row(
            "receiver name matches a command",
            f().received_by(addr(Some("billing"), None, None, None)),
            command(),
            true,
        ),
        row(
            "receiver target differs on a command",
            f().received_by(addr(None, None, Some("refund"), None)),
            command(),
            false,
        ),
        row(
            "receiver instance matches a command",
            f().received_by(addr(None, None, None, Some("inst-b"))),
            command(),
            true,
        ),
        row(
            "info message never matches a receiver filter",
            f().received_by(addr(Some("orders"), None, None, None)),
            info(),
            false,
        ),
        row(
            "sender filter applies to info messages",
            f().sent_from(addr(Some("orders"), None, None, None)),
            info(),
            true,
        ),
        row(
            "info sender filter differs",
            f().sent_from(addr(Some("billing"), None, None, None)),
            info(),
            false,
        ),
        row(
            "subscription sees commands by type",
            f().message_type(MessageType::Command).received_by(addr(
                Some("billing"),
                Some("2"),
                Some("charge"),
                None,
            )),
            command(),
            true,
        ),
        row(
            "subscription sees success responses by eventName",
            f().event_name("charged"),
            success.clone(),
            true,
        ),
        row(
            "subscription sees success responses by type",
            f().message_type(MessageType::CommandSuccessResponse),
            success.clone(),
            true,
        ),
        row(
            "response receiver is the caller",
            f().received_by(addr(Some("orders"), None, None, Some("inst-a"))),
            success,
            true,
        ),
        row(
            "subscription sees error responses",
            f().message_type(MessageType::CommandErrorResponse),
            error,
            true,
        ),
        row(
            "all parts ANDed: all equal",
            f().event_name("orderPlaced")
                .tenant_id("acme")
                .principal_id("user-1")
                .sent_from(addr(Some("orders"), Some("1"), None, None)),
            event(),
            true,
        ),
        row(
            "all parts ANDed: one differs",
            f().event_name("orderPlaced")
                .tenant_id("acme")
                .principal_id("user-2"),
            event(),
            false,
        ),
    ]
}
