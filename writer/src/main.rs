//! `flare-storage-writer` — run the writer (`run`, the default), apply the database migrations
//! and exit (`migrate`), or probe a running instance's `/healthz` (`healthcheck`, for container
//! health checks). Every setting is a flag or its environment variable (`--help`).

use std::process::ExitCode;

use flare_storage_common::{ops, schema, settings, telemetry};
use flare_storage_writer::{Config, Settings};
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser)]
#[command(
    name = "flare-storage-writer",
    version,
    about = "Persists IM messages from Kafka into PostgreSQL, MongoDB and the Redis hot cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Consume, persist and acknowledge messages until SIGTERM (the default).
    Run,
    /// Apply the PostgreSQL migrations (POSTGRES_URL) and exit.
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
            let telemetry = telemetry::init("flare-storage-writer", &cli.settings.telemetry);
            let result = match &cli.settings.postgres_url {
                Some(url) => migrate(url).await,
                None => Err(anyhow::anyhow!("POSTGRES_URL is not set: nothing to migrate")),
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
            eprintln!("flare-storage-writer: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = telemetry::init("flare-storage-writer", &telemetry_settings);
    let result = run(config).await;
    telemetry.shutdown().await;
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
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
