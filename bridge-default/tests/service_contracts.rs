//! The public API of a command (issue 8): a typed contract shared by server and client,
//! handlers with or without a parameter, business error types, and a `CommandError` a caller
//! can match on.

use std::sync::Arc;
use std::time::Duration;

use purista_bridge_default::{MemoryBridgeConfig, MemoryBroker};
use purista_core::service::{CommandContract, Empty};
use purista_core::{
    Address, BusinessError, CommandDef, CommandErrorKind, Context, EventBridge, InvokeOptions,
    RunningService, Service, StartError, StatusCode,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reserve {
    sku: String,
    quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reservation {
    reservation_id: String,
    quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
struct Priority {
    express: bool,
}

#[derive(Debug, thiserror::Error)]
enum StockError {
    #[error("only {available} of {sku} left")]
    Insufficient { sku: String, available: u32 },
    #[error("the stock database is down: {0}")]
    Database(String),
}

impl BusinessError for StockError {
    fn status(&self) -> StatusCode {
        match self {
            StockError::Insufficient { .. } => StatusCode::CONFLICT,
            StockError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn data(&self) -> Option<Value> {
        match self {
            StockError::Insufficient { available, .. } => Some(json!({ "available": available })),
            StockError::Database(_) => None,
        }
    }

    fn is_handled(&self) -> bool {
        matches!(self, StockError::Insufficient { .. })
    }
}

/// Without a parameter, with the default error type.
const PEEK: CommandContract<String, u32> = CommandContract::new("stock", "1", "peek");
/// With a parameter and a business error type.
const RESERVE: CommandContract<Reserve, Reservation, Priority, StockError> =
    CommandContract::new("stock", "1", "reserve");

fn stock_service() -> Service {
    Service::builder("stock", "1")
        .command(PEEK.handler(|_ctx: Context, sku: String| async move {
            Ok(if sku == "apple" { 3 } else { 0 })
        }))
        .command(
            RESERVE.handler(|_ctx: Context, r: Reserve, priority: Priority| async move {
                if r.sku == "broken" {
                    return Err(StockError::Database("connection refused".into()));
                }
                if r.quantity > 3 {
                    return Err(StockError::Insufficient {
                        sku: r.sku,
                        available: 3,
                    });
                }
                let lane = if priority.express { "x" } else { "n" };
                Ok(Reservation {
                    reservation_id: format!("{lane}-{}", r.sku),
                    quantity: r.quantity,
                })
            }),
        )
        .build()
}

async fn deployment() -> (RunningService, RunningService) {
    let broker = MemoryBroker::new();
    let bridge = |ttl: Duration| -> Arc<dyn EventBridge> {
        Arc::new(broker.bridge_with(MemoryBridgeConfig {
            default_command_timeout: ttl,
            ..MemoryBridgeConfig::default()
        }))
    };
    let stock = stock_service()
        .start(bridge(Duration::from_secs(5)))
        .await
        .expect("stock starts");
    let client = Service::builder("shop", "1")
        .build()
        .start(bridge(Duration::from_secs(5)))
        .await
        .expect("client starts");
    (stock, client)
}

async fn finish(services: [RunningService; 2]) {
    let deadline = Instant::now() + Duration::from_secs(1);
    for s in services {
        s.shutdown(deadline).await;
    }
}

#[tokio::test]
async fn a_contract_serves_and_calls_a_command_without_a_parameter() {
    let (stock, client) = deployment().await;
    let left: u32 = client.call(&PEEK, "apple".to_string()).await.expect("peek");
    assert_eq!(left, 3);
    finish([stock, client]).await;
}

#[tokio::test]
async fn a_contract_with_a_parameter_carries_it() {
    let (stock, client) = deployment().await;
    let order = Reserve {
        sku: "apple".into(),
        quantity: 2,
    };
    let normal = client.call(&RESERVE, &order).await.expect("reserve");
    assert_eq!(normal.reservation_id, "n-apple");
    let express = client
        .call_with(
            &RESERVE,
            &order,
            Priority { express: true },
            InvokeOptions::default(),
        )
        .await
        .expect("reserve express");
    assert_eq!(
        express,
        Reservation {
            reservation_id: "x-apple".into(),
            quantity: 2
        }
    );
    finish([stock, client]).await;
}

#[tokio::test]
async fn a_handled_business_error_reaches_the_caller_with_status_message_and_data() {
    let (stock, client) = deployment().await;
    let err = client
        .call(
            &RESERVE,
            Reserve {
                sku: "apple".into(),
                quantity: 9,
            },
        )
        .await
        .expect_err("not enough stock");
    assert_eq!(
        err.kind(),
        CommandErrorKind::Handled {
            status: StatusCode::CONFLICT,
            message: "only 3 of apple left",
            data: Some(&json!({ "available": 3 })),
        }
    );
    finish([stock, client]).await;
}

#[tokio::test]
async fn an_unhandled_business_error_is_a_generic_500_without_its_text() {
    let (stock, client) = deployment().await;
    let err = client
        .call(
            &RESERVE,
            Reserve {
                sku: "broken".into(),
                quantity: 1,
            },
        )
        .await
        .expect_err("the database is down");
    assert_eq!(err.kind(), CommandErrorKind::Internal);
    assert_eq!(err.message, "Internal Server Error");
    assert!(!err.handled);
    finish([stock, client]).await;
}

#[tokio::test]
async fn input_the_handler_cannot_read_is_bad_input() {
    let (stock, client) = deployment().await;
    let err = client
        .invoke::<Value>(RESERVE.address(), json!({ "sku": 7 }), Empty)
        .await
        .expect_err("a number is not a sku");
    assert!(
        matches!(err.kind(), CommandErrorKind::BadInput { message } if message.contains("invalid payload")),
        "{err:?}"
    );
    finish([stock, client]).await;
}

#[tokio::test]
async fn a_command_nobody_serves_is_nobody_serves() {
    let (stock, client) = deployment().await;
    let err = client
        .invoke::<Value>(Address::new("stock", "1", "missing"), Empty, Empty)
        .await
        .expect_err("nobody serves it");
    assert_eq!(err.kind(), CommandErrorKind::NobodyServes);
    finish([stock, client]).await;
}

#[tokio::test]
async fn a_command_that_does_not_answer_in_time_is_a_timeout() {
    let broker = MemoryBroker::new();
    let slow = Service::builder("slow", "1")
        .command(CommandDef::new(
            "wait",
            |_ctx: Context, _i: Empty| async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("start");
    let client = Service::builder("impatient", "1")
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("start");
    let err = client
        .invoke_with::<Value>(
            Address::new("slow", "1", "wait"),
            Empty,
            Empty,
            InvokeOptions::ttl(Duration::from_millis(50)),
        )
        .await
        .expect_err("too slow");
    assert_eq!(err.kind(), CommandErrorKind::Timeout);
    let deadline = Instant::now() + Duration::from_millis(100);
    client.shutdown(deadline).await;
    slow.shutdown(deadline).await;
}

#[tokio::test]
async fn a_caller_that_is_shutting_down_gets_unavailable() {
    let (stock, client) = deployment().await;
    client
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
    let err = client
        .call(&PEEK, "apple".to_string())
        .await
        .expect_err("shut down");
    assert_eq!(err.kind(), CommandErrorKind::Unavailable);
    stock
        .shutdown(Instant::now() + Duration::from_secs(1))
        .await;
}

#[tokio::test]
async fn a_contract_command_added_to_another_service_fails_the_start() {
    let broker = MemoryBroker::new();
    let wrong = Service::builder("warehouse", "2")
        .command(PEEK.handler(|_ctx: Context, _sku: String| async move { Ok(0) }))
        .build();
    let bridge: Arc<dyn EventBridge> = Arc::new(broker.bridge());
    match wrong.start(bridge).await {
        Err(StartError::ContractMismatch {
            command,
            contract,
            service,
        }) => {
            assert_eq!(
                (command.as_str(), contract.as_str(), service.as_str()),
                ("peek", "stock@1", "warehouse@2")
            );
        }
        Err(other) => panic!("expected a contract mismatch, got {other}"),
        Ok(_) => panic!("a contract command under another service must not start"),
    }
}
