//! Commands: running a handler for one invocation and bringing its response home.
//!
//! An invocation picks one [`CommandMember`] of the endpoint's group (round robin across all
//! bridge instances on the hub) and runs its handler in a task of the *responder's* bridge, so
//! the responder's shutdown can wait for it. The stamped response goes to the caller's
//! [`Inbox`], where a pending entry keyed by `correlationId` waits, and is also offered to
//! subscriptions (a success response with an `eventName` is an event too).
//!
//! The pending entry (core's [`PendingInvocations`]) is removed when the caller stops waiting
//! (response, timeout, or the caller dropping its future); a response that finds no entry is
//! ignored with a warning and counted.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use purista_core::kit::{self, PendingInvocations, TaskSet};
use purista_core::{BridgeError, CommandHandler, Envelope, ErrorPayload, StatusCode, WorkKind};

use crate::broker::{EndpointMember, Hub};

/// One bridge instance's reply inbox: its pending invocations by `correlationId`, holding the
/// response it shares with subscriptions.
pub(crate) type Inbox = PendingInvocations<Arc<Envelope>>;

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
    kit::stamp_response(&mut response, command, &member.instance_id);
    response
}
