//! Calls to the sidecar's HTTP API: publish, service invocation, state, health. Every call
//! carries `dapr-api-token` when one is configured and is bounded by a deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_core::BridgeError;
use reqwest::StatusCode;
use serde_json::Value;

use crate::app::TOKEN_HEADER;
use crate::cloudevent::CLOUDEVENT_CONTENT_TYPE;

/// Invocation URLs kept at most (one per app id invoked; more are parsed each time).
const INVOKE_URLS_KEPT: usize = 256;

/// The sidecar's HTTP API.
#[derive(Clone)]
pub struct Sidecar {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
    /// The parsed invocation URL by app id, with its method: an invocation clones it instead
    /// of formatting and parsing the URL again.
    invoke_urls: Arc<Mutex<HashMap<String, (String, reqwest::Url)>>>,
}

/// What a service invocation returned.
pub struct Invoked {
    /// HTTP status (the app's, passed through by Dapr, or Dapr's own on its errors).
    pub status: StatusCode,
    /// The body.
    pub body: axum::body::Bytes,
}

fn unreachable(what: &str, e: &reqwest::Error) -> BridgeError {
    // The error's text names the URL (no credentials travel in it); its causes say why.
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    BridgeError::Unavailable(format!("the Dapr sidecar did not answer {what}: {text}"))
}

impl Sidecar {
    /// A client of the sidecar at `base` (`http://host:port`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, BridgeError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| BridgeError::Broker(format!("building the HTTP client: {e}")))?;
        Ok(Sidecar {
            base: base.trim_end_matches('/').to_string(),
            token,
            client,
            invoke_urls: Arc::default(),
        })
    }

    /// The URL of `method` of `app_id`, parsed once per app id.
    fn invoke_url(&self, app_id: &str, method: &str) -> Result<reqwest::Url, String> {
        if let Some((kept_method, url)) = self.invoke_urls.lock().get(app_id)
            && kept_method == method
        {
            return Ok(url.clone());
        }
        let text = format!("{}/v1.0/invoke/{app_id}/method/{method}", self.base);
        let url = reqwest::Url::parse(&text).map_err(|e| format!("`{text}`: {e}"))?;
        let mut kept = self.invoke_urls.lock();
        if kept.len() < INVOKE_URLS_KEPT {
            kept.insert(app_id.to_string(), (method.to_string(), url.clone()));
        }
        Ok(url)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header(TOKEN_HEADER, token);
        }
        request
    }

    /// `GET /v1.0/healthz`: `Ok` when the sidecar answers 2xx.
    pub async fn healthz(&self, within: Duration) -> Result<(), BridgeError> {
        let response = self
            .request(reqwest::Method::GET, "/v1.0/healthz")
            .timeout(within)
            .send()
            .await
            .map_err(|e| unreachable("its health check", &e))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(BridgeError::Unavailable(format!(
                "the Dapr sidecar reports itself unhealthy ({})",
                response.status()
            )))
        }
    }

    /// `GET /v1.0/metadata`: the sidecar's app id. It needs the API token, so a sidecar that
    /// refuses the bridge's token says so here (health checks go without a token).
    pub async fn metadata(&self, within: Duration) -> Result<Metadata, BridgeError> {
        let response = self
            .request(reqwest::Method::GET, "/v1.0/metadata")
            .timeout(within)
            .send()
            .await
            .map_err(|e| unreachable("a metadata request", &e))?;
        match response.status() {
            s if s.is_success() => {
                let body: Value = response
                    .json()
                    .await
                    .map_err(|e| unreachable("a metadata request", &e))?;
                Ok(Metadata::from_json(&body))
            }
            StatusCode::UNAUTHORIZED => Err(BridgeError::Broker(
                "the Dapr sidecar refused the API token (set DAPR_API_TOKEN to the sidecar's)"
                    .into(),
            )),
            s => Err(BridgeError::Unavailable(format!(
                "the Dapr sidecar failed a metadata request ({s})"
            ))),
        }
    }

    /// Publishes a structured CloudEvent on `topic` of the pub/sub component `pubsub`.
    pub async fn publish(
        &self,
        pubsub: &str,
        topic: &str,
        cloudevent: Vec<u8>,
        within: Duration,
    ) -> Result<(), BridgeError> {
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("/v1.0/publish/{pubsub}/{topic}"),
            )
            .header(reqwest::header::CONTENT_TYPE, CLOUDEVENT_CONTENT_TYPE)
            .body(cloudevent)
            .timeout(within)
            .send()
            .await
            .map_err(|e| unreachable("a publish", &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(match status {
            StatusCode::UNAUTHORIZED => BridgeError::Broker(
                "the Dapr sidecar refused the API token (dapr-api-token)".into(),
            ),
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => BridgeError::Refused(format!(
                "pub/sub {pubsub}: {}",
                text.chars().take(200).collect::<String>()
            )),
            _ => BridgeError::Unavailable(format!("the Dapr sidecar failed a publish ({status})")),
        })
    }

    /// Invokes `method` of `app_id` with a JSON body, at most `within`.
    pub async fn invoke(
        &self,
        app_id: &str,
        method: &str,
        body: axum::body::Bytes,
        within: Duration,
    ) -> Result<Invoked, InvokeFailure> {
        let url = self.invoke_url(app_id, method).map_err(|e| {
            InvokeFailure::Unreachable(BridgeError::Unavailable(format!(
                "app id `{app_id}` makes no invocation URL: {e}"
            )))
        })?;
        let mut request = self.client.request(reqwest::Method::POST, url);
        if let Some(token) = &self.token {
            request = request.header(TOKEN_HEADER, token);
        }
        let response = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .timeout(within)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    InvokeFailure::Timeout
                } else {
                    InvokeFailure::Unreachable(unreachable("an invocation", &e))
                }
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            if e.is_timeout() {
                InvokeFailure::Timeout
            } else {
                InvokeFailure::Unreachable(unreachable("an invocation", &e))
            }
        })?;
        Ok(Invoked { status, body })
    }

    /// `GET /v1.0/state/{store}/{key}`: the value and its ETag, `None` when absent.
    pub async fn get_state(
        &self,
        store: &str,
        key: &str,
        within: Duration,
    ) -> Result<Option<(Value, Option<String>)>, BridgeError> {
        let response = self
            .request(reqwest::Method::GET, &format!("/v1.0/state/{store}/{key}"))
            .timeout(within)
            .send()
            .await
            .map_err(|e| unreachable("a state read", &e))?;
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(BridgeError::Broker(format!(
                "the Dapr state store {store} failed a read ({status})"
            )));
        }
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim_matches('"').to_string());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| unreachable("a state read", &e))?;
        if bytes.is_empty() {
            return Ok(None);
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| BridgeError::Broker(format!("state {key} is not JSON: {e}")))?;
        Ok(Some((value, etag)))
    }

    /// `POST /v1.0/state/{store}` with first-write concurrency: `Ok(false)` when the ETag no
    /// longer matches (someone wrote in between), or, without an ETag, when the key exists.
    /// `ttl_secs` lets the store expire the item (`metadata.ttlInSeconds`).
    pub async fn save_state(
        &self,
        store: &str,
        key: &str,
        value: &Value,
        etag: Option<&str>,
        ttl_secs: Option<u32>,
        within: Duration,
    ) -> Result<bool, BridgeError> {
        let mut item = serde_json::json!({
            "key": key,
            "value": value,
            "options": { "concurrency": "first-write" },
        });
        if let Some(obj) = item.as_object_mut() {
            if let Some(etag) = etag {
                obj.insert("etag".into(), Value::String(etag.to_string()));
            }
            if let Some(ttl) = ttl_secs {
                obj.insert(
                    "metadata".into(),
                    serde_json::json!({ "ttlInSeconds": ttl.to_string() }),
                );
            }
        }
        let response = self
            .request(reqwest::Method::POST, &format!("/v1.0/state/{store}"))
            .json(&[item])
            .timeout(within)
            .send()
            .await
            .map_err(|e| unreachable("a state write", &e))?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            s => Err(BridgeError::Broker(format!(
                "the Dapr state store {store} failed a write ({s})"
            ))),
        }
    }
}

/// What `GET /v1.0/metadata` says about the sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The app id the sidecar serves.
    pub app_id: String,
    /// The active subscriptions as `(pubsub, topic)`; `None` when the sidecar does not list
    /// them (Dapr before 1.11).
    pub subscriptions: Option<Vec<(String, String)>>,
}

impl Metadata {
    fn from_json(body: &Value) -> Self {
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Metadata {
            app_id: text(body, "id").unwrap_or_default(),
            subscriptions: body
                .get("subscriptions")
                .and_then(Value::as_array)
                .map(|subs| {
                    subs.iter()
                        .filter_map(|s| Some((text(s, "pubsubname")?, text(s, "topic")?)))
                        .collect()
                }),
        }
    }

    /// Whether the sidecar lists an active subscription to `topic` of `pubsub` (`true` when it
    /// does not list subscriptions at all: nothing more can be known then).
    pub fn subscribed(&self, pubsub: &str, topic: &str) -> bool {
        self.subscriptions
            .as_ref()
            .is_none_or(|subs| subs.iter().any(|(p, t)| p == pubsub && t == topic))
    }
}

/// Why an invocation brought no answer.
pub enum InvokeFailure {
    /// The deadline passed.
    Timeout,
    /// The sidecar could not be reached.
    Unreachable(BridgeError),
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Metadata;

    #[test]
    fn a_topic_counts_as_subscribed_only_once_the_sidecar_lists_it() {
        let listed = Metadata::from_json(&json!({
            "id": "app-1",
            "subscriptions": [
                { "pubsubname": "pubsub", "topic": "orders", "rules": [] },
                { "pubsubname": "other", "topic": "t" },
            ],
        }));
        assert_eq!(listed.app_id, "app-1");
        assert!(listed.subscribed("pubsub", "orders"));
        assert!(
            !listed.subscribed("pubsub", "t"),
            "pubsub and topic go together"
        );
        let none_yet = Metadata::from_json(&json!({ "id": "app-1", "subscriptions": [] }));
        assert!(!none_yet.subscribed("pubsub", "orders"));
    }

    #[test]
    fn an_invocation_url_is_kept_per_app_and_method_and_a_bad_app_id_is_refused() {
        let sidecar = super::Sidecar::new("http://127.0.0.1:3500/", None).expect("a client");
        let first = sidecar
            .invoke_url("orders", "purista/command")
            .expect("a URL");
        assert_eq!(
            first.as_str(),
            "http://127.0.0.1:3500/v1.0/invoke/orders/method/purista/command"
        );
        assert_eq!(sidecar.invoke_url("orders", "purista/command"), Ok(first));
        let other = sidecar.invoke_url("orders", "echo").expect("a URL");
        assert_eq!(
            other.as_str(),
            "http://127.0.0.1:3500/v1.0/invoke/orders/method/echo"
        );
        for i in 0..super::INVOKE_URLS_KEPT + 10 {
            sidecar.invoke_url(&format!("app-{i}"), "m").expect("a URL");
        }
        assert_eq!(sidecar.invoke_urls.lock().len(), super::INVOKE_URLS_KEPT);
        let bad = super::Sidecar::new("http://", None).expect("a client");
        assert!(bad.invoke_url("orders", "m").is_err());
    }

    #[test]
    fn a_sidecar_that_lists_no_subscriptions_at_all_is_taken_at_its_word() {
        // Dapr before 1.11 has no `subscriptions` in its metadata: nothing to wait for.
        let old = Metadata::from_json(&json!({ "id": "app-1" }));
        assert_eq!(old.subscriptions, None);
        assert!(old.subscribed("pubsub", "orders"));
    }
}
