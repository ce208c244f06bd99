//! Responses: the per-instance reply queue's consumer and the pending invocations it completes.
//!
//! Each invocation registers a pending entry (core's `PendingInvocations`) under its
//! `correlationId` before the command is published; the entry is removed however the invocation ends (response, timeout, error, or
//! the caller dropping its future). A response that finds no entry — it came after the
//! timeout, or carries an unknown correlation id — is ignored with a warning and counted
//! (`unmatched_responses`). Anything else on the reply queue (bytes that do not decode, a body
//! over the size limit, a valid envelope that is not a response) is poison: dropped with a
//! warning naming the queue and counted (`poison_messages`); the consumer goes on.
//!
//! The reply queue also carries stream frames of this instance's sessions, both ends: they
//! go to the session table (`streams.rs`) by `correlationId`, never to an invocation.
//!
//! On connection loss every pending invocation fails at once with 503: its response would
//! have arrived on a reply queue that died with the connection.

use std::sync::Arc;

use futures::StreamExt;
use purista_core::{Envelope, MessageType};

use crate::shared::Shared;
use crate::streams;

/// Consumes the reply queue (auto-ack: a response is useful once, or never) until the
/// consumer ends with its connection. Stream frames are routed to their sessions without
/// waiting: this loop completes every invocation of the instance and must not stall.
pub(crate) async fn run_reply_consumer(mut consumer: lapin::Consumer, shared: &Arc<Shared>) {
    let queue = shared.topology.reply_queue();
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(d) => d,
            Err(error) => {
                tracing::debug!(%error, "reply consumer ended");
                break;
            }
        };
        match Envelope::decode_with_limit(&delivery.data, shared.config.max_payload_bytes) {
            Ok(response) if response.message_type.is_response() => {
                shared.work.inbox.resolve(response)
            }
            Ok(frame) if frame.message_type == MessageType::Stream => {
                streams::route(shared, frame, &delivery.properties);
            }
            Ok(other) => {
                shared.ledger.count_poison();
                tracing::warn!(
                    %queue,
                    message_id = %other.id,
                    message_type = %other.message_type,
                    "non-response, non-stream message on the reply queue dropped"
                );
            }
            Err(error) => {
                shared.ledger.count_poison();
                tracing::warn!(
                    %queue,
                    %error,
                    bytes = delivery.data.len(),
                    "undecodable message on the reply queue dropped"
                );
            }
        }
    }
}
