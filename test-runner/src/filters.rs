//! Random (filter, message) pairs for the bridges' filter property tests: each bridge routes
//! the pairs through its broker's own filtering (KubeMQ channel wildcards, EventBridge rules,
//! Dapr's CEL routing) and compares the outcome with core's reference matcher.
//!
//! A bridge brings its own pool of values, made to break its naive mapping (separators,
//! wildcards, quotes, empty strings, non-ASCII); the shapes of filters and messages are the
//! same for all.

use purista_core::{
    Address, AddressFilter, Envelope, MessageType, SenderAddress, SubscriptionFilter,
};
use rand::Rng;
use rand::rngs::StdRng;

/// Draws filters and messages from a pool of values.
#[derive(Clone, Debug)]
pub struct PairGen {
    pool: Vec<String>,
    types: Vec<MessageType>,
    address_odds: f64,
}

impl PairGen {
    /// Values drawn from `pool`; every message type; an address filter part set 2 times in 5.
    pub fn new<S: Into<String>>(pool: impl IntoIterator<Item = S>) -> PairGen {
        let pool: Vec<String> = pool.into_iter().map(Into::into).collect();
        assert!(!pool.is_empty(), "a value pool needs values");
        PairGen {
            pool,
            types: MessageType::ALL.to_vec(),
            address_odds: 0.4,
        }
    }

    /// Only these message types, in filters and messages (those the bridge puts on its broker).
    pub fn types(mut self, types: Vec<MessageType>) -> PairGen {
        assert!(!types.is_empty(), "at least one message type");
        self.types = types;
        self
    }

    /// How often a filter constrains the sender (and, separately, the receiver) at all.
    pub fn address_odds(mut self, odds: f64) -> PairGen {
        self.address_odds = odds;
        self
    }

    /// A value of the pool.
    pub fn pick(&self, rng: &mut StdRng) -> String {
        self.pool[rng.random_range(0..self.pool.len())].clone()
    }

    /// A value of the pool, or none, half and half.
    pub fn maybe(&self, rng: &mut StdRng) -> Option<String> {
        rng.random_bool(0.5).then(|| self.pick(rng))
    }

    fn message_type(&self, rng: &mut StdRng) -> MessageType {
        self.types[rng.random_range(0..self.types.len())]
    }

    fn address_filter(&self, rng: &mut StdRng) -> AddressFilter {
        if !rng.random_bool(self.address_odds) {
            return AddressFilter::default();
        }
        AddressFilter {
            service_name: self.maybe(rng),
            service_version: self.maybe(rng),
            service_target: self.maybe(rng),
            instance_id: self.maybe(rng),
        }
    }

    /// A filter: each field set or a wildcard.
    pub fn filter(&self, rng: &mut StdRng) -> SubscriptionFilter {
        SubscriptionFilter {
            message_type: rng.random_bool(0.4).then(|| self.message_type(rng)),
            event_name: self.maybe(rng),
            principal_id: self.maybe(rng),
            tenant_id: self.maybe(rng),
            sender: self.address_filter(rng),
            receiver: self.address_filter(rng),
        }
    }

    /// A message: a full sender, optional event name, principal, tenant and receiver.
    pub fn message(&self, rng: &mut StdRng) -> Envelope {
        let sender = SenderAddress {
            service_name: self.pick(rng),
            service_version: self.pick(rng),
            service_target: self.pick(rng),
            instance_id: self.pick(rng),
        };
        let mut e = Envelope::custom(sender, "x", serde_json::Value::Object(Default::default()));
        e.message_type = self.message_type(rng);
        e.event_name = self.maybe(rng);
        e.principal_id = self.maybe(rng);
        e.tenant_id = self.maybe(rng);
        e.receiver = rng.random_bool(0.6).then(|| {
            let a = Address::new(self.pick(rng), self.pick(rng), self.pick(rng));
            if rng.random_bool(0.5) {
                a.with_instance(self.pick(rng))
            } else {
                a
            }
        });
        e
    }
}

/// Every field `filter` sets takes `m`'s value (where `m` has one), so that matches are common,
/// not a rarity of random draws.
pub fn copy_from_message(filter: &mut SubscriptionFilter, m: &Envelope) {
    fn take(slot: &mut Option<String>, value: Option<&str>) {
        if slot.is_some()
            && let Some(v) = value
        {
            *slot = Some(v.to_string());
        }
    }
    if filter.message_type.is_some() {
        filter.message_type = Some(m.message_type);
    }
    take(&mut filter.event_name, m.event_name.as_deref());
    take(&mut filter.principal_id, m.principal_id.as_deref());
    take(&mut filter.tenant_id, m.tenant_id.as_deref());
    let s = &m.sender;
    take(&mut filter.sender.service_name, Some(&s.service_name));
    take(&mut filter.sender.service_version, Some(&s.service_version));
    take(&mut filter.sender.service_target, Some(&s.service_target));
    take(&mut filter.sender.instance_id, Some(&s.instance_id));
    if let Some(r) = &m.receiver {
        take(&mut filter.receiver.service_name, Some(&r.service_name));
        take(
            &mut filter.receiver.service_version,
            Some(&r.service_version),
        );
        take(&mut filter.receiver.service_target, Some(&r.service_target));
        take(&mut filter.receiver.instance_id, r.instance_id.as_deref());
    }
}

/// The seed of a property run: `PURISTA_PROPERTY_SEED` when set (to replay a failure), else a
/// fresh one; printed with `label` so a failing run can be replayed.
pub fn seed(label: &str) -> u64 {
    let seed = std::env::var("PURISTA_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{label} filter property seed: {seed} (replay with PURISTA_PROPERTY_SEED={seed})");
    seed
}
