//! `flare-storage-writer` — run the writer (`run`, the default), apply the database migrations
//! and exit (`migrate`), or probe a running instance's `/healthz` (`healthcheck`, for container
//! health checks). Every setting is a flag or its environment variable (`--help`).

use std::process::ExitCode;

use flare_storage_common::ops::{self, ServiceCommand};
use flare_storage_common::settings;
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
    command: Option<ServiceCommand>,
    #[command(flatten)]
    settings: Settings,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = settings::parse();
    let (metrics_addr, postgres_url) = (cli.settings.metrics_addr, cli.settings.databases.postgres_url.clone());
    let telemetry = cli.settings.telemetry.clone();
    let config = || Config::from_settings(cli.settings);
    ops::service_main("flare-storage-writer", cli.command, metrics_addr, postgres_url, &telemetry, config, run).await
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
