//! `connect(url)` picks a bridge by scheme and explains what is wrong with a URL it cannot use.

use purista::{ConnectError, connect, redact_url};

#[tokio::test]
async fn memory_url_connects_to_the_in_process_bridge_with_a_queue_bridge() {
    let conn = connect("memory://connect-test")
        .await
        .expect("memory connects");
    assert_eq!(conn.events.name(), "default");
    assert!(conn.queues.is_some());
    assert!(conn.events.health().await.is_healthy());
}

#[tokio::test]
async fn two_connections_to_one_memory_url_are_two_instances_on_one_hub() {
    use purista::prelude::*;
    let a = connect("memory://shared-hub").await.unwrap();
    let b = connect("memory://shared-hub").await.unwrap();
    assert_ne!(a.events.instance_id(), b.events.instance_id());
    let server = Service::builder("echo", "1")
        .command(CommandDef::new(
            "echo",
            |_c: Context, v: u32, _p: Empty| async move { Ok(v) },
        ))
        .build()
        .start(a.events.clone())
        .await
        .unwrap();
    let client = Service::builder("client", "1")
        .build()
        .start(b.events.clone())
        .await
        .unwrap();
    let v: u32 = client
        .invoke(Address::new("echo", "1", "echo"), 7, Empty)
        .await
        .unwrap();
    assert_eq!(v, 7);
    server.shutdown(tokio::time::Instant::now()).await;
}

#[tokio::test]
async fn different_memory_urls_are_isolated() {
    use purista::prelude::*;
    let a = connect("memory://iso-a").await.unwrap();
    let b = connect("memory://iso-b").await.unwrap();
    let _server = Service::builder("echo", "1")
        .command(CommandDef::new(
            "echo",
            |_c: Context, v: u32, _p: Empty| async move { Ok(v) },
        ))
        .build()
        .start(a.events.clone())
        .await
        .unwrap();
    let client = Service::builder("client", "1")
        .build()
        .start(b.events.clone())
        .await
        .unwrap();
    let err = client
        .invoke::<u32>(Address::new("echo", "1", "echo"), 7, Empty)
        .await
        .unwrap_err();
    assert_eq!(err.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn unknown_scheme_is_a_clear_error() {
    let err = connect("carrier-pigeon://coop").await.unwrap_err();
    assert!(
        matches!(err, ConnectError::UnknownScheme { ref scheme, .. } if scheme == "carrier-pigeon")
    );
    assert!(
        err.to_string().contains("this build serves: memory"),
        "{err}"
    );
}

#[tokio::test]
async fn a_scheme_whose_feature_is_off_names_the_feature_to_enable() {
    if cfg!(feature = "amqp") {
        // With the feature on, amqp URLs connect (tests/amqp.rs).
        return;
    }
    let url = "amqp://guest:guest@localhost:5672";
    let err = connect(url).await.unwrap_err();
    match &err {
        ConnectError::FeatureDisabled { feature, .. } => assert_eq!(*feature, "amqp"),
        other => panic!("{url}: expected FeatureDisabled, got {other:?}"),
    }
    assert!(err.to_string().contains("`amqp`"));
    assert!(
        !err.to_string().contains("guest:guest"),
        "credentials leaked: {err}"
    );
}

#[tokio::test]
async fn a_bridge_that_does_not_exist_is_not_promised_behind_a_feature() {
    for url in ["knative://broker.local/default"] {
        let err = connect(url).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::UnknownScheme { .. }),
            "{url}: expected UnknownScheme, got {err:?}"
        );
        assert!(!err.to_string().contains("feature"), "{err}");
    }
}

#[test]
fn the_driver_table_lists_what_is_compiled_in() {
    let schemes: Vec<&str> = purista::drivers()
        .iter()
        .flat_map(|d| d.schemes.iter().copied())
        .collect();
    assert!(schemes.contains(&"memory"));
    assert_eq!(schemes.contains(&"amqp"), cfg!(feature = "amqp"));
    assert_eq!(schemes.contains(&"kubemq"), cfg!(feature = "kubemq"));
    assert_eq!(schemes.contains(&"aws"), cfg!(feature = "aws"));
    assert_eq!(schemes.contains(&"dapr"), cfg!(feature = "dapr"));
}

#[cfg(not(feature = "aws"))]
#[tokio::test]
async fn an_aws_url_without_the_feature_names_the_feature() {
    let err = connect("aws://eu-west-1?prefix=shop").await.unwrap_err();
    match &err {
        ConnectError::FeatureDisabled { feature, .. } => assert_eq!(*feature, "aws"),
        other => panic!("expected FeatureDisabled, got {other:?}"),
    }
}

#[cfg(not(feature = "kubemq"))]
#[tokio::test]
async fn a_kubemq_url_without_the_feature_names_the_feature() {
    let err = connect("kubemq://localhost:50000").await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::FeatureDisabled {
                feature: "kubemq",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_url_without_scheme_is_invalid() {
    let err = connect("localhost:5672").await.unwrap_err();
    assert!(matches!(err, ConnectError::InvalidUrl { .. }));
}

#[test]
fn redaction_hides_passwords_only() {
    assert_eq!(redact_url("amqps://u:p@h/vhost"), "amqps://u:***@h/vhost");
    assert_eq!(redact_url("amqp://u@h"), "amqp://u@h");
    assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
}
