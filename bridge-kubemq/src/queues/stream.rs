//! One KubeMQ queue lease: the generated client's `StreamQueueMessage`, KubeMQ's
//! one-message-per-stream protocol with a visibility timeout.
//!
//! A stream receives one message (`ReceiveMessage`: wait, visibility) and then settles it
//! exactly once: `AckMessage` (done), `SendModifiedMessage` (done here, and a new message —
//! the next attempt, or the dead letter — sent in the same request), `ResendMessage` (the same
//! message into a channel with its receive count reset: a hand-back that is not an attempt).
//! `ModifyVisibility` restarts the visibility timer. When the stream ends unsettled — the
//! process died, the connection broke, the visibility ran out — KubeMQ puts the message back
//! with its receive count raised, which the next lessee counts as an expired lease.
//!
//! KubeMQ counts visibility and waits in whole seconds; [`visibility_seconds`] rounds a lease
//! up and adds a second, so that the broker's timer never fires before the bridge's own
//! millisecond one.

use std::time::Duration;

use kubemq::proto::kubemq::{
    QueueMessage, StreamQueueMessagesRequest, StreamQueueMessagesResponse, StreamRequestType,
};
use purista_core::BridgeError;
use tokio::sync::mpsc;
use tonic012::Streaming;

use crate::connection::RawClient;

/// KubeMQ's longest visibility and delay (its `MaxVisibilitySeconds`, `MaxDelaySeconds`).
pub const MAX_SECONDS: i32 = 43_200;

/// The broker visibility that covers `lease`: whole seconds, rounded up, plus one.
pub fn visibility_seconds(lease: Duration) -> i32 {
    let secs = lease.as_millis().div_ceil(1000) + 1;
    i32::try_from(secs).unwrap_or(MAX_SECONDS).min(MAX_SECONDS)
}

/// The whole seconds KubeMQ may delay a message that is due in `delay` (never later than due:
/// the rest is waited out by the lessee).
pub fn delay_seconds(delay: Duration) -> i32 {
    i32::try_from(delay.as_secs())
        .unwrap_or(MAX_SECONDS)
        .min(MAX_SECONDS)
}

/// An open `StreamQueueMessage` call.
pub struct LeaseStream {
    tx: mpsc::Sender<StreamQueueMessagesRequest>,
    rx: Streaming<StreamQueueMessagesResponse>,
    client_id: String,
    channel: String,
    next_request: u64,
}

fn broken(what: &str, status: tonic012::Status) -> BridgeError {
    let retryable = matches!(
        status.code(),
        tonic012::Code::Unavailable | tonic012::Code::Cancelled | tonic012::Code::Unknown
    );
    BridgeError::client(what, status, retryable)
}

impl LeaseStream {
    /// Opens a stream on `channel` and asks for one message: held for `visibility` seconds,
    /// waiting up to `wait` seconds for it. `Ok(None)` when none came.
    pub async fn receive(
        mut raw: RawClient,
        client_id: &str,
        channel: &str,
        visibility: i32,
        wait: i32,
    ) -> Result<Option<(LeaseStream, QueueMessage)>, BridgeError> {
        let (tx, requests) = mpsc::channel::<StreamQueueMessagesRequest>(4);
        let mut stream_requests =
            LeaseStream::request(client_id, channel, "r0", StreamRequestType::ReceiveMessage);
        stream_requests.visibility_seconds = visibility.max(1);
        stream_requests.wait_time_seconds = wait.max(1);
        // Queued before the call: a server may send its headers only with its first answer.
        tx.try_send(stream_requests)
            .map_err(|_| BridgeError::Broker("the lease request could not be queued".into()))?;
        let outgoing = futures::stream::unfold(requests, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        });
        let mut rx = raw
            .stream_queue_message(outgoing)
            .await
            .map_err(|s| broken("opening a KubeMQ queue stream", s))?
            .into_inner();
        let answer = match rx.message().await {
            Ok(Some(answer)) => answer,
            Ok(None) => return Ok(None),
            Err(status) => return Err(broken("receiving a KubeMQ queue message", status)),
        };
        match answer.message {
            Some(message) if !answer.is_error => Ok(Some((
                LeaseStream {
                    tx,
                    rx,
                    client_id: client_id.to_string(),
                    channel: channel.to_string(),
                    next_request: 1,
                },
                message,
            ))),
            // "no new message in queue" (the wait ended) and the like.
            _ => Ok(None),
        }
    }

    fn request(
        client_id: &str,
        channel: &str,
        id: &str,
        kind: StreamRequestType,
    ) -> StreamQueueMessagesRequest {
        StreamQueueMessagesRequest {
            request_id: id.to_string(),
            client_id: client_id.to_string(),
            stream_request_type_data: kind as i32,
            channel: channel.to_string(),
            ..Default::default()
        }
    }

    async fn call(
        &mut self,
        kind: StreamRequestType,
        fill: impl FnOnce(&mut StreamQueueMessagesRequest),
    ) -> Result<(), BridgeError> {
        let id = format!("r{}", self.next_request);
        self.next_request += 1;
        let mut request = LeaseStream::request(&self.client_id, &self.channel, &id, kind);
        fill(&mut request);
        self.tx
            .send(request)
            .await
            .map_err(|_| BridgeError::Unavailable("the KubeMQ queue stream is closed".into()))?;
        loop {
            match self.rx.message().await {
                Ok(Some(answer)) if answer.request_id == id => {
                    return if answer.is_error {
                        Err(BridgeError::Broker(format!(
                            "KubeMQ refused {kind:?}: {}",
                            answer.error
                        )))
                    } else {
                        Ok(())
                    };
                }
                // An answer to something earlier (a visibility notice): not ours.
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(BridgeError::Unavailable(
                        "KubeMQ ended the queue stream".into(),
                    ));
                }
                Err(status) => return Err(broken("settling a KubeMQ queue message", status)),
            }
        }
    }

    /// Done: removes the message.
    pub async fn ack(&mut self, sequence: u64) -> Result<(), BridgeError> {
        self.call(StreamRequestType::AckMessage, |r| r.ref_sequence = sequence)
            .await
    }

    /// Restarts the visibility timer at `seconds`.
    pub async fn modify_visibility(&mut self, seconds: i32) -> Result<(), BridgeError> {
        self.call(StreamRequestType::ModifyVisibility, |r| {
            r.visibility_seconds = seconds.clamp(1, MAX_SECONDS)
        })
        .await
    }

    /// Removes the message and sends `replacement` in its place.
    pub async fn send_modified(
        &mut self,
        sequence: u64,
        replacement: QueueMessage,
    ) -> Result<(), BridgeError> {
        self.call(StreamRequestType::SendModifiedMessage, |r| {
            r.ref_sequence = sequence;
            r.modified_message = Some(replacement);
        })
        .await
    }

    /// Puts the message, unchanged and with its receive count reset, into `channel`.
    pub async fn resend(&mut self, sequence: u64, channel: &str) -> Result<(), BridgeError> {
        let channel = channel.to_string();
        self.call(StreamRequestType::ResendMessage, |r| {
            r.ref_sequence = sequence;
            r.channel = channel;
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_visibility_always_outlasts_the_lease() {
        assert_eq!(visibility_seconds(Duration::from_millis(200)), 2);
        assert_eq!(visibility_seconds(Duration::from_secs(1)), 2);
        assert_eq!(visibility_seconds(Duration::from_millis(1001)), 3);
        assert_eq!(
            visibility_seconds(Duration::from_secs(100_000)),
            MAX_SECONDS
        );
        assert_eq!(delay_seconds(Duration::from_millis(1999)), 1);
        assert_eq!(delay_seconds(Duration::from_millis(300)), 0);
    }
}
