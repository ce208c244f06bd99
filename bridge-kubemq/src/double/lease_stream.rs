//! `StreamQueueMessage`, as KubeMQ serves it: one message per stream, held for its visibility.
//!
//! * `ReceiveMessage` waits up to its wait time for the next ready message and holds it for
//!   `VisibilitySeconds`; with none it answers "no new messages in queue" and the stream ends.
//! * `AckMessage` / `RejectMessage` (with the message's sequence), `ResendMessage` (to a
//!   channel, receive count reset) and `SendModifiedMessage` (another message sent in its
//!   place) settle it; each answers and ends the stream.
//! * `ModifyVisibility` restarts the visibility timer.
//! * When the visibility runs out the stream answers "visibility expired", the message goes
//!   back to its queue and the stream ends; when the client goes away the message goes back too.
//!   A message back in its queue counts one more receive when it is received again.

use std::sync::Arc;
use std::time::Duration;

use kubemq::proto::kubemq::{
    StreamQueueMessagesRequest, StreamQueueMessagesResponse, StreamRequestType,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic012::{Status, Streaming};

use super::State;
use super::queues::{Hold, Settle};
use super::service::check_channel;

/// Serves one `StreamQueueMessage` call until it ends.
pub(crate) async fn serve(
    state: Arc<State>,
    mut incoming: Streaming<StreamQueueMessagesRequest>,
    tx: mpsc::Sender<Result<StreamQueueMessagesResponse, Status>>,
) {
    let holder = super::new_id();
    let lease = |until| Hold::Lease {
        holder: holder.clone(),
        until,
    };
    let mut held_until: Option<Instant> = None;
    let mut last_request = StreamQueueMessagesRequest::default();
    loop {
        let next = match held_until {
            Some(until) => tokio::select! {
                m = incoming.message() => Some(m),
                () = tokio::time::sleep_until(until) => None,
            },
            None => Some(incoming.message().await),
        };
        let r = match next {
            Some(Ok(Some(r))) => r,
            Some(_) => break,
            None => {
                let answer = StreamQueueMessagesResponse {
                    request_id: last_request.request_id.clone(),
                    stream_request_type_data: last_request.stream_request_type_data,
                    is_error: true,
                    error: "visibility expired".into(),
                    ..Default::default()
                };
                let _ = tx.send(Ok(answer)).await;
                break;
            }
        };
        last_request = r.clone();
        let kind = StreamRequestType::try_from(r.stream_request_type_data)
            .unwrap_or(StreamRequestType::Unknown);
        let mut answer = StreamQueueMessagesResponse {
            request_id: r.request_id.clone(),
            stream_request_type_data: r.stream_request_type_data,
            ..Default::default()
        };
        let mut end = false;
        let fail = |answer: &mut StreamQueueMessagesResponse, text: &str| {
            answer.is_error = true;
            answer.error = text.to_string();
        };
        match kind {
            StreamRequestType::ReceiveMessage => {
                if held_until.is_some() {
                    fail(&mut answer, "subscription is active already");
                } else if let Err(s) = check_channel(&r.channel, false) {
                    fail(&mut answer, s.message());
                } else {
                    // KubeMQ's defaults: 60 s visibility, 1 s wait.
                    let visibility = if r.visibility_seconds > 0 {
                        r.visibility_seconds
                    } else {
                        60
                    };
                    let wait = if r.wait_time_seconds > 0 {
                        r.wait_time_seconds
                    } else {
                        1
                    };
                    let until = Instant::now() + Duration::from_secs(visibility as u64);
                    let mut got = state
                        .queues
                        .take(
                            &r.channel,
                            1,
                            Duration::from_secs(wait as u64),
                            Some(lease(until)),
                        )
                        .await;
                    match got.pop() {
                        Some(m) => {
                            // The visibility runs from the moment the message is handed out.
                            let until = Instant::now() + Duration::from_secs(visibility as u64);
                            state.queues.modify_visibility(&holder, visibility);
                            held_until = Some(until);
                            answer.message = Some(m);
                        }
                        None => {
                            fail(&mut answer, "no new messages in queue");
                            end = true;
                        }
                    }
                }
            }
            StreamRequestType::AckMessage
            | StreamRequestType::RejectMessage
            | StreamRequestType::ResendMessage
            | StreamRequestType::SendModifiedMessage => {
                let hold = lease(Instant::now());
                let sequenced = matches!(
                    kind,
                    StreamRequestType::AckMessage | StreamRequestType::RejectMessage
                );
                if held_until.is_none() || !state.queues.holds(&holder) {
                    fail(&mut answer, "no active message to settle");
                } else if kind == StreamRequestType::ResendMessage
                    && check_channel(&r.channel, false).is_err()
                {
                    fail(&mut answer, "resend needs a channel");
                } else if kind == StreamRequestType::SendModifiedMessage
                    && r.modified_message.is_none()
                {
                    fail(&mut answer, "modified message missing");
                } else {
                    let how = match kind {
                        StreamRequestType::AckMessage | StreamRequestType::SendModifiedMessage => {
                            Settle::Ack
                        }
                        StreamRequestType::RejectMessage => Settle::Reject,
                        _ => Settle::Move(r.channel.clone()),
                    };
                    // Ack and reject name the message by its sequence (KubeMQ refuses another).
                    let seq = [r.ref_sequence];
                    let which = sequenced.then_some(&seq[..]);
                    if state.queues.settle(&hold, which, &how) == 0 {
                        fail(&mut answer, "invalid message sequence");
                    } else {
                        if let Some(m) = r.modified_message.clone()
                            && kind == StreamRequestType::SendModifiedMessage
                        {
                            let result = state.queues.send(m);
                            if result.is_error {
                                fail(&mut answer, &result.error);
                            }
                        }
                        end = true;
                    }
                }
            }
            StreamRequestType::ModifyVisibility => {
                let seconds = if r.visibility_seconds > 0 {
                    r.visibility_seconds
                } else {
                    60
                };
                if held_until.is_none() || !state.queues.modify_visibility(&holder, seconds) {
                    fail(&mut answer, "no active message");
                } else {
                    held_until = Some(Instant::now() + Duration::from_secs(seconds as u64));
                }
            }
            StreamRequestType::Unknown => fail(&mut answer, "unknown request type"),
        }
        if tx.send(Ok(answer)).await.is_err() || end {
            break;
        }
    }
    // The stream ended: what it still holds goes back.
    state
        .queues
        .settle(&lease(Instant::now()), None, &Settle::Reject);
}
