//! TLS (`amqps://`) of the RabbitMQ bridge against a real TLS listener: a private RabbitMQ node
//! of this test process (`PrivateNode::start_with_tls`) with certificates made here by `rcgen`,
//! a throwaway CA, a server certificate for `127.0.0.1`/`localhost` and a client certificate.
//!
//! Two nodes at most per process, each started on first use: one that asks for no client
//! certificate and one that requires one (mutual TLS). They stop when the process exits. Without
//! RabbitMQ installed the tests are listed as skipped, with the reason, unless
//! `PURISTA_REQUIRE_BROKERS=1`, which makes them run and fail. (A `harness = false` target: see
//! `purista_conformance::runner::run_tests`.)

fn main() -> std::process::ExitCode {
    use purista_conformance::runner::{ListedTest, run_tests};
    let skip = match PrivateNode::installed() {
        Err(why) if !purista_conformance::env::brokers_required() => Some(why),
        _ => None,
    };
    let test =
        |name: &'static str, run: fn() -> futures::future::BoxFuture<'static, ()>| ListedTest {
            name,
            skip: skip.clone(),
            run,
        };
    run_tests(vec![
        ListedTest {
            name: "a_missing_ca_file_is_a_config_error_naming_it",
            skip: None,
            run: || Box::pin(async { a_missing_ca_file_is_a_config_error_naming_it() }),
        },
        test(
            "a_bridge_trusting_the_private_ca_serves_commands_and_events_over_amqps",
            || Box::pin(a_bridge_trusting_the_private_ca_serves_commands_and_events_over_amqps()),
        ),
        test(
            "without_the_private_ca_the_bridge_reports_an_untrusted_certificate",
            || Box::pin(without_the_private_ca_the_bridge_reports_an_untrusted_certificate()),
        ),
        test(
            "a_broker_requiring_client_certificates_admits_only_a_bridge_presenting_one",
            || {
                Box::pin(
                    a_broker_requiring_client_certificates_admits_only_a_bridge_presenting_one(),
                )
            },
        ),
    ])
}

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use purista_bridge_amqp::{AmqpBridge, AmqpConfig, CA_FILE_ENV, ConfigError, TlsFile, URL_ENV};
use purista_conformance::harnesses::private_node::{PrivateNode, TlsListener};
use purista_conformance::support::{ARRIVAL, Collector, new_prefix};
use purista_core::{
    Address, BridgeError, BridgeHealth, CommandHandler, Delivery, DeliveryHandler, Envelope,
    EventBridge, FailurePolicy, SenderAddress, Settlement, SubscriptionFilter, SubscriptionSpec,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use tokio::sync::OnceCell;

/// The password of the URL the untrusted-certificate test connects with: it must never show.
const PASSWORD: &str = "tls-test-Pa55w0rd";

/// A certificate and its private key, PEM.
struct Issued {
    certificate: String,
    key: String,
}

/// The certificates of this process: a CA, the broker's certificate and a client's, both
/// signed by the CA.
struct Pki {
    ca: String,
    server: Issued,
    client: Issued,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "purista TLS test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = ca.self_signed(&ca_key).expect("the CA certificate").pem();
        let issuer = Issuer::new(ca, ca_key);
        Pki {
            ca: ca_pem,
            server: issue(
                &issuer,
                &["127.0.0.1", "localhost"],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            client: issue(
                &issuer,
                &["purista-tls-client"],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        }
    })
}

/// A certificate for `names` (the first is also its common name) signed by `issuer`.
fn issue(issuer: &Issuer<'_, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
    let key = KeyPair::generate().expect("a key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("certificate parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let certificate = params
        .signed_by(&key, issuer)
        .expect("a signed certificate");
    Issued {
        certificate: certificate.pem(),
        key: key.serialize_pem(),
    }
}

/// Which TLS node a test needs.
#[derive(Clone, Copy)]
enum ClientCertificates {
    /// The node asks for none.
    NotAsked,
    /// The node refuses a client without one signed by the CA.
    Required,
}

/// The TLS node of this process of the given kind, started on first use; panics when it cannot
/// be started (the test was listed to run, so RabbitMQ is installed or brokers are required).
async fn tls_node(kind: ClientCertificates) -> Arc<PrivateNode> {
    type Slot = OnceCell<Result<Arc<PrivateNode>, String>>;
    static NOT_ASKED: Slot = OnceCell::const_new();
    static REQUIRED: Slot = OnceCell::const_new();
    let (slot, required) = match kind {
        ClientCertificates::NotAsked => (&NOT_ASKED, false),
        ClientCertificates::Required => (&REQUIRED, true),
    };
    let started = slot
        .get_or_init(|| async move {
            let pki = pki();
            let listener = TlsListener {
                ca_certificate_pem: pki.ca.clone(),
                certificate_pem: pki.server.certificate.clone(),
                key_pem: pki.server.key.clone(),
                require_client_certificate: required,
            };
            tokio::task::spawn_blocking(move || PrivateNode::start_with_tls(listener))
                .await
                .unwrap_or_else(|e| Err(format!("starting the TLS node panicked: {e}")))
        })
        .await;
    match started {
        Ok(node) => node.clone(),
        Err(why) => panic!("the TLS node could not be started: {why}"),
    }
}

/// Files a bridge reads (CA, client certificate and key), removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("purista-tls-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Scratch(dir)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("a scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bridge config for `url` under a fresh prefix, with quick reconnects.
fn config(url: &str) -> AmqpConfig {
    let mut config = AmqpConfig::new(url).with_prefix(new_prefix());
    config.default_command_timeout = Duration::from_secs(5);
    config.reconnect_initial_delay = Duration::from_millis(50);
    config.reconnect_max_delay = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(5);
    config
}

async fn started(config: AmqpConfig) -> Arc<AmqpBridge> {
    let bridge = Arc::new(AmqpBridge::new(config).expect("the TLS config is valid"));
    bridge
        .start()
        .await
        .expect("the bridge connects over amqps");
    bridge
}

/// The error of a bridge that cannot connect, and its health reason meanwhile.
async fn refused(mut config: AmqpConfig) -> (BridgeError, String) {
    // The handshake fails at once; the timeout only bounds how long `start` keeps trying.
    config.connect_timeout = Duration::from_secs(2);
    let bridge = AmqpBridge::new(config).expect("the TLS config is valid");
    let error = bridge
        .start()
        .await
        .expect_err("the bridge must not connect");
    let reason = match bridge.health().await {
        BridgeHealth::Unhealthy { reason } => reason,
        BridgeHealth::Healthy => panic!("health is ok although the bridge did not connect"),
    };
    bridge.shutdown(tokio::time::Instant::now()).await;
    (error, reason)
}

async fn stop(bridges: &[&Arc<AmqpBridge>]) {
    for bridge in bridges {
        bridge
            .shutdown(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    }
}

fn sender() -> SenderAddress {
    SenderAddress {
        service_name: "tls-client".into(),
        service_version: "1".into(),
        service_target: "run".into(),
        instance_id: String::new(),
    }
}

/// Answers a command with its payload.
struct Echo;

#[async_trait]
impl CommandHandler for Echo {
    async fn handle(&self, command: Arc<Envelope>) -> Envelope {
        command.success_response(command.payload["payload"].clone(), None)
    }
}

/// Records every delivery and acks it.
struct Recording(Arc<Collector<Envelope>>);

#[async_trait]
impl DeliveryHandler for Recording {
    async fn deliver(&self, delivery: Delivery) {
        self.0.push(delivery.envelope.as_ref().clone());
        delivery
            .settle
            .settle(Settlement::Ack)
            .await
            .expect("the delivery settles");
    }
}

async fn a_bridge_trusting_the_private_ca_serves_commands_and_events_over_amqps() {
    let node = tls_node(ClientCertificates::NotAsked).await;
    let files = Scratch::new("round-trip");
    let ca = files.write("ca.pem", &pki().ca);
    let url = node.amqps_url().expect("the node listens for TLS");
    let config = config(&url).with_ca_certificate_file(&ca);
    let server = started(config.clone().with_instance_id("tls-server")).await;
    let client = started(config.with_instance_id("tls-client")).await;
    assert!(server.health().await.is_healthy());
    assert!(client.health().await.is_healthy());

    let address = Address::new("echo", "1", "say");
    server
        .register_command(address.clone(), Arc::new(Echo))
        .await
        .expect("a command registers over amqps");
    let command = Envelope::command(sender(), address, json!("over TLS"), json!({}));
    let response = client
        .invoke(command, Duration::from_secs(5))
        .await
        .expect("the command round trip works over amqps");
    assert_eq!(response.payload, json!("over TLS"));

    let seen = Collector::new();
    let spec = SubscriptionSpec {
        key: "listener@1/onShipped".into(),
        subscriber: Address::new("listener", "1", "onShipped"),
        filter: SubscriptionFilter::new().event_name("shipped"),
        shared: true,
        durable: false,
        policy: FailurePolicy::default(),
        prefetch: 8,
    };
    server
        .register_subscription(spec, Arc::new(Recording(seen.clone())))
        .await
        .expect("a subscription registers over amqps");
    client
        .emit(Envelope::custom(sender(), "shipped", json!({ "order": 7 })))
        .await
        .expect("an event is emitted over amqps");
    let got = seen
        .wait_for_len(1, ARRIVAL, "the event emitted over amqps")
        .await;
    assert_eq!(got[0].payload, json!({ "order": 7 }));
    stop(&[&server, &client]).await;
}

async fn without_the_private_ca_the_bridge_reports_an_untrusted_certificate() {
    let node = tls_node(ClientCertificates::NotAsked).await;
    let port = node.tls_port().expect("the node listens for TLS");
    // The handshake fails before the broker sees any credentials: they need not exist.
    let url = format!("amqps://purista:{PASSWORD}@127.0.0.1:{port}/%2f");
    let (error, health) = refused(config(&url)).await;

    assert!(matches!(error, BridgeError::Unavailable(_)), "{error:?}");
    for text in [error.to_string(), health] {
        assert!(
            text.contains("TLS certificate problem") && text.contains("UnknownIssuer"),
            "the error does not say the certificate is not trusted: {text}"
        );
        assert!(
            text.contains(CA_FILE_ENV),
            "the error does not point at the CA setting: {text}"
        );
        assert!(
            text.contains(&format!("amqps://purista:***@127.0.0.1:{port}")),
            "the error does not name the (redacted) URL: {text}"
        );
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
}

fn a_missing_ca_file_is_a_config_error_naming_it() {
    let missing =
        std::env::temp_dir().join(format!("purista-tls-{}-no-such-ca.pem", std::process::id()));
    let names_the_file = |error: &ConfigError| {
        matches!(error, ConfigError::UnreadableTlsFile { kind: TlsFile::CaCertificates, path, .. }
            if path == &missing)
            && error.to_string().contains(&missing.display().to_string())
    };

    let configured =
        AmqpConfig::new("amqps://app:secret@127.0.0.1:5671/%2f").with_ca_certificate_file(&missing);
    let error = AmqpBridge::new(configured).expect_err("a missing CA file is refused");
    assert!(names_the_file(&error), "{error:?}");

    let from_env = AmqpConfig::from_lookup(|name| match name {
        URL_ENV => Some("amqps://app:secret@127.0.0.1:5671/%2f".into()),
        CA_FILE_ENV => Some(missing.display().to_string()),
        _ => None,
    })
    .expect_err("a missing CA file is refused");
    assert!(names_the_file(&from_env), "{from_env:?}");
}

async fn a_broker_requiring_client_certificates_admits_only_a_bridge_presenting_one() {
    let node = tls_node(ClientCertificates::Required).await;
    let files = Scratch::new("mutual");
    let pki = pki();
    let ca = files.write("ca.pem", &pki.ca);
    let certificate = files.write("client.pem", &pki.client.certificate);
    let key = files.write("client.key", &pki.client.key);
    let url = node.amqps_url().expect("the node listens for TLS");
    let trusting = config(&url).with_ca_certificate_file(&ca);

    let with_identity = started(
        trusting
            .clone()
            .with_client_identity_files(&certificate, &key),
    )
    .await;
    assert!(with_identity.health().await.is_healthy());
    stop(&[&with_identity]).await;

    let (error, health) = refused(trusting).await;
    assert!(matches!(error, BridgeError::Unavailable(_)), "{error:?}");
    for text in [error.to_string(), health] {
        assert!(
            text.contains("TLS certificate problem") && text.contains("client certificate"),
            "the error does not say the broker wants a client certificate: {text}"
        );
    }
}
