//! The `memory://` driver for the `purista` facade's driver table.
//!
//! `memory://NAME` is one process-wide hub per name (`memory://` is the hub with the empty
//! name) with one in-memory queue bridge; each connect gives a new bridge instance on it, so
//! two connects with one URL act like two service instances on one broker. Hubs made through
//! the driver live as long as the process: a connection made later finds what an earlier one
//! registered.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use futures::FutureExt;
use parking_lot::Mutex;
use purista_core::{ConnectRequest, Connected, Driver, DriverError, EventBridge};

use crate::bridge::{BRIDGE_NAME, capabilities};
use crate::config::MemoryBridgeConfig;
use crate::{MemoryBroker, MemoryQueueBridge};

/// Hubs (and their queue bridges) made through the driver, by name.
static HUBS: LazyLock<Mutex<HashMap<String, (MemoryBroker, MemoryQueueBridge)>>> =
    LazyLock::new(Default::default);

/// The in-process bridge's driver: scheme `memory`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use purista_core::ConnectRequest;
/// let driver = purista_bridge_default::driver();
/// assert!(driver.serves("memory"));
/// let conn = (driver.connect)(ConnectRequest { url: "memory://docs".into(), prefix: None })
///     .await
///     .unwrap();
/// assert_eq!(conn.events.name(), "default");
/// assert!(conn.queues.is_some());
/// # }
/// ```
pub fn driver() -> Driver {
    Driver {
        name: BRIDGE_NAME,
        schemes: &["memory"],
        capabilities: || capabilities(&MemoryBridgeConfig::default()),
        connect: |request| connect(request).boxed(),
    }
}

async fn connect(request: ConnectRequest) -> Result<Connected, DriverError> {
    let Some((_, rest)) = request.url.split_once("://") else {
        return Err(DriverError::InvalidUrl(
            "expected `memory://` or `memory://NAME`".into(),
        ));
    };
    let name = rest.trim_end_matches('/');
    let (broker, queues) = HUBS
        .lock()
        .entry(name.to_string())
        .or_insert_with(|| (MemoryBroker::named(name), MemoryQueueBridge::new()))
        .clone();
    let events: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    events.start().await?;
    Ok(Connected {
        events,
        queues: Some(Arc::new(queues)),
    })
}
