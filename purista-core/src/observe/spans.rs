//! One `tracing` span per unit of work, named and attributed after OpenTelemetry's messaging
//! semantic conventions, each with the W3C identity its messages carry on.
//!
//! | span | `otel.kind` | `messaging.operation.type` | parent |
//! |---|---|---|---|
//! | `purista.invoke` | client | send | the handler that invokes (or none) |
//! | `purista.command` | server | process | the `otp` of the command |
//! | `purista.emit` | producer | send | the handler that emits (or none) |
//! | `purista.subscription` | consumer | process | the `otp` of the message, one span per attempt |
//! | `purista.stream.open` | client | send | the handler that opens (or none) |
//! | `purista.stream` | server | process | the `otp` of the open frame |
//! | `purista.enqueue` | producer | send | the handler that enqueues (or none) |
//! | `purista.job` | consumer | process | the `otp` of the job, one span per attempt |
//!
//! Every span has `messaging.system`, `messaging.operation.{type,name}`,
//! `messaging.destination.name`, `otel.name` (`{operation} {destination}`), the W3C ids
//! (`trace_id`, `span_id`, `parent_span_id`, for logs and for recorders without OpenTelemetry),
//! `purista.service.{name,version,target}` and `purista.traceId`; received work adds
//! `messaging.message.id` and the sender (`purista.sender.*`), commands and streams the
//! correlation id (`messaging.message.conversation_id`), retried work `purista.attempt`, and
//! settled work `purista.outcome`. A failure sets `otel.status_code = ERROR`, `error.type` and
//! `purista.statusCode`. Principal and tenant (`purista.principalId`, `purista.tenantId`) may
//! be personal data: they are recorded only when the service opts in
//! ([`ServiceBuilder::trace_identities`](crate::service::ServiceBuilder::trace_identities)).
//!
//! Field values are only computed when a subscriber wants the span; what always happens is
//! minting the span's identity, because the messages it sends carry it.

use std::sync::Arc;

use tracing::Span;
use tracing::field::Empty;

use super::trace_context::TraceContext;
use crate::envelope::{Address, Envelope};
use crate::error::StatusCode;
use crate::queue::{LeasedJob, NewJob};

/// What every span of one service says about where it runs.
#[derive(Debug, Clone)]
pub(crate) struct Site {
    /// `purista.service.name`.
    pub service: Arc<str>,
    /// `purista.service.version`.
    pub version: Arc<str>,
    /// `messaging.system`: the bridge's.
    pub system: Arc<str>,
    /// Record principal and tenant (opt-in).
    pub identities: bool,
}

/// What a unit of work continues.
pub(crate) enum Parent<'a> {
    /// A received message or job: the context its `otp` carries (none: a new trace).
    Carried(Option<TraceContext>),
    /// Work a handler starts (`None` outside any handler).
    Local(Option<&'a TraceContext>),
}

/// A span and the identity the work's messages carry on.
pub(crate) struct Traced {
    pub span: Span,
    pub cx: TraceContext,
}

impl Traced {
    /// The span with the identity its parent gives it: `ids`, already recorded on the span
    /// as it was made, or OpenTelemetry's when its layer builds the span (`otel` feature).
    fn new(span: Span, parent: Parent<'_>, ids: Ids) -> Traced {
        #[cfg(feature = "otel")]
        if let Some((cx, parent_id)) = super::otel::identify(&span, &parent) {
            if !span.is_disabled() {
                span.record("trace_id", tracing::field::display(TraceHex(cx.trace_id())));
                span.record("span_id", tracing::field::display(SpanHex(cx.span_id())));
                if let Some(id) = parent_id {
                    span.record("parent_span_id", tracing::field::display(SpanHex(id)));
                }
            }
            return Traced { span, cx };
        }
        let _ = parent;
        Traced { span, cx: ids.cx }
    }

    /// Marks the work failed with `status` (`error.type` is the status code, as HTTP's
    /// semantic conventions do for status codes).
    pub fn fail(&self, status: StatusCode) {
        if self.span.is_disabled() {
            return;
        }
        self.span.record("otel.status_code", "ERROR");
        self.span.record("purista.statusCode", status.0);
        self.span.record("error.type", status.0.to_string());
    }

    /// Marks the work failed with an error that has no status (`error.type` names it).
    pub fn fail_with(&self, error_type: &str) {
        self.span.record("otel.status_code", "ERROR");
        self.span.record("error.type", error_type);
    }

    /// Records how the work was settled (`purista.outcome`).
    pub fn outcome(&self, outcome: &str) {
        self.span.record("purista.outcome", outcome);
    }
}

/// A W3C trace id, formatted as 32 lowercase hex digits only when a span's field is formatted.
struct TraceHex(u128);

impl std::fmt::Display for TraceHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A W3C span id, formatted as 16 lowercase hex digits only when a span's field is formatted.
struct SpanHex(u64);

impl std::fmt::Display for SpanHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The identity of a new unit of work without OpenTelemetry: a child of its parent, else a new
/// trace. Its ids are the first fields of every span, given as the span is made (formatted as
/// hex only when a layer asks), so that a subscriber that keeps no field values pays nothing
/// for them and nothing is recorded afterwards.
struct Ids {
    cx: TraceContext,
    parent: Option<u64>,
}

impl Ids {
    fn of(parent: &Parent<'_>) -> Ids {
        let parent = match parent {
            Parent::Carried(p) => p.as_ref(),
            Parent::Local(p) => *p,
        };
        match parent {
            Some(p) => Ids {
                cx: p.child(),
                parent: Some(p.span_id()),
            },
            None => Ids {
                cx: TraceContext::new_root(),
                parent: None,
            },
        }
    }

    fn trace(&self) -> tracing::field::DisplayValue<TraceHex> {
        tracing::field::display(TraceHex(self.cx.trace_id()))
    }

    fn span(&self) -> tracing::field::DisplayValue<SpanHex> {
        tracing::field::display(SpanHex(self.cx.span_id()))
    }

    fn parent(&self) -> Option<tracing::field::DisplayValue<SpanHex>> {
        self.parent.map(|id| tracing::field::display(SpanHex(id)))
    }
}

/// Records principal and tenant when the service opted in.
fn identities(site: &Site, span: &Span, principal: Option<&str>, tenant: Option<&str>) {
    if site.identities && !span.is_disabled() {
        if let Some(p) = principal {
            span.record("purista.principalId", p);
        }
        if let Some(t) = tenant {
            span.record("purista.tenantId", t);
        }
    }
}

/// The span of an invocation (client side); `cmd` is the command about to be sent.
pub(crate) fn invoke(
    site: &Site,
    target: &str,
    cmd: &Envelope,
    parent: Option<&TraceContext>,
) -> Traced {
    let receiver = Endpoint(cmd.receiver.as_ref());
    let parent = Parent::Local(parent);
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.invoke",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        purista.traceId = Empty,
        otel.name = format_args!("invoke {receiver}"),
        otel.kind = "client",
        otel.status_code = Empty,
        messaging.system = &*site.system,
        messaging.operation.type = "send",
        messaging.operation.name = "invoke",
        messaging.destination.name = format_args!("{receiver}"),
        messaging.message.conversation_id = cmd.correlation_id.as_deref(),
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = target,
        purista.receiver.name = receiver.0.map(|r| r.service_name.as_str()),
        purista.receiver.version = receiver.0.map(|r| r.service_version.as_str()),
        purista.receiver.target = receiver.0.map(|r| r.service_target.as_str()),
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.statusCode = Empty,
    );
    Traced::new(span, parent, ids)
}

/// The span of serving a command.
pub(crate) fn command(site: &Site, endpoint: &str, target: &str, cmd: &Envelope) -> Traced {
    let parent = Parent::Carried(super::otp::carried(cmd.otp.as_deref()));
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.command",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        otel.name = format_args!("process {endpoint}"),
        otel.kind = "server",
        otel.status_code = Empty,
        messaging.system = &*site.system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = endpoint,
        messaging.message.id = cmd.id.as_str(),
        messaging.message.conversation_id = cmd.correlation_id.as_deref(),
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = target,
        purista.sender.name = cmd.sender.service_name.as_str(),
        purista.sender.version = cmd.sender.service_version.as_str(),
        purista.sender.target = cmd.sender.service_target.as_str(),
        purista.traceId = cmd.trace_id.as_deref(),
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.statusCode = Empty,
    );
    identities(
        site,
        &span,
        cmd.principal_id.as_deref(),
        cmd.tenant_id.as_deref(),
    );
    Traced::new(span, parent, ids)
}

/// The span of emitting an event (producer side).
pub(crate) fn emit(
    site: &Site,
    target: &str,
    e: &Envelope,
    parent: Option<&TraceContext>,
) -> Traced {
    let destination = destination_of(e);
    let parent = Parent::Local(parent);
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.emit",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        purista.traceId = Empty,
        otel.name = format_args!("emit {destination}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = &*site.system,
        messaging.operation.type = "send",
        messaging.operation.name = "emit",
        messaging.destination.name = destination,
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = target,
        purista.eventName = e.event_name.as_deref(),
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.statusCode = Empty,
    );
    Traced::new(span, parent, ids)
}

/// The span of one delivery attempt to a subscription (consumer side).
pub(crate) fn delivery(
    site: &Site,
    registration: &str,
    target: &str,
    e: &Envelope,
    attempt: u32,
) -> Traced {
    let destination = destination_of(e);
    let parent = Parent::Carried(super::otp::carried(e.otp.as_deref()));
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.subscription",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        otel.name = format_args!("process {destination}"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        messaging.system = &*site.system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = destination,
        messaging.consumer.group.name = registration,
        messaging.message.id = e.id.as_str(),
        messaging.message.conversation_id = e.correlation_id.as_deref(),
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = target,
        purista.sender.name = e.sender.service_name.as_str(),
        purista.sender.version = e.sender.service_version.as_str(),
        purista.sender.target = e.sender.service_target.as_str(),
        purista.eventName = e.event_name.as_deref(),
        purista.traceId = e.trace_id.as_deref(),
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.attempt = attempt,
        purista.outcome = Empty,
        purista.statusCode = Empty,
    );
    identities(
        site,
        &span,
        e.principal_id.as_deref(),
        e.tenant_id.as_deref(),
    );
    Traced::new(span, parent, ids)
}

/// The span of opening a stream session (consumer side of the stream).
pub(crate) fn stream_open(
    site: &Site,
    target: &str,
    open: &Envelope,
    parent: Option<&TraceContext>,
) -> Traced {
    let receiver = Endpoint(open.receiver.as_ref());
    let parent = Parent::Local(parent);
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.stream.open",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        purista.traceId = Empty,
        otel.name = format_args!("open {receiver}"),
        otel.kind = "client",
        otel.status_code = Empty,
        messaging.system = &*site.system,
        messaging.operation.type = "send",
        messaging.operation.name = "open",
        messaging.destination.name = format_args!("{receiver}"),
        messaging.message.conversation_id = open.correlation_id.as_deref(),
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = target,
        purista.receiver.name = receiver.0.map(|r| r.service_name.as_str()),
        purista.receiver.version = receiver.0.map(|r| r.service_version.as_str()),
        purista.receiver.target = receiver.0.map(|r| r.service_target.as_str()),
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.statusCode = Empty,
    );
    Traced::new(span, parent, ids)
}

/// The span of producing one stream session.
pub(crate) fn stream_session(site: &Site, endpoint: &str, target: &str, open: &Envelope) -> Traced {
    let parent = Parent::Carried(super::otp::carried(open.otp.as_deref()));
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.stream",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        otel.name = format_args!("process {endpoint}"),
        otel.kind = "server",
        otel.status_code = Empty,
        messaging.system = &*site.system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = endpoint,
        messaging.message.id = open.id.as_str(),
        messaging.message.conversation_id = open.correlation_id.as_deref(),
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = target,
        purista.sender.name = open.sender.service_name.as_str(),
        purista.sender.version = open.sender.service_version.as_str(),
        purista.sender.target = open.sender.service_target.as_str(),
        purista.traceId = open.trace_id.as_deref(),
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.outcome = Empty,
        purista.statusCode = Empty,
    );
    identities(
        site,
        &span,
        open.principal_id.as_deref(),
        open.tenant_id.as_deref(),
    );
    Traced::new(span, parent, ids)
}

/// The span of enqueueing a job (producer side); `system` is the queue bridge's name.
pub(crate) fn enqueue(
    site: &Site,
    system: &str,
    target: &str,
    queue: &str,
    parent: Option<&TraceContext>,
) -> Traced {
    let parent = Parent::Local(parent);
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.enqueue",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        purista.traceId = Empty,
        otel.name = format_args!("enqueue {queue}"),
        otel.kind = "producer",
        otel.status_code = Empty,
        messaging.system = system,
        messaging.operation.type = "send",
        messaging.operation.name = "enqueue",
        messaging.destination.name = queue,
        messaging.message.id = Empty,
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = target,
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.statusCode = Empty,
    );
    Traced::new(span, parent, ids)
}

/// The span of one attempt at a job (consumer side); `system` is the queue bridge's name.
pub(crate) fn job(site: &Site, system: &str, queue: &str, job: &LeasedJob) -> Traced {
    let parent = Parent::Carried(super::otp::carried(job.otp.as_deref()));
    let ids = Ids::of(&parent);
    let span = tracing::info_span!(
        "purista.job",
        trace_id = ids.trace(),
        span_id = ids.span(),
        parent_span_id = ids.parent(),
        otel.name = format_args!("process {queue}"),
        otel.kind = "consumer",
        otel.status_code = Empty,
        messaging.system = system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = queue,
        messaging.message.id = job.id.as_str(),
        error.type = Empty,
        purista.service.name = &*site.service,
        purista.service.version = &*site.version,
        purista.service.target = queue,
        purista.traceId = job.trace_id.as_deref(),
        purista.principalId = Empty,
        purista.tenantId = Empty,
        purista.attempt = job.attempt,
        purista.outcome = Empty,
        purista.statusCode = Empty,
    );
    identities(
        site,
        &span,
        job.principal_id.as_deref(),
        job.tenant_id.as_deref(),
    );
    Traced::new(span, parent, ids)
}

/// Records what an outgoing message ended up carrying: its `traceId`, and (opt-in) its
/// principal and tenant.
pub(crate) fn record_sent(site: &Site, traced: &Traced, e: &Envelope) {
    if traced.span.is_disabled() {
        return;
    }
    if let Some(t) = &e.trace_id {
        traced.span.record("purista.traceId", t.as_str());
    }
    identities(
        site,
        &traced.span,
        e.principal_id.as_deref(),
        e.tenant_id.as_deref(),
    );
}

/// [`record_sent`] for a job.
pub(crate) fn record_sent_job(site: &Site, traced: &Traced, job: &NewJob) {
    if traced.span.is_disabled() {
        return;
    }
    if let Some(t) = &job.trace_id {
        traced.span.record("purista.traceId", t.as_str());
    }
    identities(
        site,
        &traced.span,
        job.principal_id.as_deref(),
        job.tenant_id.as_deref(),
    );
}

/// An address as `service@version/target` (empty when there is none), formatted only when a
/// span is recorded.
struct Endpoint<'a>(Option<&'a Address>);

impl std::fmt::Display for Endpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => Ok(()),
        }
    }
}

/// `messaging.destination.name` of a message: its event name, else its message type.
fn destination_of(e: &Envelope) -> &str {
    e.event_name
        .as_deref()
        .unwrap_or_else(|| e.message_type.as_str())
}
