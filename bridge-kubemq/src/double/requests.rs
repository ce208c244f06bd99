//! Commands and queries, as KubeMQ documents them: a request goes to the responders
//! subscribed to its exact channel and type (no wildcards), one per group, every one without
//! a group; the sender waits for the first response up to the request's mandatory timeout.
//! Nobody subscribed, or nobody answering in time, looks the same to the sender: KubeMQ does
//! not tell, it answers `Error 301: timeout for request message` when the timeout passes.

use std::collections::HashMap;
use std::time::Duration;

use kubemq::proto::kubemq::{Request, Response};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic012::Status;

/// The text KubeMQ answers when a request's timeout passes without a response.
pub const TIMEOUT_TEXT: &str = "Error 301: timeout for request message";

struct Responder {
    channel: String,
    group: String,
    /// `RequestType` (command = 1, query = 2).
    kind: i32,
    tx: mpsc::Sender<Result<Request, Status>>,
}

/// Responders and requests waiting for their response.
#[derive(Default)]
pub struct Requests {
    responders: Mutex<Vec<Responder>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Response>>>,
    turns: Mutex<HashMap<(String, String), usize>>,
}

const RESPONDER_BUFFER: usize = 1024;

impl Requests {
    /// A new responder on `channel` for requests of `kind`.
    pub fn subscribe(
        &self,
        channel: &str,
        group: &str,
        kind: i32,
    ) -> mpsc::Receiver<Result<Request, Status>> {
        let (tx, rx) = mpsc::channel(RESPONDER_BUFFER);
        self.responders.lock().push(Responder {
            channel: channel.to_string(),
            group: group.to_string(),
            kind,
            tx,
        });
        rx
    }

    /// Hands `request` to its responders and waits for the first response.
    pub async fn send(&self, mut request: Request) -> Result<Response, Status> {
        if request.timeout <= 0 {
            return Err(Status::invalid_argument(
                "request timeout must be greater than 0",
            ));
        }
        if request.request_id.is_empty() {
            request.request_id = super::new_id();
        }
        request.reply_channel = format!("_INBOX.{}", request.request_id);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(request.request_id.clone(), tx);
        {
            let mut responders = self.responders.lock();
            responders.retain(|r| !r.tx.is_closed());
            let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
            let mut chosen = Vec::new();
            for (i, r) in responders.iter().enumerate() {
                if r.channel != request.channel || r.kind != request.request_type_data {
                    continue;
                }
                if r.group.is_empty() {
                    chosen.push(i);
                } else {
                    groups.entry(&r.group).or_default().push(i);
                }
            }
            let mut turns = self.turns.lock();
            for (group, members) in groups {
                let turn = turns
                    .entry((request.channel.clone(), group.to_string()))
                    .or_insert(0);
                chosen.push(members[*turn % members.len()]);
                *turn = turn.wrapping_add(1);
            }
            for i in chosen {
                let _ = responders[i].tx.try_send(Ok(request.clone()));
            }
        }
        let timeout = Duration::from_millis(request.timeout as u64);
        let answer = tokio::time::timeout(timeout, rx).await;
        self.waiting.lock().remove(&request.request_id);
        match answer {
            Ok(Ok(response)) => Ok(response),
            _ => Err(Status::internal(TIMEOUT_TEXT)),
        }
    }

    /// A responder's answer: reaches the waiting sender, or nobody when it gave up.
    pub fn respond(&self, mut response: Response) -> Result<(), Status> {
        if response.request_id.is_empty() {
            return Err(Status::invalid_argument("response has no request id"));
        }
        if response.timestamp == 0 {
            response.timestamp = super::pubsub::now_ns();
        }
        if let Some(tx) = self.waiting.lock().remove(&response.request_id) {
            let _ = tx.send(response);
        }
        Ok(())
    }

    /// Drops every responder (a server stop).
    pub fn disconnect_all(&self) {
        self.responders.lock().clear();
        self.waiting.lock().clear();
    }
}
