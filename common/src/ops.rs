//! The operations endpoint every binary serves next to its real work: `/metrics` (Prometheus
//! text format), `/healthz` (the process is alive) and `/readyz` (its dependencies answer, as
//! last observed by the app), plus the process shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether the app can do its work now. Apps flip it as their dependencies come and go; it
/// starts not ready.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    /// The same as a metric (1 or 0), for alerts.
    gauge: Option<IntGauge>,
}

impl Readiness {
    /// Readiness also reported by `gauge`.
    pub fn reported_by(gauge: IntGauge) -> Self {
        Self { ready: AtomicBool::new(false), gauge: Some(gauge) }
    }

    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        if let Some(gauge) = &self.gauge {
            gauge.set(i64::from(ready));
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    readiness: Arc<Readiness>,
}

/// Serves the operations endpoint on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(OpsState { registry, readiness });
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("failed to encode metrics: {error}\n").into_bytes(),
        ),
    }
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Asks a running binary's ops endpoint whether it is alive (`/healthz` answers 200). Used by
/// the `healthcheck` subcommand so container images need no HTTP client. An unspecified bind
/// address (`0.0.0.0`) is probed on loopback.
pub async fn probe_health(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        std::io::Result::Ok(head.ends_with(b" 200"))
    };
    matches!(tokio::time::timeout(std::time::Duration::from_secs(3), attempt).await, Ok(Ok(true)))
}

/// The subcommands of both service binaries.
#[derive(clap::Subcommand, Clone, Copy, Debug)]
pub enum ServiceCommand {
    /// Do the service's work until SIGTERM or SIGINT (the default).
    Run,
    /// Apply the PostgreSQL migrations (POSTGRES_URL) and exit; MongoDB needs none.
    Migrate,
    /// Exit 0 when the instance at METRICS_ADDR answers /healthz (container health checks).
    Healthcheck,
}

/// What a service binary's `main` does with its command: `healthcheck` probes `metrics_addr`;
/// `migrate` applies the migrations to `postgres_url`; `run` (the default) builds the
/// configuration with `config` — refused: one line and exit code 2 — and runs `serve`.
/// Failures are logged and exit with code 1.
pub async fn service_main<C>(
    name: &'static str,
    command: Option<ServiceCommand>,
    metrics_addr: std::net::SocketAddr,
    postgres_url: Option<String>,
    telemetry_settings: &crate::telemetry::TelemetryArgs,
    config: impl FnOnce() -> Result<C, crate::settings::ConfigError>,
    serve: impl AsyncFnOnce(C) -> anyhow::Result<()>,
) -> std::process::ExitCode {
    use std::process::ExitCode;

    let result = match command.unwrap_or(ServiceCommand::Run) {
        ServiceCommand::Healthcheck => {
            return if probe_health(metrics_addr).await { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
        ServiceCommand::Migrate => {
            let telemetry = crate::telemetry::init(name, telemetry_settings);
            let result = match postgres_url {
                Some(url) => migrate(&url).await,
                None => {
                    Err(anyhow::anyhow!("POSTGRES_URL is not set: nothing to migrate (MongoDB needs no migrations)"))
                }
            };
            telemetry.shutdown().await;
            result
        }
        ServiceCommand::Run => {
            let config = match config() {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("{name}: configuration error: {error}");
                    return ExitCode::from(2);
                }
            };
            let telemetry = crate::telemetry::init(name, telemetry_settings);
            let result = serve(config).await;
            telemetry.shutdown().await;
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "{name} failed");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(postgres_url: &str) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(postgres_url).await?;
    crate::schema::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(())
}
