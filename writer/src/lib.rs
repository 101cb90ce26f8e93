//! flare-storage-writer: consumes `StoreMessageRequest` records from Kafka and persists them,
//! idempotently, so that every record is stored exactly once in effect however often Kafka
//! delivers it.
//!
//! `consumer.rs` fetches batches and commits offsets, `pipeline.rs` decides what happens to
//! each record, `store/` talks to the databases, `deadletter.rs` parks what can never be stored.

pub mod config;
pub mod consumer;
pub mod deadletter;
pub mod metrics;
pub mod pipeline;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flare_storage_common::ops::{self, Readiness};
use flare_storage_common::schema;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;

use crate::deadletter::DeadLetters;
use crate::metrics::Metrics;
use crate::pipeline::{Backoff, Pipeline};
use crate::store::postgres::PostgresStore;

/// Runs the writer until `shutdown` is cancelled: serves the ops endpoint, applies database
/// migrations, then consumes. Returns after the final offset commit.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("failed to bind METRICS_ADDR {}", config.metrics_addr))?;
    run_with_listener(config, listener, shutdown).await
}

/// Like [`run`], on an already bound ops listener (tests bind port 0).
pub async fn run_with_listener(
    config: Config,
    ops_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("failed to register metrics")?;
    let readiness = Arc::new(Readiness::default());
    // The ops endpoint outlives the consumer so /metrics stays scrapeable while draining.
    let ops_shutdown = CancellationToken::new();
    let ops_task =
        tokio::spawn(ops::serve(ops_listener, metrics.registry.clone(), readiness.clone(), ops_shutdown.clone()));

    let result = consume(config, metrics, readiness, &shutdown).await;
    ops_shutdown.cancel();
    let _ = ops_task.await;
    result
}

async fn consume(
    config: Config,
    metrics: Metrics,
    readiness: Arc<Readiness>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let postgres = PostgresStore::connect(&config.postgres_url, config.postgres_max_connections)
        .context("invalid POSTGRES_URL")?;
    if !migrate_until_done(&postgres, shutdown).await {
        return Ok(());
    }
    readiness.set(true);

    let pipeline = Pipeline {
        postgres,
        dead_letters: DeadLetters::new(&config.kafka_bootstrap_servers, config.kafka_dlq_topic.clone())
            .context("failed to create the dead-letter producer")?,
        metrics,
        readiness,
        backoff: Backoff { initial: config.retry_initial_backoff, max: config.retry_max_backoff },
        max_message_bytes: config.max_message_bytes,
    };
    consumer::run(&config, &pipeline, shutdown).await.context("kafka consumer failed")?;
    Ok(())
}

/// Applies migrations, waiting for Postgres to come up (pods often start before their
/// database). Returns false if shutdown came first.
async fn migrate_until_done(postgres: &PostgresStore, shutdown: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(200);
    loop {
        match schema::migrate(postgres.pool()).await {
            Ok(()) => {
                info!("database schema up to date");
                return true;
            }
            Err(error) => warn!(%error, "failed to apply migrations, retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
