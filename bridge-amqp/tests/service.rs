//! The full path: PURISTA services (core's runtime) on RabbitMQ.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use purista_core::service::{
    CommandDef, Context, Empty, Service, SubscriptionContext, SubscriptionDef,
};
use purista_core::{
    Address, CommandError, HandledError, HealthState, MessageType, Outcome, StatusCode, StreamDef,
    StreamItem, StreamWriter,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use common::{dead_letters, dyn_bridge, eventually};

common::runner::test_main! {
    common::BROKER: [
        a_command_served_by_one_service_answers_another_and_its_success_event_reaches_a_subscription,
        a_failing_subscription_is_retried_with_delay_then_dead_lettered,
        a_paused_consumer_turns_service_health_to_warn_until_resumed,
        a_stream_served_by_one_service_is_read_by_another,
    ],
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    sku: String,
    qty: u32,
}

async fn a_command_served_by_one_service_answers_another_and_its_success_event_reaches_a_subscription()
 {
    let broker = common::TestBroker::new("service_round_trip");
    let (orders_bridge, audit_bridge) = (broker.bridge().await, broker.bridge().await);
    let orders = Service::builder("orders", "1")
        .command(
            CommandDef::new(
                "place",
                |_ctx: Context, order: Order, _p: Empty| async move {
                    if order.qty == 0 {
                        return Err(HandledError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "qty must be positive",
                        )
                        .into());
                    }
                    Ok(json!({ "orderId": format!("o-{}", order.sku), "qty": order.qty }))
                },
            )
            .success_event("orderPlaced"),
        )
        .build()
        .start(dyn_bridge(&orders_bridge))
        .await
        .unwrap();

    let placed: Arc<Mutex<Vec<(MessageType, Value)>>> = Arc::default();
    let sink = placed.clone();
    let audit = Service::builder("audit", "1")
        .subscription(
            SubscriptionDef::new(
                "onOrderPlaced",
                move |ctx: SubscriptionContext, payload: Value| {
                    let sink = sink.clone();
                    async move {
                        let kind = ctx.envelope().map(|e| e.message_type);
                        sink.lock().push((kind.unwrap(), payload));
                        Ok(())
                    }
                },
            )
            .event_name("orderPlaced")
            .durable(true),
        )
        .build()
        .start(dyn_bridge(&audit_bridge))
        .await
        .unwrap();

    let result: Value = audit
        .invoke(
            Address::new("orders", "1", "place"),
            Order {
                sku: "A".into(),
                qty: 2,
            },
            Empty,
        )
        .await
        .unwrap();
    assert_eq!(result, json!({ "orderId": "o-A", "qty": 2 }));
    assert!(eventually(Duration::from_secs(5), || placed.lock().len() == 1).await);
    assert_eq!(
        placed.lock()[0],
        (
            MessageType::CommandSuccessResponse,
            json!({ "orderId": "o-A", "qty": 2 })
        )
    );

    let refused: Result<Value, CommandError> = audit
        .invoke(
            Address::new("orders", "1", "place"),
            Order {
                sku: "B".into(),
                qty: 0,
            },
            Empty,
        )
        .await;
    let refused = refused.unwrap_err();
    assert!(refused.handled);
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.message, "qty must be positive");

    let missing: Result<Value, CommandError> = audit
        .invoke(Address::new("orders", "1", "cancel"), Empty, Empty)
        .await;
    assert_eq!(missing.unwrap_err().status, StatusCode::BAD_GATEWAY);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    assert!(audit.shutdown(deadline).await.completed);
    assert!(orders.shutdown(deadline).await.completed);
    broker.finish().await;
}

async fn a_failing_subscription_is_retried_with_delay_then_dead_lettered() {
    let broker = common::TestBroker::new("service_retry");
    let bridge = broker.bridge().await;
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    let running = Service::builder("billing", "1")
        .subscription(
            SubscriptionDef::new("onSold", move |ctx: SubscriptionContext, _p: Value| {
                let counter = counter.clone();
                async move {
                    counter.store(ctx.attempt(), Ordering::SeqCst);
                    anyhow::Result::<()>::Err(anyhow::anyhow!("payment provider down"))
                }
            })
            .event_name("sold")
            .durable(true)
            .max_attempts(2)
            .retry_delay_ms(300)
            .dead_letter_target("billing-failed"),
        )
        .build()
        .start(dyn_bridge(&bridge))
        .await
        .unwrap();

    running.emit("sold", json!({ "n": 1 })).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || attempts.load(Ordering::SeqCst)
            == 2)
        .await
    );
    let found = dead_letters(&bridge, "billing-failed", 1).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].note.attempts, 2);
    assert_eq!(found[0].note.origin, "billing@1/onSold");
    running
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    broker.finish().await;
}

async fn a_paused_consumer_turns_service_health_to_warn_until_resumed() {
    let broker = common::TestBroker::new("service_pause");
    let bridge = broker.bridge().await;
    let seen = Arc::new(AtomicU32::new(0));
    let counter = seen.clone();
    let running = Service::builder("mailer", "1")
        .subscription(
            SubscriptionDef::new("onSold", move |_ctx: SubscriptionContext, _p: Value| {
                let counter = counter.clone();
                async move {
                    if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                        Ok(Outcome::stop_consumer("smtp down"))
                    } else {
                        Ok(Outcome::Ack)
                    }
                }
            })
            .event_name("sold")
            .durable(true)
            .pausable(),
        )
        .build()
        .start(dyn_bridge(&bridge))
        .await
        .unwrap();

    running.emit("sold", json!({})).await.unwrap();
    let mut warned = false;
    for _ in 0..100 {
        if running.health().await.state == HealthState::Warn {
            warned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(warned, "paused consumer shows as warn");
    assert!(
        running
            .resume_subscription_consumer(&"mailer@1/onSold".into())
            .await
            .unwrap()
    );
    assert!(eventually(Duration::from_secs(5), || seen.load(Ordering::SeqCst) == 2).await);
    assert_eq!(running.health().await.state, HealthState::Ok);
    running
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    broker.finish().await;
}

async fn a_stream_served_by_one_service_is_read_by_another() {
    let broker = common::TestBroker::new("service_streams");
    let (ticker_bridge, reader_bridge) = (broker.bridge().await, broker.bridge().await);
    let ticker = Service::builder("ticker", "1")
        .stream(StreamDef::new(
            "ticks",
            |_ctx: Context, n: u32, _p: Empty, out: StreamWriter| async move {
                for i in 0..n {
                    out.write(i).await?;
                }
                Ok(json!({ "ticks": n }))
            },
        ))
        .build()
        .start(dyn_bridge(&ticker_bridge))
        .await
        .expect("a stream endpoint starts on the amqp bridge");
    let reader = Service::builder("reader", "1")
        .build()
        .start(dyn_bridge(&reader_bridge))
        .await
        .unwrap();
    let mut session = reader
        .open_stream(
            Address::new("ticker", "1", "ticks"),
            3,
            Empty,
            Some(Duration::from_secs(5)),
        )
        .await
        .expect("the session opens");
    let mut items = Vec::new();
    while let Some(item) = session.next().await {
        items.push(item);
    }
    assert_eq!(
        items,
        vec![
            StreamItem::Chunk(json!(0)),
            StreamItem::Chunk(json!(1)),
            StreamItem::Chunk(json!(2)),
            StreamItem::Complete(Some(json!({ "ticks": 3 }))),
        ]
    );
    for running in [reader, ticker] {
        running
            .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    }
    broker.finish().await;
}
