//! The stores the reader answers from: the Redis hot window (`redis`) in front of the
//! databases, MongoDB (`mongo`, the realtime store) and PostgreSQL (`postgres`, the archive).
//! At least one database is configured. Reads ask MongoDB first and fall back to Postgres when
//! MongoDB fails or does not hold the message; commands change every configured database, in
//! the same order, so the store reads go to first is the first to show the change.

pub mod mongo;
pub mod postgres;
pub mod redis;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use tracing::warn;

use flare_storage_common::keys::{SessionKeys, clear_view_field, hidden_view_field};

use crate::error::Error;
use crate::search::SearchQuery;
use mongo::{Merge, MongoStore};
use postgres::{
    Operation, PostgresStore, ReadRecord, SessionHead, SessionPage, SessionViews, StoredRow, TargetRow, UnreadRange,
};

#[derive(Clone)]
pub struct Databases {
    pub mongo: Option<MongoStore>,
    pub postgres: Option<PostgresStore>,
}

impl Databases {
    /// The first answer in read order; a failing MongoDB is passed over when Postgres is there.
    async fn read<T>(
        &self,
        from_mongo: impl AsyncFnOnce(&MongoStore) -> Result<T, Error>,
        from_postgres: impl AsyncFnOnce(&PostgresStore) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.read_unless(from_mongo, from_postgres, |_| false).await
    }

    /// Like `read`, and a message MongoDB does not hold is looked for in Postgres too (it
    /// may keep more history, or have it before MongoDB does).
    async fn read_found<T>(
        &self,
        from_mongo: impl AsyncFnOnce(&MongoStore) -> Result<Option<T>, Error>,
        from_postgres: impl AsyncFnOnce(&PostgresStore) -> Result<Option<T>, Error>,
    ) -> Result<Option<T>, Error> {
        self.read_unless(from_mongo, from_postgres, Option::is_none).await
    }

    /// MongoDB's answer, unless it failed or `ask_postgres` says Postgres should be asked as
    /// well — and Postgres is there to ask.
    async fn read_unless<T>(
        &self,
        from_mongo: impl AsyncFnOnce(&MongoStore) -> Result<T, Error>,
        from_postgres: impl AsyncFnOnce(&PostgresStore) -> Result<T, Error>,
        ask_postgres: impl Fn(&T) -> bool,
    ) -> Result<T, Error> {
        if let Some(mongo) = &self.mongo {
            match from_mongo(mongo).await {
                Ok(answer) if self.postgres.is_none() || !ask_postgres(&answer) => return Ok(answer),
                Ok(_) => {}
                Err(error) if self.postgres.is_some() => {
                    warn!(error = %error.cause(), "MongoDB read failed; reading from Postgres");
                }
                Err(error) => return Err(error),
            }
        }
        match &self.postgres {
            Some(postgres) => from_postgres(postgres).await,
            None => Err(Error::NoDatabase),
        }
    }

    /// Applies a change to every database, MongoDB first; the answers in that order. A
    /// failure stops there: the command fails and, being idempotent, completes when retried.
    async fn change<T>(
        &self,
        in_mongo: impl AsyncFnOnce(&MongoStore) -> Result<T, Error>,
        in_postgres: impl AsyncFnOnce(&PostgresStore) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let mut answers = Vec::with_capacity(2);
        if let Some(mongo) = &self.mongo {
            answers.push(in_mongo(mongo).await?);
        }
        if let Some(postgres) = &self.postgres {
            answers.push(in_postgres(postgres).await?);
        }
        Ok(answers)
    }

    pub async fn message(&self, tenant_id: &str, message_id: &str, user: &str) -> Result<Option<StoredRow>, Error> {
        self.read_found(
            async |mongo| Ok(mongo.message(tenant_id, message_id, user).await?),
            async |postgres| Ok(postgres.message(tenant_id, message_id, user).await?),
        )
        .await
    }

    pub async fn target(&self, tenant_id: &str, message_id: &str) -> Result<Option<TargetRow>, Error> {
        self.read_found(
            async |mongo| Ok(mongo.target(tenant_id, message_id).await?),
            async |postgres| Ok(postgres.target(tenant_id, message_id).await?),
        )
        .await
    }

    /// The messages of these ids that are stored (deleted ones too), each once: MongoDB's,
    /// and PostgreSQL's of those MongoDB does not hold (as [`Self::target`] does per id).
    pub async fn targets(&self, tenant_id: &str, message_ids: &[String]) -> Result<Vec<TargetRow>, Error> {
        let mut found = Vec::new();
        if let Some(mongo) = &self.mongo {
            match mongo.targets(tenant_id, message_ids).await {
                Ok(rows) => found = rows,
                Err(error) if self.postgres.is_some() => {
                    warn!(error = %error, "MongoDB read failed; reading from Postgres");
                }
                Err(error) => return Err(error.into()),
            }
        }
        let held: std::collections::HashSet<&str> = found.iter().map(|target| target.row.message_id.as_str()).collect();
        let mut missing: Vec<String> = message_ids.iter().filter(|id| !held.contains(id.as_str())).cloned().collect();
        missing.sort_unstable();
        missing.dedup();
        match &self.postgres {
            Some(postgres) if !missing.is_empty() => found.extend(postgres.targets(tenant_id, &missing).await?),
            None if self.mongo.is_none() => return Err(Error::NoDatabase),
            _ => {}
        }
        Ok(found)
    }

    pub async fn newest(&self, tenant_id: &str, session_id: &str, limit: i64) -> Result<Vec<StoredRow>, Error> {
        self.read(
            async |mongo| Ok(mongo.newest(tenant_id, session_id, limit).await?),
            async |postgres| Ok(postgres.newest(tenant_id, session_id, limit).await?),
        )
        .await
    }

    pub async fn seq_range(
        &self,
        tenant_id: &str,
        session_id: &str,
        after: i64,
        before: i64,
        limit: i64,
        user: &str,
    ) -> Result<Vec<StoredRow>, Error> {
        self.read(
            async |mongo| Ok(mongo.seq_range(tenant_id, session_id, after, before, limit, user).await?),
            async |postgres| Ok(postgres.seq_range(tenant_id, session_id, after, before, limit, user).await?),
        )
        .await
    }

    pub async fn session_page(&self, page: SessionPage<'_>) -> Result<Vec<StoredRow>, Error> {
        self.read(
            async |mongo| Ok(mongo.session_page(page).await?),
            async |postgres| Ok(postgres.session_page(page).await?),
        )
        .await
    }

    pub async fn tags(&self, tenant_id: &str, limit: i64) -> Result<Vec<String>, Error> {
        self.read(
            async |mongo| Ok(mongo.tags(tenant_id, limit).await?),
            async |postgres| Ok(postgres.tags(tenant_id, limit).await?),
        )
        .await
    }

    pub async fn session_views(&self, tenant_id: &str, session_id: &str) -> Result<SessionViews, Error> {
        self.read(
            async |mongo| Ok(mongo.session_views(tenant_id, session_id).await?),
            async |postgres| Ok(postgres.session_views(tenant_id, session_id).await?),
        )
        .await
    }

    pub async fn session_heads(&self, tenant_id: &str, session_ids: &[String]) -> Result<Vec<SessionHead>, Error> {
        self.read(
            async |mongo| Ok(mongo.session_heads(tenant_id, session_ids).await?),
            async |postgres| Ok(postgres.session_heads(tenant_id, session_ids).await?),
        )
        .await
    }

    pub async fn read_seqs(
        &self,
        tenant_id: &str,
        user_id: &str,
        session_ids: &[String],
    ) -> Result<HashMap<String, i64>, Error> {
        self.read(
            async |mongo| Ok(mongo.read_seqs(tenant_id, user_id, session_ids).await?),
            async |postgres| Ok(postgres.read_seqs(tenant_id, user_id, session_ids).await?),
        )
        .await
    }

    pub async fn unread_counts(
        &self,
        tenant_id: &str,
        user_id: &str,
        ranges: &[UnreadRange],
    ) -> Result<HashMap<String, i64>, Error> {
        self.read(
            async |mongo| Ok(mongo.unread_counts(tenant_id, user_id, ranges).await?),
            async |postgres| Ok(postgres.unread_counts(tenant_id, user_id, ranges).await?),
        )
        .await
    }

    /// Records a read position in every database, never lowering one.
    pub async fn save_read_seq(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        read_seq: i64,
    ) -> Result<(), Error> {
        self.change(
            async |mongo| Ok(mongo.save_read_seq(tenant_id, session_id, user_id, read_seq).await?),
            async |postgres| Ok(postgres.save_read_seq(tenant_id, session_id, user_id, read_seq).await?),
        )
        .await
        .map(drop)
    }

    pub async fn search(&self, query: &SearchQuery, limit: i64) -> Result<Vec<StoredRow>, Error> {
        self.read(
            async |mongo| Ok(mongo.search(query, limit).await?),
            async |postgres| Ok(postgres.search(query, limit).await?),
        )
        .await
    }

    /// Soft-deletes for everyone; returns the ids newly deleted in any database.
    pub async fn delete_for_everyone(
        &self,
        tenant_id: &str,
        session_id: &str,
        message_ids: &[String],
        operation: &Operation,
    ) -> Result<Vec<String>, Error> {
        let answers = self
            .change(
                async |mongo| Ok(mongo.delete_for_everyone(tenant_id, session_id, message_ids, operation).await?),
                async |postgres| {
                    Ok(postgres.delete_for_everyone(tenant_id, session_id, message_ids, operation).await?)
                },
            )
            .await?;
        let mut deleted: Vec<String> = answers.into_iter().flatten().collect();
        deleted.sort_unstable();
        deleted.dedup();
        Ok(deleted)
    }

    /// Recalls; the recall time when any database newly recalled it.
    pub async fn recall(
        &self,
        tenant_id: &str,
        message_id: &str,
        recalled_at: DateTime<Utc>,
        payload_without_content: &[u8],
        operation: &Operation,
    ) -> Result<Option<DateTime<Utc>>, Error> {
        let answers = self
            .change(
                async |mongo| {
                    Ok(mongo.recall(tenant_id, message_id, recalled_at, payload_without_content, operation).await?)
                },
                async |postgres| {
                    Ok(postgres.recall(tenant_id, message_id, recalled_at, payload_without_content, operation).await?)
                },
            )
            .await?;
        Ok(answers.into_iter().flatten().next())
    }

    pub async fn hide_for_user(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        message_id: &str,
        permanent: bool,
    ) -> Result<bool, Error> {
        let answers = self
            .change(
                async |mongo| Ok(mongo.hide_for_user(tenant_id, session_id, user_id, message_id, permanent).await?),
                async |postgres| {
                    Ok(postgres.hide_for_user(tenant_id, session_id, user_id, message_id, permanent).await?)
                },
            )
            .await?;
        Ok(answers.into_iter().any(|newly| newly))
    }

    /// Raises the clear watermark; the watermark and count of the first database.
    pub async fn clear_session(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        before: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, i64), Error> {
        let answers = self
            .change(
                async |mongo| Ok(mongo.clear_session(tenant_id, session_id, user_id, before).await?),
                async |postgres| Ok(postgres.clear_session(tenant_id, session_id, user_id, before).await?),
            )
            .await?;
        answers.into_iter().next().ok_or(Error::NoDatabase)
    }

    /// Records a read; the receipts and burn time of the first database (`None` when the
    /// message is gone there).
    pub async fn mark_read(
        &self,
        tenant_id: &str,
        message_id: &str,
        user_id: &str,
        read_at: DateTime<Utc>,
        burn_at: Option<DateTime<Utc>>,
    ) -> Result<Option<(Json<Vec<ReadRecord>>, Option<DateTime<Utc>>)>, Error> {
        let answers = self
            .change(
                async |mongo| Ok(mongo.mark_read(tenant_id, message_id, user_id, read_at, burn_at).await?),
                async |postgres| Ok(postgres.mark_read(tenant_id, message_id, user_id, read_at, burn_at).await?),
            )
            .await?;
        Ok(answers.into_iter().next().flatten())
    }

    pub async fn set_attributes(
        &self,
        tenant_id: &str,
        message_id: &str,
        attributes: &HashMap<String, String>,
        tags: Option<&[String]>,
        operation: &Operation,
    ) -> Result<bool, Error> {
        let answers = self
            .change(
                async |mongo| match mongo.set_attributes(tenant_id, message_id, attributes, tags, operation).await? {
                    Merge::Done => Ok(true),
                    Merge::NotFound => Ok(false),
                    Merge::Contended => Err(Error::Aborted("the message's attributes kept changing concurrently")),
                },
                async |postgres| {
                    Ok(postgres.set_attributes(tenant_id, message_id, attributes, tags, operation).await?)
                },
            )
            .await?;
        Ok(answers.into_iter().any(|updated| updated))
    }

    /// Wipes burned content in every database; how many messages were wiped in all.
    pub async fn wipe_burned(&self, limit: i64, strip: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Result<u64, Error> {
        let answers = self
            .change(
                async |mongo| Ok(mongo.wipe_burned(limit, &strip).await?),
                async |postgres| Ok(postgres.wipe_burned(limit, &strip).await?),
            )
            .await?;
        Ok(answers.into_iter().sum())
    }

    /// Whether reads can be served: some database answers.
    pub async fn answers(&self) -> bool {
        if let Some(mongo) = &self.mongo
            && mongo.ping().await.is_ok()
        {
            return true;
        }
        match &self.postgres {
            Some(postgres) => sqlx::query("SELECT 1").execute(postgres.pool()).await.is_ok(),
            None => false,
        }
    }
}

/// Copies a session's per-user views (hides, clear watermarks) from the databases into the
/// cache, so window reads can filter for any user.
pub async fn load_views(
    databases: &Databases,
    cache: &redis::RedisCache,
    keys: &SessionKeys,
    tenant_id: &str,
    session_id: &str,
) -> Result<(), Error> {
    let views = databases.session_views(tenant_id, session_id).await?;
    let mut facts: Vec<(String, String)> = views
        .hidden
        .into_iter()
        .map(|(user, message_id)| (hidden_view_field(&user, &message_id), "1".to_owned()))
        .collect();
    facts.extend(
        views.clears.into_iter().map(|(user, before)| (clear_view_field(&user), before.timestamp_micros().to_string())),
    );
    // A failed load only means the next read asks again.
    let _ = cache.merge_views(keys, &facts, true).await;
    Ok(())
}
