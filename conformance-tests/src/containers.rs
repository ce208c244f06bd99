//! Real brokers in containers, for machines with a Docker engine (feature `testcontainers`).
//!
//! A harness asks for a broker here only when no broker address is configured. The container
//! lives as long as the returned handle; dropping it stops and removes the container. Machines
//! without a Docker engine get a [`testcontainers::TestcontainersError`] at once (no hang).

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage};

/// The RabbitMQ image the suite runs against (the management-less Alpine build).
pub const RABBITMQ_IMAGE: (&str, &str) = ("rabbitmq", "3.13-alpine");

/// A running RabbitMQ container.
pub struct RabbitMqContainer {
    /// `amqp://guest:guest@127.0.0.1:<mapped port>/%2f`
    pub url: String,
    // Kept for its Drop: the container stops when the handle goes.
    _container: ContainerAsync<GenericImage>,
}

/// Starts RabbitMQ in a container and waits until it accepts AMQP connections.
pub async fn rabbitmq() -> Result<RabbitMqContainer, testcontainers::TestcontainersError> {
    let (name, tag) = RABBITMQ_IMAGE;
    let container = GenericImage::new(name, tag)
        .with_exposed_port(5672.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
        .start()
        .await?;
    let port = container.get_host_port_ipv4(5672.tcp()).await?;
    Ok(RabbitMqContainer {
        url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        _container: container,
    })
}
