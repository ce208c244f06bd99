//! Resource names: every queue and rule under the prefix, injectively (two addresses never
//! share a queue or a rule), within SQS's 80 and EventBridge's 64 characters.
//!
//! SQS queue names take letters, digits, `-` and `_`; rule names also `.`. Components are
//! joined with `-` and escaped with `_` ([`NameRules`]); a name over the bound is cut and ends
//! in a hash of the whole name.

use purista_core::kit::{NameRules, Overflow};
use purista_core::{Address, BridgeError, RegistrationKey};

/// Longest SQS queue name.
pub const MAX_QUEUE_NAME: usize = 80;
/// Longest EventBridge rule name.
pub const MAX_RULE_NAME: usize = 64;
/// What ends the name of every dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = "-dead-letter";

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

const QUEUES: NameRules = NameRules {
    separator: '-',
    escape: '_',
    allowed,
    max_len: MAX_QUEUE_NAME,
    overflow: Overflow::Hash,
};

const RULES: NameRules = NameRules {
    max_len: MAX_RULE_NAME,
    ..QUEUES
};

/// The names of one deployment (one prefix).
#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix` (validated by the config).
    pub fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_string(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn queue(&self, parts: &[&str]) -> Result<String, BridgeError> {
        QUEUES.join(&self.prefix, parts)
    }

    /// The command queue of an endpoint (every instance serving it competes on it).
    pub fn command_queue(&self, a: &Address) -> Result<String, BridgeError> {
        self.queue(&["c", &a.service_name, &a.service_version, &a.service_target])
    }

    /// The reply queue of a bridge instance.
    pub fn reply_queue(&self, instance_id: &str) -> Result<String, BridgeError> {
        self.queue(&["r", instance_id])
    }

    /// What every reply queue of the deployment starts with (for the janitor).
    pub fn reply_queue_start(&self) -> String {
        format!("{}-r-", self.prefix)
    }

    /// What every broadcast queue of the deployment starts with (for the janitor).
    pub fn broadcast_queue_start(&self) -> String {
        format!("{}-b-", self.prefix)
    }

    /// The queue of a subscription: one per registration when shared, one per registration and
    /// instance when broadcast.
    pub fn subscription_queue(
        &self,
        key: &RegistrationKey,
        instance: Option<&str>,
    ) -> Result<String, BridgeError> {
        match instance {
            None => self.queue(&["s", key.as_str()]),
            Some(i) => self.queue(&["b", i, key.as_str()]),
        }
    }

    /// The rule that feeds a subscription queue, named like it (within 64 characters).
    pub fn rule(
        &self,
        key: &RegistrationKey,
        instance: Option<&str>,
    ) -> Result<String, BridgeError> {
        match instance {
            None => RULES.join(&self.prefix, &["s", key.as_str()]),
            Some(i) => RULES.join(&self.prefix, &["b", i, key.as_str()]),
        }
    }

    /// The SQS queue of job queue `queue` (its dead-letter queue is a job queue too, by its
    /// own name): `<prefix>-q-<queue>`. A name that does not fit SQS's 80 characters is
    /// refused ([`BridgeError::InvalidRequest`] naming the queue and the limit), never cut: an
    /// operator looking for a job queue finds it under its own name.
    pub fn job_queue(&self, queue: &str) -> Result<String, BridgeError> {
        if queue.is_empty() {
            return Err(BridgeError::InvalidRequest("empty job queue name".into()));
        }
        QUEUES
            .on_overflow(Overflow::Reject)
            .join(&self.prefix, &["q", queue])
            .map_err(|_| {
                BridgeError::InvalidRequest(format!(
                    "job queue `{queue}` does not fit SQS's {MAX_QUEUE_NAME} characters as `{}-q-{}`",
                    self.prefix,
                    QUEUES.component(queue)
                ))
            })
    }

    /// The dead-letter queue of a dead-letter target: `<prefix>-d-<target>-dead-letter`.
    pub fn dead_letter_queue(&self, target: &str) -> Result<String, BridgeError> {
        let base = QUEUES
            .on_overflow(Overflow::Hash)
            .join(&self.prefix, &["d", target])?;
        let room = MAX_QUEUE_NAME - DEAD_LETTER_SUFFIX.len();
        let base = if base.len() > room {
            NameRules {
                max_len: room,
                ..QUEUES
            }
            .fit(base)?
        } else {
            base
        };
        Ok(format!("{base}{DEAD_LETTER_SUFFIX}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_addresses_get_different_queues() {
        let n = Names::new("p");
        let a = n
            .command_queue(&Address::new("orders-v2", "1", "get"))
            .unwrap();
        let b = n
            .command_queue(&Address::new("orders", "v2-1", "get"))
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn job_queues_are_named_under_the_prefix_or_refused_when_too_long() {
        let n = Names::new("shop");
        assert_eq!(n.job_queue("emails").unwrap(), "shop-q-emails");
        assert_ne!(
            n.job_queue("a.b").unwrap(),
            n.job_queue("a-b").unwrap(),
            "two job queues share an SQS queue"
        );
        let fits = "j".repeat(MAX_QUEUE_NAME - "shop-q-".len());
        assert_eq!(n.job_queue(&fits).unwrap().len(), MAX_QUEUE_NAME);
        let err = n.job_queue(&format!("{fits}j")).unwrap_err();
        assert!(
            matches!(&err, BridgeError::InvalidRequest(m) if m.contains("80 characters")),
            "{err}"
        );
        assert!(matches!(
            n.job_queue(""),
            Err(BridgeError::InvalidRequest(_))
        ));
    }

    #[test]
    fn long_names_fit_the_limits() {
        let n = Names::new("prefix");
        let key = RegistrationKey::new(&"s".repeat(70), "1.0.0", &"x".repeat(70));
        let id = "0123456789abcdef0123456789abcdef";
        assert!(n.subscription_queue(&key, Some(id)).unwrap().len() <= MAX_QUEUE_NAME);
        assert!(n.rule(&key, Some(id)).unwrap().len() <= MAX_RULE_NAME);
        let dl = n.dead_letter_queue(&"t".repeat(100)).unwrap();
        assert!(
            dl.len() <= MAX_QUEUE_NAME && dl.ends_with(DEAD_LETTER_SUFFIX),
            "{dl}"
        );
    }
}
