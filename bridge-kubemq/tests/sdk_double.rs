//! The protocol double, checked by an independent client: KubeMQ's official Python SDK
//! (PyPI `kubemq`, installed by `scripts/test` into a virtualenv named by
//! `PURISTA_KUBEMQ_SDK_PYTHON`) drives it through every pattern the bridge uses and asserts
//! what KubeMQ's documentation says (`tests/sdk/check_double.py`).
//!
//! Without an SDK a test is listed as ignored with the reason in its name (a skip, never a
//! pass), or fails under `PURISTA_REQUIRE_BROKERS=1` (CI). The target has its own harness
//! (`libtest-mimic`) so that the skip is decided when the tests are listed.

use std::process::{Command, ExitCode};

use libtest_mimic::{Arguments, Trial};
use purista_bridge_kubemq::double::{DoubleOptions, KubemqDouble};

const PYTHON_ENV: &str = "PURISTA_KUBEMQ_SDK_PYTHON";
const JS_ENV: &str = "PURISTA_KUBEMQ_JS_DIR";

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let trials = vec![
        listed(
            "kubemqs_python_sdk_gets_what_kubemqs_docs_say_from_the_double",
            PYTHON_ENV,
            "scripts/test installs the KubeMQ SDK and sets it",
            kubemqs_python_sdk_gets_what_kubemqs_docs_say_from_the_double,
        ),
        listed(
            "kubemqs_js_sdk_gets_what_kubemqs_docs_say_of_queue_leases_from_the_double",
            JS_ENV,
            "scripts/test installs kubemq-js and sets it",
            kubemqs_js_sdk_gets_what_kubemqs_docs_say_of_queue_leases_from_the_double,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}

/// The value of `var`, or why the test cannot run: a panic under `PURISTA_REQUIRE_BROKERS=1`.
fn sdk(var: &str, how: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{var} is not set ({how})"))
}

/// `run` as a test, or listed as ignored with why when `var` is missing (unless brokers are
/// required, where it runs and fails naming the variable).
fn listed(name: &'static str, var: &'static str, how: &'static str, run: fn()) -> Trial {
    let missing = std::env::var(var).map_or(true, |v| v.is_empty());
    let required = std::env::var("PURISTA_REQUIRE_BROKERS").as_deref() == Ok("1");
    if missing && !required {
        return Trial::test(name, || Ok(()))
            .with_kind(format!("skipped: {var} is not set ({how})"))
            .with_ignored_flag(true);
    }
    Trial::test(name, move || {
        run();
        Ok(())
    })
}

fn kubemqs_python_sdk_gets_what_kubemqs_docs_say_from_the_double() {
    let python = sdk(
        PYTHON_ENV,
        "scripts/test installs the KubeMQ SDK and sets it",
    );
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

/// The queue lease protocol the queue bridge uses (`StreamQueueMessage`), checked with
/// KubeMQ's official JavaScript SDK (npm `kubemq-js` 1.2.3, installed by `scripts/test` into
/// the folder named by `PURISTA_KUBEMQ_JS_DIR`; its queue transactions are that protocol).
fn kubemqs_js_sdk_gets_what_kubemqs_docs_say_of_queue_leases_from_the_double() {
    let dir = sdk(JS_ENV, "scripts/test installs kubemq-js and sets it");
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
