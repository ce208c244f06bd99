//! Commands over SQS (DESIGN §3.2).
//!
//! * **Caller**: the command goes to its endpoint's command queue
//!   ([`Names::command_queue`](crate::names::Names::command_queue)) with two message
//!   attributes: the caller's reply queue and the epoch ms at which the caller gives up. It is
//!   also put on the bus for the subscriptions that watch commands. The response comes back on
//!   the instance's reply queue and is matched by `correlationId`
//!   ([`kit::PendingInvocations`]). A command queue that does not exist means that no service
//!   ever served the endpoint: 502 at once. Otherwise nobody answering is a 504 at the ttl.
//! * **Responder**: every instance serving an endpoint receives from its command queue
//!   (competing consumers: SQS hands each message to one receiver). A command is deleted as
//!   soon as it is received — commands are not retried, so at most once — and one whose
//!   expiry has passed is not run (its caller has given up). The response goes to the
//!   caller's reply queue and, like every message, on the bus.
//! * **Reply queue**: one per instance, created at start, deleted at shutdown, tagged with
//!   its owner and last-seen time so that the janitor removes one a crashed instance left.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::Message;
use parking_lot::Mutex;
use purista_core::kit::{self, broker_call, deadline_after, endpoint_label, millis};
use purista_core::{Address, BridgeError, Capabilities, CommandHandler, Envelope, WorkKind};
use tokio::sync::{Semaphore, watch};

use crate::client::sdk_error;
use crate::publish::{encode_checked, put_event};
use crate::receive::{self, attr, string_attribute};
use crate::shared::{ATTR_EXPIRES_AT, ATTR_REPLY_TO, Shared, now_ms};
use crate::topology;

/// Commands one responder runs at once.
const RESPONDER_SLOTS: usize = 64;
/// Responses the reply loop handles at once.
const REPLY_SLOTS: usize = 256;

/// Command queue URLs by endpoint label (they never change once created).
#[derive(Default)]
pub struct QueueUrls(Mutex<HashMap<String, String>>);

/// Sends `command` to its endpoint and waits for the response.
pub async fn invoke(
    shared: &Arc<Shared>,
    caps: &Capabilities,
    urls: &QueueUrls,
    reply_url: &str,
    mut command: Envelope,
    ttl: Duration,
) -> Result<Envelope, BridgeError> {
    if shared.is_closing() {
        return Err(BridgeError::Unavailable(
            "the bridge is shutting down".into(),
        ));
    }
    let receiver = kit::check_command(&command)?.clone();
    kit::stamp(&mut command, &shared.instance_id);
    let correlation_id = kit::correlation_id(&mut command).to_string();
    let body = encode_checked(caps, &command)?;
    let label = endpoint_label(&receiver);
    let label_arc: Arc<str> = label.clone().into();
    let _in_flight = shared.tracker.start(WorkKind::Command, &label_arc);
    let ttl = ttl.max(Duration::from_millis(1));
    let deadline = deadline_after(ttl);
    let (slot, reply) = shared.pending.wait_for(&correlation_id)?;
    let exchange = async {
        let url = command_queue_url(shared, urls, &receiver, &label).await?;
        let expires = now_ms().saturating_add(millis(ttl));
        let call = shared
            .clients
            .sqs
            .send_message()
            .queue_url(url)
            .message_body(body.clone())
            .message_attributes(ATTR_REPLY_TO, attr(reply_url)?)
            .message_attributes(ATTR_EXPIRES_AT, attr(expires.to_string())?)
            .send();
        let sent = broker_call(shared.config.call_timeout, "SendMessage", async {
            call.await
                .map(|_| ())
                .map_err(|e| sdk_error(&format!("sending a command to {label}"), e))
        });
        let announced = put_event(shared, &command, body.clone());
        let (sent, announced) = futures::join!(sent, announced);
        if let Err(error) = announced {
            tracing::debug!(%error, correlation_id = %correlation_id, "the command was not put on the bus for subscriptions");
        }
        sent.map_err(|e| match e {
            BridgeError::Unavailable(_) => e,
            other => BridgeError::Unavailable(other.to_string()),
        })
    };
    let outcome = tokio::time::timeout_at(deadline, async {
        exchange.await?;
        reply.await.unwrap_or_else(|_| {
            Err(BridgeError::Unavailable(
                "the bridge stopped waiting".into(),
            ))
        })
    })
    .await;
    drop(slot);
    match outcome {
        Ok(result) => result,
        Err(_) => Err(BridgeError::Timeout(millis(ttl))),
    }
}

async fn command_queue_url(
    shared: &Shared,
    urls: &QueueUrls,
    receiver: &Address,
    label: &str,
) -> Result<String, BridgeError> {
    if let Some(url) = urls.0.lock().get(label) {
        return Ok(url.clone());
    }
    let name = shared.names.command_queue(receiver)?;
    match topology::queue_url(shared, &name).await? {
        Some(url) => {
            urls.0.lock().insert(label.to_string(), url.clone());
            Ok(url)
        }
        None => Err(BridgeError::NoHandler(label.to_string())),
    }
}

/// One endpoint's responder on this instance.
pub struct Responder {
    stop: watch::Sender<bool>,
    up: watch::Receiver<bool>,
}

impl Responder {
    /// Stops receiving (commands not yet received stay for the other responders).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Whether the last receive worked.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }
}

/// Creates `address`'s command queue (idempotent) and starts receiving from it.
pub async fn serve(
    shared: &Arc<Shared>,
    caps: &Capabilities,
    address: &Address,
    handler: Arc<dyn CommandHandler>,
) -> Result<Responder, BridgeError> {
    let name = shared.names.command_queue(address)?;
    let queue = topology::ensure_queue(shared, &name, &[], &[]).await?;
    let label: Arc<str> = endpoint_label(address).into();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (up_tx, up_rx) = watch::channel(true);
    let (_, paused) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(RESPONDER_SLOTS));
    let on_message: receive::OnMessage = {
        let shared = shared.clone();
        let url = queue.url.clone();
        let label = label.clone();
        let caps = caps.clone();
        Arc::new(move |message, permit| {
            let shared2 = shared.clone();
            let url = url.clone();
            let handler = handler.clone();
            let caps = caps.clone();
            let in_flight = shared.tracker.start(WorkKind::Command, &label);
            shared
                .tasks
                .spawn(WorkKind::Command, label.clone(), async move {
                    let _in_flight = in_flight;
                    respond(&shared2, &caps, &url, &*handler, message).await;
                    drop(permit);
                });
        })
    };
    for i in 0..shared.config.receivers_per_queue {
        let spawned = shared.tasks.spawn(
            WorkKind::Generic,
            format!("responder {label} #{i}").into(),
            receive::run(
                shared.clone(),
                queue.url.clone(),
                format!("command queue {}", queue.name),
                slots.clone(),
                on_message.clone(),
                paused.clone(),
                stop_rx.clone(),
                up_tx.clone(),
            ),
        );
        if !spawned {
            let _ = stop_tx.send(true);
            return Err(BridgeError::Unavailable(
                "the bridge is shutting down".into(),
            ));
        }
    }
    Ok(Responder {
        stop: stop_tx,
        up: up_rx,
    })
}

/// Runs one command and answers it.
async fn respond(
    shared: &Arc<Shared>,
    caps: &Capabilities,
    url: &str,
    handler: &dyn CommandHandler,
    message: Message,
) {
    // At most once: gone from the queue before the handler runs.
    if let Err(error) = receive::delete(shared, url, &message).await {
        tracing::warn!(%error, "a received command could not be deleted; it is not run (it may reach another responder)");
        return;
    }
    let reply_to = string_attribute(&message, ATTR_REPLY_TO).map(str::to_string);
    let expires = string_attribute(&message, ATTR_EXPIRES_AT).and_then(|v| v.parse::<u64>().ok());
    let Some(body) = message.body() else {
        shared.count_poison();
        tracing::warn!("a command message without a body was dropped");
        return;
    };
    let command =
        match Envelope::decode_with_limit(body.as_bytes(), shared.config.max_message_bytes) {
            Ok(c) if c.message_type == purista_core::MessageType::Command => c,
            Ok(other) => {
                shared.count_poison();
                tracing::warn!(
                    message_type = other.message_type.as_str(),
                    "a message on a command queue is no command; dropped"
                );
                return;
            }
            Err(error) => {
                shared.count_poison();
                tracing::warn!(%error, "an undecodable message on a command queue was dropped");
                return;
            }
        };
    if expires.is_some_and(|at| at <= now_ms()) {
        tracing::debug!(correlation_id = ?command.correlation_id, "a command whose caller gave up was not run");
        return;
    }
    let Some(reply_to) = reply_to else {
        shared.count_poison();
        tracing::warn!(correlation_id = ?command.correlation_id, "a command without a reply queue was dropped");
        return;
    };
    let command = Arc::new(command);
    let mut response = handler.handle(command.clone()).await;
    kit::stamp_response(&mut response, &command, &shared.instance_id);
    let body = match encode_checked(caps, &response) {
        Ok(b) => b,
        Err(error) => {
            tracing::warn!(%error, correlation_id = ?command.correlation_id, "the response is over the limit; the caller gets a 500");
            let status = purista_core::StatusCode::INTERNAL_SERVER_ERROR;
            let payload = purista_core::ErrorPayload {
                status,
                message: status.generic_text().to_string(),
                data: None,
                trace_id: command.trace_id.clone(),
            };
            response = command.error_response(&payload, false);
            kit::stamp_response(&mut response, &command, &shared.instance_id);
            String::from_utf8(response.encode()).unwrap_or_default()
        }
    };
    let call = shared
        .clients
        .sqs
        .send_message()
        .queue_url(reply_to)
        .message_body(body.clone())
        .send();
    let sent = broker_call(
        shared.config.call_timeout,
        "SendMessage (response)",
        async {
            call.await
                .map(|_| ())
                .map_err(|e| sdk_error("sending a response", e))
        },
    );
    let announced = put_event(shared, &response, body);
    let (sent, announced) = futures::join!(sent, announced);
    if let Err(error) = sent {
        tracing::warn!(%error, correlation_id = ?command.correlation_id, "a response could not be sent; its caller times out");
    }
    if let Err(error) = announced {
        tracing::warn!(%error, correlation_id = ?command.correlation_id, "a response could not be put on the bus");
    }
}

/// Creates this instance's reply queue and starts receiving responses from it.
pub async fn open_reply_queue(
    shared: &Arc<Shared>,
) -> Result<(crate::topology::Queue, watch::Sender<bool>), BridgeError> {
    let name = shared.names.reply_queue(&shared.instance_id)?;
    let queue = topology::ensure_queue(
        shared,
        &name,
        &[],
        &[
            (crate::shared::TAG_OWNER, shared.instance_id.clone()),
            (crate::shared::TAG_SEEN, now_ms().to_string()),
        ],
    )
    .await?;
    shared.own_queues.lock().insert(queue.url.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (up_tx, _) = watch::channel(true);
    let (_, paused) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(REPLY_SLOTS));
    let on_message: receive::OnMessage = {
        let shared = shared.clone();
        let url = queue.url.clone();
        Arc::new(move |message, permit| {
            let shared2 = shared.clone();
            let url = url.clone();
            shared
                .tasks
                .spawn(WorkKind::Generic, "response".into(), async move {
                    take_response(&shared2, &url, message).await;
                    drop(permit);
                });
        })
    };
    let spawned = shared.tasks.spawn(
        WorkKind::Generic,
        "reply queue".into(),
        receive::run(
            shared.clone(),
            queue.url.clone(),
            format!("reply queue {}", queue.name),
            slots,
            on_message,
            paused,
            stop_rx,
            up_tx,
        ),
    );
    if !spawned {
        return Err(BridgeError::Unavailable(
            "the bridge is shutting down".into(),
        ));
    }
    Ok((queue, stop_tx))
}

async fn take_response(shared: &Shared, url: &str, message: Message) {
    let decoded = message
        .body()
        .map(|b| Envelope::decode_with_limit(b.as_bytes(), shared.config.max_message_bytes));
    if let Err(error) = receive::delete(shared, url, &message).await {
        tracing::debug!(%error, "a response could not be deleted from the reply queue");
    }
    match decoded {
        Some(Ok(response)) if response.correlation_id.is_some() => shared.pending.resolve(response),
        Some(Ok(_)) => {
            shared.count_poison();
            tracing::warn!("a message without correlationId on the reply queue was dropped");
        }
        Some(Err(error)) => {
            shared.count_poison();
            tracing::warn!(%error, "an undecodable message on the reply queue was dropped");
        }
        None => {
            shared.count_poison();
            tracing::warn!("a message without a body on the reply queue was dropped");
        }
    }
}
