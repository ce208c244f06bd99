//! Broker resource names from PURISTA addresses, injectively: two different addresses never
//! share a queue, topic, rule or channel (DESIGN §4).
//!
//! Joining `orders.v2` + `1` and `orders` + `v2.1` with a dot gives the same name twice; one
//! service's commands would then be served by another's handler. [`NameRules::join`] escapes
//! every component before joining, so the separator only ever appears *between* components:
//! a character is kept when the broker allows it and it is neither the separator nor the
//! escape character; anything else becomes the escape character followed by the two lowercase
//! hex digits of each of its UTF-8 bytes. Decoding is unambiguous, hence different component
//! lists give different names.
//!
//! Brokers also bound name length (SQS: 80, EventBridge rules: 64, RabbitMQ: 255 bytes). A name
//! over the bound is either refused ([`Overflow::Reject`]: a clear 400 at registration) or
//! shortened ([`Overflow::Hash`]): cut, then ended with the escape character, `h` and 16 hex
//! digits of a 64-bit FNV-1a hash of the whole name. `h` never follows the escape character in
//! an escaped component, so a shortened name cannot equal an unshortened one; two shortened
//! names collide only if their hashes do (about 2⁻⁶⁴ per pair).

use crate::error::BridgeError;

/// What happens to a name longer than [`NameRules::max_len`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse it with [`BridgeError::InvalidRequest`].
    Reject,
    /// Cut it and append a hash of the whole name.
    Hash,
}

/// How one broker spells resource names.
#[derive(Debug, Clone, Copy)]
pub struct NameRules {
    /// Put between components (never inside one).
    pub separator: char,
    /// Starts an escape sequence (`<escape><hex><hex>` per UTF-8 byte).
    pub escape: char,
    /// Characters the broker accepts in a name; must include ASCII letters and digits.
    pub allowed: fn(char) -> bool,
    /// Longest name, in bytes.
    pub max_len: usize,
    /// What happens to a longer name.
    pub overflow: Overflow,
}

impl NameRules {
    /// Rules for brokers that take almost anything (RabbitMQ queues, KubeMQ channels): every
    /// printable ASCII character but space and `*`/`>` (wildcards somewhere) is kept.
    pub const fn permissive(separator: char, escape: char, max_len: usize) -> Self {
        NameRules {
            separator,
            escape,
            allowed: permissive_char,
            max_len,
            overflow: Overflow::Reject,
        }
    }

    /// The same rules with another overflow behaviour.
    pub const fn on_overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// One component, escaped.
    ///
    /// ```
    /// use purista_core::kit::NameRules;
    /// let rules = NameRules::permissive('.', '~', 255);
    /// assert_eq!(rules.component("orders"), "orders");
    /// assert_eq!(rules.component("v2.1"), "v2~2e1");
    /// assert_eq!(rules.component("a~b"), "a~7eb");
    /// ```
    pub fn component(&self, raw: &str) -> String {
        let mut out = String::with_capacity(raw.len());
        for c in raw.chars() {
            if c != self.separator && c != self.escape && (self.allowed)(c) {
                out.push(c);
            } else {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    out.push(self.escape);
                    out.push(hex_digit(byte >> 4));
                    out.push(hex_digit(byte & 0xf));
                }
            }
        }
        out
    }

    /// `prefix`, then every component escaped, joined by the separator. `prefix` is taken as
    /// is (a bridge validates it once, in its config).
    ///
    /// ```
    /// use purista_core::kit::NameRules;
    /// let rules = NameRules::permissive('.', '~', 255);
    /// let a = rules.join("p", &["cmd", "orders.v2", "1", "get"]).unwrap();
    /// let b = rules.join("p", &["cmd", "orders", "v2.1", "get"]).unwrap();
    /// assert_ne!(a, b);
    /// assert_eq!(a, "p.cmd.orders~2ev2.1.get");
    /// ```
    ///
    /// # Errors
    /// [`BridgeError::InvalidRequest`] when the name is longer than `max_len` under
    /// [`Overflow::Reject`].
    pub fn join(&self, prefix: &str, components: &[&str]) -> Result<String, BridgeError> {
        let mut name = String::from(prefix);
        for c in components {
            if !name.is_empty() {
                name.push(self.separator);
            }
            name.push_str(&self.component(c));
        }
        self.fit(name)
    }

    /// Applies the length rule to an already joined name.
    pub fn fit(&self, name: String) -> Result<String, BridgeError> {
        if name.len() <= self.max_len {
            return Ok(name);
        }
        match self.overflow {
            Overflow::Reject => Err(BridgeError::InvalidRequest(format!(
                "resource name of {} bytes exceeds the broker's limit of {} bytes: {}…",
                name.len(),
                self.max_len,
                name.chars().take(60).collect::<String>()
            ))),
            Overflow::Hash => {
                let suffix = format!("{}h{:016x}", self.escape, fnv1a64(name.as_bytes()));
                let keep = self.max_len.saturating_sub(suffix.len());
                let mut cut = keep.min(name.len());
                while !name.is_char_boundary(cut) {
                    cut -= 1;
                }
                let mut short = name[..cut].to_string();
                // A cut right after an escape character (or inside its two digits) would make
                // the suffix look like escaped text; drop the partial sequence.
                if let Some(pos) = short.rfind(self.escape)
                    && short.len() - pos < 3
                {
                    short.truncate(pos);
                }
                short.push_str(&suffix);
                Ok(short)
            }
        }
    }
}

fn permissive_char(c: char) -> bool {
    c.is_ascii_graphic() && c != '*' && c != '>'
}

fn hex_digit(n: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(n & 0xf)])
}

/// 64-bit FNV-1a: stable across versions and platforms, unlike the standard hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn sqs_like(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '-' || c == '_'
    }

    const SQS: NameRules = NameRules {
        separator: '-',
        escape: '_',
        allowed: sqs_like,
        max_len: 80,
        overflow: Overflow::Hash,
    };

    #[test]
    fn names_that_collide_when_joined_plainly_stay_apart() {
        let rules = NameRules::permissive('.', '~', 255);
        let pairs = [
            (["orders.v2", "1", "get"], ["orders", "v2.1", "get"]),
            (["a~2e", "b", "c"], ["a.", "b", "c"]),
            (["", "x.y", "z"], [".x", "y", "z"]),
        ];
        for (a, b) in pairs {
            assert_ne!(rules.join("p", &a).unwrap(), rules.join("p", &b).unwrap());
        }
    }

    #[test]
    fn an_overlong_name_is_refused_or_hashed_within_the_limit() {
        let long = "x".repeat(300);
        let rules = NameRules::permissive('.', '~', 255);
        assert!(matches!(
            rules.join("p", &[&long]),
            Err(BridgeError::InvalidRequest(_))
        ));
        let hashed = rules
            .on_overflow(Overflow::Hash)
            .join("p", &[&long])
            .unwrap();
        assert_eq!(hashed.len(), 255);
        assert!(hashed.ends_with(&format!(
            "~h{:016x}",
            fnv1a64(format!("p.{long}").as_bytes())
        )));
    }

    #[test]
    fn sqs_names_use_only_the_allowed_alphabet() {
        let name = SQS
            .join("app", &["cmd", "Ördersß v2", "1.0", "get/all"])
            .unwrap();
        assert!(name.chars().all(sqs_like), "{name}");
        assert!(name.len() <= 80);
    }

    proptest! {
        #[test]
        fn different_component_lists_never_share_a_name(
            a in proptest::collection::vec("[a-z._~\\-ä ]{0,12}", 1..4),
            b in proptest::collection::vec("[a-z._~\\-ä ]{0,12}", 1..4),
        ) {
            let rules = NameRules::permissive('.', '~', 1_000);
            let ja: Vec<&str> = a.iter().map(String::as_str).collect();
            let jb: Vec<&str> = b.iter().map(String::as_str).collect();
            let (na, nb) = (rules.join("p", &ja).unwrap(), rules.join("p", &jb).unwrap());
            prop_assert_eq!(a == b, na == nb, "{:?} {:?} -> {} {}", a, b, na, nb);
        }

        #[test]
        fn hashed_sqs_names_stay_distinct_and_in_bounds(
            parts in proptest::collection::vec(proptest::collection::vec("[a-zA-Z0-9._/ -]{0,40}", 3), 1..64),
        ) {
            let mut seen: HashMap<String, Vec<String>> = HashMap::new();
            for p in &parts {
                let refs: Vec<&str> = p.iter().map(String::as_str).collect();
                let name = SQS.join("purista", &refs).unwrap();
                prop_assert!(name.len() <= 80);
                prop_assert!(name.chars().all(sqs_like));
                if let Some(other) = seen.get(&name) {
                    prop_assert_eq!(other, p);
                }
                seen.insert(name, p.clone());
            }
        }
    }
}
