//! One queue, one config, across every bridge instance: the first declaration of a queue is
//! the one in force (core's rule, [`QueueDeclaration::check_redeclaration`]).
//!
//! KubeMQ has no queue declarations, so the bridge keeps them in the Events Store: each
//! declaring instance stores its declaration on the queue's declaration channel and then reads
//! that channel's first event (sequence 1). The store orders concurrent writers, so every
//! instance reads the same first declaration and compares its own with it.

use std::time::Duration;

use kubemq::proto::kubemq::{
    Event, Subscribe,
    subscribe::{EventsStoreType, SubscribeType},
};
use purista_core::queue::{QueueDeclaration, QueueError};

use crate::connection::RawClient;

/// The declaration in force for the queue whose declarations live on `channel`, after adding
/// `ours`.
pub async fn first_declaration(
    mut raw: RawClient,
    client_id: &str,
    channel: &str,
    ours: &QueueDeclaration,
    timeout: Duration,
) -> Result<QueueDeclaration, QueueError> {
    let body = serde_json::to_vec(ours)
        .map_err(|e| QueueError::InvalidRequest(format!("the declaration does not encode: {e}")))?;
    let event = Event {
        event_id: purista_core::ids::new_id(),
        client_id: client_id.to_string(),
        channel: channel.to_string(),
        metadata: "purista-queue-declaration".into(),
        body,
        store: true,
        tags: Default::default(),
    };
    let read = async {
        let stored = raw
            .send_event(event)
            .await
            .map_err(|s| {
                QueueError::Unavailable(format!("storing the queue declaration: {}", s.message()))
            })?
            .into_inner();
        if !stored.sent {
            return Err(QueueError::Broker(format!(
                "KubeMQ did not store the queue declaration: {}",
                stored.error
            )));
        }
        let subscribe = Subscribe {
            subscribe_type_data: SubscribeType::EventsStore as i32,
            client_id: format!("{client_id}-declarations-{}", purista_core::ids::new_id()),
            channel: channel.to_string(),
            group: String::new(),
            events_store_type_data: EventsStoreType::StartAtSequence as i32,
            events_store_type_value: 1,
        };
        let mut events = raw
            .subscribe_to_events(subscribe)
            .await
            .map_err(|s| {
                QueueError::Unavailable(format!("reading queue declarations: {}", s.message()))
            })?
            .into_inner();
        match events.message().await {
            Ok(Some(first)) => {
                serde_json::from_slice::<QueueDeclaration>(&first.body).map_err(|e| {
                    QueueError::Broker(format!(
                        "the first declaration on `{channel}` is not a queue declaration: {e}"
                    ))
                })
            }
            Ok(None) => Err(QueueError::Unavailable(
                "KubeMQ ended the declaration stream".into(),
            )),
            Err(s) => Err(QueueError::Unavailable(format!(
                "reading queue declarations: {}",
                s.message()
            ))),
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| {
            Err(QueueError::Unavailable(format!(
                "KubeMQ did not answer the queue declaration within {} ms",
                timeout.as_millis()
            )))
        })
}
