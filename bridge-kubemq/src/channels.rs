//! Channel names: how PURISTA addresses and filters become KubeMQ channels.
//!
//! KubeMQ routes Events by channel name, with wildcards in subscriptions (`*` = one token,
//! `>` = the rest). Every message is published on a channel that spells out all of its filter
//! fields, one token each, in a fixed order:
//!
//! ```text
//! <prefix>.e.<messageType>.<eventName>.<principalId>.<tenantId>
//!          .<sender name>.<sender version>.<sender target>.<sender instance>
//!          .<receiver name>.<receiver version>.<receiver target>.<receiver instance>
//! ```
//!
//! and a subscription listens on the same shape with its set fields spelled out and `*` for
//! the others, so KubeMQ itself does all of the filtering. What makes that exact:
//!
//! * each value is escaped injectively ([`NameRules`]): letters, digits and `-` stay, every
//!   other byte becomes `_` and two hex digits, so no value contains `.`, `*`, `>` or a `_`
//!   that is not followed by two hex digits (KubeMQ's SDKs accept only letters, digits and
//!   `. _ - /` in channel names);
//! * an absent value is the token `_` and the empty string `__`, which no escaped value can be;
//! * a value longer than [`TOKEN_MAX`] becomes its head and `_h` + a 64-bit FNV-1a hash of the
//!   whole value (the kit's shortening), which keeps the channel within KubeMQ's 256 characters;
//!   two long values share a token only on a hash collision (about 2⁻⁶⁴), and the reference
//!   matcher, applied once more in the consumer, drops such a message anyway;
//! * info messages are published with an absent receiver, so a filter with a receiver part
//!   never sees them (DESIGN §3.3).
//!
//! Commands are queries on `<prefix>.c.<service>.<version>.<target>` (and the endpoint's
//! hand-off channel `<prefix>.ch.<service>.<version>.<target>`); dead letters are queue
//! messages on `<prefix>.dl.<target>`; a shared subscription's members also listen on its
//! hand-off channel `<prefix>.h.<registration key>`. Job queues are KubeMQ queues on
//! `<prefix>.q.<queue>` (their dead-letter queues too, under the dead-letter queue's name),
//! their declarations Events Store channels `<prefix>.qc.<queue>`.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use purista_core::kit::{NameRules, Overflow};
use purista_core::{Address, BridgeError, Envelope, SubscriptionFilter};

/// KubeMQ's longest channel name.
pub const MAX_CHANNEL_LEN: usize = 256;
/// Longest filter-field token.
pub const TOKEN_MAX: usize = 18;
/// Longest command-address token.
const ADDRESS_TOKEN_MAX: usize = 60;
/// Longest prefix, so that every event channel fits in [`MAX_CHANNEL_LEN`].
pub const MAX_PREFIX_LEN: usize = MAX_CHANNEL_LEN - 2 - 12 * (TOKEN_MAX + 1) - 1;

/// The token of an absent value.
const ABSENT: &str = "_";
/// The token of the empty string.
const EMPTY: &str = "__";
/// The token a readiness probe puts where a pattern has `*` (no value spells it).
const PROBE: &str = "_p";

/// What stays as is in a token: KubeMQ's SDKs accept letters, digits, `.`, `_`, `-`, `/` (and
/// the wildcards) in channel names; `.` separates, `_` escapes.
fn channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

const FIELD_RULES: NameRules = NameRules {
    separator: '.',
    escape: '_',
    allowed: channel_char,
    max_len: TOKEN_MAX,
    overflow: Overflow::Hash,
};

const ADDRESS_RULES: NameRules = NameRules {
    separator: '.',
    escape: '_',
    allowed: channel_char,
    max_len: ADDRESS_TOKEN_MAX,
    overflow: Overflow::Hash,
};

/// Field tokens the cache keeps at most (it starts over when full).
const TOKEN_CACHE_MAX: usize = 4096;

/// Channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Channels {
    prefix: String,
    /// Field tokens that needed escaping or shortening, by value: every message's event
    /// channel spells twelve fields, and the long ones (instance ids, `commandSuccessResponse`,
    /// service names) repeat from message to message.
    tokens: Arc<TokenCache>,
}

#[derive(Default)]
struct TokenCache(Mutex<HashMap<Box<str>, Box<str>>>);

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("tokens", &self.0.lock().len())
            .finish()
    }
}

/// Whether `value` is its own token under `max`: not empty, short enough, only characters
/// that stay as they are (so escaping and shortening leave it unchanged).
fn plain(value: &str, max: usize) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn token(rules: &NameRules, value: Option<&str>) -> String {
    match value {
        None => ABSENT.to_string(),
        Some("") => EMPTY.to_string(),
        Some(v) => rules
            .fit(rules.component(v))
            .unwrap_or_else(|_| ABSENT.to_string()),
    }
}

impl Channels {
    /// Names under `prefix` (validated by the config).
    pub fn new(prefix: &str) -> Result<Self, BridgeError> {
        if prefix.len() > MAX_PREFIX_LEN {
            return Err(BridgeError::InvalidRequest(format!(
                "the KubeMQ channel prefix `{prefix}` is longer than {MAX_PREFIX_LEN} characters"
            )));
        }
        Ok(Channels {
            prefix: prefix.to_string(),
            tokens: Arc::default(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Events channel `message` is published on. Built in one buffer, each field
    /// appended as it is when it is its own token, else from the cache (the same name as
    /// `token` gives, which the tests check).
    pub fn event(&self, message: &Envelope) -> String {
        let s = &message.sender;
        let receiver = if message.message_type.is_info() {
            None
        } else {
            message.receiver.as_ref()
        };
        let mut out = String::with_capacity(MAX_CHANNEL_LEN);
        out.push_str(&self.prefix);
        out.push_str(".e");
        for value in [
            Some(message.message_type.as_str()),
            message.event_name.as_deref(),
            message.principal_id.as_deref(),
            message.tenant_id.as_deref(),
            Some(s.service_name.as_str()),
            Some(s.service_version.as_str()),
            Some(s.service_target.as_str()),
            Some(s.instance_id.as_str()),
            receiver.map(|r| r.service_name.as_str()),
            receiver.map(|r| r.service_version.as_str()),
            receiver.map(|r| r.service_target.as_str()),
            // An absent receiver and a receiver without instance id both spell `_`: a filter
            // on the receiver's instance id rejects both, as the reference matcher does.
            receiver.and_then(|r| r.instance_id.as_deref()),
        ] {
            out.push('.');
            self.push_field(&mut out, value);
        }
        out
    }

    /// Appends the token of one filter field's value.
    fn push_field(&self, out: &mut String, value: Option<&str>) {
        match value {
            Some(v) if plain(v, TOKEN_MAX) => out.push_str(v),
            Some(v) if !v.is_empty() => {
                if let Some(t) = self.tokens.0.lock().get(v) {
                    out.push_str(t);
                    return;
                }
                let t = token(&FIELD_RULES, Some(v));
                out.push_str(&t);
                let mut cache = self.tokens.0.lock();
                if cache.len() >= TOKEN_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(v.into(), t.into());
            }
            other => out.push_str(&token(&FIELD_RULES, other)),
        }
    }

    /// The Events subscription channel (with wildcards) of `filter`.
    pub fn pattern(&self, filter: &SubscriptionFilter) -> String {
        let p = |v: &Option<String>| match v {
            None => "*".to_string(),
            Some(v) => token(&FIELD_RULES, Some(v)),
        };
        let fields = [
            p(&filter.message_type.map(|m| m.as_str().to_string())),
            p(&filter.event_name),
            p(&filter.principal_id),
            p(&filter.tenant_id),
            p(&filter.sender.service_name),
            p(&filter.sender.service_version),
            p(&filter.sender.service_target),
            p(&filter.sender.instance_id),
            p(&filter.receiver.service_name),
            p(&filter.receiver.service_version),
            p(&filter.receiver.service_target),
            p(&filter.receiver.instance_id),
        ];
        self.join("e", &fields)
    }

    /// A concrete channel that `pattern` matches and no message is ever published on: where
    /// readiness probes go.
    pub fn probe_for(pattern: &str) -> String {
        pattern
            .split('.')
            .map(|t| if t == "*" || t == ">" { PROBE } else { t })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The query channel of a command endpoint.
    pub fn command(&self, address: &Address) -> String {
        let t = |v: &str| {
            if plain(v, ADDRESS_TOKEN_MAX) {
                v.to_string()
            } else {
                token(&ADDRESS_RULES, Some(v))
            }
        };
        self.join(
            "c",
            &[
                t(&address.service_name),
                t(&address.service_version),
                t(&address.service_target),
            ],
        )
    }

    /// The hand-off channel of a shared subscription: its members listen there too (in the
    /// subscription's group), so a member that is shutting down can hand a delivery to another.
    pub fn handoff(&self, key: &purista_core::RegistrationKey) -> String {
        self.join("h", &[token(&ADDRESS_RULES, Some(key.as_str()))])
    }

    /// The Events Store channel that records the durable subscriptions under the prefix
    /// (every publishing instance reads it to know which durable queues an event goes to).
    pub fn durable_registry(&self) -> String {
        self.join("durable", &[])
    }

    /// The KubeMQ queue that keeps the deliveries of durable subscription `key`.
    pub fn durable_queue(&self, key: &purista_core::RegistrationKey) -> String {
        self.join("dq", &[token(&ADDRESS_RULES, Some(key.as_str()))])
    }

    /// The hand-off query channel of a command endpoint: every responder of the endpoint also
    /// answers there, and a responder that left forwards what still reaches it there.
    pub fn command_handoff(&self, address: &Address) -> String {
        let t = |v: &str| token(&ADDRESS_RULES, Some(v));
        self.join(
            "ch",
            &[
                t(&address.service_name),
                t(&address.service_version),
                t(&address.service_target),
            ],
        )
    }

    /// Where a starting instance sends one event to learn whether KubeMQ takes its token.
    pub fn token_check(&self) -> String {
        format!("{}.start", self.prefix)
    }

    /// The queue that holds the dead letters of `target`.
    pub fn dead_letter(&self, target: &str) -> String {
        self.join("dl", &[token(&ADDRESS_RULES, Some(target))])
    }

    /// The KubeMQ queue channel of job queue `queue` (a dead-letter queue is a queue too).
    pub fn queue(&self, queue: &str) -> String {
        self.join("q", &[token(&ADDRESS_RULES, Some(queue))])
    }

    /// The Events Store channel that holds the declarations of job queue `queue`.
    pub fn queue_declarations(&self, queue: &str) -> String {
        self.join("qc", &[token(&ADDRESS_RULES, Some(queue))])
    }

    fn join(&self, kind: &str, tokens: &[String]) -> String {
        let mut out = String::with_capacity(MAX_CHANNEL_LEN);
        out.push_str(&self.prefix);
        out.push('.');
        out.push_str(kind);
        for t in tokens {
            out.push('.');
            out.push_str(t);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use purista_core::{AddressFilter, MessageType, SenderAddress};

    use super::*;

    fn channels() -> Channels {
        Channels::new("p").unwrap()
    }

    #[test]
    fn values_that_would_collide_plainly_get_different_tokens() {
        let a = token(&FIELD_RULES, Some("a.b"));
        let b = token(&FIELD_RULES, Some("a_2eb"));
        assert_ne!(a, b);
        assert_ne!(token(&FIELD_RULES, None), token(&FIELD_RULES, Some("")));
        assert_ne!(token(&FIELD_RULES, Some("_")), ABSENT);
        for v in ["*", ">", "a*b", "x.y", " "] {
            let t = token(&FIELD_RULES, Some(v));
            assert!(!t.contains(['*', '>', '.', ' ']), "{v} -> {t}");
        }
    }

    #[test]
    fn long_values_are_shortened_and_stay_apart() {
        let long_a = "a".repeat(300);
        let long_b = format!("{}b", "a".repeat(299));
        let (ta, tb) = (
            token(&FIELD_RULES, Some(&long_a)),
            token(&FIELD_RULES, Some(&long_b)),
        );
        assert!(ta.len() <= TOKEN_MAX && tb.len() <= TOKEN_MAX);
        assert_ne!(ta, tb);
    }

    #[test]
    fn the_longest_event_channel_fits_kubemqs_limit() {
        let long = "x".repeat(500);
        let c = Channels::new(&"p".repeat(MAX_PREFIX_LEN)).unwrap();
        let mut e = Envelope::custom(
            SenderAddress {
                service_name: long.clone(),
                service_version: long.clone(),
                service_target: long.clone(),
                instance_id: long.clone(),
            },
            long.clone(),
            serde_json::json!({}),
        );
        e.principal_id = Some(long.clone());
        e.tenant_id = Some(long.clone());
        e.receiver = Some(Address::new(&long, &long, &long).with_instance(&long));
        e.message_type = MessageType::Command;
        assert!(
            c.event(&e).len() <= MAX_CHANNEL_LEN,
            "{}",
            c.event(&e).len()
        );
        assert!(Channels::new(&"p".repeat(MAX_PREFIX_LEN + 1)).is_err());
    }

    /// The event channel as the plain composition of [`token`] spells it.
    fn event_by_tokens(c: &Channels, m: &Envelope) -> String {
        let t = |v: Option<&str>| token(&FIELD_RULES, v);
        let s = &m.sender;
        let r = if m.message_type.is_info() {
            None
        } else {
            m.receiver.as_ref()
        };
        c.join(
            "e",
            &[
                t(Some(m.message_type.as_str())),
                t(m.event_name.as_deref()),
                t(m.principal_id.as_deref()),
                t(m.tenant_id.as_deref()),
                t(Some(&s.service_name)),
                t(Some(&s.service_version)),
                t(Some(&s.service_target)),
                t(Some(&s.instance_id)),
                t(r.map(|r| r.service_name.as_str())),
                t(r.map(|r| r.service_version.as_str())),
                t(r.map(|r| r.service_target.as_str())),
                t(r.and_then(|r| r.instance_id.as_deref())),
            ],
        )
    }

    #[test]
    fn the_event_channel_is_the_composition_of_its_tokens_cached_or_not() {
        let c = channels();
        let values = [
            "",
            "a",
            "orders-v2",
            "a.b",
            "a_2eb",
            "*",
            "ünïcode",
            "exactly-18-chars-x",
            "nineteen-chars-long",
            "commandSuccessResponse",
            &"x".repeat(300),
            "0123456789abcdef0123456789abcdef",
        ];
        for (i, v) in values.iter().enumerate() {
            let w = values[(i * 7 + 3) % values.len()];
            let mut e = Envelope::custom(
                SenderAddress {
                    service_name: v.to_string(),
                    service_version: w.to_string(),
                    service_target: "t".into(),
                    instance_id: v.to_string(),
                },
                w.to_string(),
                serde_json::json!({}),
            );
            e.principal_id = (i % 2 == 0).then(|| v.to_string());
            e.tenant_id = (i % 3 == 0).then(|| w.to_string());
            for (message_type, receiver) in [
                (MessageType::CustomMessage, None),
                (
                    MessageType::Command,
                    Some(Address::new(*v, w, "x.y").with_instance(*v)),
                ),
                (
                    MessageType::CommandSuccessResponse,
                    Some(Address::new(w, *v, *v)),
                ),
            ] {
                e.message_type = message_type;
                e.receiver = receiver;
                // Twice: the second time from the cache.
                assert_eq!(c.event(&e), event_by_tokens(&c, &e), "{v:?} / {w:?}");
                assert_eq!(c.event(&e), event_by_tokens(&c, &e), "{v:?} / {w:?}");
            }
        }
    }

    #[test]
    fn a_command_channel_is_the_composition_of_its_tokens() {
        let c = channels();
        for v in ["echo", "a.b", "", &"y".repeat(61), &"z".repeat(60), "ünï"] {
            let a = Address::new(v, "1", v);
            let t = |v: &str| token(&ADDRESS_RULES, Some(v));
            assert_eq!(c.command(&a), c.join("c", &[t(v), t("1"), t(v)]));
        }
    }

    #[test]
    fn a_probe_channel_matches_its_pattern_and_no_message() {
        let f = SubscriptionFilter::new()
            .event_name("orders.placed")
            .sent_from(AddressFilter {
                service_name: Some("shop".into()),
                ..Default::default()
            });
        let pattern = channels().pattern(&f);
        let probe = Channels::probe_for(&pattern);
        assert!(!probe.contains('*'));
        assert_eq!(probe.split('.').count(), pattern.split('.').count());
    }
}
