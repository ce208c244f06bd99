//! Settings of one RabbitMQ bridge instance, read from code or from the environment.
//!
//! The URL carries credentials, so it never reaches a log as written: [`AmqpConfig`]'s `Debug`
//! and [`redact_url`] replace the password, and every log line of this crate uses the redacted
//! form. Every broker resource is named under [`AmqpConfig::prefix`], so deployments and test
//! runs sharing one broker do not collide.

use std::time::Duration;

use purista_core::envelope::DEFAULT_MAX_ENVELOPE_BYTES;

/// Environment variable holding the broker URL (`amqp://…` or `amqps://…`).
pub const URL_ENV: &str = "PURISTA_BRIDGE_URL";
/// Environment variable holding the resource-name prefix.
pub const PREFIX_ENV: &str = "PURISTA_AMQP_PREFIX";
/// Default resource-name prefix (and exchange name), as in PURISTA.
pub const DEFAULT_PREFIX: &str = "purista";
/// Default ttl of invocations: 30 s.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of unacknowledged commands one instance takes per command queue.
pub const DEFAULT_COMMAND_PREFETCH: u16 = 32;

/// Why a configuration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The URL variable is not set.
    #[error("environment variable {URL_ENV} is not set")]
    MissingUrl,
    /// The URL is not `amqp://…` or `amqps://…` (shown redacted).
    #[error("`{0}` is not an amqp:// or amqps:// URL")]
    NotAmqp(String),
    /// The prefix is empty or contains characters that are awkward in resource names.
    #[error("invalid resource prefix `{0}`: use letters, digits, `.`, `-` and `_`")]
    InvalidPrefix(String),
}

/// Settings of one [`AmqpBridge`](crate::AmqpBridge).
///
/// ```
/// use purista_bridge_amqp::AmqpConfig;
/// let config = AmqpConfig::new("amqp://guest:secret@127.0.0.1:5672/%2f").with_prefix("orders-test");
/// assert_eq!(config.exchange_name(), "orders-test");
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// Broker URL, `amqp://user:password@host:port/vhost` or `amqps://…` (TLS with rustls).
    pub url: String,
    /// Prefix of every queue and exchange name (default `purista`).
    pub prefix: String,
    /// The headers exchange all messages go through; `None` = the prefix itself (PURISTA's
    /// default exchange `purista`).
    pub exchange: Option<String>,
    /// Ttl of invocations when the caller gives none (30 s).
    pub default_command_timeout: Duration,
    /// Unacknowledged commands one instance takes from a command queue (32).
    pub command_prefetch: u16,
    /// The instance id stamped as `sender.instanceId`; `None` = a fresh random id.
    pub instance_id: Option<String>,
    /// Largest encoded envelope this bridge sends or accepts (1 MiB).
    pub max_payload_bytes: usize,
    /// How long connecting may take before an attempt counts as failed (10 s).
    pub connect_timeout: Duration,
    /// First wait between reconnect attempts; doubles per failure (100 ms).
    pub reconnect_initial_delay: Duration,
    /// Longest wait between reconnect attempts (5 s).
    pub reconnect_max_delay: Duration,
    /// A subscription queue that is not durable, or belongs to one instance (broadcast), is
    /// deleted by the broker after this long without any consumer (30 min): what a crashed or
    /// retired deployment leaves behind cleans itself up. Durable shared queues never expire.
    pub idle_queue_expiry: Duration,
}

impl AmqpConfig {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_string(),
            exchange: None,
            default_command_timeout: DEFAULT_COMMAND_TIMEOUT,
            command_prefetch: DEFAULT_COMMAND_PREFETCH,
            instance_id: None,
            max_payload_bytes: DEFAULT_MAX_ENVELOPE_BYTES,
            connect_timeout: Duration::from_secs(10),
            reconnect_initial_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            idle_queue_expiry: Duration::from_secs(30 * 60),
        }
    }

    /// Reads `PURISTA_BRIDGE_URL` (required) and `PURISTA_AMQP_PREFIX` (optional).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`AmqpConfig::from_env`], with a custom variable lookup (for tests and embedding).
    ///
    /// ```
    /// use purista_bridge_amqp::AmqpConfig;
    /// let config = AmqpConfig::from_lookup(|name| match name {
    ///     "PURISTA_BRIDGE_URL" => Some("amqp://localhost".into()),
    ///     "PURISTA_AMQP_PREFIX" => Some("staging".into()),
    ///     _ => None,
    /// })
    /// .unwrap();
    /// assert_eq!(config.prefix, "staging");
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let url = lookup(URL_ENV)
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::MissingUrl)?;
        let mut config = AmqpConfig::new(url.trim());
        if let Some(prefix) = lookup(PREFIX_ENV).filter(|p| !p.trim().is_empty()) {
            config.prefix = prefix.trim().to_string();
        }
        config.validate()?;
        Ok(config)
    }

    /// The same config with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same config with a fixed instance id.
    pub fn with_instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// The headers exchange name: [`AmqpConfig::exchange`] or the prefix.
    pub fn exchange_name(&self) -> &str {
        self.exchange.as_deref().unwrap_or(&self.prefix)
    }

    /// The URL with its password replaced, safe for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// Checks the scheme and the prefix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let scheme = self.url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("amqp" | "amqps")) {
            return Err(ConfigError::NotAmqp(self.redacted_url()));
        }
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !valid(&self.prefix) {
            return Err(ConfigError::InvalidPrefix(self.prefix.clone()));
        }
        if let Some(exchange) = &self.exchange
            && !valid(exchange)
        {
            return Err(ConfigError::InvalidPrefix(exchange.clone()));
        }
        Ok(())
    }

    /// Removes the password from any text (broker error messages may echo the URL).
    pub(crate) fn scrub(&self, text: &str) -> String {
        match password_of(&self.url) {
            Some(password) if !password.is_empty() => text.replace(password, "***"),
            _ => text.to_string(),
        }
    }
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.redacted_url())
            .field("prefix", &self.prefix)
            .field("exchange", &self.exchange_name())
            .field("default_command_timeout", &self.default_command_timeout)
            .field("command_prefetch", &self.command_prefetch)
            .field("instance_id", &self.instance_id)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_initial_delay", &self.reconnect_initial_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("idle_queue_expiry", &self.idle_queue_expiry)
            .finish()
    }
}

/// The authority's userinfo password of `scheme://user:password@host/…`, if any.
fn password_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let (userinfo, _) = authority.rsplit_once('@')?;
    userinfo.split_once(':').map(|(_, p)| p)
}

pub use purista_core::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let config = AmqpConfig::new("amqp://guest:hunter2@127.0.0.1:5672/%2f");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("guest:***@127.0.0.1:5672/%2f"), "{shown}");
    }

    #[test]
    fn scrub_removes_the_password_from_broker_messages() {
        let config = AmqpConfig::new("amqp://u:p4ss@h/");
        assert_eq!(
            config.scrub("failed to reach amqp://u:p4ss@h/"),
            "failed to reach amqp://u:***@h/"
        );
    }

    #[test]
    fn from_lookup_needs_an_amqp_url() {
        assert_eq!(
            AmqpConfig::from_lookup(|_| None),
            Err(ConfigError::MissingUrl)
        );
        let err = AmqpConfig::from_lookup(|n| (n == URL_ENV).then(|| "http://u:pw@h".to_string()));
        assert_eq!(err, Err(ConfigError::NotAmqp("http://u:***@h".into())));
    }

    #[test]
    fn from_lookup_reads_the_prefix_and_keeps_defaults() {
        let config = AmqpConfig::from_lookup(|n| match n {
            URL_ENV => Some("amqps://mq.example".into()),
            PREFIX_ENV => Some("blue".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.prefix, "blue");
        assert_eq!(config.exchange_name(), "blue");
        assert_eq!(config.default_command_timeout, Duration::from_secs(30));
        assert_eq!(config.max_payload_bytes, DEFAULT_MAX_ENVELOPE_BYTES);
    }

    #[test]
    fn prefixes_with_spaces_or_slashes_are_refused() {
        let config = AmqpConfig::new("amqp://h").with_prefix("a b/c");
        assert!(matches!(
            config.validate(),
            Err(ConfigError::InvalidPrefix(_))
        ));
    }

    #[test]
    fn redact_keeps_urls_without_password() {
        assert_eq!(redact_url("amqp://user@h:5672/v"), "amqp://user@h:5672/v");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
