//! The state one bridge instance shares between its surface (`bridge.rs`), its connection
//! supervisor, its consumers and its settlers, grouped by concern, each group in a file of its
//! own: the settings and names, the [`Link`] to the broker (connection and session state), the
//! [`Registry`] of registrations, the [`Work`] in flight, the [`Ledger`] of counts and the
//! [`Suspects`] of poison isolation. Every file that needs them reads them here; none of those
//! files imports `bridge.rs`.

use std::sync::Arc;

use crate::config::AmqpConfig;
use crate::ledger::Ledger;
use crate::link::Link;
use crate::registry::Registry;
use crate::suspects::Suspects;
use crate::topology::Topology;
use crate::work::Work;

/// State shared by the bridge, its supervisor, consumers and settlers.
pub(crate) struct Shared {
    pub config: AmqpConfig,
    pub topology: Topology,
    pub instance_id: String,
    pub link: Link,
    pub registry: Registry,
    pub work: Work,
    pub ledger: Ledger,
    pub suspects: Arc<Suspects>,
}

impl Shared {
    pub(crate) fn new(config: AmqpConfig, instance_id: String) -> Self {
        Shared {
            topology: Topology::new(&config, &instance_id),
            instance_id,
            link: Link::new(
                config.reconnect_grace,
                config.topology == crate::TopologyMode::Purista,
            ),
            registry: Registry::default(),
            work: Work::new(),
            ledger: Ledger::default(),
            suspects: Arc::default(),
            config,
        }
    }
}
