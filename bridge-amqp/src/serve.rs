//! Serving commands: one task per command delivery runs the handler, publishes the response
//! and acks.
//!
//! Commands are served at most once: a command the broker redelivers (its first consumer went
//! away mid-handling) is answered with 503 instead of being run a second time, and a command
//! whose ttl passed while it waited in the client's prefetch buffer is dropped unserved. A
//! command that reaches an instance after it began to unregister is not requeued (that would
//! mark it redelivered) but handed back as a fresh copy with the rest of its ttl.
//!
//! A response goes through the exchange (subscriptions see it, e.g. a success event) to the
//! caller's reply queue by its `replyTo` header, and carries the command's principal, tenant
//! and trace context in its header projection. A command whose own projection is over the
//! bridge's metadata limit (a foreign caller's: this bridge refuses to send one) is not run: it
//! is answered with 400. A response that would still not fit one frame sheds the largest
//! headers of its projection (the body keeps every field; `replyTo` stays, so the caller gets
//! it).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use purista_core::envelope::now_ms;
use purista_core::{
    BridgeError, CommandHandler, Envelope, ErrorPayload, MessageType, StatusCode, WorkKind, ids,
};

use crate::budget;
use crate::delivery::{self, Taken};
use crate::headers;
use crate::publish::{self, Outgoing, Verdict};
use crate::registry::Registration;
use crate::shared::Shared;
use crate::suspects;

/// How long a hand-back waits for the unregister or shutdown to deal with the queue.
const RETIRE_WAIT: Duration = Duration::from_secs(5);

/// Decodes a delivery of a command queue. Anything but a command is poison: counted and
/// warned about here; the caller acks (drops) it.
fn decode_command(shared: &Shared, reg: &Registration, data: &[u8]) -> Option<Envelope> {
    match Envelope::decode_with_limit(data, shared.config.max_payload_bytes) {
        Ok(command) if command.message_type == MessageType::Command => Some(command),
        Ok(other) => {
            shared.ledger.count_poison();
            tracing::warn!(registration = %reg.label, queue = %reg.queue, message_id = %other.id, message_type = %other.message_type, "non-command on a command queue dropped");
            None
        }
        Err(error) => {
            shared.ledger.count_poison();
            tracing::warn!(registration = %reg.label, queue = %reg.queue, %error, bytes = data.len(), "undecodable command dropped");
            None
        }
    }
}

/// True when the command's ttl (the AMQP expiration its caller set) has passed.
fn expired(command: &Envelope, properties: &BasicProperties) -> bool {
    let ttl = properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok());
    ttl.is_some_and(|ttl| command.timestamp.saturating_add(ttl) < now_ms())
}

/// True when the command's header projection is over what a caller may send: its response,
/// which carries the same principal, tenant and trace context, would be too.
fn oversized(shared: &Shared, command: &Envelope) -> bool {
    let Some(session) = shared.link.current() else {
        return false;
    };
    let size = publish::metadata_len(&publish::properties(command, headers::project(command)));
    size > session.budget.caller
}

/// Runs one command delivery in a task: handler, response, ack.
pub(crate) fn serve_command(
    shared: &Arc<Shared>,
    reg: &Arc<Registration>,
    handler: Arc<dyn CommandHandler>,
    taken: Taken,
) {
    let (task_shared, task_reg) = (shared.clone(), reg.clone());
    // Counted from now, not from when the task first runs: an unregister must not close the
    // channel under a command that is about to be served.
    let active = reg.activity.enter();
    let run = async move {
        let (shared, reg) = (task_shared, task_reg);
        let _active = active;
        let mut taken = taken;
        let _turn = taken.turn(&shared, &reg).await;
        let Taken { delivery, held, .. } = taken;
        let lapin::message::Delivery {
            data,
            properties,
            acker,
            redelivered,
            ..
        } = delivery;
        let Some(command) = decode_command(&shared, &reg, &data) else {
            if delivery::ack(&acker).await.is_ok() {
                suspects::settled(held);
            }
            return;
        };
        if expired(&command, &properties) {
            tracing::debug!(registration = %reg.label, correlation_id = command.correlation_id.as_deref().unwrap_or(""), "command expired before it was served; dropped");
            if delivery::ack(&acker).await.is_ok() {
                suspects::settled(held);
            }
            return;
        }
        let command = Arc::new(command);
        let correlation_id = command.correlation_id.as_deref().unwrap_or("");
        let response = if redelivered {
            tracing::warn!(
                registration = %reg.label,
                correlation_id,
                "redelivered command answered with 503: the instance that took it went away, and commands are not retried"
            );
            unhandled(&command, StatusCode::SERVICE_UNAVAILABLE)
        } else if oversized(&shared, &command) {
            shared.ledger.count_poison();
            tracing::warn!(registration = %reg.label, queue = %reg.queue, correlation_id, "command with headers over the metadata limit answered with 400 unserved");
            unhandled(&command, StatusCode::BAD_REQUEST)
        } else {
            match AssertUnwindSafe(handler.handle(command.clone()))
                .catch_unwind()
                .await
            {
                Ok(response) => response,
                Err(_) => {
                    tracing::error!(registration = %reg.label, correlation_id, "command handler panicked; answering 500");
                    unhandled(&command, StatusCode::INTERNAL_SERVER_ERROR)
                }
            }
        };
        respond(&shared, &reg, &command, response, &properties).await;
        match delivery::ack(&acker).await {
            Ok(()) => {
                suspects::settled(held);
            }
            Err(error) => {
                tracing::debug!(registration = %reg.label, %error, "acking a served command failed");
            }
        }
    };
    if !shared
        .work
        .tasks
        .spawn(WorkKind::Command, reg.label.clone(), run)
    {
        tracing::debug!(registration = %reg.label, "bridge shut down: command left to the broker");
    }
}

/// Stamps a command's response as this instance's and publishes it to the caller.
async fn respond(
    shared: &Shared,
    reg: &Registration,
    command: &Envelope,
    mut response: Envelope,
    properties: &BasicProperties,
) {
    response.id = ids::new_id();
    response.timestamp = now_ms();
    response.sender.instance_id.clone_from(&shared.instance_id);
    if response.correlation_id.is_none() {
        response.correlation_id = command.correlation_id.clone();
    }
    if response.receiver.is_none() {
        response.receiver = Some(command.sender.to_address());
    }
    let reply_to = properties.reply_to().as_ref().map(|r| r.to_string());
    if let Err(error) = publish_response(shared, &response, reply_to.as_deref()).await {
        tracing::warn!(registration = %reg.label, correlation_id = response.correlation_id.as_deref().unwrap_or(""), %error, "response could not be published");
    }
}

/// Publishes a command's response to the exchange: subscriptions see it through the header
/// projection, the caller's reply queue through the `replyTo` header.
async fn publish_response(
    shared: &Shared,
    response: &Envelope,
    reply_to: Option<&str>,
) -> Result<(), BridgeError> {
    let session = shared.link.connected()?;
    let body = response.encode();
    let mode = shared.config.topology;
    let mut properties = publish::in_mode(
        publish::response_properties(response, reply_to),
        response,
        mode,
    );
    let limit = session.budget.republish;
    if publish::metadata_len(&properties) > limit {
        let mut table: FieldTable = properties.headers().clone().unwrap_or_default();
        let measure =
            |t: &FieldTable| publish::metadata_len(&publish::properties(response, t.clone()));
        let shed = budget::shrink(&mut table, limit, measure);
        tracing::debug!(
            correlation_id = response.correlation_id.as_deref().unwrap_or(""),
            ?shed,
            "response headers shed to fit one frame"
        );
        properties =
            publish::timestamp_in_mode(publish::properties(response, table), response, mode);
    }
    let verdict = session
        .publish(Outgoing {
            exchange: shared.topology.exchange(),
            routing_key: "",
            mandatory: false,
            body: &body,
            properties,
        })
        .await?;
    match verdict {
        Verdict::Nacked => Err(BridgeError::Broker(
            "the broker refused the response".into(),
        )),
        _ => Ok(()),
    }
}

/// The response for a command that was not (or could not be) run: the status's generic text.
fn unhandled(command: &Envelope, status: StatusCode) -> Envelope {
    let payload = ErrorPayload {
        status,
        message: status.generic_text().to_string(),
        data: None,
        trace_id: command.trace_id.clone(),
    };
    command.error_response(&payload, false)
}

/// Returns a command this instance took but never started (it is unregistering or shutting
/// down) to its queue for another instance.
///
/// A plain requeue would mark it redelivered, and the next instance would refuse it as
/// possibly run before; a fresh copy with the rest of its ttl is served normally. When no
/// instance is left (the last one deletes the queue on its way out), the caller is answered
/// with 503 at once.
pub(crate) async fn hand_back_command(
    shared: &Arc<Shared>,
    reg: &Registration,
    delivery: lapin::message::Delivery,
) {
    let lapin::message::Delivery {
        data,
        properties,
        acker,
        ..
    } = delivery;
    let Some(command) = decode_command(shared, reg, &data) else {
        let _ = delivery::ack(&acker).await;
        return;
    };
    // Hand it back only once the queue's fate is settled: published before the last server
    // deleted the queue, it would go down with it and its caller would wait for the ttl.
    let mut retired = reg.retired.subscribe();
    if tokio::time::timeout(RETIRE_WAIT, retired.wait_for(|done| *done))
        .await
        .is_err()
    {
        tracing::debug!(registration = %reg.label, "queue retirement still running; handing the command back anyway");
    }
    let ttl = properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok());
    let remaining = ttl.map(|ttl| {
        command
            .timestamp
            .saturating_add(ttl)
            .saturating_sub(now_ms())
    });
    if remaining == Some(0) {
        let _ = delivery::ack(&acker).await;
        return;
    }
    let Some(session) = shared.link.current() else {
        delivery::requeue(&acker).await;
        return;
    };
    let mut copy = publish::republish_properties(
        &properties,
        properties.headers().clone().unwrap_or_default(),
    );
    if let Some(remaining) = remaining {
        copy = copy.with_expiration(remaining.to_string().into());
    }
    let verdict = session
        .publish(Outgoing {
            exchange: "",
            routing_key: &reg.queue,
            mandatory: true,
            body: &data,
            properties: copy,
        })
        .await;
    let correlation_id = command.correlation_id.as_deref().unwrap_or("");
    match verdict {
        Ok(Verdict::Confirmed) => {
            tracing::debug!(registration = %reg.label, correlation_id, "command handed back to its queue");
        }
        // No instance left, or a copy that cannot be sent as it came: answer it here.
        Ok(Verdict::Returned { .. }) | Err(BridgeError::TooLarge { .. }) => {
            tracing::debug!(registration = %reg.label, correlation_id, "no instance left for a handed-back command; answering 503");
            let response = unhandled(&command, StatusCode::SERVICE_UNAVAILABLE);
            respond(shared, reg, &command, response, &properties).await;
        }
        Ok(Verdict::Nacked) | Err(_) => {
            delivery::requeue(&acker).await;
            return;
        }
    }
    let _ = delivery::ack(&acker).await;
}
