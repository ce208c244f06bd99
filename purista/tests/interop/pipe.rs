//! A small [`EventBridge`] whose wire is a loopback socket to the Node peer
//! (`interop/peer.mjs`): one JSON document per line, `{"envelope": …}` for a message, written
//! with [`Envelope::encode`] and read with [`Envelope::decode`], so every message crosses the
//! language boundary as bytes exactly as purista-rs writes and reads them.
//!
//! It routes like any bridge: a command to the handler registered for its endpoint, a response
//! to the invocation waiting on its correlation id, stream frames to their session, everything
//! else to the subscriptions whose filter matches (the reference matcher). It is test support:
//! one instance, no acknowledgements, nothing durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use purista::kit::{check_emittable, stamp, stamp_response};
use purista::stream::{FrameType, frame_type};
use purista::{
    Address, BridgeError, BridgeHealth, Capabilities, CommandHandler, Delivery, DeliveryGuarantee,
    DeliveryHandler, DrainReport, Envelope, EventBridge, FilterSupport, InFlight, MessageType,
    PausedConsumer, RegistrationKey, SettleOnce, Settlement, Settler, StreamConsumerEnd,
    StreamHandler, StreamProducerEnd, SubscriptionOperator, SubscriptionSpec, ids,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// Lines to the peer; the socket writer task drains it.
pub type Wire = mpsc::UnboundedSender<String>;

/// The endpoint of an address: name, version, target (the instance does not route).
fn endpoint(a: &Address) -> Address {
    Address::new(
        a.service_name.as_str(),
        a.service_version.as_str(),
        a.service_target.as_str(),
    )
}

/// Sessions this side consumes, by correlation id: the reader's frames and, once known, the
/// producer's instance.
type Consuming = HashMap<String, (mpsc::Sender<Envelope>, Option<String>)>;

/// See the module docs.
pub struct PipeBridge {
    instance_id: String,
    capabilities: Capabilities,
    wire: Wire,
    commands: Mutex<HashMap<Address, Arc<dyn CommandHandler>>>,
    streams: Mutex<HashMap<Address, Arc<dyn StreamHandler>>>,
    subscriptions: Mutex<Vec<(SubscriptionSpec, Arc<dyn DeliveryHandler>)>>,
    pending: Mutex<HashMap<String, oneshot::Sender<Envelope>>>,
    /// Sessions this side consumes: frames go to the reader; the producer's instance is kept
    /// to address a cancel.
    consuming: Mutex<Consuming>,
    /// Sessions this side produces: a cancel frame from the consumer lands here.
    producing: Mutex<HashMap<String, watch::Sender<Option<String>>>>,
}

/// Settling is a no-op: the pipe has no acknowledgements (at-most-once).
struct NoAck;

#[async_trait]
impl Settler for NoAck {
    async fn settle(self: Box<Self>, _settlement: Settlement) -> Result<(), BridgeError> {
        Ok(())
    }
}

impl PipeBridge {
    /// A bridge writing to `wire`.
    pub fn new(wire: Wire) -> Arc<Self> {
        let mut capabilities = Capabilities::none("interop-pipe");
        capabilities.commands = true;
        capabilities.streams = true;
        capabilities.filters = FilterSupport::Complex;
        capabilities.shared_subscriptions = true;
        capabilities.broadcast_subscriptions = true;
        capabilities.command_delivery = DeliveryGuarantee::AtMostOnce;
        Arc::new(PipeBridge {
            instance_id: ids::new_id(),
            capabilities,
            wire,
            commands: Mutex::default(),
            streams: Mutex::default(),
            subscriptions: Mutex::default(),
            pending: Mutex::default(),
            consuming: Mutex::default(),
            producing: Mutex::default(),
        })
    }

    fn send(&self, envelope: &Envelope) {
        let body = String::from_utf8(envelope.encode()).unwrap_or_default();
        let _ = self.wire.send(format!(r#"{{"envelope":{body}}}"#));
    }

    /// Routes one message that arrived from the peer.
    pub fn receive(self: &Arc<Self>, envelope: Envelope) {
        match envelope.message_type {
            MessageType::Command => self.serve_command(envelope),
            t if t.is_response() => {
                let waiter = envelope
                    .correlation_id
                    .as_deref()
                    .and_then(|c| self.pending.lock().remove(c));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(envelope);
                }
            }
            MessageType::Stream => self.route_frame(envelope),
            _ => self.offer(envelope),
        }
    }

    fn serve_command(self: &Arc<Self>, command: Envelope) {
        let Some(handler) = command
            .receiver
            .as_ref()
            .and_then(|r| self.commands.lock().get(&endpoint(r)).cloned())
        else {
            return; // served on the other side (or nowhere)
        };
        let bridge = self.clone();
        tokio::spawn(async move {
            let command = Arc::new(command);
            let mut response = handler.handle(command.clone()).await;
            stamp_response(&mut response, &command, &bridge.instance_id);
            bridge.send(&response);
        });
    }

    fn route_frame(self: &Arc<Self>, frame: Envelope) {
        let Some(correlation_id) = frame.correlation_id.clone() else {
            return;
        };
        match frame_type(&frame) {
            Some(FrameType::Open) => self.serve_stream(frame, correlation_id),
            Some(FrameType::Cancel)
                if frame
                    .receiver
                    .as_ref()
                    .is_some_and(|r| r.instance_id.as_deref() == Some(&self.instance_id))
                    && self.producing.lock().contains_key(&correlation_id) =>
            {
                let reason = frame.payload["reason"]
                    .as_str()
                    .unwrap_or("cancelled")
                    .to_string();
                if let Some(cancel) = self.producing.lock().get(&correlation_id) {
                    let _ = cancel.send(Some(reason));
                }
            }
            _ => {
                let mut consuming = self.consuming.lock();
                let Some((frames, owner)) = consuming.get_mut(&correlation_id) else {
                    return;
                };
                owner.get_or_insert_with(|| frame.sender.instance_id.clone());
                let terminal = frame_type(&frame).is_some_and(FrameType::is_terminal);
                let _ = frames.try_send(frame);
                if terminal {
                    consuming.remove(&correlation_id);
                }
            }
        }
    }

    fn serve_stream(self: &Arc<Self>, open: Envelope, correlation_id: String) {
        let Some(handler) = open
            .receiver
            .as_ref()
            .and_then(|r| self.streams.lock().get(&endpoint(r)).cloned())
        else {
            return;
        };
        let (frames_tx, mut frames_rx) = mpsc::channel::<Envelope>(64);
        let (cancel_tx, cancel_rx) = watch::channel(None);
        self.producing
            .lock()
            .insert(correlation_id.clone(), cancel_tx);
        let bridge = self.clone();
        tokio::spawn(async move {
            while let Some(mut frame) = frames_rx.recv().await {
                frame.sender.instance_id.clone_from(&bridge.instance_id);
                bridge.send(&frame);
                if frame_type(&frame).is_some_and(FrameType::is_terminal) {
                    break;
                }
            }
            bridge.producing.lock().remove(&correlation_id);
        });
        tokio::spawn(async move {
            let producer = StreamProducerEnd {
                frames: frames_tx,
                cancelled: cancel_rx,
            };
            handler.open(Arc::new(open), producer).await;
        });
    }

    fn offer(self: &Arc<Self>, envelope: Envelope) {
        let envelope = Arc::new(envelope);
        let targets: Vec<_> = self
            .subscriptions
            .lock()
            .iter()
            .filter(|(spec, _)| spec.filter.matches(&envelope))
            .map(|(_, handler)| handler.clone())
            .collect();
        for handler in targets {
            let delivery = Delivery {
                envelope: envelope.clone(),
                attempt: 1,
                settle: SettleOnce::new(envelope.id.clone(), Box::new(NoAck)),
            };
            tokio::spawn(async move { handler.deliver(delivery).await });
        }
    }
}

#[async_trait]
impl SubscriptionOperator for PipeBridge {
    fn paused_subscription_consumers(&self) -> Vec<PausedConsumer> {
        Vec::new()
    }

    async fn resume_subscription_consumer(
        &self,
        _key: &RegistrationKey,
    ) -> Result<bool, BridgeError> {
        Ok(false)
    }
}

#[async_trait]
impl EventBridge for PipeBridge {
    fn name(&self) -> &str {
        "interop-pipe"
    }

    fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn default_command_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    async fn start(&self) -> Result<(), BridgeError> {
        Ok(())
    }

    async fn health(&self) -> BridgeHealth {
        if self.wire.is_closed() {
            BridgeHealth::Unhealthy {
                reason: "the peer's socket is closed".into(),
            }
        } else {
            BridgeHealth::Healthy
        }
    }

    async fn emit(&self, mut message: Envelope) -> Result<(), BridgeError> {
        check_emittable(&message)?;
        stamp(&mut message, &self.instance_id);
        self.send(&message);
        Ok(())
    }

    async fn invoke(&self, mut command: Envelope, ttl: Duration) -> Result<Envelope, BridgeError> {
        stamp(&mut command, &self.instance_id);
        let correlation_id = command
            .correlation_id
            .clone()
            .ok_or_else(|| BridgeError::InvalidRequest("command without correlationId".into()))?;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(correlation_id.clone(), tx);
        self.send(&command);
        match tokio::time::timeout(ttl, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(BridgeError::Unavailable("bridge dropped".into())),
            Err(_) => {
                self.pending.lock().remove(&correlation_id);
                Err(BridgeError::Timeout(
                    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                ))
            }
        }
    }

    async fn register_command(
        &self,
        address: Address,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<(), BridgeError> {
        self.commands.lock().insert(endpoint(&address), handler);
        Ok(())
    }

    async fn unregister_command(&self, address: &Address) -> Result<(), BridgeError> {
        self.commands.lock().remove(&endpoint(address));
        Ok(())
    }

    async fn register_subscription(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<(), BridgeError> {
        self.subscriptions.lock().push((spec, handler));
        Ok(())
    }

    async fn unregister_subscription(&self, key: &RegistrationKey) -> Result<(), BridgeError> {
        self.subscriptions
            .lock()
            .retain(|(spec, _)| &spec.key != key);
        Ok(())
    }

    async fn register_stream(
        &self,
        address: Address,
        handler: Arc<dyn StreamHandler>,
    ) -> Result<(), BridgeError> {
        self.streams.lock().insert(endpoint(&address), handler);
        Ok(())
    }

    async fn unregister_stream(&self, address: &Address) -> Result<(), BridgeError> {
        self.streams.lock().remove(&endpoint(address));
        Ok(())
    }

    async fn open_stream(&self, mut open: Envelope) -> Result<StreamConsumerEnd, BridgeError> {
        stamp(&mut open, &self.instance_id);
        let correlation_id = open.correlation_id.clone().ok_or_else(|| {
            BridgeError::InvalidRequest("open frame without correlationId".into())
        })?;
        let (frames_tx, frames_rx) = mpsc::channel(64);
        let (cancel_tx, mut cancel_rx) = watch::channel(None::<String>);
        self.consuming
            .lock()
            .insert(correlation_id.clone(), (frames_tx, None));
        self.send(&open);
        // The consumer's cancel becomes PURISTA's control frame, addressed to the producer.
        let wire = self.wire.clone();
        let receiver = open.receiver.clone().unwrap_or_default();
        let sender = open.sender.clone();
        tokio::spawn(async move {
            let Ok(reason) = cancel_rx.wait_for(Option::is_some).await.map(|r| r.clone()) else {
                return;
            };
            let mut cancel = Envelope::new(MessageType::Stream, sender);
            cancel.correlation_id = Some(correlation_id);
            cancel.receiver = Some(receiver);
            cancel.payload = json!({ "frameType": "cancel", "reason": reason });
            let body = String::from_utf8(cancel.encode()).unwrap_or_default();
            let _ = wire.send(format!(r#"{{"envelope":{body}}}"#));
        });
        Ok(StreamConsumerEnd {
            frames: frames_rx,
            cancel: cancel_tx,
        })
    }

    fn in_flight(&self) -> InFlight {
        InFlight::default()
    }

    async fn shutdown(&self, _deadline: tokio::time::Instant) -> DrainReport {
        DrainReport {
            completed: true,
            ..DrainReport::default()
        }
    }
}

/// The JSON an envelope is written as, for comparisons.
pub fn as_json(envelope: &Envelope) -> Value {
    serde_json::from_slice(&envelope.encode()).unwrap_or(Value::Null)
}
