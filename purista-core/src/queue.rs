//! Queue jobs: the [`QueueBridge`] trait, lifecycle defaults, backoff and settlement planning.
//!
//! A worker leases a job for `visibility_timeout`; a lease that is not settled in time makes the
//! job visible again. The decision what a settlement *means* (retry now or later, dead-letter
//! after `max_attempts` or after the retry window) is made here by [`QueueConfig::plan`]; a queue
//! bridge executes the resulting [`JobDisposition`].

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::capabilities::QueueCapabilities;

/// Exponential backoff: `min(max, initial * multiplier^(attempt-1))`, then ± `jitter` of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryStrategy {
    /// First retry delay (1 s).
    pub initial_delay_ms: u64,
    /// Cap (120 s).
    pub max_delay_ms: u64,
    /// Growth per attempt (2).
    pub multiplier: f64,
    /// Relative jitter, 0.25 = ±25 %.
    pub jitter_factor: f64,
}

impl Default for RetryStrategy {
    fn default() -> Self {
        RetryStrategy {
            initial_delay_ms: 1_000,
            max_delay_ms: 120_000,
            multiplier: 2.0,
            jitter_factor: 0.25,
        }
    }
}

impl RetryStrategy {
    /// The delay before retry number `attempt` (1 = first retry), without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let ms = (self.initial_delay_ms as f64 * exp).min(self.max_delay_ms as f64);
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// The jittered delay before retry number `attempt`: uniform in base ± jitter·base.
    ///
    /// ```
    /// use purista_core::queue::RetryStrategy;
    /// let s = RetryStrategy::default();
    /// let d = s.delay(3).as_millis();
    /// assert!((3_000..=5_000).contains(&d)); // 4 s ± 25 %
    /// ```
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt).as_millis() as f64;
        let spread = base * self.jitter_factor.clamp(0.0, 1.0);
        let jitter = if spread > 0.0 {
            rand::rng().random_range(-spread..=spread)
        } else {
            0.0
        };
        Duration::from_millis((base + jitter).max(0.0).round() as u64)
    }
}

/// Lifecycle settings of a queue, with PURISTA's defaults.
///
/// ```
/// use purista_core::queue::QueueConfig;
/// let c = QueueConfig::default();
/// assert_eq!(c.visibility_timeout.as_secs(), 15 * 60);
/// assert_eq!(c.max_lease_extensions, 3);
/// assert_eq!(c.max_attempts, 10);
/// assert_eq!(c.retry_window.as_secs(), 24 * 3600);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueConfig {
    /// Lease length (15 min).
    pub visibility_timeout: Duration,
    /// Most `extend_lease` calls per lease (3).
    pub max_lease_extensions: u32,
    /// Extend the lease automatically while the handler runs.
    pub auto_heartbeat: bool,
    /// Auto-heartbeat cadence (5 min).
    pub heartbeat_interval: Duration,
    /// Deliveries before the dead-letter queue (10).
    pub max_attempts: u32,
    /// After this long since the first enqueue, failures go to the dead-letter queue (24 h).
    pub retry_window: Duration,
    /// Backoff of retries without an explicit delay.
    pub retry: RetryStrategy,
    /// Dead-letter queue name; `None` = `<queue>.dead-letter`.
    pub dead_letter_queue: Option<String>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            visibility_timeout: Duration::from_secs(15 * 60),
            max_lease_extensions: 3,
            auto_heartbeat: false,
            heartbeat_interval: Duration::from_secs(5 * 60),
            max_attempts: 10,
            retry_window: Duration::from_secs(24 * 3600),
            retry: RetryStrategy::default(),
            dead_letter_queue: None,
        }
    }
}

/// The dead-letter queue name of `queue` under the default rule.
pub fn dead_letter_queue_name(queue: &str) -> String {
    format!("{queue}.dead-letter")
}

/// One declaration of a queue: its lifecycle settings and who declared them (for a service,
/// `name@version`).
///
/// A queue has one config. Two services that declare it differently (say a worker with a
/// short lease and an enqueuing service with the default) would otherwise make the queue's
/// behaviour depend on which one started last, so a queue bridge keeps the first declaration
/// and checks every later one against it with [`QueueDeclaration::check_redeclaration`]:
/// identical settings are fine, different ones are [`QueueError::ConflictingDeclaration`].
///
/// ```
/// use std::time::Duration;
/// use purista_core::queue::{QueueConfig, QueueDeclaration, QueueError};
/// let worker = QueueDeclaration::new("mailer@1", QueueConfig {
///     visibility_timeout: Duration::from_secs(30),
///     ..QueueConfig::default()
/// });
/// assert!(worker.check_redeclaration("emails", &worker.clone()).is_ok());
///
/// let shop = QueueDeclaration::new("shop@1", QueueConfig::default());
/// let err = worker.check_redeclaration("emails", &shop).unwrap_err();
/// assert!(matches!(
///     err,
///     QueueError::ConflictingDeclaration { ref first, ref second, .. }
///         if first == "mailer@1" && second == "shop@1"
/// ));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueDeclaration {
    /// Who declared the queue, e.g. `mailer@1`.
    pub declared_by: String,
    /// The queue's lifecycle settings.
    pub config: QueueConfig,
}

impl QueueDeclaration {
    /// `declared_by` declares a queue with `config`.
    pub fn new(declared_by: impl Into<String>, config: QueueConfig) -> Self {
        QueueDeclaration {
            declared_by: declared_by.into(),
            config,
        }
    }

    /// The rule for declaring `queue` again, `self` being the declaration in force: `Ok` when
    /// `again` has the same settings (who declared it does not matter), else
    /// [`QueueError::ConflictingDeclaration`] naming both declarers and the settings that
    /// differ. Every queue bridge applies it, so the rule is the same on every broker.
    pub fn check_redeclaration(
        &self,
        queue: &str,
        again: &QueueDeclaration,
    ) -> Result<(), QueueError> {
        let differing = self.config.differences(&again.config);
        if differing.is_empty() {
            return Ok(());
        }
        Err(QueueError::ConflictingDeclaration {
            queue: queue.to_string(),
            first: self.declared_by.clone(),
            second: again.declared_by.clone(),
            differing,
        })
    }
}

/// A job to enqueue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewJob {
    /// Job payload.
    pub payload: Value,
    /// Job parameter.
    pub parameter: Value,
    /// A repeated enqueue with the same key returns the first job id, where enforced.
    pub idempotency_key: Option<String>,
    /// Run no earlier than this (epoch ms).
    pub run_at_ms: Option<u64>,
    /// Trace id of the flow that enqueued it.
    pub trace_id: Option<String>,
    /// W3C trace-context carrier of the flow that enqueued it (a JSON string, as `otp` on an
    /// envelope).
    #[serde(default)]
    pub otp: Option<String>,
    /// Principal.
    pub principal_id: Option<String>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Per-job override of `max_attempts`.
    pub max_attempts: Option<u32>,
}

/// A leased job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeasedJob {
    /// Job id.
    pub id: String,
    /// Queue name.
    pub queue: String,
    /// Payload.
    pub payload: Value,
    /// Parameter.
    pub parameter: Value,
    /// 1 for the first lease, incremented per retry or expired lease.
    pub attempt: u32,
    /// Identifies this lease; settling with an older lease token fails.
    pub lease_token: String,
    /// When the lease ends (epoch ms).
    pub lease_expires_at_ms: u64,
    /// `extend_lease` calls made on this lease.
    pub extensions: u32,
    /// When the job was first enqueued (epoch ms).
    pub enqueued_at_ms: u64,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// W3C trace-context carrier (`otp`).
    #[serde(default)]
    pub otp: Option<String>,
    /// Principal.
    pub principal_id: Option<String>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Per-job attempts override.
    pub max_attempts: Option<u32>,
}

/// How a worker settles a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum JobSettlement {
    /// Done.
    Complete,
    /// Try again; `delay` overrides the backoff.
    Retry {
        /// Explicit delay.
        delay: Option<Duration>,
        /// Why.
        reason: Option<String>,
    },
    /// Failed; `fatal` skips the remaining attempts.
    Fail {
        /// Skip retries.
        fatal: bool,
        /// Why.
        reason: String,
    },
    /// Straight to the dead-letter queue.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// What a queue bridge does with a settled job (computed by [`QueueConfig::plan`]).
#[derive(Debug, Clone, PartialEq)]
pub enum JobDisposition {
    /// Remove the job.
    Complete,
    /// Make the job visible again after `delay`.
    RetryAfter {
        /// Delay.
        delay: Duration,
        /// Why.
        reason: Option<String>,
    },
    /// Move the job to the dead-letter queue.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

impl QueueConfig {
    /// The names of the settings in which `other` differs from `self` (empty when equal).
    ///
    /// ```
    /// use purista_core::queue::QueueConfig;
    /// let other = QueueConfig { max_attempts: 3, ..QueueConfig::default() };
    /// assert_eq!(QueueConfig::default().differences(&other), vec!["max_attempts".to_string()]);
    /// ```
    pub fn differences(&self, other: &QueueConfig) -> Vec<String> {
        let QueueConfig {
            visibility_timeout,
            max_lease_extensions,
            auto_heartbeat,
            heartbeat_interval,
            max_attempts,
            retry_window,
            retry,
            dead_letter_queue,
        } = self;
        let mut differing = Vec::new();
        let mut note = |same: bool, name: &str| {
            if !same {
                differing.push(name.to_string());
            }
        };
        note(
            *visibility_timeout == other.visibility_timeout,
            "visibility_timeout",
        );
        note(
            *max_lease_extensions == other.max_lease_extensions,
            "max_lease_extensions",
        );
        note(*auto_heartbeat == other.auto_heartbeat, "auto_heartbeat");
        note(
            *heartbeat_interval == other.heartbeat_interval,
            "heartbeat_interval",
        );
        note(*max_attempts == other.max_attempts, "max_attempts");
        note(*retry_window == other.retry_window, "retry_window");
        note(*retry == other.retry, "retry");
        note(
            *dead_letter_queue == other.dead_letter_queue,
            "dead_letter_queue",
        );
        differing
    }

    /// The dead-letter queue name for `queue`.
    pub fn dead_letter_queue_for(&self, queue: &str) -> String {
        self.dead_letter_queue
            .clone()
            .unwrap_or_else(|| dead_letter_queue_name(queue))
    }

    /// What an expired lease means: a retry without delay, so the attempt and window budgets
    /// apply exactly as for an explicit retry.
    pub fn plan_lease_expiry(&self, job: &LeasedJob, now_ms: u64) -> JobDisposition {
        let expired = JobSettlement::Retry {
            delay: Some(Duration::ZERO),
            reason: Some("lease expired".into()),
        };
        self.plan(job, &expired, now_ms)
    }

    /// Maps a settlement of `job` at `now_ms` to what the bridge does.
    ///
    /// A retry (explicit, or a non-fatal fail) becomes a dead-letter when the job has had
    /// `max_attempts` deliveries or when its retry window since the first enqueue has passed.
    pub fn plan(&self, job: &LeasedJob, settlement: &JobSettlement, now_ms: u64) -> JobDisposition {
        let (delay, reason) = match settlement {
            JobSettlement::Complete => return JobDisposition::Complete,
            JobSettlement::DeadLetter { reason } => {
                return JobDisposition::DeadLetter {
                    reason: reason.clone(),
                };
            }
            JobSettlement::Fail {
                fatal: true,
                reason,
            } => {
                return JobDisposition::DeadLetter {
                    reason: format!("fatal failure: {reason}"),
                };
            }
            JobSettlement::Fail {
                fatal: false,
                reason,
            } => (None, Some(reason.clone())),
            JobSettlement::Retry { delay, reason } => (*delay, reason.clone()),
        };
        let max_attempts = job.max_attempts.unwrap_or(self.max_attempts).max(1);
        if job.attempt >= max_attempts {
            return JobDisposition::DeadLetter {
                reason: format!(
                    "max attempts ({max_attempts}) reached{}",
                    reason.map(|r| format!(": {r}")).unwrap_or_default()
                ),
            };
        }
        let window_end = job
            .enqueued_at_ms
            .saturating_add(self.retry_window.as_millis() as u64);
        if now_ms >= window_end {
            return JobDisposition::DeadLetter {
                reason: format!(
                    "retry window of {} ms exceeded{}",
                    self.retry_window.as_millis(),
                    reason.map(|r| format!(": {r}")).unwrap_or_default()
                ),
            };
        }
        JobDisposition::RetryAfter {
            delay: delay.unwrap_or_else(|| self.retry.delay(job.attempt)),
            reason,
        }
    }
}

/// Queue depth and state counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueMetrics {
    /// Jobs ready to lease.
    pub depth: usize,
    /// Jobs under lease.
    pub leased: usize,
    /// Jobs waiting for their run-at or retry time.
    pub delayed: usize,
    /// Jobs in the dead-letter queue.
    pub dead_lettered: usize,
}

/// A dead-lettered job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetteredJob {
    /// The job as last leased (payload intact).
    pub job: LeasedJob,
    /// Why.
    pub reason: String,
    /// When (epoch ms).
    pub dead_lettered_at_ms: u64,
}

/// Queue failures.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueueError {
    /// The queue was never declared.
    #[error("unknown queue `{0}`")]
    UnknownQueue(String),
    /// The lease expired or was replaced; the settlement was not applied.
    #[error("lease `{lease_token}` of job `{job_id}` is no longer held")]
    LeaseLost {
        /// Job.
        job_id: String,
        /// Stale lease.
        lease_token: String,
    },
    /// `extend_lease` beyond `max_lease_extensions`.
    #[error("job `{job_id}` reached its cap of {cap} lease extensions")]
    ExtensionCapReached {
        /// Job.
        job_id: String,
        /// The cap.
        cap: u32,
    },
    /// The queue was declared before with other settings (see [`QueueDeclaration`]).
    #[error(
        "queue `{queue}` is declared by `{first}` and again by `{second}` with different settings ({}); one queue has one config",
        differing.join(", ")
    )]
    ConflictingDeclaration {
        /// The queue.
        queue: String,
        /// Who declared it first (the declaration in force).
        first: String,
        /// Who declared it again, differently.
        second: String,
        /// The settings that differ.
        differing: Vec<String>,
    },
    /// The bridge does not offer this operation.
    #[error("not supported by this queue bridge: {0}")]
    Unsupported(String),
    /// Bad input (empty queue name, payload too big, …).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The bridge is shut down or disconnected.
    #[error("queue bridge unavailable: {0}")]
    Unavailable(String),
    /// Broker failure.
    #[error("broker error: {0}")]
    Broker(String),
}

impl QueueError {
    /// A short, stable name of the failure (`error.type` on spans and metrics).
    pub fn error_type(&self) -> &'static str {
        match self {
            QueueError::UnknownQueue(_) => "unknown_queue",
            QueueError::LeaseLost { .. } => "lease_lost",
            QueueError::ExtensionCapReached { .. } => "extension_cap_reached",
            QueueError::ConflictingDeclaration { .. } => "conflicting_declaration",
            QueueError::Unsupported(_) => "unsupported",
            QueueError::InvalidRequest(_) => "invalid_request",
            QueueError::Unavailable(_) => "unavailable",
            QueueError::Broker(_) => "broker",
        }
    }
}

/// A job store with leases. Object safe.
#[async_trait]
pub trait QueueBridge: Send + Sync + 'static {
    /// Short name.
    fn name(&self) -> &str;

    /// What it can do.
    fn capabilities(&self) -> &QueueCapabilities;

    /// Declares a queue (and its dead-letter queue) with its lifecycle settings. Declaring it
    /// again with the same settings does nothing; with other settings it fails as
    /// [`QueueDeclaration::check_redeclaration`] says, and the first declaration stays.
    async fn declare_queue(
        &self,
        queue: &str,
        declaration: QueueDeclaration,
    ) -> Result<(), QueueError>;

    /// Adds a job; returns its id (the first job's id for a repeated idempotency key where
    /// enforcement is declared).
    async fn enqueue(&self, queue: &str, job: NewJob) -> Result<String, QueueError>;

    /// Leases the next visible job, waiting at most `wait` for one.
    async fn lease(&self, queue: &str, wait: Duration) -> Result<Option<LeasedJob>, QueueError>;

    /// Extends a lease by the queue's visibility timeout (or `by`), up to the extension cap.
    /// Returns the new expiry (epoch ms).
    async fn extend_lease(&self, job: &LeasedJob, by: Option<Duration>) -> Result<u64, QueueError>;

    /// Settles a leased job (see [`QueueConfig::plan`]). Bridges plan with the job as they stored
    /// it (attempt, first enqueue time, attempts override), never with the caller's copy.
    async fn settle(&self, job: &LeasedJob, settlement: JobSettlement) -> Result<(), QueueError>;

    /// Counts.
    async fn metrics(&self, queue: &str) -> Result<QueueMetrics, QueueError>;

    /// Lists up to `limit` dead-lettered jobs of `queue` (the origin queue, not the dead-letter
    /// queue's name), oldest first.
    async fn inspect_dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetteredJob>, QueueError>;

    /// Moves dead-lettered jobs back to the queue (all when `ids` is `None`) with a fresh
    /// attempt budget. Returns how many moved.
    async fn replay_dead_letters(
        &self,
        queue: &str,
        ids: Option<Vec<String>>,
    ) -> Result<usize, QueueError>;

    /// Deletes dead-lettered jobs. Returns how many.
    async fn purge_dead_letters(&self, queue: &str) -> Result<usize, QueueError>;

    /// Closes the bridge; later calls fail with `Unavailable`.
    async fn shutdown(&self);
}
