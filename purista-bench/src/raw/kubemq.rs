//! The KubeMQ baseline: the same work with the bare `kubemq` SDK and none of purista.
//!
//! * `cmd-seq` / `cmd-conc`: queries on one channel, answered by one responder (a query
//!   subscription in a group that reads the query's JSON and writes it back, as the RabbitMQ
//!   baseline's responder does), as the bridge does commands; the caller checks the reply's
//!   `seq`.
//! * `fanout`: events on one channel to 4 subscribers, each its own client, counted on arrival.
//! * `queue`: none yet (no bare-SDK queue worker to compare the KubeMQ queue bridge with).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use purista::kubemq::kubemq::{Event, KubemqClient, Query, QueryReply, RetryPolicy};
use tokio::time::Instant;

use crate::drive::{self, Progress};
use crate::measurement::Measurement;
use crate::payload;
use crate::workload::{Scenario, Workload};

const LABEL: &str = "raw-kubemq";

/// Runs `scenario` on the KubeMQ at `host:port`, channels under `prefix`.
pub async fn run(
    scenario: Scenario,
    workload: &Workload,
    address: &str,
    prefix: &str,
) -> anyhow::Result<Measurement> {
    match scenario {
        Scenario::CmdSeq | Scenario::CmdConc => commands(scenario, workload, address, prefix).await,
        Scenario::Fanout => fanout(workload, address, prefix).await,
        Scenario::Queue => anyhow::bail!("no raw KubeMQ queue baseline"),
    }
}

async fn client(address: &str, role: &str) -> anyhow::Result<KubemqClient> {
    let (host, port) = address
        .rsplit_once(':')
        .context("KubeMQ address is host:port")?;
    KubemqClient::builder()
        .host(host)
        .port(port.parse().context("KubeMQ port")?)
        .client_id(format!("raw-{role}-{}", &purista::ids::new_id()[..8]))
        .rpc_timeout(Duration::from_secs(60))
        .retry_policy(RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        })
        .build()
        .await
        .context("connecting the raw KubeMQ client")
}

async fn commands(
    scenario: Scenario,
    workload: &Workload,
    address: &str,
    prefix: &str,
) -> anyhow::Result<Measurement> {
    let channel = format!("{prefix}.raw.echo");
    let server = client(address, "server").await?;
    let replier = server.clone();
    let subscription = server
        .subscribe_to_queries(
            &channel,
            "raw",
            move |query| {
                let replier = replier.clone();
                Box::pin(async move {
                    // Look at the request, as a handler would, and answer with it (as the
                    // RabbitMQ baseline's responder does).
                    let Ok(request) = serde_json::from_slice::<serde_json::Value>(&query.body)
                    else {
                        return;
                    };
                    let reply = QueryReply::builder()
                        .request_id(&query.id)
                        .response_to(&query.response_to)
                        .body(serde_json::to_vec(&request).unwrap_or_default())
                        .build();
                    let _ = replier.send_query_response(reply).await;
                })
            },
            None,
        )
        .await?;
    let caller = Arc::new(client(address, "caller").await?);
    let call = {
        let (caller, channel) = (caller.clone(), channel.clone());
        move |seq: u64| {
            let (caller, channel) = (caller.clone(), channel.clone());
            async move {
                let body = serde_json::to_vec(&payload::value(seq))?;
                let query = Query::builder()
                    .channel(channel)
                    .body(body)
                    .timeout(Duration::from_secs(30))
                    .build();
                let reply = caller.send_query(query).await?;
                anyhow::ensure!(reply.executed, "query {seq} not executed: {}", reply.error);
                let answer: serde_json::Value = serde_json::from_slice(&reply.body)?;
                anyhow::ensure!(
                    payload::seq_of(&answer) == Some(seq),
                    "query {seq} got a wrong answer: {answer}"
                );
                Ok(())
            }
        }
    };
    // KubeMQ confirms no subscription: the first answered query says the responder is in.
    // The probe's own timeout is short: one sent before the responder is in waits for it.
    let ready = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = Query::builder()
            .channel(channel.clone())
            .body(serde_json::to_vec(&payload::value(0))?)
            .timeout(Duration::from_millis(250))
            .build();
        if caller.send_query(probe).await.is_ok_and(|r| r.executed) {
            break;
        }
        anyhow::ensure!(Instant::now() < ready, "the raw responder never answered");
    }
    let measured = drive::commands(LABEL, scenario, workload, call).await?;
    subscription.unsubscribe().await;
    let _ = caller.close().await;
    let _ = server.close().await;
    Ok(measured)
}

async fn fanout(workload: &Workload, address: &str, prefix: &str) -> anyhow::Result<Measurement> {
    let channel = format!("{prefix}.raw.tick");
    let delivered = Progress::new();
    let subscribers = workload.fanout_subscribers;
    let mut receivers = Vec::new();
    for i in 0..subscribers {
        let receiver = client(address, &format!("receiver-{i}")).await?;
        let counter = delivered.clone();
        let subscription = receiver
            .subscribe_to_events(
                &channel,
                "",
                move |_event| {
                    counter.add_one();
                    Box::pin(async {})
                },
                None,
            )
            .await?;
        receivers.push((receiver, subscription));
    }
    let producer = client(address, "producer").await?;
    let emit_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            let body = serde_json::to_vec(&payload::value(seq))?;
            producer
                .send_event(Event::builder().channel(channel.clone()).body(body).build())
                .await
                .with_context(|| format!("publishing event {seq}"))?;
        }
        Ok(())
    };
    // Subscriptions are in once one marker reached every receiver.
    let ready = Instant::now() + Duration::from_secs(10);
    while delivered.done() < subscribers {
        anyhow::ensure!(Instant::now() < ready, "the raw receivers never subscribed");
        let before = delivered.done();
        emit_all(u64::MAX - 1, 1).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if delivered.done() < before + subscribers {
            continue;
        }
    }
    let (ops, elapsed) = drive::fanout_rounds!(delivered, workload, subscribers, emit_all);
    let events = workload.fanout_events;
    for (receiver, subscription) in receivers {
        subscription.unsubscribe().await;
        let _ = receiver.close().await;
    }
    let _ = producer.close().await;
    Ok(Measurement::new(LABEL, Scenario::Fanout, ops, elapsed)
        .with_note(format!("{events} events × {subscribers} receivers")))
}
