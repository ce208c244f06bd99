//! Putting envelopes on the bus (`PutEvents`): the whole envelope is the event's `detail`,
//! `detail-type` its `messageType`, `source` names the sender (`purista.<serviceName>`).
//! EventBridge takes at most 10 entries per call.

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use purista_core::kit;
use purista_core::{BridgeError, Capabilities, Envelope};

use crate::shared::Shared;

/// Most entries EventBridge takes in one `PutEvents`.
pub const MAX_ENTRIES_PER_PUT: usize = 10;

/// The envelope's JSON, refused with a 400 ([`BridgeError::TooLarge`]) when over the bridge's
/// limit — before anything is sent.
pub fn encode_checked(caps: &Capabilities, envelope: &Envelope) -> Result<String, BridgeError> {
    let bytes = envelope.encode();
    kit::check_body(bytes.len(), &caps.limits)?;
    String::from_utf8(bytes)
        .map_err(|e| BridgeError::InvalidRequest(format!("envelope is not UTF-8: {e}")))
}

/// The `source` of an envelope's event.
pub fn source_of(envelope: &Envelope) -> String {
    let name = &envelope.sender.service_name;
    if name.is_empty() {
        "purista".to_string()
    } else {
        format!("purista.{name}")
    }
}

fn entry(shared: &Shared, envelope: &Envelope, detail: String) -> PutEventsRequestEntry {
    PutEventsRequestEntry::builder()
        .event_bus_name(shared.config.bus_name())
        .source(source_of(envelope))
        .detail_type(envelope.message_type.as_str())
        .detail(detail)
        .build()
}

/// Puts one envelope (already encoded and checked) on the bus; concurrent calls share
/// `PutEvents` calls of up to 10 entries.
pub async fn put_event(
    shared: &Shared,
    envelope: &Envelope,
    detail: String,
) -> Result<(), BridgeError> {
    let size = detail.len() + 256;
    shared
        .put_event(entry(shared, envelope, detail), size)
        .await
}
