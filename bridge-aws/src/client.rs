//! The two AWS clients (EventBridge, SQS) of one bridge instance, built by `aws-config`
//! (region, endpoint and credential chain), and the one place where an SDK error becomes a
//! [`BridgeError`].

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use purista_core::{BridgeError, ClientError};

use crate::config::AwsConfig;

/// Both clients, cheap to clone.
#[derive(Clone, Debug)]
pub struct Clients {
    /// EventBridge: bus, rules, targets, PutEvents.
    pub events: aws_sdk_eventbridge::Client,
    /// SQS: queues, messages.
    pub sqs: aws_sdk_sqs::Client,
}

/// Installs one rustls crypto provider for the process: with several TLS users in one binary
/// (the AWS SDK, lapin, tonic) rustls cannot pick one by itself and panics.
pub fn install_crypto_provider() {
    // An error only says that a provider is installed already, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl Clients {
    /// Loads the SDK configuration (environment, profile, credential chain) and builds both
    /// clients. The SDK's own retries (3 attempts, exponential backoff) absorb throttling and
    /// short 5xx bursts; every call is also bounded by [`AwsConfig::call_timeout`].
    pub async fn load(config: &AwsConfig) -> Self {
        install_crypto_provider();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(config.call_timeout)
                    .connect_timeout(Duration::from_secs(3))
                    .build(),
            );
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        if let Some((key, secret)) = &config.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                key.clone(),
                secret.clone(),
                None,
                None,
                "purista-static",
            ));
        }
        let sdk = loader.load().await;
        Clients {
            events: aws_sdk_eventbridge::Client::new(&sdk),
            sqs: aws_sdk_sqs::Client::new(&sdk),
        }
    }
}

/// The AWS error code of a failed call, when AWS answered with one.
pub fn error_code<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> Option<&str> {
    match error {
        SdkError::ServiceError(e) => e.err().code(),
        _ => None,
    }
}

/// Maps an SDK error: no answer, throttling and 5xx are retryable (503 at a caller), anything
/// else is the broker refusing (500).
pub fn sdk_error<E, R>(context: &str, error: SdkError<E, R>) -> BridgeError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let retryable = match &error {
        SdkError::ServiceError(e) => {
            let code = e.err().code().unwrap_or_default();
            code.contains("Throttl")
                || code.contains("RequestLimitExceeded")
                || code.contains("InternalError")
                || code.contains("ServiceUnavailable")
                || code.is_empty()
        }
        _ => true,
    };
    let text = DisplayErrorContext(&error).to_string();
    let context = format!("{context}: {text}");
    if retryable {
        return BridgeError::Unavailable(context);
    }
    BridgeError::Client {
        context,
        source: ClientError::new(error),
        retryable,
    }
}
