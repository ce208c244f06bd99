//! Publishing with publisher confirms: every publish waits for the broker's verdict.
//!
//! One confirm-mode channel per connection carries every publish of the instance (lapin
//! pipelines them; each waits only for its own confirm). The verdict is one of three:
//! confirmed, returned (a `mandatory` publish that reached no queue, i.e. a command nobody
//! serves), or nacked (the broker refused to take responsibility, e.g. a full queue that
//! rejects publishes). Callers turn the last two into an immediate error instead of waiting for
//! a response that cannot come.
//!
//! If the broker closes the channel (a channel-level error) while the connection lives on, the
//! next publish opens a fresh one ([`ChannelSlot`]).

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use parking_lot::Mutex;
use purista_core::{BridgeError, Envelope};

use crate::config::TopologyMode;
use crate::headers;

/// AMQP delivery mode 2: the broker writes the message to disk in durable queues.
const PERSISTENT: u8 = 2;
/// AMQP delivery mode 1: kept in memory only.
const TRANSIENT: u8 = 1;

/// The broker's verdict on one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Taken by the broker (and routed, for mandatory publishes).
    Confirmed,
    /// A mandatory publish that reached no queue.
    Returned {
        /// AMQP reply code, e.g. 312 NO_ROUTE.
        code: u16,
        /// Broker text.
        text: String,
    },
    /// The broker refused the message.
    Nacked,
}

/// What to publish where.
pub(crate) struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub mandatory: bool,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// A channel that is reopened when the broker closed it (a channel-level error) while the
/// connection lives on. Confirm mode for publishing, plain for declarations.
pub(crate) struct ChannelSlot {
    confirm: bool,
    channel: Mutex<Channel>,
    reopen: tokio::sync::Mutex<()>,
}

impl ChannelSlot {
    /// Opens the first channel on `connection`.
    pub(crate) async fn open(connection: &Connection, confirm: bool) -> Result<Self, lapin::Error> {
        let channel = open_channel(connection, confirm).await?;
        Ok(ChannelSlot {
            confirm,
            channel: Mutex::new(channel),
            reopen: tokio::sync::Mutex::new(()),
        })
    }

    /// A live channel: the current one, or a fresh one when the broker closed it.
    pub(crate) async fn get(&self, connection: &Connection) -> Result<Channel, lapin::Error> {
        let current = self.channel.lock().clone();
        if current.status().connected() {
            return Ok(current);
        }
        // One reopen at a time; whoever waited here finds the fresh channel.
        let _reopen = self.reopen.lock().await;
        let current = self.channel.lock().clone();
        if current.status().connected() {
            return Ok(current);
        }
        let fresh = open_channel(connection, self.confirm).await?;
        *self.channel.lock() = fresh.clone();
        tracing::debug!(confirm = self.confirm, "channel reopened");
        Ok(fresh)
    }
}

async fn open_channel(connection: &Connection, confirm: bool) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    if confirm {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    Ok(channel)
}

/// Publishes on a confirm-mode channel and waits for the broker's verdict.
pub(crate) async fn publish(channel: &Channel, out: Outgoing<'_>) -> Result<Verdict, BridgeError> {
    let unavailable =
        |e: lapin::Error| BridgeError::Unavailable(format!("publishing to the broker failed: {e}"));
    let exchange = ShortString::try_new(out.exchange)
        .map_err(|_| BridgeError::InvalidRequest("exchange name too long".into()))?;
    let routing_key = ShortString::try_new(out.routing_key)
        .map_err(|_| BridgeError::InvalidRequest("routing key too long".into()))?;
    let confirm = channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: out.mandatory,
                ..BasicPublishOptions::default()
            },
            out.body,
            out.properties,
        )
        .await
        .map_err(unavailable)?
        .await
        .map_err(unavailable)?;
    Ok(match confirm {
        Confirmation::Nack(_) => Verdict::Nacked,
        Confirmation::Ack(Some(returned)) => Verdict::Returned {
            code: returned.reply_code,
            text: returned.reply_text.to_string(),
        },
        Confirmation::Ack(None) | Confirmation::NotRequested => Verdict::Confirmed,
    })
}

/// AMQP properties of an envelope: ids, type, content description, timestamp (seconds, as AMQP
/// defines it), persistent delivery, and the header projection.
pub(crate) fn properties(envelope: &Envelope, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_message_id(short(&envelope.id))
        .with_type(ShortString::from(envelope.message_type.as_str()))
        .with_content_type(short(&envelope.content_type))
        .with_content_encoding(short(&envelope.content_encoding))
        .with_timestamp(envelope.timestamp / 1000)
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers);
    if let Some(correlation_id) = &envelope.correlation_id {
        p = p.with_correlation_id(short(correlation_id));
    }
    p
}

/// `props` as the topology mode writes them: unchanged in the native mode; in the PURISTA mode
/// the AMQP timestamp in milliseconds and, on a command response, the receiver's instance also
/// under PURISTA's header name, as PURISTA's TypeScript bridge writes both.
pub(crate) fn in_mode(
    props: BasicProperties,
    envelope: &Envelope,
    mode: TopologyMode,
) -> BasicProperties {
    if mode == TopologyMode::Native {
        return props;
    }
    let mut table = props.headers().clone().unwrap_or_default();
    mode_headers(&mut table, envelope, mode);
    timestamp_in_mode(props.with_headers(table), envelope, mode)
}

/// Adds the headers the topology mode writes beside the projection (see [`in_mode`]).
pub(crate) fn mode_headers(table: &mut FieldTable, envelope: &Envelope, mode: TopologyMode) {
    let instance = envelope
        .receiver
        .as_ref()
        .and_then(|r| r.instance_id.as_deref())
        .filter(|_| mode == TopologyMode::Purista && envelope.message_type.is_response());
    if let Some(instance) = instance {
        headers::set_str(table, headers::RECEIVER_SERVICE_INSTANCE_ID, instance);
    }
}

/// The AMQP timestamp in the topology mode's unit: seconds (AMQP's) or milliseconds (PURISTA's).
pub(crate) fn timestamp_in_mode(
    props: BasicProperties,
    envelope: &Envelope,
    mode: TopologyMode,
) -> BasicProperties {
    match mode {
        TopologyMode::Native => props,
        TopologyMode::Purista => props.with_timestamp(envelope.timestamp),
    }
}

/// The properties of a command: expiring after `ttl_ms`, so no command is served after its
/// caller gave up, and answered on `reply_to`.
pub(crate) fn command_properties(
    envelope: &Envelope,
    reply_to: &str,
    ttl_ms: u64,
) -> BasicProperties {
    properties(envelope, headers::project(envelope))
        .with_reply_to(short(reply_to))
        .with_expiration(ShortString::from(ttl_ms.max(1).to_string()))
}

/// The properties of a response to a command that asked for replies on `reply_to`.
pub(crate) fn response_properties(envelope: &Envelope, reply_to: Option<&str>) -> BasicProperties {
    let mut table = headers::project(envelope);
    if let Some(reply_to) = reply_to {
        headers::set_str(&mut table, headers::REPLY_TO, reply_to);
    }
    properties(envelope, table)
}

/// The properties of a stream frame sent straight to the reply queue of one end of a session
/// (`to` is [`headers::STREAM_TO_CONSUMER`] or [`headers::STREAM_TO_PRODUCER`]); `reply_to`
/// names the sender's own reply queue, where the other end answers (an open frame's producer
/// sends its frames there, a consumer sends its cancel there). Not persistent: a session dies
/// with its connections anyway.
pub(crate) fn stream_properties(envelope: &Envelope, to: &str, reply_to: &str) -> BasicProperties {
    let mut table = headers::project(envelope);
    headers::set_str(&mut table, headers::STREAM_TO, to);
    properties(envelope, table)
        .with_delivery_mode(TRANSIENT)
        .with_reply_to(short(reply_to))
}

/// A copy of `props` for republishing a delivery (retry, dead letter): same ids and headers,
/// no expiration (a copy must not expire on its way), `table` as headers without RabbitMQ's
/// dead-lettering bookkeeping (a copy starts a fresh `x-death` history, so retries never pile
/// it up).
pub(crate) fn republish_properties(props: &BasicProperties, table: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers::without_broker_bookkeeping(&table));
    if let Some(v) = props.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = props.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = props.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = props.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = props.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = props.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    p
}

/// The bytes `properties` take on the wire (property flags and every value, the headers table
/// included), as lapin encodes them: what must fit one content-header frame with the frame's
/// fixed overhead (see `budget.rs`).
pub(crate) fn metadata_len(properties: &BasicProperties) -> usize {
    let encode = lapin::protocol::basic::gen_properties::<Vec<u8>>(properties);
    match encode(Vec::new().into()) {
        Ok(written) => usize::try_from(written.position).unwrap_or(usize::MAX),
        // Only a writer that runs out of room fails; a Vec never does.
        Err(_) => usize::MAX,
    }
}

/// Envelope fields are free text; an AMQP short string holds 255 bytes. Longer values keep a
/// prefix in the property (the body always has the full value).
fn short(s: &str) -> ShortString {
    if s.len() <= 255 {
        return ShortString::from(s);
    }
    let mut end = 255;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

#[cfg(test)]
mod tests {
    use purista_core::{Address, SenderAddress};

    use super::*;

    #[test]
    fn commands_expire_with_their_ttl_and_name_the_reply_queue() {
        let cmd = Envelope::command(
            SenderAddress::default(),
            Address::new("a", "1", "b"),
            serde_json::json!(1),
            serde_json::json!({}),
        );
        let p = command_properties(&cmd, "p.reply.i", 2500);
        assert_eq!(
            p.expiration().as_ref().map(ShortString::as_str),
            Some("2500")
        );
        assert_eq!(
            p.reply_to().as_ref().map(ShortString::as_str),
            Some("p.reply.i")
        );
        assert_eq!(p.kind().as_ref().map(ShortString::as_str), Some("command"));
        assert_eq!(p.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(p.timestamp(), &Some(cmd.timestamp / 1000));
    }

    #[test]
    fn metadata_len_counts_every_property_and_header_byte() {
        let bare = metadata_len(&BasicProperties::default());
        assert_eq!(bare, 2, "only the property flags");
        let mut table = FieldTable::default();
        headers::set_str(&mut table, "k", "vvvv");
        // flags 2 + table length 4 + key (1 + 1) + type 1 + string length 4 + value 4
        assert_eq!(
            metadata_len(&BasicProperties::default().with_headers(table)),
            2 + 4 + 2 + 1 + 4 + 4
        );
        let with_id = BasicProperties::default().with_message_id("abc".into());
        assert_eq!(metadata_len(&with_id), 2 + 1 + 3);
    }

    #[test]
    fn a_republished_copy_sheds_the_brokers_dead_lettering_headers() {
        let mut table = FieldTable::default();
        headers::set_str(&mut table, "x-first-death-queue", "q");
        headers::set_str(&mut table, "eventName", "sold");
        let copy = republish_properties(&BasicProperties::default(), table);
        let headers = copy.headers().as_ref().expect("headers");
        assert!(!headers.contains_key("x-first-death-queue"));
        assert!(headers.contains_key("eventName"));
    }

    #[test]
    fn long_property_values_are_cut_at_a_char_boundary() {
        let s = "é".repeat(200);
        assert!(short(&s).as_str().len() <= 255);
    }
}
