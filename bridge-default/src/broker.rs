//! The in-process "broker": a hub that several bridge instances share.
//!
//! A [`MemoryBroker`] plays the part RabbitMQ or KubeMQ play for the other adapters. Each
//! [`MemoryBridge`] made from it is one service instance (one "process") with its own instance
//! id, and the hub routes between them: commands and streams to one member of an endpoint group
//! (competing consumers, round robin), responses to the caller's reply inbox by
//! `receiver.instanceId` and `correlationId`, everything else to subscription groups. That is
//! what lets the conformance suite test competing consumers and broadcast without a broker.
//!
//! Hubs live as long as a handle to them (a broker or a bridge) does. [`MemoryBroker::named`]
//! finds a live hub by name, so `memory://orders` opened twice in one process is one hub.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::{Mutex, RwLock};
use purista_core::{Address, BridgeError, Envelope, MessageType};

use crate::bridge::MemoryBridge;
use crate::commands::{self, CommandMember, Inbox, ReplyTo};
use crate::config::MemoryBridgeConfig;
use crate::dead_letters::DeadLetters;
use crate::streams::StreamMember;
use crate::subscriptions::SubscriptionRoutes;
use purista_core::kit::FastMap;

/// Live named hubs, for [`MemoryBroker::named`].
static NAMED: LazyLock<Mutex<HashMap<String, Weak<Hub>>>> = LazyLock::new(Default::default);

/// A shared in-process hub. Cheap to clone; clones share the hub.
///
/// ```
/// use purista_bridge_default::MemoryBroker;
/// use purista_core::EventBridge;
///
/// let broker = MemoryBroker::new();
/// let a = broker.bridge();
/// let b = broker.bridge();
/// assert_ne!(a.instance_id(), b.instance_id());
/// assert!(MemoryBroker::named("docs").same_hub(&MemoryBroker::named("docs")));
/// ```
#[derive(Clone)]
pub struct MemoryBroker {
    hub: Arc<Hub>,
}

impl MemoryBroker {
    /// A fresh, private hub.
    pub fn new() -> Self {
        MemoryBroker {
            hub: Arc::new(Hub::new(None)),
        }
    }

    /// The process-wide hub called `name`, created on first use and shared while any handle to
    /// it lives.
    pub fn named(name: impl AsRef<str>) -> Self {
        let name = name.as_ref();
        let mut named = NAMED.lock();
        if let Some(hub) = named.get(name).and_then(Weak::upgrade) {
            return MemoryBroker { hub };
        }
        named.retain(|_, hub| hub.strong_count() > 0);
        let hub = Arc::new(Hub::new(Some(name.to_string())));
        named.insert(name.to_string(), Arc::downgrade(&hub));
        MemoryBroker { hub }
    }

    pub(crate) fn from_hub(hub: Arc<Hub>) -> Self {
        MemoryBroker { hub }
    }

    /// The hub's name when made with [`MemoryBroker::named`].
    pub fn name(&self) -> Option<&str> {
        self.hub.name.as_deref()
    }

    /// True when both handles share one hub.
    pub fn same_hub(&self, other: &MemoryBroker) -> bool {
        Arc::ptr_eq(&self.hub, &other.hub)
    }

    /// A new bridge instance on this hub with default settings and a fresh instance id.
    pub fn bridge(&self) -> MemoryBridge {
        self.bridge_with(MemoryBridgeConfig::default())
    }

    /// A new bridge instance on this hub with `config`.
    pub fn bridge_with(&self, config: MemoryBridgeConfig) -> MemoryBridge {
        MemoryBridge::new(self.hub.clone(), config)
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("name", &self.hub.name)
            .finish_non_exhaustive()
    }
}

/// The shared state behind a [`MemoryBroker`].
pub(crate) struct Hub {
    name: Option<String>,
    pub(crate) commands: EndpointGroups<CommandMember>,
    pub(crate) streams: EndpointGroups<StreamMember>,
    pub(crate) subscriptions: SubscriptionRoutes,
    pub(crate) dead_letters: DeadLetters,
    inboxes: RwLock<FastMap<Arc<str>, Weak<Inbox>>>,
}

impl Hub {
    fn new(name: Option<String>) -> Self {
        Hub {
            name,
            commands: EndpointGroups::default(),
            streams: EndpointGroups::default(),
            subscriptions: SubscriptionRoutes::default(),
            dead_letters: DeadLetters::default(),
            inboxes: RwLock::new(FastMap::default()),
        }
    }

    /// Makes `inbox` reachable for responses addressed to `instance_id`.
    pub(crate) fn add_inbox(&self, instance_id: Arc<str>, inbox: &Arc<Inbox>) {
        let previous = self
            .inboxes
            .write()
            .insert(instance_id.clone(), Arc::downgrade(inbox));
        if previous.is_some_and(|p| p.strong_count() > 0) {
            tracing::warn!(
                instance_id = %instance_id,
                "two bridges on one hub share an instance id: responses go to the newer one"
            );
        }
    }

    /// Forgets the inbox of `instance_id` if it is `inbox`.
    pub(crate) fn remove_inbox(&self, instance_id: &str, inbox: &Arc<Inbox>) {
        let mut inboxes = self.inboxes.write();
        if inboxes
            .get(instance_id)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(inbox)))
        {
            inboxes.remove(instance_id);
        }
    }

    /// Hands a response to the reply inbox of `receiver.instanceId`.
    pub(crate) fn deliver_reply(&self, response: Arc<Envelope>) {
        let Some(instance_id) = response
            .receiver
            .as_ref()
            .and_then(|r| r.instance_id.as_deref())
        else {
            tracing::debug!(
                message_id = %response.id,
                "response without receiver instance: only subscriptions see it"
            );
            return;
        };
        let inbox = self.inboxes.read().get(instance_id).and_then(Weak::upgrade);
        match inbox {
            Some(inbox) => inbox.resolve(response),
            None => tracing::warn!(
                instance_id,
                correlation_id = response.correlation_id.as_deref().unwrap_or(""),
                "response for an unknown bridge instance ignored"
            ),
        }
    }

    /// Routes a message that is already stamped: what `emit` and `publish_raw` share.
    ///
    /// Commands go to one handler (the response to the sender's inbox), responses to the
    /// caller's inbox, and every family is offered to matching subscriptions.
    pub(crate) async fn publish(self: &Arc<Self>, envelope: Arc<Envelope>) {
        match envelope.message_type {
            MessageType::Stream => {
                tracing::warn!(
                    message_id = %envelope.id,
                    correlation_id = envelope.correlation_id.as_deref().unwrap_or(""),
                    "stream frame outside a stream session ignored"
                );
                return;
            }
            MessageType::Command => {
                let member = envelope
                    .receiver
                    .as_ref()
                    .and_then(|r| self.commands.pick(r));
                match member {
                    Some(member) => {
                        commands::dispatch(self, member, envelope.clone(), ReplyTo::Receiver);
                    }
                    None => tracing::warn!(
                        message_id = %envelope.id,
                        correlation_id = envelope.correlation_id.as_deref().unwrap_or(""),
                        "command without handler dropped"
                    ),
                }
            }
            t if t.is_response() => self.deliver_reply(envelope.clone()),
            _ => {}
        }
        self.subscriptions.offer(&envelope).await;
    }
}

/// What an endpoint group needs to know about a member.
pub(crate) trait EndpointMember {
    /// The bridge instance that registered it.
    fn instance_id(&self) -> &str;
}

/// Competing-consumer groups per endpoint (service name, version, target).
pub(crate) struct EndpointGroups<M> {
    groups: RwLock<FastMap<Address, EndpointGroup<M>>>,
}

struct EndpointGroup<M> {
    members: Vec<Arc<M>>,
    next: AtomicUsize,
}

impl<M> Default for EndpointGroups<M> {
    fn default() -> Self {
        EndpointGroups {
            groups: RwLock::new(FastMap::default()),
        }
    }
}

/// The routing key of an address: the endpoint without instance.
fn endpoint(address: &Address) -> Cow<'_, Address> {
    if address.instance_id.is_none() {
        Cow::Borrowed(address)
    } else {
        Cow::Owned(Address::new(
            address.service_name.as_str(),
            address.service_version.as_str(),
            address.service_target.as_str(),
        ))
    }
}

impl<M: EndpointMember> EndpointGroups<M> {
    /// Adds `member` to the group of `address`; one member per instance.
    pub(crate) fn join(&self, address: &Address, member: Arc<M>) -> Result<(), BridgeError> {
        let mut groups = self.groups.write();
        let group = groups
            .entry(endpoint(address).into_owned())
            .or_insert_with(|| EndpointGroup {
                members: Vec::new(),
                next: AtomicUsize::new(0),
            });
        if group
            .members
            .iter()
            .any(|m| m.instance_id() == member.instance_id())
        {
            return Err(BridgeError::AlreadyRegistered(address.to_string()));
        }
        group.members.push(member);
        Ok(())
    }

    /// Removes `instance_id`'s member from the group of `address`. True when there was one.
    pub(crate) fn leave(&self, address: &Address, instance_id: &str) -> bool {
        let mut groups = self.groups.write();
        let key = endpoint(address);
        let Some(group) = groups.get_mut(key.as_ref()) else {
            return false;
        };
        let before = group.members.len();
        group.members.retain(|m| m.instance_id() != instance_id);
        let removed = group.members.len() != before;
        if group.members.is_empty() {
            groups.remove(key.as_ref());
        }
        removed
    }

    /// The next member of `address`'s group, round robin across instances.
    pub(crate) fn pick(&self, address: &Address) -> Option<Arc<M>> {
        let groups = self.groups.read();
        let group = groups.get(endpoint(address).as_ref())?;
        let n = group.members.len();
        let i = if n == 1 {
            0
        } else {
            group.next.fetch_add(1, Ordering::Relaxed) % n
        };
        group.members.get(i).cloned()
    }
}
