//! What reaches the logs: no message body at WARN or above (from the bridge or from lapin,
//! which the bridge configures), and no ERROR for situations the bridge expects.

mod common;

use std::time::Duration;

use purista_core::{Address, Envelope, EventBridge, SenderAddress, StatusCode};
use serde_json::json;

use common::{Echo, logs};

common::runner::test_main! {
    common::BROKER: [
        a_returned_command_never_puts_its_body_into_a_warning,
        expected_situations_log_no_error,
    ],
}

/// How a byte buffer shows in a `Debug` rendering (`[115, 51, …]`): a body logged that way
/// is still the body.
fn as_debug_bytes(text: &str) -> String {
    let bytes: Vec<String> = text.bytes().map(|b| b.to_string()).collect();
    bytes.join(", ")
}

async fn a_returned_command_never_puts_its_body_into_a_warning() {
    logs::install();
    let broker = common::TestBroker::new("returned_body");
    let client = broker.bridge().await;
    let secret = format!("card-4111-{}", broker.prefix);
    let cmd = Envelope::command(
        SenderAddress::default(),
        Address::new("nobody", "1", "serves"),
        json!({ "card": secret }),
        json!({}),
    );
    let err = client
        .invoke(cmd, Duration::from_secs(5))
        .await
        .expect_err("nobody serves it");
    assert_eq!(err.status(), StatusCode::BAD_GATEWAY, "{err:?}");
    let in_bytes = as_debug_bytes(&secret);
    let leaks = logs::matching(|l| l.mentions(&secret) || l.mentions(&in_bytes));
    assert!(leaks.is_empty(), "a body at WARN or above: {leaks:#?}");
    broker.finish().await;
}

async fn expected_situations_log_no_error() {
    logs::install();
    let broker = common::TestBroker::new("no_error_noise");
    let first = broker.bridge().await;
    let second = broker.bridge().await;
    let client = broker.bridge().await;
    let echo = Address::new("echo", "1", "say");
    first
        .register_command(echo.clone(), Echo::new())
        .await
        .unwrap();
    second
        .register_command(echo.clone(), Echo::new())
        .await
        .unwrap();
    let before = logs::mark();
    // Leaving while another instance still serves the command: the broker refuses to delete
    // the queue (406), as the bridge expects.
    first.unregister_command(&echo).await.unwrap();
    let cmd = Envelope::command(SenderAddress::default(), echo.clone(), json!(1), json!({}));
    client
        .invoke(cmd, Duration::from_secs(5))
        .await
        .expect("the other instance serves it");
    // Clean shutdowns, one with a consumer running.
    for bridge in [&first, &second, &client] {
        let report = bridge
            .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        assert!(report.completed, "{report:?}");
    }
    let errors = logs::since(before, logs::Line::is_error);
    assert!(
        errors.is_empty(),
        "ERROR lines for expected situations: {errors:#?}"
    );
    broker.finish().await;
}
