//! The app server the sidecar calls: subscription discovery (`GET /dapr/subscribe`), topic
//! deliveries (`POST /purista/message`), dead letters (`POST /purista/dead-letter`, see
//! [`crate::dead_letters`]), service invocation of commands
//! (`POST /purista/command`) and the app's own health (`GET /healthz`).
//!
//! Every request but the health check must carry the app token (`dapr-api-token`, Dapr's
//! `APP_API_TOKEN`) when one is configured: without it the answer is 401 and no handler runs.
//! Bodies over the limit are refused with 413 before anything is parsed.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use purista_core::inflight::WorkKind;
use purista_core::kit::{self, endpoint_label};
use purista_core::{Envelope, MessageType};
use serde_json::json;

use crate::cloudevent::{self, CLOUDEVENT_CONTENT_TYPE};
use crate::copies;
use crate::shared::Shared;

/// Path of topic deliveries.
pub const MESSAGE_ROUTE: &str = "/purista/message";
/// Path of the dead-letter topic's deliveries.
pub const DEAD_LETTER_ROUTE: &str = "/purista/dead-letter";
/// Method (path) of command invocations.
pub const COMMAND_METHOD: &str = "purista/command";
/// Header of both Dapr tokens.
pub const TOKEN_HEADER: &str = "dapr-api-token";

/// The app server's routes.
///
/// The token check and the body limit are extractors ([`AppToken`], [`LimitedBody`]), not
/// layers: a layered router clones its boxed services on every request (about two dozen
/// allocations per request here), an extractor costs nothing until it runs.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/dapr/subscribe", get(subscribe))
        .route(MESSAGE_ROUTE, post(message))
        .route(DEAD_LETTER_ROUTE, post(dead_letter))
        .route(&format!("/{COMMAND_METHOD}"), post(command))
        .route("/healthz", get(|| async { StatusCode::OK }))
        .with_state(shared)
}

/// Constant-time comparison: the time of a refusal tells nothing about the token.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Proof that a request carries the app token, when one is configured: without it the
/// request is answered 401, before its body is read, and no handler runs.
struct AppToken;

impl FromRequestParts<Arc<Shared>> for AppToken {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = shared.config.app_api_token.as_deref() else {
            return Ok(AppToken);
        };
        let given = parts
            .headers
            .get(TOKEN_HEADER)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if same_token(given, expected.as_bytes()) {
            return Ok(AppToken);
        }
        tracing::warn!(
            path = parts.uri.path(),
            "app server refused a request without the right app token"
        );
        Err((StatusCode::UNAUTHORIZED, "missing or wrong dapr-api-token").into_response())
    }
}

/// A request's body, read whole up to the configured payload limit (plus room for the
/// CloudEvent around an envelope); a longer one is answered 413 unread.
struct LimitedBody(Bytes);

impl FromRequest<Arc<Shared>> for LimitedBody {
    type Rejection = Response;

    async fn from_request(request: Request, shared: &Arc<Shared>) -> Result<Self, Self::Rejection> {
        let limit = shared.config.max_payload_bytes + 64 * 1024;
        let limited = http_body_util::Limited::new(request.into_body(), limit);
        match limited.collect().await {
            Ok(body) => Ok(LimitedBody(body.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is longer than {limit} bytes"),
            )
                .into_response()),
            Err(e) => Err((
                StatusCode::BAD_REQUEST,
                format!("the body could not be read: {e}"),
            )
                .into_response()),
        }
    }
}

async fn subscribe(_: AppToken, State(shared): State<Arc<Shared>>) -> Response {
    // The flag first, then the wake-up: `start` checks the flag after it began to wait, so a
    // read between the two is seen one way or the other (the other order lost it, and `start`
    // waited out its connect timeout although the sidecar had read the subscriptions).
    shared
        .subscribe_read_once
        .store(true, std::sync::atomic::Ordering::Release);
    shared.subscribe_read.notify_waiters();
    // What the sidecar gives up on (its resiliency policy's retries spent) goes to the
    // dead-letter topic, which every app records for inspection.
    let dead_letters = shared.dead_letter_topic();
    let mut topics = Vec::with_capacity(2);
    // An app with `events=off` takes no events: the sidecar then delivers it none.
    if shared.config.receive_events {
        topics.push(json!({
            "pubsubname": shared.config.pubsub,
            "topic": shared.topic,
            "routes": { "default": MESSAGE_ROUTE },
            "deadLetterTopic": dead_letters,
        }));
    }
    topics.push(json!({
        "pubsubname": shared.config.pubsub,
        "topic": dead_letters,
        "routes": { "default": DEAD_LETTER_ROUTE },
    }));
    axum::Json(topics).into_response()
}

/// The answer to a delivery, `{"status": …}`: one of Dapr's three fixed bodies, written as
/// the bytes they are (no JSON tree per delivery).
fn reply(status: Status) -> Response {
    let body: &'static str = match status {
        Status::Success => r#"{"status":"SUCCESS"}"#,
        Status::Retry => r#"{"status":"RETRY"}"#,
        Status::Drop => r#"{"status":"DROP"}"#,
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// What the app answers Dapr about a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Done: not delivered again.
    Success,
    /// Delivered again by the resiliency policy.
    Retry,
    /// Not delivered again, nor dead-lettered.
    Drop,
}

/// A request's `Content-Type`, the one header the app server reads (taking the whole
/// `HeaderMap` would copy every header of every request).
struct ContentType(Option<HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for ContentType {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ContentType(
            parts.headers.get(header::CONTENT_TYPE).cloned(),
        ))
    }
}

impl ContentType {
    /// `application/json` or `extra`, parameters (`; charset=…`) and case aside.
    fn is_json(&self, extra: &str) -> bool {
        self.0
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim())
            .is_some_and(|v| {
                v.eq_ignore_ascii_case("application/json") || v.eq_ignore_ascii_case(extra)
            })
    }
}

/// A topic delivery: the envelope goes to every local subscription whose filter matches.
async fn message(
    _: AppToken,
    State(shared): State<Arc<Shared>>,
    content_type: ContentType,
    LimitedBody(body): LimitedBody,
) -> Response {
    if shared.is_closing() {
        // Dapr retries a non-2xx delivery; another instance, or this one after a restart,
        // takes it.
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if !content_type.is_json(CLOUDEVENT_CONTENT_TYPE) {
        shared.count_poison();
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected application/cloudevents+json",
        )
            .into_response();
    }
    let delivered = match cloudevent::unwrap(&body) {
        Ok(d) => d,
        Err(e) => {
            shared.count_poison();
            tracing::warn!(error = %e, "dropped a delivery that is not a PURISTA CloudEvent");
            // DROP: redelivering the same bytes cannot help.
            return reply(Status::Drop);
        }
    };
    match shared
        .dispatch(&delivered.id, Arc::new(delivered.envelope), delivered.retry)
        .await
    {
        crate::subscriptions::Verdict::Done => reply(Status::Success),
        crate::subscriptions::Verdict::Retry => reply(Status::Retry),
    }
}

/// A delivery of the dead-letter topic: kept in the state store for operators.
async fn dead_letter(
    _: AppToken,
    State(shared): State<Arc<Shared>>,
    LimitedBody(body): LimitedBody,
) -> Response {
    if shared.is_closing() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    match crate::dead_letters::record(&shared, &body).await {
        Ok(()) => reply(Status::Success),
        Err(crate::dead_letters::RecordError::NotCloudEvent(e)) => {
            shared.count_poison();
            tracing::warn!(error = %e, "dropped a dead letter that is not a CloudEvent");
            reply(Status::Drop)
        }
        Err(crate::dead_letters::RecordError::Store(e)) => {
            tracing::warn!(error = %e, "a dead letter could not be recorded; the sidecar delivers it again");
            reply(Status::Retry)
        }
    }
}

/// A command through service invocation: the response envelope is the body (status 200; the
/// handler's status travels inside, as DESIGN §3.1 says).
async fn command(
    _: AppToken,
    State(shared): State<Arc<Shared>>,
    content_type: ContentType,
    LimitedBody(body): LimitedBody,
) -> Response {
    if shared.is_closing() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if !content_type.is_json("application/json") {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected application/json",
        )
            .into_response();
    }
    let command = match Envelope::decode_with_limit(&body, shared.config.max_payload_bytes) {
        Ok(c) if c.message_type == MessageType::Command => c,
        Ok(_) => return (StatusCode::BAD_REQUEST, "not a command").into_response(),
        Err(e) => {
            shared.count_poison();
            return (StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    };
    let Some(receiver) = command.receiver.as_ref() else {
        return (StatusCode::BAD_REQUEST, "a command needs a receiver").into_response();
    };
    let label = endpoint_label(receiver);
    let Some(handler) = shared.command_handler(&label) else {
        return (StatusCode::NOT_FOUND, format!("no handler for {label}")).into_response();
    };
    let label: Arc<str> = label.into();
    let _running = shared.tracker.start(WorkKind::Command, &label);
    let command = Arc::new(command);
    // Subscriptions see commands and responses too (DESIGN §3.3): wanted ones travel as copies
    // on the topic, published before the caller gets its answer. Who wants them is read while
    // the handler runs.
    let (wanted, mut response) = futures::join!(
        shared.copy_reads.wanted(&shared),
        handler.handle(command.clone())
    );
    kit::stamp_response(&mut response, &command, &shared.instance_id);
    let publish = async |message: &Envelope| {
        if copies::is_wanted(&wanted, message) {
            shared.publish_copy(message).await
        } else {
            Ok(())
        }
    };
    let (c, r) = futures::join!(publish(&command), publish(&response));
    for e in [c, r].into_iter().filter_map(Result::err) {
        tracing::warn!(error = %e, endpoint = %label, "a copy of a command or response for subscriptions was not published");
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        response.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivery_answers_are_the_status_objects_dapr_reads() {
        for (status, text) in [
            (Status::Success, "SUCCESS"),
            (Status::Retry, "RETRY"),
            (Status::Drop, "DROP"),
        ] {
            let response = reply(status);
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.headers().get(header::CONTENT_TYPE).unwrap(),
                "application/json"
            );
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body, json!({ "status": text }));
        }
    }

    #[test]
    fn a_json_content_type_is_recognised_whatever_its_case_and_parameters() {
        let of = |v: Option<&'static str>| ContentType(v.map(HeaderValue::from_static));
        assert!(of(Some("application/json")).is_json("application/json"));
        assert!(of(Some("Application/JSON; charset=utf-8")).is_json("application/json"));
        assert!(
            of(Some("application/cloudevents+json")).is_json(CLOUDEVENT_CONTENT_TYPE),
            "the extra type"
        );
        assert!(of(Some("application/json")).is_json(CLOUDEVENT_CONTENT_TYPE));
        assert!(!of(Some("text/plain")).is_json("application/json"));
        assert!(!of(Some("application/cloudevents+json")).is_json("application/json"));
        assert!(!of(Some("application/jsonx")).is_json("application/json"));
        assert!(!of(None).is_json("application/json"), "no content type");
    }

    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abd", b"abc"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"", b"abc"));
    }
}
