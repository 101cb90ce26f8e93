//! `flare-storage-reader` — serve the StorageReaderService gRPC API (`run`, the default),
//! apply the database migrations and exit (`migrate`), or probe a running instance's
//! `/healthz` (`healthcheck`, for container health checks). Every setting is a flag or its
//! environment variable (`--help`).

use std::process::ExitCode;

use flare_storage_common::{ops, schema, settings, telemetry};
use flare_storage_reader::{Config, Settings};
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser)]
#[command(name = "flare-storage-reader", version, about = "Serves stored IM messages over gRPC (StorageReaderService)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Serve gRPC until SIGTERM (the default).
    Run,
    /// Apply the PostgreSQL migrations (POSTGRES_URL) and exit; MongoDB needs none.
    Migrate,
    /// Exit 0 when the instance at METRICS_ADDR answers /healthz.
    Healthcheck,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = settings::parse();
    match cli.command {
        Some(Command::Healthcheck) => {
            return if ops::probe_health(cli.settings.metrics_addr).await {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(Command::Migrate) => {
            let telemetry = telemetry::init("flare-storage-reader", &cli.settings.telemetry);
            let result = match &cli.settings.postgres_url {
                Some(url) => migrate(url).await,
                None => Err(anyhow::anyhow!("migrate needs POSTGRES_URL (MongoDB needs no migrations)")),
            };
            telemetry.shutdown().await;
            return finish(result);
        }
        None | Some(Command::Run) => {}
    }
    let telemetry_settings = cli.settings.telemetry.clone();
    let config = match Config::from_settings(cli.settings) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("flare-storage-reader: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = telemetry::init("flare-storage-reader", &telemetry_settings);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        ops::shutdown_signal().await;
        tracing::info!("shutdown requested");
        on_signal.cancel();
    });
    let result = flare_storage_reader::run(config, shutdown).await;
    telemetry.shutdown().await;
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
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
