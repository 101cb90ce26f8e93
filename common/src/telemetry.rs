//! Structured logging through `tracing`: human-readable in a terminal, one JSON object per line
//! with `LOG_FORMAT=json`, level and per-module filters from `RUST_LOG` (default `info`).
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are
//! also exported over OTLP/gRPC, in batches, under the binary's service name.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes the spans still queued.
#[must_use = "dropping the telemetry handle early loses queued spans"]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still queued (bounded by the exporter's timeout). The flush blocks, so
    /// it runs off the async workers, which keep driving the exporter's connection.
    pub async fn shutdown(self) {
        let Some(provider) = self.tracer_provider else { return };
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("failed to flush traces: {error}"),
            Err(error) => eprintln!("failed to flush traces: {error}"),
        }
    }
}

/// Installs the global subscriber. Must run inside the Tokio runtime (the OTLP exporter's
/// gRPC client lives there). Calling it again (tests start several apps in one process) keeps
/// the first subscriber.
pub fn init(service_name: &'static str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer();
    let fmt = if json {
        fmt.json().flatten_event(true).with_current_span(true).boxed()
    } else {
        // Colours only for a terminal; log files and collectors get plain text.
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())).boxed()
    };
    let tracer_provider = otlp_tracer_provider(service_name);
    let otel = tracer_provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name)));
    let _already_installed = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    Telemetry { tracer_provider }
}

fn otlp_tracer_provider(service_name: &'static str) -> Option<SdkTracerProvider> {
    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var(name).is_ok_and(|value| !value.trim().is_empty()));
    if !configured {
        return None;
    }
    // The exporter reads the endpoint, headers and timeout from the standard OTEL_* variables.
    match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(exporter) => Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(service_name).build())
                .build(),
        ),
        Err(error) => {
            eprintln!("{service_name}: OTLP trace export disabled: {error}");
            None
        }
    }
}
