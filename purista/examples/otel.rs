//! purista's spans as OpenTelemetry spans (cargo feature `otel`):
//! `cargo run -p purista --features otel --example otel`.
//!
//! The exporter here prints each finished span. A deployment puts an OTLP exporter in its place
//! (crate `opentelemetry-otlp`: `SpanExporter::builder().with_tonic().build()?`, given to
//! `with_batch_exporter`); nothing else changes. The ids printed are the ones that travel in
//! the envelope's `otp`, so a PURISTA TypeScript service continues the same trace.

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use purista::observe::otel::{layer, opentelemetry::trace::TracerProvider as _};
use purista::prelude::*;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Prints finished spans: name, trace id, span id, parent span id.
#[derive(Debug)]
struct Print;

impl SpanExporter for Print {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        for s in batch {
            let cx = &s.span_context;
            println!(
                "{:<32} trace {} span {} parent {}",
                s.name,
                cx.trace_id(),
                cx.span_id(),
                s.parent_span_id
            );
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The few lines a deployment needs: a tracer provider and purista's layer.
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(Print)
        .build();
    tracing_subscriber::registry()
        .with(layer(provider.tracer("purista-example")))
        .init();

    let conn = purista::connect("memory://otel-example").await?;
    let greeter = Service::builder("greeter", "1")
        .command(CommandDef::new(
            "hello",
            |ctx: Context, name: String| async move {
                ctx.emit("greeted", &name).await?;
                Ok(format!("hello {name}"))
            },
        ))
        .build()
        .start(conn.events.clone())
        .await?;
    let reply: String = greeter
        .invoke(Address::new("greeter", "1", "hello"), "ada", Empty)
        .await?;
    println!("reply: {reply}");

    greeter
        .shutdown(tokio::time::Instant::now() + std::time::Duration::from_secs(5))
        .await;
    provider.shutdown()?;
    Ok(())
}
