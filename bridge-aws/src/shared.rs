//! What every part of one bridge instance uses: settings, names, the AWS clients, the task
//! set, in-flight counters and the operator's counters. The parts (commands, subscriptions,
//! dead letters, janitor) depend on this file and never on each other's state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::collections::HashMap;

use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use aws_sdk_sqs::types::builders::SendMessageBatchRequestEntryBuilder;
use parking_lot::Mutex;
use purista_core::kit::{PendingInvocations, TaskSet, broker_call};
use purista_core::{BridgeCounters, BridgeError, Envelope, InFlightTracker};
use tokio::sync::watch;

use crate::batch::{Batcher, MAX_BATCH};
use crate::client::sdk_error;

use crate::client::Clients;
use crate::config::AwsConfig;
use crate::names::Names;

/// Message attribute: the delivery's attempt number (retry copies carry it).
pub const ATTR_ATTEMPT: &str = "purista-attempt";
/// Message attribute: epoch ms before which a retry copy is not handled (delays past SQS's
/// 15 min `DelaySeconds` are continued with visibility changes).
pub const ATTR_NOT_BEFORE: &str = "purista-not-before";
/// Queue tag: the bridge instance that owns a per-instance queue.
pub const TAG_OWNER: &str = "purista-owner";
/// Queue tag: when the owner last said it is alive (epoch ms).
pub const TAG_SEEN: &str = "purista-seen";
/// Queue tag: the rule that feeds a broadcast queue (removed with it).
pub const TAG_RULE: &str = "purista-rule";

/// Shared state of one bridge instance.
pub struct Shared {
    /// Settings.
    pub config: AwsConfig,
    /// Resource names.
    pub names: Names,
    /// This instance's id (PURISTA `instanceId`).
    pub instance_id: String,
    /// The AWS clients.
    pub clients: Clients,
    /// Every task the bridge spawns, but the receive loops.
    pub tasks: Arc<TaskSet>,
    /// The receive loops: told to stop at shutdown, they finish their open long poll (so
    /// that what it brings is released, not hidden for a visibility timeout) and end by
    /// themselves. They are not the work a drain reports.
    pub receivers: Arc<TaskSet>,
    /// In-flight work by kind and registration.
    pub tracker: InFlightTracker,
    /// Invocations waiting for their response (failed with 503 at shutdown).
    pub pending: PendingInvocations<Envelope>,
    /// Set once shutdown began: no new work is taken.
    pub closing: AtomicBool,
    /// URLs of this instance's own queues (reply, broadcast), whose last-seen tag the janitor
    /// renews.
    pub own_queues: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Dead-letter queue URLs by target.
    pub dead_letter_urls: crate::dead_letters::DeadLetterUrls,
    /// Who wants copies of commands and responses on the bus.
    pub copies: crate::copies::Copies,
    poison: AtomicU64,
    reconnects: AtomicU64,
    stop_batches: watch::Sender<bool>,
    events: Batcher<PutEventsRequestEntry>,
    senders: Mutex<HashMap<String, Batcher<SendMessageBatchRequestEntryBuilder>>>,
    deleters: Mutex<HashMap<String, Batcher<String>>>,
    packers: Mutex<HashMap<String, Batcher<String>>>,
}

impl Shared {
    /// State for a new instance.
    pub fn new(config: AwsConfig, instance_id: String, clients: Clients) -> Arc<Self> {
        let tasks = TaskSet::new();
        let (stop_batches, stop) = watch::channel(false);
        let events = {
            let client = clients.events.clone();
            let timeout = config.call_timeout;
            Batcher::start(
                &tasks,
                "PutEvents",
                stop,
                config.max_message_bytes,
                MAX_BATCH,
                move |entries| put_events(client.clone(), timeout, entries),
            )
        };
        Arc::new(Shared {
            stop_batches,
            events,
            senders: Mutex::new(HashMap::new()),
            deleters: Mutex::new(HashMap::new()),
            packers: Mutex::new(HashMap::new()),
            names: Names::new(&config.prefix),
            config,
            instance_id,
            clients,
            tasks,
            receivers: TaskSet::new(),
            tracker: InFlightTracker::new(),
            pending: PendingInvocations::default(),
            closing: AtomicBool::new(false),
            dead_letter_urls: Default::default(),
            copies: Default::default(),
            own_queues: Default::default(),
            poison: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        })
    }

    /// Whether shutdown began.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// A message could not be decoded or was refused as poison.
    pub fn count_poison(&self) {
        self.poison.fetch_add(1, Ordering::Relaxed);
    }

    /// A receive loop got answers again after failed calls.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Puts one entry on the bus (batched with others).
    pub async fn put_event(
        &self,
        entry: PutEventsRequestEntry,
        size: usize,
    ) -> Result<(), BridgeError> {
        self.events.submit(entry, size).await
    }

    /// Sends one message to the queue at `url` (batched with others to the same queue).
    pub async fn send(
        &self,
        url: &str,
        entry: SendMessageBatchRequestEntryBuilder,
        size: usize,
    ) -> Result<(), BridgeError> {
        let batcher = {
            let mut senders = self.senders.lock();
            senders
                .entry(url.to_string())
                .or_insert_with(|| {
                    let client = self.clients.sqs.clone();
                    let timeout = self.config.call_timeout;
                    let url = url.to_string();
                    Batcher::start(
                        &self.tasks,
                        "SendMessageBatch",
                        self.stop_batches.subscribe(),
                        self.config.max_message_bytes,
                        MAX_BATCH,
                        move |entries| send_batch(client.clone(), timeout, url.clone(), entries),
                    )
                })
                .clone()
        };
        batcher.submit(entry, size).await
    }

    /// Sends one item (a JSON value) to the queue at `url` in a pack: items sent while
    /// others are on their way share one SQS message (`{"puristaPack":[…]}`), up to
    /// [`PACK_ITEMS`] items and the message limit. Commands and responses travel this way.
    pub async fn send_packed(&self, url: &str, item: String) -> Result<(), BridgeError> {
        let batcher = {
            let mut packers = self.packers.lock();
            packers
                .entry(url.to_string())
                .or_insert_with(|| {
                    let client = self.clients.sqs.clone();
                    let timeout = self.config.call_timeout;
                    let url = url.to_string();
                    Batcher::start(
                        &self.tasks,
                        "SendMessage (pack)",
                        self.stop_batches.subscribe(),
                        self.config.max_message_bytes.saturating_sub(64),
                        PACK_ITEMS,
                        move |items| send_pack(client.clone(), timeout, url.clone(), items),
                    )
                })
                .clone()
        };
        let size = item.len() + 1;
        batcher.submit(item, size).await
    }

    /// Deletes one received message (batched with others of the same queue).
    pub async fn delete(&self, url: &str, receipt: &str) -> Result<(), BridgeError> {
        let batcher = {
            let mut deleters = self.deleters.lock();
            deleters
                .entry(url.to_string())
                .or_insert_with(|| {
                    let client = self.clients.sqs.clone();
                    let timeout = self.config.call_timeout;
                    let url = url.to_string();
                    Batcher::start(
                        &self.tasks,
                        "DeleteMessageBatch",
                        self.stop_batches.subscribe(),
                        usize::MAX,
                        MAX_BATCH,
                        move |receipts| {
                            delete_batch(client.clone(), timeout, url.clone(), receipts)
                        },
                    )
                })
                .clone()
        };
        batcher.submit(receipt.to_string(), 0).await
    }

    /// Ends the batchers (at shutdown, once no handler runs).
    pub fn stop_batches(&self) {
        let _ = self.stop_batches.send(true);
    }

    /// The operator's counters.
    pub fn counters(&self) -> BridgeCounters {
        BridgeCounters {
            reconnects: self.reconnects.load(Ordering::Relaxed),
            poison_messages: self.poison.load(Ordering::Relaxed),
            unmatched_responses: self.pending.unmatched(),
        }
    }
}

/// Epoch milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Most items in one pack.
pub const PACK_ITEMS: usize = 50;

/// The message body of a pack: `{"puristaPack":[item,…]}`.
pub fn pack_body(items: &[String]) -> String {
    let mut body = String::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 20);
    body.push_str("{\"puristaPack\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    body
}

/// The items of a pack body; `None` when the body is no pack.
pub fn unpack(body: &str) -> Option<Vec<&serde_json::value::RawValue>> {
    #[derive(serde::Deserialize)]
    struct Pack<'a> {
        #[serde(rename = "puristaPack", borrow)]
        items: Vec<&'a serde_json::value::RawValue>,
    }
    serde_json::from_str::<Pack<'_>>(body).ok().map(|p| p.items)
}

async fn send_pack(
    client: aws_sdk_sqs::Client,
    timeout: std::time::Duration,
    url: String,
    items: Vec<String>,
) -> Vec<Result<(), BridgeError>> {
    let n = items.len();
    let call = client
        .send_message()
        .queue_url(&url)
        .message_body(pack_body(&items))
        .send();
    match broker_call(timeout, "SendMessage", async {
        call.await
            .map(|_| ())
            .map_err(|e| sdk_error("sending a message", e))
    })
    .await
    {
        Ok(()) => (0..n).map(|_| Ok(())).collect(),
        Err(e) => all_failed(n, e),
    }
}

/// One result per entry of a failed whole call.
fn all_failed<T>(n: usize, error: BridgeError) -> Vec<Result<T, BridgeError>> {
    (0..n).map(|_| Err(error.clone())).collect()
}

async fn put_events(
    client: aws_sdk_eventbridge::Client,
    timeout: std::time::Duration,
    entries: Vec<PutEventsRequestEntry>,
) -> Vec<Result<(), BridgeError>> {
    let n = entries.len();
    let call = client.put_events().set_entries(Some(entries)).send();
    let out = match broker_call(timeout, "PutEvents", async {
        call.await
            .map_err(|e| sdk_error("putting events on the bus", e))
    })
    .await
    {
        Ok(out) => out,
        Err(e) => return all_failed(n, e),
    };
    let mut results: Vec<Result<(), BridgeError>> = out
        .entries
        .unwrap_or_default()
        .into_iter()
        .map(|e| match e.error_code {
            None => Ok(()),
            Some(code) => {
                let why = format!("{code}: {}", e.error_message.unwrap_or_default());
                if code.contains("Throttl") || code.contains("InternalFailure") {
                    Err(BridgeError::Unavailable(format!(
                        "EventBridge refused an event: {why}"
                    )))
                } else {
                    Err(BridgeError::Refused(format!("the bus: {why}")))
                }
            }
        })
        .collect();
    results.resize_with(n, || {
        Err(BridgeError::Broker("EventBridge gave no result".into()))
    });
    results
}

async fn send_batch(
    client: aws_sdk_sqs::Client,
    timeout: std::time::Duration,
    url: String,
    entries: Vec<SendMessageBatchRequestEntryBuilder>,
) -> Vec<Result<(), BridgeError>> {
    let n = entries.len();
    let built: Result<Vec<SendMessageBatchRequestEntry>, _> = entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| e.id(i.to_string()).build())
        .collect();
    let built = match built {
        Ok(b) => b,
        Err(e) => return all_failed(n, BridgeError::InvalidRequest(format!("SQS entry: {e}"))),
    };
    let call = client
        .send_message_batch()
        .queue_url(&url)
        .set_entries(Some(built))
        .send();
    let out = match broker_call(timeout, "SendMessageBatch", async {
        call.await.map_err(|e| sdk_error("sending messages", e))
    })
    .await
    {
        Ok(out) => out,
        Err(e) => return all_failed(n, e),
    };
    let mut results: Vec<Result<(), BridgeError>> = (0..n)
        .map(|_| Err(BridgeError::Broker("SQS gave no result".into())))
        .collect();
    for ok in out.successful {
        if let Some(r) = ok.id.parse::<usize>().ok().and_then(|i| results.get_mut(i)) {
            *r = Ok(());
        }
    }
    for failed in out.failed {
        if let Some(r) = failed
            .id
            .parse::<usize>()
            .ok()
            .and_then(|i| results.get_mut(i))
        {
            let why = format!("{}: {}", failed.code, failed.message.unwrap_or_default());
            *r = Err(if failed.sender_fault {
                BridgeError::Refused(format!("SQS: {why}"))
            } else {
                BridgeError::Unavailable(format!("SQS: {why}"))
            });
        }
    }
    results
}

async fn delete_batch(
    client: aws_sdk_sqs::Client,
    timeout: std::time::Duration,
    url: String,
    receipts: Vec<String>,
) -> Vec<Result<(), BridgeError>> {
    let n = receipts.len();
    let built: Result<Vec<_>, _> = receipts
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(r)
                .build()
        })
        .collect();
    let built = match built {
        Ok(b) => b,
        Err(e) => return all_failed(n, BridgeError::InvalidRequest(format!("SQS entry: {e}"))),
    };
    let call = client
        .delete_message_batch()
        .queue_url(&url)
        .set_entries(Some(built))
        .send();
    let out = match broker_call(timeout, "DeleteMessageBatch", async {
        call.await.map_err(|e| sdk_error("deleting messages", e))
    })
    .await
    {
        Ok(out) => out,
        Err(e) => return all_failed(n, e),
    };
    let mut results: Vec<Result<(), BridgeError>> = (0..n).map(|_| Ok(())).collect();
    for failed in out.failed {
        if let Some(r) = failed
            .id
            .parse::<usize>()
            .ok()
            .and_then(|i| results.get_mut(i))
        {
            *r = Err(BridgeError::Broker(format!(
                "SQS did not delete a message: {}: {}",
                failed.code,
                failed.message.unwrap_or_default()
            )));
        }
    }
    results
}
