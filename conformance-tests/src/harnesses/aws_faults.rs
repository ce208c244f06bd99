//! A fault-injecting HTTP proxy between the AWS SDK and moto: the `aws` harness's broker
//! control (DESIGN §5, issue 10).
//!
//! AWS does not restart in front of its clients the way a RabbitMQ node does; what a client of
//! EventBridge and SQS meets is connections cut, endpoints that refuse for a while, throttling,
//! 5xx answers and slow answers. The proxy forwards every request to moto unchanged (moto keeps
//! its state, as AWS does) and, on command, produces each of those:
//!
//! * [`FaultProxy::drop_connections`] cuts every open connection: requests in flight (a long
//!   poll, a publish) end without an answer, as on a network fault.
//! * [`FaultProxy::outage`] refuses connections for a moment (the listener is closed), then
//!   answers a schedule of faults, one after another: 503 `ServiceUnavailable`, 400
//!   `ThrottlingException`, connections cut without an answer, 500 `InternalFailure`, and
//!   answers held back [`SLOW_ANSWER`] each, before it forwards normally again.
//!
//! It also counts the calls it forwarded by action and queue ([`FaultProxy::calls`]): what a
//! bridge costs on AWS, which bills per request.
//!
//! Errors are worded as the AWS JSON protocols (EventBridge's and SQS's) word them: an
//! `x-amzn-ErrorType` header and a `__type` in the body, so the SDK classifies them as it
//! would classify AWS's own (throttling and 5xx are retried by the SDK, then reach the bridge).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

/// How long the listener stays closed in an [`FaultProxy::outage`].
pub const REFUSED_FOR: Duration = Duration::from_secs(2);
/// How long an answer is held back in the slow step of an outage.
pub const SLOW_ANSWER: Duration = Duration::from_millis(1_500);
/// The steps an outage answers after its refusal, each for its duration, in this order.
pub const OUTAGE_STEPS: [(Fault, Duration); 5] = [
    (Fault::Unavailable, Duration::from_secs(1)),
    (Fault::Throttled, Duration::from_secs(1)),
    (Fault::Cut, Duration::from_millis(500)),
    (Fault::Internal, Duration::from_millis(500)),
    (Fault::Slow(SLOW_ANSWER), Duration::from_secs(2)),
];

/// What the proxy does to a request while a fault is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 503 `ServiceUnavailable`.
    Unavailable,
    /// 400 `ThrottlingException`.
    Throttled,
    /// 500 `InternalFailure`.
    Internal,
    /// The connection is closed without an answer.
    Cut,
    /// Forwarded, but the answer is held back this long.
    Slow(Duration),
}

/// How many requests met each fault (and went through unharmed), for a case to show that the
/// faults really struck.
#[derive(Debug, Default)]
pub struct Struck {
    /// Requests forwarded to moto and answered (slow ones included).
    pub forwarded: AtomicU64,
    /// Requests answered with an error or cut by a scheduled fault.
    pub failed: AtomicU64,
    /// Connections cut by [`FaultProxy::drop_connections`] or an outage.
    pub connections_cut: AtomicU64,
}

struct Inner {
    upstream: String,
    client: reqwest::Client,
    /// The scheduled faults: from when until when each applies.
    schedule: Mutex<Vec<(Instant, Instant, Fault)>>,
    connections: Mutex<HashMap<u64, AbortHandle>>,
    next_connection: AtomicU64,
    struck: Struck,
    /// Calls forwarded, by action (`X-Amz-Target` after its `.`) and `QueueUrl` (empty for
    /// calls that name none).
    calls: Mutex<HashMap<(String, String), u64>>,
}

/// A proxy on a loopback port in front of one moto server; see the module docs. Dropping it
/// stops it and cuts its connections.
pub struct FaultProxy {
    address: SocketAddr,
    inner: Arc<Inner>,
    accepting: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("address", &self.address)
            .field("upstream", &self.inner.upstream)
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(std::io::Error::other)?;
        let inner = Arc::new(Inner {
            upstream: upstream.trim_end_matches('/').to_string(),
            client,
            schedule: Mutex::default(),
            connections: Mutex::default(),
            next_connection: AtomicU64::new(0),
            struck: Struck::default(),
            calls: Mutex::default(),
        });
        let accepting = tokio::spawn(accept(listener, inner.clone()));
        Ok(FaultProxy {
            address,
            inner,
            accepting: Mutex::new(Some(accepting)),
        })
    }

    /// The endpoint to give the SDK (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// What the faults did so far.
    pub fn struck(&self) -> &Struck {
        &self.inner.struck
    }

    /// Calls of `action` (`ReceiveMessage`, `DeleteMessageBatch`, `PutEvents`, …) forwarded so
    /// far on the queue whose URL ends with `queue` (any queue, and calls without one, when
    /// `queue` is empty).
    pub fn calls(&self, action: &str, queue: &str) -> u64 {
        self.inner
            .calls
            .lock()
            .iter()
            .filter(|((a, url), _)| a == action && url.ends_with(queue))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Cuts every open connection; new ones are taken as before.
    pub fn drop_connections(&self) {
        self.inner.cut_all();
    }

    /// Answers each request with `fault` for `lasting`, from now (after what is scheduled).
    pub fn schedule(&self, fault: Fault, lasting: Duration) {
        let mut schedule = self.inner.schedule.lock();
        let from = schedule
            .last()
            .map_or_else(Instant::now, |(_, until, _)| *until)
            .max(Instant::now());
        schedule.push((from, from + lasting, fault));
    }

    /// An outage: every connection cut and none taken for [`REFUSED_FOR`], then the
    /// [`OUTAGE_STEPS`] one after another. Returns when connections are taken again (the steps
    /// still running, as a broker's restart returns once it accepts connections).
    pub async fn outage(&self) -> std::io::Result<()> {
        if let Some(accepting) = self.accepting.lock().take() {
            accepting.abort();
        }
        self.inner.cut_all();
        tokio::time::sleep(REFUSED_FOR).await;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(self.address)?;
        let listener = socket.listen(1024)?;
        for (fault, lasting) in OUTAGE_STEPS {
            self.schedule(fault, lasting);
        }
        *self.accepting.lock() = Some(tokio::spawn(accept(listener, self.inner.clone())));
        Ok(())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(accepting) = self.accepting.lock().take() {
            accepting.abort();
        }
        self.inner.cut_all();
    }
}

impl Inner {
    fn cut_all(&self) {
        let cut: Vec<AbortHandle> = self.connections.lock().drain().map(|(_, h)| h).collect();
        self.struck
            .connections_cut
            .fetch_add(cut.len() as u64, Ordering::Relaxed);
        for connection in cut {
            connection.abort();
        }
    }

    /// The fault that applies now, if any; forgets the steps that are over.
    fn fault_now(&self) -> Option<Fault> {
        let now = Instant::now();
        let mut schedule = self.schedule.lock();
        schedule.retain(|(_, until, _)| *until > now);
        schedule
            .iter()
            .find(|(from, until, _)| *from <= now && now < *until)
            .map(|(_, _, fault)| *fault)
    }

    async fn answer(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, CutOff> {
        let fault = self.fault_now();
        let failure = match fault {
            Some(Fault::Unavailable) => Some(aws_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "Service is unavailable (fault proxy)",
            )),
            Some(Fault::Throttled) => Some(aws_error(
                StatusCode::BAD_REQUEST,
                "ThrottlingException",
                "Rate exceeded (fault proxy)",
            )),
            Some(Fault::Internal) => Some(aws_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalFailure",
                "Internal failure (fault proxy)",
            )),
            Some(Fault::Cut) => {
                self.struck.failed.fetch_add(1, Ordering::Relaxed);
                return Err(CutOff);
            }
            Some(Fault::Slow(_)) | None => None,
        };
        if let Some(failure) = failure {
            self.struck.failed.fetch_add(1, Ordering::Relaxed);
            return Ok(failure);
        }
        let answered = self.forward(request).await;
        if let Some(Fault::Slow(by)) = fault {
            tokio::time::sleep(by).await;
        }
        self.struck.forwarded.fetch_add(1, Ordering::Relaxed);
        answered
    }

    /// Counts a call by its action and queue.
    fn count(&self, headers: &hyper::HeaderMap, body: &[u8]) {
        let action = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|t| t.rsplit_once('.'))
            .map_or("", |(_, a)| a)
            .to_string();
        let queue = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("QueueUrl")?.as_str().map(str::to_string))
            .unwrap_or_default();
        *self.calls.lock().entry((action, queue)).or_default() += 1;
    }

    /// Sends `request` to moto as it came (method, path, headers, body) and returns moto's
    /// answer as it came. A failure to reach moto cuts the connection, as a dead upstream would.
    async fn forward(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, CutOff> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map_err(|_| CutOff)?.to_bytes();
        self.count(&parts.headers, &body);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let mut outgoing = self
            .client
            .request(parts.method, format!("{}{path}", self.upstream))
            .body(body);
        for (name, value) in &parts.headers {
            if !hop_by_hop(name.as_str()) {
                outgoing = outgoing.header(name, value);
            }
        }
        let answer = outgoing.send().await.map_err(|_| CutOff)?;
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if !hop_by_hop(name.as_str()) && name != "content-length" {
                response = response.header(name, value);
            }
        }
        let bytes = answer.bytes().await.map_err(|_| CutOff)?;
        response.body(Full::new(bytes)).map_err(|_| CutOff)
    }
}

/// Headers that belong to one connection, not to the request.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

/// An error answer as the AWS JSON protocols give it.
fn aws_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "__type": code, "message": message }).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-ErrorType", code)
        .header("x-amzn-RequestId", "fault-proxy")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// A request answered by closing its connection.
#[derive(Debug)]
struct CutOff;

impl std::fmt::Display for CutOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection cut by the fault proxy")
    }
}

impl std::error::Error for CutOff {}

async fn accept(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or the like: a moment, then on.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let id = inner.next_connection.fetch_add(1, Ordering::Relaxed);
        let serving = inner.clone();
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let serving = serving.clone();
                async move { serving.answer(request).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        let handle = task.abort_handle();
        inner.connections.lock().insert(id, handle);
        let registry = inner.clone();
        tokio::spawn(async move {
            let _ = task.await;
            registry.connections.lock().remove(&id);
        });
    }
}
