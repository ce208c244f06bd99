//! The SQS calls of the queue bridge, each bounded by the call timeout, and the one place where
//! an SDK error becomes a [`QueueError`] (no answer, throttling, 5xx: `Unavailable`; anything
//! else: `Broker`).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use purista_core::BridgeError;
use purista_core::kit::millis;
use purista_core::queue::QueueError;

use crate::client::{error_code, sdk_error};

/// SQS's longest delay of a message (15 minutes).
pub const MAX_DELAY_SECONDS: u64 = 15 * 60;
/// SQS's longest visibility timeout (12 hours).
pub const MAX_VISIBILITY_SECONDS: u64 = 12 * 3600;
/// How long SQS keeps a job nobody took (its maximum, 14 days).
const RETENTION_SECONDS: u32 = 14 * 24 * 3600;

/// The SQS client and the deadline of one call.
#[derive(Debug, Clone)]
pub struct Sqs {
    /// The client.
    pub client: aws_sdk_sqs::Client,
    /// Deadline of one call.
    pub timeout: Duration,
}

/// A bridge error as a queue error.
pub fn queue_error(error: BridgeError) -> QueueError {
    match error {
        BridgeError::Unavailable(m) => QueueError::Unavailable(m),
        BridgeError::InvalidRequest(m) => QueueError::InvalidRequest(m),
        other => QueueError::Broker(other.to_string()),
    }
}

fn sdk<E, R>(context: &str, error: SdkError<E, R>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    queue_error(sdk_error(context, error))
}

/// The whole seconds SQS delays a message due in `delay` (never more than 15 minutes: the
/// receiving instance sends the rest on).
pub fn delay_seconds(delay: Duration) -> i32 {
    i32::try_from(delay.as_secs().min(MAX_DELAY_SECONDS)).unwrap_or(0)
}

/// Whole seconds covering `d` (rounded up, at least 1, at most 12 hours).
pub fn covering_seconds(d: Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(secs.clamp(1, MAX_VISIBILITY_SECONDS)).unwrap_or(1)
}

impl Sqs {
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(QueueError::Unavailable(format!(
                    "SQS did not answer {what} within {} ms",
                    millis(self.timeout)
                )))
            })
    }

    /// Creates queue `name` (or finds it); returns its URL.
    pub async fn ensure_queue(&self, name: &str) -> Result<String, QueueError> {
        let create = self
            .client
            .create_queue()
            .queue_name(name)
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                RETENTION_SECONDS.to_string(),
            )
            .send();
        self.bounded("CreateQueue", async {
            match create.await {
                Ok(out) => Ok(out.queue_url.unwrap_or_default()),
                // Exists with other attributes (made by hand, or an older version): use it.
                Err(e) if error_code(&e).is_some_and(|c| c.contains("QueueAlreadyExists")) => {
                    let out = self
                        .client
                        .get_queue_url()
                        .queue_name(name)
                        .send()
                        .await
                        .map_err(|e| sdk(&format!("looking up job queue {name}"), e))?;
                    Ok(out.queue_url.unwrap_or_default())
                }
                Err(e) => Err(sdk(&format!("creating job queue {name}"), e)),
            }
        })
        .await
    }

    /// Sends `body` to the queue at `url`, delayed by SQS for `delay_seconds`.
    pub async fn send(
        &self,
        url: &str,
        body: String,
        delay_seconds: i32,
    ) -> Result<(), QueueError> {
        let call = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(body)
            .delay_seconds(delay_seconds)
            .send();
        self.bounded("SendMessage", async {
            call.await.map(|_| ()).map_err(|e| sdk("sending a job", e))
        })
        .await
    }

    /// Sends a body with string message attributes (a dead letter that is no job).
    pub async fn send_with_attributes(
        &self,
        url: &str,
        body: String,
        attributes: &[(&str, String)],
    ) -> Result<(), QueueError> {
        let mut send = self.client.send_message().queue_url(url).message_body(body);
        for (name, value) in attributes {
            let value = crate::receive::attr(value.clone()).map_err(queue_error)?;
            send = send.message_attributes(*name, value);
        }
        let call = send.send();
        self.bounded("SendMessage", async {
            call.await
                .map(|_| ())
                .map_err(|e| sdk("sending a dead letter", e))
        })
        .await
    }

    /// Deletes a received message.
    pub async fn delete(&self, url: &str, receipt: &str) -> Result<(), QueueError> {
        let call = self
            .client
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send();
        self.bounded("DeleteMessage", async {
            call.await.map(|_| ()).map_err(|e| sdk("deleting a job", e))
        })
        .await
    }

    /// Hides a received message for `seconds` from now.
    pub async fn change_visibility(
        &self,
        url: &str,
        receipt: &str,
        seconds: i32,
    ) -> Result<(), QueueError> {
        let call = self
            .client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt)
            .visibility_timeout(seconds)
            .send();
        self.bounded("ChangeMessageVisibility", async {
            call.await
                .map(|_| ())
                .map_err(|e| sdk("changing a job's visibility", e))
        })
        .await
    }

    /// Receives up to `max` messages, waiting up to `wait_seconds`, hidden for `visibility`
    /// seconds, with their receive count and message attributes.
    pub async fn receive(
        &self,
        url: &str,
        max: i32,
        wait_seconds: i32,
        visibility: i32,
    ) -> Result<Vec<Message>, QueueError> {
        let call = self
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait_seconds)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send();
        let long_poll = Duration::from_secs(u64::try_from(wait_seconds).unwrap_or(0));
        tokio::time::timeout(self.timeout + long_poll, async {
            call.await
                .map(|out| out.messages.unwrap_or_default())
                .map_err(|e| sdk("receiving jobs", e))
        })
        .await
        .unwrap_or_else(|_| {
            Err(QueueError::Unavailable(format!(
                "SQS did not answer ReceiveMessage within {} ms",
                millis(self.timeout + long_poll)
            )))
        })
    }

    /// The counts SQS keeps of a queue: (visible, in flight, delayed).
    pub async fn counts(&self, url: &str) -> Result<(usize, usize, usize), QueueError> {
        let call = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send();
        let attributes = self
            .bounded("GetQueueAttributes", async {
                call.await
                    .map(|out| out.attributes.unwrap_or_default())
                    .map_err(|e| sdk("reading a job queue's counts", e))
            })
            .await?;
        let count = |name: QueueAttributeName| {
            attributes
                .get(&name)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
        };
        Ok((
            count(QueueAttributeName::ApproximateNumberOfMessages),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
            count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        ))
    }

    /// The tags of the queue at `url`.
    pub async fn tags(&self, url: &str) -> Result<HashMap<String, String>, QueueError> {
        let call = self.client.list_queue_tags().queue_url(url).send();
        self.bounded("ListQueueTags", async {
            call.await
                .map(|out| out.tags.unwrap_or_default())
                .map_err(|e| sdk("reading a job queue's declaration", e))
        })
        .await
    }

    /// Tags the queue at `url`.
    pub async fn tag(&self, url: &str, tags: HashMap<String, String>) -> Result<(), QueueError> {
        let call = self
            .client
            .tag_queue()
            .queue_url(url)
            .set_tags(Some(tags))
            .send();
        self.bounded("TagQueue", async {
            call.await
                .map(|_| ())
                .map_err(|e| sdk("storing a job queue's declaration", e))
        })
        .await
    }
}

impl Sqs {
    /// Makes received messages visible again at once (read, not taken).
    pub async fn release(&self, url: &str, receipts: &[String]) {
        for chunk in receipts.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, receipt)| {
                    aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(0)
                        .build()
                        .ok()
                })
                .collect();
            let call = self
                .client
                .change_message_visibility_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send();
            let released = self
                .bounded("ChangeMessageVisibilityBatch", async {
                    call.await
                        .map(|_| ())
                        .map_err(|e| sdk("releasing dead letters", e))
                })
                .await;
            if let Err(error) = released {
                tracing::debug!(%error, "dead letters read could not be released; they reappear after their visibility timeout");
            }
        }
    }
}

/// SQS's receive count of a received message (1 when absent).
pub fn receive_count(message: &Message) -> u32 {
    message
        .attributes
        .as_ref()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_and_visibilities_become_whole_seconds_within_sqs_bounds() {
        assert_eq!(delay_seconds(Duration::from_millis(999)), 0);
        assert_eq!(delay_seconds(Duration::from_millis(2_500)), 2);
        assert_eq!(delay_seconds(Duration::from_secs(3_600)), 900);
        assert_eq!(covering_seconds(Duration::from_millis(200)), 1);
        assert_eq!(covering_seconds(Duration::from_millis(1_001)), 2);
        assert_eq!(covering_seconds(Duration::from_secs(86_400)), 43_200);
    }
}
