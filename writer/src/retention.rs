//! Retention (`STORAGE_RETENTION_DAYS`, off by default): messages older than the limit are
//! removed from the databases by a periodic job. Whole months go at once: TimescaleDB chunks or
//! the monthly partitions of `messages` and `message_search` are dropped. Rows of a partly expired month (and of a
//! plain table) go in batches of [`DELETE_BATCH`], one short transaction each, so no lock is
//! held for long; in MongoDB a TTL index on `timestamp` expires documents and the job
//! deletes what the server's TTL monitor has not reached yet. Redis keys expire by their TTLs.
//! Every writer instance runs the job; concurrent runs only share the work.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::mongo::MongoStore;
use crate::store::postgres::{AgedTable, PostgresStore};

pub const DELETE_BATCH: i64 = 5_000;

/// Months after the current one whose `messages` and `message_search` partitions exist ahead
/// of time.
pub const PARTITIONS_AHEAD: i32 = 2;

/// Runs retention every `interval` until shutdown.
pub async fn run_periodically(
    postgres: Option<PostgresStore>,
    mongo: Option<MongoStore>,
    keep: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        match run_once(postgres.as_ref(), mongo.as_ref(), keep).await {
            Ok(removed) if removed > 0 => info!(removed, "retention removed old messages"),
            Ok(_) => {}
            Err(error) => warn!(%error, "retention run failed, retrying at the next interval"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Deletes `table`'s rows older than `cutoff` batch by batch; returns how many went.
async fn delete_all_before(
    postgres: &PostgresStore,
    table: AgedTable,
    cutoff: chrono::DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let mut removed = 0;
    loop {
        let deleted = postgres.delete_batch_before(table, cutoff, DELETE_BATCH).await?;
        removed += deleted;
        if deleted < DELETE_BATCH as u64 {
            return Ok(removed);
        }
    }
}

/// Removes everything older than `keep`; returns how many rows/documents went (dropped
/// chunks and partitions are not counted).
pub async fn run_once(
    postgres: Option<&PostgresStore>,
    mongo: Option<&MongoStore>,
    keep: Duration,
) -> anyhow::Result<u64> {
    let cutoff = Utc::now() - chrono::Duration::from_std(keep)?;
    let mut removed = 0;
    if let Some(postgres) = postgres {
        let mut ids_cutoff = cutoff;
        if postgres.has_timescaledb().await? {
            postgres.drop_chunks_before(cutoff).await?;
            // Chunks go whole: the ids of messages a partly expired chunk still holds stay.
            if let Some(oldest) = postgres.oldest_message_time().await? {
                ids_cutoff = ids_cutoff.min(oldest);
            }
        } else {
            let dropped = postgres.drop_partitions_before(cutoff).await?;
            if dropped > 0 {
                info!(dropped, %cutoff, "retention dropped expired monthly partitions of messages and message_search");
            }
            removed += delete_all_before(postgres, AgedTable::Messages, cutoff).await?;
            // The coming months get their partitions before their first message.
            postgres.create_partitions_ahead(PARTITIONS_AHEAD).await?;
        }
        delete_all_before(postgres, AgedTable::MessageIds, ids_cutoff).await?;
        // Search entries of the partly expired month (and of a plain table, on TimescaleDB
        // too); rows still queued for them are taken by the indexer and find no message.
        delete_all_before(postgres, AgedTable::SearchIndex, cutoff).await?;
        postgres.delete_hidden_before(cutoff).await?;
    }
    if let Some(mongo) = mongo {
        removed += mongo.delete_before(cutoff).await?;
    }
    Ok(removed)
}
