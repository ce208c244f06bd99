//! Raw publishing into a deployment's exchange, like a foreign client of the broker: bytes go
//! out exactly as given, routed by the bridge's header projection (a headers exchange routes
//! on nothing else), so a case can put a fixed sender, one message id twice, or bytes that are
//! no envelope at all in front of the consumers.

use async_trait::async_trait;
use purista_bridge_amqp::headers;
use purista_bridge_amqp::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use purista_bridge_amqp::lapin::types::ShortString;
use purista_bridge_amqp::lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
};
use purista_core::Envelope;
use tokio::sync::OnceCell;

use crate::harness::RawPublisher;

/// AMQP delivery mode 2 (persistent), as the bridge publishes.
const PERSISTENT: u8 = 2;

/// A publisher on a connection of its own, opened on first use (most cases never publish raw).
pub(super) struct AmqpRawPublisher {
    url: String,
    exchange: String,
    connection_name: String,
    link: OnceCell<(Connection, Channel)>,
}

impl AmqpRawPublisher {
    pub(super) fn new(url: &str, exchange: &str, prefix: &str) -> Self {
        AmqpRawPublisher {
            url: url.to_string(),
            exchange: exchange.to_string(),
            // Not `purista <prefix> …`: dropping the deployment's connections leaves it alone.
            connection_name: format!("purista-conformance-raw {prefix}"),
            link: OnceCell::new(),
        }
    }

    async fn channel(&self) -> Result<Channel, String> {
        let (_, channel) = self
            .link
            .get_or_try_init(|| async {
                let properties = ConnectionProperties::default()
                    .with_connection_name(self.connection_name.as_str().into());
                let connection = Connection::connect(&self.url, properties)
                    .await
                    .map_err(|e| format!("raw publisher cannot connect: {e}"))?;
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(|e| format!("raw publisher cannot open a channel: {e}"))?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| format!("raw publisher cannot enable confirms: {e}"))?;
                Ok::<_, String>((connection, channel))
            })
            .await?;
        Ok(channel.clone())
    }

    /// Publishes `bytes` with `properties` and waits for the broker's confirm.
    async fn send(&self, bytes: &[u8], properties: BasicProperties) -> Result<(), String> {
        let channel = self.channel().await?;
        let exchange = ShortString::try_new(self.exchange.as_str()).map_err(|e| e.to_string())?;
        let confirm = channel
            .basic_publish(
                exchange,
                ShortString::from(""),
                BasicPublishOptions::default(),
                bytes,
                properties,
            )
            .await
            .map_err(|e| format!("raw publish failed: {e}"))?
            .await
            .map_err(|e| format!("raw publish not confirmed: {e}"))?;
        match confirm {
            Confirmation::Nack(_) => Err("the broker refused the raw message".into()),
            _ => Ok(()),
        }
    }

    /// Closes the connection, if one was opened.
    pub(super) async fn close(&self) {
        if let Some((connection, _)) = self.link.get() {
            let _ = connection.close(200, "OK".into()).await;
        }
    }
}

fn short(s: &str) -> Option<ShortString> {
    ShortString::try_new(s).ok()
}

/// What the bridge sets on an envelope it publishes: ids, type, content description, timestamp,
/// persistent delivery and the header projection. (Values too long for a property stay in the
/// body only.)
fn properties_of(envelope: &Envelope) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_type(ShortString::from(envelope.message_type.as_str()))
        .with_timestamp(envelope.timestamp / 1000)
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers::project(envelope));
    if let Some(v) = short(&envelope.id) {
        p = p.with_message_id(v);
    }
    if let Some(v) = envelope.correlation_id.as_deref().and_then(short) {
        p = p.with_correlation_id(v);
    }
    if let Some(v) = short(&envelope.content_type) {
        p = p.with_content_type(v);
    }
    if let Some(v) = short(&envelope.content_encoding) {
        p = p.with_content_encoding(v);
    }
    p
}

#[async_trait]
impl RawPublisher for AmqpRawPublisher {
    async fn publish(&self, bytes: &[u8]) -> Result<(), String> {
        let envelope = Envelope::decode(bytes).map_err(|e| format!("not an envelope: {e}"))?;
        self.send(bytes, properties_of(&envelope)).await
    }

    async fn publish_undecodable(&self, bytes: &[u8], route_as: &Envelope) -> Result<(), String> {
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers::project(route_as));
        self.send(bytes, properties).await
    }
}
