//! `purista-bench` on `aws://` against moto, end to end with tiny counts: every scenario runs on
//! the bridge and on the bare-SDK baseline and does the work it was given, and nothing the run
//! created stays on the broker. Figures are not judged here (benchmarks are never timed tests).
//!
//! Needs moto's endpoint in `PURISTA_AWS_ENDPOINT` (`scripts/test` starts moto and sets it) and
//! the cargo feature `aws`. Without the endpoint the test is listed as skipped with the reason,
//! never passed; under `PURISTA_REQUIRE_BROKERS=1` it fails.

use std::process::Command;

use purista_test_runner::Needs;
use serde_json::Value;

purista_test_runner::test_main! {
    runtime: purista_test_runner::Runtime::MultiThread(2);
    ENDPOINT: [
        every_scenario_runs_on_the_bridge_and_the_raw_sdk_and_leaves_nothing_behind,
    ],
}

const ENDPOINT_ENV: &str = "PURISTA_AWS_ENDPOINT";

/// What the test needs: moto's endpoint.
const ENDPOINT: Needs = Needs::new("an AWS endpoint", || {
    endpoint()
        .map(|_| ())
        .ok_or_else(|| format!("{ENDPOINT_ENV} is not set (scripts/test starts moto and sets it)"))
});

/// The first endpoint `scripts/test` lists.
fn endpoint() -> Option<String> {
    std::env::var(ENDPOINT_ENV)
        .ok()
        .and_then(|e| e.split(',').next().map(|e| e.trim().to_string()))
        .filter(|e| !e.is_empty())
}

/// Every count of the full workload divided by this: 10 calls, 25 concurrent calls, 50 events
/// to 4 subscribers, 10 jobs, 1 warm-up operation.
const DIVISOR: &str = "2000";

async fn every_scenario_runs_on_the_bridge_and_the_raw_sdk_and_leaves_nothing_behind() {
    let endpoint = endpoint().expect("checked when listed");
    let url = format!("aws://us-east-1?endpoint={endpoint}&wait_seconds=1");
    let out = Command::new(env!("CARGO_BIN_EXE_purista-bench"))
        .args([url.as_str(), "--divide", DIVISOR])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .expect("the bench starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the bench failed:\n{stderr}");

    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ops = |bridge: &str, scenario: &str| {
        lines
            .iter()
            .find(|l| l["bridge"] == bridge && l["scenario"] == scenario)
            .and_then(|l| l["ops"].as_u64())
            .unwrap_or_else(|| panic!("no {scenario} line for {bridge}:\n{stderr}"))
    };
    for (scenario, expected) in [
        ("cmd-seq", 10),
        ("cmd-conc", 25),
        ("fanout", 50 * 4),
        ("queue", 10),
    ] {
        assert_eq!(ops("aws", scenario), expected, "{scenario} on the bridge");
        assert_eq!(
            ops("raw-aws", scenario),
            expected,
            "{scenario} on the raw SDK"
        );
    }

    // The run names everything under `purista-bench-<id>`, which it prints.
    let prefix = stderr
        .split('`')
        .find(|s| s.starts_with("purista-bench-"))
        .unwrap_or_else(|| panic!("the run's prefix is not on stderr:\n{stderr}"))
        .to_string();
    let (queues, buses) = left_under(&endpoint, &prefix).await;
    assert!(queues.is_empty(), "queues left under {prefix}: {queues:?}");
    assert!(buses.is_empty(), "buses left under {prefix}: {buses:?}");
}

/// The queues and buses on moto whose names start with `prefix`.
async fn left_under(endpoint: &str, prefix: &str) -> (Vec<String>, Vec<String>) {
    let mut config =
        purista::aws::AwsConfig::from_url(&format!("aws://us-east-1?endpoint={endpoint}"))
            .expect("an aws:// URL of the endpoint");
    config.static_credentials = Some(("testing".into(), "testing".into()));
    let clients = purista::aws::Clients::load(&config).await;
    let queues = clients
        .sqs
        .list_queues()
        .queue_name_prefix(prefix)
        .send()
        .await
        .expect("ListQueues")
        .queue_urls
        .unwrap_or_default();
    let buses = clients
        .events
        .list_event_buses()
        .name_prefix(prefix)
        .send()
        .await
        .expect("ListEventBuses")
        .event_buses
        .unwrap_or_default()
        .into_iter()
        .filter_map(|b| b.name)
        .collect();
    (queues, buses)
}
