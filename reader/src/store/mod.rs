//! The stores the reader answers from: the Redis hot window (`redis`) in front of the
//! databases, MongoDB (`mongo`, the realtime store) and PostgreSQL (`postgres`, the archive).
//! At least one database is configured. Reads ask MongoDB first and fall back to Postgres when
//! MongoDB fails or does not hold the message; commands change every configured database, in
//! the same order, so the store reads go to first is the first to show the change.

pub mod mongo;
pub mod postgres;
pub mod redis;
pub mod rows;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tracing::warn;

use flare_storage_common::keys::{SessionKeys, clear_view_field, hidden_view_field};

use crate::error::Error;
use crate::search::SearchQuery;
use mongo::{Merge, MongoStore};
use postgres::PostgresStore;
use rows::{Operation, ReadRecord, SessionHead, SessionPage, SessionViews, StoredRow, TargetRow, UnreadRange};

/// One configured database. Each operation is one `match`: the two answer alike, and how each
/// does it lives in its module.
#[derive(Clone)]
pub enum Database {
    Mongo(MongoStore),
    Postgres(PostgresStore),
}

impl Database {
    fn name(&self) -> &'static str {
        match self {
            Self::Mongo(_) => "MongoDB",
            Self::Postgres(_) => "PostgreSQL",
        }
    }

    async fn message(&self, tenant_id: &str, message_id: &str, user: &str) -> Result<Option<StoredRow>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.message(tenant_id, message_id, user).await?,
            Self::Postgres(postgres) => postgres.message(tenant_id, message_id, user).await?,
        })
    }

    async fn target(&self, tenant_id: &str, message_id: &str) -> Result<Option<TargetRow>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.target(tenant_id, message_id).await?,
            Self::Postgres(postgres) => postgres.target(tenant_id, message_id).await?,
        })
    }

    async fn targets(&self, tenant_id: &str, message_ids: &[String]) -> Result<Vec<TargetRow>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.targets(tenant_id, message_ids).await?,
            Self::Postgres(postgres) => postgres.targets(tenant_id, message_ids).await?,
        })
    }

    async fn newest(&self, tenant_id: &str, session_id: &str, limit: i64) -> Result<Vec<StoredRow>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.newest(tenant_id, session_id, limit).await?,
            Self::Postgres(postgres) => postgres.newest(tenant_id, session_id, limit).await?,
        })
    }

    async fn seq_range(
        &self,
        tenant_id: &str,
        session_id: &str,
        after: i64,
        before: i64,
        limit: i64,
        user: &str,
    ) -> Result<Vec<StoredRow>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.seq_range(tenant_id, session_id, after, before, limit, user).await?,
            Self::Postgres(postgres) => postgres.seq_range(tenant_id, session_id, after, before, limit, user).await?,
        })
    }

    async fn session_page(&self, page: SessionPage<'_>) -> Result<Vec<StoredRow>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.session_page(page).await?,
            Self::Postgres(postgres) => postgres.session_page(page).await?,
        })
    }

    async fn tags(&self, tenant_id: &str, limit: i64) -> Result<Vec<String>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.tags(tenant_id, limit).await?,
            Self::Postgres(postgres) => postgres.tags(tenant_id, limit).await?,
        })
    }

    async fn session_views(&self, tenant_id: &str, session_id: &str) -> Result<SessionViews, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.session_views(tenant_id, session_id).await?,
            Self::Postgres(postgres) => postgres.session_views(tenant_id, session_id).await?,
        })
    }

    async fn session_heads(&self, tenant_id: &str, session_ids: &[String]) -> Result<Vec<SessionHead>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.session_heads(tenant_id, session_ids).await?,
            Self::Postgres(postgres) => postgres.session_heads(tenant_id, session_ids).await?,
        })
    }

    async fn read_seqs(
        &self,
        tenant_id: &str,
        user_id: &str,
        session_ids: &[String],
    ) -> Result<HashMap<String, i64>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.read_seqs(tenant_id, user_id, session_ids).await?,
            Self::Postgres(postgres) => postgres.read_seqs(tenant_id, user_id, session_ids).await?,
        })
    }

    async fn unread_counts(
        &self,
        tenant_id: &str,
        user_id: &str,
        ranges: &[UnreadRange],
    ) -> Result<HashMap<String, i64>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.unread_counts(tenant_id, user_id, ranges).await?,
            Self::Postgres(postgres) => postgres.unread_counts(tenant_id, user_id, ranges).await?,
        })
    }

    async fn save_read_seq(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        read_seq: i64,
    ) -> Result<(), Error> {
        match self {
            Self::Mongo(mongo) => mongo.save_read_seq(tenant_id, session_id, user_id, read_seq).await?,
            Self::Postgres(postgres) => postgres.save_read_seq(tenant_id, session_id, user_id, read_seq).await?,
        }
        Ok(())
    }

    async fn search(&self, query: &SearchQuery, limit: i64) -> Result<Vec<StoredRow>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.search(query, limit).await?,
            Self::Postgres(postgres) => postgres.search(query, limit).await?,
        })
    }

    async fn delete_for_everyone(
        &self,
        tenant_id: &str,
        session_id: &str,
        message_ids: &[String],
        operation: &Operation,
    ) -> Result<Vec<String>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.delete_for_everyone(tenant_id, session_id, message_ids, operation).await?,
            Self::Postgres(postgres) => {
                postgres.delete_for_everyone(tenant_id, session_id, message_ids, operation).await?
            }
        })
    }

    async fn recall(
        &self,
        tenant_id: &str,
        message_id: &str,
        recalled_at: DateTime<Utc>,
        payload_without_content: &[u8],
        operation: &Operation,
    ) -> Result<Option<DateTime<Utc>>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => {
                mongo.recall(tenant_id, message_id, recalled_at, payload_without_content, operation).await?
            }
            Self::Postgres(postgres) => {
                postgres.recall(tenant_id, message_id, recalled_at, payload_without_content, operation).await?
            }
        })
    }

    async fn hide_for_user(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        message_id: &str,
        permanent: bool,
    ) -> Result<bool, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.hide_for_user(tenant_id, session_id, user_id, message_id, permanent).await?,
            Self::Postgres(postgres) => {
                postgres.hide_for_user(tenant_id, session_id, user_id, message_id, permanent).await?
            }
        })
    }

    async fn clear_session(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        before: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, i64), Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.clear_session(tenant_id, session_id, user_id, before).await?,
            Self::Postgres(postgres) => postgres.clear_session(tenant_id, session_id, user_id, before).await?,
        })
    }

    async fn mark_read(
        &self,
        tenant_id: &str,
        message_id: &str,
        user_id: &str,
        read_at: DateTime<Utc>,
        burn_at: Option<DateTime<Utc>>,
    ) -> Result<Option<(Vec<ReadRecord>, Option<DateTime<Utc>>)>, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.mark_read(tenant_id, message_id, user_id, read_at, burn_at).await?,
            Self::Postgres(postgres) => postgres.mark_read(tenant_id, message_id, user_id, read_at, burn_at).await?,
        })
    }

    /// Whether the message was found and changed.
    async fn set_attributes(
        &self,
        tenant_id: &str,
        message_id: &str,
        attributes: &HashMap<String, String>,
        tags: Option<&[String]>,
        operation: &Operation,
    ) -> Result<bool, Error> {
        match self {
            Self::Mongo(mongo) => match mongo.set_attributes(tenant_id, message_id, attributes, tags, operation).await?
            {
                Merge::Done => Ok(true),
                Merge::NotFound => Ok(false),
                Merge::Contended => Err(Error::Aborted("the message's attributes kept changing concurrently")),
            },
            Self::Postgres(postgres) => {
                Ok(postgres.set_attributes(tenant_id, message_id, attributes, tags, operation).await?)
            }
        }
    }

    async fn wipe_burned(&self, limit: i64, strip: &impl Fn(&[u8]) -> Option<Vec<u8>>) -> Result<u64, Error> {
        Ok(match self {
            Self::Mongo(mongo) => mongo.wipe_burned(limit, strip).await?,
            Self::Postgres(postgres) => postgres.wipe_burned(limit, strip).await?,
        })
    }

    async fn answers(&self) -> bool {
        match self {
            Self::Mongo(mongo) => mongo.ping().await.is_ok(),
            Self::Postgres(postgres) => sqlx::query("SELECT 1").execute(postgres.pool()).await.is_ok(),
        }
    }
}

/// The configured databases, in read order: MongoDB (the realtime store) first, then
/// PostgreSQL (the archive).
#[derive(Clone)]
pub struct Databases {
    stores: Vec<Database>,
}

impl Databases {
    /// At least one of them: configuration guarantees it.
    pub fn new(mongo: Option<MongoStore>, postgres: Option<PostgresStore>) -> Self {
        let stores = mongo.map(Database::Mongo).into_iter().chain(postgres.map(Database::Postgres)).collect();
        Self { stores }
    }

    /// The first answer in read order; a failing database is passed over when another follows.
    async fn read<'a, T, F>(&'a self, read: impl Fn(&'a Database) -> F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        self.read_unless(read, |_| false).await
    }

    /// Like `read`, and a message one database does not hold is looked for in the next (the
    /// archive may keep more history, or have it before the realtime store does).
    async fn read_found<'a, T, F>(&'a self, read: impl Fn(&'a Database) -> F) -> Result<Option<T>, Error>
    where
        F: Future<Output = Result<Option<T>, Error>>,
    {
        self.read_unless(read, Option::is_none).await
    }

    /// The first database's answer, unless it failed or `ask_next` says the next should be
    /// asked as well — and there is a next to ask.
    async fn read_unless<'a, T, F>(
        &'a self,
        read: impl Fn(&'a Database) -> F,
        ask_next: impl Fn(&T) -> bool,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let mut stores = self.stores.iter().peekable();
        while let Some(store) = stores.next() {
            let last = stores.peek().is_none();
            match read(store).await {
                Ok(answer) if last || !ask_next(&answer) => return Ok(answer),
                Ok(_) => {}
                Err(error) if !last => {
                    warn!(error = %error.cause(), database = store.name(), "read failed; reading from the next database");
                }
                Err(error) => return Err(error),
            }
        }
        Err(Error::NoDatabase)
    }

    /// Applies a change to every database in read order; the answers in that order. A failure
    /// stops there: the command fails and, being idempotent, completes when retried.
    async fn change<'a, T, F>(&'a self, change: impl Fn(&'a Database) -> F) -> Result<Vec<T>, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        let mut answers = Vec::with_capacity(self.stores.len());
        for store in &self.stores {
            answers.push(change(store).await?);
        }
        Ok(answers)
    }

    pub async fn message(&self, tenant_id: &str, message_id: &str, user: &str) -> Result<Option<StoredRow>, Error> {
        self.read_found(|store| store.message(tenant_id, message_id, user)).await
    }

    pub async fn target(&self, tenant_id: &str, message_id: &str) -> Result<Option<TargetRow>, Error> {
        self.read_found(|store| store.target(tenant_id, message_id)).await
    }

    /// The messages of these ids that are stored (deleted ones too), each once: the first
    /// database's, then the next's of those it does not hold (as [`Self::target`] does per id).
    pub async fn targets(&self, tenant_id: &str, message_ids: &[String]) -> Result<Vec<TargetRow>, Error> {
        let mut missing: Vec<String> = message_ids.to_vec();
        missing.sort_unstable();
        missing.dedup();
        let mut found: Vec<TargetRow> = Vec::new();
        let mut stores = self.stores.iter().peekable();
        while let Some(store) = stores.next() {
            if missing.is_empty() {
                break;
            }
            match store.targets(tenant_id, &missing).await {
                Ok(rows) => {
                    let held: std::collections::HashSet<&str> =
                        rows.iter().map(|target| target.row.message_id.as_str()).collect();
                    missing.retain(|id| !held.contains(id.as_str()));
                    found.extend(rows);
                }
                Err(error) if stores.peek().is_some() => {
                    warn!(error = %error.cause(), database = store.name(), "read failed; reading from the next database");
                }
                Err(error) => return Err(error),
            }
        }
        if self.stores.is_empty() {
            return Err(Error::NoDatabase);
        }
        Ok(found)
    }

    pub async fn newest(&self, tenant_id: &str, session_id: &str, limit: i64) -> Result<Vec<StoredRow>, Error> {
        self.read(|store| store.newest(tenant_id, session_id, limit)).await
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
        self.read(|store| store.seq_range(tenant_id, session_id, after, before, limit, user)).await
    }

    pub async fn session_page(&self, page: SessionPage<'_>) -> Result<Vec<StoredRow>, Error> {
        self.read(|store| store.session_page(page)).await
    }

    pub async fn tags(&self, tenant_id: &str, limit: i64) -> Result<Vec<String>, Error> {
        self.read(|store| store.tags(tenant_id, limit)).await
    }

    pub async fn session_views(&self, tenant_id: &str, session_id: &str) -> Result<SessionViews, Error> {
        self.read(|store| store.session_views(tenant_id, session_id)).await
    }

    pub async fn session_heads(&self, tenant_id: &str, session_ids: &[String]) -> Result<Vec<SessionHead>, Error> {
        self.read(|store| store.session_heads(tenant_id, session_ids)).await
    }

    pub async fn read_seqs(
        &self,
        tenant_id: &str,
        user_id: &str,
        session_ids: &[String],
    ) -> Result<HashMap<String, i64>, Error> {
        self.read(|store| store.read_seqs(tenant_id, user_id, session_ids)).await
    }

    pub async fn unread_counts(
        &self,
        tenant_id: &str,
        user_id: &str,
        ranges: &[UnreadRange],
    ) -> Result<HashMap<String, i64>, Error> {
        self.read(|store| store.unread_counts(tenant_id, user_id, ranges)).await
    }

    /// Records a read position in every database, never lowering one.
    pub async fn save_read_seq(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        read_seq: i64,
    ) -> Result<(), Error> {
        self.change(|store| store.save_read_seq(tenant_id, session_id, user_id, read_seq)).await.map(drop)
    }

    pub async fn search(&self, query: &SearchQuery, limit: i64) -> Result<Vec<StoredRow>, Error> {
        self.read(|store| store.search(query, limit)).await
    }

    /// Soft-deletes for everyone; returns the ids newly deleted in any database.
    pub async fn delete_for_everyone(
        &self,
        tenant_id: &str,
        session_id: &str,
        message_ids: &[String],
        operation: &Operation,
    ) -> Result<Vec<String>, Error> {
        let answers =
            self.change(|store| store.delete_for_everyone(tenant_id, session_id, message_ids, operation)).await?;
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
            .change(|store| store.recall(tenant_id, message_id, recalled_at, payload_without_content, operation))
            .await?;
        Ok(answers.into_iter().flatten().next())
    }

    /// Whether any database newly hid the message.
    pub async fn hide_for_user(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        message_id: &str,
        permanent: bool,
    ) -> Result<bool, Error> {
        let answers =
            self.change(|store| store.hide_for_user(tenant_id, session_id, user_id, message_id, permanent)).await?;
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
        let answers = self.change(|store| store.clear_session(tenant_id, session_id, user_id, before)).await?;
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
    ) -> Result<Option<(Vec<ReadRecord>, Option<DateTime<Utc>>)>, Error> {
        let answers = self.change(|store| store.mark_read(tenant_id, message_id, user_id, read_at, burn_at)).await?;
        Ok(answers.into_iter().next().flatten())
    }

    /// Whether any database found and changed the message.
    pub async fn set_attributes(
        &self,
        tenant_id: &str,
        message_id: &str,
        attributes: &HashMap<String, String>,
        tags: Option<&[String]>,
        operation: &Operation,
    ) -> Result<bool, Error> {
        let answers =
            self.change(|store| store.set_attributes(tenant_id, message_id, attributes, tags, operation)).await?;
        Ok(answers.into_iter().any(|updated| updated))
    }

    /// Wipes burned content in every database; how many messages were wiped in all.
    pub async fn wipe_burned(&self, limit: i64, strip: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Result<u64, Error> {
        let answers = self.change(|store| store.wipe_burned(limit, &strip)).await?;
        Ok(answers.into_iter().sum())
    }

    /// Whether reads can be served: some database answers.
    pub async fn answers(&self) -> bool {
        for store in &self.stores {
            if store.answers().await {
                return true;
            }
        }
        false
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
