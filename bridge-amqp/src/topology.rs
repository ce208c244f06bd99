//! Broker resource names and their declarations.
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
//! Declarations are idempotent and re-run after every reconnect. Argument sets are a pure
//! function of the names and the config, because RabbitMQ refuses (406) a re-declaration with
//! different arguments.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
pub(crate) use purista_core::kit::millis;
use purista_core::{Address, BridgeError, SubscriptionSpec};

use crate::config::AmqpConfig;
use crate::headers;

/// Longest queue or exchange name AMQP allows.
pub const MAX_NAME_LEN: usize = 255;

/// How long an unused retry queue outlives its delay before the broker removes it.
const RETRY_QUEUE_GRACE: Duration = Duration::from_secs(60);

/// The names of one bridge instance's broker resources.
///
/// ```
/// use purista_bridge_amqp::{AmqpConfig, Topology};
/// use purista_core::Address;
/// let topology = Topology::new(&AmqpConfig::new("amqp://localhost").with_prefix("shop"), "i-1");
/// assert_eq!(topology.command_queue(&Address::new("orders", "1", "place")), "shop.cmd.orders.1.place");
/// assert_eq!(topology.reply_queue(), "shop.reply.i-1");
/// assert_eq!(topology.dead_letter_queue("failed"), "shop.failed.dead-letter");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    exchange: String,
    instance_id: String,
    idle_queue_expiry_ms: u64,
    command_queue_expiry_ms: u64,
}

impl Topology {
    /// Names for `instance_id` under `config`'s prefix.
    pub fn new(config: &AmqpConfig, instance_id: &str) -> Self {
        Topology {
            prefix: config.prefix.clone(),
            exchange: config.exchange_name().to_string(),
            instance_id: instance_id.to_string(),
            idle_queue_expiry_ms: millis(config.idle_queue_expiry).max(1),
            command_queue_expiry_ms: millis(config.command_queue_expiry).max(1),
        }
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
    pub fn command_queue(&self, address: &Address) -> String {
        format!(
            "{}.cmd.{}.{}.{}",
            self.prefix, address.service_name, address.service_version, address.service_target
        )
    }

    /// The queue a stream endpoint takes its open frames from.
    ///
    /// ```
    /// use purista_bridge_amqp::{AmqpConfig, Topology};
    /// use purista_core::Address;
    /// let topology = Topology::new(&AmqpConfig::new("amqp://localhost").with_prefix("shop"), "i-1");
    /// assert_eq!(topology.stream_queue(&Address::new("orders", "1", "feed")), "shop.stream.orders.1.feed");
    /// ```
    pub fn stream_queue(&self, address: &Address) -> String {
        format!(
            "{}.stream.{}.{}.{}",
            self.prefix, address.service_name, address.service_version, address.service_target
        )
    }

    /// This instance's reply queue.
    pub fn reply_queue(&self) -> String {
        format!("{}.reply.{}", self.prefix, self.instance_id)
    }

    /// The queue of a subscription: one per subscription when shared, one per instance when
    /// broadcast.
    pub fn subscription_queue(&self, spec: &SubscriptionSpec) -> String {
        let s = &spec.subscriber;
        let base = format!(
            "{}.sub.{}.{}.{}",
            self.prefix, s.service_name, s.service_version, s.service_target
        );
        if spec.shared {
            base
        } else {
            format!("{base}.{}", self.instance_id)
        }
    }

    /// The retry queue that holds messages of `queue` for `delay` before they return to it.
    pub fn retry_queue(&self, queue: &str, delay: Duration) -> String {
        format!("{queue}.retry.{}", millis(delay))
    }

    /// The queue behind a dead-letter target.
    pub fn dead_letter_queue(&self, target: &str) -> String {
        format!("{}.{target}.dead-letter", self.prefix)
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

/// A queue or exchange name as AMQP wants it; names over 255 bytes are refused, not truncated.
pub(crate) fn name(s: &str) -> Result<ShortString, BridgeError> {
    ShortString::try_new(s).map_err(|_| {
        BridgeError::InvalidRequest(format!(
            "resource name `{s}` is longer than {MAX_NAME_LEN} bytes; use shorter service, version or target names"
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
    BridgeError::Broker(format!("{what} `{resource}` failed: {e}"))
}

/// Declares the durable headers exchange.
pub(crate) async fn declare_exchange(ch: &Channel, topology: &Topology) -> Result<(), BridgeError> {
    ch.exchange_declare(
        name(topology.exchange())?,
        ExchangeKind::Headers,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| broker_error("declaring exchange", topology.exchange(), &e))
}

/// Declares this instance's reply queue and binds it on the `replyTo` header, PURISTA's way of
/// addressing responses (a PURISTA TypeScript responder copies `replyTo` into that header).
pub(crate) async fn declare_reply_queue(
    ch: &Channel,
    topology: &Topology,
) -> Result<(), BridgeError> {
    let queue = topology.reply_queue();
    ch.queue_declare(
        name(&queue)?,
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| broker_error("declaring reply queue", &queue, &e))?;
    let mut args = FieldTable::default();
    args.insert("x-match".into(), long("all"));
    args.insert(headers::REPLY_TO.into(), long(&queue));
    bind(ch, topology, &queue, args).await
}

/// Declares a command endpoint's queue and binds it to commands for that receiver.
///
/// Not auto-delete: a queue whose consumers vanished with their connection (a crash, a network
/// fault) keeps taking commands until its instances are back or `x-expires` removes it. An
/// instance that leaves on purpose deletes it when it was the last consumer
/// ([`retire_command_queue`]), so a command nobody serves fails with 502 at once.
pub(crate) async fn declare_command_queue(
    ch: &Channel,
    topology: &Topology,
    address: &Address,
) -> Result<String, BridgeError> {
    let queue = topology.command_queue(address);
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), int(topology.command_queue_expiry_ms));
    ch.queue_declare(name(&queue)?, QueueDeclareOptions::default(), args)
        .await
        .map_err(|e| broker_error("declaring command queue", &queue, &e))?;
    bind(ch, topology, &queue, headers::command_binding(address)).await?;
    Ok(queue)
}

/// Declares a stream endpoint's queue. Same lifetime rules as a command queue
/// ([`declare_command_queue`]), same expiry, but no binding: open frames are published through
/// the default exchange straight to it, so they never reach a subscription queue.
pub(crate) async fn declare_stream_queue(
    ch: &Channel,
    topology: &Topology,
    address: &Address,
) -> Result<String, BridgeError> {
    let queue = topology.stream_queue(address);
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), int(topology.command_queue_expiry_ms));
    ch.queue_declare(name(&queue)?, QueueDeclareOptions::default(), args)
        .await
        .map_err(|e| broker_error("declaring stream queue", &queue, &e))?;
    Ok(queue)
}

/// Deletes a command (or stream) queue unless another instance still consumes it. Runs on a
/// channel of its own: the broker answers an "in use" refusal by closing the channel.
pub(crate) async fn retire_command_queue(connection: &lapin::Connection, queue: &str) {
    let Ok(queue_name) = name(queue) else {
        return;
    };
    let channel = match connection.create_channel().await {
        Ok(channel) => channel,
        Err(error) => {
            tracing::debug!(%queue, %error, "no channel to retire a command queue");
            return;
        }
    };
    let options = QueueDeleteOptions {
        if_unused: true,
        ..QueueDeleteOptions::default()
    };
    match channel.queue_delete(queue_name, options).await {
        Ok(_) => {
            tracing::debug!(%queue, "last server left: command queue deleted");
            let _ = channel.close(200, "OK".into()).await;
        }
        // 406 PRECONDITION_FAILED: other instances still serve it (the channel is closed).
        Err(error) => tracing::debug!(%queue, %error, "command queue kept"),
    }
}

/// Purges `queue`; returns how many messages it held. A queue that does not exist holds none.
/// Runs on a channel of its own: the broker answers a missing queue by closing the channel.
pub(crate) async fn purge_queue(
    session: &crate::reconnect::Session,
    queue: &str,
) -> Result<usize, BridgeError> {
    let queue_name = name(queue)?;
    let channel = session
        .connection
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
}

/// Declares a subscription's queue (and its dead-letter queue) and binds it with its filter.
pub(crate) async fn declare_subscription_queue(
    ch: &Channel,
    topology: &Topology,
    spec: &SubscriptionSpec,
) -> Result<String, BridgeError> {
    let queue = topology.subscription_queue(spec);
    let mut args = FieldTable::default();
    if !spec.shared || !spec.durable {
        // A broadcast queue belongs to one instance: it is deleted at unregister, and the
        // broker removes it once abandoned by a crashed instance. It is not exclusive, so it
        // survives a reconnect (nothing is lost while the connection is down) and a pause
        // (an exclusive auto-delete queue would vanish with its cancelled consumer). A
        // non-durable shared queue likewise disappears once no instance consumes it.
        args.insert("x-expires".into(), int(topology.idle_queue_expiry_ms));
    }
    ch.queue_declare(
        name(&queue)?,
        QueueDeclareOptions {
            durable: spec.durable,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .map_err(|e| broker_error("declaring subscription queue", &queue, &e))?;
    bind(ch, topology, &queue, headers::filter_binding(&spec.filter)).await?;
    if let Some(target) = &spec.policy.dead_letter_target {
        declare_dead_letter_queue(ch, topology, target).await?;
    }
    Ok(queue)
}

/// Declares the durable queue behind a dead-letter target.
pub(crate) async fn declare_dead_letter_queue(
    ch: &Channel,
    topology: &Topology,
    target: &str,
) -> Result<String, BridgeError> {
    let queue = topology.dead_letter_queue(target);
    ch.queue_declare(
        name(&queue)?,
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| broker_error("declaring dead-letter queue", &queue, &e))?;
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
    ch.queue_declare(
        name(&retry)?,
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .map_err(|e| broker_error("declaring retry queue", &retry, &e))?;
    Ok(retry)
}

async fn bind(
    ch: &Channel,
    topology: &Topology,
    queue: &str,
    args: FieldTable,
) -> Result<(), BridgeError> {
    ch.queue_bind(
        name(queue)?,
        name(topology.exchange())?,
        ShortString::from(""),
        QueueBindOptions::default(),
        args,
    )
    .await
    .map_err(|e| broker_error("binding queue", queue, &e))
}

#[cfg(test)]
mod tests {
    use purista_core::{FailurePolicy, SubscriptionFilter};

    use super::*;

    fn spec(shared: bool) -> SubscriptionSpec {
        SubscriptionSpec {
            key: "billing@2/onPaid".into(),
            subscriber: Address::new("billing", "2", "onPaid"),
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
        assert_eq!(t.subscription_queue(&spec(true)), "p.sub.billing.2.onPaid");
        assert_eq!(
            t.subscription_queue(&spec(false)),
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
    }

    #[test]
    fn only_subscription_queues_under_the_prefix_are_replay_destinations() {
        let t = topology();
        assert!(t.is_subscription_queue(&t.subscription_queue(&spec(true))));
        assert!(t.is_subscription_queue(&t.subscription_queue(&spec(false))));
        assert!(!t.is_subscription_queue("p.sub."));
        assert!(!t.is_subscription_queue("p.cmd.billing.2.pay"));
        assert!(!t.is_subscription_queue("other.sub.billing.2.onPaid"));
        assert!(!t.is_subscription_queue("p.reply.inst"));
    }

    #[test]
    fn names_longer_than_255_bytes_are_refused() {
        assert!(name(&"x".repeat(255)).is_ok());
        assert!(matches!(
            name(&"x".repeat(256)),
            Err(BridgeError::InvalidRequest(_))
        ));
    }

    #[test]
    fn the_exchange_defaults_to_the_prefix() {
        assert_eq!(topology().exchange(), "p");
        let mut config = AmqpConfig::new("amqp://h").with_prefix("p");
        config.exchange = Some("events".into());
        assert_eq!(Topology::new(&config, "i").exchange(), "events");
    }
}
