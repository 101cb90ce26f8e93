//! `flare-storage-reader` — serve the StorageReaderService gRPC API (`run`, the default),
//! apply the database migrations and exit (`migrate`), or probe a running instance's
//! `/healthz` (`healthcheck`, for container health checks). Every setting is a flag or its
//! environment variable (`--help`).

use std::process::ExitCode;

use flare_storage_common::ops::{self, ServiceCommand};
use flare_storage_common::settings;
use flare_storage_reader::{Config, Settings};
use tokio_util::sync::CancellationToken;

#[derive(clap::Parser)]
#[command(name = "flare-storage-reader", version, about = "Serves stored IM messages over gRPC (StorageReaderService)")]
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
    ops::service_main("flare-storage-reader", cli.command, metrics_addr, postgres_url, &telemetry, config, serve).await
}

/// Serves until SIGTERM/SIGINT, then lets the calls in flight finish.
async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        ops::shutdown_signal().await;
        tracing::info!("shutdown requested");
        on_signal.cancel();
    });
    flare_storage_reader::run(config, shutdown).await
}
