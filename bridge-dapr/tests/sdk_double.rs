//! The sidecar double, checked by an independent client: Dapr's official JavaScript SDK (npm
//! `@dapr/dapr`, installed by `scripts/test` into the folder named by `PURISTA_DAPR_JS_DIR`)
//! runs an SDK app behind a sidecar of the double and an SDK client in front of it, and asserts
//! what Dapr's documentation says (`tests/sdk/check_double.js`): CEL routing rules with a
//! default route, RETRY retried per the resiliency policy then dead-lettered, service
//! invocation, state with ETags, both API tokens.
//!
//! Without that folder the test is listed as ignored with the reason in its name (a skip,
//! never a pass), or fails under `PURISTA_REQUIRE_BROKERS=1` (CI). The target has its own
//! harness (`libtest-mimic`) so that the skip is decided when the tests are listed.

use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Trial};
use purista_bridge_dapr::double::{DaprDouble, DoubleOptions, Resiliency, SidecarOptions};

const JS_ENV: &str = "PURISTA_DAPR_JS_DIR";
/// How the SDK gets here.
const HOW: &str = "scripts/test installs @dapr/dapr and sets it";
/// Checks in `check_double.js`.
const CHECKS: usize = 8;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let name = "daprs_js_sdk_gets_what_daprs_docs_say_from_the_double";
    let missing = std::env::var(JS_ENV).map_or(true, |v| v.is_empty());
    let required = std::env::var("PURISTA_REQUIRE_BROKERS").as_deref() == Ok("1");
    let trial = if missing && !required {
        Trial::test(name, || Ok(()))
            .with_kind(format!("skipped: {JS_ENV} is not set ({HOW})"))
            .with_ignored_flag(true)
    } else {
        Trial::test(name, || {
            daprs_js_sdk_gets_what_daprs_docs_say_from_the_double();
            Ok(())
        })
    };
    libtest_mimic::run(&args, vec![trial]).exit_code()
}

fn daprs_js_sdk_gets_what_daprs_docs_say_from_the_double() {
    let dir = std::env::var(JS_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{JS_ENV} is not set ({HOW})"));
    let resiliency = Resiliency {
        max_retries: 3,
        interval: Duration::from_millis(20),
    };
    let double = DaprDouble::start(DoubleOptions {
        resiliency,
        ..DoubleOptions::default()
    })
    .expect("the double starts");
    let (api_token, app_token) = ("sdk-api-token", "sdk-app-token");
    let sidecar = double
        .sidecar(SidecarOptions {
            app_id: "sdk-app".into(),
            api_token: Some(api_token.into()),
            app_api_token: Some(app_token.into()),
            ..SidecarOptions::default()
        })
        .expect("a sidecar starts");
    // The app's port: free now; the SDK app listens on it, and the sidecar reads its
    // subscriptions as soon as it answers (like daprd started with --app-port).
    let app_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    sidecar.connect_app(app_port);

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_double.js");
    let mut child = Command::new("node")
        .arg(script)
        .arg(sidecar.address())
        .arg(app_port.to_string())
        .arg(api_token)
        .arg(app_token)
        .arg(resiliency.max_retries.to_string())
        .env("NODE_PATH", format!("{dir}/node_modules"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running node failed: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("node's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    let passed = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
    assert!(
        output.status.success() && passed == CHECKS,
        "the Dapr SDK check failed ({passed}/{CHECKS} passed):\n{stdout}\n{stderr}"
    );
    // The double's own count agrees with what the SDK app saw: one event dead-lettered.
    assert_eq!(double.dead_lettered(), 1);
}
