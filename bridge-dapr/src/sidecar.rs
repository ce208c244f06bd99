//! Calls to the sidecar's HTTP API: publish, service invocation, state, health. Every call
//! carries `dapr-api-token` when one is configured and is bounded by a deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::Full;
use parking_lot::Mutex;
use purista_core::BridgeError;
use serde_json::Value;

use crate::app::TOKEN_HEADER;
use crate::cloudevent::CLOUDEVENT_CONTENT_TYPE;
use crate::http::{Answer, Failure, HttpClient};

/// Invocation URLs kept at most (one per app id invoked; more are parsed each time).
const INVOKE_URLS_KEPT: usize = 256;

/// The sidecar's HTTP API.
#[derive(Clone)]
pub struct Sidecar {
    base: String,
    /// `dapr-api-token`, marked sensitive (never printed).
    token: Option<HeaderValue>,
    client: HttpClient,
    /// The parsed invocation URL by app id, with its method: an invocation clones it instead
    /// of formatting and parsing the URL again.
    invoke_urls: Arc<Mutex<HashMap<String, (String, Uri)>>>,
}

/// What a service invocation returned.
pub struct Invoked {
    /// HTTP status (the app's, passed through by Dapr, or Dapr's own on its errors).
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

/// The error of a call that brought no answer.
fn unreachable(what: &str, failure: Failure, within: Duration) -> BridgeError {
    BridgeError::Unavailable(match failure {
        Failure::Timeout => format!(
            "the Dapr sidecar did not answer {what} within {} ms",
            within.as_millis()
        ),
        Failure::Failed(text) => format!("the Dapr sidecar did not answer {what}: {text}"),
    })
}

impl Sidecar {
    /// A client of the sidecar at `base` (`http://host:port`).
    ///
    /// # Errors
    /// [`BridgeError::InvalidRequest`] when `token` cannot travel in a header.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, BridgeError> {
        let token = token
            .map(|t| {
                let mut value = HeaderValue::from_str(&t).map_err(|_| {
                    BridgeError::InvalidRequest(
                        "the Dapr API token holds characters a header cannot carry".into(),
                    )
                })?;
                value.set_sensitive(true);
                Ok::<_, BridgeError>(value)
            })
            .transpose()?;
        Ok(Sidecar {
            base: base.trim_end_matches('/').to_string(),
            token,
            client: HttpClient::new(),
            invoke_urls: Arc::default(),
        })
    }

    /// The URL of `method` of `app_id`, parsed once per app id.
    fn invoke_url(&self, app_id: &str, method: &str) -> Result<Uri, String> {
        if let Some((kept_method, url)) = self.invoke_urls.lock().get(app_id)
            && kept_method == method
        {
            return Ok(url.clone());
        }
        let text = format!("{}/v1.0/invoke/{app_id}/method/{method}", self.base);
        let url = parse_url(&text)?;
        let mut kept = self.invoke_urls.lock();
        if kept.len() < INVOKE_URLS_KEPT {
            kept.insert(app_id.to_string(), (method.to_string(), url.clone()));
        }
        Ok(url)
    }

    /// A request to `url` with the API token, when one is configured.
    fn request(
        &self,
        method: Method,
        url: Uri,
        content_type: Option<&'static str>,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, BridgeError> {
        let mut request = Request::builder().method(method).uri(url);
        if let Some(token) = &self.token {
            request = request.header(TOKEN_HEADER, token.clone());
        }
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request
            .body(Full::new(body))
            .map_err(|e| BridgeError::InvalidRequest(format!("a request to the sidecar: {e}")))
    }

    /// Sends a request to `path` of the sidecar API and reads the answer, within `within`.
    async fn call(
        &self,
        what: &str,
        method: Method,
        path: &str,
        json_body: Option<Vec<u8>>,
        within: Duration,
    ) -> Result<Answer, BridgeError> {
        let url = parse_url(&format!("{}{path}", self.base))
            .map_err(|e| BridgeError::Unavailable(format!("{what}: {e}")))?;
        let content_type = json_body.is_some().then_some("application/json");
        let body = json_body.map(Bytes::from).unwrap_or_default();
        let request = self.request(method, url, content_type, body)?;
        self.client
            .send(request, within)
            .await
            .map_err(|failure| unreachable(what, failure, within))
    }

    /// `GET /v1.0/healthz`: `Ok` when the sidecar answers 2xx.
    pub async fn healthz(&self, within: Duration) -> Result<(), BridgeError> {
        let answer = self
            .call(
                "its health check",
                Method::GET,
                "/v1.0/healthz",
                None,
                within,
            )
            .await?;
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(BridgeError::Unavailable(format!(
                "the Dapr sidecar reports itself unhealthy ({})",
                answer.status
            )))
        }
    }

    /// `GET /v1.0/metadata`: the sidecar's app id. It needs the API token, so a sidecar that
    /// refuses the bridge's token says so here (health checks go without a token).
    pub async fn metadata(&self, within: Duration) -> Result<Metadata, BridgeError> {
        let what = "a metadata request";
        let answer = self
            .call(what, Method::GET, "/v1.0/metadata", None, within)
            .await?;
        match answer.status {
            s if s.is_success() => {
                let body: Value = serde_json::from_slice(&answer.body).map_err(|e| {
                    BridgeError::Unavailable(format!(
                        "the Dapr sidecar answered {what} with no JSON: {e}"
                    ))
                })?;
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
        let what = "a publish";
        let url = parse_url(&format!("{}/v1.0/publish/{pubsub}/{topic}", self.base))
            .map_err(|e| BridgeError::Unavailable(format!("{what}: {e}")))?;
        let request = self.request(
            Method::POST,
            url,
            Some(CLOUDEVENT_CONTENT_TYPE),
            Bytes::from(cloudevent),
        )?;
        let answer = self
            .client
            .send(request, within)
            .await
            .map_err(|failure| unreachable(what, failure, within))?;
        let status = answer.status;
        if status.is_success() {
            return Ok(());
        }
        Err(match status {
            StatusCode::UNAUTHORIZED => BridgeError::Broker(
                "the Dapr sidecar refused the API token (dapr-api-token)".into(),
            ),
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => BridgeError::Refused(format!(
                "pub/sub {pubsub}: {}",
                String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )),
            _ => BridgeError::Unavailable(format!("the Dapr sidecar failed a publish ({status})")),
        })
    }

    /// Invokes `method` of `app_id` with a JSON body, at most `within`.
    pub async fn invoke(
        &self,
        app_id: &str,
        method: &str,
        body: Bytes,
        within: Duration,
    ) -> Result<Invoked, InvokeFailure> {
        let unusable = |e: String| {
            InvokeFailure::Unreachable(BridgeError::Unavailable(format!(
                "app id `{app_id}` makes no invocation request: {e}"
            )))
        };
        let url = self.invoke_url(app_id, method).map_err(unusable)?;
        let request = self
            .request(Method::POST, url, Some("application/json"), body)
            .map_err(|e| unusable(e.to_string()))?;
        match self.client.send(request, within).await {
            Ok(answer) => Ok(Invoked {
                status: answer.status,
                body: answer.body,
            }),
            Err(Failure::Timeout) => Err(InvokeFailure::Timeout),
            Err(failure) => Err(InvokeFailure::Unreachable(unreachable(
                "an invocation",
                failure,
                within,
            ))),
        }
    }

    /// `GET /v1.0/state/{store}/{key}`: the value and its ETag, `None` when absent.
    pub async fn get_state(
        &self,
        store: &str,
        key: &str,
        within: Duration,
    ) -> Result<Option<(Value, Option<String>)>, BridgeError> {
        let answer = self
            .call(
                "a state read",
                Method::GET,
                &format!("/v1.0/state/{store}/{key}"),
                None,
                within,
            )
            .await?;
        let status = answer.status;
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(BridgeError::Broker(format!(
                "the Dapr state store {store} failed a read ({status})"
            )));
        }
        let etag = answer
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim_matches('"').to_string());
        if answer.body.is_empty() {
            return Ok(None);
        }
        let value = serde_json::from_slice(&answer.body)
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
        let body = serde_json::to_vec(&[item])
            .map_err(|e| BridgeError::InvalidRequest(format!("state {key}: {e}")))?;
        let answer = self
            .call(
                "a state write",
                Method::POST,
                &format!("/v1.0/state/{store}"),
                Some(body),
                within,
            )
            .await?;
        match answer.status {
            s if s.is_success() => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            s => Err(BridgeError::Broker(format!(
                "the Dapr state store {store} failed a write ({s})"
            ))),
        }
    }
}

/// `text` as a URL the client can send to (`http://host:port/path`).
fn parse_url(text: &str) -> Result<Uri, String> {
    let url: Uri = text.parse().map_err(|e| format!("`{text}`: {e}"))?;
    if url.scheme().is_none() || url.host().is_none() {
        return Err(format!("`{text}` is not an absolute URL"));
    }
    Ok(url)
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
            first.to_string(),
            "http://127.0.0.1:3500/v1.0/invoke/orders/method/purista/command"
        );
        assert_eq!(sidecar.invoke_url("orders", "purista/command"), Ok(first));
        let other = sidecar.invoke_url("orders", "echo").expect("a URL");
        assert_eq!(
            other.to_string(),
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
