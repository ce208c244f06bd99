//! The message every scenario sends: a small JSON object, as a user's type on the bridge side
//! and as a `serde_json::Value` of the same shape on the raw side.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What a bridge scenario sends: a user's serde type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// The operation's index, checked on the way back.
    pub seq: u64,
    /// A short string, so the message is not just a number.
    pub kind: String,
    /// A flag.
    pub ok: bool,
}

impl Payload {
    /// The payload of operation `seq`.
    pub fn new(seq: u64) -> Self {
        Payload {
            seq,
            kind: "bench".to_string(),
            ok: true,
        }
    }
}

/// What a raw baseline sends: the same object as a JSON value.
pub fn value(seq: u64) -> Value {
    json!({ "seq": seq, "kind": "bench", "ok": true })
}

/// The `seq` of a raw value, if it has one.
pub fn seq_of(value: &Value) -> Option<u64> {
    value.get("seq").and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_send_the_same_object() {
        let typed = serde_json::to_value(Payload::new(7)).expect("serializes");
        assert_eq!(typed, value(7));
        assert_eq!(seq_of(&typed), Some(7));
    }
}
