//! The commands of StorageReaderService that change stored messages: delete for everyone,
//! recall, delete for one user, clear a session for one user, read receipts with
//! burn-after-read, attributes and tags.
//!
//! Each checks who may do it, writes the database (the truth) and then lays the change over
//! the Redis hot window (`store/redis.rs`), so no cache can show a message that is gone. A
//! command whose cache write fails answers UNAVAILABLE: its database change is idempotent, and
//! the retry completes the cache write.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::keys::{SessionKeys, clear_view_field, hidden_view_field};
use flare_storage_common::message::in_micros;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{ClearType, Message};

use crate::error::Error;
use crate::lookup::to_message;
use crate::permissions::{self, Actor, Change};
use crate::sessions::Sessions;
use crate::store::Databases;
use crate::store::redis::RedisCache;
use crate::store::rows::{Operation, TargetRow};

#[derive(Clone)]
pub struct Commands {
    pub databases: Databases,
    pub cache: Option<RedisCache>,
    /// Read positions, which MarkMessageRead moves.
    pub sessions: Sessions,
    /// Longest time after sending that a message can be recalled.
    pub recall_limit: Duration,
}

/// How a ClearSession request says where to clear up to.
pub enum ClearUpTo<'a> {
    All,
    Message(&'a str),
    Time(DateTime<Utc>),
}

impl Commands {
    async fn target(&self, tenant_id: &str, message_id: &str) -> Result<TargetRow, Error> {
        let target = self.databases.target(tenant_id, message_id).await?.ok_or(Error::NotFound("message"))?;
        if target.deleted_at.is_some() {
            return Err(Error::NotFound("message"));
        }
        Ok(target)
    }

    async fn mark_gone(&self, tenant_id: &str, session_id: &str, message_id: &str, state: &str) -> Result<(), Error> {
        self.mark_all_gone(tenant_id, session_id, &[(message_id, state)]).await
    }

    /// Lays `(message id, state)` facts over a session's cached messages.
    async fn mark_all_gone(&self, tenant_id: &str, session_id: &str, facts: &[(&str, &str)]) -> Result<(), Error> {
        match &self.cache {
            Some(cache) => cache
                .mark_gone(&SessionKeys::new(tenant_id, session_id), facts)
                .await
                .map_err(|_| Error::CacheUnavailable),
            None => Ok(()),
        }
    }

    /// Puts a message as the databases now hold it into its session's hot window, after a
    /// command changed fields kept in the cached body (attributes, tags, read receipts,
    /// operations, recall): every read path then shows the change, from every replica. The
    /// ticket, taken after the database write and before the read, orders this body against
    /// other commands' and fills' (see `SessionKeys::tickets`). A message gone for everyone
    /// has nothing to show.
    async fn rewrite_cached(&self, tenant_id: &str, session_id: &str, message_id: &str) -> Result<(), Error> {
        let Some(cache) = &self.cache else { return Ok(()) };
        let keys = SessionKeys::new(tenant_id, session_id);
        let ticket = cache.ticket(&keys).await.map_err(|_| Error::CacheUnavailable)?;
        let Some(row) = self.databases.message(tenant_id, message_id, "").await? else { return Ok(()) };
        let seq = row.seq.unwrap_or(0);
        // A payload that does not decode is cached as no body, which every read skips for the
        // database: the command's change is stored, so it must not fail on it.
        let body = to_message(row).map(|message| message.encode_to_vec()).unwrap_or_default();
        cache.rewrite(&keys, message_id, seq, ticket, &body).await.map_err(|_| Error::CacheUnavailable)
    }

    async fn merge_view(&self, tenant_id: &str, session_id: &str, field: String, value: String) -> Result<(), Error> {
        match &self.cache {
            Some(cache) => cache
                .merge_views(&SessionKeys::new(tenant_id, session_id), &[(field, value)], false)
                .await
                .map_err(|_| Error::CacheUnavailable),
            None => Ok(()),
        }
    }

    /// Deletes messages of one session for everyone. The sender may delete their own
    /// messages; services and administrators any. Returns how many were newly deleted.
    pub async fn delete(
        &self,
        tenant_id: &str,
        session_id: &str,
        message_ids: &[String],
        actor: Actor<'_>,
    ) -> Result<i32, Error> {
        let targets = self.databases.targets(tenant_id, message_ids).await?;
        let targets: HashMap<&str, &TargetRow> =
            targets.iter().map(|target| (target.row.message_id.as_str(), target)).collect();
        for message_id in message_ids {
            let target = targets.get(message_id.as_str()).ok_or(Error::NotFound("message"))?;
            if target.session_id != session_id {
                return Err(Error::NotFound("message in this session"));
            }
            permissions::may_change(actor, target, Change::DeleteForEveryone)?;
        }
        let operation = operation("delete", actor.id, "");
        let deleted = self.databases.delete_for_everyone(tenant_id, session_id, message_ids, &operation).await?;
        // Also the ones deleted before: a retry after a cache failure must complete them.
        let facts: Vec<(&str, &str)> = message_ids.iter().map(|message_id| (message_id.as_str(), "deleted")).collect();
        self.mark_all_gone(tenant_id, session_id, &facts).await?;
        Ok(i32::try_from(deleted.len()).unwrap_or(i32::MAX))
    }

    /// Recalls a message: only its sender, within `min(requested, configured)` seconds of
    /// sending (its timestamp, or when it was stored if that was earlier). Idempotent: a recalled message answers with its recall time.
    pub async fn recall(
        &self,
        tenant_id: &str,
        message_id: &str,
        operator: &str,
        requested_limit: Option<Duration>,
        reason: &str,
    ) -> Result<DateTime<Utc>, Error> {
        let target = self.target(tenant_id, message_id).await?;
        permissions::may_change(Actor { id: operator, privileged: false }, &target, Change::Recall)?;
        let session_id = target.session_id.clone();
        let mut message = Message::decode(target.row.payload.as_slice())
            .map_err(|_| Error::Corrupt { message_id: message_id.into() })?;
        message.content = None;
        let payload_without_content = message.encode_to_vec();
        let mut operation = operation("recall", operator, "");
        if !reason.is_empty() {
            operation.metadata.0.insert("reason".into(), reason.into());
        }
        let recalled_at = match (target.row.is_recalled, target.row.recalled_at) {
            // A retry: a database that failed last time gets the same recall (those that
            // have it keep theirs), then the cache.
            (true, Some(recalled_at)) => {
                self.databases.recall(tenant_id, message_id, recalled_at, &payload_without_content, &operation).await?;
                recalled_at
            }
            _ => {
                let limit = requested_limit.map_or(self.recall_limit, |requested| requested.min(self.recall_limit));
                let now = now_us();
                // Sent by its own timestamp, but never later than it was stored: a sender's clock
                // running ahead (up to WRITER_MAX_FUTURE_SECONDS) must not stretch the window.
                let sent = target.row.timestamp.min(target.row.created_at);
                let age = now.signed_duration_since(sent);
                if age > chrono::Duration::from_std(limit).unwrap_or(chrono::Duration::MAX) {
                    return Err(Error::FailedPrecondition(format!(
                        "the recall window of {}s after sending has passed",
                        limit.as_secs()
                    )));
                }
                match self.databases.recall(tenant_id, message_id, now, &payload_without_content, &operation).await? {
                    Some(recalled_at) => recalled_at,
                    // Recalled concurrently: report that recall.
                    None => self.target(tenant_id, message_id).await?.row.recalled_at.unwrap_or(now),
                }
            }
        };
        self.mark_gone(tenant_id, &session_id, message_id, &format!("recalled:{}", recalled_at.timestamp_micros()))
            .await?;
        self.rewrite_cached(tenant_id, &session_id, message_id).await?;
        Ok(recalled_at)
    }

    /// Hides a message for one user (the acting user, checked by the caller). The user must
    /// be its sender or one of its receivers when the message names receivers. Returns 1 when
    /// newly hidden, 0 when it already was.
    pub async fn delete_for_user(
        &self,
        tenant_id: &str,
        message_id: &str,
        user_id: &str,
        permanent: bool,
    ) -> Result<i32, Error> {
        let target = self.target(tenant_id, message_id).await?;
        if !permissions::concerns(&target, user_id) {
            return Err(Error::NotFound("message"));
        }
        let newly = self.databases.hide_for_user(tenant_id, &target.session_id, user_id, message_id, permanent).await?;
        self.merge_view(tenant_id, &target.session_id, hidden_view_field(user_id, message_id), "1".into()).await?;
        Ok(i32::from(newly))
    }

    /// Clears a session for one user up to a point; later messages stay visible. Returns the
    /// number of messages newly cleared and the watermark.
    pub async fn clear(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        up_to: ClearUpTo<'_>,
    ) -> Result<(i64, DateTime<Utc>), Error> {
        let before = match up_to {
            ClearUpTo::All => Utc::now(),
            ClearUpTo::Time(time) => time,
            ClearUpTo::Message(message_id) => {
                let target = self.databases.target(tenant_id, message_id).await?.ok_or(Error::NotFound("message"))?;
                if target.session_id != session_id {
                    return Err(Error::NotFound("message in this session"));
                }
                // "Before the message": the message itself stays.
                target.row.timestamp - chrono::Duration::microseconds(1)
            }
        };
        let (watermark, cleared) = self.databases.clear_session(tenant_id, session_id, user_id, before).await?;
        self.merge_view(tenant_id, session_id, clear_view_field(user_id), watermark.timestamp_micros().to_string())
            .await?;
        Ok((cleared, watermark))
    }

    /// Records that `user_id` read a message, and moves their read seq in its session forward
    /// to it. For a burn-after-read message the content is gone for everyone
    /// `burn_after_seconds` after the first read. The sender's own reads are not receipts.
    pub async fn mark_read(
        &self,
        tenant_id: &str,
        message_id: &str,
        user_id: &str,
    ) -> Result<(DateTime<Utc>, Option<DateTime<Utc>>), Error> {
        let target = self.target(tenant_id, message_id).await?;
        if !permissions::concerns(&target, user_id) {
            return Err(Error::NotFound("message"));
        }
        if target.sender_id == user_id {
            return Err(Error::FailedPrecondition("a sender does not read their own message".into()));
        }
        let now = now_us();
        let burn_at = target
            .is_burn_after_read
            .then(|| now + chrono::Duration::seconds(i64::from(target.burn_after_seconds.max(0))));
        let (read_by, burned_at) = self
            .databases
            .mark_read(tenant_id, message_id, user_id, now, burn_at)
            .await?
            .ok_or(Error::NotFound("message"))?;
        let read_at = read_by
            .iter()
            .find(|record| record.user_id == user_id)
            .and_then(|record| DateTime::from_timestamp_micros(record.read_at_us))
            .unwrap_or(now);
        if let Some(burned_at) = burned_at {
            self.mark_gone(
                tenant_id,
                &target.session_id,
                message_id,
                &format!("burn:{}", burned_at.timestamp_micros()),
            )
            .await?;
        }
        self.rewrite_cached(tenant_id, &target.session_id, message_id).await?;
        if let Some(seq) = target.row.seq.filter(|seq| *seq > 0) {
            self.sessions.advance(tenant_id, &target.session_id, user_id, seq).await?;
        }
        Ok((read_at, burned_at))
    }

    /// Merges attributes into a message and replaces its tags when any are given. The sender
    /// or a privileged actor may.
    pub async fn set_attributes(
        &self,
        tenant_id: &str,
        message_id: &str,
        attributes: &HashMap<String, String>,
        tags: &[String],
        actor: Actor<'_>,
    ) -> Result<(), Error> {
        let target = self.target(tenant_id, message_id).await?;
        permissions::may_change(actor, &target, Change::Attributes)?;
        let operation = operation("set_attributes", actor.id, "");
        let tags = (!tags.is_empty()).then_some(tags);
        if !self.databases.set_attributes(tenant_id, message_id, attributes, tags, &operation).await? {
            return Err(Error::NotFound("message"));
        }
        self.rewrite_cached(tenant_id, &target.session_id, message_id).await
    }

    /// Wipes burned content until none is due, then every `interval`, until shutdown.
    pub async fn wipe_burned_periodically(&self, interval: Duration, shutdown: tokio_util::sync::CancellationToken) {
        let strip = |payload: &[u8]| {
            let mut message = Message::decode(payload).ok()?;
            message.content = None;
            Some(message.encode_to_vec())
        };
        loop {
            match self.databases.wipe_burned(100, strip).await {
                Ok(wiped) if wiped >= 100 => continue,
                Ok(wiped) if wiped > 0 => tracing::info!(wiped, "burned message content wiped"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "failed to wipe burned messages, retrying later"),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// The tenant's distinct tags.
    pub async fn tags(&self, tenant_id: &str) -> Result<Vec<String>, Error> {
        self.databases.tags(tenant_id, 10_000).await
    }

    /// Parses ClearSession's fields into what to clear.
    pub fn clear_up_to<'a>(
        clear_type: i32,
        before_message_id: &'a str,
        before_time: Option<DateTime<Utc>>,
    ) -> Result<ClearUpTo<'a>, Error> {
        match ClearType::try_from(clear_type) {
            Ok(ClearType::ClearAll) => Ok(ClearUpTo::All),
            Ok(ClearType::ClearBeforeMessage) if !before_message_id.is_empty() => {
                Ok(ClearUpTo::Message(before_message_id))
            }
            Ok(ClearType::ClearBeforeMessage) => {
                Err(Error::invalid("clear_before_message_id", "is required for CLEAR_BEFORE_MESSAGE"))
            }
            Ok(ClearType::ClearBeforeTime) => before_time
                .map(ClearUpTo::Time)
                .ok_or_else(|| Error::invalid("clear_before_time", "is required for CLEAR_BEFORE_TIME")),
            Err(_) => Err(Error::invalid("clear_type", format!("unknown value {clear_type}"))),
        }
    }
}

fn operation(kind: &str, operator: &str, target_user: &str) -> Operation {
    Operation {
        operation_type: kind.into(),
        operator_id: operator.into(),
        operated_at_us: Utc::now().timestamp_micros(),
        target_user_id: target_user.into(),
        metadata: Default::default(),
    }
}

/// The current time at the microsecond precision every store keeps, so a time a command
/// answers with equals the one read back later.
fn now_us() -> DateTime<Utc> {
    in_micros(Utc::now())
}
