//! `connect("dapr://…")` with the `dapr` feature: a started Dapr bridge that services use like
//! any other; the API token reaches the sidecar and a wrong one is refused at connect. Runs
//! against the in-repo sidecar double.
#![cfg(feature = "dapr")]

use purista::dapr::double::{DaprDouble, DoubleOptions, SidecarOptions};
use purista::prelude::*;
use purista::{ConnectError, ConnectOptions, connect_with};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[tokio::test]
async fn a_dapr_url_connects_a_bridge_that_serves_commands() {
    let double = DaprDouble::start(DoubleOptions::default()).expect("the double starts");
    let sidecar = double
        .sidecar(SidecarOptions {
            app_id: "greeter-app".into(),
            api_token: Some("s3cret".into()),
            ..SidecarOptions::default()
        })
        .expect("a sidecar starts");
    let app_port = free_port();
    sidecar.connect_app(app_port);
    let hostport = sidecar.address().trim_start_matches("http://").to_string();
    let url = format!("dapr://:s3cret@{hostport}?app_id=greeter-app&app_port={app_port}");
    let conn = connect_with(&ConnectOptions::new(&url).prefix("facade"))
        .await
        .expect("connects with the right token");
    assert_eq!(conn.events.name(), "dapr");
    assert!(!format!("{conn:?}").contains("s3cret"), "{conn:?}");
    let service = Service::builder("greeter", "1")
        .command(CommandDef::new(
            "hello",
            |_ctx: Context, name: String, _p: Empty| async move { Ok(format!("hello {name}")) },
        ))
        .build()
        .start(conn.events.clone())
        .await
        .expect("the service starts on Dapr");
    let reply: String = service
        .invoke(Address::new("greeter", "1", "hello"), "ada", Empty)
        .await
        .expect("the command is answered through service invocation");
    assert_eq!(reply, "hello ada");
    service
        .shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn a_wrong_api_token_is_refused_at_connect_without_printing_it() {
    let double = DaprDouble::start(DoubleOptions::default()).expect("the double starts");
    let sidecar = double
        .sidecar(SidecarOptions {
            app_id: "a".into(),
            api_token: Some("right".into()),
            ..SidecarOptions::default()
        })
        .expect("a sidecar starts");
    let app_port = free_port();
    sidecar.connect_app(app_port);
    let hostport = sidecar.address().trim_start_matches("http://").to_string();
    let url = format!("dapr://:wrong-token@{hostport}?app_id=a&app_port={app_port}");
    let err = connect_with(&ConnectOptions::new(&url))
        .await
        .expect_err("the sidecar refuses a wrong token");
    assert!(matches!(err, ConnectError::Bridge(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-token"), "{err}");
}

#[tokio::test]
async fn a_bad_dapr_url_is_an_invalid_config() {
    let err = purista::connect("dapr://host:notaport")
        .await
        .expect_err("not a port");
    assert!(matches!(err, ConnectError::InvalidConfig { .. }), "{err:?}");
}
