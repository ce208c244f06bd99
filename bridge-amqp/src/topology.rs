//! Broker resource names and their declarations: the one place that names things.
//!
//! Everything lives under the configured prefix `P`:
//!
//! | resource | name | kind |
//! |---|---|---|
//! | exchange | `P` (or the configured exchange) | headers, durable |
//! | command queue | `P.cmd.<service>.<version>.<command>` | deleted by its last server when it leaves, so an unserved command is unroutable (502); expires when its servers vanished without leaving |
//! | stream queue | `P.stream.<service>.<version>.<stream>` | unbound: takes open frames through the default exchange; like a command queue: deleted by its last server when it leaves, expires when its servers vanished without leaving |
//! | reply queue | `P.reply.<instance>` | exclusive, auto-delete: lives as long as the instance's connection; also carries the frames of this instance's stream sessions (both ends) |
//! | shared subscription | `P.sub.<service>.<version>.<subscription>` | durable when the subscription is, else expires when unused |
//! | broadcast subscription | `P.sub.<service>.<version>.<subscription>.<instance>` | one per instance, expires when abandoned |
//! | retry queue | `<queue>.retry.<delay ms>` | message TTL = delay, dead-letters back to `<queue>` |
//! | dead-letter queue | `P.<target>.dead-letter` | durable |
//!
//! **Names are injective**: two different addresses never share a queue. Each `<…>` part is
//! escaped with core's [`NameRules`] before the parts are joined with dots: a `.` inside a part
//! becomes `~2e`, a `~` becomes `~7e`, and every other character RabbitMQ would not take in a
//! name (space, `*`, `>`, anything outside printable ASCII) becomes `~` and the hex of its UTF-8
//! bytes. So `orders.v2@1/get` is served from `P.cmd.orders~2ev2.1.get` and `orders@v2.1/get`
//! from `P.cmd.orders.v2~2e1.get`; names made of letters, digits, `-`, `_`, `@` and the like
//! read as before. The kinds keep apart by their first part (`cmd`, `stream`, `reply`, `sub`)
//! or by their number of parts, and the one pair that could meet (a dead-letter target named
//! `reply` and an instance named `dead-letter`) is ruled out by refusing that instance id
//! ([`AmqpConfig::validate`]). A name over [`MAX_NAME_LEN`] bytes is refused at registration
//! with a 400 naming the parts to shorten; only retry queues, whose source queue already fits,
//! are shortened instead (cut, ending in `~h` and a hash of the whole name).
//!
//! In [`TopologyMode::Purista`] the command queues and the shared subscription queues are
//! declared exactly as PURISTA's TypeScript AMQP bridge declares them (same names, flags and
//! arguments), so TypeScript and Rust instances of one service share them; the table in
//! [`TopologyMode`] lists the differences and what they cost.
//!
//! Declarations are idempotent and re-run after every reconnect. Argument sets are a pure
//! function of the names and the config, because RabbitMQ refuses (406) a re-declaration with
//! different arguments. Every declaration waits for the broker at most the given timeout.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
pub(crate) use purista_core::kit::millis;
use purista_core::kit::{NameRules, Overflow, broker_call};
use purista_core::{Address, BridgeError, SubscriptionSpec};

use crate::config::{AmqpConfig, TopologyMode};
use crate::headers;

/// Longest queue or exchange name AMQP allows.
pub const MAX_NAME_LEN: usize = 255;

/// How RabbitMQ names are spelled: dot-separated parts, `~` escapes.
const NAMES: NameRules = NameRules::permissive('.', '~', MAX_NAME_LEN);

/// How long an unused retry queue outlives its delay before the broker removes it.
const RETRY_QUEUE_GRACE: Duration = Duration::from_secs(60);

/// The names of one bridge instance's broker resources.
///
/// ```
/// use purista_bridge_amqp::{AmqpConfig, Topology};
/// use purista_core::Address;
/// let topology = Topology::new(&AmqpConfig::new("amqp://localhost").with_prefix("shop"), "i-1");
/// assert_eq!(topology.command_queue(&Address::new("orders", "1", "place"))?, "shop.cmd.orders.1.place");
/// // A dot inside a part is escaped: these two never share a queue.
/// assert_eq!(topology.command_queue(&Address::new("orders.v2", "1", "get"))?, "shop.cmd.orders~2ev2.1.get");
/// assert_eq!(topology.command_queue(&Address::new("orders", "v2.1", "get"))?, "shop.cmd.orders.v2~2e1.get");
/// assert_eq!(topology.reply_queue(), "shop.reply.i-1");
/// assert_eq!(topology.dead_letter_queue("failed")?, "shop.failed.dead-letter");
/// # Ok::<(), purista_core::BridgeError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    exchange: String,
    instance_id: String,
    reply_queue: String,
    idle_queue_expiry_ms: u64,
    command_queue_expiry_ms: u64,
    mode: TopologyMode,
    purista_durable_command_queues: bool,
}

impl Topology {
    /// Names for `instance_id` under `config`'s prefix.
    pub fn new(config: &AmqpConfig, instance_id: &str) -> Self {
        let reply_queue = NAMES
            .on_overflow(Overflow::Hash)
            .join(&config.prefix, &["reply", instance_id])
            .unwrap_or_else(|_| format!("{}.reply", config.prefix));
        Topology {
            prefix: config.prefix.clone(),
            exchange: config.exchange_name().to_string(),
            instance_id: instance_id.to_string(),
            reply_queue,
            idle_queue_expiry_ms: millis(config.idle_queue_expiry).max(1),
            command_queue_expiry_ms: millis(config.command_queue_expiry).max(1),
            mode: config.topology,
            purista_durable_command_queues: config.purista_durable_command_queues,
        }
    }

    /// How queues are declared.
    pub fn mode(&self) -> TopologyMode {
        self.mode
    }

    /// The flags and arguments of a command queue: this bridge's own (a queue that outlives a
    /// lost connection, removed by its last server or by expiry), or PURISTA's (auto-delete,
    /// no arguments).
    fn command_queue_declaration(&self) -> (QueueDeclareOptions, FieldTable) {
        match self.mode {
            TopologyMode::Native => {
                let mut args = FieldTable::default();
                args.insert("x-expires".into(), int(self.command_queue_expiry_ms));
                (QueueDeclareOptions::default(), args)
            }
            TopologyMode::Purista => (
                QueueDeclareOptions {
                    durable: self.purista_durable_command_queues,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        }
    }

    /// The arguments of a subscription's queue. A queue of one instance (broadcast) expires
    /// once abandoned in both modes; a shared one that is not durable expires too in the native
    /// mode and has no arguments in PURISTA's.
    fn subscription_queue_arguments(&self, spec: &SubscriptionSpec) -> FieldTable {
        let mut args = FieldTable::default();
        let expires = !spec.shared || (!spec.durable && self.mode == TopologyMode::Native);
        if expires {
            args.insert("x-expires".into(), int(self.idle_queue_expiry_ms));
        }
        args
    }

    /// The resource-name prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The headers exchange every message is published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The queue a command endpoint is served from.
    ///
    /// # Errors
    /// [`BridgeError::InvalidRequest`] when the name would be longer than [`MAX_NAME_LEN`].
    pub fn command_queue(&self, address: &Address) -> Result<String, BridgeError> {
        self.endpoint("cmd", address)
    }

    /// The queue a stream endpoint takes its open frames from.
    ///
    /// ```
    /// use purista_bridge_amqp::{AmqpConfig, Topology};
    /// use purista_core::Address;
    /// let topology = Topology::new(&AmqpConfig::new("amqp://localhost").with_prefix("shop"), "i-1");
    /// assert_eq!(topology.stream_queue(&Address::new("orders", "1", "feed"))?, "shop.stream.orders.1.feed");
    /// # Ok::<(), purista_core::BridgeError>(())
    /// ```
    ///
    /// # Errors
    /// [`BridgeError::InvalidRequest`] when the name would be longer than [`MAX_NAME_LEN`].
    pub fn stream_queue(&self, address: &Address) -> Result<String, BridgeError> {
        self.endpoint("stream", address)
    }

    fn endpoint(&self, kind: &str, address: &Address) -> Result<String, BridgeError> {
        NAMES
            .join(
                &self.prefix,
                &[
                    kind,
                    &address.service_name,
                    &address.service_version,
                    &address.service_target,
                ],
            )
            .map_err(|e| too_long(e, "service, version or target names"))
    }

    /// This instance's reply queue.
    pub fn reply_queue(&self) -> &str {
        &self.reply_queue
    }

    /// The queue of a subscription: one per subscription when shared, one per instance when
    /// broadcast.
    ///
    /// # Errors
    /// [`BridgeError::InvalidRequest`] when the name would be longer than [`MAX_NAME_LEN`].
    pub fn subscription_queue(&self, spec: &SubscriptionSpec) -> Result<String, BridgeError> {
        let s = &spec.subscriber;
        let mut parts = vec![
            "sub",
            s.service_name.as_str(),
            s.service_version.as_str(),
            s.service_target.as_str(),
        ];
        if !spec.shared {
            parts.push(&self.instance_id);
        }
        NAMES
            .join(&self.prefix, &parts)
            .map_err(|e| too_long(e, "subscriber service, version or subscription names"))
    }

    /// The retry queue that holds messages of `queue` (a name of this topology) for `delay`
    /// before they return to it. Shortened with a hash when it would be too long.
    pub fn retry_queue(&self, queue: &str, delay: Duration) -> String {
        let name = format!("{queue}.retry.{}", millis(delay));
        NAMES
            .on_overflow(Overflow::Hash)
            .fit(name)
            .unwrap_or_else(|_| queue.to_string())
    }

    /// The queue behind a dead-letter target.
    ///
    /// # Errors
    /// [`BridgeError::InvalidRequest`] for an empty target or a name longer than
    /// [`MAX_NAME_LEN`].
    pub fn dead_letter_queue(&self, target: &str) -> Result<String, BridgeError> {
        if target.is_empty() {
            return Err(BridgeError::InvalidRequest(
                "a dead-letter target needs a name".into(),
            ));
        }
        NAMES
            .join(&self.prefix, &[target, "dead-letter"])
            .map_err(|e| too_long(e, "dead-letter target"))
    }

    /// True for a name under this prefix's subscription queues: the only queues a dead-letter
    /// replay sends messages to, whatever a header names.
    pub(crate) fn is_subscription_queue(&self, queue: &str) -> bool {
        queue
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix(".sub."))
            .is_some_and(|rest| !rest.is_empty())
    }
}

fn too_long(error: BridgeError, what: &str) -> BridgeError {
    match error {
        BridgeError::InvalidRequest(text) => {
            BridgeError::InvalidRequest(format!("{text}; use shorter {what}"))
        }
        other => other,
    }
}

/// A queue or exchange name as AMQP wants it; names over 255 bytes are refused, not truncated.
pub(crate) fn name(s: &str) -> Result<ShortString, BridgeError> {
    ShortString::try_new(s).map_err(|_| {
        BridgeError::InvalidRequest(format!(
            "resource name `{s}` is longer than {MAX_NAME_LEN} bytes"
        ))
    })
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn int(v: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Maps a broker failure during a declaration to a bridge error naming the resource.
pub(crate) fn broker_error(what: &str, resource: &str, e: &lapin::Error) -> BridgeError {
    let text = format!("{what} `{resource}` failed: {e}");
    if connection_lost(e) {
        // Retryable: the same call can succeed once the bridge has reconnected.
        BridgeError::Unavailable(text)
    } else {
        BridgeError::Broker(text)
    }
}

/// Whether `e` is the connection failing (closed by the broker or the network, no heartbeat)
/// rather than the broker refusing this one request.
fn connection_lost(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::InvalidChannelState(..)
        | lapin::ErrorKind::MissingHeartbeatError => true,
        lapin::ErrorKind::ProtocolError(amqp) => {
            matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Hard(_))
        }
        _ => false,
    }
}

/// One broker round trip of a declaration, bounded by `timeout`; a refusal names the resource.
async fn call<T>(
    timeout: Duration,
    what: &str,
    resource: &str,
    fut: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BridgeError> {
    broker_call(timeout, what, async {
        fut.await.map_err(|e| broker_error(what, resource, &e))
    })
    .await
}

/// Declares the durable headers exchange.
pub(crate) async fn declare_exchange(
    ch: &Channel,
    topology: &Topology,
    timeout: Duration,
) -> Result<(), BridgeError> {
    let exchange = topology.exchange();
    call(
        timeout,
        "declaring exchange",
        exchange,
        ch.exchange_declare(
            name(exchange)?,
            ExchangeKind::Headers,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

/// Declares this instance's reply queue and binds it on the `replyTo` header, PURISTA's way of
/// addressing responses (a PURISTA TypeScript responder copies `replyTo` into that header).
pub(crate) async fn declare_reply_queue(
    ch: &Channel,
    topology: &Topology,
    timeout: Duration,
) -> Result<(), BridgeError> {
    let queue = topology.reply_queue();
    call(
        timeout,
        "declaring reply queue",
        queue,
        ch.queue_declare(
            name(queue)?,
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert("x-match".into(), long("all"));
    args.insert(headers::REPLY_TO.into(), long(queue));
    bind(ch, topology, queue, args, timeout).await
}

/// Declares a command endpoint's queue and binds it to commands for that receiver.
///
/// Natively not auto-delete: a queue whose consumers vanished with their connection (a crash,
/// a network fault) keeps taking commands until its instances are back or `x-expires` removes
/// it. An instance that leaves on purpose deletes it when it was the last consumer
/// ([`retire_command_queue`]), so a command nobody serves fails with 502 at once. In the
/// PURISTA mode the queue is auto-delete, as PURISTA declares it: the broker deletes it when its
/// last consumer goes, for whatever reason.
pub(crate) async fn declare_command_queue(
    ch: &Channel,
    topology: &Topology,
    address: &Address,
    timeout: Duration,
) -> Result<String, BridgeError> {
    let queue = topology.command_queue(address)?;
    let (options, args) = topology.command_queue_declaration();
    call(
        timeout,
        "declaring command queue",
        &queue,
        ch.queue_declare(name(&queue)?, options, args),
    )
    .await?;
    let binding = headers::command_binding(address);
    bind(ch, topology, &queue, binding, timeout).await?;
    Ok(queue)
}

/// Declares a stream endpoint's queue. Same lifetime rules as a command queue
/// ([`declare_command_queue`]), same expiry, but no binding: open frames are published through
/// the default exchange straight to it, so they never reach a subscription queue.
pub(crate) async fn declare_stream_queue(
    ch: &Channel,
    topology: &Topology,
    address: &Address,
    timeout: Duration,
) -> Result<String, BridgeError> {
    let queue = topology.stream_queue(address)?;
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), int(topology.command_queue_expiry_ms));
    call(
        timeout,
        "declaring stream queue",
        &queue,
        ch.queue_declare(name(&queue)?, QueueDeclareOptions::default(), args),
    )
    .await?;
    Ok(queue)
}

/// Deletes a command (or stream) queue unless another instance still consumes it.
///
/// Another instance serving it is the normal case in a deployment of several instances, so it
/// is asked first (a passive declare reports the consumers); only a queue nobody consumes is
/// deleted, `if-unused` still, should a consumer arrive in between (the broker then refuses,
/// which closes the channel of its own this runs on).
pub(crate) async fn retire_command_queue(
    connection: &lapin::Connection,
    queue: &str,
    timeout: Duration,
) {
    let Ok(queue_name) = name(queue) else {
        return;
    };
    let retired = broker_call(timeout, "retiring a command queue", async {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| broker_error("opening a channel to retire", queue, &e))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue_name.clone(), passive, FieldTable::default())
            .await;
        let outcome = match declared {
            Ok(state) if state.consumer_count() > 0 => {
                tracing::debug!(%queue, consumers = state.consumer_count(), "other instances still serve it: command queue kept");
                Ok(())
            }
            // Gone already (expired, or another instance deleted it): the channel is closed.
            Err(_) => return Ok(()),
            Ok(_) => {
                let options = QueueDeleteOptions {
                    if_unused: true,
                    ..QueueDeleteOptions::default()
                };
                channel
                    .queue_delete(queue_name, options)
                    .await
                    .map(|_| tracing::debug!(%queue, "last server left: command queue deleted"))
                    .map_err(|e| broker_error("deleting", queue, &e))
            }
        };
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        outcome
    })
    .await;
    if let Err(error) = retired {
        tracing::debug!(%queue, %error, "command queue not retired");
    }
}

/// Purges `queue`; returns how many messages it held. A queue that does not exist holds none.
/// Runs on a channel of its own: the broker answers a missing queue by closing the channel.
pub(crate) async fn purge_queue(
    connection: &lapin::Connection,
    queue: &str,
    timeout: Duration,
) -> Result<usize, BridgeError> {
    let queue_name = name(queue)?;
    broker_call(timeout, "purging a queue", async {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| BridgeError::client("opening a channel to purge a queue", e, true))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        if channel
            .queue_declare(queue_name.clone(), passive, FieldTable::default())
            .await
            .is_err()
        {
            return Ok(0);
        }
        let purged = channel
            .queue_purge(queue_name, lapin::options::QueuePurgeOptions::default())
            .await
            .map_err(|e| broker_error("purging queue", queue, &e))?;
        let _ = channel.close(200, "OK".into()).await;
        Ok(usize::try_from(purged).unwrap_or(usize::MAX))
    })
    .await
}

/// Declares a subscription's queue (and its dead-letter queue) and binds it with its filter.
pub(crate) async fn declare_subscription_queue(
    ch: &Channel,
    topology: &Topology,
    spec: &SubscriptionSpec,
    timeout: Duration,
) -> Result<String, BridgeError> {
    let queue = topology.subscription_queue(spec)?;
    // A broadcast queue belongs to one instance: it is deleted at unregister, and the broker
    // removes it once abandoned by a crashed instance. It is not exclusive, so it survives a
    // reconnect (nothing is lost while the connection is down) and a pause (an exclusive
    // auto-delete queue would vanish with its cancelled consumer).
    let args = topology.subscription_queue_arguments(spec);
    call(
        timeout,
        "declaring subscription queue",
        &queue,
        ch.queue_declare(
            name(&queue)?,
            QueueDeclareOptions {
                durable: spec.durable,
                ..QueueDeclareOptions::default()
            },
            args,
        ),
    )
    .await?;
    bind(
        ch,
        topology,
        &queue,
        headers::filter_binding(&spec.filter),
        timeout,
    )
    .await?;
    if let Some(target) = &spec.policy.dead_letter_target {
        declare_dead_letter_queue(ch, topology, target, timeout).await?;
    }
    Ok(queue)
}

/// Declares the durable queue behind a dead-letter target.
pub(crate) async fn declare_dead_letter_queue(
    ch: &Channel,
    topology: &Topology,
    target: &str,
    timeout: Duration,
) -> Result<String, BridgeError> {
    let queue = topology.dead_letter_queue(target)?;
    call(
        timeout,
        "declaring dead-letter queue",
        &queue,
        ch.queue_declare(
            name(&queue)?,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(queue)
}

/// Declares the retry queue for `queue` and `delay`: messages wait there for `delay` (queue
/// TTL) and are then dead-lettered through the default exchange straight back to `queue`.
///
/// Declared before every use: the declaration also renews the queue's expiry, which therefore
/// only needs to outlast one delay.
pub(crate) async fn declare_retry_queue(
    ch: &Channel,
    topology: &Topology,
    queue: &str,
    delay: Duration,
    timeout: Duration,
) -> Result<String, BridgeError> {
    let retry = topology.retry_queue(queue, delay);
    let delay_ms = millis(delay);
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), int(delay_ms));
    args.insert("x-dead-letter-exchange".into(), long(""));
    args.insert("x-dead-letter-routing-key".into(), long(queue));
    args.insert(
        "x-expires".into(),
        int(delay_ms.saturating_add(millis(RETRY_QUEUE_GRACE))),
    );
    call(
        timeout,
        "declaring retry queue",
        &retry,
        ch.queue_declare(
            name(&retry)?,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        ),
    )
    .await?;
    Ok(retry)
}

async fn bind(
    ch: &Channel,
    topology: &Topology,
    queue: &str,
    args: FieldTable,
    timeout: Duration,
) -> Result<(), BridgeError> {
    call(
        timeout,
        "binding queue",
        queue,
        ch.queue_bind(
            name(queue)?,
            name(topology.exchange())?,
            ShortString::from(""),
            QueueBindOptions::default(),
            args,
        ),
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use purista_core::{FailurePolicy, SubscriptionFilter};

    use super::*;

    #[test]
    fn a_lost_connection_is_retryable_and_a_refused_request_is_not() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
        let forced: lapin::Error = lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - test".into(),
        ))
        .into();
        let reset: lapin::Error =
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer").into();
        let missing: lapin::Error = lapin::ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no queue".into(),
        ))
        .into();
        for lost in [&forced, &reset] {
            let error = broker_error("reading", "q.dead-letter", lost);
            assert!(
                matches!(error, BridgeError::Unavailable(_)) && error.is_retryable(),
                "{error:?}"
            );
            assert!(error.to_string().contains("q.dead-letter"), "{error}");
        }
        let error = broker_error("reading", "q.dead-letter", &missing);
        assert!(
            matches!(error, BridgeError::Broker(_)) && !error.is_retryable(),
            "{error:?}"
        );
    }

    fn spec(shared: bool) -> SubscriptionSpec {
        spec_of(Address::new("billing", "2", "onPaid"), shared)
    }

    fn spec_of(subscriber: Address, shared: bool) -> SubscriptionSpec {
        SubscriptionSpec {
            key: subscriber.to_string().into(),
            subscriber,
            filter: SubscriptionFilter::new(),
            shared,
            durable: true,
            policy: FailurePolicy::default(),
            prefetch: 1,
        }
    }

    fn topology() -> Topology {
        Topology::new(&AmqpConfig::new("amqp://h").with_prefix("p"), "inst")
    }

    #[test]
    fn shared_subscriptions_have_one_queue_and_broadcast_one_per_instance() {
        let t = topology();
        assert_eq!(
            t.subscription_queue(&spec(true)).unwrap(),
            "p.sub.billing.2.onPaid"
        );
        assert_eq!(
            t.subscription_queue(&spec(false)).unwrap(),
            "p.sub.billing.2.onPaid.inst"
        );
    }

    #[test]
    fn retry_queues_are_named_by_source_and_delay() {
        let t = topology();
        assert_eq!(
            t.retry_queue("p.sub.billing.2.onPaid", Duration::from_millis(1500)),
            "p.sub.billing.2.onPaid.retry.1500"
        );
        let long = t.retry_queue(&"q".repeat(250), Duration::from_millis(1500));
        assert!(long.len() <= MAX_NAME_LEN, "shortened: {long}");
    }

    #[test]
    fn addresses_that_join_alike_get_names_of_their_own() {
        let t = topology();
        let pairs = [
            (
                Address::new("orders.v2", "1", "get"),
                Address::new("orders", "v2.1", "get"),
            ),
            (Address::new("a", "b.c", "d"), Address::new("a.b", "c", "d")),
            (Address::new("a~2e", "b", "c"), Address::new("a.", "b", "c")),
        ];
        for (a, b) in pairs {
            assert_ne!(t.command_queue(&a).unwrap(), t.command_queue(&b).unwrap());
            assert_ne!(t.stream_queue(&a).unwrap(), t.stream_queue(&b).unwrap());
            assert_ne!(
                t.subscription_queue(&spec_of(a.clone(), true)).unwrap(),
                t.subscription_queue(&spec_of(b.clone(), true)).unwrap()
            );
        }
    }

    #[test]
    fn no_two_kinds_of_resource_share_a_name() {
        let t = topology();
        // Parts chosen to look like the other kinds' tags and suffixes.
        let parts = [
            "cmd",
            "stream",
            "reply",
            "sub",
            "retry",
            "dead-letter",
            "inst",
            "1",
        ];
        let mut names = HashSet::new();
        let mut count = 0;
        for a in parts {
            for b in parts {
                for c in parts {
                    let address = Address::new(a, b, c);
                    let shared = spec_of(address.clone(), true);
                    let broadcast = spec_of(address.clone(), false);
                    let shared_queue = t.subscription_queue(&shared).unwrap();
                    let broadcast_queue = t.subscription_queue(&broadcast).unwrap();
                    for name in [
                        t.command_queue(&address).unwrap(),
                        t.stream_queue(&address).unwrap(),
                        t.retry_queue(&shared_queue, Duration::from_millis(5)),
                        t.retry_queue(&broadcast_queue, Duration::from_millis(5)),
                        shared_queue,
                        broadcast_queue,
                    ] {
                        names.insert(name);
                        count += 1;
                    }
                }
                names.insert(t.dead_letter_queue(a).unwrap());
                count += 1;
            }
        }
        names.insert(t.reply_queue().to_string());
        count += 1;
        // Each dead-letter target was named |parts| times over.
        let repeated_targets = parts.len() * (parts.len() - 1);
        assert_eq!(names.len(), count - repeated_targets);
    }

    #[test]
    fn only_subscription_queues_under_the_prefix_are_replay_destinations() {
        let t = topology();
        assert!(t.is_subscription_queue(&t.subscription_queue(&spec(true)).unwrap()));
        assert!(t.is_subscription_queue(&t.subscription_queue(&spec(false)).unwrap()));
        assert!(!t.is_subscription_queue("p.sub."));
        assert!(!t.is_subscription_queue("p.cmd.billing.2.pay"));
        assert!(!t.is_subscription_queue("other.sub.billing.2.onPaid"));
        assert!(!t.is_subscription_queue("p.reply.inst"));
    }

    #[test]
    fn names_longer_than_255_bytes_are_refused_with_what_to_shorten() {
        assert!(name(&"x".repeat(255)).is_ok());
        assert!(matches!(
            name(&"x".repeat(256)),
            Err(BridgeError::InvalidRequest(_))
        ));
        let error = topology()
            .command_queue(&Address::new("x".repeat(300), "1", "y"))
            .unwrap_err();
        assert!(
            matches!(&error, BridgeError::InvalidRequest(text) if text.contains("shorter")),
            "{error:?}"
        );
        assert!(topology().dead_letter_queue("").is_err());
    }

    #[test]
    fn the_purista_mode_declares_command_and_shared_queues_as_purista_does() {
        let native = topology();
        let purista = Topology::new(
            &AmqpConfig::new("amqp://h")
                .with_prefix("p")
                .with_topology(TopologyMode::Purista),
            "inst",
        );
        let (options, args) = native.command_queue_declaration();
        assert!(!options.auto_delete && args.contains_key("x-expires"));
        let (options, args) = purista.command_queue_declaration();
        assert!(options.auto_delete && !options.durable && !options.exclusive);
        assert!(args.inner().is_empty(), "{args:?}");

        let mut transient = spec(true);
        transient.durable = false;
        assert!(
            native
                .subscription_queue_arguments(&transient)
                .contains_key("x-expires")
        );
        assert!(
            purista
                .subscription_queue_arguments(&transient)
                .inner()
                .is_empty()
        );
        for t in [&native, &purista] {
            assert!(
                t.subscription_queue_arguments(&spec(true))
                    .inner()
                    .is_empty()
            );
            assert!(
                t.subscription_queue_arguments(&spec(false))
                    .contains_key("x-expires")
            );
        }
        // Same names in both modes: PURISTA's `<prefix>.cmd.…` and `<prefix>.sub.…`.
        let address = Address::new("billing", "2", "pay");
        assert_eq!(
            native.command_queue(&address).unwrap(),
            purista.command_queue(&address).unwrap()
        );
        assert_eq!(
            purista.command_queue(&address).unwrap(),
            "p.cmd.billing.2.pay"
        );
    }

    #[test]
    fn the_exchange_defaults_to_the_prefix() {
        assert_eq!(topology().exchange(), "p");
        let mut config = AmqpConfig::new("amqp://h").with_prefix("p");
        config.exchange = Some("events".into());
        assert_eq!(Topology::new(&config, "i").exchange(), "events");
    }
}
