//! Non-strict mode: what a start does with a registration whose need the bridge lacks. Each
//! [`Need`] documents its degradation; this file carries them out, warning once per mismatch.

use std::collections::BTreeMap;

use super::builder::Service;
use super::subscription::SubscriptionDef;
use crate::capabilities::{Mismatch, Need};
use crate::filter::SubscriptionFilter;

/// What a non-strict start leaves out or changes.
#[derive(Default)]
pub(super) struct Degraded {
    pub skip_commands: bool,
    pub skip_streams: bool,
    pub skip_subscriptions: Vec<String>,
    /// Filters applied in-process, by subscription name.
    pub local_filters: BTreeMap<String, SubscriptionFilter>,
}

impl Service {
    /// Applies non-strict mode to `mismatches`: warns once per mismatch and says what is left
    /// out or changed.
    pub(super) fn plan_degradations(
        &mut self,
        mismatches: &[Mismatch],
        event_only: bool,
    ) -> Degraded {
        let mut plan = Degraded::default();
        for m in mismatches {
            tracing::warn!(registration = %m.registration, need = %m.need.describe(), bridge = %m.bridge, "capability mismatch; degrading (non-strict mode)");
            match &m.need {
                Need::Commands => plan.skip_commands = true,
                Need::Streams => plan.skip_streams = true,
                Need::EventName => plan.skip_subscriptions.push(m.registration.clone()),
                need => {
                    for s in &mut self.subscriptions {
                        let reg = format!("subscription {}@{}/{}", self.name, self.version, s.name);
                        if reg == m.registration
                            && let Some(f) = degrade(s, need, event_only)
                        {
                            plan.local_filters.insert(s.name.clone(), f);
                        }
                    }
                }
            }
        }
        plan
    }
}

/// What non-strict mode changes about one subscription.
fn degrade(def: &mut SubscriptionDef, need: &Need, event_only: bool) -> Option<SubscriptionFilter> {
    match need {
        Need::SharedSubscription => def.shared = false,
        Need::BroadcastSubscription => def.shared = true,
        Need::DurableSubscription => def.durable = false,
        Need::BoundedRetry { .. } => def.policy.max_attempts = 1,
        Need::DelayedRetry { .. } => def.policy.retry_delay_ms = 0,
        Need::DeadLetter => def.policy.dead_letter_target = None,
        Need::PauseResume => def.pausable = false,
        // The runtime settles on arrival, before the handler runs (see `SubscriptionRuntime`).
        Need::ManualAck => def.ack_on_arrival = true,
        // Nothing to change: deliveries keep the bridge's own guarantee; the warning says so.
        Need::AtLeastOnce => {}
        Need::ComplexFilter if event_only => {
            // Route by eventName on the broker, apply the rest here.
            let full = def.filter.clone();
            def.filter = SubscriptionFilter {
                event_name: full.event_name.clone(),
                ..Default::default()
            };
            return Some(full);
        }
        _ => {}
    }
    None
}
