//! The AWS bridge (`purista-bridge-aws`): against moto at `PURISTA_AWS_ENDPOINT` (started by
//! `scripts/test`), or real AWS with `PURISTA_AWS_LIVE=1`.

purista_conformance::suite!(aws, purista_conformance::harnesses::AwsHarness::new());
