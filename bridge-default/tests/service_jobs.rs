//! Queue jobs stay in the flow that enqueued them (issue 8, defect 2): a job enqueued inside a
//! traced, authenticated handler runs with the same trace id, W3C trace (`otp`), principal
//! and tenant, and what the job handler invokes carries them on. (Each hop's `otp` names the
//! span that sent it, so the trace is the same while the span id moves on: issue 13.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use purista_bridge_default::{MemoryBroker, MemoryQueueBridge};
use purista_core::{
    Address, CommandDef, Context, Empty, Envelope, EventBridge, JobContext, QueueWorkerDef,
    SenderAddress, Service,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use common::eventually;

/// The four flow ids as one comparable value.
#[derive(Debug, Clone, PartialEq)]
struct Flow {
    trace: Option<String>,
    otp: Option<String>,
    principal: Option<String>,
    tenant: Option<String>,
}

fn flow_of(e: &Envelope) -> Flow {
    Flow {
        trace: e.trace_id.clone(),
        otp: e.otp.clone(),
        principal: e.principal_id.clone(),
        tenant: e.tenant_id.clone(),
    }
}

#[tokio::test]
async fn a_job_runs_in_the_flow_that_enqueued_it_and_passes_it_on() {
    let broker = MemoryBroker::new();
    let queues = Arc::new(MemoryQueueBridge::new());
    let in_job = Arc::new(Mutex::new(
        None::<(Option<String>, Option<String>, Option<String>)>,
    ));
    let audited = Arc::new(Mutex::new(None::<Flow>));

    let audit_seen = audited.clone();
    let audit = Service::builder("audit", "1")
        .command(CommandDef::new(
            "record",
            move |ctx: Context, _i: Value, _p: Empty| {
                let audit_seen = audit_seen.clone();
                async move {
                    *audit_seen.lock() = ctx.envelope().map(flow_of);
                    Ok(())
                }
            },
        ))
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("audit starts");

    let job_seen = in_job.clone();
    let shop = Service::builder("shop", "1")
        .queue_bridge(queues.clone())
        .command(CommandDef::new(
            "checkout",
            |ctx: Context, order: String, _p: Empty| async move {
                ctx.enqueue("receipts", order, Empty).await?;
                Ok(())
            },
        ))
        .queue_worker(
            QueueWorkerDef::new(
                "receipts",
                move |ctx: JobContext, order: String, _p: Empty| {
                    let job_seen = job_seen.clone();
                    async move {
                        *job_seen.lock() = Some((
                            ctx.trace_id().map(str::to_string),
                            ctx.principal_id().map(str::to_string),
                            ctx.tenant_id().map(str::to_string),
                        ));
                        ctx.invoke::<Value>(Address::new("audit", "1", "record"), order, Empty)
                            .await?;
                        Ok(())
                    }
                },
            )
            .lease_wait(Duration::from_millis(50)),
        )
        .build()
        .start(Arc::new(broker.bridge()))
        .await
        .expect("shop starts");

    // A traced, authenticated caller with a W3C carrier.
    let caller = broker.bridge();
    caller.start().await.expect("caller bridge starts");
    let mut command = Envelope::command(
        SenderAddress {
            service_name: "web".into(),
            service_version: "1".into(),
            service_target: "".into(),
            instance_id: String::new(),
        },
        Address::new("shop", "1", "checkout"),
        json!("order-1"),
        json!({}),
    );
    let flow = Flow {
        trace: Some("trace-checkout".into()),
        otp: Some(
            r#"{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#.into(),
        ),
        principal: Some("user-7".into()),
        tenant: Some("tenant-7".into()),
    };
    command.trace_id = flow.trace.clone();
    command.otp = flow.otp.clone();
    command.principal_id = flow.principal.clone();
    command.tenant_id = flow.tenant.clone();
    caller
        .invoke(command, Duration::from_secs(5))
        .await
        .expect("checkout answers");

    eventually("the job's audit record", || audited.lock().is_some()).await;
    assert_eq!(
        in_job.lock().clone(),
        Some((
            flow.trace.clone(),
            flow.principal.clone(),
            flow.tenant.clone()
        )),
        "the job handler's context must carry the enqueuing flow"
    );
    let audited = audited.lock().clone().expect("the audit record");
    assert_eq!(
        (&audited.trace, &audited.principal, &audited.tenant),
        (&flow.trace, &flow.principal, &flow.tenant),
        "a command the job invokes must stay in the enqueuing flow"
    );
    let carried = purista_core::observe::read_otp(audited.otp.as_deref().expect("an otp"))
        .expect("a W3C carrier")
        .expect("a trace context");
    assert_eq!(
        carried.trace_id_hex(),
        "0af7651916cd43dd8448eb211c80319c",
        "a command the job invokes must stay in the caller's W3C trace"
    );
    assert_ne!(
        carried.span_id_hex(),
        "b7ad6b7169203331",
        "the job's invocation is a span of its own, not the caller's"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    shop.shutdown(deadline).await;
    audit.shutdown(deadline).await;
    caller.shutdown(deadline).await;
}
