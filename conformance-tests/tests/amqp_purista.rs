//! The conformance suite against the RabbitMQ bridge in the PURISTA topology mode
//! (`TopologyMode::Purista`: command and shared subscription queues declared exactly as
//! PURISTA's TypeScript AMQP bridge declares them), on the same broker as `amqp`.

purista_conformance::suite!(
    amqp_purista,
    purista_conformance::harnesses::AmqpHarness::purista()
);
