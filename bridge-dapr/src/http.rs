//! The HTTP/1 client the bridge talks to its sidecar with: hyper's pooled client over plain
//! TCP, each answer read whole and the whole exchange bounded by a deadline.
//!
//! Why not reqwest, which wraps this same client: reqwest prints every request's URL and parses
//! it again for its redirect policy, and moves each request through a few more layers. On an
//! invocation that was about a tenth of the caller's instructions. The sidecar is one address
//! on plain HTTP that never redirects, so nothing of that is needed here.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Idle connections kept to the sidecar: as many as requests a busy app has in flight.
const IDLE_CONNECTIONS_KEPT: usize = 256;

/// A sidecar's answer, read whole.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// Why an exchange brought no answer.
#[derive(Debug)]
pub enum Failure {
    /// The deadline passed first.
    Timeout,
    /// The sidecar could not be reached or broke off; the text says why, causes included.
    Failed(String),
}

/// A pooled HTTP/1 client.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpClient {
    /// A client with its own connection pool; requests go out with `TCP_NODELAY` (small
    /// request and answer pairs would wait for delayed acknowledgements otherwise).
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_CONNECTIONS_KEPT)
            .build(connector);
        HttpClient { client }
    }

    /// Sends `request` and reads the whole answer, all within `within`.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
        within: Duration,
    ) -> Result<Answer, Failure> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| failed(&e))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|e| failed(&e))?.to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(within, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }
}

/// The error's text with its causes (hyper's own text alone says little, e.g. "client error
/// (Connect)"). No credentials travel in it: the URL has none, headers are not printed.
fn failed(e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    Failure::Failed(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_fails_with_the_cause_and_a_silent_server_times_out() {
        // A port nothing listens on (bound, then released).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = closed.local_addr().expect("its address").port();
        drop(closed);
        let client = HttpClient::new();
        let request = |port: u16| {
            Request::get(format!("http://127.0.0.1:{port}/v1.0/healthz"))
                .body(Full::new(Bytes::new()))
                .expect("a request")
        };
        match client.send(request(port), Duration::from_secs(5)).await {
            Err(Failure::Failed(text)) => assert!(
                text.to_lowercase().contains("connect"),
                "the cause is named: {text}"
            ),
            other => panic!("expected a connect failure, got {other:?}"),
        }
        // A server that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a listener");
        let port = silent.local_addr().expect("its address").port();
        let held = tokio::spawn(async move {
            let (connection, _) = silent.accept().await.expect("a connection");
            std::future::pending::<()>().await;
            drop(connection);
        });
        let answer = client.send(request(port), Duration::from_millis(200)).await;
        assert!(matches!(answer, Err(Failure::Timeout)), "{answer:?}");
        held.abort();
    }
}
