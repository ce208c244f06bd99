//! A running service's health: `ok`, `warn` when a consumer or worker is paused (listed),
//! `error` when the bridge is unhealthy.

use serde::Serialize;

use crate::bridge::BridgeHealth;
use crate::inflight::InFlight;
use crate::operator::PausedConsumer;

/// Overall health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// All good.
    Ok,
    /// Serving, but a consumer or worker is paused.
    Warn,
    /// The bridge is unhealthy.
    Error,
}

/// A service's health with the reasons.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceHealth {
    /// `ok`, `warn` or `error`.
    pub state: HealthState,
    /// The bridge's own health.
    pub bridge: BridgeHealth,
    /// This service's paused subscription consumers.
    pub paused_consumers: Vec<PausedConsumer>,
    /// This service's paused queue workers: `(queue, reason)`.
    pub paused_workers: Vec<(String, String)>,
    /// Work in flight.
    pub in_flight: InFlight,
}
