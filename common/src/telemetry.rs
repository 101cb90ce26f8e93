//! Structured logging through `tracing`: human-readable in a terminal, one JSON object per line
//! with `LOG_FORMAT=json`, level and per-module filters from `RUST_LOG` (default `info`).
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are
//! also exported over OTLP/gRPC, in batches, under the binary's service name.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::settings::parse;

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

/// The logging and tracing settings every service binary takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TelemetryArgs {
    /// Log lines as text (coloured on a terminal) or one JSON object per line.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = log_format)]
    pub log_format: LogFormat,
    /// Log level and per-module filters (tracing's `EnvFilter` syntax, e.g. `info,sqlx=warn`).
    #[arg(long, env = "RUST_LOG", default_value = "info", value_parser = parse::text)]
    pub rust_log: String,
    /// OTLP/gRPC collector (e.g. `http://otel-collector:4317`) that spans are exported to; the
    /// other standard `OTEL_EXPORTER_OTLP_*` variables apply.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = parse::grpc_url)]
    pub otel_exporter_otlp_endpoint: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn log_format(value: &str) -> Result<LogFormat, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("must be text or json".into()),
    }
}

/// Installs the global subscriber. Must run inside the Tokio runtime (the OTLP exporter's
/// gRPC client lives there). Calling it again (tests start several apps in one process) keeps
/// the first subscriber.
pub fn init(service_name: &'static str, settings: &TelemetryArgs) -> Telemetry {
    let filter = EnvFilter::try_new(&settings.rust_log).unwrap_or_else(|error| {
        eprintln!("{service_name}: RUST_LOG {:?} ignored ({error}); logging at info", settings.rust_log);
        EnvFilter::new("info")
    });
    let fmt = tracing_subscriber::fmt::layer();
    let fmt = if settings.log_format == LogFormat::Json {
        fmt.json().flatten_event(true).with_current_span(true).boxed()
    } else {
        // Colours only for a terminal; log files and collectors get plain text.
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())).boxed()
    };
    let tracer_provider = otlp_tracer_provider(service_name, settings.otel_exporter_otlp_endpoint.as_deref());
    let otel = tracer_provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name)));
    let _already_installed = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    Telemetry { tracer_provider }
}

fn otlp_tracer_provider(service_name: &'static str, endpoint: Option<&str>) -> Option<SdkTracerProvider> {
    let traces_endpoint =
        std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_ok_and(|value| !value.trim().is_empty());
    if endpoint.is_none() && !traces_endpoint {
        return None;
    }
    // Headers and timeout come from the standard OTEL_* variables, which the exporter reads.
    let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let builder = match endpoint {
        Some(endpoint) if !traces_endpoint => builder.with_endpoint(endpoint),
        _ => builder,
    };
    match builder.build() {
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
