//! Creating and removing what the bridge needs on AWS, idempotently (a restart finds its
//! queues and rules and goes on): the bus, queues (with tags and the policy that lets exactly
//! one rule send to them), rules and their SQS targets.
//!
//! Removal order matters: a rule whose target queue is gone makes EventBridge fail deliveries
//! (and moto fails the whole `PutEvents`), so a rule's target is removed before its queue.

use std::collections::HashMap;

use aws_sdk_sqs::types::QueueAttributeName;
use purista_core::BridgeError;
use purista_core::kit::broker_call;
use serde_json::json;

use crate::client::{error_code, sdk_error};
use crate::shared::Shared;

/// The id of the single target of every rule the bridge creates.
const TARGET_ID: &str = "purista-queue";
/// What a rule's target puts into its queue: the event's `detail` (the envelope) alone, in
/// `{"detail": …}`, instead of the whole EventBridge event (id, time, source, account, region,
/// resources around it). Smaller messages for SQS to carry and the consumer to parse, and one
/// path for EventBridge to evaluate per delivery instead of the eight of the default event
/// (moto spends most of a `PutEvents` evaluating those). The input transformer's template is
/// JSON with the variable outside quotes, so the object is inserted as JSON.
pub const TARGET_TEMPLATE: &str = r#"{"detail":<detail>}"#;
/// How long SQS keeps a message nobody took (its maximum, 14 days).
const RETENTION_SECONDS: u32 = 14 * 24 * 3600;

/// A queue as the bridge uses it.
#[derive(Debug, Clone)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// Its URL (what SQS calls take).
    pub url: String,
}

/// Creates the bus when it is missing.
pub async fn ensure_bus(shared: &Shared) -> Result<(), BridgeError> {
    let bus = shared.config.bus_name();
    let call = shared.clients.events.create_event_bus().name(bus).send();
    match broker_call(shared.config.call_timeout, "CreateEventBus", async {
        Ok(call.await)
    })
    .await?
    {
        Ok(_) => Ok(()),
        Err(e) if error_code(&e) == Some("ResourceAlreadyExistsException") => Ok(()),
        Err(e) => Err(sdk_error(&format!("creating the event bus {bus}"), e)),
    }
}

/// Creates queue `name` (or finds it) with the given extra attributes and tags.
pub async fn ensure_queue(
    shared: &Shared,
    name: &str,
    attributes: &[(QueueAttributeName, String)],
    tags: &[(&str, String)],
) -> Result<Queue, BridgeError> {
    let mut create = shared
        .clients
        .sqs
        .create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::MessageRetentionPeriod,
            RETENTION_SECONDS.to_string(),
        )
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            shared.config.visibility_timeout.as_secs().to_string(),
        );
    for (k, v) in attributes {
        create = create.attributes(k.clone(), v.clone());
    }
    for (k, v) in tags {
        create = create.tags(*k, v.clone());
    }
    let created = broker_call(shared.config.call_timeout, "CreateQueue", async {
        Ok(create.send().await)
    })
    .await?;
    let url = match created {
        Ok(out) => out.queue_url.unwrap_or_default(),
        // Exists with other attributes (an earlier version's): set the ones asked for.
        Err(e) if error_code(&e).is_some_and(|c| c.contains("QueueAlreadyExists")) => {
            let url = queue_url(shared, name)
                .await?
                .ok_or_else(|| BridgeError::Broker(format!("queue {name} vanished")))?;
            if !attributes.is_empty() {
                let mut set = shared.clients.sqs.set_queue_attributes().queue_url(&url);
                for (k, v) in attributes {
                    set = set.attributes(k.clone(), v.clone());
                }
                let call = set.send();
                broker_call(shared.config.call_timeout, "SetQueueAttributes", async {
                    call.await
                        .map_err(|e| sdk_error(&format!("updating queue {name}"), e))
                })
                .await?;
            }
            url
        }
        Err(e) => return Err(sdk_error(&format!("creating queue {name}"), e)),
    };
    Ok(Queue {
        name: name.to_string(),
        url,
    })
}

/// The URL of queue `name`; `None` when it does not exist.
pub async fn queue_url(shared: &Shared, name: &str) -> Result<Option<String>, BridgeError> {
    let call = shared.clients.sqs.get_queue_url().queue_name(name).send();
    match broker_call(shared.config.call_timeout, "GetQueueUrl", async {
        Ok(call.await)
    })
    .await?
    {
        Ok(out) => Ok(out.queue_url),
        Err(e) if is_missing_queue(error_code(&e)) => Ok(None),
        Err(e) => Err(sdk_error(&format!("looking up queue {name}"), e)),
    }
}

/// Whether an SQS error code says that the queue does not exist.
pub fn is_missing_queue(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist"))
}

/// The queue policy that lets EventBridge send to `queue` for rule `rule_arn` only.
pub fn rule_policy(queue_arn: &str, rule_arn: &str) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "purista-rule",
            "Effect": "Allow",
            "Principal": {"Service": "events.amazonaws.com"},
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": rule_arn}}
        }]
    })
    .to_string()
}

/// A subscription's route: the rule on the bus with `pattern` and its one target, queue
/// `queue_name`, created with the policy that lets that rule (and nothing else) send to it.
/// Three calls: the rule first (its ARN names the partition, region and account, from which
/// the queue's ARN follows), then the queue with its policy, then the target. Idempotent.
pub async fn ensure_route(
    shared: &Shared,
    rule: &str,
    pattern: &serde_json::Value,
    description: &str,
    queue_name: &str,
    tags: &[(&str, String)],
) -> Result<Queue, BridgeError> {
    let bus = shared.config.bus_name();
    let call = shared
        .clients
        .events
        .put_rule()
        .name(rule)
        .event_bus_name(bus)
        .event_pattern(pattern.to_string())
        .description(description)
        .send();
    let rule_arn = broker_call(shared.config.call_timeout, "PutRule", async {
        call.await
            .map_err(|e| sdk_error(&format!("creating rule {rule}"), e))
    })
    .await?
    .rule_arn
    .unwrap_or_default();
    let queue_arn = queue_arn_beside(&rule_arn, queue_name).ok_or_else(|| {
        BridgeError::Broker(format!(
            "EventBridge gave rule {rule} an unexpected ARN `{rule_arn}`"
        ))
    })?;
    let policy = rule_policy(&queue_arn, &rule_arn);
    let queue = ensure_queue(
        shared,
        queue_name,
        &[(QueueAttributeName::Policy, policy)],
        tags,
    )
    .await?;
    let transformer = aws_sdk_eventbridge::types::InputTransformer::builder()
        .input_paths_map("detail", "$.detail")
        .input_template(TARGET_TEMPLATE)
        .build()
        .map_err(|e| BridgeError::InvalidRequest(format!("rule target input: {e}")))?;
    let target = aws_sdk_eventbridge::types::Target::builder()
        .id(TARGET_ID)
        .arn(&queue_arn)
        .input_transformer(transformer)
        .build()
        .map_err(|e| BridgeError::InvalidRequest(format!("rule target: {e}")))?;
    let call = shared
        .clients
        .events
        .put_targets()
        .rule(rule)
        .event_bus_name(bus)
        .targets(target)
        .send();
    let out = broker_call(shared.config.call_timeout, "PutTargets", async {
        call.await
            .map_err(|e| sdk_error(&format!("pointing rule {rule} at its queue"), e))
    })
    .await?;
    if out.failed_entry_count > 0 {
        return Err(BridgeError::Broker(format!(
            "EventBridge refused the queue target of rule {rule}"
        )));
    }
    Ok(queue)
}

/// The ARN of SQS queue `name` in the partition, region and account of `rule_arn`
/// (`arn:<partition>:events:<region>:<account>:rule/…`).
///
/// ```text
/// arn:aws:events:eu-west-1:123456789012:rule/bus/r  →  arn:aws:sqs:eu-west-1:123456789012:q
/// ```
pub fn queue_arn_beside(rule_arn: &str, name: &str) -> Option<String> {
    let mut parts = rule_arn.splitn(6, ':');
    let (arn, partition, service, region, account) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    (arn == "arn" && service == "events" && !account.is_empty())
        .then(|| format!("arn:{partition}:sqs:{region}:{account}:{name}"))
}

/// Removes a rule: its target first, then the rule. A missing rule is fine.
pub async fn remove_rule(shared: &Shared, rule: &str) -> Result<(), BridgeError> {
    if remove_target(shared, rule).await? {
        delete_rule(shared, rule).await?;
    }
    Ok(())
}

/// Removes a rule's target (after which nothing reaches its queue, so the rule and the queue
/// may go in any order, or at once); `false` when the rule does not exist.
pub async fn remove_target(shared: &Shared, rule: &str) -> Result<bool, BridgeError> {
    let bus = shared.config.bus_name();
    let call = shared
        .clients
        .events
        .remove_targets()
        .rule(rule)
        .event_bus_name(bus)
        .ids(TARGET_ID)
        .send();
    match broker_call(shared.config.call_timeout, "RemoveTargets", async {
        Ok(call.await)
    })
    .await?
    {
        Ok(_) => Ok(true),
        Err(e) if error_code(&e) == Some("ResourceNotFoundException") => Ok(false),
        Err(e) => Err(sdk_error(&format!("removing the target of rule {rule}"), e)),
    }
}

/// Deletes a rule whose target is removed. A missing rule is fine.
pub async fn delete_rule(shared: &Shared, rule: &str) -> Result<(), BridgeError> {
    let bus = shared.config.bus_name();
    let call = shared
        .clients
        .events
        .delete_rule()
        .name(rule)
        .event_bus_name(bus)
        .send();
    match broker_call(shared.config.call_timeout, "DeleteRule", async {
        Ok(call.await)
    })
    .await?
    {
        Ok(_) => Ok(()),
        Err(e) if error_code(&e) == Some("ResourceNotFoundException") => Ok(()),
        Err(e) => Err(sdk_error(&format!("deleting rule {rule}"), e)),
    }
}

/// Deletes a queue; a missing one is fine.
pub async fn delete_queue(shared: &Shared, url: &str) -> Result<(), BridgeError> {
    let call = shared.clients.sqs.delete_queue().queue_url(url).send();
    match broker_call(shared.config.call_timeout, "DeleteQueue", async {
        Ok(call.await)
    })
    .await?
    {
        Ok(_) => Ok(()),
        Err(e) if is_missing_queue(error_code(&e)) => Ok(()),
        Err(e) => Err(sdk_error("deleting a queue", e)),
    }
}

/// The tags of a queue.
pub async fn queue_tags(
    shared: &Shared,
    url: &str,
) -> Result<HashMap<String, String>, BridgeError> {
    let call = shared.clients.sqs.list_queue_tags().queue_url(url).send();
    let out = broker_call(shared.config.call_timeout, "ListQueueTags", async {
        call.await
            .map_err(|e| sdk_error("reading a queue's tags", e))
    })
    .await?;
    Ok(out.tags.unwrap_or_default())
}

/// The URLs of every queue whose name starts with `start` (all pages).
pub async fn list_queues(shared: &Shared, start: &str) -> Result<Vec<String>, BridgeError> {
    let mut urls = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let call = shared
            .clients
            .sqs
            .list_queues()
            .queue_name_prefix(start)
            .max_results(1000)
            .set_next_token(token.take())
            .send();
        let out = broker_call(shared.config.call_timeout, "ListQueues", async {
            call.await.map_err(|e| sdk_error("listing queues", e))
        })
        .await?;
        urls.extend(out.queue_urls.unwrap_or_default());
        match out.next_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(urls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_arn_follows_from_the_rule_arn() {
        assert_eq!(
            queue_arn_beside("arn:aws:events:eu-west-1:123456789012:rule/bus/r", "q").as_deref(),
            Some("arn:aws:sqs:eu-west-1:123456789012:q")
        );
        assert_eq!(queue_arn_beside("nonsense", "q"), None);
    }
}
