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
    // Hand-rolled hex: `format!` costs several times more, and ids are made on every message.
    let mut out = String::with_capacity(32);
    for shift in (0..32).rev() {
        out.push(HEX[((v >> (shift * 4)) & 0xf) as usize] as char);
    }
    out
}
