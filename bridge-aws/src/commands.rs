//! Commands over SQS (DESIGN §3.2).
//!
//! * **Caller**: the command goes to its endpoint's command queue
//!   ([`Names::command_queue`](crate::names::Names::command_queue)) as an item
//!   `{expiresAt, replyTo, envelope}`: the epoch ms at which the caller gives up and the
//!   caller's reply queue travel with it. Commands (and responses) sent while others to the same
//!   queue are on their way share one SQS message (`{"puristaPack":[…]}`, up to 50 items and
//!   the message limit): under load that divides SQS calls and queue depth. It is also put on
//!   the bus while a subscription can match it ([`crate::copies`]). The response comes back on
//!   the instance's reply queue and is matched by `correlationId`
//!   ([`kit::PendingInvocations`]). A command queue that does not exist means that no service
//!   ever served the endpoint: 502 at once. Otherwise nobody answering is a 504 at the ttl.
//! * **Responder**: every instance serving an endpoint receives from its command queue
//!   (competing consumers: SQS hands each message to one receiver). A command is deleted as
//!   soon as it is received — commands are not retried, so at most once — and one whose
//!   expiry has passed is not run (its caller has given up). The response goes to the
//!   caller's reply queue and, while a subscription can match it, on the bus.
//! * **Reply queue**: one per instance, created at start, deleted at shutdown, tagged with
//!   its owner and last-seen time so that the janitor removes one a crashed instance left.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::Message;
use parking_lot::Mutex;
use purista_core::kit::{self, deadline_after, endpoint_label, millis};
use purista_core::{Address, BridgeError, Capabilities, CommandHandler, Envelope, WorkKind};
use tokio::sync::{Semaphore, watch};

use crate::copies::Copies;
use crate::publish::{encode_checked, put_event};
use crate::receive;
use crate::shared::{Shared, now_ms};
use crate::topology;

/// Commands one responder runs at once.
const RESPONDER_SLOTS: usize = 64;
/// Responses the reply loop handles at once.
const REPLY_SLOTS: usize = 256;

/// Command queue URLs by endpoint label (they never change once created). Looked up once per
/// endpoint however many invocations start at the same time.
#[derive(Default)]
pub struct QueueUrls(Mutex<HashMap<String, Arc<tokio::sync::OnceCell<String>>>>);

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
        let item = command_item(expires, reply_url, &body);
        let sent = shared.send_packed(&url, item);
        let announced = async {
            if Copies::wanted(shared, &command) {
                put_event(shared, &command, body.clone()).await
            } else {
                Ok(())
            }
        };
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
    let cell = urls.0.lock().entry(label.to_string()).or_default().clone();
    cell.get_or_try_init(|| async {
        let name = shared.names.command_queue(receiver)?;
        match topology::queue_url(shared, &name).await? {
            Some(url) => Ok(url),
            // Not cached: the next invocation looks again (a server may have come).
            None => Err(BridgeError::NoHandler(label.to_string())),
        }
    })
    .await
    .cloned()
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
        Arc::new(move |message, slot| {
            let shared2 = shared.clone();
            let url = url.clone();
            let handler = handler.clone();
            let caps = caps.clone();
            let in_flight = shared.tracker.start(WorkKind::Command, &label);
            shared
                .tasks
                .spawn(WorkKind::Command, label.clone(), async move {
                    let _in_flight = in_flight;
                    take_commands(&shared2, &caps, &url, &handler, message).await;
                    drop(slot);
                });
        })
    };
    for i in 0..shared.config.receivers_per_queue {
        let spawned = shared.receivers.spawn(
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
                receive::Pace::Eager,
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

/// One command in a pack on a command queue: the envelope, where to answer, and when its
/// caller gives up (epoch ms).
#[derive(serde::Deserialize)]
struct CommandItem<'a> {
    #[serde(rename = "expiresAt")]
    expires_at: u64,
    #[serde(rename = "replyTo")]
    reply_to: String,
    #[serde(borrow)]
    envelope: &'a serde_json::value::RawValue,
}

/// The pack item of a command (its envelope already encoded).
fn command_item(expires_at: u64, reply_to: &str, envelope: &str) -> String {
    let reply_to = serde_json::Value::String(reply_to.to_string()).to_string();
    format!("{{\"expiresAt\":{expires_at},\"replyTo\":{reply_to},\"envelope\":{envelope}}}")
}

/// Takes one message off a command queue (deleted first: commands are at most once) and runs
/// each command of its pack in a task of its own.
async fn take_commands(
    shared: &Arc<Shared>,
    caps: &Capabilities,
    url: &str,
    handler: &Arc<dyn CommandHandler>,
    message: Message,
) {
    if let Err(error) = receive::delete(shared, url, &message).await {
        tracing::warn!(%error, "a received command message could not be deleted; it is not run (it may reach another responder)");
        return;
    }
    let body = message.body().unwrap_or_default();
    let Some(items) = crate::shared::unpack(body) else {
        shared.count_poison();
        tracing::warn!("a message on a command queue is no command pack; dropped");
        return;
    };
    let mut running = Vec::with_capacity(items.len());
    for raw in items {
        let Ok(item) = serde_json::from_str::<CommandItem<'_>>(raw.get()) else {
            shared.count_poison();
            tracing::warn!("an item of a command pack is no command; dropped");
            continue;
        };
        let command = match Envelope::decode_with_limit(
            item.envelope.get().as_bytes(),
            shared.config.max_message_bytes,
        ) {
            Ok(c) if c.message_type == purista_core::MessageType::Command => c,
            Ok(other) => {
                shared.count_poison();
                tracing::warn!(
                    message_type = other.message_type.as_str(),
                    "a message on a command queue is no command; dropped"
                );
                continue;
            }
            Err(error) => {
                shared.count_poison();
                tracing::warn!(%error, "an undecodable command was dropped");
                continue;
            }
        };
        if item.expires_at <= now_ms() {
            tracing::debug!(correlation_id = ?command.correlation_id, "a command whose caller gave up was not run");
            continue;
        }
        running.push(respond(shared, caps, &**handler, command, item.reply_to));
    }
    futures::future::join_all(running).await;
}

/// Runs one command and answers it.
async fn respond(
    shared: &Arc<Shared>,
    caps: &Capabilities,
    handler: &dyn CommandHandler,
    command: Envelope,
    reply_to: String,
) {
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
    let announce = Copies::wanted(shared, &response);
    let sent = shared.send_packed(&reply_to, body.clone());
    let announced = async {
        if announce {
            put_event(shared, &response, body).await
        } else {
            Ok(())
        }
    };
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
        Arc::new(move |message, slot| {
            let shared2 = shared.clone();
            let url = url.clone();
            shared
                .tasks
                .spawn(WorkKind::Generic, "response".into(), async move {
                    take_response(&shared2, &url, message).await;
                    drop(slot);
                });
        })
    };
    let spawned = shared.receivers.spawn(
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
            receive::Pace::Eager,
        ),
    );
    if !spawned {
        return Err(BridgeError::Unavailable(
            "the bridge is shutting down".into(),
        ));
    }
    Ok((queue, stop_tx))
}

/// Hands each response of a message to its waiting caller, then deletes the message. The
/// delete's outcome changes nothing for the callers (a response left behind reappears after the
/// visibility timeout and is ignored as unmatched), so it is not on their path: awaited first,
/// it added one SQS round trip to every invocation's latency.
async fn take_response(shared: &Shared, url: &str, message: Message) {
    resolve_responses(shared, &message);
    if let Err(error) = receive::delete(shared, url, &message).await {
        tracing::debug!(%error, "a response could not be deleted from the reply queue");
    }
}

fn resolve_responses(shared: &Shared, message: &Message) {
    let Some(items) = crate::shared::unpack(message.body().unwrap_or_default()) else {
        shared.count_poison();
        tracing::warn!("a message on the reply queue is no response pack; dropped");
        return;
    };
    for item in items {
        match Envelope::decode_with_limit(item.get().as_bytes(), shared.config.max_message_bytes) {
            Ok(response) if response.correlation_id.is_some() => shared.pending.resolve(response),
            Ok(_) => {
                shared.count_poison();
                tracing::warn!("a message without correlationId on the reply queue was dropped");
            }
            Err(error) => {
                shared.count_poison();
                tracing::warn!(%error, "an undecodable message on the reply queue was dropped");
            }
        }
    }
}
