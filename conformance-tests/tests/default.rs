//! The conformance suite against the in-process bridge (`purista-bridge-default`).

purista_conformance::suite!(
    default,
    purista_conformance::harnesses::DefaultHarness::new()
);
