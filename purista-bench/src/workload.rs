//! The scenarios of DESIGN §6 and how much work each one does.
//!
//! Both sides of a comparison — the bridge run and its raw baseline — read their counts from one
//! [`Workload`], so a ratio always compares equal amounts of work.

use std::fmt;

use purista::prelude::WorkerMode;

/// One benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Sequential invocations of an echo command.
    CmdSeq,
    /// Invocations of an echo command with many in flight.
    CmdConc,
    /// Events to several broadcast subscriptions.
    Fanout,
    /// Jobs through one queue worker.
    Queue,
}

impl Scenario {
    /// Every scenario, in the order a full run uses.
    pub const ALL: [Scenario; 4] = [
        Scenario::CmdSeq,
        Scenario::CmdConc,
        Scenario::Fanout,
        Scenario::Queue,
    ];

    /// The name on the command line and in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::CmdSeq => "cmd-seq",
            Scenario::CmdConc => "cmd-conc",
            Scenario::Fanout => "fanout",
            Scenario::Queue => "queue",
        }
    }

    /// The scenario called `name`.
    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the `queue` scenario's worker takes jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueMode {
    /// One job at a time.
    Sequential,
    /// Up to N jobs at once.
    Continuous(usize),
}

impl Default for QueueMode {
    /// Sequential: the runtime's default, and for jobs as cheap as the bench's (no I/O) what a
    /// user would run. Measured on the in-memory bridge it beats `continuous=8` and
    /// `continuous=32`, which pay a task spawn and a semaphore permit per job and gain nothing
    /// when a job never waits.
    fn default() -> Self {
        QueueMode::Sequential
    }
}

impl QueueMode {
    /// `sequential` or `continuous=N`.
    pub fn parse(text: &str) -> Option<QueueMode> {
        if text == "sequential" {
            return Some(QueueMode::Sequential);
        }
        let n: usize = text.strip_prefix("continuous=")?.parse().ok()?;
        (n >= 1).then_some(QueueMode::Continuous(n))
    }

    /// The runtime's worker mode.
    pub fn worker_mode(self) -> WorkerMode {
        match self {
            QueueMode::Sequential => WorkerMode::Sequential,
            QueueMode::Continuous(concurrency) => WorkerMode::Continuous { concurrency },
        }
    }
}

impl fmt::Display for QueueMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueMode::Sequential => f.write_str("sequential"),
            QueueMode::Continuous(n) => write!(f, "continuous={n}"),
        }
    }
}

/// How much work every scenario does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// `cmd-seq` invocations.
    pub cmd_seq_calls: u64,
    /// `cmd-conc` invocations.
    pub cmd_conc_calls: u64,
    /// `cmd-conc` invocations in flight at once.
    pub cmd_conc_in_flight: usize,
    /// `fanout` events emitted.
    pub fanout_events: u64,
    /// `fanout` subscriptions, each receiving every event.
    pub fanout_subscribers: u64,
    /// `queue` jobs.
    pub queue_jobs: u64,
    /// Untimed operations before each timed run, so connections, routes and caches are warm.
    pub warmup: u64,
}

impl Workload {
    /// The counts of DESIGN §6.
    pub const FULL: Workload = Workload {
        cmd_seq_calls: 20_000,
        cmd_conc_calls: 50_000,
        cmd_conc_in_flight: 256,
        fanout_events: 100_000,
        fanout_subscribers: 4,
        queue_jobs: 20_000,
        warmup: 1_000,
    };

    /// Every count divided by `divisor` and at least 1 (concurrency and subscribers
    /// unchanged): 10 for CI smoke runs (`--quick`), more for brokers as slow as moto.
    pub fn divided(divisor: u64) -> Workload {
        let f = Workload::FULL;
        let d = |n: u64| (n / divisor.max(1)).max(1);
        Workload {
            cmd_seq_calls: d(f.cmd_seq_calls),
            cmd_conc_calls: d(f.cmd_conc_calls),
            fanout_events: d(f.fanout_events),
            queue_jobs: d(f.queue_jobs),
            warmup: d(f.warmup),
            ..f
        }
    }
}
