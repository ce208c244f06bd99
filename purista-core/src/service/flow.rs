//! The flow a piece of work belongs to: the trace id, the W3C trace-context carrier (`otp`),
//! the principal and the tenant, and where they come from.
//!
//! A handler runs for a message, a job handler for a job, and code outside any handler for
//! nothing. Everything a handler starts (invocations, events, stream sessions, jobs) carries
//! the flow on, so a trace never breaks at a queue or a stream. The ids are read from their
//! source when needed, never copied up front: a command handler that starts nothing pays nothing.
//!
//! The `otp` an outgoing message carries is not the flow's: it is the context of the span that
//! sends it (a child of the handler's span), so the receiver's span is a child of the sender's.
//! A flow without a trace id (one this service starts) takes the W3C trace id as its `traceId`.

use std::sync::Arc;

use crate::envelope::Envelope;
use crate::observe::{TraceContext, write_otp};
use crate::queue::{LeasedJob, NewJob};

/// Where the current flow's ids come from.
#[derive(Clone, Debug, Default)]
pub(crate) enum Flow {
    /// Outside any handler: each operation starts a fresh trace.
    #[default]
    Fresh,
    /// A handler of this message.
    Message(Arc<Envelope>),
    /// A handler of this job.
    Job(Arc<LeasedJob>),
}

impl Flow {
    /// The message the handler runs for.
    pub fn envelope(&self) -> Option<&Envelope> {
        match self {
            Flow::Message(e) => Some(e),
            _ => None,
        }
    }

    pub fn trace_id(&self) -> Option<&str> {
        match self {
            Flow::Fresh => None,
            Flow::Message(e) => e.trace_id.as_deref(),
            Flow::Job(j) => j.trace_id.as_deref(),
        }
    }

    pub fn otp(&self) -> Option<&str> {
        match self {
            Flow::Fresh => None,
            Flow::Message(e) => e.otp.as_deref(),
            Flow::Job(j) => j.otp.as_deref(),
        }
    }

    pub fn principal_id(&self) -> Option<&str> {
        match self {
            Flow::Fresh => None,
            Flow::Message(e) => e.principal_id.as_deref(),
            Flow::Job(j) => j.principal_id.as_deref(),
        }
    }

    pub fn tenant_id(&self) -> Option<&str> {
        match self {
            Flow::Fresh => None,
            Flow::Message(e) => e.tenant_id.as_deref(),
            Flow::Job(j) => j.tenant_id.as_deref(),
        }
    }

    /// Writes the flow's ids onto an outgoing message sent by the span `sender` (ids the flow
    /// lacks stay as they are): `otp` is the sender's context, and a message still without a
    /// trace id takes the W3C trace id.
    pub fn stamp(&self, e: &mut Envelope, sender: &TraceContext) {
        let set = |field: &mut Option<String>, value: Option<&str>| {
            if let Some(v) = value {
                *field = Some(v.to_string());
            }
        };
        set(&mut e.trace_id, self.trace_id());
        set(&mut e.principal_id, self.principal_id());
        set(&mut e.tenant_id, self.tenant_id());
        e.otp = Some(write_otp(sender));
        if e.trace_id.is_none() {
            e.trace_id = Some(sender.trace_id_hex());
        }
    }

    /// Fills the ids a job does not set itself: the flow's, the enqueueing span's context as
    /// `otp`, and the W3C trace id when there is still no trace id.
    pub fn stamp_job(&self, job: &mut NewJob, sender: &TraceContext) {
        let fill = |field: &mut Option<String>, value: Option<&str>| {
            if field.is_none() {
                *field = value.map(str::to_string);
            }
        };
        fill(&mut job.trace_id, self.trace_id());
        fill(&mut job.principal_id, self.principal_id());
        fill(&mut job.tenant_id, self.tenant_id());
        if job.otp.is_none() {
            job.otp = Some(write_otp(sender));
        }
        if job.trace_id.is_none() {
            job.trace_id = Some(sender.trace_id_hex());
        }
    }
}
