//! Publishing: an envelope as an Events event on the channel that spells its filter fields
//! (so KubeMQ routes it to exactly the matching subscriptions), probes, and queue messages.
//! Every call has a deadline ([`kit::broker_call`]).

use std::collections::HashMap;

use kubemq::{Event, QueueMessage};
use purista_core::kit;
use purista_core::{BridgeError, Envelope};

use crate::connection::sdk_error;
use crate::shared::{PROBE_TAG, Shared};

/// Encodes `message` and checks it against the payload limit (400 at the caller when over).
pub fn encode_checked(shared: &Shared, message: &Envelope) -> Result<Vec<u8>, BridgeError> {
    let bytes = message.encode();
    let limits = purista_core::Limits {
        max_payload_bytes: Some(shared.config.max_payload_bytes),
        ..Default::default()
    };
    kit::check_body(bytes.len(), &limits)?;
    Ok(bytes)
}

/// Publishes already encoded `bytes` of `message` as an Events event, and into the queue of
/// every durable subscription it belongs to ([`crate::durable`]).
pub async fn publish_event(
    shared: &Shared,
    message: &Envelope,
    bytes: Vec<u8>,
) -> Result<(), BridgeError> {
    let durable =
        crate::durable::fan_out(shared, crate::durable::deliveries(shared, message, &bytes));
    let event = Event::builder()
        .id(message.id.clone())
        .channel(shared.channels.event(message))
        .body(bytes)
        .build();
    futures::future::try_join(send_event(shared, event), durable)
        .await
        .map(|_| ())
}

/// Publishes already encoded `bytes` of `message` for the subscriptions, where its sender only
/// logs a failure (a command announced, a command's response): on the instance's event pipe
/// ([`crate::pipe`]) when it belongs to no durable subscription and the pipe takes it, else as
/// [`publish_event`] does.
pub async fn publish_best_effort(
    shared: &Shared,
    message: &Envelope,
    bytes: Vec<u8>,
) -> Result<(), BridgeError> {
    if !shared.durable.any_for(message) {
        let event = kubemq::proto::kubemq::Event {
            event_id: message.id.clone(),
            client_id: shared.connection.client_id.clone(),
            channel: shared.channels.event(message),
            metadata: String::new(),
            body: bytes,
            store: false,
            tags: HashMap::new(),
        };
        return match shared
            .pipe
            .offer(&shared.tasks, &shared.connection.raw, event)
        {
            Ok(()) => Ok(()),
            Err(event) => {
                let event = *event;
                let event = Event::builder()
                    .id(event.event_id)
                    .channel(event.channel)
                    .body(event.body)
                    .build();
                // Boxed: the unary path is the rare one, and its future is large.
                Box::pin(send_event(shared, event)).await
            }
        };
    }
    Box::pin(publish_event(shared, message, bytes)).await
}

/// Sends a readiness probe event on `channel`.
pub async fn publish_probe(shared: &Shared, channel: &str, id: &str) {
    let mut tags = HashMap::new();
    tags.insert(PROBE_TAG.to_string(), id.to_string());
    let event = Event::builder()
        .channel(channel)
        .metadata("probe")
        .tags(tags)
        .build();
    if let Err(error) = send_event(shared, event).await {
        tracing::debug!(%error, "readiness probe not sent");
    }
}

/// Sends one event with a deadline.
pub async fn send_event(shared: &Shared, event: Event) -> Result<(), BridgeError> {
    let sdk = &shared.connection.sdk;
    kit::broker_call(
        shared.config.publish_timeout,
        "publishing an event",
        async {
            sdk.send_event(event)
                .await
                .map_err(|e| sdk_error("publishing an event to KubeMQ", e))
        },
    )
    .await
}

/// Sends one queue message; `Err` when KubeMQ refused it.
pub async fn send_queue_message(shared: &Shared, message: QueueMessage) -> Result<(), BridgeError> {
    let sdk = &shared.connection.sdk;
    let result = kit::broker_call(
        shared.config.publish_timeout,
        "sending a queue message",
        async {
            sdk.send_queue_message(message)
                .await
                .map_err(|e| sdk_error("sending a queue message to KubeMQ", e))
        },
    )
    .await?;
    if result.is_error {
        return Err(BridgeError::Broker(format!(
            "KubeMQ refused the queue message: {}",
            result.error
        )));
    }
    Ok(())
}
