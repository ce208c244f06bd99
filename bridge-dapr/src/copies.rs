//! Copies of commands and responses for subscriptions (DESIGN §3.3: a subscription can filter
//! on commands and responses too). Commands travel by service invocation, which no subscriber
//! sees; so the responder publishes a copy of the command and of its response on the topic,
//! but only when some subscription's filter matches it: publishing copies nobody wants would
//! cost every command two publishes and their deliveries.
//!
//! Which filters want copies is kept in the state store under `<prefix>||copies`: one entry
//! `{key, instance, filter}` per subscription (and instance) whose filter can match a command
//! or a response, added before the subscription is registered and removed when it leaves.
//! The responder reads the list while the handler runs, and trusts a read for [`FRESH_FOR`]
//! (a registration that adds an entry returns only that long after its write).

use purista_core::{BridgeError, Envelope, SubscriptionFilter, SubscriptionSpec};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::shared::Shared;

/// Whether a subscription with `filter` can receive commands or responses.
pub fn wants_copies(filter: &SubscriptionFilter) -> bool {
    filter.may_match_commands()
}

fn registry_key(shared: &Shared) -> String {
    format!("{}||copies", shared.config.prefix)
}

/// Adds (`add`) or removes this instance's entry for `spec`.
pub async fn announce(
    shared: &Shared,
    spec: &SubscriptionSpec,
    add: bool,
) -> Result<(), BridgeError> {
    let entry = json!({
        "key": spec.key.as_str(),
        "instance": shared.instance_id,
        "filter": spec.filter,
    });
    let same =
        |v: &Value| v.get("key") == entry.get("key") && v.get("instance") == entry.get("instance");
    shared
        .update_list(&registry_key(shared), |items| {
            let present = items.iter().any(same);
            if present == add {
                return false;
            }
            if add {
                items.push(entry.clone());
            } else {
                items.retain(|v| !same(v));
            }
            true
        })
        .await
}

/// What one read of the registry found (`None`: the read failed).
pub type Wanted = Option<Vec<SubscriptionFilter>>;

/// How long a read of the registry is trusted, counted from before it was sent. A
/// registration that adds an entry returns only this long after its write
/// ([`settle_after_adding`]), so every read a responder still trusts once the registration has
/// returned was sent after the write and holds the entry: the subscription gets copies of every
/// command served after its registration, while responders read the registry at most a few
/// times a second instead of once per command (a round trip through the sidecar each).
pub const FRESH_FOR: std::time::Duration = std::time::Duration::from_millis(250);

/// Waits out [`FRESH_FOR`] after an entry was added: the reads responders made before the
/// write are no longer trusted when this returns. Time is the condition here (no responder
/// says when it drops a read), and it is a bound, not a guess.
pub async fn settle_after_adding() {
    tokio::time::sleep(FRESH_FOR).await;
}

/// The last read of the registry, trusted for [`FRESH_FOR`] from before it was sent: commands
/// arriving meanwhile share it (waiting for it while it runs); a failed read is not shared.
#[derive(Default)]
pub struct Reads {
    current: parking_lot::Mutex<Option<(Instant, std::sync::Arc<tokio::sync::OnceCell<Wanted>>)>>,
}

impl Reads {
    /// The filters that want copies, from a read still trusted or a new one.
    pub async fn wanted(&self, shared: &Shared) -> Wanted {
        let cell = {
            let mut current = self.current.lock();
            match current.as_ref() {
                Some((sent, cell))
                    if sent.elapsed() < FRESH_FOR && !matches!(cell.get(), Some(None)) =>
                {
                    cell.clone()
                }
                _ => {
                    let cell = std::sync::Arc::new(tokio::sync::OnceCell::new());
                    // Taken before the read is sent: trusted for less, never for more.
                    *current = Some((Instant::now(), cell.clone()));
                    cell
                }
            }
        };
        cell.get_or_init(|| read(shared)).await.clone()
    }
}

/// The filters that want copies, as the state store has them now. On a failed read every
/// message is wanted (a copy too many is cheaper than one missing).
async fn read(shared: &Shared) -> Wanted {
    let read = shared
        .sidecar
        .get_state(
            &shared.config.statestore,
            &registry_key(shared),
            shared.config.call_timeout,
        )
        .await;
    match read {
        Ok(Some((Value::Array(items), _))) => Some(
            items
                .iter()
                .filter_map(|v| v.get("filter"))
                .filter_map(|f| serde_json::from_value(f.clone()).ok())
                .collect(),
        ),
        Ok(_) => Some(Vec::new()),
        Err(e) => {
            tracing::warn!(error = %e, "could not read which subscriptions want command copies; publishing them");
            None
        }
    }
}

/// Whether `message` is wanted by one of `filters` (`None`: by everyone).
pub fn is_wanted(filters: &Option<Vec<SubscriptionFilter>>, message: &Envelope) -> bool {
    filters
        .as_ref()
        .is_none_or(|fs| fs.iter().any(|f| f.matches(message)))
}
