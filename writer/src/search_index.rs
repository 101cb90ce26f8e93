//! The search indexer: keeps `message_search` up to date off the writer's insert path.
//!
//! The insert of a batch queues each new text or JSON message in `search_queue` (same
//! statement). The indexer takes up to [`BATCH`] queued rows at a time in one transaction:
//! it deletes them from the queue, reads their messages, writes their normal-form text and
//! terms (`common::text_search`) and commits. A crash or a failed statement rolls the whole
//! batch back into the queue, and the search table's key keeps a message indexed once, so
//! nothing is lost or indexed twice. Every writer runs an indexer; `SKIP LOCKED` lets them
//! share the queue.
//!
//! The message rows are read `FOR SHARE`: a recall, burn wipe or delete of a message being
//! indexed waits for this batch to commit and then removes its search row, and a message
//! recalled, deleted or burned before the batch read it is left out.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::message::searchable_content;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::MessageContent;
use flare_storage_common::stored_text::derived_copy;
use flare_storage_common::text_search::{index_terms, normalize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::Stage;
use crate::metrics::Metrics;

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
    timestamp: Vec<DateTime<Utc>>,
    terms: Vec<String>,
    normal_text: Vec<String>,
}

/// Indexes up to `limit` queued messages in one transaction; returns how many it took from the
/// queue (those gone by then count too, and leave no search row).
pub async fn index_batch(
    pool: &PgPool,
    limit: i64,
    metrics: &Metrics,
    crash_before_commit: bool,
) -> Result<usize, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let taken: Vec<(String, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        r#"DELETE FROM search_queue WHERE id IN (
               SELECT id FROM search_queue ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
           RETURNING tenant_id, message_id, "timestamp", queued_at"#,
    )
    .bind(limit)
    .fetch_all(&mut *transaction)
    .await?;
    if taken.is_empty() {
        return Ok(0);
    }
    let mut keys: (Vec<&str>, Vec<&str>, Vec<DateTime<Utc>>) = Default::default();
    for (tenant_id, message_id, timestamp, _) in &taken {
        keys.0.push(tenant_id);
        keys.1.push(message_id);
        keys.2.push(*timestamp);
    }
    let messages: Vec<(String, String, DateTime<Utc>, Vec<u8>)> = sqlx::query_as(
        r#"SELECT m.tenant_id, m.message_id, m."timestamp", m.content
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
    let mut rows = Entries::default();
    for (tenant_id, message_id, timestamp, content) in messages {
        // Content that does not decode has no text to find.
        let Ok(content) = MessageContent::decode(content.as_slice()) else { continue };
        let Some(text) = searchable_content(&content) else { continue };
        let normal = normalize(&derived_copy(text));
        // Terms never contain a space (spaces separate runs), so one space-joined string per
        // row carries them: UNNEST would flatten an array of arrays.
        rows.terms.push(index_terms(&normal).join(" "));
        rows.normal_text.push(normal);
        rows.tenant_id.push(tenant_id);
        rows.message_id.push(message_id);
        rows.timestamp.push(timestamp);
    }
    sqlx::query(
        r#"INSERT INTO message_search (tenant_id, message_id, "timestamp", terms, normal_text)
           SELECT tenant_id, message_id, ts, string_to_array(terms, ' '), normal_text
           FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[])
             AS t(tenant_id, message_id, ts, terms, normal_text)
           ON CONFLICT (tenant_id, message_id) DO NOTHING"#,
    )
    .bind(rows.tenant_id)
    .bind(rows.message_id)
    .bind(rows.timestamp)
    .bind(rows.terms)
    .bind(rows.normal_text)
    .execute(&mut *transaction)
    .await?;
    if crash_before_commit {
        warn!(stage = Stage::SearchIndex.name(), "crash requested by WRITER_CRASH_AFTER_STAGE; aborting");
        std::process::abort();
    }
    transaction.commit().await?;
    let now = Utc::now();
    for (_, _, _, queued_at) in &taken {
        metrics.search_index_lag.observe((now - *queued_at).num_microseconds().unwrap_or(0) as f64 / 1e6);
    }
    metrics.search_indexed.inc_by(taken.len() as u64);
    Ok(taken.len())
}
