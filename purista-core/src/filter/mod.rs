//! Subscription filters and the reference matcher.
//!
//! [`SubscriptionFilter::matches`] is the definition of what a subscription receives; broker-side
//! routing (header bindings, event patterns) must agree with it, and the conformance suite's
//! property test checks that they do. Rules: an unset field is a wildcard, a set field matches by
//! exact, case-sensitive equality, all set fields are ANDed, info messages never match a
//! filter with a receiver part, and stream frames match no subscription.

use serde::{Deserialize, Serialize};

use crate::envelope::{Address, Envelope, MessageType, SenderAddress};

/// A filter on the parts of an address. Unset fields are wildcards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressFilter {
    /// Service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Service version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_version: Option<String>,
    /// Command, subscription or stream name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_target: Option<String>,
    /// Bridge instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

impl AddressFilter {
    /// True when no field is set.
    pub fn is_empty(&self) -> bool {
        self.service_name.is_none()
            && self.service_version.is_none()
            && self.service_target.is_none()
            && self.instance_id.is_none()
    }

    fn matches_parts(
        &self,
        name: &str,
        version: &str,
        target: &str,
        instance: Option<&str>,
    ) -> bool {
        eq(&self.service_name, Some(name))
            && eq(&self.service_version, Some(version))
            && eq(&self.service_target, Some(target))
            && eq(&self.instance_id, instance)
    }

    /// Matches a sender address.
    pub fn matches_sender(&self, s: &SenderAddress) -> bool {
        self.matches_parts(
            &s.service_name,
            &s.service_version,
            &s.service_target,
            Some(&s.instance_id),
        )
    }

    /// Matches an optional receiver address; a missing receiver fails every set field.
    pub fn matches_receiver(&self, r: Option<&Address>) -> bool {
        match r {
            Some(r) => self.matches_parts(
                &r.service_name,
                &r.service_version,
                &r.service_target,
                r.instance_id.as_deref(),
            ),
            None => self.is_empty(),
        }
    }
}

fn eq(filter: &Option<String>, value: Option<&str>) -> bool {
    match filter {
        None => true,
        Some(f) => value == Some(f.as_str()),
    }
}

/// What a subscription wants to receive. Build it with the chained setters.
///
/// ```
/// use purista_core::{Envelope, MessageType, SenderAddress, SubscriptionFilter};
/// let filter = SubscriptionFilter::new().event_name("orderPlaced").tenant_id("acme");
/// let mut msg = Envelope::custom(SenderAddress::default(), "orderPlaced", serde_json::json!({}));
/// assert!(!filter.matches(&msg));
/// msg.tenant_id = Some("acme".into());
/// assert!(filter.matches(&msg));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionFilter {
    /// Message type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_type: Option<MessageType>,
    /// Event name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_name: Option<String>,
    /// Principal id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_id: Option<String>,
    /// Tenant id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Sender parts.
    #[serde(default, skip_serializing_if = "AddressFilter::is_empty")]
    pub sender: AddressFilter,
    /// Receiver parts.
    #[serde(default, skip_serializing_if = "AddressFilter::is_empty")]
    pub receiver: AddressFilter,
}

impl SubscriptionFilter {
    /// A filter that matches everything.
    pub fn new() -> Self {
        SubscriptionFilter::default()
    }

    /// Only this message type.
    pub fn message_type(mut self, t: MessageType) -> Self {
        self.message_type = Some(t);
        self
    }

    /// Only this event name.
    pub fn event_name(mut self, name: impl Into<String>) -> Self {
        self.event_name = Some(name.into());
        self
    }

    /// Only this principal.
    pub fn principal_id(mut self, id: impl Into<String>) -> Self {
        self.principal_id = Some(id.into());
        self
    }

    /// Only this tenant.
    pub fn tenant_id(mut self, id: impl Into<String>) -> Self {
        self.tenant_id = Some(id.into());
        self
    }

    /// Only messages from this sender (unset parts are wildcards).
    pub fn sent_from(mut self, sender: AddressFilter) -> Self {
        self.sender = sender;
        self
    }

    /// Only messages to this receiver (unset parts are wildcards).
    pub fn received_by(mut self, receiver: AddressFilter) -> Self {
        self.receiver = receiver;
        self
    }

    /// True when only `eventName` (or nothing) is set: what an event-only bridge can route.
    pub fn is_event_only(&self) -> bool {
        self.message_type.is_none()
            && self.principal_id.is_none()
            && self.tenant_id.is_none()
            && self.sender.is_empty()
            && self.receiver.is_empty()
    }

    /// Whether this filter can match a command or a command response: what a bridge that
    /// carries commands off the event path must copy to the subscription.
    pub fn may_match_commands(&self) -> bool {
        matches!(
            self.message_type,
            None | Some(
                MessageType::Command
                    | MessageType::CommandSuccessResponse
                    | MessageType::CommandErrorResponse
            )
        )
    }

    /// The reference matcher: does `msg` pass this filter?
    ///
    /// Stream frames are point-to-point session traffic and never match a subscription.
    pub fn matches(&self, msg: &Envelope) -> bool {
        if msg.message_type == MessageType::Stream {
            return false;
        }
        if let Some(t) = self.message_type
            && t != msg.message_type
        {
            return false;
        }
        if !eq(&self.principal_id, msg.principal_id.as_deref())
            || !eq(&self.tenant_id, msg.tenant_id.as_deref())
            || !eq(&self.event_name, msg.event_name.as_deref())
        {
            return false;
        }
        if msg.message_type.is_info() {
            // Info messages have no receiver: any receiver filter excludes them.
            return self.receiver.is_empty() && self.sender.matches_sender(&msg.sender);
        }
        self.sender.matches_sender(&msg.sender)
            && self.receiver.matches_receiver(msg.receiver.as_ref())
    }
}

mod cases;
pub use cases::{FilterCase, filter_table};
