//! The KubeMQ bridge (`purista-bridge-kubemq`): against a real KubeMQ when `KUBEMQ_ADDRESS`
//! is set, else against the in-repo protocol double.

purista_conformance::suite!(kubemq, purista_conformance::harnesses::KubemqHarness::new());
