//! The behaviours, one file per group. Each case is `pub async fn <behaviour>(h: Arc<dyn
//! Harness>)`, panics with what a user would see broken, and is listed with what it requires in
//! [`all_cases`](crate::all_cases). A case body may assume its requirements hold: the runner
//! proves an undeclared need rejected (or skips) instead of calling it.

pub mod churn;
pub mod commands;
pub mod concurrency;
pub mod duplicates;
pub mod envelope;
pub mod lifecycle;
pub mod limits;
pub mod observability;
pub mod outcomes;
pub mod queues;
pub mod reliability;
pub mod routing;
pub mod streams;
pub mod strict;
pub mod subscriptions;
