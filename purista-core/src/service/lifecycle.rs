//! What start and shutdown share: the record of what a service registered on its bridge,
//! unregistering it again, and the info messages that tell listeners about the lifecycle.

use std::sync::Arc;

use serde_json::Value;

use super::context::Shared;
use crate::bridge::EventBridge;
use crate::envelope::{Address, Envelope, MessageType};
use crate::operator::RegistrationKey;

/// What a service registered on its bridge, in registration order.
#[derive(Default)]
pub(super) struct Registered {
    pub commands: Vec<Address>,
    pub streams: Vec<Address>,
    pub subscriptions: Vec<RegistrationKey>,
}

/// Emits an info message from the service (fresh trace id); a failure is only logged.
pub(super) async fn emit_info(shared: &Shared, t: MessageType, target: &str, payload: Value) {
    let mut e = Envelope::info(t, shared.sender(target), payload);
    e.trace_id = Some(crate::ids::new_id());
    if let Err(err) = shared.bridge.emit(e).await {
        tracing::warn!(error = %err, message_type = %t, "emitting info message failed");
    }
}

/// Registrations unregistered at once, at most: a service with many subscriptions does not
/// wait for one broker round trip chain after another, and the broker is not flooded.
const UNREGISTER_AT_ONCE: usize = 8;

/// Unregisters what a service registered: subscriptions, streams, then commands (each group
/// done before the next starts, up to [`UNREGISTER_AT_ONCE`] of a group at once). A failure is
/// logged and the rest still unregistered.
pub(super) async fn unregister_all(bridge: &Arc<dyn EventBridge>, registered: &Registered) {
    use futures::StreamExt;
    futures::stream::iter(&registered.subscriptions)
        .for_each_concurrent(UNREGISTER_AT_ONCE, |key| async move {
            if let Err(e) = bridge.unregister_subscription(key).await {
                tracing::warn!(registration = %key, error = %e, "unregistering subscription failed");
            }
        })
        .await;
    futures::stream::iter(&registered.streams)
        .for_each_concurrent(UNREGISTER_AT_ONCE, |a| async move {
            if let Err(e) = bridge.unregister_stream(a).await {
                tracing::warn!(registration = %a, error = %e, "unregistering stream failed");
            }
        })
        .await;
    futures::stream::iter(&registered.commands)
        .for_each_concurrent(UNREGISTER_AT_ONCE, |a| async move {
            if let Err(e) = bridge.unregister_command(a).await {
                tracing::warn!(registration = %a, error = %e, "unregistering command failed");
            }
        })
        .await;
}
