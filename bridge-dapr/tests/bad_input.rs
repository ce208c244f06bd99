//! Bad input to the app server: missing or wrong app token, wrong content types, malformed
//! CloudEvents, non-envelope data, oversize bodies. Each gets a clear status, runs no handler,
//! and the server keeps serving: a good delivery afterwards reaches the subscription.

mod common;

use std::sync::Arc;
use std::time::Duration;

use purista_core::{Envelope, EventBridge, SenderAddress};
use serde_json::json;

const APP_TOKEN: &str = "app-secret";

async fn post(
    client: &reqwest::Client,
    port: u16,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let mut request = client
        .post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        request = request.header("dapr-api-token", t);
    }
    let response = request.send().await.expect("the app server answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_run_no_handler_and_the_server_keeps_serving() {
    let double = common::double();
    let (bridge, _sidecar) = common::bridge_with(&double, "bad-input", "bad", |sidecar, config| {
        sidecar.app_api_token = Some(APP_TOKEN.into());
        config.app_api_token = Some(APP_TOKEN.into());
        config.max_payload_bytes = 64 * 1024;
    })
    .await;
    let recorder = Arc::new(common::Recorder::default());
    common::subscribe(
        &bridge,
        common::spec("svc", "sub", "tick", false),
        recorder.clone(),
    )
    .await;
    let port = bridge.app_port();
    let client = reqwest::Client::new();
    let good = Envelope::custom(SenderAddress::default(), "tick", json!({ "n": 1 }));
    let cloudevent = |data: serde_json::Value| {
        serde_json::to_vec(&json!({
            "specversion": "1.0", "id": "ce-1", "source": "test", "type": "t",
            "datacontenttype": "application/json", "data": data,
        }))
        .unwrap()
    };
    let good_event = cloudevent(serde_json::from_slice(&good.encode()).unwrap());
    let ce = "application/cloudevents+json";
    let route = "/purista/message";

    // Tokens: none and wrong are 401, on every route but the health check.
    for token in [None, Some("wrong"), Some("app-secre"), Some("app-secret-")] {
        let (status, _) = post(&client, port, route, token, ce, good_event.clone()).await;
        assert_eq!(status, 401, "delivery with token {token:?}");
        let (status, _) = post(
            &client,
            port,
            "/purista/command",
            token,
            "application/json",
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(status, 401, "command with token {token:?}");
    }
    let subscribe = client
        .get(format!("http://127.0.0.1:{port}/dapr/subscribe"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(subscribe, 401, "discovery without the token");
    let health = client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(health, 200, "the app's health needs no token");

    // A wrong content type is 415.
    let (status, _) = post(
        &client,
        port,
        route,
        Some(APP_TOKEN),
        "text/plain",
        good_event.clone(),
    )
    .await;
    assert_eq!(status, 415);
    // Not JSON, not a CloudEvent, not an envelope inside: DROP (retrying cannot help).
    for body in [
        b"not json".to_vec(),
        b"[1,2,3]".to_vec(),
        serde_json::to_vec(&json!({ "id": "x", "data": {} })).unwrap(),
        cloudevent(json!({ "hello": "world" })),
        cloudevent(json!("a string that is no envelope")),
        cloudevent(json!(17)),
    ] {
        let (status, text) = post(&client, port, route, Some(APP_TOKEN), ce, body).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("DROP"), "{text}");
    }
    // Oversize bodies are 413 before anything is parsed.
    let huge = vec![b'x'; 64 * 1024 + 64 * 1024 + 1];
    let (status, _) = post(&client, port, route, Some(APP_TOKEN), ce, huge.clone()).await;
    assert_eq!(status, 413);
    let (status, _) = post(
        &client,
        port,
        "/purista/command",
        Some(APP_TOKEN),
        "application/json",
        huge,
    )
    .await;
    assert_eq!(status, 413);
    // Without its length announced (chunked), an oversize body is refused all the same.
    let chunks =
        futures::stream::iter((0..3).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 64 * 1024 + 1])));
    let response = client
        .post(format!("http://127.0.0.1:{port}/purista/command"))
        .header("content-type", "application/json")
        .header("dapr-api-token", APP_TOKEN)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("the app server answers");
    assert_eq!(response.status().as_u16(), 413, "a chunked oversize body");
    // A command that is not a command, or not JSON, is 400.
    let (status, _) = post(
        &client,
        port,
        "/purista/command",
        Some(APP_TOKEN),
        "application/json",
        good.encode(),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = post(
        &client,
        port,
        "/purista/command",
        Some(APP_TOKEN),
        "application/json",
        b"{".to_vec(),
    )
    .await;
    assert_eq!(status, 400);

    assert!(
        recorder.seen.lock().is_empty(),
        "a handler ran for bad input"
    );
    assert!(
        bridge.counters().poison_messages >= 6,
        "{:?}",
        bridge.counters()
    );

    // The server still serves: a good delivery arrives, directly and through the sidecar.
    let (status, text) = post(&client, port, route, Some(APP_TOKEN), ce, good_event).await;
    assert_eq!((status, text.contains("SUCCESS")), (200, true), "{text}");
    bridge
        .emit(Envelope::custom(
            SenderAddress::default(),
            "tick",
            json!({ "n": 2 }),
        ))
        .await
        .expect("emit through the sidecar");
    let seen = recorder.wait_for(2, Duration::from_secs(10)).await;
    let mut seen = seen.clone();
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2]);
}
