//! flare-storage-writer: consumes `StoreMessageRequest` records from Kafka and persists them,
//! idempotently, so that every record is stored exactly once in effect however often Kafka
//! delivers it.
//!
//! `consumer.rs` fetches batches and commits offsets, `pipeline.rs` decides what happens to
//! each record, `store/` talks to Redis and the databases, `deadletter.rs` parks what can never
//! be stored, `ack.rs` tells upstream what was stored, `search_index.rs` keeps the search index
//! up to date behind the inserts.

pub mod ack;
pub mod config;
pub mod consumer;
pub mod deadletter;
pub mod dedup;
pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod retention;
pub mod search_index;
pub mod seq;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flare_storage_common::message::TimeBounds;
use flare_storage_common::ops::{self, Readiness};
use flare_storage_common::schema;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, MongoConfig, Settings};

use crate::ack::Acks;
use crate::deadletter::DeadLetters;
use crate::error::Stage;
use crate::metrics::Metrics;
use crate::pipeline::{Backoff, Pipeline};
use crate::store::Stores;
use crate::store::mongo::MongoStore;
use crate::store::postgres::PostgresStore;
use crate::store::redis::RedisStore;
use rdkafka::producer::FutureProducer;

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
    let readiness = Arc::new(Readiness::reported_by(metrics.ready.clone()));
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
    // Dependencies may start after the writer (pods, compose): wait for each, logging why.
    let Some(redis) = until_ready("redis", shutdown, || {
        RedisStore::connect(
            &config.redis,
            config.redis_hot_ttl,
            config.redis_idempotency_ttl,
            config.redis_hot_window,
            config.redis_wait_replicas,
        )
    })
    .await
    else {
        return Ok(());
    };
    metrics.pools.add_redis(redis.in_flight());
    let postgres = match &config.postgres_url {
        None => None,
        Some(url) => {
            let postgres =
                PostgresStore::connect(url, config.postgres_max_connections).context("invalid POSTGRES_URL")?;
            metrics.pools.add_postgres(postgres.pool().clone());
            if until_ready("postgres migrations", shutdown, || schema::migrate(postgres.pool())).await.is_none() {
                return Ok(());
            }
            let ahead = || postgres.create_partitions_ahead(retention::PARTITIONS_AHEAD);
            match until_ready("postgres partitions", shutdown, ahead).await {
                None => return Ok(()),
                Some(true) => warn!(
                    "messages or message_search is one plain table: move them to monthly partitions with `flare-storage partition-messages` (README \"Partitioned messages\")"
                ),
                Some(false) => {}
            }
            Some(postgres)
        }
    };
    let mongo = match &config.mongo {
        None => None,
        Some(mongo) => {
            let store = MongoStore::connect(&mongo.url, &mongo.database, &mongo.collection)
                .await
                .context("invalid MONGO_URL")?;
            metrics.pools.add_counted("mongodb", store.connections());
            if until_ready("mongo indexes", shutdown, || store.ensure_indexes(config.retention)).await.is_none() {
                return Ok(());
            }
            Some(store)
        }
    };
    readiness.set(true);
    let retention_task = config.retention.map(|keep| {
        tokio::spawn(retention::run_periodically(
            postgres.clone(),
            mongo.clone(),
            keep,
            config.retention_interval,
            shutdown.clone(),
        ))
    });

    let indexer_task = postgres.as_ref().map(|postgres| {
        let crash = config.crash_after_stage == Some(Stage::SearchIndex);
        tokio::spawn(search_index::run(postgres.pool().clone(), metrics.clone(), crash, shutdown.clone()))
    });

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_bootstrap_servers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        // Room to dead-letter a record of the largest accepted size with its headers.
        .set(
            "message.max.bytes",
            config.max_message_bytes.saturating_add(64 * 1024).clamp(1_000_000, 1_000_000_000).to_string(),
        )
        .create()
        .context("failed to create the Kafka producer")?;
    let pipeline = Pipeline {
        stores: Stores { redis, postgres, mongo },
        acks: config.kafka_ack_topic.clone().map(|topic| Acks::new(producer.clone(), topic)),
        wal_hash_key: config.wal_hash_key.clone(),
        dead_letters: DeadLetters::new(producer, config.kafka_dlq_topic.clone()),
        metrics,
        readiness,
        backoff: Backoff { initial: config.retry_initial_backoff, max: config.retry_max_backoff },
        max_message_bytes: config.max_message_bytes,
        time_bounds: TimeBounds {
            max_ahead: chrono::Duration::from_std(config.max_future).unwrap_or(chrono::Duration::MAX),
            max_age: config.retention.and_then(|retention| chrono::Duration::from_std(retention).ok()),
        },
        crash_after_stage: config.crash_after_stage,
    };
    let consumed = consumer::run(&config, &pipeline, shutdown).await.context("kafka consumer failed");
    if let Some(task) = retention_task {
        task.abort();
    }
    // The indexer stops at shutdown; an aborted batch rolls back into the queue.
    if let Some(task) = indexer_task {
        task.abort();
    }
    consumed
}

/// Retries `attempt` with backoff until it succeeds; `None` if shutdown came first.
async fn until_ready<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, mut attempt: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(value) => {
                info!(what, "ready");
                return Some(value);
            }
            Err(error) => warn!(what, %error, "not ready yet, retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
