//! The AWS baseline: the same exchanges with the bare SDK (`aws-sdk-eventbridge`,
//! `aws-sdk-sqs`) and none of purista, with the bridge's receive settings (long polling with
//! the URL's `wait_seconds`, up to 10 messages per receive for commands, replies and jobs, up
//! to the subscription's prefetch of 8 for events; receive count and message attributes asked
//! for) and its batch calls (`DeleteMessageBatch` of what one receive brought).
//!
//! * `cmd-seq` / `cmd-conc`: the caller sends each request (`{"id","payload"}`) with
//!   `SendMessage` to a command queue; one responder receives, deletes the batch and answers each
//!   request with its body on the caller's reply queue (`SendMessageBatch`); the caller's
//!   reply loop receives, hands each reply to its waiting call by `id` and deletes the batch.
//!   The bridge also puts commands and responses on the bus while a subscription can match them
//!   (none does here; it then looks at the bus's rules at most twice a second) and packs
//!   concurrent sends to one queue into one message: both stay in the ratio.
//! * `fanout`: `PutEvents` (one entry per call, as a service emits one event at a time) on a bus
//!   of its own with 4 rules, each with one SQS queue as its target (the bridge's input
//!   transformer, `{"detail": <detail>}`); 4 receivers count and delete.
//! * `queue`: `SendMessage` per job to one queue; one worker receives, counts and deletes. A
//!   job counts once its delete succeeded (the bridge's run ends when the queue reports
//!   nothing ready or leased).
//!
//! Every resource is named `<prefix>-raw-<id>…` and removed at the end of the scenario.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use aws_sdk_eventbridge::types::{InputTransformer, PutEventsRequestEntry, Target};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::aws::Sdk;
use crate::drive::{self, Progress};
use crate::measurement::Measurement;
use crate::payload;
use crate::workload::{Scenario, Workload};

const LABEL: &str = "raw-aws";
/// Messages per receive on command, reply and job queues (SQS's maximum, as the bridge asks).
const COMMAND_BATCH: i32 = 10;
/// Messages per receive on a subscription queue: the subscription's prefetch (default 8).
const SUBSCRIPTION_BATCH: i32 = 8;
/// How long a call waits for its reply (the bridge's default command timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed call in a receive loop (no hot loop against a failing endpoint).
const BACKOFF: Duration = Duration::from_millis(100);
/// The `source` and `detail-type` of the baseline's events.
const SOURCE: &str = "raw.bench";
const DETAIL_TYPE: &str = "tick";

/// Runs `scenario` on the AWS (or emulator) `url` names, resources under `prefix`.
pub async fn run(
    scenario: Scenario,
    workload: &Workload,
    url: &str,
    prefix: &str,
) -> anyhow::Result<Measurement> {
    let sdk = Sdk::connect(url).await?;
    let base = format!("{prefix}-raw-{}", &purista::ids::new_id()[..6]);
    let result = match scenario {
        Scenario::CmdSeq | Scenario::CmdConc => commands(scenario, workload, &sdk, &base).await,
        Scenario::Fanout => fanout(workload, &sdk, &base).await,
        Scenario::Queue => queue(workload, &sdk, &base).await,
    };
    if let Err(e) = crate::aws::sweep(url, &base).await {
        eprintln!("purista-bench: warning: removing the raw baseline's `{base}…` failed: {e:#}");
    }
    result
}

/// Receive loops, aborted when dropped (an open long poll is simply abandoned: the queues are
/// deleted next).
#[derive(Default)]
struct Loops(Vec<JoinHandle<()>>);

impl Loops {
    fn spawn(&mut self, work: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(work));
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn create_queue(
    sdk: &Sdk,
    name: &str,
    policy: Option<String>,
) -> anyhow::Result<(String, String)> {
    let mut create = sdk.sqs.create_queue().queue_name(name).attributes(
        QueueAttributeName::VisibilityTimeout,
        sdk.visibility_seconds.to_string(),
    );
    if let Some(policy) = policy {
        create = create.attributes(QueueAttributeName::Policy, policy);
    }
    let url = create
        .send()
        .await
        .with_context(|| format!("creating queue {name}"))?
        .queue_url
        .with_context(|| format!("queue {name} has no URL"))?;
    Ok((name.to_string(), url))
}

/// One long poll for up to `max` messages, with the bridge's attributes.
async fn receive(sdk: &Sdk, url: &str, max: i32) -> anyhow::Result<Vec<Message>> {
    let out = sdk
        .sqs
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max)
        .wait_time_seconds(sdk.wait_seconds)
        .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
        .message_attribute_names("All")
        .send()
        .await
        .context("ReceiveMessage")?;
    Ok(out.messages.unwrap_or_default())
}

/// Deletes what one receive brought, in one call; returns how many were deleted.
async fn delete(sdk: &Sdk, url: &str, messages: &[Message]) -> anyhow::Result<usize> {
    let entries = messages
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .set_receipt_handle(m.receipt_handle.clone())
                .build()
                .ok()
        })
        .collect::<Vec<_>>();
    if entries.is_empty() {
        return Ok(0);
    }
    let out = sdk
        .sqs
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .context("DeleteMessageBatch")?;
    Ok(out.successful.len())
}

fn report(what: &str, error: &anyhow::Error) {
    eprintln!("  raw-aws: {what}: {error:#}");
}

/// The calls waiting for their reply, by request id. A plain mutex: held for an insert or a
/// remove, never across an await.
#[derive(Default)]
struct Pending(Mutex<HashMap<u64, oneshot::Sender<String>>>);

impl Pending {
    fn insert(&self, id: u64, reply: oneshot::Sender<String>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, reply);
    }

    fn remove(&self, id: u64) -> Option<oneshot::Sender<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id)
    }
}

/// The responder: receive, delete, answer each request with its body on the reply queue.
async fn respond(sdk: Sdk, commands: String, replies: String) {
    loop {
        let messages = match receive(&sdk, &commands, COMMAND_BATCH).await {
            Ok(m) => m,
            Err(e) => {
                report("receiving commands", &e);
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let (sdk, commands, replies) = (sdk.clone(), commands.clone(), replies.clone());
        tokio::spawn(async move {
            // Deleted before answering: commands are at most once, as on the bridge.
            if let Err(e) = delete(&sdk, &commands, &messages).await {
                report("deleting commands", &e);
                return;
            }
            let entries = messages
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(m.body.clone().unwrap_or_default())
                        .build()
                        .ok()
                })
                .collect::<Vec<_>>();
            let sent = sdk
                .sqs
                .send_message_batch()
                .queue_url(&replies)
                .set_entries(Some(entries))
                .send()
                .await;
            if let Err(e) = sent {
                report("sending replies", &anyhow::Error::new(e));
            }
        });
    }
}

/// The caller's reply loop: receive, hand each reply to its call, delete.
async fn take_replies(sdk: Sdk, replies: String, pending: Arc<Pending>) {
    loop {
        let messages = match receive(&sdk, &replies, COMMAND_BATCH).await {
            Ok(m) => m,
            Err(e) => {
                report("receiving replies", &e);
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        for message in &messages {
            let body = message.body.clone().unwrap_or_default();
            let id = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_u64));
            if let Some(reply) = id.and_then(|id| pending.remove(id)) {
                let _ = reply.send(body);
            }
        }
        let (sdk, replies) = (sdk.clone(), replies.clone());
        tokio::spawn(async move {
            if let Err(e) = delete(&sdk, &replies, &messages).await {
                report("deleting replies", &e);
            }
        });
    }
}

async fn commands(
    scenario: Scenario,
    workload: &Workload,
    sdk: &Sdk,
    base: &str,
) -> anyhow::Result<Measurement> {
    let (_, command_url) = create_queue(sdk, &format!("{base}-cmd"), None).await?;
    let (_, reply_url) = create_queue(sdk, &format!("{base}-reply"), None).await?;
    let pending = Arc::new(Pending::default());
    let mut loops = Loops::default();
    loops.spawn(respond(sdk.clone(), command_url.clone(), reply_url.clone()));
    loops.spawn(take_replies(sdk.clone(), reply_url, pending.clone()));
    let ids = Arc::new(AtomicU64::new(0));
    let call = {
        let sdk = sdk.clone();
        move |seq: u64| {
            let (sdk, url, pending, ids) = (
                sdk.clone(),
                command_url.clone(),
                pending.clone(),
                ids.clone(),
            );
            async move {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let body = json!({ "id": id, "payload": payload::value(seq) }).to_string();
                let (tx, rx) = oneshot::channel();
                pending.insert(id, tx);
                let sent = sdk
                    .sqs
                    .send_message()
                    .queue_url(url)
                    .message_body(body)
                    .send()
                    .await;
                if let Err(e) = sent {
                    pending.remove(id);
                    return Err(anyhow::Error::new(e).context(format!("sending call {seq}")));
                }
                let reply = tokio::time::timeout(CALL_TIMEOUT, rx).await;
                let Ok(Ok(reply)) = reply else {
                    pending.remove(id);
                    bail!("call {seq}: no reply within {} s", CALL_TIMEOUT.as_secs());
                };
                let reply: Value = serde_json::from_str(&reply)?;
                ensure!(
                    reply.get("payload").and_then(payload::seq_of) == Some(seq),
                    "call {seq} got a wrong answer: {reply}"
                );
                Ok(())
            }
        }
    };
    let measured = drive::commands(LABEL, scenario, workload, call).await;
    drop(loops);
    measured
}

/// The rule pattern of the baseline's events.
fn pattern() -> String {
    json!({ "source": [SOURCE], "detail-type": [DETAIL_TYPE] }).to_string()
}

/// A rule on `bus` with one SQS queue as its target; returns the queue's URL.
async fn route(sdk: &Sdk, bus: &str, rule: &str, queue: &str) -> anyhow::Result<String> {
    let rule_arn = sdk
        .events
        .put_rule()
        .name(rule)
        .event_bus_name(bus)
        .event_pattern(pattern())
        .send()
        .await
        .with_context(|| format!("creating rule {rule}"))?
        .rule_arn
        .unwrap_or_default();
    // arn:<partition>:events:<region>:<account>:rule/… → the queue's ARN beside it.
    let parts: Vec<&str> = rule_arn.splitn(6, ':').collect();
    let [_, partition, _, region, account, _] = parts[..] else {
        bail!("rule {rule} has an unexpected ARN `{rule_arn}`");
    };
    let queue_arn = format!("arn:{partition}:sqs:{region}:{account}:{queue}");
    let (_, url) = create_queue(
        sdk,
        queue,
        Some(purista::aws::rule_policy(&queue_arn, &rule_arn)),
    )
    .await?;
    let transformer = InputTransformer::builder()
        .input_paths_map("detail", "$.detail")
        .input_template(r#"{"detail":<detail>}"#)
        .build()?;
    let target = Target::builder()
        .id("raw-queue")
        .arn(&queue_arn)
        .input_transformer(transformer)
        .build()?;
    let out = sdk
        .events
        .put_targets()
        .rule(rule)
        .event_bus_name(bus)
        .targets(target)
        .send()
        .await
        .with_context(|| format!("pointing rule {rule} at {queue}"))?;
    ensure!(
        out.failed_entry_count == 0,
        "EventBridge refused the target of rule {rule}"
    );
    Ok(url)
}

/// A subscriber: receive, count what carries a payload, delete.
async fn count_events(sdk: Sdk, url: String, delivered: Arc<Progress>) {
    loop {
        let messages = match receive(&sdk, &url, SUBSCRIPTION_BATCH).await {
            Ok(m) => m,
            Err(e) => {
                report("receiving events", &e);
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        let mut events = 0;
        for message in &messages {
            let event: Value = serde_json::from_str(message.body.as_deref().unwrap_or_default())
                .unwrap_or(Value::Null);
            if event.get("detail").and_then(payload::seq_of).is_some() {
                events += 1;
            }
        }
        if let Err(e) = delete(&sdk, &url, &messages).await {
            report("deleting events", &e);
        }
        for _ in 0..events {
            delivered.add_one();
        }
    }
}

async fn fanout(workload: &Workload, sdk: &Sdk, base: &str) -> anyhow::Result<Measurement> {
    let bus = base.to_string();
    sdk.events
        .create_event_bus()
        .name(&bus)
        .send()
        .await
        .with_context(|| format!("creating bus {bus}"))?;
    let delivered = Progress::new();
    let subscribers = workload.fanout_subscribers;
    let mut loops = Loops::default();
    for i in 0..subscribers {
        let url = route(sdk, &bus, &format!("{base}-r{i}"), &format!("{base}-s{i}")).await?;
        loops.spawn(count_events(sdk.clone(), url, delivered.clone()));
    }
    let emit_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            let entry = PutEventsRequestEntry::builder()
                .event_bus_name(&bus)
                .source(SOURCE)
                .detail_type(DETAIL_TYPE)
                .detail(payload::value(seq).to_string())
                .build();
            let out = sdk
                .events
                .put_events()
                .entries(entry)
                .send()
                .await
                .with_context(|| format!("putting event {seq}"))?;
            ensure!(out.failed_entry_count == 0, "event {seq} was refused");
        }
        Ok(())
    };
    // Warm-up doubles as the readiness check, as on the bridge.
    let (ops, elapsed) = drive::fanout_rounds!(delivered, workload, subscribers, emit_all);
    let events = workload.fanout_events;
    drop(loops);
    Ok(Measurement::new(LABEL, Scenario::Fanout, ops, elapsed)
        .with_note(format!("{events} events × {subscribers} rules and queues")))
}

/// The worker: receive, delete, count what was deleted.
async fn work(sdk: Sdk, url: String, completed: Arc<Progress>) {
    loop {
        let messages = match receive(&sdk, &url, COMMAND_BATCH).await {
            Ok(m) => m,
            Err(e) => {
                report("receiving jobs", &e);
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        match delete(&sdk, &url, &messages).await {
            Ok(n) => (0..n).for_each(|_| completed.add_one()),
            Err(e) => report("deleting jobs", &e),
        }
    }
}

async fn queue(workload: &Workload, sdk: &Sdk, base: &str) -> anyhow::Result<Measurement> {
    let (_, url) = create_queue(sdk, &format!("{base}-jobs"), None).await?;
    let completed = Progress::new();
    let mut loops = Loops::default();
    loops.spawn(work(sdk.clone(), url.clone(), completed.clone()));
    let enqueue_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            sdk.sqs
                .send_message()
                .queue_url(&url)
                .message_body(payload::value(seq).to_string())
                .send()
                .await
                .with_context(|| format!("enqueueing job {seq}"))?;
        }
        Ok(())
    };
    completed.expect(workload.warmup);
    enqueue_all(0, workload.warmup).await?;
    completed.wait("raw queue warm-up").await?;
    let jobs = workload.queue_jobs;
    completed.expect(workload.warmup + jobs);
    let start = Instant::now();
    enqueue_all(workload.warmup, jobs).await?;
    let enqueued = start.elapsed();
    completed.wait("raw queue jobs").await?;
    let elapsed = start.elapsed();
    drop(loops);
    Ok(
        Measurement::new(LABEL, Scenario::Queue, jobs, elapsed).with_note(format!(
            "one worker; all enqueued after {:.1} ms",
            enqueued.as_secs_f64() * 1e3
        )),
    )
}
