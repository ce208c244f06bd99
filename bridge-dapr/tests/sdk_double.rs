//! The sidecar double, checked by an independent client: Dapr's official JavaScript SDK (npm
//! `@dapr/dapr`, installed by `scripts/test` into the folder named by `PURISTA_DAPR_JS_DIR`)
//! runs an SDK app behind a sidecar of the double and an SDK client in front of it, and asserts
//! what Dapr's documentation says:
//!
//! * `tests/sdk/check_double.js`: CEL routing rules with a default route, RETRY retried per the
//!   resiliency policy then dead-lettered, service invocation, state with ETags, both API
//!   tokens;
//! * `tests/sdk/check_concurrency.js`: app concurrency ([`SidecarOptions::concurrency`], what
//!   daprd's `--app-max-concurrency` bounds): never more deliveries open to the app at once.
//!
//! Without that folder the tests are listed as ignored with the reason in their names (a skip,
//! never a pass), or fail under `PURISTA_REQUIRE_BROKERS=1` (CI). The target has its own
//! harness (`libtest-mimic`) so that the skip is decided when the tests are listed.

use std::process::{Command, ExitCode, Output, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Trial};
use purista_bridge_dapr::double::{DaprDouble, DoubleOptions, Resiliency, SidecarOptions};

const JS_ENV: &str = "PURISTA_DAPR_JS_DIR";
/// How the SDK gets here.
const HOW: &str = "scripts/test installs @dapr/dapr and sets it";
/// Checks in `check_double.js`.
const CHECKS: usize = 8;
/// Checks in `check_concurrency.js`.
const CONCURRENCY_CHECKS: usize = 3;
/// The app concurrency the concurrency check runs the sidecar with.
const APP_MAX_CONCURRENCY: usize = 3;

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let missing = std::env::var(JS_ENV).map_or(true, |v| v.is_empty());
    let required = std::env::var("PURISTA_REQUIRE_BROKERS").as_deref() == Ok("1");
    let checks: [(&str, fn()); 2] = [
        (
            "daprs_js_sdk_gets_what_daprs_docs_say_from_the_double",
            daprs_js_sdk_gets_what_daprs_docs_say_from_the_double,
        ),
        (
            "daprs_js_sdk_app_never_has_more_deliveries_open_than_its_app_concurrency",
            daprs_js_sdk_app_never_has_more_deliveries_open_than_its_app_concurrency,
        ),
    ];
    let trials = checks
        .into_iter()
        .map(|(name, check)| {
            if missing && !required {
                Trial::test(name, || Ok(()))
                    .with_kind(format!("skipped: {JS_ENV} is not set ({HOW})"))
                    .with_ignored_flag(true)
            } else {
                Trial::test(name, move || {
                    check();
                    Ok(())
                })
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

/// Runs `node tests/sdk/<script> <args>` with the SDK on its path, at most 60 s.
fn node(script: &str, args: &[String]) -> Output {
    let dir = std::env::var(JS_ENV)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("{JS_ENV} is not set ({HOW})"));
    let script = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("node")
        .arg(script)
        .args(args)
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
    child.wait_with_output().expect("node's output")
}

/// Asserts that `output` passed all `checks`, printing what it said.
fn assert_passed(output: &Output, checks: usize) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    let passed = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
    assert!(
        output.status.success() && passed == checks,
        "the Dapr SDK check failed ({passed}/{checks} passed):\n{stdout}\n{stderr}"
    );
}

/// A free loopback port for an SDK app: free now; the SDK app listens on it, and the sidecar
/// reads its subscriptions as soon as it answers (like daprd started with `--app-port`).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn daprs_js_sdk_app_never_has_more_deliveries_open_than_its_app_concurrency() {
    let double = DaprDouble::start(DoubleOptions::default()).expect("the double starts");
    let sidecar = double
        .sidecar(SidecarOptions {
            app_id: "sdk-concurrency-app".into(),
            concurrency: APP_MAX_CONCURRENCY,
            ..SidecarOptions::default()
        })
        .expect("a sidecar starts");
    let app_port = free_port();
    sidecar.connect_app(app_port);
    let output = node(
        "check_concurrency.js",
        &[
            sidecar.address(),
            app_port.to_string(),
            APP_MAX_CONCURRENCY.to_string(),
        ],
    );
    assert_passed(&output, CONCURRENCY_CHECKS);
}

fn daprs_js_sdk_gets_what_daprs_docs_say_from_the_double() {
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
    let app_port = free_port();
    sidecar.connect_app(app_port);
    let output = node(
        "check_double.js",
        &[
            sidecar.address(),
            app_port.to_string(),
            api_token.to_string(),
            app_token.to_string(),
            resiliency.max_retries.to_string(),
        ],
    );
    assert_passed(&output, CHECKS);
    // The double's own count agrees with what the SDK app saw: one event dead-lettered.
    assert_eq!(double.dead_lettered(), 1);
}
