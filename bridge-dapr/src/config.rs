//! The bridge's settings, from a `dapr://` URL and Dapr's own environment variables.
//!
//! ## URL grammar
//!
//! ```text
//! dapr://[:<dapr-api-token>@]<sidecar-host>[:<sidecar-port>][?app_id=<id>&app_port=<port>&pubsub=<name>&statestore=<name>&prefix=<prefix>&events=<on|off>]
//! ```
//!
//! * `sidecar-host`, `sidecar-port`: the sidecar's HTTP API (port default 3500, Dapr's).
//! * `dapr-api-token`: the sidecar's API token (`DAPR_API_TOKEN`), in the password place so that
//!   every log that prints the URL redacts it. Usually given by the environment instead.
//! * `app_id`: this app's Dapr app id (default `purista`); the app id other apps invoke.
//! * `app_port`: the port of the app server the bridge runs, where the sidecar delivers
//!   (default 3000; `0` picks a free port, for tests).
//! * `pubsub`: the pub/sub component (default `pubsub`).
//! * `statestore`: the state store component that holds the command endpoint registry (default
//!   `statestore`).
//! * `prefix`: the first part of every topic and state key (default `purista`).
//! * `events`: `off` for an app that only publishes and serves commands (default `on`). Dapr
//!   reads an app's subscriptions once, when the app starts, so an app that may register a
//!   subscription later is subscribed to the events topic from the start, and the sidecar
//!   delivers every event of the topic to it. With `off` the app is not subscribed: the
//!   sidecar delivers no event to it (one HTTP delivery less per event and such app), and
//!   the bridge declares no subscriptions, so the strict startup check refuses a service
//!   with one, naming it.
//!
//! ## Environment ([`DaprConfig::from_env`])
//!
//! Dapr's own variables: `DAPR_HTTP_ENDPOINT` (a full `http://host:port`) or else
//! `DAPR_HTTP_PORT` (the sidecar on localhost), `APP_ID`, `APP_PORT`, `DAPR_API_TOKEN` (sent to
//! the sidecar), `APP_API_TOKEN` (required from the sidecar). Then `PURISTA_DAPR_PUBSUB`,
//! `PURISTA_DAPR_STATESTORE`, `PURISTA_DAPR_PREFIX`, `PURISTA_DAPR_CONSUMER`,
//! `PURISTA_DAPR_EVENTS` (`on` / `off`, as the URL's `events`). `PURISTA_BRIDGE_URL` (a
//! `dapr://` URL) is read first; the variables override what it says.

use std::time::Duration;

/// Environment variable with a bridge URL.
pub const URL_ENV: &str = "PURISTA_BRIDGE_URL";
/// Dapr's variable with the sidecar's HTTP endpoint (`http://host:port`).
pub const HTTP_ENDPOINT_ENV: &str = "DAPR_HTTP_ENDPOINT";
/// Dapr's variable with the sidecar's HTTP port on localhost.
pub const HTTP_PORT_ENV: &str = "DAPR_HTTP_PORT";
/// Dapr's variable with the app id.
pub const APP_ID_ENV: &str = "APP_ID";
/// Dapr's variable with the app port.
pub const APP_PORT_ENV: &str = "APP_PORT";
/// Dapr's variable with the token the app sends to the sidecar.
pub const API_TOKEN_ENV: &str = "DAPR_API_TOKEN";
/// Dapr's variable with the token the sidecar sends to the app.
pub const APP_API_TOKEN_ENV: &str = "APP_API_TOKEN";
/// The pub/sub component name.
pub const PUBSUB_ENV: &str = "PURISTA_DAPR_PUBSUB";
/// The state store component name.
pub const STATESTORE_ENV: &str = "PURISTA_DAPR_STATESTORE";
/// The topic prefix.
pub const PREFIX_ENV: &str = "PURISTA_DAPR_PREFIX";
/// Environment variable: `off` for an app that receives no events ([`DaprConfig::receive_events`]).
pub const EVENTS_ENV: &str = "PURISTA_DAPR_EVENTS";
/// Environment variable: this instance's consumer group ([`DaprConfig::consumer`]).
pub const CONSUMER_ENV: &str = "PURISTA_DAPR_CONSUMER";
/// Dapr's default HTTP port.
pub const DEFAULT_SIDECAR_PORT: u16 = 3500;
/// Default app port.
pub const DEFAULT_APP_PORT: u16 = 3000;
/// Default command timeout (DESIGN §3.2).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest envelope: Dapr's default HTTP request body limit is 4 MiB; the CloudEvent
/// around the envelope needs a little of it.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024 - 16 * 1024;

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The URL cannot be read.
    #[error("invalid Dapr URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL, token redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting is invalid.
    #[error("invalid Dapr setting {name}: {reason}")]
    Invalid {
        /// Which setting.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Settings of one bridge instance.
#[derive(Clone)]
pub struct DaprConfig {
    /// The sidecar's HTTP API, `http://host:port`.
    pub sidecar: String,
    /// Token sent to the sidecar as `dapr-api-token` (never logged).
    pub api_token: Option<String>,
    /// Token the sidecar must send to the app server as `dapr-api-token` (never logged).
    pub app_api_token: Option<String>,
    /// This app's Dapr app id.
    pub app_id: String,
    /// Address the app server binds (the sidecar calls it), default `127.0.0.1`.
    pub app_host: String,
    /// Port of the app server; `0` picks a free one.
    pub app_port: u16,
    /// Pub/sub component.
    pub pubsub: String,
    /// State store component (command endpoint registry).
    pub statestore: String,
    /// First part of every topic and state key.
    pub prefix: String,
    /// Command timeout when the caller gives none.
    pub default_command_timeout: Duration,
    /// Largest encoded envelope the bridge publishes or accepts (over = 400 / 413).
    pub max_payload_bytes: usize,
    /// How long start may wait for the sidecar.
    pub connect_timeout: Duration,
    /// Deadline of one call to the sidecar (publish, state, health).
    pub call_timeout: Duration,
    /// This instance's consumer group, as the pub/sub component's `consumerID` names it (the
    /// app id, or `{podName}`): a shared subscription's claim is held in its name, so the same
    /// event redelivered to a restarted app of the group wins the claim again and runs (at
    /// least once across restarts). `None`: this bridge instance's id, so a claim held when
    /// the app went down is not won by the restarted app; the event is then lost to that
    /// subscription. Never give two instances of one deployment the same value.
    pub consumer: Option<String>,
    /// Whether the app is subscribed to the events topic (default `true`). `false` (URL
    /// `events=off`): the sidecar delivers no event to the app, and the bridge declares no
    /// subscriptions (see the module docs).
    pub receive_events: bool,
}

impl std::fmt::Debug for DaprConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaprConfig")
            .field("sidecar", &self.sidecar)
            .field("api_token", &self.api_token.as_ref().map(|_| "***"))
            .field("app_api_token", &self.app_api_token.as_ref().map(|_| "***"))
            .field("app_id", &self.app_id)
            .field("app_port", &self.app_port)
            .field("pubsub", &self.pubsub)
            .field("statestore", &self.statestore)
            .field("prefix", &self.prefix)
            .field("consumer", &self.consumer)
            .field("receive_events", &self.receive_events)
            .finish_non_exhaustive()
    }
}

impl DaprConfig {
    /// Defaults for a sidecar at `sidecar` (`http://host:port`) and an app id.
    pub fn new(sidecar: impl Into<String>, app_id: impl Into<String>) -> Self {
        DaprConfig {
            sidecar: sidecar.into().trim_end_matches('/').to_string(),
            api_token: None,
            app_api_token: None,
            app_id: app_id.into(),
            app_host: "127.0.0.1".into(),
            app_port: DEFAULT_APP_PORT,
            pubsub: "pubsub".into(),
            statestore: "statestore".into(),
            prefix: "purista".into(),
            default_command_timeout: DEFAULT_COMMAND_TIMEOUT,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(5),
            consumer: None,
            receive_events: true,
        }
    }

    /// The same settings with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Reads a `dapr://` URL (see the module docs).
    ///
    /// ```
    /// use purista_bridge_dapr::DaprConfig;
    /// let c = DaprConfig::from_url("dapr://:secret@localhost:3501?app_id=orders&app_port=4000&pubsub=kafka").unwrap();
    /// assert_eq!(c.sidecar, "http://localhost:3501");
    /// assert_eq!(c.app_id, "orders");
    /// assert_eq!(c.app_port, 4000);
    /// assert_eq!(c.pubsub, "kafka");
    /// assert_eq!(c.api_token.as_deref(), Some("secret"));
    /// ```
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let bad = |reason: &str| ConfigError::InvalidUrl {
            url: purista_core::redact_url(url),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("dapr://")
            .ok_or_else(|| bad("expected dapr://"))?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = authority.trim_end_matches('/');
        let (token, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hp)) => {
                let token = userinfo.split_once(':').map_or(userinfo, |(_, t)| t);
                (Some(token.to_string()).filter(|t| !t.is_empty()), hp)
            }
            None => (None, authority),
        };
        if hostport.is_empty() {
            return Err(bad("no sidecar host"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the sidecar port is not a number"))?,
            ),
            None => (hostport, DEFAULT_SIDECAR_PORT),
        };
        let mut config = DaprConfig::new(format!("http://{host}:{port}"), "purista");
        config.api_token = token;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "app_id" => config.app_id = v.to_string(),
                "app_port" => {
                    config.app_port = v.parse().map_err(|_| bad("app_port is not a port"))?
                }
                "app_host" => config.app_host = v.to_string(),
                "pubsub" => config.pubsub = v.to_string(),
                "statestore" => config.statestore = v.to_string(),
                "prefix" => config.prefix = v.to_string(),
                "events" => {
                    config.receive_events =
                        on_off(v).ok_or_else(|| bad("events is `on` or `off`"))?
                }
                other => return Err(bad(&format!("unknown parameter `{other}`"))),
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Settings from the process environment (see the module docs).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Settings from `lookup` (an environment), as [`DaprConfig::from_env`] reads them.
    ///
    /// ```
    /// use purista_bridge_dapr::DaprConfig;
    /// let env = |name: &str| match name {
    ///     "DAPR_HTTP_PORT" => Some("3510".to_string()),
    ///     "APP_ID" => Some("billing".to_string()),
    ///     "APP_PORT" => Some("6000".to_string()),
    ///     "APP_API_TOKEN" => Some("from-dapr".to_string()),
    ///     _ => None,
    /// };
    /// let c = DaprConfig::from_lookup(env).unwrap();
    /// assert_eq!(c.sidecar, "http://127.0.0.1:3510");
    /// assert_eq!((c.app_id.as_str(), c.app_port), ("billing", 6000));
    /// assert_eq!(c.app_api_token.as_deref(), Some("from-dapr"));
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let mut config = match get(URL_ENV).filter(|u| u.starts_with("dapr://")) {
            Some(url) => DaprConfig::from_url(&url)?,
            None => DaprConfig::new(
                format!("http://127.0.0.1:{DEFAULT_SIDECAR_PORT}"),
                "purista",
            ),
        };
        if let Some(endpoint) = get(HTTP_ENDPOINT_ENV) {
            config.sidecar = endpoint.trim_end_matches('/').to_string();
        } else if let Some(port) = get(HTTP_PORT_ENV) {
            let port: u16 = port.parse().map_err(|_| ConfigError::Invalid {
                name: HTTP_PORT_ENV,
                reason: "not a port".into(),
            })?;
            config.sidecar = format!("http://127.0.0.1:{port}");
        }
        if let Some(id) = get(APP_ID_ENV) {
            config.app_id = id;
        }
        if let Some(port) = get(APP_PORT_ENV) {
            config.app_port = port.parse().map_err(|_| ConfigError::Invalid {
                name: APP_PORT_ENV,
                reason: "not a port".into(),
            })?;
        }
        if let Some(t) = get(API_TOKEN_ENV) {
            config.api_token = Some(t);
        }
        if let Some(t) = get(APP_API_TOKEN_ENV) {
            config.app_api_token = Some(t);
        }
        if let Some(v) = get(PUBSUB_ENV) {
            config.pubsub = v;
        }
        if let Some(v) = get(STATESTORE_ENV) {
            config.statestore = v;
        }
        if let Some(v) = get(PREFIX_ENV) {
            config.prefix = v;
        }
        if let Some(v) = get(CONSUMER_ENV) {
            config.consumer = Some(v);
        }
        if let Some(v) = get(EVENTS_ENV) {
            config.receive_events = on_off(&v).ok_or_else(|| ConfigError::Invalid {
                name: EVENTS_ENV,
                reason: format!("`{v}`: use `on` or `off`"),
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        };
        if !(self.sidecar.starts_with("http://") || self.sidecar.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                name: "sidecar",
                reason: "expected http://host:port".into(),
            });
        }
        for (name, value) in [
            ("app_id", &self.app_id),
            ("pubsub", &self.pubsub),
            ("statestore", &self.statestore),
            ("prefix", &self.prefix),
        ] {
            if !name_ok(value) {
                return Err(ConfigError::Invalid {
                    name,
                    reason: format!("`{value}`: use letters, digits, `-`, `_` and `.` (not empty)"),
                });
            }
        }
        Ok(())
    }
}

/// `on` / `off` (and `true` / `false`), any case.
fn on_off(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_port_uses_daprs_and_bad_urls_are_refused() {
        let c = DaprConfig::from_url("dapr://sidecar").unwrap();
        assert_eq!(c.sidecar, "http://sidecar:3500");
        assert!(DaprConfig::from_url("dapr://sidecar:x").is_err());
        assert!(DaprConfig::from_url("dapr://sidecar?color=red").is_err());
        assert!(DaprConfig::from_url("dapr://sidecar?app_id=a/b").is_err());
        let err = DaprConfig::from_url("dapr://:tok@h:x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("tok"), "{err}");
    }

    #[test]
    fn the_endpoint_variable_wins_over_the_port_and_tokens_are_not_printed() {
        let c = DaprConfig::from_lookup(|n| match n {
            HTTP_ENDPOINT_ENV => Some("http://dapr:3999/".into()),
            HTTP_PORT_ENV => Some("1".into()),
            API_TOKEN_ENV => Some("very-secret".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.sidecar, "http://dapr:3999");
        assert!(!format!("{c:?}").contains("very-secret"));
    }

    #[test]
    fn events_is_on_by_default_and_off_only_when_said_plainly() {
        assert!(
            DaprConfig::from_url("dapr://sidecar")
                .unwrap()
                .receive_events
        );
        assert!(
            !DaprConfig::from_url("dapr://sidecar?events=off")
                .unwrap()
                .receive_events
        );
        assert!(
            DaprConfig::from_url("dapr://sidecar?events=ON")
                .unwrap()
                .receive_events
        );
        let err = DaprConfig::from_url("dapr://sidecar?events=no").unwrap_err();
        assert!(err.to_string().contains("events is `on` or `off`"), "{err}");
        let env = |value: &'static str| move |n: &str| (n == EVENTS_ENV).then(|| value.to_string());
        assert!(!DaprConfig::from_lookup(env("Off")).unwrap().receive_events);
        let err = DaprConfig::from_lookup(env("maybe")).unwrap_err();
        assert!(err.to_string().contains(EVENTS_ENV), "{err}");
    }
}
