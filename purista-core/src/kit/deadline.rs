//! Deadlines: every wait a bridge does is bounded (DESIGN §4: "bounds every broker call with a
//! deadline"), and a ttl too large to add to `now` means "no deadline in practice", never a
//! panic.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::BridgeError;

/// How far "practically never" is: a ttl beyond it is cut to it.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + ttl`, or the far future when that does not fit.
///
/// ```
/// use std::time::Duration;
/// let d = purista_core::kit::deadline_after(Duration::MAX); // no overflow panic
/// assert!(d > tokio::time::Instant::now());
/// ```
pub fn deadline_after(ttl: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(ttl).unwrap_or_else(|| now + FAR_FUTURE)
}

/// Whole milliseconds of `d`, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs one broker call with a deadline: past `timeout` it is abandoned and the caller gets
/// [`BridgeError::Unavailable`] naming `what` (503: the broker did not answer in time, which a
/// retry may cure).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// use purista_core::{kit, BridgeError};
/// let stalled = std::future::pending::<Result<(), BridgeError>>();
/// let err = kit::broker_call(Duration::from_millis(5), "publish", stalled).await.unwrap_err();
/// assert!(matches!(err, BridgeError::Unavailable(_)));
/// assert!(err.is_retryable());
/// # }
/// ```
pub async fn broker_call<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = Result<T, BridgeError>>,
) -> Result<T, BridgeError> {
    match tokio::time::timeout_at(deadline_after(timeout), call).await {
        Ok(result) => result,
        Err(_) => Err(BridgeError::Unavailable(format!(
            "the broker did not answer {what} within {} ms",
            millis(timeout)
        ))),
    }
}
