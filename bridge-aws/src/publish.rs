//! Putting envelopes on the bus (`PutEvents`): the whole envelope is the event's `detail`,
//! `detail-type` its `messageType`, `source` names the sender (`purista.<serviceName>`).
//! EventBridge takes at most 10 entries per call.

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use purista_core::kit::{self, broker_call};
use purista_core::{BridgeError, Capabilities, Envelope};

use crate::client::sdk_error;
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

/// Puts one envelope (already encoded and checked) on the bus.
pub async fn put_event(
    shared: &Shared,
    envelope: &Envelope,
    detail: String,
) -> Result<(), BridgeError> {
    put_entries(shared, vec![entry(shared, envelope, detail)]).await
}

async fn put_entries(
    shared: &Shared,
    entries: Vec<PutEventsRequestEntry>,
) -> Result<(), BridgeError> {
    let call = shared
        .clients
        .events
        .put_events()
        .set_entries(Some(entries))
        .send();
    let out = broker_call(shared.config.call_timeout, "PutEvents", async {
        call.await
            .map_err(|e| sdk_error("putting events on the bus", e))
    })
    .await?;
    if out.failed_entry_count > 0 {
        let why = out
            .entries
            .unwrap_or_default()
            .into_iter()
            .find_map(|e| {
                e.error_code
                    .map(|c| format!("{c}: {}", e.error_message.unwrap_or_default()))
            })
            .unwrap_or_default();
        // Throttling and internal failures of single entries can pass with a retry.
        if why.contains("Throttl") || why.contains("InternalFailure") {
            return Err(BridgeError::Unavailable(format!(
                "EventBridge refused an event: {why}"
            )));
        }
        return Err(BridgeError::Refused(format!(
            "the bus {}: {why}",
            shared.config.bus_name()
        )));
    }
    Ok(())
}
