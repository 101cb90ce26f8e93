//! `flare-storage-writer` — run the writer, or `flare-storage-writer migrate` to apply the
//! database migrations and exit, or `flare-storage-writer healthcheck` to probe a running
//! instance's `/healthz` (container health checks).

use std::process::ExitCode;

use flare_storage_common::{ops, schema, telemetry};
use flare_storage_writer::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flare-storage-writer: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = telemetry::init("flare-storage-writer");

    let result = match std::env::args().nth(1).as_deref() {
        None | Some("run") => run(config).await,
        Some("migrate") => match &config.postgres_url {
            Some(url) => migrate(url).await,
            None => Err(anyhow::anyhow!("POSTGRES_URL is not set: nothing to migrate")),
        },
        Some("healthcheck") => {
            return if ops::probe_health(config.metrics_addr).await { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
        Some(other) => {
            eprintln!("flare-storage-writer: unknown command {other:?} (expected: run, migrate, healthcheck)");
            return ExitCode::from(2);
        }
    };
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "writer failed");
            ExitCode::FAILURE
        }
    }
}

/// Runs the writer until SIGTERM/SIGINT, then gives it `shutdown_timeout` to finish the batch
/// in flight and commit.
async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let drain_bound = config.shutdown_timeout;
    let mut writer = tokio::spawn(flare_storage_writer::run(config, shutdown.clone()));
    tokio::select! {
        finished = &mut writer => return finished?,
        () = ops::shutdown_signal() => {}
    }
    tracing::info!(bound_seconds = drain_bound.as_secs(), "shutdown requested, draining");
    shutdown.cancel();
    match tokio::time::timeout(drain_bound, writer).await {
        Ok(finished) => finished?,
        Err(_) => {
            Err(anyhow::anyhow!("did not finish within {drain_bound:?}; the unfinished batch will be redelivered"))
        }
    }
}

async fn migrate(postgres_url: &str) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(postgres_url).await?;
    schema::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(())
}
