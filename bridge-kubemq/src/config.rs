//! The bridge's settings, from a `kubemq://` URL and the environment.
//!
//! ## URL grammar
//!
//! ```text
//! kubemq://[:<auth-token>@]<host>[:<port>][?client_id=<id>&prefix=<prefix>]
//! ```
//!
//! * `host` and `port`: the KubeMQ gRPC endpoint (port default 50000, KubeMQ's gRPC port).
//! * `auth-token`: KubeMQ's JWT auth token, written in the password place of the URL so that
//!   every log that prints the URL redacts it ([`purista_core::redact_url`]). Usually given by
//!   the environment instead (`KUBEMQ_AUTH_TOKEN`).
//! * `client_id`: the KubeMQ client id of this bridge instance (default `purista-<random>`).
//! * `prefix`: the first tokens of every channel the bridge uses (default `purista`); letters,
//!   digits, `-`, `_` and single dots between tokens.
//!
//! ## Environment ([`KubemqConfig::from_env`])
//!
//! * `PURISTA_BRIDGE_URL` (a `kubemq://` URL) or else `KUBEMQ_ADDRESS` (`host:port`, as KubeMQ's
//!   SDKs read it);
//! * `KUBEMQ_AUTH_TOKEN`: the auth token (wins over one in the URL);
//! * `PURISTA_KUBEMQ_PREFIX`, `PURISTA_KUBEMQ_CLIENT_ID`: override the URL's values.

use std::time::Duration;

/// Environment variable with a bridge URL.
pub const URL_ENV: &str = "PURISTA_BRIDGE_URL";
/// Environment variable with KubeMQ's address (`host:port`), as KubeMQ's SDKs read it.
pub const ADDRESS_ENV: &str = "KUBEMQ_ADDRESS";
/// Environment variable with the auth token.
pub const AUTH_TOKEN_ENV: &str = "KUBEMQ_AUTH_TOKEN";
/// Environment variable with the channel prefix.
pub const PREFIX_ENV: &str = "PURISTA_KUBEMQ_PREFIX";
/// Environment variable with the client id.
pub const CLIENT_ID_ENV: &str = "PURISTA_KUBEMQ_CLIENT_ID";
/// Prefix of every channel unless configured.
pub const DEFAULT_PREFIX: &str = "purista";
/// KubeMQ's gRPC port.
pub const DEFAULT_PORT: u16 = 50000;
/// Default command timeout (DESIGN §3.2).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// KubeMQ's default largest message (the SDK's send limit): 100 MiB. The bridge keeps a
/// smaller default so a runaway payload is a 400 at the caller, not a broker error.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The URL is not `kubemq://host[:port]…`.
    #[error("invalid KubeMQ URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, token redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The prefix cannot start channel names.
    #[error(
        "invalid channel prefix `{0}`: use letters, digits, `-`, `_` and single dots between them"
    )]
    InvalidPrefix(String),
    /// No address given.
    #[error("no KubeMQ address: set {URL_ENV} to a kubemq:// URL or {ADDRESS_ENV} to host:port")]
    Missing,
}

/// Settings of one bridge instance.
#[derive(Clone)]
pub struct KubemqConfig {
    /// KubeMQ host.
    pub host: String,
    /// KubeMQ gRPC port.
    pub port: u16,
    /// Auth token sent with every call (never logged).
    pub auth_token: Option<String>,
    /// KubeMQ client id; empty = `purista-<instance id>`.
    pub client_id: String,
    /// First tokens of every channel.
    pub prefix: String,
    /// Command timeout when the caller gives none.
    pub default_command_timeout: Duration,
    /// Largest encoded envelope the bridge publishes (over = 400 at the caller).
    pub max_payload_bytes: usize,
    /// How long connecting may take at start.
    pub connect_timeout: Duration,
    /// Deadline of one publish (event, queue message) or response.
    pub publish_timeout: Duration,
    /// How long registering a subscription or command may wait until KubeMQ routes to it.
    pub ready_timeout: Duration,
    /// Messages one subscription consumer holds at most, received and not yet handled. The
    /// stream is always read at once (what waits in flight is lost when a consumer leaves its
    /// group); past this bound events are dropped with a warning (Events are at most once).
    pub consumer_buffer: usize,
}

impl std::fmt::Debug for KubemqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubemqConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "***"))
            .field("client_id", &self.client_id)
            .field("prefix", &self.prefix)
            .field("default_command_timeout", &self.default_command_timeout)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .finish_non_exhaustive()
    }
}

impl KubemqConfig {
    /// Defaults for `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        KubemqConfig {
            host: host.into(),
            port,
            auth_token: None,
            client_id: String::new(),
            prefix: DEFAULT_PREFIX.to_string(),
            default_command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(10),
            consumer_buffer: 10_000,
        }
    }

    /// The same config under another channel prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same config with an auth token.
    pub fn with_auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// Parses a `kubemq://` URL (see the module docs for the grammar).
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::InvalidUrl {
            url: purista_core::redact_url(url),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("kubemq://")
            .ok_or_else(|| bad("expected the scheme kubemq://"))?;
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let authority = authority.trim_end_matches('/');
        let (token, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hp)) => {
                let token = userinfo.split_once(':').map_or(userinfo, |(_, t)| t);
                (Some(percent_decode(token)), hp)
            }
            None => (None, authority),
        };
        if hostport.contains('/') {
            return Err(bad("a KubeMQ URL has no path"));
        }
        let (host, port) = split_host_port(hostport).map_err(|r| bad(&r))?;
        let mut config = KubemqConfig::new(host, port);
        config.auth_token = token.filter(|t| !t.is_empty());
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match key {
                "client_id" | "clientId" => config.client_id = value,
                "prefix" => config.prefix = value,
                other => return Err(bad(&format!("unknown parameter `{other}`"))),
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads the environment (see the module docs).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`KubemqConfig::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let url = lookup(URL_ENV).filter(|u| u.starts_with("kubemq://"));
        let mut config = match (url, lookup(ADDRESS_ENV).filter(|a| !a.is_empty())) {
            (Some(url), _) => Self::from_url(&url)?,
            (None, Some(address)) => {
                let (host, port) =
                    split_host_port(&address).map_err(|reason| ConfigError::InvalidUrl {
                        url: address.clone(),
                        reason,
                    })?;
                KubemqConfig::new(host, port)
            }
            (None, None) => return Err(ConfigError::Missing),
        };
        if let Some(token) = lookup(AUTH_TOKEN_ENV).filter(|t| !t.is_empty()) {
            config.auth_token = Some(token);
        }
        if let Some(prefix) = lookup(PREFIX_ENV).filter(|p| !p.is_empty()) {
            config.prefix = prefix;
        }
        if let Some(id) = lookup(CLIENT_ID_ENV).filter(|p| !p.is_empty()) {
            config.client_id = id;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the prefix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ok = !self.prefix.is_empty()
            && self.prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if ok {
            Ok(())
        } else {
            Err(ConfigError::InvalidPrefix(self.prefix.clone()))
        }
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn split_host_port(hostport: &str) -> Result<(String, u16), String> {
    if hostport.is_empty() {
        return Err("no host".into());
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("`{port}` is not a port"))?;
            if host.is_empty() {
                return Err("no host".into());
            }
            Ok((host.to_string(), port))
        }
        _ => Ok((hostport.to_string(), DEFAULT_PORT)),
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_host_port_token_client_id_and_prefix() {
        let c = KubemqConfig::from_url(
            "kubemq://:s3cret@mq.internal:50001?client_id=orders-1&prefix=blue.app",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("mq.internal", 50001));
        assert_eq!(c.auth_token.as_deref(), Some("s3cret"));
        assert_eq!(c.client_id, "orders-1");
        assert_eq!(c.prefix, "blue.app");
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token is never printed"
        );
    }

    #[test]
    fn the_port_defaults_to_kubemqs_grpc_port() {
        let c = KubemqConfig::from_url("kubemq://localhost").unwrap();
        assert_eq!(c.port, DEFAULT_PORT);
        assert_eq!(c.auth_token, None);
    }

    #[test]
    fn bad_urls_and_prefixes_are_refused_with_the_token_redacted() {
        let e = KubemqConfig::from_url("kubemq://:tok@h:x").unwrap_err();
        assert!(!e.to_string().contains("tok@"), "{e}");
        assert!(KubemqConfig::from_url("amqp://h").is_err());
        assert!(KubemqConfig::from_url("kubemq://h?nope=1").is_err());
        assert!(matches!(
            KubemqConfig::from_url("kubemq://h?prefix=a..b"),
            Err(ConfigError::InvalidPrefix(_))
        ));
        assert!(KubemqConfig::from_url("kubemq://h?prefix=a*").is_err());
    }

    #[test]
    fn the_environment_gives_address_token_and_prefix() {
        let c = KubemqConfig::from_lookup(|n| match n {
            ADDRESS_ENV => Some("10.0.0.5:50000".into()),
            AUTH_TOKEN_ENV => Some("jwt".into()),
            PREFIX_ENV => Some("green".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.address(), "10.0.0.5:50000");
        assert_eq!(c.auth_token.as_deref(), Some("jwt"));
        assert_eq!(c.prefix, "green");
        assert_eq!(
            KubemqConfig::from_lookup(|_| None).unwrap_err(),
            ConfigError::Missing
        );
    }
}
