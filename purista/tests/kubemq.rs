//! `connect("kubemq://…")` with the `kubemq` feature: a started KubeMQ bridge that services
//! use like any other; the auth token reaches KubeMQ and a wrong one is refused at connect.
//! Runs against the in-repo KubeMQ protocol double.
#![cfg(feature = "kubemq")]

use purista::kubemq::double::{DoubleOptions, KubemqDouble};
use purista::prelude::*;
use purista::{ConnectError, ConnectOptions, connect_with};

fn double(token: Option<&str>) -> KubemqDouble {
    KubemqDouble::start(DoubleOptions {
        auth_token: token.map(str::to_string),
    })
    .expect("the KubeMQ double starts")
}

#[tokio::test]
async fn a_kubemq_url_connects_a_bridge_that_serves_commands() {
    let broker = double(Some("s3cret"));
    let url = format!(
        "kubemq://:s3cret@{}?client_id=facade-test",
        broker.address()
    );
    let conn = connect_with(&ConnectOptions::new(&url).prefix("facade"))
        .await
        .expect("connects with the right token");
    assert_eq!(conn.events.name(), "kubemq");
    assert!(
        !format!("{conn:?}").contains("s3cret"),
        "the token is redacted: {conn:?}"
    );
    let service = Service::builder("greeter", "1")
        .command(CommandDef::new(
            "hello",
            |_ctx: Context, name: String, _p: Empty| async move { Ok(format!("hello {name}")) },
        ))
        .build()
        .start(conn.events.clone())
        .await
        .expect("the service starts on KubeMQ");
    let reply: String = service
        .invoke(Address::new("greeter", "1", "hello"), "ada", Empty)
        .await
        .expect("the command is answered through KubeMQ");
    assert_eq!(reply, "hello ada");
    service
        .shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn a_wrong_auth_token_is_refused_at_connect_without_printing_it() {
    let broker = double(Some("right"));
    let url = format!("kubemq://:wrong-token@{}", broker.address());
    let mut options = ConnectOptions::new(&url);
    options = options.prefix("facade");
    let err = connect_with(&options)
        .await
        .expect_err("KubeMQ refuses a wrong token");
    assert!(matches!(err, ConnectError::Bridge(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-token"), "{err}");
}

#[tokio::test]
async fn a_bad_kubemq_url_is_an_invalid_config() {
    let err = purista::connect("kubemq://host:notaport")
        .await
        .expect_err("not a port");
    assert!(matches!(err, ConnectError::InvalidConfig { .. }), "{err:?}");
}
