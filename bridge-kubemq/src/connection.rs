//! The two ways the bridge talks to KubeMQ, over one configuration:
//!
//! * the `kubemq` crate's high-level [`kubemq::KubemqClient`] for the unary calls (send an
//!   event, a query, a query response, a queue message; ping), with its validation and typed
//!   errors;
//! * the crate's generated gRPC client ([`RawClient`]) for what the high-level API does not
//!   offer: subscriptions whose stream the bridge owns (the high-level API re-subscribes in a
//!   task of its own and gives up silently after a failed re-subscribe, so the bridge could
//!   neither tell that a consumer is down nor when it is back), and queue leases with a
//!   visibility timeout (`StreamQueueMessage`, `ModifyVisibility`).
//!
//! Both carry the auth token in the `authorization` metadata, KubeMQ's header for it. The
//! token is never logged.

use std::time::Duration;

use kubemq::proto::kubemq::kubemq_client::KubemqClient as GeneratedClient;
use kubemq::{KubemqClient, KubemqError, RetryPolicy};
use purista_core::BridgeError;
use tonic012::metadata::{AsciiMetadataValue, MetadataValue};
use tonic012::service::interceptor::InterceptedService;
use tonic012::transport::{Channel, Endpoint};

use crate::config::KubemqConfig;

/// Adds the auth token to every raw call.
#[derive(Clone)]
pub struct AuthToken(Option<AsciiMetadataValue>);

impl tonic012::service::Interceptor for AuthToken {
    fn call(
        &mut self,
        mut request: tonic012::Request<()>,
    ) -> Result<tonic012::Request<()>, tonic012::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// The generated gRPC client with the auth token.
pub type RawClient = GeneratedClient<InterceptedService<Channel, AuthToken>>;

/// Both clients of one bridge instance.
#[derive(Clone)]
pub struct Connection {
    /// The high-level SDK client.
    pub sdk: KubemqClient,
    /// The generated client.
    pub raw: RawClient,
    /// This instance's KubeMQ client id.
    pub client_id: String,
}

impl Connection {
    /// Builds both clients. Connecting is lazy: a KubeMQ that is down makes calls fail (and
    /// the bridge unhealthy), not this.
    pub async fn open(config: &KubemqConfig, client_id: &str) -> Result<Self, BridgeError> {
        let mut builder = KubemqClient::builder()
            .host(config.host.clone())
            .port(config.port)
            .client_id(client_id)
            .connection_timeout(config.connect_timeout)
            .check_connection(false)
            .max_receive_message_size(100 * 1024 * 1024)
            // Queries wait up to their own timeout; the bridge bounds every call itself.
            .rpc_timeout(Duration::from_secs(24 * 3600))
            .retry_policy(RetryPolicy {
                max_retries: 0,
                initial_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(1),
                ..RetryPolicy::default()
            });
        if let Some(token) = &config.auth_token {
            builder = builder.auth_token(token.clone());
        }
        let sdk = builder
            .build()
            .await
            .map_err(|e| sdk_error("connecting to KubeMQ", e))?;
        let token = match &config.auth_token {
            Some(t) => Some(MetadataValue::try_from(t.as_str()).map_err(|_| {
                BridgeError::InvalidRequest("the KubeMQ auth token is not ASCII".into())
            })?),
            None => None,
        };
        let endpoint = Endpoint::from_shared(format!("http://{}", config.address()))
            .map_err(|e| BridgeError::InvalidRequest(format!("KubeMQ address: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        let raw = GeneratedClient::with_interceptor(endpoint.connect_lazy(), AuthToken(token))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Ok(Connection {
            sdk,
            raw,
            client_id: client_id.to_string(),
        })
    }
}

/// A KubeMQ SDK error as a bridge error: what was being done, the SDK's error kept as the
/// source, retryable when the SDK says a retry can help.
pub fn sdk_error(context: &str, error: KubemqError) -> BridgeError {
    let retryable = error.is_retryable()
        || matches!(
            error.code(),
            kubemq::ErrorCode::Transient | kubemq::ErrorCode::Timeout
        );
    BridgeError::client(context, error, retryable)
}
