//! What fits one frame: the metadata budget of a message.
//!
//! RabbitMQ carries a message's properties (ids, type, `reply_to`, the headers table …) in one
//! content-header frame, and closes the whole connection (501 FRAME_ERROR) when that frame is
//! larger than the negotiated `frame_max` (131 072 bytes unless the broker is configured
//! otherwise); lapin likewise drops a connection that receives a larger one. One oversized
//! header would so take an instance down, and a message redelivered after each loss would do it
//! again and again. So every publish is measured first, exactly (the properties as lapin encodes
//! them, see `publish::metadata_len`), against two limits of a [`Budget`]:
//!
//! * **caller**: what `emit`, `invoke` and `open_stream` may send — the declared
//!   [`max_metadata_bytes`](crate::AmqpConfig::max_metadata_bytes) (96 KiB), or less when the
//!   broker's `frame_max` leaves less room. Over it is a 400 at the caller (`TooLarge`).
//! * **republish**: what the bridge itself may send when it retries, dead-letters or answers a
//!   message that came in: the frame minus [`BROKER_ROOM`] for the headers RabbitMQ adds on
//!   the way back from a retry queue (`x-death`, `x-first-death-*`). Between the caller limit
//!   and this one there is [`OWN_ROOM`] for the bridge's own headers (attempt, dead-letter
//!   notes, `replyTo`), so whatever a caller could send can always be retried and
//!   dead-lettered. A message from a foreign publisher can still arrive over it; the bridge then
//!   sheds headers ([`shrink`]) rather than publish something that cannot fit.

use lapin::types::FieldTable;
use purista_core::{BridgeError, MessagePart};

use crate::headers;

/// RabbitMQ's default `frame_max`.
pub const RABBITMQ_FRAME_MAX: usize = 131_072;

/// Bytes of a content-header frame besides the properties: frame header (7), class id, weight
/// and body size (12), frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// Room kept for the headers RabbitMQ adds when a message is dead-lettered back from a retry
/// queue (`x-death` with one entry — the bridge sheds older ones when it republishes — and
/// `x-first-death-*`, `x-last-death-*`).
pub const BROKER_ROOM: usize = 4 * 1024;

/// Room kept for the headers the bridge adds itself to a message that fitted the caller limit:
/// the attempt count, the dead-letter notes (the reason is cut to
/// [`headers::MAX_REASON_BYTES`]) and `replyTo`.
pub const OWN_ROOM: usize = 8 * 1024;

/// The default caller limit (`max_metadata_bytes`): 96 KiB.
pub const DEFAULT_MAX_METADATA_BYTES: usize = 96 * 1024;

/// The largest caller limit a RabbitMQ broker with the default `frame_max` can honour.
pub const LARGEST_MAX_METADATA_BYTES: usize =
    RABBITMQ_FRAME_MAX - HEADER_FRAME_OVERHEAD - BROKER_ROOM - OWN_ROOM;

/// The metadata limits of one connection (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// What a caller may send.
    pub caller: usize,
    /// What the bridge may re-publish.
    pub republish: usize,
}

impl Budget {
    /// The budget for a declared caller limit on a connection with `frame_max` (0 = unlimited).
    pub fn new(declared: usize, frame_max: usize) -> Self {
        let frame = if frame_max == 0 {
            RABBITMQ_FRAME_MAX
        } else {
            frame_max
        };
        let republish = frame.saturating_sub(HEADER_FRAME_OVERHEAD + BROKER_ROOM);
        Budget {
            caller: declared.min(republish.saturating_sub(OWN_ROOM)),
            republish,
        }
    }

    /// `size` bytes of metadata from a caller: [`BridgeError::TooLarge`] (400) when over.
    pub fn check_caller(&self, size: usize) -> Result<(), BridgeError> {
        check(size, self.caller)
    }

    /// `size` bytes of metadata the bridge is about to publish: [`BridgeError::TooLarge`] when
    /// it could not fit (the last guard before the broker).
    pub fn check_republish(&self, size: usize) -> Result<(), BridgeError> {
        check(size, self.republish)
    }
}

fn check(size: usize, limit: usize) -> Result<(), BridgeError> {
    if size > limit {
        return Err(BridgeError::TooLarge {
            part: MessagePart::Metadata,
            size,
            limit,
        });
    }
    Ok(())
}

/// Removes the largest headers of `table` that are not the bridge's bookkeeping until
/// `measure(table)` is at most `limit`; returns the names removed, largest first. The header
/// projection is only a routing aid (the body keeps every field), so a message that loses one
/// is still whole; `messageType`, `replyTo` and the `x-purista-*` headers stay.
pub fn shrink(
    table: &mut FieldTable,
    limit: usize,
    measure: impl Fn(&FieldTable) -> usize,
) -> Vec<String> {
    let mut removed = Vec::new();
    while measure(table) > limit {
        let largest = table
            .inner()
            .iter()
            .filter(|(key, _)| !headers::is_kept_when_shrinking(key.as_str()))
            .map(|(key, value)| (key.clone(), headers::value_len(value)))
            .max_by_key(|(_, len)| *len);
        let Some((key, _)) = largest else { break };
        let mut kept: std::collections::BTreeMap<_, _> = table.inner().clone();
        kept.remove(&key);
        *table = kept.into();
        removed.push(key.to_string());
    }
    removed
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, LongString};

    use super::*;

    #[test]
    fn the_default_budget_keeps_room_for_the_bridge_and_the_broker() {
        let budget = Budget::new(DEFAULT_MAX_METADATA_BYTES, RABBITMQ_FRAME_MAX);
        assert_eq!(budget.caller, DEFAULT_MAX_METADATA_BYTES);
        assert!(budget.caller + OWN_ROOM <= budget.republish);
        assert!(budget.republish + BROKER_ROOM + HEADER_FRAME_OVERHEAD <= RABBITMQ_FRAME_MAX);
    }

    #[test]
    fn a_smaller_frame_lowers_the_caller_limit() {
        let budget = Budget::new(DEFAULT_MAX_METADATA_BYTES, 32 * 1024);
        assert_eq!(
            budget.caller,
            32 * 1024 - HEADER_FRAME_OVERHEAD - BROKER_ROOM - OWN_ROOM
        );
        assert!(matches!(
            budget.check_caller(budget.caller + 1),
            Err(BridgeError::TooLarge { size, limit, .. }) if size == limit + 1
        ));
    }

    #[test]
    fn shrinking_drops_the_largest_foreign_headers_and_keeps_the_bookkeeping() {
        let mut table = FieldTable::default();
        let long = |n: usize| AMQPValue::LongString(LongString::from("x".repeat(n)));
        table.insert("x-filler".into(), long(5_000));
        table.insert("principalId".into(), long(2_000));
        table.insert("tenantId".into(), long(10));
        table.insert(headers::MESSAGE_TYPE.into(), long(9_000));
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(2));
        let measure = |t: &FieldTable| t.inner().values().map(headers::value_len).sum::<usize>();
        let removed = shrink(&mut table, 9_100, measure);
        assert_eq!(removed, ["x-filler", "principalId"]);
        assert!(table.contains_key("tenantId"));
        assert!(table.contains_key(headers::MESSAGE_TYPE));
        assert!(table.contains_key(headers::ATTEMPT));
    }
}
