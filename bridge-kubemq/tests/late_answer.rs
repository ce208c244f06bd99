//! A responder judges an answer late by its caller's expiry, not only by the query's timeout
//! counted from its own arrival: a query that reached it late (a busy broker) is answered, but
//! the answer is counted and warned about as one its caller no longer waits for.
#![cfg(feature = "double")]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_kubemq::double::{DoubleOptions, KubemqDouble};
use purista_bridge_kubemq::kubemq::Query;
use purista_bridge_kubemq::{KubemqBridge, KubemqConfig};
use purista_core::envelope::now_ms;
use purista_core::{Address, CommandHandler, Envelope, EventBridge, SenderAddress};
use tokio::time::Instant;

struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

async fn bridge(double: &KubemqDouble) -> KubemqBridge {
    let config = KubemqConfig::new("127.0.0.1", double.port()).with_prefix("late");
    let bridge = KubemqBridge::new(config).await.expect("bridge");
    bridge.start().await.expect("starts on the double");
    bridge
}

/// A query carrying a caller expiry of `expires_at`, with a timeout KubeMQ still waits out.
fn query(channel: &str, address: &Address, expires_at: u64) -> Query {
    let command = Envelope::command(
        SenderAddress::default(),
        address.clone(),
        serde_json::json!("hi"),
        serde_json::json!({}),
    );
    Query::builder()
        .channel(channel)
        .body(command.encode())
        .timeout(Duration::from_secs(5))
        .tags(HashMap::from([(
            "purista-expires-at".to_string(),
            expires_at.to_string(),
        )]))
        .build()
}

#[tokio::test]
async fn an_answer_after_the_callers_expiry_is_counted_late_even_within_the_query_timeout() {
    let double = KubemqDouble::start(DoubleOptions::default()).unwrap();
    let server = bridge(&double).await;
    let caller = bridge(&double).await;
    let address = Address::new("svc", "1", "echo");
    server
        .register_command(address.clone(), Arc::new(Echo))
        .await
        .expect("serves");
    let channel = caller.channels().command(&address);

    // Its caller still waits: answered, not late.
    let reply = caller
        .client()
        .send_query(query(&channel, &address, now_ms() + 60_000))
        .await
        .expect("answered");
    assert!(reply.executed, "{}", reply.error);
    assert_eq!(server.counters().unmatched_responses, 0);

    // Its caller gave up a second ago (the query reached the responder late): still
    // answered (KubeMQ's timeout has not passed), and counted as late.
    let reply = caller
        .client()
        .send_query(query(&channel, &address, now_ms().saturating_sub(1_000)))
        .await
        .expect("answered");
    assert!(reply.executed, "{}", reply.error);
    assert_eq!(
        server.counters().unmatched_responses,
        1,
        "the answer after the caller's expiry is counted as late"
    );

    // A tag that is no number is ignored (the query's own timeout still judges).
    let mut odd = query(&channel, &address, 0);
    odd.tags
        .insert("purista-expires-at".to_string(), "soon".to_string());
    let reply = caller.client().send_query(odd).await.expect("answered");
    assert!(reply.executed, "{}", reply.error);
    assert_eq!(server.counters().unmatched_responses, 1);

    server
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
    caller
        .shutdown(Instant::now() + Duration::from_secs(2))
        .await;
}
