//! The conformance suite against the RabbitMQ bridge (`purista-bridge-amqp`) on a real broker:
//! `PURISTA_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`. Skipped loudly when the
//! broker is unreachable, failed under `PURISTA_REQUIRE_BROKERS=1`.

purista_conformance::suite!(amqp, purista_conformance::harnesses::AmqpHarness::new());
