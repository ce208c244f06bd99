//! The main job: an example deployment on the in-memory bridge.
//!
//! Two services share one bridge, the way they would share a broker:
//! * `orders` serves the command `placeOrder` (which calls `billing.chargeCard` and announces
//!   `orderPlaced` on success), streams an order's history, and notifies customers from a
//!   subscription that pauses itself while the "mail provider" is down.
//! * `billing` serves `chargeCard`, reacts to `orderPlaced` by emitting `invoiceRequested` and
//!   queueing an invoice job, and runs the `invoices` queue worker.
//!
//! The two commands are typed contracts (module `contracts`, which in a real deployment is a
//! small crate both services depend on): the server registers its handler through the
//! contract and the client calls through it, so neither side can change a type alone.
//!
//! Run it with `cargo run -p purista --example quickstart`. Set `RUST_LOG=info` to see the
//! runtime's own log lines as well.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use purista::prelude::*;
use purista::{HealthState, NewJob};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlaceOrder {
    customer: String,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderPlaced {
    order_id: String,
    customer: String,
    receipt_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Charge {
    order_id: String,
    amount_cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Receipt {
    receipt_id: String,
}

/// The commands' contracts: address and types in one place.
mod contracts {
    use super::*;

    /// `orders@1/placeOrder`: places an order and charges the customer.
    pub const PLACE_ORDER: CommandContract<PlaceOrder, OrderPlaced, Empty, OrderError> =
        CommandContract::new("orders", "1", "placeOrder");

    /// `billing@1/chargeCard`: charges a card, or declines it.
    pub const CHARGE_CARD: CommandContract<Charge, Receipt, Empty, PaymentError> =
        CommandContract::new("billing", "1", "chargeCard");
}

use contracts::{CHARGE_CARD, PLACE_ORDER};

/// Billing's business errors: what a caller of `chargeCard` may see.
#[derive(Debug, thiserror::Error)]
enum PaymentError {
    #[error("card declined: amount over limit")]
    OverLimit { limit_cents: u64 },
}

impl BusinessError for PaymentError {
    fn status(&self) -> StatusCode {
        StatusCode(402)
    }

    fn data(&self) -> Option<Value> {
        let PaymentError::OverLimit { limit_cents } = self;
        Some(json!({ "limitCents": limit_cents }))
    }
}

/// Orders' errors: a payment refusal is passed on to the caller as it came; a billing outage
/// is not the caller's business (they see a plain 500, the log has the details).
#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("{}", .0.message)]
    PaymentRefused(HandledError),
    #[error("billing failed: {0}")]
    Billing(CommandError),
}

impl BusinessError for OrderError {
    fn status(&self) -> StatusCode {
        match self {
            OrderError::PaymentRefused(refusal) => refusal.status,
            OrderError::Billing(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn data(&self) -> Option<Value> {
        match self {
            OrderError::PaymentRefused(refusal) => refusal.data.clone(),
            OrderError::Billing(_) => None,
        }
    }

    fn is_handled(&self) -> bool {
        matches!(self, OrderError::PaymentRefused(_))
    }
}

impl From<CommandError> for OrderError {
    fn from(e: CommandError) -> Self {
        match e.into_handled() {
            Ok(refusal) => OrderError::PaymentRefused(refusal),
            Err(other) => OrderError::Billing(other),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvoiceJob {
    order_id: String,
    #[serde(default)]
    corrupt: bool,
}

/// What the handlers report back to `main`, so the story prints in order. Subscriptions and
/// queue jobs run concurrently, so each kind has its own channel.
type Notes = mpsc::UnboundedSender<String>;

fn say(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
}

fn step(title: &str) {
    println!("\n== {title}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_target(false)
        .init();

    let conn = purista::connect("memory://quickstart").await?;
    let queues = conn
        .queues
        .clone()
        .expect("the in-memory bridge has a queue bridge");
    say(format!(
        "Connected to bridge `{}` (instance {}), delivery: commands {}, subscriptions {}.",
        conn.events.name(),
        &conn.events.instance_id()[..8],
        conn.events.capabilities().command_delivery,
        conn.events.capabilities().subscription_delivery,
    ));

    let (sub_tx, mut sub_notes) = mpsc::unbounded_channel::<String>();
    let (job_tx, mut job_notes) = mpsc::unbounded_channel::<String>();
    let billing = start_billing(&conn, queues.clone(), sub_tx.clone(), job_tx).await?;
    let orders = start_orders(&conn, sub_tx).await?;
    say("Services `billing@1` and `orders@1` are ready.");

    step("1. A command: orders.placeOrder (which calls billing.chargeCard), through its contract");
    let placed = orders
        .call(
            &PLACE_ORDER,
            PlaceOrder {
                customer: "ada@example.com".into(),
                amount_cents: 4_200,
            },
        )
        .await?;
    say(format!(
        "placeOrder answered: order {} for {} paid with receipt {}",
        placed.order_id, placed.customer, placed.receipt_id
    ));

    step("2. A business error travels back with its status, message and data");
    let refused = orders
        .call(
            &PLACE_ORDER,
            PlaceOrder {
                customer: "bob@example.com".into(),
                amount_cents: 900_000,
            },
        )
        .await;
    match refused {
        Err(e) => match e.kind() {
            CommandErrorKind::Handled {
                status,
                message,
                data,
            } => say(format!(
                "placeOrder was refused, as expected: status {} \"{message}\", data {}",
                status.0,
                data.map(|d| d.to_string()).unwrap_or_default()
            )),
            other => say(format!("placeOrder failed in another way: {other:?}")),
        },
        Ok(_) => say("unexpected: the large order went through"),
    }

    step(
        "3. An event: `orderPlaced` reaches billing.onOrderPlaced, which emits `invoiceRequested`",
    );
    // The subscription notes arrive in the order the handlers ran.
    for _ in 0..2 {
        if let Some(line) = next_note(&mut sub_notes).await {
            say(line);
        }
    }

    step("4. A consumer pauses itself; health turns to warn; an operator resumes it");
    // The pause takes effect when the handler's outcome is settled, just after its note.
    let mut health = orders.health().await;
    let until = Instant::now() + Duration::from_secs(5);
    while health.state != HealthState::Warn && Instant::now() < until {
        tokio::task::yield_now().await;
        health = orders.health().await;
    }
    say(format!(
        "orders health: {:?}; paused consumers: {:?}",
        health.state,
        health
            .paused_consumers
            .iter()
            .map(|p| format!("{} ({})", p.key, p.reason))
            .collect::<Vec<_>>()
    ));
    assert_eq!(health.state, HealthState::Warn);
    say("operator: the mail provider is back, resuming `orders@1/notifyCustomer`");
    orders
        .resume_subscription_consumer(&RegistrationKey::new("orders", "1", "notifyCustomer"))
        .await?;
    if let Some(line) = next_note(&mut sub_notes).await {
        say(line);
    }
    say(format!(
        "orders health now: {:?}",
        orders.health().await.state
    ));

    step("5. A queue job fails once and succeeds on retry");
    for _ in 0..2 {
        if let Some(line) = next_note(&mut job_notes).await {
            say(line);
        }
    }

    step("6. A job that can never succeed ends in the dead-letter queue");
    billing
        .enqueue_job(
            "invoices",
            NewJob {
                payload: json!({ "orderId": "o-broken", "corrupt": true }),
                ..Default::default()
            },
        )
        .await?;
    if let Some(line) = next_note(&mut job_notes).await {
        say(line);
    }
    let dead = wait_for_dead_letters(queues.as_ref(), "invoices").await?;
    for d in &dead {
        say(format!(
            "dead-letter queue `invoices.dead-letter`: job {} ({}) — reason: {}",
            &d.job.id[..8],
            d.job.payload["orderId"],
            d.reason
        ));
    }
    let m = queues.metrics("invoices").await?;
    say(format!(
        "queue metrics: depth {}, leased {}, delayed {}, dead-lettered {}",
        m.depth, m.leased, m.delayed, m.dead_lettered
    ));

    step("7. A stream: orders.orderHistory sends chunks, then exactly one terminal frame");
    let mut history = orders
        .open_stream(
            Address::new("orders", "1", "orderHistory"),
            json!({ "orderId": placed.order_id }),
            Empty,
            Some(Duration::from_secs(5)),
        )
        .await?;
    while let Some(item) = history.next().await {
        match item {
            StreamItem::Chunk(c) => say(format!("  chunk: {c}")),
            StreamItem::Complete(f) => say(format!(
                "  complete, final value: {}",
                f.unwrap_or_default()
            )),
            other => say(format!("  ended: {other:?}")),
        }
    }

    step("8. Graceful shutdown with a drain report");
    let deadline = Instant::now() + Duration::from_secs(2);
    for (name, svc) in [("orders", &orders), ("billing", &billing)] {
        let report = svc.shutdown(deadline).await;
        say(format!(
            "{name}: drained {} in {} ms; still running: {:?}; pending invocations rejected: {}",
            if report.completed {
                "completely"
            } else {
                "partially"
            },
            report.waited_ms,
            report.still_running,
            report.rejected_invocations
        ));
    }
    let report = conn.events.shutdown(deadline).await;
    say(format!(
        "bridge closed (drained completely: {}). Bye!",
        report.completed
    ));
    Ok(())
}

async fn next_note(notes: &mut mpsc::UnboundedReceiver<String>) -> Option<String> {
    match timeout(Duration::from_secs(10), notes.recv()).await {
        Ok(n) => n,
        Err(_) => {
            say("(gave up waiting for the next step after 10 s)");
            None
        }
    }
}

async fn wait_for_dead_letters(
    queues: &dyn QueueBridge,
    queue: &str,
) -> anyhow::Result<Vec<purista::DeadLetteredJob>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let dead = queues.inspect_dead_letters(queue, 10).await?;
        if !dead.is_empty() || Instant::now() > deadline {
            return Ok(dead);
        }
        tokio::task::yield_now().await;
    }
}

async fn start_billing(
    conn: &purista::Connection,
    queues: Arc<dyn QueueBridge>,
    sub_notes: Notes,
    job_notes: Notes,
) -> anyhow::Result<purista::RunningService> {
    let charge = CHARGE_CARD
        .handler(|_ctx: Context, charge: Charge| async move {
            if charge.amount_cents > 100_000 {
                return Err(PaymentError::OverLimit {
                    limit_cents: 100_000,
                });
            }
            Ok(Receipt {
                receipt_id: format!("r-{}", &charge.order_id[2..]),
            })
        })
        .description("charges the customer's card");

    let on_order_placed = SubscriptionDef::new(
        "onOrderPlaced",
        move |ctx: SubscriptionContext, event: OrderPlaced| {
            let notes = sub_notes.clone();
            async move {
                ctx.enqueue(
                    "invoices",
                    InvoiceJob {
                        order_id: event.order_id.clone(),
                        corrupt: false,
                    },
                    Empty,
                )
                .await?;
                let _ = notes.send(format!(
                    "billing.onOrderPlaced got order {} (trace {}…), queued an invoice job and emits `invoiceRequested`",
                    event.order_id,
                    ctx.trace_id().unwrap_or("-").chars().take(8).collect::<String>()
                ));
                Ok(Reply::emit(json!({ "orderId": event.order_id, "customer": event.customer })))
            }
        },
    )
    .event_name("orderPlaced")
    .emit_event("invoiceRequested");

    let attempts = Arc::new(AtomicU32::new(0));
    let invoices = QueueWorkerDef::new(
        "invoices",
        move |job: JobContext, invoice: InvoiceJob| {
            let notes = job_notes.clone();
            let attempts = attempts.clone();
            async move {
                if invoice.corrupt {
                    let _ = notes.send(format!(
                        "invoice job for {}: the data is corrupt, failing it fatally",
                        invoice.order_id
                    ));
                    return Ok(JobSettlement::Fail {
                        fatal: true,
                        reason: "invoice data is corrupt".into(),
                    });
                }
                if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _ = notes.send(format!(
                        "invoice job for {} attempt {}: the PDF renderer timed out, retrying with backoff",
                        invoice.order_id,
                        job.attempt()
                    ));
                    anyhow::bail!("PDF renderer timed out");
                }
                let _ = notes.send(format!(
                    "invoice job for {} attempt {}: invoice rendered, job complete",
                    invoice.order_id,
                    job.attempt()
                ));
                Ok(JobSettlement::Complete)
            }
        },
    )
    .config(QueueConfig {
        retry: purista::RetryStrategy {
            initial_delay_ms: 200,
            ..Default::default()
        },
        ..Default::default()
    })
    .lease_wait(Duration::from_millis(200));

    Ok(Service::builder("billing", "1")
        .description("charges customers and sends invoices")
        .command(charge)
        .subscription(on_order_placed)
        .queue_worker(invoices)
        .queue_bridge(queues)
        .build()
        .start(conn.events.clone())
        .await?)
}

async fn start_orders(
    conn: &purista::Connection,
    notes: Notes,
) -> anyhow::Result<purista::RunningService> {
    let place_order = PLACE_ORDER
        .handler(|ctx: Context, order: PlaceOrder| async move {
            let order_id = format!("o-{}", &purista::ids::new_id()[..6]);
            let charge = Charge {
                order_id: order_id.clone(),
                amount_cents: order.amount_cents,
            };
            // A refusal comes back as `PaymentRefused`, an outage as `Billing` (see `From`).
            let receipt = ctx.call(&CHARGE_CARD, charge).await?;
            Ok(OrderPlaced {
                order_id,
                customer: order.customer,
                receipt_id: receipt.receipt_id,
            })
        })
        .description("places an order and charges the customer")
        .success_event("orderPlaced");

    let history = StreamDef::new(
        "orderHistory",
        |_ctx: Context, req: serde_json::Value, out: StreamWriter| async move {
            for status in ["created", "charged", "invoiced", "packed", "shipped"] {
                out.write(json!({ "orderId": req["orderId"], "status": status }))
                    .await?;
            }
            Ok(json!({ "events": 5 }))
        },
    );

    let mail_down = Arc::new(AtomicBool::new(true));
    let notify = SubscriptionDef::new(
        "notifyCustomer",
        move |_ctx: SubscriptionContext, event: serde_json::Value| {
            let notes = notes.clone();
            let mail_down = mail_down.clone();
            async move {
                if mail_down.swap(false, Ordering::SeqCst) {
                    let _ = notes.send(
                        "orders.notifyCustomer: the mail provider is down, pausing this consumer (the message is kept)".into(),
                    );
                    return Ok(Outcome::stop_consumer("mail provider unavailable"));
                }
                let _ = notes.send(format!(
                    "orders.notifyCustomer: mailed {} about their invoice",
                    event["customer"].as_str().unwrap_or("the customer")
                ));
                Ok(Outcome::Ack)
            }
        },
    )
    .event_name("invoiceRequested")
    .pausable();

    Ok(Service::builder("orders", "1")
        .description("takes orders")
        .command(place_order)
        .stream(history)
        .subscription(notify)
        .build()
        .start(conn.events.clone())
        .await?)
}
