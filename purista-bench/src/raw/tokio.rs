//! The baseline of the in-process bridge: each scenario's work with bare tokio primitives.
//!
//! * `cmd-seq` / `cmd-conc`: a server task receives `(request, oneshot::Sender)` over a bounded
//!   mpsc and replies with the request; callers wait on the oneshot.
//! * `fanout`: one producer sends every event to one bounded mpsc per receiver task (the
//!   in-process bridge's consumer buffer size); receivers count deliveries.
//! * `queue`: an unbounded mpsc of jobs to one worker task that acks through an atomic counter.
//!
//! Messages are JSON values of the same shape the bridge scenarios send, and the timing goes
//! through the same harness ([`crate::drive`]).

use std::sync::Arc;

use anyhow::{Context as _, anyhow, ensure};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::drive::{self, Progress};
use crate::measurement::{Measurement, Percentiles};
use crate::payload;
use crate::workload::{Scenario, Workload};

const LABEL: &str = "raw-tokio";

/// Buffer of each channel, as the in-process bridge's default consumer buffer.
const CHANNEL_BUFFER: usize = 1024;

pub async fn run(scenario: Scenario, workload: &Workload) -> anyhow::Result<Measurement> {
    match scenario {
        Scenario::CmdSeq => cmd_seq(workload).await,
        Scenario::CmdConc => cmd_conc(workload).await,
        Scenario::Fanout => fanout(workload).await,
        Scenario::Queue => queue(workload).await,
    }
}

type Request = (Value, oneshot::Sender<Value>);

/// An echo server task and the handle to call it.
#[derive(Clone)]
struct EchoServer {
    requests: mpsc::Sender<Request>,
}

impl EchoServer {
    fn start() -> (EchoServer, JoinHandle<()>) {
        let (requests, mut incoming) = mpsc::channel::<Request>(CHANNEL_BUFFER);
        let task = tokio::spawn(async move {
            while let Some((request, reply)) = incoming.recv().await {
                // A caller that went away no longer needs the answer.
                let _ = reply.send(request);
            }
        });
        (EchoServer { requests }, task)
    }

    async fn call(&self, seq: u64) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((payload::value(seq), reply))
            .await
            .map_err(|_| anyhow!("the echo server task ended"))?;
        let answer = answer.await.context("the echo server dropped a request")?;
        ensure!(
            payload::seq_of(&answer) == Some(seq),
            "call {seq} got a wrong answer: {answer}"
        );
        Ok(())
    }
}

async fn cmd_seq(workload: &Workload) -> anyhow::Result<Measurement> {
    let (server, task) = EchoServer::start();
    drive::sequential(workload.warmup, |i| server.call(i)).await?;
    let timed = drive::sequential(workload.cmd_seq_calls, |i| server.call(i)).await?;
    drop(server);
    task.await.context("the echo server task panicked")?;
    Ok(Measurement::new(
        LABEL,
        Scenario::CmdSeq,
        workload.cmd_seq_calls,
        timed.elapsed,
    )
    .with_latency(Percentiles::of(timed.latencies_ns)))
}

async fn cmd_conc(workload: &Workload) -> anyhow::Result<Measurement> {
    let (server, task) = EchoServer::start();
    let in_flight = workload.cmd_conc_in_flight;
    let call = {
        let server = server.clone();
        move |i| {
            let server = server.clone();
            async move { server.call(i).await }
        }
    };
    drive::concurrent(workload.warmup, in_flight, call.clone()).await?;
    let timed = drive::concurrent(workload.cmd_conc_calls, in_flight, call).await?;
    drop(server);
    task.await.context("the echo server task panicked")?;
    Ok(Measurement::new(
        LABEL,
        Scenario::CmdConc,
        workload.cmd_conc_calls,
        timed.elapsed,
    )
    .with_latency(Percentiles::of(timed.latencies_ns))
    .with_note(format!("{in_flight} in flight")))
}

async fn fanout(workload: &Workload) -> anyhow::Result<Measurement> {
    let delivered = Progress::new();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..workload.fanout_subscribers {
        let (tx, mut rx) = mpsc::channel::<Arc<Value>>(CHANNEL_BUFFER);
        let delivered = delivered.clone();
        senders.push(tx);
        receivers.push(tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                // Look at the message, as a subscriber would.
                if payload::seq_of(&event).is_some() {
                    delivered.add_one();
                }
            }
        }));
    }
    let emit_all = async |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            let event = Arc::new(payload::value(seq));
            for tx in &senders {
                tx.send(event.clone())
                    .await
                    .map_err(|_| anyhow!("a receiver task ended early"))?;
            }
        }
        Ok(())
    };
    let subscribers = workload.fanout_subscribers;
    let (ops, elapsed) = drive::fanout_rounds!(delivered, workload, subscribers, emit_all);
    let events = workload.fanout_events;
    drop(senders);
    for r in receivers {
        r.await.context("a receiver task panicked")?;
    }
    Ok(Measurement::new(LABEL, Scenario::Fanout, ops, elapsed)
        .with_note(format!("{events} events × {subscribers} receivers")))
}

async fn queue(workload: &Workload) -> anyhow::Result<Measurement> {
    let completed = Progress::new();
    let (jobs, mut incoming) = mpsc::unbounded_channel::<Value>();
    let worker = {
        let completed = completed.clone();
        tokio::spawn(async move {
            while let Some(job) = incoming.recv().await {
                if payload::seq_of(&job).is_some() {
                    completed.add_one();
                }
            }
        })
    };
    let enqueue_all = |from: u64, count: u64| -> anyhow::Result<()> {
        for seq in from..from + count {
            jobs.send(payload::value(seq))
                .map_err(|_| anyhow!("the worker task ended early"))?;
        }
        Ok(())
    };
    completed.expect(workload.warmup);
    enqueue_all(0, workload.warmup)?;
    completed.wait("raw queue warm-up").await?;

    let count = workload.queue_jobs;
    completed.expect(workload.warmup + count);
    let start = Instant::now();
    enqueue_all(workload.warmup, count)?;
    completed.wait("raw queue jobs").await?;
    let elapsed = start.elapsed();
    drop(jobs);
    worker.await.context("the worker task panicked")?;
    Ok(Measurement::new(LABEL, Scenario::Queue, count, elapsed).with_note("one worker task"))
}
