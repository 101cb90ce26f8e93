//! `flare-storage-reader` — serve the StorageReaderService gRPC API, or
//! `flare-storage-reader migrate` to apply the database migrations and exit, or
//! `flare-storage-reader healthcheck` to probe a running instance's `/healthz` (container
//! health checks).

use std::process::ExitCode;

use flare_storage_common::{ops, schema, telemetry};
use flare_storage_reader::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flare-storage-reader: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = telemetry::init("flare-storage-reader");

    let result = match std::env::args().nth(1).as_deref() {
        None | Some("run") => {
            let shutdown = CancellationToken::new();
            let on_signal = shutdown.clone();
            tokio::spawn(async move {
                ops::shutdown_signal().await;
                tracing::info!("shutdown requested");
                on_signal.cancel();
            });
            flare_storage_reader::run(config, shutdown).await
        }
        Some("migrate") => match &config.postgres_url {
            Some(url) => migrate(url).await,
            None => Err(anyhow::anyhow!("migrate needs POSTGRES_URL (MongoDB needs no migrations)")),
        },
        Some("healthcheck") => {
            return if ops::probe_health(config.metrics_addr).await { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
        Some(other) => {
            eprintln!("flare-storage-reader: unknown command {other:?} (expected: run, migrate, healthcheck)");
            return ExitCode::from(2);
        }
    };
    telemetry.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "reader failed");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(postgres_url: &str) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(postgres_url).await?;
    schema::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(())
}
