//! PostgreSQL / TimescaleDB archive: one multi-row `INSERT … SELECT FROM UNNEST(…)` per batch,
//! a single prepared statement whatever the batch size.
//!
//! Text goes in by the rules of `stored_text`: the payload keeps the message intact, derived
//! text columns leave U+0000 out and JSON columns escape it. A statement that fails with a
//! data error (SQLSTATE class 22 or 54, or a constraint other than uniqueness) is split until
//! the refused messages stand alone ([`super::write_isolating`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Datelike, Utc};
use flare_storage_common::message::{content_type, message_tenant_id, to_datetime};
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::Message;
use flare_storage_common::schema::{PARTITIONING_CONSTRAINT, SEARCH_PARTITIONING_CONSTRAINT};
use flare_storage_common::stored_text::{derived_copy, escape_json_map};
use sqlx::PgPool;
use tracing::warn;

use crate::record::Origin;

use super::{
    Encoded, MessageKey, Partial, StoredMessage, WriteFailure, Written, message_key, ranges_by_size, write_isolating,
};

/// Most payload bytes one INSERT carries: PostgreSQL allocates each array parameter whole and
/// refuses allocations over 1 GB, so a batch of large messages is written in several.
const MAX_STATEMENT_BYTES: usize = 64 * 1024 * 1024;

/// The comment on an expired partition being detached and dropped.
const EXPIRED_PARTITION: &str = "flare-storage: expired partition of messages, to drop";

/// Tables retention trims by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgedTable {
    Messages,
    SearchIndex,
    MessageIds,
}

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Months (see [`month_of`]) whose partition this process has made sure of.
    partitioned_months: Arc<Mutex<HashSet<i64>>>,
}

#[derive(sqlx::FromRow)]
struct StoredRow {
    tenant_id: String,
    message_id: String,
    session_id: String,
    seq: Option<i64>,
    created_at: DateTime<Utc>,
    payload: Option<Vec<u8>>,
    origin_topic: Option<String>,
    origin_partition: Option<i32>,
    origin_offset: Option<i64>,
}

// The batch's ids go into message_ids first: only rows whose id, and whose seq in its session,
// are new there are stored, so neither repeats even where the messages table cannot enforce it
// (a partitioned table's unique keys all contain "timestamp"), and a resend with another time
// is already stored. A message kept out by its seq alone is found under no id, which the
// pipeline takes for a seq collision (pipeline.rs, `settle`).
// Array-valued columns (receiver_ids, tags) travel as JSON text because UNNEST flattens a
// two-dimensional array instead of yielding one array per row.
// New text and JSON messages are queued for the search indexer in the same statement, so a
// stored message is never left unindexed (migrations/20261130000002_search_index.sql).
const INSERT_BATCH: &str = r#"
WITH batch AS (
SELECT * FROM UNNEST(
    $1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
    $9::bytea[], $10::text[], $11::int4[], $12::text[], $13::text[], $14::text[], $15::timestamptz[],
    $16::bool[], $17::timestamptz[], $18::bool[], $19::int4[], $20::text[], $21::text[], $22::text[],
    $23::bytea[], $24::timestamptz[], $25::text[], $26::int4[], $27::int8[]
) AS t(tenant_id, message_id, session_id, seq, sender_id, sender_type, receiver_id, receiver_ids,
       content, content_type, message_type, business_type, session_type, status, ts,
       is_recalled, recalled_at, is_burn_after_read, burn_after_seconds, extra, tags, attributes,
       payload, persisted_at, origin_topic, origin_partition, origin_offset)
), new_ids AS (
INSERT INTO message_ids (tenant_id, message_id, session_id, seq, "timestamp", origin_topic, origin_partition, origin_offset)
SELECT tenant_id, message_id, session_id, seq, ts, origin_topic, origin_partition, origin_offset FROM batch
ON CONFLICT DO NOTHING
RETURNING tenant_id, message_id, "timestamp"
), inserted AS (
INSERT INTO messages (
    tenant_id, message_id, session_id, seq, sender_id, sender_type, receiver_id, receiver_ids,
    content, content_type, message_type, business_type, session_type, status, "timestamp",
    is_recalled, recalled_at, is_burn_after_read, burn_after_seconds, extra, tags, attributes,
    payload, created_at, updated_at)
SELECT
    t.tenant_id, t.message_id, t.session_id, t.seq, t.sender_id, t.sender_type, t.receiver_id,
    ARRAY(SELECT jsonb_array_elements_text(t.receiver_ids::jsonb)),
    t.content, t.content_type, t.message_type, t.business_type, t.session_type, t.status, t.ts,
    t.is_recalled, t.recalled_at, t.is_burn_after_read, t.burn_after_seconds, t.extra::jsonb,
    ARRAY(SELECT jsonb_array_elements_text(t.tags::jsonb)), t.attributes::jsonb, t.payload,
    t.persisted_at, t.persisted_at
FROM batch t JOIN new_ids n ON n.tenant_id = t.tenant_id AND n.message_id = t.message_id AND n."timestamp" = t.ts
ON CONFLICT DO NOTHING
RETURNING tenant_id, message_id, "timestamp", content_type, is_recalled
), queued AS (
    INSERT INTO search_index_queue (tenant_id, message_id, "timestamp")
    SELECT tenant_id, message_id, "timestamp" FROM inserted
    WHERE content_type IN ('text', 'json') AND NOT is_recalled
)
SELECT tenant_id, message_id FROM inserted
"#;

impl PostgresStore {
    pub fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        Ok(Self {
            pool: flare_storage_common::schema::lazy_pool(url, max_connections)?,
            partitioned_months: Arc::default(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Inserts every message not stored yet. Reports those stored now, those already stored
    /// and those the database refuses for good (with its error). Messages must be normalised
    /// (tenant, session and timestamp set).
    pub async fn insert_batch(&self, messages: &[Encoded]) -> Result<Written, Partial<sqlx::Error>> {
        let ranges = ranges_by_size(messages, MAX_STATEMENT_BYTES);
        write_isolating(ranges, |range| self.insert_range(messages, range)).await
    }

    async fn insert_range(
        &self,
        messages: &[Encoded],
        range: Range<usize>,
    ) -> Result<Written, WriteFailure<sqlx::Error>> {
        let offset = range.start;
        let messages = &messages[range];
        self.ensure_partitions(messages).await.map_err(|error| match refusal(&error) {
            Some(reason) => WriteFailure::Refused(reason),
            None => WriteFailure::Failed(error),
        })?;
        let inserted = match self.insert(messages).await {
            Ok(inserted) => inserted,
            Err(error) => return Err(self.failure(error).await),
        };
        let already_stored = messages
            .iter()
            .map(|encoded| message_key(&encoded.message))
            .filter(|key| !inserted.contains(key))
            .collect();
        Ok(Written::of(messages, offset, already_stored, Vec::new()))
    }

    /// What a failed INSERT means for its messages.
    async fn failure(&self, error: sqlx::Error) -> WriteFailure<sqlx::Error> {
        if is_missing_partition(&error) {
            // Retention dropped a month this process had made sure of: make sure again.
            self.partitioned_months.lock().unwrap_or_else(PoisonError::into_inner).clear();
            return WriteFailure::Failed(error);
        }
        if let Some(constraint) = violated_partitioning_constraint(&error) {
            // A message dated past the boundary of a move to partitions that is under way or
            // was abandoned: the move gives way (the operator runs it again with a larger
            // margin), the message is stored on the retry.
            warn!(
                "a message is dated past the boundary of `flare-storage partition-messages`; removing its check constraint so the message can be stored (run it again with a larger --margin-days)"
            );
            if let Err(error) = drop_partitioning_constraint(&self.pool, constraint).await {
                warn!(%error, "removing the check constraint failed; retrying");
            }
            return WriteFailure::Failed(error);
        }
        match refusal(&error) {
            Some(reason) => WriteFailure::Refused(reason),
            None => WriteFailure::Failed(error),
        }
    }

    /// Creates the monthly partitions `messages` and `message_search` need that this process
    /// has not made sure of yet (one call per new month; none where a table is not
    /// partitioned), so a message of any storable time, and its search entry, has a partition
    /// to go to.
    async fn ensure_partitions(&self, messages: &[Encoded]) -> Result<(), sqlx::Error> {
        let mut missing = by_month(messages.iter().map(|encoded| stored_time(&encoded.message)));
        {
            let known = self.partitioned_months.lock().unwrap_or_else(PoisonError::into_inner);
            missing.retain(|month, _| !known.contains(month));
        }
        for (month, time) in missing {
            ensure_partition(&self.pool, time).await?;
            self.partitioned_months.lock().unwrap_or_else(PoisonError::into_inner).insert(month);
        }
        Ok(())
    }

    /// Creates the partitions of this month and the next `months_ahead` (at start and by
    /// retention), so the writer meets a new month with its partition there. Returns whether
    /// `messages` or `message_search` is one plain table (a database of an earlier version,
    /// not moved yet).
    pub async fn create_partitions_ahead(&self, months_ahead: i32) -> Result<bool, sqlx::Error> {
        sqlx::query("SELECT flare_create_message_partitions($1)").bind(months_ahead).execute(&self.pool).await?;
        sqlx::query_scalar(
            r#"SELECT bool_or(relkind = 'r') AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
               FROM pg_class WHERE oid IN ('messages'::regclass, 'message_search'::regclass)"#,
        )
        .fetch_one(&self.pool)
        .await
    }

    /// One INSERT of `messages`; returns the keys of those that were new.
    async fn insert(&self, messages: &[Encoded]) -> Result<HashSet<MessageKey>, sqlx::Error> {
        let columns = Columns::from_messages(messages);
        let rows: Vec<(String, String)> = sqlx::query_as(INSERT_BATCH)
            .bind(columns.tenant_id)
            .bind(columns.message_id)
            .bind(columns.session_id)
            .bind(columns.seq)
            .bind(columns.sender_id)
            .bind(columns.sender_type)
            .bind(columns.receiver_id)
            .bind(columns.receiver_ids)
            .bind(columns.content)
            .bind(columns.content_type)
            .bind(columns.message_type)
            .bind(columns.business_type)
            .bind(columns.session_type)
            .bind(columns.status)
            .bind(columns.timestamp)
            .bind(columns.is_recalled)
            .bind(columns.recalled_at)
            .bind(columns.is_burn_after_read)
            .bind(columns.burn_after_seconds)
            .bind(columns.extra)
            .bind(columns.tags)
            .bind(columns.attributes)
            .bind(columns.payload)
            .bind(columns.persisted_at)
            .bind(columns.origin_topic)
            .bind(columns.origin_partition)
            .bind(columns.origin_offset)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }
}

impl PostgresStore {
    /// Each of `keys` that is stored, in whichever session; the payload only where it is
    /// stored in the session given beside the key (the only case that needs it). One probe of
    /// message_ids per key, then one of the message's own partition (or chunk): the id's
    /// entry names the row that stands for the message.
    pub async fn stored_messages(
        &self,
        keys: &[(MessageKey, &str)],
    ) -> Result<HashMap<MessageKey, StoredMessage>, sqlx::Error> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let mut columns: (Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
        for ((tenant, id), session) in keys {
            columns.0.push(tenant);
            columns.1.push(id);
            columns.2.push(session);
        }
        let rows: Vec<StoredRow> = sqlx::query_as(
            r#"SELECT m.tenant_id, m.message_id, m.session_id, m.seq, m.created_at,
                      CASE WHEN m.session_id = k.session_id THEN m.payload END AS payload,
                      i.origin_topic, i.origin_partition, i.origin_offset
               FROM UNNEST($1::text[], $2::text[], $3::text[]) AS k(tenant_id, message_id, session_id)
               JOIN message_ids i ON i.tenant_id = k.tenant_id AND i.message_id = k.message_id
               JOIN messages m ON m.tenant_id = i.tenant_id AND m.message_id = i.message_id
                 AND m."timestamp" = i."timestamp""#,
        )
        .bind(columns.0)
        .bind(columns.1)
        .bind(columns.2)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let stored = StoredMessage {
                    session_id: row.session_id,
                    seq: row.seq.unwrap_or(0),
                    persisted_ms: row.created_at.timestamp_millis(),
                    payload: row.payload,
                    origin: match (row.origin_topic, row.origin_partition, row.origin_offset) {
                        (Some(topic), Some(partition), Some(offset)) => Some(Origin { topic, partition, offset }),
                        _ => None,
                    },
                };
                ((row.tenant_id, row.message_id), stored)
            })
            .collect())
    }

    /// Removes messages this batch stored and a later store refused, so no database shows
    /// what is dead-lettered, and their search entries. Only the rows of this session and seq.
    pub async fn delete_refused(&self, messages: &[&Message]) -> Result<(), sqlx::Error> {
        let tenants: Vec<&str> = messages.iter().map(|message| message_tenant_id(message)).collect();
        let ids: Vec<&str> = messages.iter().map(|message| message.id.as_str()).collect();
        let sessions: Vec<&str> = messages.iter().map(|message| message.session_id.as_str()).collect();
        let seqs: Vec<i64> = messages.iter().map(|message| message.seq).collect();
        let times: Vec<DateTime<Utc>> = messages.iter().map(|message| stored_time(message)).collect();
        let mut transaction = self.pool.begin().await?;
        let deleted: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
            r#"WITH deleted AS (
                   DELETE FROM messages m USING UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::timestamptz[])
                       AS k(tenant_id, message_id, session_id, seq, ts)
                   WHERE m.tenant_id = k.tenant_id AND m.message_id = k.message_id AND m."timestamp" = k.ts
                     AND m.session_id = k.session_id AND m.seq = k.seq
                   RETURNING m.tenant_id, m.message_id, m."timestamp"
               ), forgotten AS (
                   DELETE FROM message_ids i USING deleted d
                   WHERE i.tenant_id = d.tenant_id AND i.message_id = d.message_id AND i."timestamp" = d."timestamp"
               )
               SELECT tenant_id, message_id, "timestamp" FROM deleted"#,
        )
        .bind(tenants)
        .bind(ids)
        .bind(sessions)
        .bind(seqs)
        .bind(times)
        .fetch_all(&mut *transaction)
        .await?;
        // A statement of its own, after the delete: an indexer that held one of these messages
        // has committed its entry by now (search_index.rs).
        // By time too, so each entry costs one probe of the month holding it.
        let mut tenants = Vec::with_capacity(deleted.len());
        let mut ids = Vec::with_capacity(deleted.len());
        let mut times = Vec::with_capacity(deleted.len());
        for (tenant_id, message_id, timestamp) in deleted {
            tenants.push(tenant_id);
            ids.push(message_id);
            times.push(timestamp);
        }
        sqlx::query(
            r#"DELETE FROM message_search s
               USING UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS k(tenant_id, message_id, ts)
               WHERE s.tenant_id = k.tenant_id AND s.message_id = k.message_id AND s."timestamp" = k.ts"#,
        )
        .bind(tenants)
        .bind(ids)
        .bind(times)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await
    }

    /// Drops the `messages` partitions whose every row is older than `cutoff`; returns how
    /// many went (none where the table is not partitioned). Each is first detached
    /// concurrently, which waits for the transactions using it but blocks no reader or writer,
    /// then dropped on its own; a detach another writer left unfinished is finished. A
    /// partition that cannot go now (another writer is detaching it) is left to the next run.
    pub async fn drop_partitions_before(&self, cutoff: DateTime<Utc>) -> Result<u32, sqlx::Error> {
        // Messages first, so a search month normally goes after its messages month (a failed
        // detach of the one does not hold back the other: both are expired).
        let expired: Vec<(String, String, bool)> = sqlx::query_as(
            r#"SELECT parent, p.partition::text, p.detach_pending
               FROM UNNEST(ARRAY['messages', 'message_search']) WITH ORDINALITY AS t(parent, position)
               CROSS JOIN LATERAL flare_partitions_of(parent::regclass) p
               WHERE p.upper_bound <= $1 ORDER BY position"#,
        )
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        // Tables an earlier run detached but did not get to drop.
        let mut detached: Vec<String> = sqlx::query_scalar(
            r#"SELECT c.oid::regclass::text FROM pg_class c
               JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
               WHERE d.description = $1 AND c.relkind = 'r' AND NOT c.relispartition"#,
        )
        .bind(EXPIRED_PARTITION)
        .fetch_all(&self.pool)
        .await?;
        for (parent, partition, pending) in expired {
            // `partition` is a regclass's text: quoted where it needs to be. The comment marks
            // it for a later run should this one stop between detaching and dropping.
            let marked = sqlx::query(&format!("COMMENT ON TABLE {partition} IS '{EXPIRED_PARTITION}'"))
                .execute(&self.pool)
                .await;
            let how = if pending { "FINALIZE" } else { "CONCURRENTLY" };
            let detach = format!("ALTER TABLE {parent} DETACH PARTITION {partition} {how}");
            match marked.and(sqlx::query(&detach).execute(&self.pool).await) {
                Ok(_) => detached.push(partition),
                Err(error) => warn!(%partition, %error, "expired partition not detached; retrying at the next run"),
            }
        }
        let mut dropped = 0;
        for table in detached {
            match sqlx::query(&format!("DROP TABLE IF EXISTS {table}")).execute(&self.pool).await {
                Ok(_) => dropped += 1,
                Err(error) => warn!(%table, %error, "detached partition not dropped; retrying at the next run"),
            }
        }
        Ok(dropped)
    }

    /// The time of the oldest stored message, if any (one probe of a hypertable's time index).
    pub async fn oldest_message_time(&self) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar(r#"SELECT min("timestamp") FROM messages"#).fetch_one(&self.pool).await
    }

    /// Whether the messages table is a TimescaleDB hypertable.
    pub async fn has_timescaledb(&self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
            .fetch_one(&self.pool)
            .await
    }

    /// TimescaleDB retention: drops the chunks entirely older than `cutoff`.
    pub async fn drop_chunks_before(&self, cutoff: DateTime<Utc>) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT drop_chunks('messages', older_than => $1)").bind(cutoff).execute(&self.pool).await?;
        Ok(())
    }

    /// Deletes up to `limit` rows older than `cutoff` from `table` in one short statement.
    /// Rows are named by (tableoid, ctid): a ctid alone repeats across partitions.
    pub async fn delete_batch_before(
        &self,
        table: AgedTable,
        cutoff: DateTime<Utc>,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let table = match table {
            AgedTable::Messages => "messages",
            AgedTable::SearchIndex => "message_search",
            AgedTable::MessageIds => "message_ids",
        };
        let deleted = sqlx::query(&format!(
            r#"DELETE FROM {table} WHERE (tableoid, ctid) IN
                   (SELECT tableoid, ctid FROM {table} WHERE "timestamp" < $1 LIMIT $2)"#
        ))
        .bind(cutoff)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    /// Forgets per-user hides older than `cutoff`: their messages are gone by now.
    pub async fn delete_hidden_before(&self, cutoff: DateTime<Utc>) -> Result<u64, sqlx::Error> {
        let deleted =
            sqlx::query("DELETE FROM message_hidden WHERE hidden_at < $1").bind(cutoff).execute(&self.pool).await?;
        Ok(deleted.rows_affected())
    }

    /// The highest seq stored for each (tenant, session), in one round trip; sessions with
    /// nothing stored are absent.
    pub async fn max_seqs(&self, sessions: &[(String, String)]) -> Result<Vec<((String, String), i64)>, sqlx::Error> {
        let (tenants, session_ids): (Vec<&str>, Vec<&str>) =
            sessions.iter().map(|(tenant, session)| (tenant.as_str(), session.as_str())).unzip();
        // One index probe per session on message_ids (tenant_id, session_id, seq), whatever
        // the number of partitions.
        let rows: Vec<(String, String, Option<i64>)> = sqlx::query_as(
            r#"SELECT k.tenant_id, k.session_id,
                      (SELECT max(i.seq) FROM message_ids i WHERE i.tenant_id = k.tenant_id AND i.session_id = k.session_id)
               FROM UNNEST($1::text[], $2::text[]) AS k(tenant_id, session_id)"#,
        )
        .bind(tenants)
        .bind(session_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(|(tenant, session, max)| Some(((tenant, session), max?))).collect())
    }

    /// The highest seq stored for a session (0 when none).
    pub async fn max_seq(&self, tenant_id: &str, session_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM message_ids WHERE tenant_id = $1 AND session_id = $2")
            .bind(tenant_id)
            .bind(session_id)
            .fetch_one(&self.pool)
            .await
    }
}

/// One vector per column, in the order of `INSERT_BATCH`'s parameters.
#[derive(Default)]
struct Columns {
    tenant_id: Vec<String>,
    message_id: Vec<String>,
    session_id: Vec<String>,
    seq: Vec<Option<i64>>,
    sender_id: Vec<String>,
    sender_type: Vec<String>,
    receiver_id: Vec<String>,
    receiver_ids: Vec<String>,
    content: Vec<Option<Vec<u8>>>,
    content_type: Vec<&'static str>,
    message_type: Vec<i32>,
    business_type: Vec<String>,
    session_type: Vec<String>,
    status: Vec<String>,
    timestamp: Vec<DateTime<Utc>>,
    is_recalled: Vec<bool>,
    recalled_at: Vec<Option<DateTime<Utc>>>,
    is_burn_after_read: Vec<bool>,
    burn_after_seconds: Vec<i32>,
    extra: Vec<String>,
    tags: Vec<String>,
    attributes: Vec<String>,
    payload: Vec<Vec<u8>>,
    persisted_at: Vec<DateTime<Utc>>,
    origin_topic: Vec<Option<String>>,
    origin_partition: Vec<Option<i32>>,
    origin_offset: Vec<Option<i64>>,
}

impl Columns {
    fn from_messages(messages: &[Encoded]) -> Self {
        let mut columns = Self::default();
        for Encoded { message, payload, origin } in messages {
            columns.tenant_id.push(message_tenant_id(message).to_owned());
            columns.message_id.push(message.id.clone());
            columns.session_id.push(message.session_id.clone());
            columns.seq.push((message.seq > 0).then_some(message.seq));
            columns.sender_id.push(message.sender_id.clone());
            columns.sender_type.push(derived_copy(&message.sender_type).into_owned());
            columns.receiver_id.push(message.receiver_id.clone());
            columns.receiver_ids.push(json_text(&message.receiver_ids));
            columns.content.push(message.content.as_ref().map(|content| content.encode_to_vec()));
            columns.content_type.push(content_type(message));
            columns.message_type.push(message.message_type);
            columns.business_type.push(derived_copy(&message.business_type).into_owned());
            columns.session_type.push(derived_copy(&message.session_type).into_owned());
            columns.status.push(derived_copy(&message.status).into_owned());
            columns.timestamp.push(stored_time(message));
            columns.is_recalled.push(message.is_recalled);
            columns.recalled_at.push(message.recalled_at.as_ref().and_then(to_datetime));
            columns.is_burn_after_read.push(message.is_burn_after_read);
            columns.burn_after_seconds.push(message.burn_after_seconds);
            columns.extra.push(json_text(&escape_json_map(&message.extra)));
            columns.tags.push(json_text(&message.tags));
            columns.attributes.push(json_text(&escape_json_map(&message.attributes)));
            columns.payload.push(payload.clone());
            // The time the pipeline stamped as persisted, so every store and the cache agree.
            columns.persisted_at.push(
                message
                    .timeline
                    .as_ref()
                    .and_then(|timeline| timeline.persisted_time.as_ref())
                    .and_then(to_datetime)
                    .unwrap_or_else(Utc::now),
            );
            columns.origin_topic.push(origin.as_ref().map(|origin| origin.topic.clone()));
            columns.origin_partition.push(origin.as_ref().map(|origin| origin.partition));
            columns.origin_offset.push(origin.as_ref().map(|origin| origin.offset));
        }
        columns
    }
}

/// The time a message is stored under ("timestamp"). Normalisation guarantees a representable
/// timestamp; the epoch is never reached.
fn stored_time(message: &Message) -> DateTime<Utc> {
    message.timestamp.as_ref().and_then(to_datetime).unwrap_or(DateTime::UNIX_EPOCH)
}

/// A month as a number (year × 12 + month − 1, in UTC), the unit of `messages` partitions.
fn month_of(time: DateTime<Utc>) -> i64 {
    i64::from(time.year()) * 12 + i64::from(time.month0())
}

/// One of `times` for each month they fall in, by [`month_of`].
fn by_month(times: impl IntoIterator<Item = DateTime<Utc>>) -> BTreeMap<i64, DateTime<Utc>> {
    times.into_iter().map(|time| (month_of(time), time)).collect()
}

/// Makes sure the month holding `time` has its partition of `messages` and of
/// `message_search`, each where the table is partitioned (`flare_ensure_message_partition`).
async fn ensure_partition(pool: &PgPool, time: DateTime<Utc>) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT flare_ensure_message_partition($1)").bind(time).execute(pool).await.map(drop)
}

/// [`ensure_partition`] for every month of `times`, one call per month.
pub(crate) async fn ensure_partitions_of(
    pool: &PgPool,
    times: impl IntoIterator<Item = DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    for time in by_month(times).into_values() {
        ensure_partition(pool, time).await?;
    }
    Ok(())
}

/// Whether `error` is PostgreSQL finding no partition for a row ("no partition of relation …
/// found for row"): the writer's to create, not the message's fault. It shares SQLSTATE 23514
/// with check constraints but, unlike them, names no constraint.
pub(crate) fn is_missing_partition(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database)
        if database.code().as_deref() == Some("23514") && database.constraint().is_none())
}

/// The check constraint of a move to partitions (of `messages` or of `message_search`) that
/// refused the row of `error`, if that is what `error` is.
pub(crate) fn violated_partitioning_constraint(error: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(database) = error else { return None };
    [PARTITIONING_CONSTRAINT, SEARCH_PARTITIONING_CONSTRAINT]
        .into_iter()
        .find(|name| database.constraint() == Some(*name))
}

/// Drops `constraint`, a check constraint of a move to partitions (`flare-storage
/// partition-messages`), waiting at most five seconds for its table's lock: a message dated
/// past the move's boundary makes the move give way, and the operator runs it again with a
/// larger margin. Only that table is locked, and only while the constraint is there.
pub(crate) async fn drop_partitioning_constraint(pool: &PgPool, constraint: &str) -> Result<(), sqlx::Error> {
    let table = if constraint == SEARCH_PARTITIONING_CONSTRAINT { "message_search" } else { "messages" };
    let mut transaction = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *transaction).await?;
    let present: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::regclass AND conname = $2)",
    )
    .bind(table)
    .bind(constraint)
    .fetch_one(&mut *transaction)
    .await?;
    if present {
        sqlx::query(&format!("ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {constraint}"))
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    // Maps and lists of strings always serialise.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// The reason to dead-letter, when `error` is the database refusing the data for good rather
/// than failing: a data exception (class 22: out of range, invalid text, untranslatable
/// character…), a program limit (class 54: index row or array too large), or a check or
/// exclusion constraint an operator added (23514, 23P01; the one of a move to partitions,
/// [`PARTITIONING_CONSTRAINT`], is handled before). Everything else is transient:
/// connection loss, timeouts, serialization failures (40001), shutdown (57P01), missing
/// objects, and the other integrity errors — uniqueness is absorbed by `ON CONFLICT DO
/// NOTHING`, and a NOT NULL or foreign key violation (23502, 23503) can only come from a
/// schema that does not match this version, which no record can be blamed for.
fn refusal(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(database) => {
            let code = database.code()?;
            let data = code.starts_with("22") || code.starts_with("54") || code == "23514" || code == "23P01";
            data.then(|| format!("refused by PostgreSQL: {} (SQLSTATE {code})", database.message()))
        }
        // Failing to encode a value before sending it is as final as the server refusing it.
        sqlx::Error::Encode(cause) => Some(format!("refused by PostgreSQL: cannot encode a value: {cause}")),
        _ => None,
    }
}
