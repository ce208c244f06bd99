//! A subscription stream the bridge owns: opened on the generated client, read until it ends
//! or fails, opened again with backoff (jittered, 50 ms doubling to 2 s) until it is stopped.
//! Whether it is up is published on a watch, so registration can wait for the first opening
//! and health can see a consumer that is down.

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;
use tokio::sync::watch;
use tonic012::{Status, Streaming};

use crate::connection::RawClient;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Opens the stream (a `Subscribe…` call of the generated client).
pub type Open<T> =
    Box<dyn Fn(RawClient) -> BoxFuture<'static, Result<Streaming<T>, Status>> + Send + Sync>;

/// Runs a subscription until `stop` turns true. `on_message` is awaited for each message (it
/// is the backpressure); `up` tells whether the stream is open; `on_reopen` runs when it opens
/// again after a loss.
pub async fn run<T, F, Fut>(
    raw: RawClient,
    open: Open<T>,
    label: String,
    mut on_message: F,
    up: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
    on_reopen: impl Fn(),
) where
    T: Send + 'static,
    F: FnMut(T) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut was_up = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let opened = tokio::select! {
            r = open(raw.clone()) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match opened {
            Ok(mut stream) => {
                if was_up {
                    on_reopen();
                    tracing::info!(subscription = %label, "KubeMQ subscription stream is back");
                }
                was_up = true;
                backoff = FIRST_BACKOFF;
                let _ = up.send(true);
                loop {
                    let next = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    match next {
                        Ok(Some(message)) => on_message(message).await,
                        Ok(None) => {
                            tracing::warn!(subscription = %label, "KubeMQ ended the subscription stream; subscribing again");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(subscription = %label, code = ?status.code(), error = %status.message(), "KubeMQ subscription stream failed; subscribing again");
                            break;
                        }
                    }
                }
                let _ = up.send(false);
            }
            Err(status) => {
                let _ = up.send(false);
                if status.code() == tonic012::Code::Unauthenticated {
                    tracing::error!(subscription = %label, "KubeMQ refused the auth token");
                } else {
                    tracing::debug!(subscription = %label, code = ?status.code(), error = %status.message(), "subscribing to KubeMQ failed");
                }
            }
        }
        let jitter = rand::rng().random_range(0.5..1.0);
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
