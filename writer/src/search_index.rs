//! The search indexer: keeps `message_search` up to date off the writer's insert path.
//!
//! The insert of a batch queues each new text or JSON message in `search_index_queue` (same
//! statement). The indexer takes up to [`BATCH`] queued rows at a time in one transaction:
//! it deletes them from the queue, reads their messages, writes their normal-form text and
//! terms, order terms included (`common::text_search`), and commits. A crash or a failed
//! statement rolls the whole batch back into the queue, and the search table's key keeps a message indexed once, so
//! nothing is lost or indexed twice. Every writer runs an indexer; `SKIP LOCKED` lets them
//! share the queue.
//!
//! Messages stored before the search index existed are queued as `backfill` (by the
//! migration that created it) and taken only when no new message waits, so new messages are
//! findable at once while the history is indexed. A text whose normal form is longer than
//! `text_search::MAX_SEARCHABLE_BYTES` gets no entry.
//!
//! The message rows are read `FOR SHARE`: a recall, burn wipe or delete of a message being
//! indexed waits for this batch to commit and then removes its search row, and a message
//! recalled, deleted or burned before the batch read it is left out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::message::searchable_content;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::MessageContent;
use flare_storage_common::text_search::{ORDER_TERMS_VERSION, Terms, index_entry};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::Stage;
use crate::metrics::Metrics;
use crate::store::postgres::{
    drop_partitioning_constraint, ensure_partitions_of, is_missing_partition, violated_partitioning_constraint,
};

/// Most queued messages one indexer transaction takes.
pub const BATCH: i64 = 1_000;
/// Wait between polls of an empty queue: the floor of the index lag when idle.
const IDLE_POLL: Duration = Duration::from_millis(100);
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Indexes queued messages until shutdown; a failing batch is retried after [`RETRY_AFTER`].
/// With `crash_before_commit` (`WRITER_CRASH_AFTER_STAGE=search_index`, for crash tests) the
/// process aborts after writing the first batch's search rows, before its commit.
pub async fn run(pool: PgPool, metrics: Metrics, crash_before_commit: bool, shutdown: CancellationToken) {
    let stage = Stage::SearchIndex.name();
    loop {
        let pause = match index_batch(&pool, BATCH, &metrics, crash_before_commit).await {
            Ok(taken) if taken as i64 == BATCH => Duration::ZERO,
            Ok(_) => IDLE_POLL,
            Err(error) => {
                metrics.stage_errors.with_label_values(&[stage]).inc();
                warn!(%error, stage, "search indexing failed, retrying");
                RETRY_AFTER
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Search entries in columns, one element per message.
#[derive(Default)]
struct Entries {
    tenant_id: Vec<String>,
    message_id: Vec<String>,
    session_id: Vec<String>,
    timestamp: Vec<DateTime<Utc>>,
    terms: Vec<String>,
    normal_text: Vec<String>,
    /// Bytes of text held, to bound one statement.
    bytes: usize,
}

/// Most text one INSERT of search entries carries: PostgreSQL refuses a statement whose
/// parameters pass 1 GB, and a batch of long texts could.
const MAX_STATEMENT_BYTES: usize = 64 * 1024 * 1024;

/// A queued message taken by a batch: tenant, message id, timestamp, time queued.
type Taken = (String, String, DateTime<Utc>, DateTime<Utc>);
/// A message to index: tenant, message id, session, timestamp, encoded content.
type Indexable = (String, String, String, DateTime<Utc>, Vec<u8>);

/// Indexes up to `limit` queued messages in one transaction — new messages first, messages
/// stored before the search index (`backfill`) only when no new one waits; returns how many it
/// took from the queue (those gone by then count too, and leave no search row).
pub async fn index_batch(
    pool: &PgPool,
    limit: i64,
    metrics: &Metrics,
    crash_before_commit: bool,
) -> Result<usize, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let live = take(&mut transaction, false, limit).await?;
    let backfill = match limit - live.len() as i64 {
        0 => Vec::new(),
        room => take(&mut transaction, true, room).await?,
    };
    if live.is_empty() && backfill.is_empty() {
        return Ok(0);
    }
    let mut keys: (Vec<&str>, Vec<&str>, Vec<DateTime<Utc>>) = Default::default();
    for (tenant_id, message_id, timestamp, _) in live.iter().chain(&backfill) {
        keys.0.push(tenant_id);
        keys.1.push(message_id);
        keys.2.push(*timestamp);
    }
    let messages: Vec<Indexable> = sqlx::query_as(
        r#"SELECT m.tenant_id, m.message_id, m.session_id, m."timestamp", m.content
           FROM messages m JOIN UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS k(tenant_id, message_id, ts)
             ON m.tenant_id = k.tenant_id AND m.message_id = k.message_id AND m."timestamp" = k.ts
           WHERE NOT m.is_recalled AND m.deleted_at IS NULL AND m.content IS NOT NULL
             AND (m.burned_at IS NULL OR m.burned_at > now())
           FOR SHARE OF m"#,
    )
    .bind(keys.0)
    .bind(keys.1)
    .bind(keys.2)
    .fetch_all(&mut *transaction)
    .await?;
    let mut entries = Entries::default();
    let mut times = Vec::new();
    for (tenant_id, message_id, session_id, timestamp, content) in messages {
        // Content that does not decode has no text to find, nor has a text over the limit.
        let Ok(content) = MessageContent::decode(content.as_slice()) else { continue };
        let Some(text) = searchable_content(&content) else { continue };
        let Some((normal, terms)) = index_entry(text, Terms::Ordered) else { continue };
        // Terms never contain a space (spaces separate runs), so one space-joined string per
        // row carries them: UNNEST would flatten an array of arrays.
        let terms = terms.join(" ");
        entries.bytes += normal.len() + terms.len();
        entries.terms.push(terms);
        entries.normal_text.push(normal);
        entries.tenant_id.push(tenant_id);
        entries.message_id.push(message_id);
        entries.session_id.push(session_id);
        entries.timestamp.push(timestamp);
        times.push(timestamp);
        if entries.bytes >= MAX_STATEMENT_BYTES
            && let Err(error) = insert(&mut transaction, std::mem::take(&mut entries)).await
        {
            return Err(failed(pool, transaction, error, &times).await);
        }
    }
    if let Err(error) = insert(&mut transaction, entries).await {
        return Err(failed(pool, transaction, error, &times).await);
    }
    if crash_before_commit {
        warn!(stage = Stage::SearchIndex.name(), "crash requested by WRITER_CRASH_AFTER_STAGE; aborting");
        std::process::abort();
    }
    transaction.commit().await?;
    // The lag of new messages only: a backfilled message was stored long before.
    let now = Utc::now();
    for (_, _, _, queued_at) in &live {
        metrics.search_index_lag.observe((now - *queued_at).num_microseconds().unwrap_or(0) as f64 / 1e6);
    }
    let taken = live.len() + backfill.len();
    metrics.search_indexed.inc_by(taken as u64);
    Ok(taken)
}

/// Rolls the batch back after its insert failed and, where the failure is about partitions,
/// mends them for the retry: a month of `times` without a partition gets one (retention dropped
/// a month, or the table was partitioned after its messages were stored), and the check
/// constraint of a move to partitions that refused an entry is removed, as a writer meeting
/// such a message removes it. Returns `error`.
async fn failed(
    pool: &PgPool,
    transaction: Transaction<'_, Postgres>,
    error: sqlx::Error,
    times: &[DateTime<Utc>],
) -> sqlx::Error {
    // Rolled back first: the batch's locks would make the mending wait on itself.
    if let Err(rollback) = transaction.rollback().await {
        warn!(error = %rollback, "rolling back the failed search batch failed");
    }
    let mended = if is_missing_partition(&error) {
        ensure_partitions_of(pool, times.iter().copied()).await
    } else if let Some(constraint) = violated_partitioning_constraint(&error) {
        drop_partitioning_constraint(pool, constraint).await
    } else {
        Ok(())
    };
    if let Err(mending) = mended {
        warn!(error = %mending, "mending the search partitions failed; retrying");
    }
    error
}

/// Takes up to `limit` queued messages, oldest first, of the backfill or of new messages; rows
/// another indexer holds are skipped.
async fn take(
    transaction: &mut Transaction<'_, Postgres>,
    backfill: bool,
    limit: i64,
) -> Result<Vec<Taken>, sqlx::Error> {
    // Literal conditions, each matching its partial index (a parameter could not).
    let sql = if backfill {
        r#"DELETE FROM search_index_queue WHERE id IN (
               SELECT id FROM search_index_queue WHERE backfill ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING tenant_id, message_id, "timestamp", queued_at"#
    } else {
        r#"DELETE FROM search_index_queue WHERE id IN (
               SELECT id FROM search_index_queue WHERE NOT backfill ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING tenant_id, message_id, "timestamp", queued_at"#
    };
    sqlx::query_as(sql).bind(limit).fetch_all(&mut **transaction).await
}

/// Writes search entries; one already there (a message queued twice) is kept.
async fn insert(transaction: &mut Transaction<'_, Postgres>, entries: Entries) -> Result<(), sqlx::Error> {
    if entries.tenant_id.is_empty() {
        return Ok(());
    }
    sqlx::query(
        r#"INSERT INTO message_search (tenant_id, message_id, session_id, "timestamp", terms, normal_text, terms_version)
           SELECT tenant_id, message_id, session_id, ts, string_to_array(terms, ' '), normal_text, $7
           FROM UNNEST($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[])
             AS t(tenant_id, message_id, session_id, ts, terms, normal_text)
           ON CONFLICT DO NOTHING"#,
    )
    .bind(entries.tenant_id)
    .bind(entries.message_id)
    .bind(entries.session_id)
    .bind(entries.timestamp)
    .bind(entries.terms)
    .bind(entries.normal_text)
    .bind(ORDER_TERMS_VERSION)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}
