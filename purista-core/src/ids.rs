//! Id generation: 32 lowercase hex characters, the shape PURISTA uses for ids, correlation ids,
//! trace ids and instance ids. Random, so ids from independent processes do not collide.

use rand::Rng;

/// A fresh random id of 32 lowercase hex characters.
///
/// ```
/// let id = purista_core::ids::new_id();
/// assert_eq!(id.len(), 32);
/// assert!(id.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
/// ```
pub fn new_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v: u128 = rand::rng().random();
    // Hand-rolled hex into a stack buffer, one allocation: `format!` or pushing chars one by
    // one costs several times more, and ids are made on every message.
    let bytes = v.to_be_bytes();
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    // Only ASCII hex digits were written, so this never falls back.
    std::str::from_utf8(&hex)
        .map(str::to_owned)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::new_id;

    #[test]
    fn ids_are_32_lowercase_hex_digits_and_do_not_repeat() {
        let ids: HashSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        // Every digit turns up in every position: the whole 128 bits are used.
        for position in 0..32 {
            let digits: HashSet<u8> = ids.iter().map(|id| id.as_bytes()[position]).collect();
            assert_eq!(digits.len(), 16, "position {position}");
        }
    }
}
