//! PostgreSQL / TimescaleDB reads. Every statement is scoped by tenant_id and skips messages
//! deleted for everyone.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

/// The stored payload and the columns that may have changed since it was written.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredRow {
    pub message_id: String,
    #[sqlx(rename = "timestamp")]
    pub timestamp: DateTime<Utc>,
    pub payload: Vec<u8>,
    pub seq: Option<i64>,
    pub status: String,
    pub is_recalled: bool,
    pub recalled_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    pub attributes: Json<HashMap<String, String>>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str =
    r#"message_id, "timestamp", payload, seq, status, is_recalled, recalled_at, tags, attributes, created_at"#;

/// Where a page of a session's history starts: strictly older than this message.
pub struct Before<'a> {
    pub timestamp: DateTime<Utc>,
    pub message_id: &'a str,
}

impl PostgresStore {
    pub fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_lazy(url)?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn message(&self, tenant_id: &str, message_id: &str) -> Result<Option<StoredRow>, sqlx::Error> {
        let sql = format!(
            r#"SELECT {COLUMNS} FROM messages
               WHERE tenant_id = $1 AND message_id = $2 AND deleted_at IS NULL
               ORDER BY "timestamp" LIMIT 1"#
        );
        sqlx::query_as(&sql).bind(tenant_id).bind(message_id).fetch_optional(&self.pool).await
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
    ) -> Result<Vec<StoredRow>, sqlx::Error> {
        let sql = format!(
            r#"SELECT {COLUMNS} FROM messages
               WHERE tenant_id = $1 AND session_id = $2 AND deleted_at IS NULL
                 AND seq > $3 AND seq < $4
               ORDER BY seq
               LIMIT $5"#
        );
        sqlx::query_as(&sql)
            .bind(tenant_id)
            .bind(session_id)
            .bind(after)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
    }

    /// Up to `limit` messages of a session in [from, to], newest first, older than `before`.
    pub async fn session_page(
        &self,
        tenant_id: &str,
        session_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        before: Option<Before<'_>>,
        limit: i64,
    ) -> Result<Vec<StoredRow>, sqlx::Error> {
        // The row comparison matches the (tenant_id, session_id, "timestamp" DESC,
        // message_id DESC) index, so each page is one index range scan (keyset paging). The
        // first page gets its own statement: an `$5 IS NULL OR …` condition would keep a
        // generic plan from using the cursor as an index bound.
        let cursor_condition = if before.is_some() { r#"AND ("timestamp", message_id) < ($6, $7)"# } else { "" };
        let sql = format!(
            r#"SELECT {COLUMNS} FROM messages
               WHERE tenant_id = $1 AND session_id = $2 AND deleted_at IS NULL
                 AND "timestamp" >= $3 AND "timestamp" <= $4 {cursor_condition}
               ORDER BY "timestamp" DESC, message_id DESC
               LIMIT $5"#
        );
        let mut query = sqlx::query_as(&sql).bind(tenant_id).bind(session_id).bind(from).bind(to).bind(limit);
        if let Some(before) = before {
            query = query.bind(before.timestamp).bind(before.message_id);
        }
        query.fetch_all(&self.pool).await
    }
}
