//! Commands as KubeMQ queries: KubeMQ's native request/reply, whose timeout is mandatory and
//! is the invocation's ttl.
//!
//! * **Caller**: the command is sent as a query on its endpoint's channel
//!   ([`Channels::command`](crate::channels::Channels::command)) and, like every message, as
//!   an event for the subscriptions that watch commands (that event and the response's below
//!   ride the instance's event pipe, [`crate::pipe`]: one stream instead of a call each). The
//!   query's response carries the response envelope, which the pending-invocation table
//!   ([`kit::PendingInvocations`]) takes by `correlationId`: one from another invocation is
//!   counted and ignored. KubeMQ does not tell the sender that nobody subscribes to a
//!   channel — it answers "timeout for request" when the timeout passes — so a command
//!   nobody serves fails with 504 at its ttl (never later: the bridge's own deadline is the
//!   ttl plus a short grace). A lost connection fails the invocation with 503, and shutdown
//!   fails every pending one with 503.
//! * **Responder**: every instance serving an endpoint subscribes to its channel in one
//!   group, so KubeMQ hands each query to exactly one of them (competing consumers). The
//!   handler's response is stamped, sent back as the query's response and published as an
//!   event (subscriptions see responses, and a success `eventName`). A query whose body is no
//!   envelope is answered with an error and counted as poison. KubeMQ drops an answer that
//!   comes after the query's timeout without telling anyone, so the responder counts and warns
//!   about it itself: late is after the ttl counted from the query's arrival, or after the
//!   caller's own expiry, which the query carries in its `purista-expires-at` tag (Unix epoch
//!   ms; a query that sat in a busy broker reaches its responder with less than its ttl left).
//! * **Leaving** (`unregister_command`): KubeMQ confirms no unsubscribe, and a query routed to
//!   a stream the responder just closed would be lost (its caller waiting for a 504 at its
//!   ttl). So every responder also answers on the endpoint's hand-off channel
//!   ([`Channels::command_handoff`](crate::channels::Channels::command_handoff)); a leaving
//!   responder first stops listening there, then keeps its main stream open and forwards what
//!   still reaches it to the hand-off channel, relaying the answer to the caller. Its main
//!   stream closes with the bridge.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use kubemq::proto::kubemq::{Request, Subscribe, subscribe::SubscribeType};
use kubemq::{KubemqError, Query, QueryReply};
use purista_core::inflight::InFlightCounter;
use purista_core::kit::{self, deadline_after, endpoint_label, millis};
use purista_core::{Address, BridgeError, CommandHandler, Envelope, WorkKind};
use tokio::sync::watch;

use crate::connection::sdk_error;
use crate::probe::{self, ProbeSeen};
use crate::publish::{encode_checked, publish_best_effort};
use crate::shared::{EXPIRES_TAG, PROBE_TAG, Shared};
use crate::stream;

/// The group every responder of an endpoint joins.
const RESPONDER_GROUP: &str = "purista-responders";
/// How long past the ttl the bridge waits for KubeMQ's own timeout answer.
const TTL_GRACE: Duration = Duration::from_millis(250);
/// The timeout of a readiness probe query.
const PROBE_QUERY_TIMEOUT: Duration = Duration::from_millis(200);

/// Sends `command` to its endpoint and waits for the response (DESIGN §3.2).
pub async fn invoke(
    shared: &Arc<Shared>,
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
    let bytes = encode_checked(shared, &command)?;
    let label: Arc<str> = endpoint_label(&receiver).into();
    let _in_flight = shared.tracker.start(WorkKind::Command, &label);
    let (slot, reply) = shared.pending.wait_for(&correlation_id)?;
    let ttl = ttl.max(Duration::from_millis(1));
    let expires_at = purista_core::envelope::now_ms().saturating_add(millis(ttl));
    let query = Query::builder()
        .id(command.id.clone())
        .channel(shared.channels.command(&receiver))
        .body(bytes.clone())
        .timeout(ttl)
        .tags(std::collections::HashMap::from([(
            EXPIRES_TAG.to_string(),
            expires_at.to_string(),
        )]))
        .build();
    let sdk = shared.connection.sdk.clone();
    // Boxed here, where it is made: the SDK's call future is large, and unboxed it made the
    // invocation's own future large, copied whole each time it moved.
    let ask = Box::pin(async move { sdk.send_query(query).await });
    let announce = publish_best_effort(shared, &command, bytes);
    let deadline = deadline_after(ttl + TTL_GRACE);
    let max = shared.config.max_payload_bytes;
    let exchange = async {
        let (answer, announced) = futures::join!(ask, announce);
        if let Err(error) = announced {
            tracing::debug!(%error, correlation_id = %correlation_id, "the command was not published for subscriptions");
        }
        match answer {
            Ok(r) if r.executed => {
                match Envelope::decode_with_limit(&r.body, max.saturating_mul(2)) {
                    Ok(response) => {
                        // Hands it to whoever waits for its correlation id (this invocation, or
                        // nobody: then it is counted as unmatched).
                        shared.pending.resolve(response);
                        None
                    }
                    Err(e) => Some(Err(BridgeError::Broker(format!(
                        "the responder's answer is not an envelope: {e}"
                    )))),
                }
            }
            Ok(r) => Some(Err(refused(&r.error, ttl))),
            Err(error) => Some(Err(query_error(error, ttl))),
        }
    };
    tokio::pin!(exchange);
    let mut reply = reply;
    let mut exchanged = false;
    loop {
        tokio::select! {
            finished = &mut exchange, if !exchanged => {
                exchanged = true;
                if let Some(failed) = finished {
                    drop(slot);
                    return failed;
                }
            }
            answer = &mut reply => {
                drop(slot);
                return answer.unwrap_or_else(|_| Err(BridgeError::Unavailable("the bridge stopped waiting".into())));
            }
            _ = tokio::time::sleep_until(deadline) => {
                drop(slot);
                return Err(BridgeError::Timeout(millis(ttl)));
            }
        }
    }
}

/// A query KubeMQ answered as not executed.
fn refused(error: &str, ttl: Duration) -> BridgeError {
    if error.to_ascii_lowercase().contains("timeout") {
        BridgeError::Timeout(millis(ttl))
    } else {
        BridgeError::Refused(format!("KubeMQ: {error}"))
    }
}

/// A failed query: KubeMQ's timeout answer is the 504 of DESIGN §3.2 (nobody subscribes, or
/// nobody answered in time), a broken connection is 503.
fn query_error(error: KubemqError, ttl: Duration) -> BridgeError {
    let text = error.to_string().to_ascii_lowercase();
    if matches!(error, KubemqError::Timeout { .. }) || text.contains("timeout for request") {
        return BridgeError::Timeout(millis(ttl));
    }
    let lost = matches!(
        error.code(),
        kubemq::ErrorCode::Cancellation | kubemq::ErrorCode::Transient
    ) || matches!(
        error,
        KubemqError::Transport { .. } | KubemqError::StreamBroken { .. }
    );
    let mapped = sdk_error("sending a command (query) to KubeMQ", error);
    if lost || mapped.is_retryable() {
        BridgeError::Unavailable(mapped.to_string())
    } else {
        mapped
    }
}

/// One endpoint's responder on this instance.
pub struct Responder {
    stop: watch::Sender<bool>,
    up: watch::Receiver<bool>,
    handoff_stop: watch::Sender<bool>,
    handoff_ended: watch::Receiver<bool>,
    leaving: Arc<AtomicBool>,
}

impl Responder {
    /// Stops answering at once (the bridge shuts down: what still arrives is lost, its callers
    /// get 504 at their ttl).
    pub fn stop(&self) {
        let _ = self.handoff_stop.send(true);
        let _ = self.stop.send(true);
    }

    /// Leaves the endpoint without losing a query: stops listening on the hand-off channel,
    /// waits until KubeMQ had time to notice, then forwards whatever still reaches the main
    /// stream to the other responders (see the module docs). [`Responder::stop`] ends it.
    pub async fn leave(&self) {
        let _ = self.handoff_stop.send(true);
        let mut ended = self.handoff_ended.clone();
        let _ = ended.wait_for(|e| *e).await;
        tokio::time::sleep(crate::subscriptions::LEAVE_GRACE).await;
        self.leaving.store(true, Ordering::Release);
    }

    /// Whether its subscription stream is open.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }
}

/// Subscribes `handler` to `address`'s channel and returns once KubeMQ routes queries to it.
pub async fn serve(
    shared: &Arc<Shared>,
    address: &Address,
    handler: Arc<dyn CommandHandler>,
) -> Result<Responder, BridgeError> {
    let channel = shared.channels.command(address);
    let label: Arc<str> = endpoint_label(address).into();
    // Made once: counting a request in flight is then lock-free.
    let in_flight = shared.tracker.counter(WorkKind::Command, &label);
    let subscribe = Subscribe {
        subscribe_type_data: SubscribeType::Queries as i32,
        client_id: shared.connection.client_id.clone(),
        channel: channel.clone(),
        group: RESPONDER_GROUP.to_string(),
        events_store_type_data: 0,
        events_store_type_value: 0,
    };
    let subscribe_handoff = subscribe.clone();
    let seen = Arc::new(ProbeSeen::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (up_tx, up_rx) = watch::channel(false);
    let open: stream::Open<Request> = Box::new(move |mut raw| {
        let subscribe = subscribe.clone();
        async move {
            raw.subscribe_to_requests(subscribe)
                .await
                .map(|r| r.into_inner())
        }
        .boxed()
    });
    let handoff = shared.channels.command_handoff(address);
    let leaving = Arc::new(AtomicBool::new(false));
    let on_message = {
        let shared = shared.clone();
        let seen = seen.clone();
        let label = label.clone();
        let in_flight = in_flight.clone();
        let handler = handler.clone();
        let leaving = leaving.clone();
        let handoff = handoff.clone();
        move |request: Request| {
            if leaving.load(Ordering::Acquire) && !request.tags.contains_key(PROBE_TAG) {
                forward(&shared, &handoff, request);
            } else {
                take_request(&shared, &seen, (&label, &in_flight), &handler, request);
            }
            std::future::ready(())
        }
    };
    let reopened = {
        let shared = shared.clone();
        move || shared.count_reconnect()
    };
    let raw = shared.connection.raw.clone();
    let task_label = format!("responder {label}");
    let spawned = shared.tasks.spawn(
        WorkKind::Generic,
        task_label.clone().into(),
        stream::run(raw, open, task_label, on_message, up_tx, stop_rx, reopened),
    );
    if !spawned {
        return Err(BridgeError::Unavailable(
            "the bridge is shutting down".into(),
        ));
    }
    // The hand-off stream: the same group, the handler always runs.
    let handoff_subscribe = Subscribe {
        channel: handoff.clone(),
        ..subscribe_handoff
    };
    let open_handoff: stream::Open<Request> = Box::new(move |mut raw| {
        let subscribe = handoff_subscribe.clone();
        async move {
            raw.subscribe_to_requests(subscribe)
                .await
                .map(|r| r.into_inner())
        }
        .boxed()
    });
    let on_handoff = {
        let shared = shared.clone();
        let seen = seen.clone();
        let label = label.clone();
        move |request: Request| {
            take_request(&shared, &seen, (&label, &in_flight), &handler, request);
            std::future::ready(())
        }
    };
    let (handoff_stop_tx, handoff_stop_rx) = watch::channel(false);
    let (handoff_ended_tx, handoff_ended_rx) = watch::channel(false);
    let handoff_label = format!("responder {label} (hand-off)");
    let reopened = {
        let shared = shared.clone();
        move || shared.count_reconnect()
    };
    let raw = shared.connection.raw.clone();
    let spawned = shared.tasks.spawn(
        WorkKind::Generic,
        handoff_label.clone().into(),
        async move {
            let (up, _) = watch::channel(false);
            stream::run(
                raw,
                open_handoff,
                handoff_label,
                on_handoff,
                up,
                handoff_stop_rx,
                reopened,
            )
            .await;
            let _ = handoff_ended_tx.send(true);
        },
    );
    let responder = Responder {
        stop: stop_tx,
        up: up_rx,
        handoff_stop: handoff_stop_tx,
        handoff_ended: handoff_ended_rx,
        leaving,
    };
    if !spawned {
        responder.stop();
        return Err(BridgeError::Unavailable(
            "the bridge is shutting down".into(),
        ));
    }
    let probe_shared = shared.clone();
    let ready = probe::until_routed(
        &seen,
        shared.config.ready_timeout,
        &format!("the responder of {label}"),
        |id| {
            let shared = probe_shared.clone();
            let channel = channel.clone();
            async move {
                let mut tags = std::collections::HashMap::new();
                tags.insert(PROBE_TAG.to_string(), id);
                let query = Query::builder()
                    .channel(channel)
                    .metadata("probe")
                    .tags(tags)
                    .timeout(PROBE_QUERY_TIMEOUT)
                    .build();
                let _ = shared.connection.sdk.send_query(query).await;
            }
        },
    )
    .await;
    if let Err(e) = ready {
        responder.stop();
        return Err(e);
    }
    Ok(responder)
}

/// Answers a probe at once; runs the handler for a command in a task of its own.
fn take_request(
    shared: &Arc<Shared>,
    seen: &Arc<ProbeSeen>,
    (label, counter): (&Arc<str>, &InFlightCounter),
    handler: &Arc<dyn CommandHandler>,
    request: Request,
) {
    if let Some(id) = request.tags.get(PROBE_TAG) {
        seen.saw(id);
        let reply = QueryReply::builder()
            .request_id(&request.request_id)
            .response_to(&request.reply_channel)
            .metadata("probe")
            .build();
        let shared2 = shared.clone();
        shared
            .tasks
            .spawn(WorkKind::Generic, "probe reply".into(), async move {
                let _ = shared2.connection.sdk.send_query_response(reply).await;
            });
        return;
    }
    let shared2 = shared.clone();
    let handler = handler.clone();
    let in_flight = counter.start();
    let received = tokio::time::Instant::now();
    shared
        .tasks
        .spawn(WorkKind::Command, label.clone(), async move {
            let _in_flight = in_flight;
            respond(&shared2, &*handler, request, received).await;
        });
}

/// A query that reached a responder after it left: sent on to the endpoint's hand-off
/// channel (the responders still serving it), the answer relayed to the caller. Nobody there,
/// or no answer in time: the caller's own query times out (504 at its ttl).
fn forward(shared: &Arc<Shared>, handoff: &str, request: Request) {
    let received = tokio::time::Instant::now();
    let ttl = Duration::from_millis(u64::try_from(request.timeout).unwrap_or(0));
    let query = Query::builder()
        .channel(handoff)
        .metadata(request.metadata)
        .body(request.body)
        .tags(request.tags);
    let reply = QueryReply::builder()
        .request_id(&request.request_id)
        .response_to(&request.reply_channel);
    let shared2 = shared.clone();
    shared
        .tasks
        .spawn(WorkKind::Generic, "forwarded command".into(), async move {
            let left = ttl.saturating_sub(received.elapsed());
            if left.is_zero() {
                return;
            }
            let query = query.timeout(left).build();
            match shared2.connection.sdk.send_query(query).await {
                Ok(answer) if answer.executed => {
                    let reply = reply
                        .metadata(answer.metadata)
                        .body(answer.body)
                        .tags(answer.tags)
                        .build();
                    send_reply(&shared2, reply).await;
                }
                Ok(answer) if !answer.error.to_ascii_lowercase().contains("timeout") => {
                    send_reply(&shared2, reply.error(answer.error).build()).await;
                }
                Ok(_) | Err(_) => {
                    tracing::debug!(request_id = %request.request_id, "a command forwarded by a leaving responder found no other responder in time");
                }
            }
        });
}

async fn respond(
    shared: &Arc<Shared>,
    handler: &dyn CommandHandler,
    request: Request,
    received: tokio::time::Instant,
) {
    let reply = QueryReply::builder()
        .request_id(&request.request_id)
        .response_to(&request.reply_channel);
    let command = match Envelope::decode_with_limit(&request.body, shared.config.max_payload_bytes)
    {
        Ok(c) => Arc::new(c),
        Err(error) => {
            shared.count_poison();
            tracing::warn!(request_id = %request.request_id, channel = %request.channel, %error, "a query on a command channel is not a command envelope: answered with an error");
            let reply = reply
                .error(format!("not a PURISTA command envelope: {error}"))
                .build();
            Box::pin(send_reply(shared, reply)).await;
            return;
        }
    };
    let mut response = handler.handle(command.clone()).await;
    kit::stamp_response(&mut response, &command, &shared.instance_id);
    let bytes = match encode_checked(shared, &response) {
        Ok(b) => b,
        Err(error) => {
            // Too large to send: the caller gets a 500 saying so instead of a 504 later.
            tracing::warn!(correlation_id = ?command.correlation_id, %error, "the command's response is over the payload limit");
            let mut failure = command.error_response(
                &purista_core::ErrorPayload {
                    status: purista_core::StatusCode::INTERNAL_SERVER_ERROR,
                    message: "the response is larger than the bridge's payload limit".into(),
                    data: None,
                    trace_id: command.trace_id.clone(),
                },
                false,
            );
            kit::stamp_response(&mut failure, &command, &shared.instance_id);
            response = failure;
            response.encode()
        }
    };
    let ttl = Duration::from_millis(u64::try_from(request.timeout).unwrap_or(0));
    if received.elapsed() > ttl || caller_gave_up(&request) {
        // KubeMQ drops a response whose query timed out; the caller already got its 504.
        shared.count_late_response();
        tracing::warn!(
            correlation_id = response.correlation_id.as_deref().unwrap_or(""),
            ttl_ms = kit::millis(ttl),
            "late response ignored: the caller's ttl passed before the handler answered"
        );
    }
    // Boxed: the spawned responder task stays small (it is moved into the task set and into
    // tokio on every query).
    Box::pin(send_reply(shared, reply.body(bytes.clone()).build())).await;
    if let Err(error) = publish_best_effort(shared, &response, bytes).await {
        tracing::debug!(%error, correlation_id = ?response.correlation_id, "the response was not published for subscriptions");
    }
}

/// Whether the caller's own expiry (its tag; absent from a query another client sent) has
/// passed: the query may have reached this responder well after it was sent.
fn caller_gave_up(request: &Request) -> bool {
    request
        .tags
        .get(EXPIRES_TAG)
        .and_then(|t| t.parse::<u64>().ok())
        .is_some_and(|expires_at| purista_core::envelope::now_ms() > expires_at)
}

async fn send_reply(shared: &Shared, reply: QueryReply) {
    let sdk = &shared.connection.sdk;
    let sent = kit::broker_call(shared.config.publish_timeout, "answering a query", async {
        sdk.send_query_response(reply)
            .await
            .map_err(|e| sdk_error("answering a query", e))
    })
    .await;
    if let Err(error) = sent {
        tracing::warn!(%error, "a command's response could not be sent: its caller gets 504 at its ttl");
    }
}
