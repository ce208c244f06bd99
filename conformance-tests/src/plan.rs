//! What a case requires, and the plan for one case on one harness: run the behaviour, prove
//! that the strict check rejects an undeclared need, or skip with a reason.
//!
//! The plan is made from facts known before anything runs — the declared capabilities, what
//! the harness offers, whether its broker answers a cheap probe — because nextest lists the
//! tests (and learns which are ignored) before it runs each one in a process of its own. A
//! skip therefore shows up as an ignored test whose name carries the reason, never as a pass.
//! A fact that turns out differently at run time (a broker that answered the probe but is gone
//! when the case runs) fails the case: only the listing may decide to skip.

use purista_core::Need;

use crate::env::{REQUIRE_BROKERS_ENV, brokers_required};
use crate::gate::declares_on;
use crate::harness::{Harness, Offer};

/// What a case needs to exercise its behaviour: capabilities the bridge must declare, and what
/// the harness must offer besides bridges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requires {
    /// Capabilities the behaviour needs. The first undeclared one is proven rejected by the
    /// strict check instead of running the behaviour.
    pub needs: Vec<Need>,
    /// A queue bridge (queue cases).
    pub queue_bridge: bool,
    /// A raw publisher (messages with fixed senders, duplicates, poison).
    pub raw_publisher: bool,
    /// Broker-control hooks (drop connections, restart).
    pub broker_control: bool,
    /// A declared `max_payload_bytes`.
    pub payload_limit: bool,
    /// A declared `max_metadata_bytes`.
    pub metadata_limit: bool,
}

/// A case that needs nothing but a deployment.
pub fn nothing() -> Requires {
    Requires::default()
}

/// A case that needs `needs` declared.
pub fn needs(needs: &[Need]) -> Requires {
    Requires {
        needs: needs.to_vec(),
        ..Requires::default()
    }
}

impl Requires {
    /// Also needs a queue bridge.
    pub fn queue_bridge(mut self) -> Self {
        self.queue_bridge = true;
        self
    }

    /// Also needs a raw publisher.
    pub fn raw_publisher(mut self) -> Self {
        self.raw_publisher = true;
        self
    }

    /// Also needs broker-control hooks.
    pub fn broker_control(mut self) -> Self {
        self.broker_control = true;
        self
    }

    /// Also needs a declared body limit (`Limits::max_payload_bytes`).
    pub fn payload_limit(mut self) -> Self {
        self.payload_limit = true;
        self
    }

    /// Also needs a declared metadata limit (`Limits::max_metadata_bytes`).
    pub fn metadata_limit(mut self) -> Self {
        self.metadata_limit = true;
        self
    }
}

/// What to do with one case on one harness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Every need is declared and everything required is there: run the behaviour.
    Run,
    /// The bridge does not declare this need: prove that a strict start refuses it and a
    /// non-strict start warns. A real test, named after what it proves.
    RejectUndeclared(Need),
    /// The case cannot run with this harness here; says why.
    Skip(String),
}

impl Plan {
    /// The label the test's listed name carries (`[label] bridge::group::case`); `None` for a
    /// case that runs its behaviour.
    pub fn label(&self) -> Option<String> {
        match self {
            Plan::Run => None,
            Plan::RejectUndeclared(need) => Some(format!(
                "proves the strict check rejects undeclared {}",
                need.describe()
            )),
            Plan::Skip(why) => Some(format!("skipped: {why}")),
        }
    }
}

/// The plan for a case with `requires` on `h`.
///
/// Order: a harness that cannot run here skips everything (unless brokers are required, then
/// the case runs and fails); a missing queue bridge skips (there is no queue bridge to run a
/// strict check against); an undeclared need is proven rejected; an undeclared limit, a
/// missing raw publisher or missing broker control skips.
pub fn plan(requires: &Requires, h: &dyn Harness) -> Plan {
    if let Err(why) = h.availability()
        && !brokers_required()
    {
        return Plan::Skip(format!(
            "{why} (set {REQUIRE_BROKERS_ENV}=1 to fail instead)"
        ));
    }
    if requires.queue_bridge && h.queue_capabilities().is_none() {
        return Plan::Skip(format!("bridge `{}` has no queue bridge", h.name()));
    }
    if let Some(need) = requires.needs.iter().find(|n| !declares_on(h, n)) {
        return Plan::RejectUndeclared(need.clone());
    }
    let limits = h.capabilities().limits;
    if requires.payload_limit && limits.max_payload_bytes.is_none() {
        return Plan::Skip(format!(
            "bridge `{}` declares no body limit (max_payload_bytes)",
            h.name()
        ));
    }
    if requires.metadata_limit && limits.max_metadata_bytes.is_none() {
        return Plan::Skip(format!(
            "bridge `{}` declares no metadata limit (max_metadata_bytes)",
            h.name()
        ));
    }
    if requires.raw_publisher && !h.offers_raw_publisher() {
        return Plan::Skip(format!(
            "the `{}` harness cannot publish raw bytes to its broker",
            h.name()
        ));
    }
    if requires.broker_control {
        match h.broker_control() {
            Offer::Available => {}
            Offer::Absent(why) => return Plan::Skip(why),
            Offer::Unreachable(why) if !brokers_required() => {
                return Plan::Skip(format!(
                    "{why} (set {REQUIRE_BROKERS_ENV}=1 to fail instead)"
                ));
            }
            Offer::Unreachable(_) => {}
        }
    }
    Plan::Run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_say_what_a_case_proves_or_why_it_is_skipped() {
        assert_eq!(Plan::Run.label(), None);
        assert_eq!(
            Plan::RejectUndeclared(Need::Streams).label().as_deref(),
            Some("proves the strict check rejects undeclared streams")
        );
        assert_eq!(
            Plan::Skip("no broker".into()).label().as_deref(),
            Some("skipped: no broker")
        );
    }
}
