//! # purista-bridge-kubemq
//!
//! The `kubemq` bridge: PURISTA's semantics on KubeMQ.

#[cfg(feature = "double")]
pub mod double;
