//! `flare-storage partition-messages`: moves a plain `messages` table that already holds rows,
//! and a plain `message_search` (the search side table), to the layout partitioned by month
//! (migrations/20261201000001_partitioned_messages.sql, …000003_partitioned_search.sql) while
//! writers and readers keep running, without copying a row. Each table becomes the partition of
//! everything before a month boundary; months from the boundary on get partitions of their
//! own; retention trims the old tables by batches as before and drops them once all of them
//! has expired.
//!
//! Every step can be interrupted and run again:
//! 1. an index matching the partitioned table's is built concurrently (an interrupted build
//!    leaves an invalid index, which is rebuilt): on `messages` (tenant_id, session_id, seq);
//!    on `message_search` its new key (tenant_id, message_id, "timestamp"), made a unique
//!    constraint, which the partitioned table's key needs in a partition it attaches;
//! 2. a check constraint `"timestamp" < boundary` is added without reading the table, then
//!    validated by one scan that blocks no writer (a constraint from an earlier run keeps its
//!    boundary unless that is nearer than the margin; a failed scan removes it). A writer (or
//!    search indexer) that meets a row the constraint refuses removes the constraints and
//!    stores it, and the move stops (step 3 refuses to attach without them);
//! 3. for each table, one short transaction renames it, creates the partitioned one and
//!    attaches the old table, which the validated constraint spares a second scan. Like the
//!    constraint changes, it waits at most five seconds at a time for its lock (readers and
//!    writers queue behind it no longer than that when a long read holds the table) and
//!    retries.
//!
//! Both tables get one boundary (an earlier run's, when it is further than the margin asks),
//! so their months match.
//!
//! The boundary is the first day of a month at least `margin_days` ahead: writers refuse
//! messages further in the future than `WRITER_MAX_FUTURE_SECONDS` (a day by default), so with
//! the default margin no message stored during the move falls on or after it.

use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use flare_storage_common::schema::{PARTITIONING_CONSTRAINT, SEARCH_PARTITIONING_CONSTRAINT};
use sqlx::PgPool;

/// Attempts of a statement that takes a table's lock, each waiting at most five seconds.
const SWAP_ATTEMPTS: u32 = 60;

/// A table the command moves, and what moving it takes.
struct Table {
    name: &'static str,
    /// The check constraint of step 2.
    constraint: &'static str,
    /// The index of step 1: name and columns.
    index: (&'static str, &'static str),
    /// Whether the index becomes a unique constraint of the same name.
    unique: bool,
    /// The migration's function that swaps the table (step 3).
    swap: &'static str,
}

const MESSAGES: Table = Table {
    name: "messages",
    constraint: PARTITIONING_CONSTRAINT,
    index: ("messages_seq_lookup", "tenant_id, session_id, seq"),
    unique: false,
    swap: "flare_partition_messages",
};

const SEARCH: Table = Table {
    name: "message_search",
    constraint: SEARCH_PARTITIONING_CONSTRAINT,
    index: ("message_search_key", r#"tenant_id, message_id, "timestamp""#),
    unique: true,
    swap: "flare_partition_message_search",
};

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
    let mut tables = Vec::new();
    for table in [MESSAGES, SEARCH] {
        if !is_partitioned(pool, table.name).await? {
            tables.push(table);
        }
    }
    if tables.is_empty() {
        println!("messages and message_search are already partitioned by month; nothing to do");
        return Ok(());
    }

    // The first day of the month after the margin, in UTC.
    let wanted: DateTime<Utc> = sqlx::query_scalar(
        "SELECT (date_trunc('month', (now() + make_interval(days => $1)) AT TIME ZONE 'UTC') + INTERVAL '1 month') AT TIME ZONE 'UTC'",
    )
    .bind(i32::try_from(margin_days)?)
    .fetch_one(pool)
    .await?;
    // One boundary for every table moved, so their months match: an earlier run's (its scan
    // may be done) unless it is nearer than the margin asks.
    let mut earlier = Vec::new();
    for table in &tables {
        earlier.push(constraint_boundary(pool, table).await?);
    }
    let boundary = earlier.iter().flatten().fold(wanted, |boundary, &earlier| boundary.max(earlier));
    for (table, earlier) in tables.iter().zip(earlier) {
        println!("1/3 {}: building index {} (concurrently)", table.name, table.index.0);
        build_index(pool, table).await?;
        if earlier != Some(boundary) {
            if earlier.is_some() {
                drop_constraint(pool, table).await?;
            }
            let add = format!(
                r#"ALTER TABLE {} ADD CONSTRAINT {} CHECK ("timestamp" < '{}') NOT VALID"#,
                table.name,
                table.constraint,
                boundary.to_rfc3339()
            );
            locking(pool, &add).await?;
        }
        println!("2/3 {}: checking that every row is before {boundary} (one scan; writers go on)", table.name);
        validate(pool, table, boundary).await?;
    }

    // One table at a time: a swap holding both tables' locks could deadlock with a search,
    // which locks message_search, then messages.
    for table in &tables {
        println!("3/3 replacing {} with the partitioned table", table.name);
        locking(pool, &format!("SELECT {}('{}')", table.swap, boundary.to_rfc3339())).await?;
        println!(
            "{0} is partitioned by month; the rows before {boundary} are its partition {0}_unpartitioned",
            table.name
        );
    }
    Ok(())
}

async fn is_partitioned(pool: &PgPool, table: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT relkind = 'p' FROM pg_class WHERE oid = $1::regclass").bind(table).fetch_one(pool).await
}

/// Step 1: the table's index, built concurrently (an invalid one from an interrupted build is
/// dropped first), then made a unique constraint where the table needs one.
async fn build_index(pool: &PgPool, table: &Table) -> anyhow::Result<()> {
    let (index, columns) = table.index;
    let valid: Option<bool> = sqlx::query_scalar(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = $1",
    )
    .bind(index)
    .fetch_optional(pool)
    .await?;
    if valid == Some(false) {
        sqlx::query(&format!("DROP INDEX CONCURRENTLY {index}")).execute(pool).await?;
    }
    if valid != Some(true) {
        let unique = if table.unique { "UNIQUE " } else { "" };
        sqlx::query(&format!("CREATE {unique}INDEX CONCURRENTLY {index} ON {} ({columns})", table.name))
            .execute(pool)
            .await?;
    }
    if table.unique {
        let constrained: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2)",
        )
        .bind(table.name)
        .bind(index)
        .fetch_one(pool)
        .await?;
        if !constrained {
            locking(pool, &format!("ALTER TABLE {} ADD CONSTRAINT {index} UNIQUE USING INDEX {index}", table.name))
                .await?;
        }
    }
    Ok(())
}

/// Step 2: validates the table's check constraint, one scan that blocks no writer.
async fn validate(pool: &PgPool, table: &Table, boundary: DateTime<Utc>) -> anyhow::Result<()> {
    let statement = format!("ALTER TABLE {} VALIDATE CONSTRAINT {}", table.name, table.constraint);
    match sqlx::query(&statement).execute(pool).await {
        Ok(_) => Ok(()),
        // 23514: a row is past the boundary. Left in place, the constraint would only make
        // writers remove it when they meet such a message.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23514") => {
            drop_constraint(pool, table).await?;
            bail!("a row of {} is at or after {boundary}: run again with a larger --margin-days ({error})", table.name);
        }
        // 42704: a writer removed the constraint, having met a message dated past it.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42704") => bail!(
            "a writer met a message dated past {boundary} and removed the check: run again with a larger --margin-days"
        ),
        Err(error) => Err(error.into()),
    }
}

async fn drop_constraint(pool: &PgPool, table: &Table) -> anyhow::Result<()> {
    locking(pool, &format!("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}", table.name, table.constraint)).await
}

/// Runs `statement`, which locks a table, waiting at most five seconds at a time for the lock
/// (so readers and writers never queue behind it for longer) and retrying; a deadlock with a
/// reader (PostgreSQL cancels one of the two) is retried too.
async fn locking(pool: &PgPool, statement: &str) -> anyhow::Result<()> {
    for attempt in 1..=SWAP_ATTEMPTS {
        let mut transaction = pool.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *transaction).await?;
        match sqlx::query(statement).execute(&mut *transaction).await {
            Ok(_) => return Ok(transaction.commit().await?),
            // 55P03: lock_not_available; 40P01: deadlock_detected.
            Err(sqlx::Error::Database(error)) if matches!(error.code().as_deref(), Some("55P03" | "40P01")) => {
                println!("  the table is busy (attempt {attempt}/{SWAP_ATTEMPTS}); retrying");
                drop(transaction);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    bail!("the table stayed busy for {SWAP_ATTEMPTS} attempts; run the command again")
}

/// The boundary of the check constraint an earlier run added to `table`, if any.
async fn constraint_boundary(pool: &PgPool, table: &Table) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        r#"SELECT substring(pg_get_constraintdef(oid) FROM '''([^'']+)''')::timestamptz
           FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2"#,
    )
    .bind(table.name)
    .bind(table.constraint)
    .fetch_optional(pool)
    .await
}
