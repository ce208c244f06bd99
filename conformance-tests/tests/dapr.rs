//! The Dapr bridge (`purista-bridge-dapr`) against the in-repo sidecar double.

purista_conformance::suite!(dapr, purista_conformance::harnesses::DaprHarness::new());
