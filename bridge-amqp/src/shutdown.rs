//! Shutdown: one explicit sequence that returns by its deadline in every state of the broker.
//!
//! Stop intake (every keeper cancels its consumer — all but the reply consumer, so pending
//! invocations and open stream sessions can still complete — and deletes the command and
//! stream queues this instance was the last to serve), wait until in-flight work and this
//! instance's tasks (stream producers among them) are done or the deadline passes, fail what is
//! still pending with 503 (stream sessions too), stop the supervisor, delete this instance's
//! queues and close the connection. Every step that waits for the broker is bounded by the
//! deadline; the last ones (telling stream openers, deleting queues, the polite close) get at
//! most [`FINAL_GRACE`] beyond it, so that a stalled broker costs the caller its deadline and
//! no more.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use purista_core::kit::millis;
use purista_core::{BridgeError, DrainReport};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::registry::Registration;
use crate::session::Session;
use crate::shared::Shared;
use crate::streams;
use crate::topology::name;

/// How long the last steps (notices, deletions, the close) may take beyond the deadline.
const FINAL_GRACE: Duration = Duration::from_millis(250);

/// Drains and closes the bridge whose state is `shared`, by `deadline`.
pub(crate) async fn drain(
    shared: &Arc<Shared>,
    stop: &watch::Sender<bool>,
    supervisor: Option<JoinHandle<()>>,
    deadline: Instant,
) -> DrainReport {
    let began = Instant::now();
    shared.work.close();
    let registrations = shared.registry.drain();
    // Commands and streams this instance was the last to serve fail with 502 from now on.
    futures::future::join_all(registrations.iter().map(|reg| reg.request_stop(deadline))).await;
    let idle = shared.work.tracker.wait_idle(deadline).await;
    shared.work.tasks.close();
    let tasks_done = shared.work.tasks.wait_empty(deadline).await;
    let mut still_running = shared.work.tracker.running();
    let rejected = shared
        .work
        .inbox
        .close(&BridgeError::Unavailable("bridge shutting down".into()));
    let abandoned = shared.work.streams.running_producers();
    shared.work.streams.end_all("bridge shutting down", true);
    let aborted = shared.work.tasks.abort_all();
    if !aborted.is_empty() {
        tracing::warn!(
            instance_id = %shared.instance_id,
            aborted = aborted.len(),
            "shutdown deadline passed: remaining bridge tasks aborted"
        );
    }
    still_running.extend(aborted);

    let last = deadline.max(Instant::now()) + FINAL_GRACE;
    // Sessions this instance still served are gone with their tasks: tell their openers.
    if !abandoned.is_empty() {
        let reason = "the producing bridge instance shut down";
        let told = streams::abandon_producers(shared, &abandoned, reason);
        if tokio::time::timeout_at(last, told).await.is_err() {
            tracing::debug!("not every stream opener could be told of the shutdown in time");
        }
    }
    let _ = stop.send(true);
    if let Some(mut supervisor) = supervisor
        && tokio::time::timeout_at(last, &mut supervisor)
            .await
            .is_err()
    {
        supervisor.abort();
    }
    if let Some(session) = shared.link.replace(None) {
        let deleted = delete_instance_queues(&session, &registrations);
        if tokio::time::timeout_at(last, deleted).await.is_err() {
            tracing::debug!("instance queues not deleted in time; the broker expires them");
        }
        session.close(last).await;
    }
    DrainReport {
        completed: idle && tasks_done,
        still_running,
        rejected_invocations: rejected,
        waited_ms: millis(began.elapsed()),
    }
}

/// Deletes what belongs to this instance alone: its non-durable broadcast queues. (Not the
/// reply queue: it is exclusive and goes with the connection, and deleting it under its
/// consumer makes lapin close that channel while the connection closes, which it reports as an
/// error.)
async fn delete_instance_queues(session: &Session, registrations: &[Arc<Registration>]) {
    if !session.is_live() {
        return;
    }
    let Ok(channel) = session.admin_channel().await else {
        return;
    };
    let queues: Vec<String> = registrations
        .iter()
        .filter(|r| r.spec().is_some_and(|s| !s.shared && !s.durable))
        .map(|r| r.queue.to_string())
        .collect();
    if queues.is_empty() {
        return;
    }
    for queue in queues {
        let Ok(queue_name) = name(&queue) else {
            continue;
        };
        if let Err(error) = channel
            .queue_delete(queue_name, QueueDeleteOptions::default())
            .await
        {
            tracing::debug!(%queue, %error, "deleting an instance queue failed");
            return;
        }
    }
}
