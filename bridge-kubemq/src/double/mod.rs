//! An in-repo KubeMQ server double: the subset of KubeMQ's gRPC protocol the bridge uses, on
//! the `kubemq` crate's own generated server trait, for tests and benchmarks on machines where
//! no KubeMQ server can run (KubeMQ ships only as a container image).
//!
//! It implements the documented semantics of each pattern — Events fan-out, groups and
//! wildcards ([`pubsub`]); Events Store sequences and start positions ([`pubsub`]); commands
//! and queries with their mandatory timeout and responder groups ([`requests`]); queues with
//! delays, expiry, `MaxReceiveCount` dead-lettering, transactional downstream polls and
//! visibility leases ([`queues`]); and the auth token. It is checked against KubeMQ's own
//! Python SDK (`tests/sdk_double.rs`), so it is more than our own reading of the protocol.
//!
//! The server runs on a runtime of its own, so that [`KubemqDouble::stop`] really cuts every
//! connection like a dying broker does, while the stored events and queues live on in this
//! process and are there again after [`KubemqDouble::start_again`], like a broker's disk.

// The generated server trait answers with `tonic::Status` (176 bytes); the helpers speak its
// language rather than box it on every call.
#![allow(clippy::result_large_err)]

mod lease_stream;
mod pubsub;
mod queues;
mod requests;
mod service;
mod wildcard;

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

pub use queues::QueueDepth;
pub use requests::TIMEOUT_TEXT;
pub use wildcard::matches as channel_matches;

/// How the double is set up.
#[derive(Debug, Clone, Default)]
pub struct DoubleOptions {
    /// When set, every call but `Ping` must carry this token in its `authorization` metadata
    /// (`UNAUTHENTICATED` otherwise), as KubeMQ does with authentication enabled.
    pub auth_token: Option<String>,
}

/// What the server keeps across a restart.
pub(crate) struct State {
    pub pubsub: pubsub::PubSub,
    pub requests: requests::Requests,
    pub queues: queues::Queues,
    pub auth_token: Option<String>,
    pub started_at: i64,
}

/// A running (or stopped) KubeMQ double on a fixed loopback port.
pub struct KubemqDouble {
    state: Arc<State>,
    address: SocketAddr,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl std::fmt::Debug for KubemqDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubemqDouble")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl KubemqDouble {
    /// Starts a double on a free port of 127.0.0.1.
    pub fn start(options: DoubleOptions) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("a socket address"), options)
    }

    /// Starts a double on `address` (port 0 = any free port).
    pub fn start_on(address: SocketAddr, options: DoubleOptions) -> std::io::Result<Self> {
        let state = Arc::new(State {
            pubsub: Default::default(),
            requests: Default::default(),
            queues: Default::default(),
            auth_token: options.auth_token,
            started_at: pubsub::now_ns(),
        });
        let listener = std::net::TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let double = KubemqDouble {
            state,
            address,
            runtime: Mutex::new(None),
        };
        double.serve(listener)?;
        Ok(double)
    }

    fn serve(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kubemq-double")
            .enable_all()
            .build()?;
        let state = self.state.clone();
        runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(error) => {
                    tracing::error!(%error, "the KubeMQ double cannot listen");
                    return;
                }
            };
            // Small gRPC frames back and forth: without TCP_NODELAY, Nagle and delayed ACKs
            // add ~40 ms to every request/reply.
            let incoming = futures::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |accepted| {
                    if let Ok(stream) = &accepted {
                        let _ = stream.set_nodelay(true);
                    }
                    accepted
                },
            );
            let result = tonic012::transport::Server::builder()
                .add_service(service::server(state))
                .serve_with_incoming(incoming)
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "the KubeMQ double stopped serving");
            }
        });
        *self.runtime.lock() = Some(runtime);
        Ok(())
    }

    /// `host:port` to connect to.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Stops serving: every connection and stream is cut, new connections are refused. What
    /// is stored (events store, queues) stays for [`KubemqDouble::start_again`].
    pub fn stop(&self) {
        let runtime = self.runtime.lock().take();
        if let Some(runtime) = runtime {
            runtime.shutdown_background();
        }
        self.state.pubsub.disconnect_all();
        self.state.requests.disconnect_all();
        self.state.queues.release_holds();
    }

    /// Serves again on the same port with what was stored before the stop.
    pub fn start_again(&self) -> std::io::Result<()> {
        if self.runtime.lock().is_some() {
            return Ok(());
        }
        // The port was just released; binding again can race the old sockets' close.
        let mut last = None;
        for _ in 0..100 {
            match std::net::TcpListener::bind(self.address) {
                Ok(listener) => return self.serve(listener),
                Err(error) => {
                    last = Some(error);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("cannot bind again")))
    }

    /// Whether it serves right now.
    pub fn is_running(&self) -> bool {
        self.runtime.lock().is_some()
    }

    /// Events stored on an Events Store channel.
    pub fn stored_events(&self, channel: &str) -> usize {
        self.state.pubsub.stored(channel)
    }

    /// Counts of a queue channel.
    pub fn queue_depth(&self, channel: &str) -> QueueDepth {
        self.state.queues.depth(channel)
    }
}

impl Drop for KubemqDouble {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.get_mut().take() {
            runtime.shutdown_background();
        }
    }
}

/// A fresh random id (hex), like KubeMQ assigns to messages sent without one.
pub(crate) fn new_id() -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}
