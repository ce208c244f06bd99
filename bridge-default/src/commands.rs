//! Commands: running a handler for one invocation and bringing its response home.
//!
//! An invocation picks one [`CommandMember`] of the endpoint's group (round robin across all
//! bridge instances on the hub) and runs its handler in a task of the *responder's* bridge, so
//! the responder's shutdown can wait for it. The stamped response goes to the caller's
//! [`Inbox`], where a pending entry keyed by `correlationId` waits, and is also offered to
//! subscriptions (a success response with an `eventName` is an event too).
//!
//! The pending entry is removed when the caller stops waiting (response, timeout, or the caller
//! dropping its future); a response that finds no entry is ignored with a warning and counted.

use std::collections::hash_map::Entry;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::FutureExt;
use parking_lot::Mutex;
use purista_core::envelope::now_ms;
use purista_core::{
    BridgeError, CommandHandler, Envelope, ErrorPayload, StatusCode, WorkKind, ids,
};
use tokio::sync::oneshot;

use crate::broker::{EndpointMember, Hub};
use crate::fast_hash::FastMap;
use crate::tasks::TaskSet;

/// What a pending invocation receives: the response, or why none will come.
pub(crate) type Reply = Result<Arc<Envelope>, BridgeError>;

/// One instance's handler of one command endpoint.
pub(crate) struct CommandMember {
    pub(crate) instance_id: Arc<str>,
    /// The endpoint, `service@version/command`, as a label for tasks and logs.
    pub(crate) label: Arc<str>,
    pub(crate) handler: Arc<dyn CommandHandler>,
    /// The responder bridge's tasks.
    pub(crate) tasks: Arc<TaskSet>,
}

impl EndpointMember for CommandMember {
    fn instance_id(&self) -> &str {
        &self.instance_id
    }
}

/// Where a response goes.
pub(crate) enum ReplyTo {
    /// Straight to the invoking bridge's inbox (the `invoke` path).
    Caller(Arc<Inbox>),
    /// To whichever inbox `receiver.instanceId` names (commands published raw).
    Receiver,
}

/// Runs `command` on `member` in a task of the responder's bridge and routes the response.
pub(crate) fn dispatch(
    hub: &Arc<Hub>,
    member: Arc<CommandMember>,
    command: Arc<Envelope>,
    reply_to: ReplyTo,
) {
    let Some(reservation) = member
        .tasks
        .reserve(WorkKind::Command, member.label.clone())
    else {
        // The responder is shutting down between being picked and running the handler.
        match (&reply_to, command.correlation_id.as_deref()) {
            (ReplyTo::Caller(inbox), Some(correlation_id)) => inbox.fail(
                correlation_id,
                BridgeError::Unavailable("the handling bridge instance is shutting down".into()),
            ),
            _ => tracing::warn!("command dropped: the handling bridge instance is shutting down"),
        }
        return;
    };
    let hub = hub.clone();
    reservation.spawn(async move {
        let response = Arc::new(run_handler(&member, &command).await);
        drop(command);
        let routes = hub.subscriptions.snapshot();
        if !routes.wants(&response) {
            // Nobody else reads it: the caller gets the only reference and takes the envelope
            // without copying it.
            match reply_to {
                ReplyTo::Caller(inbox) => inbox.resolve(response),
                ReplyTo::Receiver => hub.deliver_reply(response),
            }
            return;
        }
        match reply_to {
            ReplyTo::Caller(inbox) => inbox.resolve(response.clone()),
            ReplyTo::Receiver => hub.deliver_reply(response.clone()),
        }
        routes.offer(&response).await;
    });
}

/// Runs the handler, turning a panic into a 500, and stamps the response as the responder's.
async fn run_handler(member: &CommandMember, command: &Arc<Envelope>) -> Envelope {
    let outcome = AssertUnwindSafe(member.handler.handle(command.clone()))
        .catch_unwind()
        .await;
    let mut response = outcome.unwrap_or_else(|_| {
        tracing::error!(
            registration = %member.label,
            correlation_id = command.correlation_id.as_deref().unwrap_or(""),
            trace_id = command.trace_id.as_deref().unwrap_or(""),
            "command handler panicked; answering 500"
        );
        let status = StatusCode::INTERNAL_SERVER_ERROR;
        let payload = ErrorPayload {
            status,
            message: status.generic_text().to_string(),
            data: None,
            trace_id: command.trace_id.clone(),
        };
        command.error_response(&payload, false)
    });
    response.id = ids::new_id();
    response.timestamp = now_ms();
    // Reuses the handler's string buffer.
    response.sender.instance_id.clear();
    response.sender.instance_id.push_str(&member.instance_id);
    if response.correlation_id.is_none() {
        response.correlation_id = command.correlation_id.clone();
    }
    if response.receiver.is_none() {
        response.receiver = Some(command.sender.to_address());
    }
    response
}

/// One bridge instance's reply inbox: pending invocations by `correlationId`.
#[derive(Default)]
pub(crate) struct Inbox {
    pending: Mutex<FastMap<Arc<str>, oneshot::Sender<Reply>>>,
    closed: AtomicBool,
    unmatched: AtomicU64,
}

impl Inbox {
    /// Registers a pending invocation. The returned slot removes it again when dropped.
    pub(crate) fn wait_for(
        &self,
        correlation_id: &str,
    ) -> Result<(PendingSlot<'_>, oneshot::Receiver<Reply>), BridgeError> {
        let (tx, rx) = oneshot::channel();
        let key: Arc<str> = correlation_id.into();
        let mut pending = self.pending.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(BridgeError::Unavailable("bridge shutting down".into()));
        }
        match pending.entry(key) {
            Entry::Occupied(_) => Err(BridgeError::InvalidRequest(format!(
                "an invocation with correlationId {correlation_id} is already pending"
            ))),
            Entry::Vacant(slot) => {
                let correlation_id = slot.key().clone();
                slot.insert(tx);
                Ok((
                    PendingSlot {
                        inbox: self,
                        correlation_id,
                    },
                    rx,
                ))
            }
        }
    }

    /// Completes the pending invocation the response belongs to, or warns and counts.
    pub(crate) fn resolve(&self, response: Arc<Envelope>) {
        let waiting = self
            .pending
            .lock()
            .remove(response.correlation_id.as_deref().unwrap_or(""));
        let undelivered = match waiting {
            Some(tx) => match tx.send(Ok(response)) {
                Ok(()) => return,
                Err(Ok(response)) => response,
                Err(Err(_)) => return,
            },
            None => response,
        };
        self.unmatched.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            correlation_id = undelivered.correlation_id.as_deref().unwrap_or(""),
            message_id = %undelivered.id,
            "response for an unknown or expired invocation ignored"
        );
    }

    /// Fails one pending invocation.
    pub(crate) fn fail(&self, correlation_id: &str, error: BridgeError) {
        if let Some(tx) = self.pending.lock().remove(correlation_id) {
            let _ = tx.send(Err(error));
        }
    }

    /// Refuses new invocations and fails every pending one with `error`. Returns how many.
    pub(crate) fn close(&self, error: &BridgeError) -> usize {
        let pending: Vec<_> = {
            let mut pending = self.pending.lock();
            self.closed.store(true, Ordering::Release);
            pending.drain().map(|(_, tx)| tx).collect()
        };
        let n = pending.len();
        for tx in pending {
            let _ = tx.send(Err(error.clone()));
        }
        n
    }

    /// Responses that found no pending invocation.
    pub(crate) fn unmatched(&self) -> u64 {
        self.unmatched.load(Ordering::Relaxed)
    }
}

/// Removes a pending entry when the invocation stops waiting, however it stops.
pub(crate) struct PendingSlot<'a> {
    inbox: &'a Inbox,
    correlation_id: Arc<str>,
}

impl PendingSlot<'_> {
    /// The `correlationId` the invocation waits for.
    pub(crate) fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        self.inbox.pending.lock().remove(&self.correlation_id);
    }
}
