//! PostgreSQL / TimescaleDB: the reader's queries and the statements of its commands. Every
//! statement is scoped by tenant_id; reads skip messages deleted for everyone and, given a
//! user, those hidden or cleared for that user.
//!
//! JSON columns hold text by the rules of `stored_text` (U+0000 escaped): maps go in and come
//! out through `JsonStrings` (the rows in `rows.rs`).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, QueryBuilder};

use flare_storage_common::stored_text::escape_json_map;
use flare_storage_common::text_search::{ORDER_TERMS_VERSION, order_terms, query_terms};

use crate::search::{Among, SearchQuery};
use crate::store::rows::{
    Operation, ReadRecord, SessionHead, SessionPage, SessionViews, StoredRow, TargetRow, UnreadRange,
};

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

/// What a read receipt's update returns.
#[derive(sqlx::FromRow)]
struct Receipts {
    #[sqlx(json)]
    read_by: Vec<ReadRecord>,
    burned_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = r#"message_id, "timestamp", payload, seq, is_recalled, recalled_at, tags, attributes,
    created_at, burned_at, read_by, operations"#;

/// The message of id `$2` in tenant `$1`. Its time comes from the id index (message_ids), so a
/// partitioned table (or a hypertable) is read in the one partition that holds it: PostgreSQL
/// prunes the others at run time instead of probing each one's primary key. Where an id has
/// several rows (a resend raced its first copy on a hypertable), it is the row the id index
/// names, the earliest.
const BY_ID: &str = r#"tenant_id = $1 AND message_id = $2
    AND "timestamp" = (SELECT i."timestamp" FROM message_ids i WHERE i.tenant_id = $1 AND i.message_id = $2)"#;

/// [`BY_ID`] for the ids of text-array parameter `ids_param`: a nested loop over their index
/// entries, each probing the one partition it names.
fn by_ids(ids_param: usize) -> String {
    format!(
        r#"tenant_id = $1 AND (message_id, "timestamp") IN
               (SELECT i.message_id, i."timestamp" FROM message_ids i WHERE i.tenant_id = $1 AND i.message_id = ANY(${ids_param}))"#
    )
}

/// Conditions that hide messages from the user bound as parameter `user_param`: their
/// per-message hides and their clear watermark for the session.
fn user_filter(user_param: usize) -> String {
    format!(
        r#" AND NOT EXISTS (SELECT 1 FROM message_hidden h
                WHERE h.tenant_id = messages.tenant_id AND h.user_id = ${user_param} AND h.message_id = messages.message_id)
            AND "timestamp" > coalesce((SELECT c.cleared_before FROM session_clears c
                WHERE c.tenant_id = messages.tenant_id AND c.session_id = messages.session_id AND c.user_id = ${user_param}),
                '-infinity'::timestamptz)"#
    )
}

impl PostgresStore {
    pub fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        Ok(Self { pool: flare_storage_common::schema::lazy_pool(url, max_connections)? })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A message as `user` may see it ('' = no per-user filtering); deleted ones are absent.
    pub async fn message(
        &self,
        tenant_id: &str,
        message_id: &str,
        user: &str,
    ) -> Result<Option<StoredRow>, sqlx::Error> {
        let filter = if user.is_empty() { String::new() } else { user_filter(3) };
        let sql = format!(r#"SELECT {COLUMNS} FROM messages WHERE {BY_ID} AND deleted_at IS NULL {filter}"#);
        let mut query = sqlx::query_as(&sql).bind(tenant_id).bind(message_id);
        if !user.is_empty() {
            query = query.bind(user);
        }
        query.fetch_optional(&self.pool).await
    }

    /// A message whatever its state, for commands that change it.
    pub async fn target(&self, tenant_id: &str, message_id: &str) -> Result<Option<TargetRow>, sqlx::Error> {
        let sql = format!(
            r#"SELECT {COLUMNS}, session_id, sender_id, receiver_id, receiver_ids, is_burn_after_read,
                      burn_after_seconds, deleted_at
               FROM messages WHERE {BY_ID}"#
        );
        sqlx::query_as(&sql).bind(tenant_id).bind(message_id).fetch_optional(&self.pool).await
    }

    /// The messages of these ids, each once (the row the id index names, as [`Self::target`]).
    pub async fn targets(&self, tenant_id: &str, message_ids: &[String]) -> Result<Vec<TargetRow>, sqlx::Error> {
        let sql = format!(
            r#"SELECT {COLUMNS}, session_id, sender_id, receiver_id, receiver_ids,
                      is_burn_after_read, burn_after_seconds, deleted_at
               FROM messages WHERE {} ORDER BY message_id"#,
            by_ids(2)
        );
        sqlx::query_as(&sql).bind(tenant_id).bind(message_ids).fetch_all(&self.pool).await
    }

    /// The newest `limit` messages of a session, newest first (to fill the hot window).
    pub async fn newest(&self, tenant_id: &str, session_id: &str, limit: i64) -> Result<Vec<StoredRow>, sqlx::Error> {
        let sql = format!(
            r#"SELECT {COLUMNS} FROM messages
               WHERE tenant_id = $1 AND session_id = $2 AND deleted_at IS NULL
               ORDER BY "timestamp" DESC, message_id DESC
               LIMIT $3"#
        );
        sqlx::query_as(&sql).bind(tenant_id).bind(session_id).bind(limit).fetch_all(&self.pool).await
    }

    /// Up to `limit` messages of a session with seq in (after, before), ascending.
    pub async fn seq_range(
        &self,
        tenant_id: &str,
        session_id: &str,
        after: i64,
        before: i64,
        limit: i64,
        user: &str,
    ) -> Result<Vec<StoredRow>, sqlx::Error> {
        let filter = if user.is_empty() { String::new() } else { user_filter(6) };
        let sql = format!(
            r#"SELECT {COLUMNS} FROM messages
               WHERE tenant_id = $1 AND session_id = $2 AND deleted_at IS NULL
                 AND seq > $3 AND seq < $4 {filter}
               ORDER BY seq
               LIMIT $5"#
        );
        let mut query = sqlx::query_as(&sql).bind(tenant_id).bind(session_id).bind(after).bind(before).bind(limit);
        if !user.is_empty() {
            query = query.bind(user);
        }
        query.fetch_all(&self.pool).await
    }

    /// Up to `limit` messages of a session in [from, to], newest first, older than `before`,
    /// as `user` may see them.
    pub async fn session_page(&self, page: SessionPage<'_>) -> Result<Vec<StoredRow>, sqlx::Error> {
        let SessionPage { tenant_id, session_id, from, to, before, limit, user } = page;
        // The row comparison matches the (tenant_id, session_id, "timestamp" DESC,
        // message_id DESC) index, so each page is one index range scan (keyset paging). The
        // first page gets its own statement: an `$5 IS NULL OR …` condition would keep a
        // generic plan from using the cursor as an index bound.
        let cursor_condition = if before.is_some() { r#"AND ("timestamp", message_id) < ($6, $7)"# } else { "" };
        let user_param = if before.is_some() { 8 } else { 6 };
        let filter = if user.is_empty() { String::new() } else { user_filter(user_param) };
        let sql = format!(
            r#"SELECT {COLUMNS} FROM messages
               WHERE tenant_id = $1 AND session_id = $2 AND deleted_at IS NULL
                 AND "timestamp" >= $3 AND "timestamp" <= $4 {cursor_condition} {filter}
               ORDER BY "timestamp" DESC, message_id DESC
               LIMIT $5"#
        );
        let mut query = sqlx::query_as(&sql).bind(tenant_id).bind(session_id).bind(from).bind(to).bind(limit);
        if let Some(before) = before {
            query = query.bind(before.timestamp).bind(before.message_id);
        }
        if !user.is_empty() {
            query = query.bind(user);
        }
        query.fetch_all(&self.pool).await
    }

    /// Soft-deletes messages of a session for everyone; returns the ids newly deleted. Their
    /// search entries go too.
    pub async fn delete_for_everyone(
        &self,
        tenant_id: &str,
        session_id: &str,
        message_ids: &[String],
        operation: &Operation,
    ) -> Result<Vec<String>, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let sql = format!(
            r#"UPDATE messages SET deleted_at = now(), updated_at = now(),
                   operations = operations || jsonb_build_array($4::jsonb)
               WHERE {} AND session_id = $2 AND deleted_at IS NULL
               RETURNING message_id"#,
            by_ids(3)
        );
        let deleted: Vec<String> = sqlx::query_scalar(&sql)
            .bind(tenant_id)
            .bind(session_id)
            .bind(message_ids)
            .bind(Json(operation))
            .fetch_all(&mut *transaction)
            .await?;
        unindex(&mut transaction, tenant_id, &deleted).await?;
        transaction.commit().await?;
        Ok(deleted)
    }

    /// Marks a message recalled and drops its content from every column and from the search
    /// index; returns the recall time, or `None` when it was already recalled.
    pub async fn recall(
        &self,
        tenant_id: &str,
        message_id: &str,
        recalled_at: DateTime<Utc>,
        payload_without_content: &[u8],
        operation: &Operation,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let sql = format!(
            r#"UPDATE messages SET is_recalled = true, recalled_at = $3, content = NULL, payload = $4,
                   updated_at = now(), operations = operations || jsonb_build_array($5::jsonb)
               WHERE {BY_ID} AND NOT is_recalled
               RETURNING recalled_at"#
        );
        let recalled = sqlx::query_scalar(&sql)
            .bind(tenant_id)
            .bind(message_id)
            .bind(recalled_at)
            .bind(payload_without_content)
            .bind(Json(operation))
            .fetch_optional(&mut *transaction)
            .await?;
        unindex(&mut transaction, tenant_id, &[message_id.to_owned()]).await?;
        transaction.commit().await?;
        Ok(recalled)
    }

    /// Hides a message for one user; `permanent` is never taken back once set.
    pub async fn hide_for_user(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        message_id: &str,
        permanent: bool,
    ) -> Result<bool, sqlx::Error> {
        let newly_hidden: Option<bool> = sqlx::query_scalar(
            r#"INSERT INTO message_hidden (tenant_id, session_id, user_id, message_id, permanent)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (tenant_id, user_id, message_id)
               DO UPDATE SET permanent = message_hidden.permanent OR EXCLUDED.permanent
               RETURNING (xmax = 0)"#,
        )
        .bind(tenant_id)
        .bind(session_id)
        .bind(user_id)
        .bind(message_id)
        .bind(permanent)
        .fetch_optional(&self.pool)
        .await?;
        Ok(newly_hidden.unwrap_or(false))
    }

    /// Raises a user's clear watermark for a session to `before` (never lowers it); returns
    /// the watermark in force and how many visible messages it newly covers.
    pub async fn clear_session(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        before: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, i64), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let previous: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT cleared_before FROM session_clears WHERE tenant_id = $1 AND session_id = $2 AND user_id = $3 FOR UPDATE",
        )
        .bind(tenant_id)
        .bind(session_id)
        .bind(user_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let watermark: DateTime<Utc> = sqlx::query_scalar(
            r#"INSERT INTO session_clears (tenant_id, session_id, user_id, cleared_before)
               VALUES ($1, $2, $3, $4)
               ON CONFLICT (tenant_id, session_id, user_id)
               DO UPDATE SET cleared_before = GREATEST(session_clears.cleared_before, EXCLUDED.cleared_before),
                             cleared_at = now()
               RETURNING cleared_before"#,
        )
        .bind(tenant_id)
        .bind(session_id)
        .bind(user_id)
        .bind(before)
        .fetch_one(&mut *transaction)
        .await?;
        // An index range count over the newly covered span; nothing is rewritten.
        let covered: i64 = sqlx::query_scalar(
            r#"SELECT count(*) FROM messages
               WHERE tenant_id = $1 AND session_id = $2 AND deleted_at IS NULL
                 AND "timestamp" > coalesce($3, '-infinity'::timestamptz) AND "timestamp" <= $4"#,
        )
        .bind(tenant_id)
        .bind(session_id)
        .bind(previous)
        .bind(watermark)
        .fetch_one(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok((watermark, covered))
    }

    /// Records that `user_id` read a message (once; a later read keeps the first time) and,
    /// for burn-after-read messages, the time its content is gone for everyone (the earliest
    /// wins). Returns the user's read time and the burn time.
    pub async fn mark_read(
        &self,
        tenant_id: &str,
        message_id: &str,
        user_id: &str,
        read_at: DateTime<Utc>,
        burn_at: Option<DateTime<Utc>>,
    ) -> Result<Option<(Vec<ReadRecord>, Option<DateTime<Utc>>)>, sqlx::Error> {
        let sql = format!(
            r#"UPDATE messages SET
                   read_by = CASE WHEN read_by @> jsonb_build_array(jsonb_build_object('user_id', $3::text))
                                  THEN read_by
                                  ELSE read_by || jsonb_build_array(jsonb_build_object('user_id', $3::text, 'read_at_us', $4::bigint))
                             END,
                   burned_at = CASE WHEN $5::timestamptz IS NULL THEN burned_at
                                    ELSE LEAST(coalesce(burned_at, 'infinity'::timestamptz), $5) END,
                   updated_at = now()
               WHERE {BY_ID} AND deleted_at IS NULL
               RETURNING read_by, burned_at"#
        );
        let updated: Option<Receipts> = sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(message_id)
            .bind(user_id)
            .bind(read_at.timestamp_micros())
            .bind(burn_at)
            .fetch_optional(&self.pool)
            .await?;
        Ok(updated.map(|receipts| (receipts.read_by, receipts.burned_at)))
    }

    /// Merges attributes into a message and, when `tags` is given, replaces its tags.
    pub async fn set_attributes(
        &self,
        tenant_id: &str,
        message_id: &str,
        attributes: &HashMap<String, String>,
        tags: Option<&[String]>,
        operation: &Operation,
    ) -> Result<bool, sqlx::Error> {
        let sql = format!(
            r#"UPDATE messages SET attributes = attributes || $3::jsonb,
                   tags = coalesce($4, tags), updated_at = now(),
                   operations = operations || jsonb_build_array($5::jsonb)
               WHERE {BY_ID} AND deleted_at IS NULL"#
        );
        let updated = sqlx::query(&sql)
            .bind(tenant_id)
            .bind(message_id)
            .bind(Json(escape_json_map(attributes)))
            .bind(tags)
            .bind(Json(operation))
            .execute(&self.pool)
            .await?;
        Ok(updated.rows_affected() > 0)
    }

    /// The tenant's distinct tags, sorted, at most `limit`.
    pub async fn tags(&self, tenant_id: &str, limit: i64) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            r#"SELECT DISTINCT tag FROM messages, unnest(tags) AS tag
               WHERE tenant_id = $1 AND deleted_at IS NULL ORDER BY tag LIMIT $2"#,
        )
        .bind(tenant_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// The newest message of each of `session_ids` that has any: one probe each of the id
    /// index's (tenant_id, session_id, seq), then of the one partition holding that message.
    pub async fn session_heads(
        &self,
        tenant_id: &str,
        session_ids: &[String],
    ) -> Result<Vec<SessionHead>, sqlx::Error> {
        sqlx::query_as(
            r#"SELECT k.session_id, m.seq AS last_seq, m.message_id AS last_message_id,
                      m.sender_id AS last_sender_id, m."timestamp" AS last_message_time,
                      m.message_type, m.content_type
               FROM UNNEST($2::text[]) AS k(session_id)
               CROSS JOIN LATERAL (
                   SELECT i.message_id, i."timestamp" FROM message_ids i
                   WHERE i.tenant_id = $1 AND i.session_id = k.session_id AND i.seq IS NOT NULL
                   ORDER BY i.seq DESC LIMIT 1) i
               JOIN messages m ON m.tenant_id = $1 AND m.message_id = i.message_id AND m."timestamp" = i."timestamp""#,
        )
        .bind(tenant_id)
        .bind(session_ids)
        .fetch_all(&self.pool)
        .await
    }

    /// `user_id`'s read seq in each of `session_ids`: the larger of the last read position
    /// recorded and the seq of the user's newest own message (0 when neither exists).
    pub async fn read_seqs(
        &self,
        tenant_id: &str,
        user_id: &str,
        session_ids: &[String],
    ) -> Result<HashMap<String, i64>, sqlx::Error> {
        // The own-message scan walks the session's seq index down to the recorded position
        // only: nothing below it can raise the read seq.
        let rows: Vec<(String, i64)> = sqlx::query_as(
            r#"SELECT k.session_id, GREATEST(r.read_seq,
                   (SELECT max(m.seq) FROM messages m
                    WHERE m.tenant_id = $1 AND m.session_id = k.session_id AND m.sender_id = $2
                      AND m.seq > r.read_seq))
               FROM UNNEST($3::text[]) AS k(session_id)
               CROSS JOIN LATERAL (SELECT coalesce((SELECT p.read_seq FROM read_positions p
                   WHERE p.tenant_id = $1 AND p.session_id = k.session_id AND p.user_id = $2), 0) AS read_seq) r"#,
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(session_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Records that `user_id` read `session_id` up to `read_seq`, never lowering what was
    /// recorded.
    pub async fn save_read_seq(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        read_seq: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            r#"INSERT INTO read_positions (tenant_id, session_id, user_id, read_seq) VALUES ($1, $2, $3, $4)
               ON CONFLICT (tenant_id, session_id, user_id) DO UPDATE
                   SET read_seq = GREATEST(read_positions.read_seq, EXCLUDED.read_seq), updated_at = now()"#,
        )
        .bind(tenant_id)
        .bind(session_id)
        .bind(user_id)
        .bind(read_seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many messages of each range `user_id` can see and did not send: not deleted,
    /// recalled or burned, not hidden or cleared for the user.
    pub async fn unread_counts(
        &self,
        tenant_id: &str,
        user_id: &str,
        ranges: &[UnreadRange],
    ) -> Result<HashMap<String, i64>, sqlx::Error> {
        let sessions: Vec<&str> = ranges.iter().map(|range| range.session_id.as_str()).collect();
        let reads: Vec<i64> = ranges.iter().map(|range| range.read_seq).collect();
        let lasts: Vec<i64> = ranges.iter().map(|range| range.last_seq).collect();
        let sql = format!(
            r#"SELECT k.session_id, (SELECT count(*) FROM messages
                   WHERE tenant_id = $1 AND session_id = k.session_id AND seq > k.read_seq AND seq <= k.last_seq
                     AND deleted_at IS NULL AND NOT is_recalled AND (burned_at IS NULL OR burned_at > now())
                     AND sender_id <> $2 {})
               FROM UNNEST($3::text[], $4::int8[], $5::int8[]) AS k(session_id, read_seq, last_seq)"#,
            user_filter(2)
        );
        let rows: Vec<(String, i64)> = sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(sessions)
            .bind(reads)
            .bind(lasts)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Every per-user view fact of a session (hides and clear watermarks).
    pub async fn session_views(&self, tenant_id: &str, session_id: &str) -> Result<SessionViews, sqlx::Error> {
        let hidden: Vec<(String, String)> =
            sqlx::query_as("SELECT user_id, message_id FROM message_hidden WHERE tenant_id = $1 AND session_id = $2")
                .bind(tenant_id)
                .bind(session_id)
                .fetch_all(&self.pool)
                .await?;
        let clears: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT user_id, cleared_before FROM session_clears WHERE tenant_id = $1 AND session_id = $2",
        )
        .bind(tenant_id)
        .bind(session_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(SessionViews { hidden, clears })
    }

    /// Messages matching a search, `limit` at most, in its time order, after its cursor.
    ///
    /// A text search reads search entries (`message_search`: the normal-form text of every
    /// message, indexed by time and by term) and then each match's message row for every
    /// other condition. It runs in up to two steps (three with order terms, below), because
    /// the database cannot read a term index in time order and cannot tell how many messages
    /// share several terms (its estimate multiplies their frequencies, and the trigrams of one
    /// word are anything but independent):
    /// 1. the newest [`RECENT_SCAN`] entries of the tenant (of its sessions, when the search
    ///    names them) in the time range are checked one by one, in time order — a text found in
    ///    more than about one message in 800 fills a page of 20 here;
    /// 2. otherwise, when there are more entries than that, the term index gives every
    ///    candidate (by order terms too unless the tenant has entries without them), checked
    ///    exactly and read in time order until the page is full.
    ///
    /// A search with three or more CJK characters in a row, whose order terms
    /// (`common::text_search::order_terms`) leave few candidates that are not matches, first
    /// reads every match when there are at most [`FEW_MATCHES`] — unless the tenant has entries
    /// without order terms: a rare text then costs its matches rather than the first step, and
    /// a common one pays up to that many reads more before the two steps.
    ///
    /// A text without terms (one or two Latin letters, punctuation) has no index to use and is
    /// checked entry by entry in time order; a search without text reads the messages alone.
    pub async fn search(&self, query: &SearchQuery, limit: i64) -> Result<Vec<StoredRow>, sqlx::Error> {
        if query.contains.is_empty() {
            return self.search_messages(query, limit).await;
        }
        let terms: Vec<String> =
            query.contains.iter().flat_map(|text| query_terms(text)).collect::<BTreeSet<_>>().into_iter().collect();
        if terms.is_empty() {
            return self.search_entries(query, limit, Entries::All).await;
        }
        let order: BTreeSet<String> = query.contains.iter().flat_map(|text| order_terms(text)).collect();
        let ordered = !order.is_empty() && !self.has_entries_without_order_terms(&query.tenant_id).await?;
        let terms: Vec<String> = if ordered { terms.into_iter().chain(order).collect() } else { terms };
        if ordered && let Some(found) = self.search_few(query, limit, &terms).await? {
            return Ok(found);
        }
        let recent = self.search_entries(query, limit, Entries::Newest(RECENT_SCAN)).await?;
        if recent.len() as i64 >= limit || !self.entries_exceed(query, RECENT_SCAN).await? {
            return Ok(recent);
        }
        self.search_entries(query, limit, Entries::Terms(&terms)).await
    }

    /// A search looked up by order terms whose matches are few: every entry of its scope
    /// holding `terms` and its texts, when there are at most [`FEW_MATCHES`], then their
    /// messages in time order until the page is full; `None` when there are more. It reads the
    /// matching entries and the few candidates order terms let through, at random.
    async fn search_few(
        &self,
        query: &SearchQuery,
        limit: i64,
        terms: &[String],
    ) -> Result<Option<Vec<StoredRow>>, sqlx::Error> {
        let mut sql: QueryBuilder<'_, Postgres> =
            QueryBuilder::new(r#"SELECT s.message_id, s."timestamp" FROM message_search s WHERE "#);
        push_entry_scope(&mut sql, query);
        sql.push(" AND s.terms @> ").push_bind(terms);
        push_substrings(&mut sql, query);
        sql.push(" LIMIT ").push_bind(FEW_MATCHES + 1);
        let matches: Vec<(String, DateTime<Utc>)> = sql.build_query_as().fetch_all(&self.pool).await?;
        if matches.len() as i64 > FEW_MATCHES {
            return Ok(None);
        }
        if matches.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let (ids, times): (Vec<String>, Vec<DateTime<Utc>>) = matches.into_iter().unzip();
        let direction = direction(query);
        // Sorted before the join, so the page's messages are read and no others.
        let mut sql: QueryBuilder<'_, Postgres> =
            QueryBuilder::new(format!("SELECT {COLUMNS} FROM (SELECT * FROM UNNEST("));
        sql.push_bind(ids).push("::text[], ").push_bind(times).push(format!(
            r#"::timestamptz[]) AS k(search_id, search_time) ORDER BY search_time {direction}, search_id {direction}) AS s
               CROSS JOIN LATERAL (SELECT * FROM messages
               WHERE messages.message_id = s.search_id AND messages."timestamp" = s.search_time AND "#
        ));
        push_conditions(&mut sql, query);
        sql.push(format!(" LIMIT 1) AS messages ORDER BY s.search_time {direction}, s.search_id {direction} LIMIT "))
            .push_bind(limit);
        Ok(Some(sql.build_query_as().fetch_all(&self.pool).await?))
    }

    /// A search without text: the messages of its scope in its time order.
    async fn search_messages(&self, query: &SearchQuery, limit: i64) -> Result<Vec<StoredRow>, sqlx::Error> {
        let mut sql: QueryBuilder<'_, Postgres> = QueryBuilder::new(format!("SELECT {COLUMNS} FROM messages WHERE "));
        push_conditions(&mut sql, query);
        sql.push(format!(" {} LIMIT ", order(query))).push_bind(limit);
        sql.build_query_as().fetch_all(&self.pool).await
    }

    /// The search entries `entries` selects, in time order, checked exactly for every text of
    /// the search, each joined to its message row for every other condition.
    async fn search_entries(
        &self,
        query: &SearchQuery,
        limit: i64,
        entries: Entries<'_>,
    ) -> Result<Vec<StoredRow>, sqlx::Error> {
        let direction = direction(query);
        let mut sql: QueryBuilder<'_, Postgres> = QueryBuilder::new(format!(
            r#"SELECT {COLUMNS} FROM (SELECT s.message_id AS search_id, s."timestamp" AS search_time, s.normal_text
               FROM message_search s WHERE "#
        ));
        push_entry_scope(&mut sql, query);
        if let Entries::Terms(terms) = entries {
            sql.push(" AND s.terms @> ").push_bind(terms);
        }
        sql.push(format!(r#" ORDER BY s."timestamp" {direction}, s.message_id {direction}"#));
        if let Entries::Newest(bound) = entries {
            // The texts are checked after the bound: the newest entries, not the newest matches.
            sql.push(" LIMIT ").push_bind(bound);
        }
        sql.push(
            r#") AS s CROSS JOIN LATERAL (SELECT * FROM messages WHERE messages.message_id = s.search_id
                   AND messages."timestamp" = s.search_time AND "#,
        );
        push_conditions(&mut sql, query);
        // LIMIT 1 (an id and time name one row) keeps the lookup a per-entry probe of the one
        // partition holding it: joined flat, the planner may hash-join against a scan of every
        // month of the tenant's messages (171 ms against 5 ms at 200,000 messages over 24
        // months).
        sql.push(" LIMIT 1) AS messages WHERE true");
        push_substrings(&mut sql, query);
        sql.push(format!(" ORDER BY s.search_time {direction}, s.search_id {direction} LIMIT ")).push_bind(limit);
        sql.build_query_as().fetch_all(&self.pool).await
    }

    /// Whether some search entry of the tenant was written without order terms (before they
    /// existed: migration `20261201000004`), so that a lookup by them would miss it. One probe
    /// of a partial index per month, empty but for such entries.
    async fn has_entries_without_order_terms(&self, tenant_id: &str) -> Result<bool, sqlx::Error> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM message_search WHERE tenant_id = $1 AND terms_version < {ORDER_TERMS_VERSION})"
        );
        sqlx::query_scalar(&sql).bind(tenant_id).fetch_one(&self.pool).await
    }

    /// Whether there are more than `bound` search entries in the search's entry scope.
    async fn entries_exceed(&self, query: &SearchQuery, bound: i64) -> Result<bool, sqlx::Error> {
        let mut sql: QueryBuilder<'_, Postgres> =
            QueryBuilder::new("SELECT EXISTS (SELECT 1 FROM message_search s WHERE ");
        push_entry_scope(&mut sql, query);
        sql.push(" OFFSET ").push_bind(bound).push(" LIMIT 1)");
        sql.build_query_scalar().fetch_one(&self.pool).await
    }

    /// Physically removes the content of up to `limit` messages whose burn time has passed
    /// (reads already hide it by time). Rows another instance is wiping are skipped, so every
    /// reader can run this. Returns how many were wiped.
    pub async fn wipe_burned(&self, limit: i64, strip: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Result<u64, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let due: Vec<(String, String, DateTime<Utc>, Vec<u8>)> = sqlx::query_as(
            r#"SELECT tenant_id, message_id, "timestamp", payload FROM messages
               WHERE burned_at <= now() AND content IS NOT NULL
               LIMIT $1 FOR UPDATE SKIP LOCKED"#,
        )
        .bind(limit)
        .fetch_all(&mut *transaction)
        .await?;
        let mut wiped = 0;
        let mut by_tenant: HashMap<String, Vec<String>> = HashMap::new();
        for (tenant_id, message_id, timestamp, payload) in due {
            // A payload that does not decode keeps its bytes but loses its content columns.
            let payload = strip(&payload).unwrap_or(payload);
            wiped += sqlx::query(
                r#"UPDATE messages SET content = NULL, payload = $4, updated_at = now()
                   WHERE tenant_id = $1 AND message_id = $2 AND "timestamp" = $3"#,
            )
            .bind(&tenant_id)
            .bind(&message_id)
            .bind(timestamp)
            .bind(payload)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            by_tenant.entry(tenant_id).or_default().push(message_id);
        }
        for (tenant_id, message_ids) in by_tenant {
            unindex(&mut transaction, &tenant_id, &message_ids).await?;
        }
        transaction.commit().await?;
        Ok(wiped)
    }
}

/// Removes messages' search entries. Run after the statement that changed the messages, in its
/// transaction: a search indexer holding a message (`FOR SHARE`) made that statement wait, so
/// this later statement sees the entry the indexer committed.
async fn unindex(
    transaction: &mut sqlx::Transaction<'_, Postgres>,
    tenant_id: &str,
    message_ids: &[String],
) -> Result<(), sqlx::Error> {
    if message_ids.is_empty() {
        return Ok(());
    }
    // By id alone, in every month: a hypertable of an earlier version may hold an id twice,
    // and every entry of it must go.
    sqlx::query("DELETE FROM message_search WHERE tenant_id = $1 AND message_id = ANY($2)")
        .bind(tenant_id)
        .bind(message_ids)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// Search entries a text search's first step checks one by one, in time order, before it
/// asks the term index. The two steps cost about the same where they meet: a text found in a
/// share `f` of a tenant's `n` messages costs `limit / f` entries read in time order or
/// `f × n` candidates read from random pages (several times dearer each), ~16,000 entries at a
/// million messages for a page of 20 (measured: docs/BENCHMARKS.md, search).
const RECENT_SCAN: i64 = 16_000;

/// Most matches [`PostgresStore::search_few`] reads before it leaves a search to the two steps.
/// Its reads are at random (~10–50 µs each, docs/BENCHMARKS.md): 200 of them cost a fraction
/// of the first step's [`RECENT_SCAN`] entries, the price a common text pays for trying, and
/// hold every match of the rare texts this is for (the slowest four-character query of the
/// search benchmark had 129 over a million messages).
const FEW_MATCHES: i64 = 200;

/// The search entries a step of a text search reads.
#[derive(Clone, Copy)]
enum Entries<'a> {
    /// The newest, at most this many.
    Newest(i64),
    /// Those holding all these terms.
    Terms(&'a [String]),
    /// Every one.
    All,
}

/// The SQL direction of a search's time order.
fn direction(query: &SearchQuery) -> &'static str {
    if query.ascending { "ASC" } else { "DESC" }
}

/// `ORDER BY` of a search's time order.
fn order(query: &SearchQuery) -> String {
    let direction = direction(query);
    format!(r#"ORDER BY "timestamp" {direction}, message_id {direction}"#)
}

/// The exact check of every searched text on the search entry `s`, in normal form.
fn push_substrings<'a>(sql: &mut QueryBuilder<'a, Postgres>, query: &'a SearchQuery) {
    for text in &query.contains {
        sql.push(" AND strpos(s.normal_text, ").push_bind(text).push(") > 0");
    }
}

/// Every condition of a search on the `messages` row but its text: the tenant, what is gone
/// (deleted for everyone, hidden or cleared for the acting user, and for a text search
/// recalled or burned content), the filters, the time range and the cursor.
fn push_conditions<'a>(sql: &mut QueryBuilder<'a, Postgres>, query: &'a SearchQuery) {
    sql.push("messages.tenant_id = ").push_bind(&query.tenant_id).push(" AND deleted_at IS NULL");
    if !query.contains.is_empty() {
        sql.push(" AND NOT is_recalled AND (burned_at IS NULL OR burned_at > now())");
    }
    push_among(sql, "session_id", &query.session_id);
    push_among(sql, "sender_id", &query.sender_id);
    push_among(sql, "business_type", &query.business_type);
    if let Some(include) = &query.message_type.include {
        sql.push(" AND message_type = ANY(").push_bind(include).push(")");
    }
    if !query.message_type.exclude.is_empty() {
        sql.push(" AND NOT (message_type = ANY(").push_bind(&query.message_type.exclude).push("))");
    }
    if let Some(include) = &query.tags.include {
        sql.push(" AND tags && ").push_bind(include);
    }
    if !query.tags.exclude.is_empty() {
        sql.push(" AND NOT (tags && ").push_bind(&query.tags.exclude).push(")");
    }
    for (comparison, value) in &query.seq {
        sql.push(format!(" AND seq {} ", comparison.sql())).push_bind(*value);
    }
    push_time_bounds(sql, query, "");
    if !query.user.is_empty() {
        sql.push(
            " AND NOT EXISTS (SELECT 1 FROM message_hidden h WHERE h.tenant_id = messages.tenant_id AND h.user_id = ",
        )
        .push_bind(&query.user)
        .push(
            r#" AND h.message_id = messages.message_id) AND "timestamp" > coalesce((SELECT c.cleared_before
            FROM session_clears c WHERE c.tenant_id = messages.tenant_id AND c.session_id = messages.session_id
            AND c.user_id = "#,
        )
        .push_bind(&query.user)
        .push("), '-infinity'::timestamptz)");
    }
}

/// The search entries a search can match at all: the tenant's, of the named sessions, in the
/// time range, after the cursor.
fn push_entry_scope<'a>(sql: &mut QueryBuilder<'a, Postgres>, query: &'a SearchQuery) {
    sql.push("s.tenant_id = ").push_bind(&query.tenant_id);
    if let Some(sessions) = &query.session_id.include {
        sql.push(" AND s.session_id = ANY(").push_bind(sessions).push(")");
    }
    push_time_bounds(sql, query, "s.");
}

/// A search's time range and cursor on the `timestamp` and `message_id` of the table `alias`
/// names (`"s."`, or `""` for `messages`).
fn push_time_bounds<'a>(sql: &mut QueryBuilder<'a, Postgres>, query: &'a SearchQuery, alias: &str) {
    if let Some(from) = query.from {
        sql.push(format!(r#" AND {alias}"timestamp" >= "#)).push_bind(from);
    }
    if let Some(to) = query.to {
        sql.push(format!(r#" AND {alias}"timestamp" <= "#)).push_bind(to);
    }
    if let Some(after) = &query.after {
        let comparison = if query.ascending { ">" } else { "<" };
        sql.push(format!(r#" AND ({alias}"timestamp", {alias}message_id) {comparison} ("#))
            .push_bind(after.timestamp)
            .push(", ")
            .push_bind(&after.message_id)
            .push(")");
    }
}

fn push_among<'a>(sql: &mut QueryBuilder<'a, Postgres>, column: &str, among: &'a Among<String>) {
    if let Some(include) = &among.include {
        sql.push(format!(" AND {column} = ANY(")).push_bind(include).push(")");
    }
    if !among.exclude.is_empty() {
        sql.push(format!(" AND NOT ({column} = ANY(")).push_bind(&among.exclude).push("))");
    }
}
