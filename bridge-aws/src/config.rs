//! The bridge's settings, from an `aws://` URL and the environment.
//!
//! ## URL grammar
//!
//! ```text
//! aws://[<region>][?prefix=<prefix>&bus=<bus>&endpoint=<url>&wait_seconds=<0..20>&max_message_bytes=<n>]
//! ```
//!
//! * `region`: the AWS region (`eu-central-1`); empty = the region of the environment and
//!   profile (`AWS_REGION`, `~/.aws/config`), through `aws-config`.
//! * `prefix`: the start of every queue and rule name the bridge creates (default `purista`);
//!   letters, digits, `-` and `_`, at most 32 characters.
//! * `bus`: the EventBridge bus (default: the prefix). The bridge creates it when missing.
//! * `endpoint`: one endpoint for both services, for moto or LocalStack
//!   (`http://127.0.0.1:5000`); default AWS's own (or `AWS_ENDPOINT_URL`).
//! * `wait_seconds`: SQS long-polling wait of the receivers (default 20, AWS's maximum, which
//!   costs nothing while a queue is idle; the tests on moto use 5).
//! * `max_message_bytes`: the largest SQS message and EventBridge entry the account takes
//!   (default 262 144 = 256 KiB, the limit every account and moto has; accounts with the
//!   1 MiB limit may set 1048576).
//!
//! ## Environment ([`AwsConfig::from_env`])
//!
//! * `PURISTA_BRIDGE_URL` (an `aws://` URL) — else the defaults;
//! * `PURISTA_AWS_PREFIX` overrides the URL's prefix;
//! * the usual AWS variables, read by `aws-config`: `AWS_REGION`, `AWS_ENDPOINT_URL`,
//!   `AWS_PROFILE`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, web
//!   identity, container and instance credentials. Credentials never pass through this type
//!   except [`AwsConfig::static_credentials`], meant for local emulators.

use std::time::Duration;

/// Environment variable with a bridge URL.
pub const URL_ENV: &str = "PURISTA_BRIDGE_URL";
/// Environment variable with the resource prefix.
pub const PREFIX_ENV: &str = "PURISTA_AWS_PREFIX";
/// Prefix of every resource unless configured.
pub const DEFAULT_PREFIX: &str = "purista";
/// Longest prefix: queue names stop at 80 characters and rule names at 64.
pub const MAX_PREFIX_LEN: usize = 32;
/// Default command timeout (DESIGN §3.2).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The SQS message and EventBridge entry limit of every account (and of moto): 256 KiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// What EventBridge adds around the envelope when it delivers an event to SQS (`id`, `time`,
/// `source`, `region`, `resources`, …) and what the bridge's message attributes take, with room
/// to spare: the envelope itself may be the limit less this.
pub const ENVELOPE_OVERHEAD_BYTES: usize = 2 * 1024;

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The URL is not `aws://…`.
    #[error("invalid AWS bridge URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The prefix cannot start queue and rule names.
    #[error(
        "invalid resource prefix `{0}`: use 1 to {MAX_PREFIX_LEN} letters, digits, `-` and `_`"
    )]
    InvalidPrefix(String),
    /// A setting is out of its range.
    #[error("invalid setting {name}: {reason}")]
    InvalidSetting {
        /// Which.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

/// Settings of one bridge instance.
#[derive(Clone)]
pub struct AwsConfig {
    /// AWS region; `None` = from the environment / profile.
    pub region: Option<String>,
    /// Endpoint override for both services (moto, LocalStack); `None` = AWS's own.
    pub endpoint: Option<String>,
    /// Start of every queue and rule name.
    pub prefix: String,
    /// EventBridge bus name; `None` = the prefix.
    pub bus: Option<String>,
    /// Fixed credentials, for local emulators only (moto takes any). `None` = the
    /// `aws-config` credential chain. Never logged.
    pub static_credentials: Option<(String, String)>,
    /// Command timeout when the caller gives none.
    pub default_command_timeout: Duration,
    /// Largest SQS message / EventBridge entry of the account.
    pub max_message_bytes: usize,
    /// SQS long-polling wait of every receiver, 0..=20 s.
    pub wait_seconds: u8,
    /// Receive loops per subscription or command queue on this instance.
    pub receivers_per_queue: usize,
    /// Visibility timeout of subscription and command queues: a delivery not settled in this
    /// time is delivered again (SQS is at-least-once).
    pub visibility_timeout: Duration,
    /// Deadline of one AWS call.
    pub call_timeout: Duration,
    /// How long `start` waits for AWS to answer.
    pub connect_timeout: Duration,
    /// How often an instance refreshes the last-seen tag of its own queues.
    pub heartbeat_interval: Duration,
    /// A per-instance queue whose last-seen tag is older than this belongs to a dead instance
    /// and is deleted by the janitor.
    pub stale_after: Duration,
}

impl std::fmt::Debug for AwsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsConfig")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("prefix", &self.prefix)
            .field("bus", &self.bus_name())
            .field(
                "static_credentials",
                &self.static_credentials.as_ref().map(|_| "***"),
            )
            .field("default_command_timeout", &self.default_command_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("wait_seconds", &self.wait_seconds)
            .finish_non_exhaustive()
    }
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            endpoint: None,
            prefix: DEFAULT_PREFIX.to_string(),
            bus: None,
            static_credentials: None,
            default_command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            wait_seconds: 20,
            receivers_per_queue: 1,
            visibility_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(60),
            stale_after: Duration::from_secs(15 * 60),
        }
    }
}

impl AwsConfig {
    /// Defaults in `region`.
    ///
    /// ```
    /// use purista_bridge_aws::AwsConfig;
    /// let c = AwsConfig::new("eu-central-1").with_prefix("shop");
    /// assert_eq!(c.bus_name(), "shop");
    /// ```
    pub fn new(region: impl Into<String>) -> Self {
        AwsConfig {
            region: Some(region.into()),
            ..AwsConfig::default()
        }
    }

    /// The same with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same against an emulator at `endpoint` (moto, LocalStack) with its dummy
    /// credentials.
    pub fn with_emulator(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self.static_credentials = Some(("testing".into(), "testing".into()));
        self
    }

    /// The EventBridge bus.
    pub fn bus_name(&self) -> &str {
        self.bus.as_deref().unwrap_or(&self.prefix)
    }

    /// The largest encoded envelope the bridge sends (the message limit less what EventBridge
    /// and the attributes add).
    pub fn max_envelope_bytes(&self) -> usize {
        self.max_message_bytes
            .saturating_sub(ENVELOPE_OVERHEAD_BYTES)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.prefix;
        if p.is_empty()
            || p.len() > MAX_PREFIX_LEN
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::InvalidPrefix(p.clone()));
        }
        if self.wait_seconds > 20 {
            return Err(ConfigError::InvalidSetting {
                name: "wait_seconds",
                reason: "SQS waits at most 20 s".into(),
            });
        }
        if self.max_message_bytes < 4 * ENVELOPE_OVERHEAD_BYTES
            || self.max_message_bytes > 1024 * 1024
        {
            return Err(ConfigError::InvalidSetting {
                name: "max_message_bytes",
                reason: "between 8 KiB and 1 MiB (the largest SQS message)".into(),
            });
        }
        if self.receivers_per_queue == 0 {
            return Err(ConfigError::InvalidSetting {
                name: "receivers_per_queue",
                reason: "at least 1".into(),
            });
        }
        let vis = self.visibility_timeout.as_secs();
        if !(1..=12 * 3600).contains(&vis) {
            return Err(ConfigError::InvalidSetting {
                name: "visibility_timeout",
                reason: "1 s to 12 h".into(),
            });
        }
        Ok(())
    }

    /// Parses an `aws://` URL (see the module docs).
    ///
    /// ```
    /// use purista_bridge_aws::AwsConfig;
    /// let c = AwsConfig::from_url("aws://us-east-1?prefix=shop&endpoint=http://127.0.0.1:5000&wait_seconds=1").unwrap();
    /// assert_eq!(c.region.as_deref(), Some("us-east-1"));
    /// assert_eq!(c.prefix, "shop");
    /// assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
    /// assert_eq!(c.wait_seconds, 1);
    /// assert!(AwsConfig::from_url("amqp://x").is_err());
    /// ```
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::InvalidUrl {
            url: purista_core::redact_url(url),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("aws://")
            .ok_or_else(|| bad("the scheme must be aws://"))?;
        let (region, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let region = region.trim_end_matches('/');
        let mut config = AwsConfig::default();
        if !region.is_empty() {
            if !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(bad("the region is letters, digits and `-` (eu-central-1)"));
            }
            config.region = Some(region.to_string());
        }
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("query parameters are key=value"))?;
            match key {
                "prefix" => config.prefix = value.to_string(),
                "bus" => config.bus = Some(value.to_string()),
                "endpoint" => config.endpoint = Some(value.to_string()),
                "wait_seconds" => {
                    config.wait_seconds = value
                        .parse()
                        .map_err(|_| bad("wait_seconds is a number of seconds, 0 to 20"))?
                }
                "max_message_bytes" => {
                    config.max_message_bytes = value
                        .parse()
                        .map_err(|_| bad("max_message_bytes is a number of bytes"))?
                }
                other => return Err(bad(&format!("unknown parameter `{other}`"))),
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Settings from the environment (see the module docs): `PURISTA_BRIDGE_URL` and
    /// `PURISTA_AWS_PREFIX`; region, endpoint and credentials come from `aws-config`'s chain
    /// when the bridge connects.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`AwsConfig::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut config = match lookup(URL_ENV).filter(|u| !u.trim().is_empty()) {
            Some(url) => Self::from_url(url.trim())?,
            None => AwsConfig::default(),
        };
        if let Some(prefix) = lookup(PREFIX_ENV).filter(|p| !p.is_empty()) {
            config.prefix = prefix;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_region_is_left_to_the_environment() {
        let c = AwsConfig::from_url("aws://").unwrap();
        assert_eq!(c.region, None);
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert_eq!(c.bus_name(), DEFAULT_PREFIX);
    }

    #[test]
    fn bad_urls_and_settings_are_refused() {
        for url in [
            "aws://EU",
            "aws://eu-west-1?prefix=a.b",
            "aws://eu-west-1?wait_seconds=21",
            "aws://eu-west-1?max_message_bytes=2000000",
            "aws://eu-west-1?colour=blue",
            "aws://eu-west-1?prefix",
        ] {
            assert!(AwsConfig::from_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn the_prefix_variable_wins_over_the_url() {
        let c = AwsConfig::from_lookup(|n| match n {
            URL_ENV => Some("aws://eu-west-1?prefix=url".into()),
            PREFIX_ENV => Some("env".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.prefix, "env");
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
    }

    #[test]
    fn debug_output_hides_credentials() {
        let c = AwsConfig::new("eu-west-1").with_emulator("http://127.0.0.1:1");
        let shown = format!("{c:?}");
        assert!(!shown.contains("testing"), "{shown}");
    }
}
