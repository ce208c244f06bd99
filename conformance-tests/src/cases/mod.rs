//! The behaviours, one file per group. Each case is
//! `pub async fn <behaviour>(h: Arc<dyn Harness>) -> Verdict` and is listed in
//! [`for_each_case!`](crate::for_each_case).

pub mod commands;
pub mod duplicates;
pub mod envelope;
pub mod lifecycle;
pub mod outcomes;
pub mod queues;
pub mod reliability;
pub mod streams;
pub mod strict;
pub mod subscriptions;
