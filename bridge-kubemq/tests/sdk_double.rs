//! The protocol double, checked by an independent client: KubeMQ's official Python SDK
//! (PyPI `kubemq`, installed by `scripts/test` into a virtualenv named by
//! `PURISTA_KUBEMQ_SDK_PYTHON`) drives it through every pattern the bridge uses and asserts
//! what KubeMQ's documentation says (`tests/sdk/check_double.py`).
//!
//! Without that interpreter the test is a loud skip, or a failure under
//! `PURISTA_REQUIRE_BROKERS=1` (CI).
#![cfg(feature = "double")]

use std::process::Command;

use purista_bridge_kubemq::double::{DoubleOptions, KubemqDouble};

const PYTHON_ENV: &str = "PURISTA_KUBEMQ_SDK_PYTHON";

#[test]
fn kubemqs_python_sdk_gets_what_kubemqs_docs_say_from_the_double() {
    let Some(python) = std::env::var(PYTHON_ENV).ok().filter(|p| !p.is_empty()) else {
        let why =
            format!("{PYTHON_ENV} is not set (scripts/test installs the KubeMQ SDK and sets it)");
        if std::env::var("PURISTA_REQUIRE_BROKERS").as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!("SKIP kubemqs_python_sdk_gets_what_kubemqs_docs_say_from_the_double: {why}");
        return;
    };
    let token = "sdk-test-token";
    let double = KubemqDouble::start(DoubleOptions {
        auth_token: Some(token.into()),
    })
    .expect("the double starts");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_double.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(double.address())
        .arg(token)
        .output()
        .unwrap_or_else(|e| panic!("running {python} failed: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    let passed = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
    assert!(
        output.status.success() && passed == 8,
        "the KubeMQ SDK check failed ({passed}/8 passed):\n{stdout}\n{stderr}"
    );
}

const JS_ENV: &str = "PURISTA_KUBEMQ_JS_DIR";

/// The queue lease protocol the queue bridge uses (`StreamQueueMessage`), checked with
/// KubeMQ's official JavaScript SDK (npm `kubemq-js` 1.2.3, installed by `scripts/test` into
/// the folder named by `PURISTA_KUBEMQ_JS_DIR`; its queue transactions are that protocol).
#[test]
fn kubemqs_js_sdk_gets_what_kubemqs_docs_say_of_queue_leases_from_the_double() {
    let Some(dir) = std::env::var(JS_ENV).ok().filter(|p| !p.is_empty()) else {
        let why = format!("{JS_ENV} is not set (scripts/test installs kubemq-js and sets it)");
        if std::env::var("PURISTA_REQUIRE_BROKERS").as_deref() == Ok("1") {
            panic!("{why}");
        }
        eprintln!(
            "SKIP kubemqs_js_sdk_gets_what_kubemqs_docs_say_of_queue_leases_from_the_double: {why}"
        );
        return;
    };
    let token = "sdk-js-token";
    let double = KubemqDouble::start(DoubleOptions {
        auth_token: Some(token.into()),
    })
    .expect("the double starts");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/check_queue_lease.js"
    );
    let output = Command::new("node")
        .arg(script)
        .arg(double.address())
        .arg(token)
        .env("NODE_PATH", format!("{dir}/node_modules"))
        .output()
        .unwrap_or_else(|e| panic!("running node failed: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    let passed = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
    assert!(
        output.status.success() && passed == 8,
        "the kubemq-js queue lease check failed ({passed}/8 passed):\n{stdout}\n{stderr}"
    );
}
