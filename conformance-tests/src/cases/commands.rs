//! Commands (DESIGN §3.2): request/reply with a ttl, one handler per delivery, status codes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use purista_core::{
    Address, CommandDef, CommandError, Context, Empty, HandledError, InvokeOptions, MessageType,
    Need, RunningService, Service, StatusCode,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::env::TestEnv;
use crate::gate::require;
use crate::harness::Harness;
use crate::runner::Verdict;
use crate::support::{ARRIVAL, Collector, LATE_SLACK, assert_on_time, quiet_period, recording};

/// Service name of the server in these cases, and the address of one of its commands.
fn addr(env: &TestEnv, command: &str) -> Address {
    Address::new(env.name("server"), "1", command)
}

/// A server on instance 1 with `commands` and a client service on instance 0.
async fn server_and_client(env: &mut TestEnv, commands: Vec<CommandDef>) -> Arc<RunningService> {
    let mut server = Service::builder(env.name("server"), "1");
    for c in commands {
        server = server.command(c);
    }
    env.start(1, server).await;
    env.start(0, Service::builder(env.name("client"), "1"))
        .await
}

fn ttl(ms: u64) -> InvokeOptions {
    InvokeOptions::ttl(Duration::from_millis(ms))
}

/// A handler that waits until the case releases it (at the end), so nothing outlives the case.
fn release_gate() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

#[derive(Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// A command's result reaches its caller.
pub async fn success_returns_the_result(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let add = CommandDef::new("add", |_ctx: Context, input: Add, _p: Empty| async move {
        Ok(json!({ "sum": input.a + input.b }))
    });
    let client = server_and_client(&mut env, vec![add]).await;
    let result: Value = client
        .invoke_with(
            addr(&env, "add"),
            json!({"a": 2, "b": 3}),
            Empty,
            ttl(5_000),
        )
        .await
        .unwrap_or_else(|e| panic!("a successful command failed for its caller: {e}"));
    assert_eq!(result, json!({"sum": 5}), "the caller got the wrong result");
    env.finish().await;
    Verdict::Passed
}

/// A handled error reaches the caller with its status, message and data.
pub async fn handled_error_carries_status_message_and_data(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let pay = CommandDef::new("pay", |_ctx: Context, _p: Empty, _q: Empty| async move {
        Err::<(), _>(
            HandledError::new(StatusCode::CONFLICT, "order already paid")
                .with_data(json!({"orderId": "o-1"}))
                .into(),
        )
    });
    let client = server_and_client(&mut env, vec![pay]).await;
    let err = client
        .invoke_with::<Value>(addr(&env, "pay"), Empty, Empty, ttl(5_000))
        .await
        .expect_err("a handled error must fail the invocation");
    assert_eq!(err.status, StatusCode::CONFLICT, "wrong status: {err}");
    assert_eq!(err.message, "order already paid", "wrong message: {err}");
    assert_eq!(
        err.data,
        Some(json!({"orderId": "o-1"})),
        "data lost: {err}"
    );
    assert!(err.handled, "a handled error arrived as unhandled");
    env.finish().await;
    Verdict::Passed
}

/// An unhandled error or a panic reaches the caller as a 500 with the generic text only.
pub async fn unhandled_error_is_500_with_generic_text_only(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let leak = CommandDef::new("leak", |_ctx: Context, _p: Empty, _q: Empty| async move {
        Err::<(), _>(anyhow::anyhow!(
            "connection to db://admin:hunter2@10.0.0.5 refused"
        ))
    });
    let panics = CommandDef::new("panics", |_ctx: Context, _p: Empty, _q: Empty| async move {
        if true {
            panic!("secret panic text hunter2");
        }
        Ok(())
    });
    let client = server_and_client(&mut env, vec![leak, panics]).await;
    for command in ["leak", "panics"] {
        let err = client
            .invoke_with::<Value>(addr(&env, command), Empty, Empty, ttl(5_000))
            .await
            .expect_err("an unhandled error must fail the invocation");
        assert_eq!(
            err.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "`{command}`: wrong status: {err}"
        );
        assert_eq!(
            err.message,
            StatusCode::INTERNAL_SERVER_ERROR.generic_text(),
            "`{command}`: an unhandled error leaked its text to the caller"
        );
        assert_eq!(
            err.data, None,
            "`{command}`: an unhandled error carried data"
        );
        assert!(
            !err.handled,
            "`{command}`: an unhandled error arrived as handled"
        );
    }
    env.finish().await;
    Verdict::Passed
}

/// Input that does not fit the command's type is a 400.
pub async fn bad_input_is_400(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let add = CommandDef::new("add", |_ctx: Context, input: Add, _p: Empty| async move {
        Ok(input.a + input.b)
    });
    let client = server_and_client(&mut env, vec![add]).await;
    for bad in [
        json!({"a": "two", "b": 3}),
        json!("not an object"),
        json!({}),
    ] {
        let err = client
            .invoke_with::<Value>(addr(&env, "add"), bad.clone(), Empty, ttl(5_000))
            .await
            .expect_err("bad input must fail the invocation");
        assert_eq!(
            err.status,
            StatusCode::BAD_REQUEST,
            "input {bad} got {err} instead of 400"
        );
    }
    env.finish().await;
    Verdict::Passed
}

/// A command that does not answer in time fails with 504 at its ttl, and the caller keeps no
/// pending entry for it.
pub async fn timeout_is_504_at_ttl_and_leaves_no_pending_entry(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let (release, gate) = release_gate();
    let hang = CommandDef::new("hang", move |_ctx: Context, _p: Empty, _q: Empty| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok(())
        }
    });
    let client = server_and_client(&mut env, vec![hang]).await;
    for ms in [150u64, 400] {
        let started = Instant::now();
        let err = client
            .invoke_with::<Value>(addr(&env, "hang"), Empty, Empty, ttl(ms))
            .await
            .expect_err("a command that never answers must time out");
        let elapsed = started.elapsed();
        assert_eq!(
            err.status,
            StatusCode::GATEWAY_TIMEOUT,
            "wrong status: {err}"
        );
        assert_on_time("the 504", elapsed, Duration::from_millis(ms));
    }
    let pending = env.bridge(0).in_flight().by_kind.command;
    assert_eq!(
        pending, 0,
        "the caller's bridge still counts {pending} pending invocation(s) after they timed out"
    );
    let _ = release.send(true);
    env.finish().await;
    Verdict::Passed
}

#[derive(Deserialize)]
struct Work {
    kind: String,
}

/// A response that arrives after its invocation timed out is ignored: it never resolves a later
/// invocation, even one that is pending at the moment it arrives.
pub async fn late_response_is_ignored(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let slow_done: Arc<Collector<()>> = Collector::new();
    let done = slow_done.clone();
    let work = CommandDef::new("work", move |_ctx: Context, w: Work, _p: Empty| {
        let done = done.clone();
        async move {
            if w.kind == "slow" {
                tokio::time::sleep(Duration::from_millis(400)).await;
                done.push(());
                Ok(json!("slow-result"))
            } else {
                // Stay pending until the late response is on its way, then answer.
                let _ = done.wait_until(ARRIVAL, |d| !d.is_empty()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(json!("fast-result"))
            }
        }
    });
    let client = server_and_client(&mut env, vec![work]).await;
    let err = client
        .invoke_with::<Value>(addr(&env, "work"), json!({"kind": "slow"}), Empty, ttl(150))
        .await
        .expect_err("the slow invocation must time out");
    assert_eq!(
        err.status,
        StatusCode::GATEWAY_TIMEOUT,
        "wrong status: {err}"
    );
    let second: Value = client
        .invoke_with(
            addr(&env, "work"),
            json!({"kind": "fast"}),
            Empty,
            ttl(5_000),
        )
        .await
        .unwrap_or_else(|e| panic!("the invocation after a timeout failed: {e}"));
    assert_eq!(
        second,
        json!("fast-result"),
        "a late response resolved a later invocation"
    );
    assert_eq!(slow_done.len(), 1, "the slow handler ran more than once");
    let pending = env.bridge(0).in_flight().by_kind.command;
    assert_eq!(pending, 0, "pending invocations left behind: {pending}");
    env.finish().await;
    Verdict::Passed
}

/// Invoking a command nobody serves fails fast with 502, or with 504 at the ttl; never later.
pub async fn no_handler_is_502_fast_or_504_at_ttl(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 1).await;
    let client = env
        .start(0, Service::builder(env.name("client"), "1"))
        .await;
    let ttl_ms = 400;
    let started = Instant::now();
    let err = client
        .invoke_with::<Value>(
            Address::new(env.name("nobody"), "1", "nothing"),
            Empty,
            Empty,
            ttl(ttl_ms),
        )
        .await
        .expect_err("a command nobody serves cannot succeed");
    let elapsed = started.elapsed();
    match err.status {
        StatusCode::BAD_GATEWAY => assert!(
            elapsed <= Duration::from_millis(ttl_ms) + LATE_SLACK,
            "502 came after {elapsed:?}, not fast"
        ),
        StatusCode::GATEWAY_TIMEOUT => {
            assert_on_time("the 504", elapsed, Duration::from_millis(ttl_ms))
        }
        other => panic!("a command nobody serves failed with {other} ({err}), not 502 or 504"),
    }
    env.finish().await;
    Verdict::Passed
}

/// 1 000 concurrent invocations from 4 instances to a command served by the same 4 instances:
/// each caller gets its own answer and each invocation is handled exactly once.
pub async fn concurrent_invokes_never_cross_correlate(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands]).await {
        return v;
    }
    const INSTANCES: usize = 4;
    const CALLS: u64 = 1_000;
    let mut env = TestEnv::new(&h, INSTANCES).await;
    let handled: Arc<Collector<(usize, u64)>> = Collector::new();
    let mut services = Vec::new();
    for i in 0..INSTANCES {
        let handled = handled.clone();
        let echo = CommandDef::new("echo", move |_ctx: Context, n: u64, _p: Empty| {
            let handled = handled.clone();
            async move {
                handled.push((i, n));
                Ok(json!({ "n": n, "by": i }))
            }
        });
        services.push(
            env.start(i, Service::builder(env.name("server"), "1").command(echo))
                .await,
        );
    }
    let target = addr(&env, "echo");
    let calls = (0..CALLS).map(|n| {
        let caller = services[n as usize % INSTANCES].clone();
        let target = target.clone();
        tokio::spawn(async move {
            let r: Result<Value, CommandError> = caller
                .invoke_with(
                    target,
                    n,
                    Empty,
                    InvokeOptions::ttl(Duration::from_secs(20)),
                )
                .await;
            (n, r)
        })
    });
    let results = futures::future::join_all(calls).await;
    for joined in results {
        let (n, r) = joined.expect("the invoking task did not panic");
        let v = r.unwrap_or_else(|e| panic!("invocation {n} failed: {e}"));
        assert_eq!(
            v["n"],
            json!(n),
            "invocation {n} received the answer of invocation {}",
            v["n"]
        );
    }
    let got = handled.snapshot();
    let mut per_call: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, n) in &got {
        *per_call.entry(*n).or_insert(0) += 1;
    }
    assert_eq!(
        per_call.len() as u64,
        CALLS,
        "some invocations were never handled"
    );
    let twice: Vec<_> = per_call.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "invocations handled more than once: {twice:?}"
    );
    env.finish().await;
    Verdict::Passed
}

/// A command with a success `eventName` makes its success response reach subscriptions of that
/// event; an error response does not.
pub async fn success_event_reaches_subscriptions(h: Arc<dyn Harness>) -> Verdict {
    if let Some(v) = require(&h, &[Need::Commands, Need::SharedSubscription]).await {
        return v;
    }
    let mut env = TestEnv::new(&h, 2).await;
    let paid = env.name("paid");
    let seen = Collector::new();
    env.start(
        0,
        Service::builder(env.name("observer"), "1")
            .subscription(recording("onPaid", seen.clone()).event_name(&paid)),
    )
    .await;
    let pay = CommandDef::new("pay", |_ctx: Context, ok: bool, _p: Empty| async move {
        if ok {
            Ok(json!({ "orderId": "o-1", "paid": true }))
        } else {
            Err(HandledError::new(StatusCode::CONFLICT, "declined").into())
        }
    })
    .success_event(&paid);
    let client = server_and_client(&mut env, vec![pay]).await;
    let _: Value = client
        .invoke_with(addr(&env, "pay"), true, Empty, ttl(5_000))
        .await
        .expect("the command succeeds");
    let _ = client
        .invoke_with::<Value>(addr(&env, "pay"), false, Empty, ttl(5_000))
        .await
        .expect_err("the command fails");
    let got = seen
        .wait_for_len(1, ARRIVAL, "the success event of a command")
        .await;
    assert_eq!(
        got[0].message_type,
        MessageType::CommandSuccessResponse,
        "the success event is not the success response"
    );
    assert_eq!(
        got[0].payload,
        json!({ "orderId": "o-1", "paid": true }),
        "the success event does not carry the command's result"
    );
    quiet_period().await;
    let ids: std::collections::BTreeSet<_> = seen.snapshot().into_iter().map(|e| e.id).collect();
    assert_eq!(
        ids.len(),
        1,
        "an error response (or a second copy) reached the success event's subscription"
    );
    env.finish().await;
    Verdict::Passed
}
