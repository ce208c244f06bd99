//! The first try of [`Envelope::decode`]: a scanner for the envelope's own shape.
//!
//! An envelope is a flat object of short strings (ids, names), a number, two small address
//! objects and a payload. Read through serde, every one of those strings pays for a visitor, a
//! seed and a second pass over its bytes; that was about half of what a bridge spent on a
//! command's round trip. Here one cursor walks the text: a key is matched as the slice it is,
//! a string without escapes is copied out as it is, and only the payload and unknown fields
//! (arbitrary JSON) are read by serde_json.
//!
//! Like the serde fast path, the scanner only answers "this is the envelope" or "not sure":
//! anything it does not expect (an escape in a key, an unknown field inside an address, a
//! number that is not a plain integer, a duplicate, a payload nested deep) is handed on, and
//! the careful path decides and words the error. A property test holds the scanner to the
//! careful path's answer.

use serde_json::{Map, Value};

use super::{
    Address, Envelope, MessageType, SenderAddress, default_content_encoding, default_content_type,
};

/// Array and object nesting the scanner reads in a payload or an unknown field; deeper ones go
/// to the other paths, which read the whole envelope under serde_json's depth limit (128, the
/// envelope's own level included).
const MAX_VALUE_DEPTH: usize = 64;

/// `Some(envelope)` when `text` is an envelope of the expected shape; `None` when another
/// path must decide. The family rules are the caller's to check.
pub(super) fn decode(text: &str) -> Option<Envelope> {
    let mut c = Cursor {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    let mut f = Fields::default();
    c.ws();
    c.object(|c, key| f.read(key, c))?;
    c.ws();
    if c.pos != c.bytes.len() {
        return None;
    }
    f.into_envelope()
}

/// The fields read so far; a second value for one is a duplicate (the careful path decides).
#[derive(Default)]
struct Fields {
    id: Option<String>,
    timestamp: Option<u64>,
    message_type: Option<MessageType>,
    content_type: Option<Option<String>>,
    content_encoding: Option<Option<String>>,
    trace_id: Option<Option<String>>,
    correlation_id: Option<Option<String>>,
    principal_id: Option<Option<String>>,
    tenant_id: Option<Option<String>>,
    event_name: Option<Option<String>>,
    otp: Option<Option<String>>,
    sender: Option<SenderAddress>,
    receiver: Option<Option<Address>>,
    payload: Option<Value>,
    is_handled_error: Option<Option<bool>>,
    extra: Map<String, Value>,
}

/// Sets `slot` once: `None` when it was set already.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    slot.replace(value).is_none().then_some(())
}

impl Fields {
    /// Reads the value of `key` at the cursor into its slot.
    fn read(&mut self, key: &str, c: &mut Cursor<'_>) -> Option<()> {
        match key {
            "id" => once(&mut self.id, c.string()?),
            "timestamp" => once(&mut self.timestamp, c.integer()?),
            "messageType" => {
                let (name, escaped) = c.raw_string()?;
                if escaped {
                    return None;
                }
                once(&mut self.message_type, MessageType::parse(name)?)
            }
            "contentType" => once(&mut self.content_type, c.optional_string()?),
            "contentEncoding" => once(&mut self.content_encoding, c.optional_string()?),
            "traceId" => once(&mut self.trace_id, c.optional_string()?),
            "correlationId" => once(&mut self.correlation_id, c.optional_string()?),
            "principalId" => once(&mut self.principal_id, c.optional_string()?),
            "tenantId" => once(&mut self.tenant_id, c.optional_string()?),
            "eventName" => once(&mut self.event_name, c.optional_string()?),
            "otp" => once(&mut self.otp, c.optional_string()?),
            "sender" => {
                let a = c.address()?;
                let sender = SenderAddress {
                    service_name: a.service_name,
                    service_version: a.service_version,
                    service_target: a.service_target,
                    instance_id: a.instance_id?,
                };
                once(&mut self.sender, sender)
            }
            "receiver" => {
                let receiver = if c.literal(b"null") {
                    None
                } else {
                    Some(c.address()?)
                };
                once(&mut self.receiver, receiver)
            }
            "payload" => once(&mut self.payload, c.value()?),
            "isHandledError" => {
                let handled = if c.literal(b"null") {
                    None
                } else if c.literal(b"true") {
                    Some(true)
                } else if c.literal(b"false") {
                    Some(false)
                } else {
                    return None;
                };
                once(&mut self.is_handled_error, handled)
            }
            other => {
                let value = c.value()?;
                self.extra
                    .insert(other.to_string(), value)
                    .is_none()
                    .then_some(())
            }
        }
    }

    fn into_envelope(self) -> Option<Envelope> {
        Some(Envelope {
            id: self.id?,
            timestamp: self.timestamp?,
            message_type: self.message_type?,
            content_type: self
                .content_type
                .flatten()
                .unwrap_or_else(default_content_type),
            content_encoding: self
                .content_encoding
                .flatten()
                .unwrap_or_else(default_content_encoding),
            trace_id: self.trace_id.flatten(),
            correlation_id: self.correlation_id.flatten(),
            principal_id: self.principal_id.flatten(),
            tenant_id: self.tenant_id.flatten(),
            event_name: self.event_name.flatten(),
            otp: self.otp.flatten(),
            sender: self.sender?,
            receiver: self.receiver.flatten(),
            explicit_null_payload: matches!(self.payload, Some(Value::Null)),
            payload: self.payload.unwrap_or(Value::Null),
            is_handled_error: self.is_handled_error.flatten(),
            extra: self.extra,
        })
    }
}

/// A position in the text.
struct Cursor<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn eat(&mut self, expected: u8) -> Option<()> {
        (self.next()? == expected).then_some(())
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Consumes `word` when it is next.
    fn literal(&mut self, word: &[u8]) -> bool {
        let found = self
            .bytes
            .get(self.pos..)
            .is_some_and(|rest| rest.starts_with(word));
        if found {
            self.pos += word.len();
        }
        found
    }

    /// A string's contents as they stand in the text (escapes not undone), and whether it
    /// holds an escape. `None` for anything else, or a raw control character (not JSON).
    fn raw_string(&mut self) -> Option<(&'a str, bool)> {
        self.eat(b'"')?;
        let start = self.pos;
        let mut escaped = false;
        loop {
            self.pos += plain_run(self.bytes.get(self.pos..)?);
            match self.peek()? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    // Past the escaped character; a `\u` escape's digits are plain bytes.
                    self.pos += 2;
                }
                _ => return None,
            }
        }
        // Both ends are at ASCII quotes, so on character boundaries.
        let contents = self.text.get(start..self.pos)?;
        self.pos += 1;
        Some((contents, escaped))
    }

    /// A key: a string without escapes (an escaped key is left to the other paths).
    fn key(&mut self) -> Option<&'a str> {
        match self.raw_string()? {
            (key, false) => Some(key),
            (_, true) => None,
        }
    }

    /// A string value, escapes undone.
    fn string(&mut self) -> Option<String> {
        match self.raw_string()? {
            (plain, false) => Some(plain.to_string()),
            (escaped, true) => unescape(escaped),
        }
    }

    /// `null` or a string.
    fn optional_string(&mut self) -> Option<Option<String>> {
        if self.literal(b"null") {
            return Some(None);
        }
        self.string().map(Some)
    }

    /// A non-negative integer written plainly (no sign, fraction, exponent or leading zero)
    /// that fits a `u64`.
    fn integer(&mut self) -> Option<u64> {
        let start = self.pos;
        let mut n: u64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.pos += 1;
        }
        let digits = self.pos - start;
        let leading_zero = digits > 1 && self.bytes[start] == b'0';
        if digits == 0 || leading_zero || matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(n)
    }

    /// An object whose keys have no escapes: `field` reads the value of each key at the
    /// cursor (and answers `None` for one it does not take).
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.sequence(b'{', b'}', |c| {
            let key = c.key()?;
            c.ws();
            c.eat(b':')?;
            c.ws();
            field(c, key)
        })
    }

    /// `open`, elements separated by commas, `close`: each element read by `element` (the
    /// one walk of objects and arrays alike).
    fn sequence(
        &mut self,
        open: u8,
        close: u8,
        mut element: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.eat(open)?;
        self.ws();
        if self.peek()? == close {
            self.pos += 1;
            return Some(());
        }
        loop {
            element(self)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b if b == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// An address object: the three names as strings, `instanceId` a string, `null` or
    /// absent. Any other key is left to the other paths.
    fn address(&mut self) -> Option<Address> {
        let (mut name, mut version, mut target) = (None, None, None);
        let mut instance: Option<Option<String>> = None;
        self.object(|c, key| match key {
            "serviceName" => once(&mut name, c.string()?),
            "serviceVersion" => once(&mut version, c.string()?),
            "serviceTarget" => once(&mut target, c.string()?),
            "instanceId" => once(&mut instance, c.optional_string()?),
            _ => None,
        })?;
        Some(Address {
            service_name: name?,
            service_version: version?,
            service_target: target?,
            instance_id: instance.flatten(),
        })
    }

    /// Any JSON value, at most [`MAX_VALUE_DEPTH`] arrays and objects deep. Numbers other
    /// than plain non-negative integers are read by serde_json, so that every number comes
    /// out exactly as serde_json makes it.
    fn value(&mut self) -> Option<Value> {
        self.value_within(MAX_VALUE_DEPTH)
    }

    fn value_within(&mut self, depth: usize) -> Option<Value> {
        match self.peek()? {
            b'"' => self.string().map(Value::String),
            b'{' => {
                let depth = depth.checked_sub(1)?;
                let mut fields = Map::new();
                self.sequence(b'{', b'}', |c| {
                    let key = c.string()?;
                    c.ws();
                    c.eat(b':')?;
                    c.ws();
                    // A repeated key keeps its last value, as serde_json's map does.
                    fields.insert(key, c.value_within(depth)?);
                    Some(())
                })?;
                Some(Value::Object(fields))
            }
            b'[' => {
                let depth = depth.checked_sub(1)?;
                let mut items = Vec::new();
                self.sequence(b'[', b']', |c| {
                    items.push(c.value_within(depth)?);
                    Some(())
                })?;
                Some(Value::Array(items))
            }
            b't' if self.literal(b"true") => Some(Value::Bool(true)),
            b'f' if self.literal(b"false") => Some(Value::Bool(false)),
            b'n' if self.literal(b"null") => Some(Value::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A number: a plain non-negative integer that fits a `u64` directly, any other by
    /// serde_json from its characters.
    fn number(&mut self) -> Option<Value> {
        let number_byte =
            |b: Option<u8>| matches!(b, Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'));
        let start = self.pos;
        if let Some(n) = self.integer()
            && !number_byte(self.peek())
        {
            return Some(Value::from(n));
        }
        self.pos = start;
        while number_byte(self.peek()) {
            self.pos += 1;
        }
        let token = self.text.get(start..self.pos)?;
        match serde_json::from_str::<Value>(token).ok()? {
            number @ Value::Number(_) => Some(number),
            _ => None,
        }
    }
}

/// How many bytes from the start of `bytes` need no attention inside a string: everything
/// up to the first `"`, `\` or control character. Eight bytes at a time: a byte below 0x20,
/// or one equal to `"` or `\`, is found with a few word operations instead of a branch per
/// byte.
fn plain_run(bytes: &[u8]) -> usize {
    let mut done = 0;
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let found = (below(w, 0x20) | equal(w, b'"') | equal(w, b'\\')) & HIGHS;
        if found != 0 {
            return done + (found.trailing_zeros() / 8) as usize;
        }
        done += 8;
    }
    done + bytes[done..]
        .iter()
        .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
        .unwrap_or(bytes.len() - done)
}

/// 0x01 in every byte of a word.
const ONES: u64 = u64::MAX / 255;
/// The high bit of every byte of a word.
const HIGHS: u64 = ONES << 7;

/// The high bit set in the bytes of `w` below `n` (n ≤ 0x80). Exact for the lowest such byte;
/// bytes above it may be flagged too (a borrow runs on), which only the lowest matters for.
fn below(w: u64, n: u8) -> u64 {
    w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS
}

/// The high bit set in the bytes of `w` equal to `b` (exact for the lowest, as [`below`]).
fn equal(w: u64, b: u8) -> u64 {
    below(w ^ (ONES * u64::from(b)), 1)
}

/// A string's contents with their escapes undone; `None` for an escape JSON does not have.
/// `\u` escapes (rare in envelopes) are undone by serde_json.
fn unescape(escaped: &str) -> Option<String> {
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let replacement = match rest.as_bytes().get(at + 1)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => return serde_json::from_str(&format!("\"{escaped}\"")).ok(),
            _ => return None,
        };
        out.push(replacement);
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The word-at-a-time scan stops where a byte-by-byte scan stops.
        #[test]
        fn the_plain_run_ends_at_the_first_quote_backslash_or_control_byte(
            bytes in prop::collection::vec(
                prop_oneof![4 => 0x20u8..0x7f, 1 => any::<u8>(), 1 => Just(b'"'), 1 => Just(b'\\')],
                0..40,
            )
        ) {
            let expected = bytes
                .iter()
                .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
                .unwrap_or(bytes.len());
            prop_assert_eq!(plain_run(&bytes), expected);
        }
    }

    #[test]
    fn escapes_are_undone_as_serde_json_undoes_them() {
        for text in [
            r#"a\"b"#,
            r#"\\"#,
            r#"x\/y\b\f\n\r\t"#,
            r#"\u00e9\n"#,
            r#"\ud83d\ude80"#,
        ] {
            let by_serde: String = serde_json::from_str(&format!("\"{text}\"")).expect("JSON");
            assert_eq!(unescape(text), Some(by_serde), "{text}");
        }
        assert_eq!(unescape(r#"\x"#), None, "not a JSON escape");
        assert_eq!(unescape(r#"ab\"#), None, "a lone backslash at the end");
    }
}
