//! One queue, one config, across every bridge instance: the first declaration of a queue is
//! the one in force (core's rule, [`QueueDeclaration::check_redeclaration`]).
//!
//! SQS has no place for a queue's lifecycle settings, so the bridge keeps them as tags of the
//! job queue, one tag per setting (a tag value holds 256 characters; the whole declaration as
//! JSON would not fit). A declaring instance reads the tags; when they hold no declaration it
//! writes its own and reads again, so it compares with what the queue holds. Two instances
//! declaring a new queue in the same instant may both find it untagged: the last write is then
//! in force and both read it (SQS has no conditional tag write).

use std::collections::HashMap;
use std::time::Duration;

use purista_core::queue::{QueueConfig, QueueDeclaration, QueueError, RetryStrategy};

use super::calls::Sqs;
use super::record::cut;

const DECLARED_BY: &str = "purista-declared-by";
const VISIBILITY: &str = "purista-visibility-timeout";
const EXTENSIONS: &str = "purista-max-lease-extensions";
const AUTO_HEARTBEAT: &str = "purista-auto-heartbeat";
const HEARTBEAT: &str = "purista-heartbeat-interval";
const ATTEMPTS: &str = "purista-max-attempts";
const WINDOW: &str = "purista-retry-window";
const RETRY: &str = "purista-retry";
const DEAD_LETTER_QUEUE: &str = "purista-dead-letter-queue";
/// SQS's longest tag value.
const MAX_TAG_VALUE: usize = 256;

fn duration(d: Duration) -> String {
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

fn parse_duration(text: &str) -> Option<Duration> {
    let (secs, nanos) = text.split_once('.')?;
    Some(Duration::new(secs.parse().ok()?, nanos.parse().ok()?))
}

/// The tags that store `declaration`.
pub fn to_tags(declaration: &QueueDeclaration) -> HashMap<String, String> {
    let c = &declaration.config;
    let r = &c.retry;
    let mut tags = HashMap::from([
        (
            DECLARED_BY.to_string(),
            cut(&declaration.declared_by, MAX_TAG_VALUE),
        ),
        (VISIBILITY.to_string(), duration(c.visibility_timeout)),
        (EXTENSIONS.to_string(), c.max_lease_extensions.to_string()),
        (AUTO_HEARTBEAT.to_string(), c.auto_heartbeat.to_string()),
        (HEARTBEAT.to_string(), duration(c.heartbeat_interval)),
        (ATTEMPTS.to_string(), c.max_attempts.to_string()),
        (WINDOW.to_string(), duration(c.retry_window)),
        (
            RETRY.to_string(),
            format!(
                "{} {} {} {}",
                r.initial_delay_ms, r.max_delay_ms, r.multiplier, r.jitter_factor
            ),
        ),
    ]);
    if let Some(dlq) = &c.dead_letter_queue {
        tags.insert(DEAD_LETTER_QUEUE.to_string(), dlq.clone());
    }
    tags
}

/// The declaration stored in `tags`; `None` when they hold none, an error when they hold a
/// broken one.
pub fn from_tags(
    queue: &str,
    tags: &HashMap<String, String>,
) -> Result<Option<QueueDeclaration>, QueueError> {
    let Some(declared_by) = tags.get(DECLARED_BY) else {
        return Ok(None);
    };
    let broken = |name: &str| {
        QueueError::Broker(format!(
            "job queue `{queue}` has a broken declaration tag `{name}`"
        ))
    };
    let get = |name: &str| tags.get(name).ok_or_else(|| broken(name));
    let duration_of =
        |name: &str| get(name).and_then(|v| parse_duration(v).ok_or_else(|| broken(name)));
    let number = |name: &str| get(name).and_then(|v| v.parse::<u32>().map_err(|_| broken(name)));
    let retry: Vec<&str> = get(RETRY)?.split(' ').collect();
    let [initial, max, multiplier, jitter] = retry.as_slice() else {
        return Err(broken(RETRY));
    };
    let retry = RetryStrategy {
        initial_delay_ms: initial.parse().map_err(|_| broken(RETRY))?,
        max_delay_ms: max.parse().map_err(|_| broken(RETRY))?,
        multiplier: multiplier.parse().map_err(|_| broken(RETRY))?,
        jitter_factor: jitter.parse().map_err(|_| broken(RETRY))?,
    };
    let config = QueueConfig {
        visibility_timeout: duration_of(VISIBILITY)?,
        max_lease_extensions: number(EXTENSIONS)?,
        auto_heartbeat: get(AUTO_HEARTBEAT)?
            .parse()
            .map_err(|_| broken(AUTO_HEARTBEAT))?,
        heartbeat_interval: duration_of(HEARTBEAT)?,
        max_attempts: number(ATTEMPTS)?,
        retry_window: duration_of(WINDOW)?,
        retry,
        dead_letter_queue: tags.get(DEAD_LETTER_QUEUE).cloned(),
    };
    Ok(Some(QueueDeclaration::new(declared_by.clone(), config)))
}

/// The declaration in force for the job queue at `url`, storing `ours` when it has none.
pub async fn first_declaration(
    sqs: &Sqs,
    queue: &str,
    url: &str,
    ours: &QueueDeclaration,
) -> Result<QueueDeclaration, QueueError> {
    if let Some(first) = from_tags(queue, &sqs.tags(url).await?)? {
        return Ok(first);
    }
    sqs.tag(url, to_tags(ours)).await?;
    from_tags(queue, &sqs.tags(url).await?)?.ok_or_else(|| {
        QueueError::Broker(format!(
            "job queue `{queue}` lost the declaration just stored"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declaration_survives_its_tags() {
        let declaration = QueueDeclaration::new(
            "mailer@1",
            QueueConfig {
                visibility_timeout: Duration::from_millis(200),
                retry: RetryStrategy {
                    initial_delay_ms: 50,
                    max_delay_ms: 1_000,
                    multiplier: 1.5,
                    jitter_factor: 0.1,
                },
                dead_letter_queue: Some("failed-mails".into()),
                ..QueueConfig::default()
            },
        );
        let tags = to_tags(&declaration);
        assert!(tags.values().all(|v| v.len() <= MAX_TAG_VALUE));
        assert_eq!(from_tags("q", &tags).unwrap(), Some(declaration));
        assert_eq!(from_tags("q", &HashMap::new()).unwrap(), None);
    }

    #[test]
    fn a_broken_declaration_tag_is_an_error_naming_it() {
        let mut tags = to_tags(&QueueDeclaration::new("a@1", QueueConfig::default()));
        tags.insert(RETRY.to_string(), "1 2".into());
        let err = from_tags("emails", &tags).unwrap_err();
        assert!(err.to_string().contains(RETRY), "{err}");
    }
}
