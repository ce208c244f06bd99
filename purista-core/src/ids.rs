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
    let v: u128 = rand::rng().random();
    format!("{v:032x}")
}
