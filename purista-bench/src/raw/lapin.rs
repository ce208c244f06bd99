//! The baseline of the RabbitMQ bridge: each scenario's messaging with bare `lapin`, with the
//! settings the bridge uses, so a ratio shows what purista adds on top of the broker.
//!
//! What is the same as the bridge (see `bridge-amqp`'s `publish.rs`, `consume.rs`, `reply.rs`,
//! `topology.rs`):
//! * one durable **headers exchange**; queues bound with `x-match: all` on the headers the
//!   bridge's bindings use, and messages carrying as many headers as its projection;
//! * every publish on a **confirm-mode channel**, waiting for its own confirm; persistent
//!   delivery mode; commands `mandatory` (a return means nobody serves them) with an expiration
//!   of the default ttl (30 s) and `reply_to`;
//! * command queue: auto-delete, consumed on its own channel with **manual ack** and the
//!   bridge's command prefetch (32); one task per delivery that publishes the response (to the
//!   exchange, routed to the caller by its `replyTo` header), waits for its confirm, then acks;
//! * reply queue: exclusive, auto-delete, consumed with **auto-ack**; pending calls found by
//!   `correlation_id`;
//! * fan-out: one connection and one queue per receiver, consumed with manual ack and a
//!   subscription's default prefetch (8); the producer publishes event after event, each
//!   waiting for its confirm (as `emit` does).
//!
//! What is left out is purista itself: bodies are the bare JSON payload (no envelope), and
//! there is no service runtime, handler, settlement or in-flight bookkeeping around a message.
//! There is no `queue` baseline: RabbitMQ has no queue bridge.
//!
//! Resources are named `<prefix>.raw…` and deleted at the end of each scenario.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow, bail, ensure};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::drive::{self, Progress};
use crate::measurement::{Measurement, Percentiles};
use crate::payload;
use crate::workload::{Scenario, Workload};

const LABEL: &str = "raw-lapin";

/// The bridge's prefetch on a command queue.
const COMMAND_PREFETCH: u16 = purista::amqp::DEFAULT_COMMAND_PREFETCH;
/// A subscription's default prefetch (`SubscriptionDef::prefetch`).
const SUBSCRIPTION_PREFETCH: u16 = 8;
/// AMQP delivery mode 2, as the bridge publishes everything.
const PERSISTENT: u8 = 2;
/// How long the bridge lets an unused broadcast queue live (`AmqpConfig::idle_queue_expiry`).
const IDLE_QUEUE_EXPIRY_MS: i64 = 30 * 60 * 1000;

pub async fn run(
    scenario: Scenario,
    workload: &Workload,
    url: &str,
    prefix: &str,
) -> anyhow::Result<Measurement> {
    let names = Names::new(prefix);
    let admin = Admin::open(url, &names).await?;
    let measured = match scenario {
        Scenario::CmdSeq => cmd_seq(url, &names, workload).await,
        Scenario::CmdConc => cmd_conc(url, &names, workload).await,
        Scenario::Fanout => fanout(url, &names, workload).await,
        Scenario::Queue => Err(anyhow!(
            "RabbitMQ has no queue bridge, so there is no raw queue baseline"
        )),
    };
    // Clean up whether or not the scenario worked.
    admin.delete(&names, workload.fanout_subscribers).await;
    measured
}

/// The names of the baseline's broker resources.
struct Names {
    exchange: String,
    command_queue: String,
    reply_queue: String,
    receiver_prefix: String,
}

impl Names {
    fn new(prefix: &str) -> Self {
        let base = format!("{prefix}.raw");
        Names {
            exchange: base.clone(),
            command_queue: format!("{base}.cmd.echo"),
            reply_queue: format!("{base}.reply"),
            receiver_prefix: format!("{base}.sub"),
        }
    }

    fn receiver_queue(&self, i: u64) -> String {
        format!("{}.{i}", self.receiver_prefix)
    }
}

/// A connection for declaring the exchange and deleting everything at the end.
struct Admin {
    connection: Connection,
    channel: Channel,
}

impl Admin {
    async fn open(url: &str, names: &Names) -> anyhow::Result<Admin> {
        let connection = connect(url, "admin").await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                short(&names.exchange)?,
                ExchangeKind::Headers,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("declaring exchange `{}`", names.exchange))?;
        Ok(Admin {
            connection,
            channel,
        })
    }

    /// Deletes every queue the baseline may have declared, and its exchange.
    async fn delete(self, names: &Names, receivers: u64) {
        let mut queues = vec![names.command_queue.clone(), names.reply_queue.clone()];
        queues.extend((0..receivers).map(|i| names.receiver_queue(i)));
        for queue in &queues {
            if let Ok(queue) = short(queue) {
                let _ = self
                    .channel
                    .queue_delete(queue, QueueDeleteOptions::default())
                    .await;
            }
        }
        if let Ok(exchange) = short(&names.exchange) {
            let _ = self
                .channel
                .exchange_delete(exchange, ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "OK".into()).await;
    }
}

async fn connect(url: &str, role: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("purista-bench raw {role}").into());
    Connection::connect(url, properties)
        .await
        .with_context(|| format!("connecting to {}", purista::redact_url(url)))
}

async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

fn short(s: &str) -> anyhow::Result<ShortString> {
    ShortString::try_new(s).map_err(|_| anyhow!("name `{s}` is longer than 255 bytes"))
}

/// A header table of string values, as the bridge writes them.
fn table(entries: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    t
}

/// Declares `queue` and binds it to the exchange with `binding`.
async fn declare_bound(
    channel: &Channel,
    names: &Names,
    queue: &str,
    options: QueueDeclareOptions,
    arguments: FieldTable,
    binding: FieldTable,
) -> anyhow::Result<()> {
    channel
        .queue_declare(short(queue)?, options, arguments)
        .await
        .with_context(|| format!("declaring queue `{queue}`"))?;
    channel
        .queue_bind(
            short(queue)?,
            short(&names.exchange)?,
            ShortString::from(""),
            QueueBindOptions::default(),
            binding,
        )
        .await
        .with_context(|| format!("binding queue `{queue}`"))?;
    Ok(())
}

/// Publishes and waits for the broker's confirm; `Err` when nacked or returned.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    mandatory: bool,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let confirmation = channel
        .basic_publish(
            short(exchange)?,
            ShortString::from(""),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await?
        .await?;
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) => bail!(
            "returned by the broker: {} {}",
            returned.reply_code,
            returned.reply_text
        ),
        Confirmation::Nack(_) => bail!("nacked by the broker"),
    }
}

fn base_properties(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers)
}

// ---------------------------------------------------------------------------------------------
// cmd-seq and cmd-conc

/// The echo server: consumes the command queue and answers every command.
struct EchoServer {
    connection: Connection,
    consumer: JoinHandle<()>,
}

impl EchoServer {
    async fn start(url: &str, names: &Names) -> anyhow::Result<EchoServer> {
        let connection = connect(url, "echo server").await?;
        let publisher = confirm_channel(&connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(COMMAND_PREFETCH, BasicQosOptions::default())
            .await?;
        declare_bound(
            &channel,
            names,
            &names.command_queue,
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
            table(&[
                ("x-match", "all"),
                ("messageType", "command"),
                ("receiverServiceName", "echo"),
                ("receiverServiceVersion", "1"),
                ("receiverServiceTarget", "echo"),
            ]),
        )
        .await?;
        let consumer = channel
            .basic_consume(
                short(&names.command_queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let exchange: Arc<str> = names.exchange.as_str().into();
        let consumer = tokio::spawn(serve(consumer, channel, publisher, exchange));
        Ok(EchoServer {
            connection,
            consumer,
        })
    }

    async fn stop(self) {
        let _ = self.connection.close(200, "OK".into()).await;
        let _ = self.consumer.await;
    }
}

/// The server's consumer loop: one task per command, as the bridge runs handlers.
async fn serve(mut consumer: Consumer, _channel: Channel, publisher: Channel, exchange: Arc<str>) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let publisher = publisher.clone();
        let exchange = exchange.clone();
        tokio::spawn(async move {
            let lapin::message::Delivery {
                data,
                properties,
                acker,
                ..
            } = delivery;
            // Look at the request, as a handler would, and answer with it.
            let Ok(request) = serde_json::from_slice::<Value>(&data) else {
                let _ = acker.ack(BasicAckOptions::default()).await;
                return;
            };
            let body = serde_json::to_vec(&request).unwrap_or_default();
            let reply_to = properties
                .reply_to()
                .as_ref()
                .map(|r| r.as_str().to_string())
                .unwrap_or_default();
            let mut answer = base_properties(table(&[
                ("messageType", "commandSuccessResponse"),
                ("senderServiceName", "echo"),
                ("senderServiceVersion", "1"),
                ("senderServiceTarget", "echo"),
                ("senderInstanceId", "server"),
                ("receiverServiceName", "client"),
                ("receiverServiceVersion", "1"),
                ("receiverServiceTarget", ""),
                ("replyTo", &reply_to),
            ]));
            if let Some(correlation_id) = properties.correlation_id() {
                answer = answer.with_correlation_id(correlation_id.clone());
            }
            if publish_confirmed(&publisher, &exchange, false, &body, answer)
                .await
                .is_ok()
            {
                let _ = acker.ack(BasicAckOptions::default()).await;
            }
        });
    }
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// The caller: publishes commands and waits for their answers on its reply queue.
struct EchoClient {
    connection: Connection,
    publisher: Channel,
    exchange: String,
    reply_queue: String,
    command_headers: FieldTable,
    pending: Pending,
    next_id: AtomicU64,
    replies: JoinHandle<()>,
}

impl EchoClient {
    async fn start(url: &str, names: &Names) -> anyhow::Result<EchoClient> {
        let connection = connect(url, "echo client").await?;
        let publisher = confirm_channel(&connection).await?;
        let channel = connection.create_channel().await?;
        declare_bound(
            &channel,
            names,
            &names.reply_queue,
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
            table(&[("x-match", "all"), ("replyTo", &names.reply_queue)]),
        )
        .await?;
        let consumer = channel
            .basic_consume(
                short(&names.reply_queue)?,
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let pending: Pending = Arc::default();
        let replies = tokio::spawn(receive_replies(consumer, channel, pending.clone()));
        Ok(EchoClient {
            connection,
            publisher,
            exchange: names.exchange.clone(),
            reply_queue: names.reply_queue.clone(),
            command_headers: table(&[
                ("messageType", "command"),
                ("senderServiceName", "client"),
                ("senderServiceVersion", "1"),
                ("senderServiceTarget", ""),
                ("senderInstanceId", "client"),
                ("receiverServiceName", "echo"),
                ("receiverServiceVersion", "1"),
                ("receiverServiceTarget", "echo"),
            ]),
            pending,
            next_id: AtomicU64::new(0),
            replies,
        })
    }

    async fn call(&self, seq: u64) -> anyhow::Result<()> {
        let correlation_id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, answer) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| anyhow!("pending map poisoned"))?
            .insert(correlation_id.clone(), tx);
        let body = serde_json::to_vec(&payload::value(seq))?;
        let properties = base_properties(self.command_headers.clone())
            .with_correlation_id(correlation_id.as_str().into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_expiration(
                purista::amqp::DEFAULT_COMMAND_TIMEOUT
                    .as_millis()
                    .to_string()
                    .into(),
            );
        publish_confirmed(&self.publisher, &self.exchange, true, &body, properties)
            .await
            .with_context(|| format!("publishing call {seq}"))?;
        let answer = tokio::time::timeout(drive::STUCK_AFTER, answer)
            .await
            .map_err(|_| anyhow!("call {seq} got no answer"))?
            .map_err(|_| anyhow!("the reply consumer ended"))?;
        ensure!(
            payload::seq_of(&answer) == Some(seq),
            "call {seq} got a wrong answer: {answer}"
        );
        Ok(())
    }

    async fn stop(self) {
        let _ = self.connection.close(200, "OK".into()).await;
        let _ = self.replies.await;
    }
}

/// The client's reply consumer: completes the pending call each answer belongs to.
async fn receive_replies(mut consumer: Consumer, _channel: Channel, pending: Pending) {
    while let Some(Ok(delivery)) = consumer.next().await {
        let Some(correlation_id) = delivery.properties.correlation_id().as_ref() else {
            continue;
        };
        let Ok(answer) = serde_json::from_slice::<Value>(&delivery.data) else {
            continue;
        };
        let waiting = pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(correlation_id.as_str()));
        if let Some(tx) = waiting {
            let _ = tx.send(answer);
        }
    }
}

async fn echo_pair(url: &str, names: &Names) -> anyhow::Result<(EchoServer, Arc<EchoClient>)> {
    let server = EchoServer::start(url, names).await?;
    let client = EchoClient::start(url, names).await?;
    Ok((server, Arc::new(client)))
}

async fn stop_pair(server: EchoServer, client: Arc<EchoClient>) {
    if let Ok(client) = Arc::try_unwrap(client) {
        client.stop().await;
    }
    server.stop().await;
}

async fn cmd_seq(url: &str, names: &Names, workload: &Workload) -> anyhow::Result<Measurement> {
    let (server, client) = echo_pair(url, names).await?;
    drive::sequential(workload.warmup, |i| client.call(i)).await?;
    let timed = drive::sequential(workload.cmd_seq_calls, |i| client.call(i)).await?;
    stop_pair(server, client).await;
    Ok(Measurement::new(
        LABEL,
        Scenario::CmdSeq,
        workload.cmd_seq_calls,
        timed.elapsed,
    )
    .with_latency(Percentiles::of(timed.latencies_ns)))
}

async fn cmd_conc(url: &str, names: &Names, workload: &Workload) -> anyhow::Result<Measurement> {
    let (server, client) = echo_pair(url, names).await?;
    let in_flight = workload.cmd_conc_in_flight;
    let call = {
        let client = client.clone();
        move |i| {
            let client = client.clone();
            async move { client.call(i).await }
        }
    };
    drive::concurrent(workload.warmup, in_flight, call.clone()).await?;
    let timed = drive::concurrent(workload.cmd_conc_calls, in_flight, call).await?;
    stop_pair(server, client).await;
    Ok(Measurement::new(
        LABEL,
        Scenario::CmdConc,
        workload.cmd_conc_calls,
        timed.elapsed,
    )
    .with_latency(Percentiles::of(timed.latencies_ns))
    .with_note(format!("{in_flight} in flight")))
}

// ---------------------------------------------------------------------------------------------
// fanout

/// One receiver: its own connection and queue, counting what it gets.
struct Receiver {
    connection: Connection,
    consumer: JoinHandle<()>,
}

impl Receiver {
    async fn start(
        url: &str,
        names: &Names,
        i: u64,
        event: &str,
        delivered: Arc<Progress>,
    ) -> anyhow::Result<Receiver> {
        let connection = connect(url, &format!("receiver {i}")).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(SUBSCRIPTION_PREFETCH, BasicQosOptions::default())
            .await?;
        let queue = names.receiver_queue(i);
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(IDLE_QUEUE_EXPIRY_MS),
        );
        declare_bound(
            &channel,
            names,
            &queue,
            QueueDeclareOptions::default(),
            arguments,
            table(&[("x-match", "all"), ("eventName", event)]),
        )
        .await?;
        let mut consumer = channel
            .basic_consume(
                short(&queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(delivery)) = consumer.next().await {
                // Look at the message, as a subscriber would, then ack it.
                if let Ok(event) = serde_json::from_slice::<Value>(&delivery.data)
                    && payload::seq_of(&event).is_some()
                {
                    delivered.add_one();
                }
                if delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Receiver {
            connection,
            consumer,
        })
    }

    async fn stop(self) {
        let _ = self.connection.close(200, "OK".into()).await;
        let _ = self.consumer.await;
    }
}

async fn fanout(url: &str, names: &Names, workload: &Workload) -> anyhow::Result<Measurement> {
    let event = "tick";
    let delivered = Progress::new();
    let subscribers = workload.fanout_subscribers;
    let mut receivers = Vec::new();
    for i in 0..subscribers {
        receivers.push(Receiver::start(url, names, i, event, delivered.clone()).await?);
    }
    let producer = connect(url, "producer").await?;
    let publisher = confirm_channel(&producer).await?;
    let headers = table(&[
        ("messageType", "customMessage"),
        ("senderServiceName", "source"),
        ("senderServiceVersion", "1"),
        ("senderServiceTarget", ""),
        ("senderInstanceId", "producer"),
        ("eventName", event),
    ]);
    let emit_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            let body = serde_json::to_vec(&payload::value(seq))?;
            publish_confirmed(
                &publisher,
                &names.exchange,
                false,
                &body,
                base_properties(headers.clone()),
            )
            .await
            .with_context(|| format!("publishing event {seq}"))?;
        }
        Ok(())
    };
    let (ops, elapsed) = drive::fanout_rounds!(delivered, workload, subscribers, emit_all);
    let events = workload.fanout_events;

    let _ = producer.close(200, "OK".into()).await;
    for r in receivers {
        r.stop().await;
    }
    Ok(Measurement::new(LABEL, Scenario::Fanout, ops, elapsed)
        .with_note(format!("{events} events × {subscribers} receivers")))
}
