//! Bursts of events into a shared subscription on several instances arrive, each once.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use purista_core::{Envelope, EventBridge, SenderAddress};

/// 4 publishers × 250 events into a shared subscription held by 3 instances: every event is
/// handled once, at one instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_into_a_shared_subscription_arrives_once_each() {
    const PUBLISHERS: u64 = 4;
    const PER_PUBLISHER: u64 = 250;
    const MESSAGES: u64 = PUBLISHERS * PER_PUBLISHER;
    let double = common::double();
    let recorder = Arc::new(common::Recorder::default());
    let mut keep = Vec::new();
    for i in 0..3 {
        let (bridge, sidecar) = common::bridge(&double, &format!("burst-{i}"), "burst").await;
        common::subscribe(
            &bridge,
            common::spec("svc", "sub", "tick", true),
            recorder.clone(),
        )
        .await;
        keep.push((bridge, sidecar));
    }
    let (publisher, _sidecar) = common::bridge(&double, "burst-pub", "burst").await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                for k in 0..PER_PUBLISHER {
                    let n = p * PER_PUBLISHER + k;
                    let event = Envelope::custom(
                        SenderAddress::default(),
                        "tick",
                        serde_json::json!({ "n": n }),
                    );
                    publisher.emit(event).await.expect("emit");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a publisher task");
    }
    let published = started.elapsed();
    let seen = recorder
        .wait_for(MESSAGES as usize, Duration::from_secs(60))
        .await;
    println!(
        "published {MESSAGES} in {published:?}, delivered {} in {:?} (double: {} published, {} delivered)",
        seen.len(),
        started.elapsed(),
        double.published(),
        double.delivered()
    );
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), MESSAGES as usize, "lost messages");
    assert_eq!(seen.len(), MESSAGES as usize, "duplicates");
}
