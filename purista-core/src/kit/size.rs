//! Size checks before publishing (DESIGN §4, issue: an oversized header must not take an
//! instance down).
//!
//! A broker has two budgets: the body, and what travels beside it (AMQP headers, SQS message
//! attributes, CloudEvent extensions, gRPC metadata). Both are measured against the bridge's
//! declared [`Limits`] *before* anything is sent, so that too much is a 400 at the caller
//! ([`BridgeError::TooLarge`]) and never a broker protocol error that closes a connection.
//!
//! [`metadata_fields`] lists the envelope fields that bridges copy out of the body for routing
//! (PURISTA's header projection); a bridge that carries them as metadata measures them with
//! [`metadata_len`] (or its own exact encoding) and checks the result with [`check_metadata`].

use crate::capabilities::Limits;
use crate::envelope::Envelope;
use crate::error::{BridgeError, MessagePart};

/// Counts serialized bytes without keeping them.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Length of the envelope's JSON encoding, without building it.
pub fn encoded_len(envelope: &Envelope) -> Result<usize, BridgeError> {
    let mut counter = ByteCounter(0);
    serde_json::to_writer(&mut counter, envelope)
        .map_err(|e| BridgeError::InvalidRequest(format!("envelope cannot be encoded: {e}")))?;
    Ok(counter.0)
}

/// A body of `size` bytes against `limits.max_payload_bytes`.
///
/// ```
/// use purista_core::{kit, BridgeError, Limits};
/// let limits = Limits { max_payload_bytes: Some(10), ..Limits::default() };
/// assert!(kit::check_body(10, &limits).is_ok());
/// let err = kit::check_body(11, &limits).unwrap_err();
/// assert!(matches!(err, BridgeError::TooLarge { size: 11, limit: 10, .. }));
/// assert_eq!(err.status().0, 400);
/// ```
pub fn check_body(size: usize, limits: &Limits) -> Result<(), BridgeError> {
    check(MessagePart::Body, size, limits.max_payload_bytes)
}

/// Metadata of `size` bytes against `limits.max_metadata_bytes`.
pub fn check_metadata(size: usize, limits: &Limits) -> Result<(), BridgeError> {
    check(MessagePart::Metadata, size, limits.max_metadata_bytes)
}

fn check(part: MessagePart, size: usize, limit: Option<usize>) -> Result<(), BridgeError> {
    match limit {
        Some(limit) if size > limit => Err(BridgeError::TooLarge { part, size, limit }),
        _ => Ok(()),
    }
}

/// The envelope fields bridges project out of the body for routing, by PURISTA's header
/// names, in a fixed order; absent fields are left out.
pub fn metadata_fields(e: &Envelope) -> Vec<(&'static str, &str)> {
    let mut fields = vec![
        ("messageType", e.message_type.as_str()),
        ("senderServiceName", e.sender.service_name.as_str()),
        ("senderServiceVersion", e.sender.service_version.as_str()),
        ("senderServiceTarget", e.sender.service_target.as_str()),
        ("senderInstanceId", e.sender.instance_id.as_str()),
    ];
    if let Some(r) = &e.receiver {
        fields.push(("receiverServiceName", r.service_name.as_str()));
        fields.push(("receiverServiceVersion", r.service_version.as_str()));
        fields.push(("receiverServiceTarget", r.service_target.as_str()));
        if let Some(i) = &r.instance_id {
            fields.push(("receiverInstanceId", i.as_str()));
        }
    }
    let optional = [
        ("eventName", &e.event_name),
        ("principalId", &e.principal_id),
        ("tenantId", &e.tenant_id),
        ("traceId", &e.trace_id),
        ("correlationId", &e.correlation_id),
        ("otp", &e.otp),
    ];
    fields.extend(
        optional
            .into_iter()
            .filter_map(|(name, v)| v.as_deref().map(|v| (name, v))),
    );
    fields
}

/// Bytes `fields` take as metadata: each name and value plus `per_entry` bytes of framing.
pub fn metadata_len(fields: &[(&str, &str)], per_entry: usize) -> usize {
    fields
        .iter()
        .map(|(name, value)| name.len() + value.len() + per_entry)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SenderAddress;

    #[test]
    fn a_huge_principal_counts_against_the_metadata_budget() {
        let mut e = Envelope::custom(SenderAddress::default(), "x", serde_json::json!({}));
        e.principal_id = Some("p".repeat(200_000));
        let size = metadata_len(&metadata_fields(&e), 4);
        assert!(size > 200_000);
        let limits = Limits {
            max_metadata_bytes: Some(128 * 1024),
            ..Limits::default()
        };
        assert!(matches!(
            check_metadata(size, &limits),
            Err(BridgeError::TooLarge {
                part: MessagePart::Metadata,
                ..
            })
        ));
    }

    #[test]
    fn no_limit_means_no_check() {
        assert!(check_body(usize::MAX, &Limits::default()).is_ok());
    }

    #[test]
    fn encoded_len_is_the_length_of_the_encoding() {
        let e = Envelope::custom(SenderAddress::default(), "x", serde_json::json!({"a": 1}));
        assert_eq!(encoded_len(&e).unwrap(), e.encode().len());
    }
}
