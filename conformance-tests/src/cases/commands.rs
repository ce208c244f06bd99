//! Commands (DESIGN §3.2): request/reply with a ttl, one handler per delivery, status codes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use purista_core::{
    Address, CommandDef, CommandError, Context, Empty, HandledError, InvokeOptions, MessageType,
    RunningService, Service, StatusCode,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::env::TestEnv;
use crate::harness::Harness;
use crate::logs;
use crate::support::{
    ARRIVAL, Collector, Stopwatch, eventually, handlers_finished, may_duplicate, recording,
};

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
pub async fn success_returns_the_result(h: Arc<dyn Harness>) {
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
}

/// A handled error reaches the caller with its status, message and data.
pub async fn handled_error_carries_status_message_and_data(h: Arc<dyn Harness>) {
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
}

/// An unhandled error or a panic reaches the caller as a 500 with the generic text only.
pub async fn unhandled_error_is_500_with_generic_text_only(h: Arc<dyn Harness>) {
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
}

/// Input that does not fit the command's type is a 400.
pub async fn bad_input_is_400(h: Arc<dyn Harness>) {
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
}

/// A command that does not answer in time fails with 504 at its ttl, and the caller keeps no
/// pending entry for it.
pub async fn timeout_is_504_at_ttl_and_leaves_no_pending_entry(h: Arc<dyn Harness>) {
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
        let clock = Stopwatch::start();
        let err = client
            .invoke_with::<Value>(addr(&env, "hang"), Empty, Empty, ttl(ms))
            .await
            .expect_err("a command that never answers must time out");
        let elapsed = clock.elapsed();
        assert_eq!(
            err.status,
            StatusCode::GATEWAY_TIMEOUT,
            "wrong status: {err}"
        );
        clock.assert_on_time_at("the 504", elapsed, Duration::from_millis(ms));
    }
    let pending = env.bridge(0).in_flight().by_kind.command;
    assert_eq!(
        pending, 0,
        "the caller's bridge still counts {pending} pending invocation(s) after they timed out"
    );
    let _ = release.send(true);
    env.finish().await;
}

/// A response that arrives after its invocation timed out is ignored with a warning naming its
/// correlation id: the caller got 504 at its ttl, and the late response — carrying the real
/// correlation id — resolves nothing, not even an invocation of the same command that is
/// pending at the moment it arrives; the caller's bridge keeps working.
pub async fn late_response_is_ignored(h: Arc<dyn Harness>) {
    const TTL: Duration = Duration::from_millis(200);
    const LATE_TTL_LIMIT: Duration = Duration::from_millis(3200);
    let mut env = TestEnv::new(&h, 2).await;
    // (call, correlation id) per handler run, and one gate per call that holds its answer.
    let started: Arc<Collector<(String, String)>> = Collector::new();
    let (answer_late, late_gate) = release_gate();
    let (answer_pending, pending_gate) = release_gate();
    let seen = started.clone();
    let work = CommandDef::new("work", move |ctx: Context, call: String, _p: Empty| {
        let seen = seen.clone();
        let mut gate = if call == "late" {
            late_gate.clone()
        } else {
            pending_gate.clone()
        };
        async move {
            let correlation = ctx
                .envelope()
                .and_then(|e| e.correlation_id.clone())
                .unwrap_or_default();
            seen.push((call.clone(), correlation));
            let _ = gate.wait_for(|open| *open).await;
            Ok(json!(format!("{call}-result")))
        }
    });
    let client = server_and_client(&mut env, vec![work]).await;
    let to = addr(&env, "work");

    // The handler must start before the ttl is out (a server does not run a command whose
    // caller has given up): where the broker's round trip is slower than the ttl (an emulator
    // on a busy machine), the ttl doubles until the command reaches its handler in time.
    let mut ttl = TTL;
    let late_correlation = loop {
        let clock = Stopwatch::start();
        let err = client
            .invoke_with::<Value>(to.clone(), "late", Empty, InvokeOptions::ttl(ttl))
            .await
            .expect_err("an invocation whose handler answers after the ttl must time out");
        assert_eq!(
            err.status,
            StatusCode::GATEWAY_TIMEOUT,
            "wrong status: {err}"
        );
        clock.assert_on_time("the 504", ttl);
        let wait = if ttl >= LATE_TTL_LIMIT {
            ARRIVAL
        } else {
            (ttl * 4).max(Duration::from_secs(1))
        };
        match started.wait_until(wait, |s| !s.is_empty()).await {
            Ok(s) => break s[0].1.clone(),
            Err(_) if ttl < LATE_TTL_LIMIT => ttl *= 2,
            Err(_) => panic!(
                "the late handler starting: no run within {ARRIVAL:?} of an invocation with a ttl of {ttl:?}"
            ),
        }
    };
    assert!(
        !late_correlation.is_empty(),
        "the command reached its handler without a correlation id"
    );

    // A second invocation of the same command waits while the late response is delivered.
    let pending = {
        let (client, to) = (client.clone(), to.clone());
        tokio::spawn(async move {
            client
                .invoke_with::<Value>(to, "pending", Empty, InvokeOptions::ttl(ARRIVAL))
                .await
        })
    };
    // (By its call: a slow first try's run may still show up.)
    if let Err(runs) = started
        .wait_until(ARRIVAL, |s| s.iter().any(|(call, _)| call == "pending"))
        .await
    {
        panic!(
            "the second invocation reaching its handler: not within {ARRIVAL:?}; runs: {runs:?}"
        );
    }
    let _ = answer_late.send(true);
    eventually(
        "the caller's bridge warns that it ignored the late response, naming its correlation id",
        ARRIVAL,
        || {
            let warned =
                !logs::warnings(|c| c.field("correlation_id") == Some(late_correlation.as_str()))
                    .is_empty();
            async move { warned }
        },
    )
    .await;
    assert!(
        !pending.is_finished(),
        "the late response resolved the invocation that was pending when it arrived: {:?}",
        pending.await
    );
    let _ = answer_pending.send(true);
    let second = pending
        .await
        .expect("the invoking task did not panic")
        .unwrap_or_else(|e| panic!("the invocation pending during the late response failed: {e}"));
    assert_eq!(
        second,
        json!("pending-result"),
        "the late response resolved a later invocation"
    );
    // The caller's bridge still correlates after ignoring a response.
    let _ = answer_late.send(true);
    let third: Value = client
        .invoke_with(to, "late", Empty, InvokeOptions::ttl(ARRIVAL))
        .await
        .unwrap_or_else(|e| panic!("an invocation after the late response failed: {e}"));
    assert_eq!(third, json!("late-result"));
    let pending = env.bridge(0).in_flight().by_kind.command;
    assert_eq!(pending, 0, "pending invocations left behind: {pending}");
    env.finish().await;
}

/// Invoking a command nobody serves fails fast with 502, or with 504 at the ttl; never later.
pub async fn no_handler_is_502_fast_or_504_at_ttl(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 1).await;
    let client = env
        .start(0, Service::builder(env.name("client"), "1"))
        .await;
    let ttl_ms = 400;
    let clock = Stopwatch::start();
    let err = client
        .invoke_with::<Value>(
            Address::new(env.name("nobody"), "1", "nothing"),
            Empty,
            Empty,
            ttl(ttl_ms),
        )
        .await
        .expect_err("a command nobody serves cannot succeed");
    let elapsed = clock.elapsed();
    match err.status {
        StatusCode::BAD_GATEWAY => {
            clock.assert_by_at("the 502", elapsed, Duration::from_millis(ttl_ms))
        }
        StatusCode::GATEWAY_TIMEOUT => {
            clock.assert_on_time_at("the 504", elapsed, Duration::from_millis(ttl_ms))
        }
        other => panic!("a command nobody serves failed with {other} ({err}), not 502 or 504"),
    }
    env.finish().await;
}

/// 1 000 concurrent invocations from 4 instances to a command served by the same 4 instances:
/// each caller gets its own answer and each invocation is handled exactly once.
pub async fn concurrent_invokes_never_cross_correlate(h: Arc<dyn Harness>) {
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
}

/// A command with a success `eventName` makes its success response reach subscriptions of that
/// event, once; an error response does not. A later successful invocation is the sentinel:
/// once its event is in, an error response or a second copy would have been too.
pub async fn success_event_reaches_subscriptions(h: Arc<dyn Harness>) {
    let mut env = TestEnv::new(&h, 2).await;
    let paid = env.name("paid");
    let seen = Collector::new();
    let observer = env
        .start(
            0,
            Service::builder(env.name("observer"), "1")
                .subscription(recording("onPaid", seen.clone()).event_name(&paid)),
        )
        .await;
    let pay = CommandDef::new(
        "pay",
        |_ctx: Context, order: Option<String>, _p: Empty| async move {
            match order {
                Some(order) => Ok(json!({ "orderId": order, "paid": true })),
                None => Err(HandledError::new(StatusCode::CONFLICT, "declined").into()),
            }
        },
    )
    .success_event(&paid);
    let client = server_and_client(&mut env, vec![pay]).await;
    let _: Value = client
        .invoke_with(addr(&env, "pay"), Some("o-1"), Empty, ttl(5_000))
        .await
        .expect("the command succeeds");
    let _ = client
        .invoke_with::<Value>(addr(&env, "pay"), None::<String>, Empty, ttl(5_000))
        .await
        .expect_err("the command fails");
    let _: Value = client
        .invoke_with(addr(&env, "pay"), Some("sentinel"), Empty, ttl(5_000))
        .await
        .expect("the sentinel command succeeds");
    if let Err(got) = seen
        .wait_until(ARRIVAL, |e| {
            e.iter().any(|e| e.payload["orderId"] == json!("sentinel"))
        })
        .await
    {
        panic!("the success event of the sentinel command did not arrive: {got:?}");
    }
    handlers_finished(&observer).await;
    let got = seen.snapshot();
    let first: Vec<&purista_core::Envelope> = got
        .iter()
        .filter(|e| e.payload["orderId"] == json!("o-1"))
        .collect();
    assert!(!first.is_empty(), "the success event of a command was lost");
    assert_eq!(
        first[0].message_type,
        MessageType::CommandSuccessResponse,
        "the success event is not the success response"
    );
    assert_eq!(
        first[0].payload,
        json!({ "orderId": "o-1", "paid": true }),
        "the success event does not carry the command's result"
    );
    let errors: Vec<_> = got
        .iter()
        .filter(|e| e.message_type != MessageType::CommandSuccessResponse)
        .collect();
    assert!(
        errors.is_empty(),
        "an error response (or something else) reached the success event's subscription: {errors:?}"
    );
    let ids: BTreeMap<&str, usize> = got.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.id.as_str()).or_insert(0) += 1;
        m
    });
    assert_eq!(
        ids.len(),
        2,
        "two successful commands reached the success event's subscription as {} messages",
        ids.len()
    );
    if !may_duplicate(&env.caps()) {
        let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "an at-most-once bridge delivered a success event twice: {twice:?}"
        );
    }
    env.finish().await;
}
