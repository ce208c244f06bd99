//! The caller's view of which apps serve a command endpoint: the list in the state store,
//! cached for [`CACHE_FOR`] so that a burst of invocations reads it once (concurrent readers
//! share one read). An empty list is never cached (a server that just registered is found at
//! once); an app that answers 404 or cannot be reached drops the entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_core::BridgeError;
use serde_json::Value;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::shared::Shared;

/// How long a non-empty list of apps is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(2);

type Entry = (Instant, Arc<OnceCell<Arc<[String]>>>);

/// Endpoint lists by state key.
#[derive(Default)]
pub struct EndpointCache {
    entries: Mutex<HashMap<String, Entry>>,
}

impl EndpointCache {
    /// The apps serving the endpoint under `key`.
    pub async fn lookup(&self, shared: &Shared, key: &str) -> Result<Arc<[String]>, BridgeError> {
        let cell = {
            let mut entries = self.entries.lock();
            let fresh = entries
                .get(key)
                .filter(|(at, _)| at.elapsed() < CACHE_FOR)
                .map(|(_, cell)| cell.clone());
            match fresh {
                Some(cell) => cell,
                None => {
                    let cell = Arc::new(OnceCell::new());
                    entries.insert(key.to_string(), (Instant::now(), cell.clone()));
                    cell
                }
            }
        };
        let read = cell
            .get_or_try_init(|| async {
                let found = shared
                    .sidecar
                    .get_state(&shared.config.statestore, key, shared.config.call_timeout)
                    .await?;
                Ok::<_, BridgeError>(match found {
                    Some((Value::Array(apps), _)) => apps
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                        .into(),
                    _ => Arc::from(Vec::new()),
                })
            })
            .await;
        match read {
            Ok(apps) if !apps.is_empty() => Ok(apps.clone()),
            Ok(_) => {
                self.forget(key);
                Ok(Arc::from(Vec::new()))
            }
            Err(e) => {
                self.forget(key);
                Err(e)
            }
        }
    }

    /// Drops the cached list of `key`.
    pub fn forget(&self, key: &str) {
        self.entries.lock().remove(key);
    }
}
