//! Copies of commands and responses on the bus, for subscriptions that filter on them (DESIGN
//! §3.3). Commands travel on SQS queues, which no subscription sees, so the caller puts a copy
//! of each command on the bus and the responder a copy of each response; but only while some
//! subscription can match it: copies nobody wants cost every invocation two `PutEvents` calls
//! (AWS bills each, and on moto each waits for the calls before it).
//!
//! Who wants copies is written on the bus itself: the rule of a subscription whose filter can
//! match commands or responses carries the filter in its description ([`description`]). An
//! instance reads the bus's rules ([`Copies::wanted`]) and trusts a read for [`FRESH_FOR`],
//! counted from before it was sent; a registration that creates such a rule returns only that
//! long after the rule was created ([`settle_after_adding`]), so every read still trusted
//! once the registration returned was sent after the rule existed and holds it: the
//! subscription gets copies of every command invoked after its registration returned. Without
//! a trusted read (at start, after a failed read, when the last read is old) copies are put as
//! before, and a read is started beside them.
//!
//! EventBridge applies a new rule to events after "a short period" (its documentation): a
//! subscription may miss what is put in that period, with copies or without.

use std::sync::Arc;
use std::time::Duration;

use purista_core::kit::broker_call;
use purista_core::{BridgeError, Envelope, SubscriptionFilter, WorkKind};
use tokio::time::Instant;

use crate::client::sdk_error;
use crate::shared::Shared;

/// How long a read of the bus's rules is trusted, counted from before it was sent, and so how
/// often a busy instance reads them: two `ListRules` a second at most, so that many instances
/// stay inside EventBridge's per-account rate for it (a throttled read only means copies are
/// put until a read works). A registration that wants copies takes this long.
pub const FRESH_FOR: Duration = Duration::from_millis(500);
/// A rule description that says its subscription wants copies: followed by the filter's JSON,
/// or by `*` when the filter does not fit a description (512 characters).
pub const COPIES_MARK: &str = "purista-copies:";
/// EventBridge's longest rule description.
const MAX_DESCRIPTION: usize = 512;

/// The description of a subscription rule with `filter`: [`COPIES_MARK`] and the filter when it
/// can match commands or responses, else a plain one.
pub fn description(filter: &SubscriptionFilter) -> String {
    if !filter.may_match_commands() {
        return "purista subscription".to_string();
    }
    let json = serde_json::to_string(filter).unwrap_or_default();
    if json.is_empty() || COPIES_MARK.len() + json.len() > MAX_DESCRIPTION {
        format!("{COPIES_MARK}*")
    } else {
        format!("{COPIES_MARK}{json}")
    }
}

/// What a rule's description says about copies: `None` for a rule that wants none, `Some(None)`
/// for one that wants them all, `Some(Some(filter))` for one that wants what `filter` matches.
/// A description with the mark but no readable filter wants them all.
fn wanted_by(description: &str) -> Option<Option<SubscriptionFilter>> {
    let rest = description.strip_prefix(COPIES_MARK)?;
    Some(serde_json::from_str::<SubscriptionFilter>(rest).ok())
}

/// Waits out [`FRESH_FOR`] after a rule that wants copies was created: reads sent before it are
/// no longer trusted when this returns. Time is the condition here (no instance says when it
/// drops a read), and it is a bound, not a guess.
pub async fn settle_after_adding() {
    tokio::time::sleep(FRESH_FOR).await;
}

#[derive(Default)]
struct State {
    /// The last read: when it was sent, and the filters of the rules that want copies (`None`
    /// in the list: every copy).
    read: Option<(Instant, Arc<Vec<Option<SubscriptionFilter>>>)>,
    /// A read is on its way.
    reading: bool,
}

/// One instance's knowledge of who wants copies.
#[derive(Default)]
pub struct Copies {
    state: parking_lot::Mutex<State>,
}

impl Copies {
    /// Whether a copy of `message` (a command or a response) goes on the bus: unless a trusted
    /// read found no rule that can match it. An untrusted read starts a new one.
    pub fn wanted(shared: &Arc<Shared>, message: &Envelope) -> bool {
        let filters = {
            let mut state = shared.copies.state.lock();
            let fresh = state
                .read
                .as_ref()
                .filter(|(sent, _)| sent.elapsed() < FRESH_FOR)
                .map(|(_, filters)| filters.clone());
            if fresh.is_none() && !state.reading && !shared.is_closing() {
                state.reading = true;
                let reader = shared.clone();
                shared
                    .tasks
                    .spawn(WorkKind::Generic, "ListRules".into(), async move {
                        read(&reader).await;
                    });
            }
            fresh
        };
        match filters {
            Some(filters) => filters
                .iter()
                .any(|f| f.as_ref().is_none_or(|f| f.matches(message))),
            None => true,
        }
    }
}

/// Reads the bus's rules and keeps what they say about copies (a failed read keeps nothing:
/// copies go on the bus until a read works).
async fn read(shared: &Shared) {
    let sent = Instant::now();
    let result = list(shared).await;
    let mut state = shared.copies.state.lock();
    state.reading = false;
    match result {
        Ok(filters) => {
            if state.read.as_ref().is_none_or(|(before, _)| *before < sent) {
                state.read = Some((sent, Arc::new(filters)));
            }
        }
        Err(error) => {
            tracing::debug!(%error, "the bus's rules could not be read; commands and responses go on the bus until they can");
        }
    }
}

/// The filters of the rules on the bus that want copies.
async fn list(shared: &Shared) -> Result<Vec<Option<SubscriptionFilter>>, BridgeError> {
    let bus = shared.config.bus_name().to_string();
    let mut filters = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let call = shared
            .clients
            .events
            .list_rules()
            .event_bus_name(&bus)
            .set_next_token(next.take())
            .send();
        let out = broker_call(shared.config.call_timeout, "ListRules", async {
            call.await
                .map_err(|e| sdk_error(&format!("listing the rules of bus {bus}"), e))
        })
        .await?;
        filters.extend(
            out.rules()
                .iter()
                .filter_map(|rule| rule.description().and_then(wanted_by)),
        );
        match out.next_token {
            Some(token) if !token.is_empty() => next = Some(token),
            _ => return Ok(filters),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use purista_core::{AddressFilter, MessageType};

    #[test]
    fn a_filter_that_can_match_commands_is_written_and_read_back_whole() {
        let filter = SubscriptionFilter::new()
            .message_type(MessageType::CommandSuccessResponse)
            .sent_from(AddressFilter {
                service_name: Some("billing".into()),
                ..AddressFilter::default()
            });
        let text = description(&filter);
        assert!(text.starts_with(COPIES_MARK), "{text}");
        assert_eq!(wanted_by(&text), Some(Some(filter)));
    }

    #[test]
    fn an_event_only_type_filter_wants_no_copies_and_a_huge_one_wants_them_all() {
        let events = SubscriptionFilter::new().message_type(MessageType::CustomMessage);
        assert_eq!(wanted_by(&description(&events)), None);
        let huge = SubscriptionFilter::new().event_name("x".repeat(600));
        let text = description(&huge);
        assert!(text.len() <= MAX_DESCRIPTION, "{}", text.len());
        assert_eq!(wanted_by(&text), Some(None));
        assert_eq!(wanted_by("purista-copies:{not json"), Some(None));
        assert_eq!(wanted_by("made by hand"), None);
    }
}
