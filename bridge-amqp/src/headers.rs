//! The envelope's header projection, and subscription filters as header-exchange bindings.
//!
//! Routing happens in the broker: every message carries PURISTA's header projection
//! (`messageType`, `sender*`, `receiver*`, `eventName`, `principalId`, `tenantId`), and every
//! subscription queue is bound with `x-match: all` and one argument per *set* filter part. An
//! unset part is simply absent from the binding, so it matches anything; a set part matches by
//! exact, case-sensitive string equality; a message lacking the header never matches a
//! binding that names it. That is core's reference matcher, rule for rule:
//! info messages carry no `receiver*` headers, so a receiver filter never matches them. The one
//! rule a binding cannot express is that no filter matches a stream frame; the consumer drops
//! those (`consume.rs`).
//!
//! Values are always AMQP long strings on both sides, so the broker's comparison is byte
//! equality. Bridge bookkeeping (attempt counter, dead-letter notes) uses `x-purista-*` names,
//! which a headers exchange ignores and which never collide with the projection.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use purista_core::{Address, Envelope, SubscriptionFilter};
use serde_json::Value;

/// `messageType`.
pub const MESSAGE_TYPE: &str = "messageType";
/// `senderServiceName`.
pub const SENDER_SERVICE_NAME: &str = "senderServiceName";
/// `senderServiceVersion`.
pub const SENDER_SERVICE_VERSION: &str = "senderServiceVersion";
/// `senderServiceTarget`.
pub const SENDER_SERVICE_TARGET: &str = "senderServiceTarget";
/// `senderInstanceId`.
pub const SENDER_INSTANCE_ID: &str = "senderInstanceId";
/// `receiverServiceName`.
pub const RECEIVER_SERVICE_NAME: &str = "receiverServiceName";
/// `receiverServiceVersion`.
pub const RECEIVER_SERVICE_VERSION: &str = "receiverServiceVersion";
/// `receiverServiceTarget`.
pub const RECEIVER_SERVICE_TARGET: &str = "receiverServiceTarget";
/// `receiverInstanceId`.
pub const RECEIVER_INSTANCE_ID: &str = "receiverInstanceId";
/// `receiverServiceInstanceId`: where PURISTA's TypeScript AMQP bridge writes the receiver's
/// instance on a command response (written beside [`RECEIVER_INSTANCE_ID`] in the PURISTA
/// topology mode).
pub const RECEIVER_SERVICE_INSTANCE_ID: &str = "receiverServiceInstanceId";
/// `eventName`.
pub const EVENT_NAME: &str = "eventName";
/// `principalId`.
pub const PRINCIPAL_ID: &str = "principalId";
/// `tenantId`.
pub const TENANT_ID: &str = "tenantId";
/// `replyTo`: on responses, the caller's reply queue (PURISTA's response routing header).
pub const REPLY_TO: &str = "replyTo";
/// On stream frames sent straight to a reply queue: which end of the session the frame is for,
/// [`STREAM_TO_CONSUMER`] or [`STREAM_TO_PRODUCER`] (one instance can be both ends of a session).
pub const STREAM_TO: &str = "x-purista-stream-to";
/// [`STREAM_TO`] of frames from the producer to the consumer.
pub const STREAM_TO_CONSUMER: &str = "consumer";
/// [`STREAM_TO`] of frames from the consumer to the producer (its cancel).
pub const STREAM_TO_PRODUCER: &str = "producer";
/// Delivery attempt of a redelivered message (absent = 1).
pub const ATTEMPT: &str = "x-purista-attempt";
/// Why a message was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "x-purista-dead-letter-reason";
/// Deliveries made before it was dead-lettered.
pub const DEAD_LETTER_ATTEMPTS: &str = "x-purista-dead-letter-attempts";
/// Registration key of the subscription it came from.
pub const DEAD_LETTER_ORIGIN: &str = "x-purista-dead-letter-origin";
/// When it was dead-lettered (epoch ms).
pub const DEAD_LETTERED_AT: &str = "x-purista-dead-lettered-at";
/// The queue it was dead-lettered from: where a replay sends it back to.
pub const DEAD_LETTER_QUEUE: &str = "x-purista-dead-letter-queue";

/// The bookkeeping a replayed dead letter sheds: its attempt count (so it gets the full retry
/// budget again) and its dead-letter notes (it is no longer one).
const RETRY_STATE: [&str; 6] = [
    ATTEMPT,
    DEAD_LETTER_REASON,
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_ORIGIN,
    DEAD_LETTERED_AT,
    DEAD_LETTER_QUEUE,
];

/// Longest dead-letter reason carried in a header (the rest is cut at a character boundary):
/// a handler's text must not eat the room the message itself needs.
pub const MAX_REASON_BYTES: usize = 1024;

/// Headers RabbitMQ adds when it dead-letters a message (from a retry queue back to its source
/// queue). The bridge sheds them when it republishes, so they never pile up over many retries.
const BROKER_BOOKKEEPING: [&str; 7] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// W3C trace-context keys copied from the `otp` carrier into headers.
const TRACE_CONTEXT_KEYS: [&str; 2] = ["traceparent", "tracestate"];

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn put(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(ShortString::from(key), long(value));
}

fn put_opt(table: &mut FieldTable, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        put(table, key, v);
    }
}

/// The header projection of an envelope (what bindings route on), plus trace context.
///
/// ```
/// use purista_bridge_amqp::headers::{project, MESSAGE_TYPE, EVENT_NAME};
/// use purista_core::{Envelope, SenderAddress};
/// let event = Envelope::custom(SenderAddress::default(), "orderPlaced", serde_json::json!({}));
/// let table = project(&event);
/// assert!(table.contains_key(MESSAGE_TYPE) && table.contains_key(EVENT_NAME));
/// assert!(!table.contains_key("principalId"));
/// ```
pub fn project(e: &Envelope) -> FieldTable {
    let mut t = FieldTable::default();
    put(&mut t, MESSAGE_TYPE, e.message_type.as_str());
    put(&mut t, SENDER_SERVICE_NAME, &e.sender.service_name);
    put(&mut t, SENDER_SERVICE_VERSION, &e.sender.service_version);
    put(&mut t, SENDER_SERVICE_TARGET, &e.sender.service_target);
    put(&mut t, SENDER_INSTANCE_ID, &e.sender.instance_id);
    // Info messages never have a receiver, whatever the envelope says: the reference matcher
    // lets no receiver filter match them, and an absent header is how a binding says "no".
    if let Some(r) = e.receiver.as_ref().filter(|_| !e.message_type.is_info()) {
        put(&mut t, RECEIVER_SERVICE_NAME, &r.service_name);
        put(&mut t, RECEIVER_SERVICE_VERSION, &r.service_version);
        put(&mut t, RECEIVER_SERVICE_TARGET, &r.service_target);
        put_opt(&mut t, RECEIVER_INSTANCE_ID, r.instance_id.as_deref());
    }
    put_opt(&mut t, EVENT_NAME, e.event_name.as_deref());
    put_opt(&mut t, PRINCIPAL_ID, e.principal_id.as_deref());
    put_opt(&mut t, TENANT_ID, e.tenant_id.as_deref());
    if let Some(otp) = &e.otp
        && let Ok(Value::Object(carrier)) = serde_json::from_str::<Value>(otp)
    {
        for key in TRACE_CONTEXT_KEYS {
            if let Some(Value::String(v)) = carrier.get(key) {
                put(&mut t, key, v);
            }
        }
    }
    t
}

/// The binding arguments of a subscription filter: `x-match: all` plus each set part.
///
/// ```
/// use purista_bridge_amqp::headers::filter_binding;
/// use purista_core::SubscriptionFilter;
/// let args = filter_binding(&SubscriptionFilter::new().event_name("orderPlaced"));
/// assert_eq!(args.inner().len(), 2); // x-match and eventName
/// ```
pub fn filter_binding(f: &SubscriptionFilter) -> FieldTable {
    let mut t = FieldTable::default();
    put(&mut t, "x-match", "all");
    put_opt(&mut t, MESSAGE_TYPE, f.message_type.map(|m| m.as_str()));
    put_opt(&mut t, EVENT_NAME, f.event_name.as_deref());
    put_opt(&mut t, PRINCIPAL_ID, f.principal_id.as_deref());
    put_opt(&mut t, TENANT_ID, f.tenant_id.as_deref());
    put_opt(
        &mut t,
        SENDER_SERVICE_NAME,
        f.sender.service_name.as_deref(),
    );
    put_opt(
        &mut t,
        SENDER_SERVICE_VERSION,
        f.sender.service_version.as_deref(),
    );
    put_opt(
        &mut t,
        SENDER_SERVICE_TARGET,
        f.sender.service_target.as_deref(),
    );
    put_opt(&mut t, SENDER_INSTANCE_ID, f.sender.instance_id.as_deref());
    put_opt(
        &mut t,
        RECEIVER_SERVICE_NAME,
        f.receiver.service_name.as_deref(),
    );
    put_opt(
        &mut t,
        RECEIVER_SERVICE_VERSION,
        f.receiver.service_version.as_deref(),
    );
    put_opt(
        &mut t,
        RECEIVER_SERVICE_TARGET,
        f.receiver.service_target.as_deref(),
    );
    put_opt(
        &mut t,
        RECEIVER_INSTANCE_ID,
        f.receiver.instance_id.as_deref(),
    );
    t
}

/// The binding of a command queue: commands to that endpoint (any receiver instance).
pub fn command_binding(address: &Address) -> FieldTable {
    let mut t = FieldTable::default();
    put(&mut t, "x-match", "all");
    put(&mut t, MESSAGE_TYPE, "command");
    put(&mut t, RECEIVER_SERVICE_NAME, &address.service_name);
    put(&mut t, RECEIVER_SERVICE_VERSION, &address.service_version);
    put(&mut t, RECEIVER_SERVICE_TARGET, &address.service_target);
    t
}

/// A string header, if present as a string.
pub fn get_str<'a>(table: Option<&'a FieldTable>, key: &str) -> Option<&'a str> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// An unsigned integer header, whatever integer type the writer chose.
pub fn get_u64(table: Option<&FieldTable>, key: &str) -> Option<u64> {
    match table?.inner().get(key)? {
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// The delivery attempt a message carries (1 when the header is absent or unreadable).
pub fn attempt(table: Option<&FieldTable>) -> u32 {
    get_u64(table, ATTEMPT)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v >= 1)
        .unwrap_or(1)
}

/// `table` without the attempt count and the dead-letter notes; everything else (the header
/// projection, trace context) stays.
pub(crate) fn without_retry_state(table: &FieldTable) -> FieldTable {
    table
        .inner()
        .iter()
        .filter(|(key, _)| !RETRY_STATE.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into()
}

/// `table` without RabbitMQ's dead-lettering bookkeeping (`x-death`, `x-first-death-*`,
/// `x-last-death-*`).
pub(crate) fn without_broker_bookkeeping(table: &FieldTable) -> FieldTable {
    table
        .inner()
        .iter()
        .filter(|(key, _)| !BROKER_BOOKKEEPING.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect::<std::collections::BTreeMap<_, _>>()
        .into()
}

/// True for the headers a message keeps when the bridge must shed headers to make it fit one
/// frame: the message type, where a response goes, and the bridge's own bookkeeping.
pub(crate) fn is_kept_when_shrinking(key: &str) -> bool {
    key == MESSAGE_TYPE || key == REPLY_TO || key.starts_with("x-purista-")
}

/// Roughly how many bytes a header value takes (exact for strings and integers): enough to
/// pick the largest one to shed.
pub(crate) fn value_len(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::LongString(s) => s.as_bytes().len() + 5,
        AMQPValue::ShortString(s) => s.as_str().len() + 2,
        AMQPValue::FieldTable(t) => {
            t.inner()
                .iter()
                .map(|(k, v)| k.as_str().len() + 1 + value_len(v))
                .sum::<usize>()
                + 5
        }
        AMQPValue::FieldArray(a) => a.as_slice().iter().map(value_len).sum::<usize>() + 5,
        AMQPValue::ByteArray(b) => b.as_slice().len() + 5,
        _ => 9,
    }
}

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary.
pub(crate) fn cut_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Sets an unsigned integer header.
pub fn set_u64(table: &mut FieldTable, key: &str, value: u64) {
    table.insert(
        ShortString::from(key),
        AMQPValue::LongLongInt(i64::try_from(value).unwrap_or(i64::MAX)),
    );
}

/// Sets a string header.
pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    put(table, key, value);
}

#[cfg(test)]
mod tests {
    use purista_core::filter::filter_table;
    use purista_core::{MessageType, SenderAddress};

    use super::*;

    /// What a headers exchange with `x-match: all` does, written out: every binding argument
    /// other than `x-*` must be present in the message with an equal value.
    fn broker_matches(binding: &FieldTable, message: &FieldTable) -> bool {
        binding
            .inner()
            .iter()
            .filter(|(k, _)| !k.as_str().starts_with("x-"))
            .all(|(k, v)| message.inner().get(k.as_str()) == Some(v))
    }

    #[test]
    fn bindings_agree_with_the_reference_matcher_on_every_filter_table_row() {
        for case in filter_table() {
            let routed = broker_matches(&filter_binding(&case.filter), &project(&case.message));
            assert_eq!(routed, case.expected, "row `{}`", case.name);
            assert_eq!(
                routed,
                case.filter.matches(&case.message),
                "row `{}`",
                case.name
            );
        }
    }

    #[test]
    fn unset_filter_parts_are_absent_from_the_binding() {
        let args = filter_binding(&SubscriptionFilter::new());
        assert_eq!(args.inner().len(), 1);
        assert_eq!(get_str(Some(&args), "x-match"), Some("all"));
    }

    #[test]
    fn info_messages_carry_no_receiver_headers() {
        let mut info = Envelope::info(
            MessageType::InfoServiceReady,
            SenderAddress::default(),
            Value::Null,
        );
        info.receiver = Some(Address::new("a", "1", "b"));
        assert!(!project(&info).contains_key(RECEIVER_SERVICE_NAME));
    }

    #[test]
    fn trace_context_from_otp_becomes_headers() {
        let mut e = Envelope::custom(SenderAddress::default(), "x", Value::Null);
        e.otp = Some(r#"{"traceparent":"00-abc-def-01"}"#.into());
        assert_eq!(
            get_str(Some(&project(&e)), "traceparent"),
            Some("00-abc-def-01")
        );
    }

    #[test]
    fn attempt_defaults_to_one_and_reads_any_integer() {
        assert_eq!(attempt(None), 1);
        let mut t = FieldTable::default();
        set_u64(&mut t, ATTEMPT, 3);
        assert_eq!(attempt(Some(&t)), 3);
        t.insert(ATTEMPT.into(), AMQPValue::LongInt(0));
        assert_eq!(attempt(Some(&t)), 1);
    }

    #[test]
    fn a_fresh_budget_drops_the_attempt_and_the_dead_letter_notes_only() {
        let event = Envelope::custom(SenderAddress::default(), "sold", Value::Null);
        let mut t = project(&event);
        set_u64(&mut t, ATTEMPT, 3);
        set_str(
            &mut t,
            DEAD_LETTER_REASON,
            "retries exhausted after 3 attempt(s)",
        );
        set_u64(&mut t, DEAD_LETTER_ATTEMPTS, 3);
        set_str(&mut t, DEAD_LETTER_ORIGIN, "listener@1/onSold");
        set_u64(&mut t, DEAD_LETTERED_AT, 1);
        set_str(&mut t, DEAD_LETTER_QUEUE, "p.sub.listener.1.onSold");
        assert_eq!(without_retry_state(&t), project(&event));
    }
}
