//! Per-instance queues (reply queues, broadcast subscription queues) die with their instance,
//! but SQS has no auto-delete: an instance that crashes leaves them behind. Each such queue is
//! tagged with its owner and the time its owner last said it is alive ([`heartbeat`] renews
//! it); [`clean_stale`] deletes the queues (and the rules feeding them) of owners silent for
//! longer than [`AwsConfig::stale_after`](crate::AwsConfig::stale_after). The bridge runs
//! both on a timer; operators call [`AwsBridge::clean_stale_queues`](crate::AwsBridge::clean_stale_queues).

use std::sync::Arc;

use purista_core::BridgeError;
use purista_core::kit::broker_call;

use crate::client::sdk_error;
use crate::shared::{Shared, TAG_OWNER, TAG_RULE, TAG_SEEN, now_ms};
use crate::topology;

/// Renews the last-seen tag of `urls` (this instance's own queues).
pub async fn heartbeat(shared: &Shared, urls: &[String]) {
    let now = now_ms().to_string();
    for url in urls {
        let call = shared
            .clients
            .sqs
            .tag_queue()
            .queue_url(url)
            .tags(TAG_SEEN, now.clone())
            .send();
        let tagged = broker_call(shared.config.call_timeout, "TagQueue", async {
            call.await
                .map(|_| ())
                .map_err(|e| sdk_error("renewing a queue's last-seen tag", e))
        })
        .await;
        if let Err(error) = tagged {
            tracing::debug!(%error, "a last-seen tag was not renewed");
        }
    }
}

/// Deletes the per-instance queues under the prefix whose owner has been silent for longer
/// than `stale_after`, with their rules. Returns the queue URLs it deleted.
pub async fn clean_stale(shared: &Arc<Shared>) -> Result<Vec<String>, BridgeError> {
    let horizon = now_ms()
        .saturating_sub(u64::try_from(shared.config.stale_after.as_millis()).unwrap_or(u64::MAX));
    let mut urls = topology::list_queues(shared, &shared.names.reply_queue_start()).await?;
    urls.extend(topology::list_queues(shared, &shared.names.broadcast_queue_start()).await?);
    let mut deleted = Vec::new();
    for url in urls {
        let tags = match topology::queue_tags(shared, &url).await {
            Ok(t) => t,
            Err(error) => {
                tracing::debug!(%error, "a queue's tags could not be read; it is left alone");
                continue;
            }
        };
        let Some(owner) = tags.get(TAG_OWNER) else {
            continue;
        };
        if owner == &shared.instance_id {
            continue;
        }
        let seen = tags
            .get(TAG_SEEN)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if seen >= horizon {
            continue;
        }
        if let Some(rule) = tags.get(TAG_RULE) {
            topology::remove_rule(shared, rule).await?;
        }
        topology::delete_queue(shared, &url).await?;
        tracing::info!(queue = %url, owner = %owner, "deleted the queue of an instance that is gone");
        deleted.push(url);
    }
    Ok(deleted)
}
