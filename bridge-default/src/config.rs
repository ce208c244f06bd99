//! Settings of one in-process bridge instance.
//!
//! The in-process bridge has no connection to configure; what is left is what a real broker
//! would decide for us: how long an invocation waits by default, how many deliveries may queue
//! up in front of a consumer (the backpressure point), and an optional size cap so that a
//! development setup can surface oversize messages before a real broker rejects them.

use std::time::Duration;

/// Default ttl of invocations and stream sessions: 30 s.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Default number of deliveries buffered per subscription consumer: 1 024.
pub const DEFAULT_CONSUMER_BUFFER: usize = 1024;

/// Settings of one [`MemoryBridge`](crate::MemoryBridge).
///
/// ```
/// use std::time::Duration;
/// use purista_bridge_default::MemoryBridgeConfig;
///
/// let config = MemoryBridgeConfig {
///     default_command_timeout: Duration::from_secs(5),
///     ..MemoryBridgeConfig::default()
/// };
/// assert_eq!(config.consumer_buffer, 1024);
/// assert!(config.instance_id.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBridgeConfig {
    /// The instance id stamped as `sender.instanceId`; `None` = a fresh random id.
    pub instance_id: Option<String>,
    /// Ttl of invocations and stream sessions when the caller gives none (30 s).
    pub default_command_timeout: Duration,
    /// Deliveries buffered per subscription consumer before `emit` waits for space (1 024).
    /// Values below 1 are treated as 1.
    pub consumer_buffer: usize,
    /// Largest encoded envelope `emit` and `invoke` accept; `None` = no limit.
    pub max_payload_bytes: Option<usize>,
}

impl Default for MemoryBridgeConfig {
    fn default() -> Self {
        MemoryBridgeConfig {
            instance_id: None,
            default_command_timeout: DEFAULT_COMMAND_TIMEOUT,
            consumer_buffer: DEFAULT_CONSUMER_BUFFER,
            max_payload_bytes: None,
        }
    }
}
