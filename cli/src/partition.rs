//! `flare-storage partition-messages`: moves a plain `messages` table that already holds rows to
//! the layout partitioned by month (migrations/20261201000001_partitioned_messages.sql) while
//! writers and readers keep running, without copying a row. The table becomes the partition of
//! everything before a month boundary; months from the boundary on get partitions of their
//! own; retention trims the old table by batches as before and drops it once all of it has
//! expired.
//!
//! Every step can be interrupted and run again:
//! 1. an index on (tenant_id, session_id, seq) matching the partitioned table's is built
//!    concurrently (an interrupted build leaves an invalid index, which is rebuilt);
//! 2. a check constraint `"timestamp" < boundary` is added without reading the table, then
//!    validated by one scan that blocks no writer (a constraint from an earlier run keeps its
//!    boundary unless that is nearer than the margin; a failed scan removes it). A writer
//!    that meets a message the constraint refuses removes the constraint and stores the
//!    message, and the move stops (step 3 refuses to attach without it);
//! 3. one short transaction renames the table, creates the partitioned one and attaches the old
//!    table, which the validated constraint spares a second scan. Like the constraint changes,
//!    it waits at most five seconds at a time for its lock (readers and writers queue behind
//!    it no longer than that when a long read holds the table) and retries.
//!
//! The boundary is the first day of a month at least `margin_days` ahead: writers refuse
//! messages further in the future than `WRITER_MAX_FUTURE_SECONDS` (a day by default), so with
//! the default margin no message stored during the move falls on or after it.

use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use flare_storage_common::schema::PARTITIONING_CONSTRAINT as CONSTRAINT;
use sqlx::PgPool;

const SEQ_INDEX: &str = "messages_seq_lookup";

/// Attempts of the final transaction, each waiting at most five seconds for its lock.
const SWAP_ATTEMPTS: u32 = 60;

pub async fn run(pool: &PgPool, margin_days: u32) -> anyhow::Result<()> {
    flare_storage_common::schema::migrate(pool).await.context("cannot apply the migrations")?;
    let timescaledb: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
            .fetch_one(pool)
            .await?;
    if timescaledb {
        println!("messages is a TimescaleDB hypertable: it already has monthly chunks; nothing to do");
        return Ok(());
    }
    if is_partitioned(pool).await? {
        println!("messages is already partitioned by month; nothing to do");
        return Ok(());
    }

    println!("1/3 building index {SEQ_INDEX} (concurrently)");
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = $1",
    )
    .bind(SEQ_INDEX)
    .fetch_optional(pool)
    .await?;
    if valid == Some(false) {
        sqlx::query(&format!("DROP INDEX CONCURRENTLY {SEQ_INDEX}")).execute(pool).await?;
    }
    if valid != Some(true) {
        sqlx::query(&format!("CREATE INDEX CONCURRENTLY {SEQ_INDEX} ON messages (tenant_id, session_id, seq)"))
            .execute(pool)
            .await?;
    }

    // The first day of the month after the margin, in UTC.
    let wanted: DateTime<Utc> = sqlx::query_scalar(
        "SELECT (date_trunc('month', (now() + make_interval(days => $1)) AT TIME ZONE 'UTC') + INTERVAL '1 month') AT TIME ZONE 'UTC'",
    )
    .bind(i32::try_from(margin_days)?)
    .fetch_one(pool)
    .await?;
    // An earlier run's constraint is kept (its scan may be done) unless it is nearer than the
    // margin asks.
    let boundary = match constraint_boundary(pool).await? {
        Some(earlier) if earlier >= wanted => earlier,
        earlier => {
            if earlier.is_some() {
                drop_constraint(pool).await?;
            }
            let add = format!(
                r#"ALTER TABLE messages ADD CONSTRAINT {CONSTRAINT} CHECK ("timestamp" < '{}') NOT VALID"#,
                wanted.to_rfc3339()
            );
            locking(pool, &add).await?;
            wanted
        }
    };
    println!("2/3 checking that every row is before {boundary} (one scan; writers go on)");
    let validated = sqlx::query(&format!("ALTER TABLE messages VALIDATE CONSTRAINT {CONSTRAINT}")).execute(pool).await;
    match validated {
        Ok(_) => {}
        // 23514: a row is past the boundary. Left in place, the constraint would only make
        // writers remove it when they meet such a message.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23514") => {
            drop_constraint(pool).await?;
            bail!("a stored message is at or after {boundary}: run again with a larger --margin-days ({error})");
        }
        // 42704: a writer removed the constraint, having met a message dated past it.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42704") => {
            bail!(
                "a writer met a message dated past {boundary} and removed the check: run again with a larger --margin-days"
            )
        }
        Err(error) => return Err(error.into()),
    }

    println!("3/3 replacing messages with the partitioned table");
    locking(pool, &format!("SELECT flare_partition_messages('{}')", boundary.to_rfc3339())).await?;
    println!("messages is partitioned by month; the rows before {boundary} are its partition messages_unpartitioned");
    Ok(())
}

async fn is_partitioned(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT relkind = 'p' FROM pg_class WHERE oid = 'messages'::regclass").fetch_one(pool).await
}

async fn drop_constraint(pool: &PgPool) -> anyhow::Result<()> {
    locking(pool, &format!("ALTER TABLE messages DROP CONSTRAINT IF EXISTS {CONSTRAINT}")).await
}

/// Runs `statement`, which locks messages, waiting at most five seconds at a time for the lock
/// (so readers and writers never queue behind it for longer) and retrying.
async fn locking(pool: &PgPool, statement: &str) -> anyhow::Result<()> {
    for attempt in 1..=SWAP_ATTEMPTS {
        let mut transaction = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *transaction).await?;
        match sqlx::query(statement).execute(&mut *transaction).await {
            Ok(_) => return Ok(transaction.commit().await?),
            // 55P03: lock_not_available.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => {
                println!("  the table is busy (attempt {attempt}/{SWAP_ATTEMPTS}); retrying");
                drop(transaction);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    bail!("messages stayed busy for {SWAP_ATTEMPTS} attempts; run the command again")
}

/// The boundary of the check constraint an earlier run added, if any.
async fn constraint_boundary(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        r#"SELECT substring(pg_get_constraintdef(oid) FROM '''([^'']+)''')::timestamptz
           FROM pg_constraint WHERE conrelid = 'messages'::regclass AND conname = $1"#,
    )
    .bind(CONSTRAINT)
    .fetch_optional(pool)
    .await
}
