//! The adapter kit: what every broker adapter needs besides its broker mapping.
//!
//! **For adapter authors.** A service never touches this module; a bridge crate uses it so that
//! it writes only the translation onto its broker, and so that what a timeout, a size limit or
//! a resource name means is decided once, here:
//!
//! * [`PendingInvocations`] — the caller's side of request/reply: pending invocations by
//!   `correlationId`, late and unknown responses ignored with a warning and counted.
//! * [`TaskSet`] and [`Activity`] — every task a bridge spawns, so shutdown can wait for them
//!   until its deadline and abort (and name) the rest; one registration's running handlers.
//! * [`deadline_after`], [`broker_call`] — bounded waits: no broker call without a deadline.
//! * [`stamp`], [`stamp_response`], [`check_emittable`], [`check_command`],
//!   [`check_stream_open`] — what goes out is checked and stamped the same way everywhere.
//! * [`check_body`], [`check_metadata`], [`metadata_fields`] — body and metadata measured
//!   against the bridge's declared [`Limits`](crate::Limits) before publishing: too large is a
//!   400 at the caller, never a broker protocol error.
//! * [`NameRules`] — injective resource names: two addresses never share a queue.
//! * [`FastMap`] — the hash map of a bridge's own lookup tables.
//! * [`JobPool`] — received jobs held for `lease` calls, for queue bridges whose broker hands
//!   out one message at a time and counts delays in whole seconds.
//! * [`LeaseHolders`] — `extend_lease` and `settle` routed to the task holding the lease.
//! * [`JobRecord`], [`DeadRecord`] — a queue bridge's job and dead letter as stored in a
//!   broker message (the JSON fields are a wire format).
//!
//! A new bridge also implements [`EventBridge`](crate::EventBridge) (and its operator
//! supertrait [`SubscriptionOperator`](crate::SubscriptionOperator)) and, where the broker has
//! one, [`QueueBridge`](crate::QueueBridge), declares truthful
//! [`Capabilities`](crate::Capabilities), and passes the conformance suite.

mod deadline;
mod fast_hash;
mod job_pool;
mod job_record;
mod lease_holders;
mod names;
mod outgoing;
mod pending;
mod size;
mod tasks;

pub use deadline::{broker_call, deadline_after, millis};
pub use fast_hash::{FastHasher, FastMap};
pub use job_pool::{Claim, JobPool, PoolCounts};
pub use job_record::{DeadRecord, JobRecord, MAX_REASON_BYTES, cut};
pub use lease_holders::{LeaseCommand, LeaseHolders};
pub use names::{NameRules, Overflow};
pub use outgoing::{
    check_command, check_emittable, check_stream_open, correlation_id, endpoint_label, stamp,
    stamp_response,
};
pub use pending::{PendingInvocations, PendingReply, PendingSlot};
pub use size::{check_body, check_metadata, encoded_len, metadata_fields, metadata_len};
pub use tasks::{Activity, ActivityGuard, Reservation, TaskSet};
