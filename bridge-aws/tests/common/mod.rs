//! What the bridge's own tests share: the moto endpoint, configs under a fresh prefix, and
//! cleanup of a prefix's rules, bus and queues. Without an endpoint, [`runner`] lists each test
//! as ignored with the reason in its name (a skip, never a pass), unless
//! `PURISTA_REQUIRE_BROKERS=1`, which makes the tests run and fail.
#![allow(dead_code)]

pub mod runner;

use std::time::Duration;

use purista_bridge_aws::{AwsBridge, AwsConfig};

use runner::Needs;

/// Environment variable with moto's endpoint (set by `scripts/test`).
pub const ENDPOINT_ENV: &str = "PURISTA_AWS_ENDPOINT";

/// moto's endpoint: one of the servers `scripts/test` lists, if any. Under nextest, the one
/// of this test's slot (`NEXTEST_TEST_GLOBAL_SLOT`: tests running at the same time have
/// different slots), so that tests running together do not queue at one server, which
/// serves one request at a time; else the first.
fn first_endpoint() -> Option<String> {
    let all: Vec<String> = std::env::var(ENDPOINT_ENV)
        .ok()?
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let slot = std::env::var("NEXTEST_TEST_GLOBAL_SLOT")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0);
    all.get(slot % all.len().max(1)).cloned()
}

/// What the tests need: an AWS endpoint, moto's, in [`ENDPOINT_ENV`].
pub const ENDPOINT: Needs = Needs::new("an AWS endpoint", endpoint_set);

/// `Ok` when an endpoint is set, else why not.
pub fn endpoint_set() -> Result<(), String> {
    first_endpoint()
        .map(|_| ())
        .ok_or_else(|| format!("{ENDPOINT_ENV} is not set (scripts/test starts moto and sets it)"))
}

/// moto's endpoint. Its presence was checked when the test was listed ([`runner`]).
pub fn endpoint() -> String {
    first_endpoint().unwrap_or_else(|| panic!("{ENDPOINT_ENV} is not set"))
}

/// A fresh prefix.
pub fn prefix() -> String {
    format!("b{}", &purista_core::ids::new_id()[..10])
}

/// A test config against moto under `prefix`.
pub fn config(endpoint: &str, prefix: &str) -> AwsConfig {
    let mut c = AwsConfig::new("us-east-1")
        .with_emulator(endpoint)
        .with_prefix(prefix);
    c.wait_seconds = 5;
    c.visibility_timeout = Duration::from_secs(10);
    c.default_command_timeout = Duration::from_secs(5);
    c
}

/// Removes every rule on the prefix's bus, the bus and the prefix's queues.
pub async fn remove_all(bridge: &AwsBridge) {
    let bus = bridge.config().bus_name().to_string();
    let events = bridge.eventbridge();
    if let Ok(out) = events.list_rules().event_bus_name(&bus).send().await {
        for rule in out.rules.unwrap_or_default() {
            let Some(name) = rule.name else { continue };
            let _ = events
                .remove_targets()
                .rule(&name)
                .event_bus_name(&bus)
                .ids("purista-queue")
                .send()
                .await;
            let _ = events
                .delete_rule()
                .name(&name)
                .event_bus_name(&bus)
                .send()
                .await;
        }
    }
    let _ = events.delete_event_bus().name(&bus).send().await;
    let prefix = format!("{}-", bridge.names().prefix());
    if let Ok(out) = bridge
        .sqs()
        .list_queues()
        .queue_name_prefix(prefix)
        .send()
        .await
    {
        for url in out.queue_urls.unwrap_or_default() {
            let _ = bridge.sqs().delete_queue().queue_url(url).send().await;
        }
    }
}
