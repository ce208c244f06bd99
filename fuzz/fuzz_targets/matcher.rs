//! Random (filter, message) pairs into the reference matcher `SubscriptionFilter::matches`.
//!
//! Checks: it never panics; stream frames never match; the empty filter matches every other
//! message; it agrees with an independent reading of DESIGN §3.3 (unset = wildcard, set = exact
//! case-sensitive equality, all ANDed, info messages never match a receiver part); clearing a
//! field of a matching filter keeps it matching; and filter and message give the same answer
//! after a trip over the wire (JSON).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use purista_core::{
    Address, AddressFilter, Envelope, MessageType, SenderAddress, SubscriptionFilter,
};

/// A small vocabulary so that filters and messages often agree, plus any string.
#[derive(Arbitrary, Debug, Clone)]
enum Word {
    A,
    B,
    UpperA,
    Empty,
    Any(String),
}

impl Word {
    fn text(&self) -> String {
        match self {
            Word::A => "a".into(),
            Word::B => "b".into(),
            Word::UpperA => "A".into(),
            Word::Empty => String::new(),
            Word::Any(s) => s.clone(),
        }
    }
}

fn opt(w: &Option<Word>) -> Option<String> {
    w.as_ref().map(Word::text)
}

#[derive(Arbitrary, Debug)]
struct AddrFilterIn {
    name: Option<Word>,
    version: Option<Word>,
    target: Option<Word>,
    instance: Option<Word>,
}

#[derive(Arbitrary, Debug)]
struct FilterIn {
    message_type: Option<u8>,
    event_name: Option<Word>,
    principal_id: Option<Word>,
    tenant_id: Option<Word>,
    sender: AddrFilterIn,
    receiver: AddrFilterIn,
}

#[derive(Arbitrary, Debug)]
struct ReceiverIn {
    name: Word,
    version: Word,
    target: Word,
    instance: Option<Word>,
}

#[derive(Arbitrary, Debug)]
struct MessageIn {
    message_type: u8,
    event_name: Option<Word>,
    principal_id: Option<Word>,
    tenant_id: Option<Word>,
    correlation_id: Option<Word>,
    sender: [Word; 4],
    receiver: Option<ReceiverIn>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    filter: FilterIn,
    message: MessageIn,
}

fn message_type(i: u8) -> MessageType {
    MessageType::ALL[usize::from(i) % MessageType::ALL.len()]
}

fn address_filter(a: &AddrFilterIn) -> AddressFilter {
    AddressFilter {
        service_name: opt(&a.name),
        service_version: opt(&a.version),
        service_target: opt(&a.target),
        instance_id: opt(&a.instance),
    }
}

fn build_filter(f: &FilterIn) -> SubscriptionFilter {
    SubscriptionFilter {
        message_type: f.message_type.map(message_type),
        event_name: opt(&f.event_name),
        principal_id: opt(&f.principal_id),
        tenant_id: opt(&f.tenant_id),
        sender: address_filter(&f.sender),
        receiver: address_filter(&f.receiver),
    }
}

fn build_message(m: &MessageIn) -> Envelope {
    let [name, version, target, instance] = &m.sender;
    let sender = SenderAddress {
        service_name: name.text(),
        service_version: version.text(),
        service_target: target.text(),
        instance_id: instance.text(),
    };
    let mut e = Envelope::new(message_type(m.message_type), sender);
    e.event_name = opt(&m.event_name);
    e.principal_id = opt(&m.principal_id);
    e.tenant_id = opt(&m.tenant_id);
    e.correlation_id = opt(&m.correlation_id);
    e.receiver = m.receiver.as_ref().map(|r| Address {
        service_name: r.name.text(),
        service_version: r.version.text(),
        service_target: r.target.text(),
        instance_id: opt(&r.instance),
    });
    e.payload = serde_json::json!({ "payload": {}, "parameter": {} });
    e
}

/// A set filter field passes only on an equal value; an absent value fails it.
fn field(filter: &Option<String>, value: Option<&str>) -> bool {
    filter.as_deref().is_none_or(|f| Some(f) == value)
}

/// DESIGN §3.3, read independently of the implementation.
fn oracle(f: &SubscriptionFilter, m: &Envelope) -> bool {
    if m.message_type == MessageType::Stream {
        return false;
    }
    if m.message_type.is_info() && !f.receiver.is_empty() {
        return false;
    }
    let r = m.receiver.as_ref();
    f.message_type.is_none_or(|t| t == m.message_type)
        && field(&f.event_name, m.event_name.as_deref())
        && field(&f.principal_id, m.principal_id.as_deref())
        && field(&f.tenant_id, m.tenant_id.as_deref())
        && field(&f.sender.service_name, Some(&m.sender.service_name))
        && field(&f.sender.service_version, Some(&m.sender.service_version))
        && field(&f.sender.service_target, Some(&m.sender.service_target))
        && field(&f.sender.instance_id, Some(&m.sender.instance_id))
        && field(&f.receiver.service_name, r.map(|r| r.service_name.as_str()))
        && field(
            &f.receiver.service_version,
            r.map(|r| r.service_version.as_str()),
        )
        && field(
            &f.receiver.service_target,
            r.map(|r| r.service_target.as_str()),
        )
        && field(
            &f.receiver.instance_id,
            r.and_then(|r| r.instance_id.as_deref()),
        )
}

/// The filter with one part cleared, for every part.
fn loosened(f: &SubscriptionFilter) -> Vec<SubscriptionFilter> {
    let mut out = Vec::new();
    let mut push = |g: &dyn Fn(&mut SubscriptionFilter)| {
        let mut c = f.clone();
        g(&mut c);
        out.push(c);
    };
    push(&|c| c.message_type = None);
    push(&|c| c.event_name = None);
    push(&|c| c.principal_id = None);
    push(&|c| c.tenant_id = None);
    push(&|c| c.sender.service_name = None);
    push(&|c| c.sender.service_version = None);
    push(&|c| c.sender.service_target = None);
    push(&|c| c.sender.instance_id = None);
    push(&|c| c.receiver.service_name = None);
    push(&|c| c.receiver.service_version = None);
    push(&|c| c.receiver.service_target = None);
    push(&|c| c.receiver.instance_id = None);
    out
}

fuzz_target!(|input: Input| {
    let filter = build_filter(&input.filter);
    let msg = build_message(&input.message);
    let matched = filter.matches(&msg);

    if msg.message_type == MessageType::Stream {
        assert!(!matched, "a stream frame matched {filter:?}");
    } else {
        assert!(
            SubscriptionFilter::new().matches(&msg),
            "the empty filter did not match {msg:?}"
        );
    }
    assert_eq!(
        matched,
        oracle(&filter, &msg),
        "matcher and DESIGN §3.3 disagree on {filter:?} / {msg:?}"
    );
    if matched {
        for looser in loosened(&filter) {
            assert!(
                looser.matches(&msg),
                "clearing a field lost the match: {looser:?}"
            );
        }
    }

    let wire_filter: SubscriptionFilter =
        serde_json::from_slice(&serde_json::to_vec(&filter).expect("filter serializes"))
            .expect("filter deserializes");
    assert_eq!(wire_filter, filter, "filter changed over the wire");
    if let Ok(wire_msg) = Envelope::decode(&msg.encode()) {
        assert_eq!(wire_msg, msg, "message changed over the wire");
        assert_eq!(wire_filter.matches(&wire_msg), matched);
    }
});
