//! Session state and read positions: GetSessionStates, MarkSessionRead, and the read position
//! MarkMessageRead moves.
//!
//! Kept the way large IM systems keep it (OpenIM's conversation max seq and has-read seq,
//! Tinode's `seqid` and `readseqid`): per session its last seq and last message, written by
//! the writer once per batch; per (user, session) the user's read seq, moved forward only — by
//! the user's own messages (the writer) and by read commands (here). Nothing is counted per
//! member, so a message costs the same in a session of two or of five thousand. Unread counts
//! are derived when asked for: the messages with seq in (read seq, last seq] the user can see
//! (not deleted, recalled, burned, hidden or cleared for them); the user sent none of them, as
//! their own messages moved their read seq.
//!
//! Redis answers when it holds everything needed (the hot window covers the unread range);
//! whatever it lost is rebuilt from the databases — the last message from the messages, a read
//! seq from the recorded read positions and the user's newest own message — and put back.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use flare_storage_common::keys::SessionKeys;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::redis::{CachedState, RedisCache};
use crate::store::rows::{SessionHead, UnreadRange};
use crate::store::{Databases, load_views};

#[derive(Clone)]
pub struct Sessions {
    pub databases: Databases,
    pub cache: Option<RedisCache>,
    pub metrics: Metrics,
}

/// One session as a user sees it. A session without messages is all zeros.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionView {
    pub session_id: String,
    pub last_seq: i64,
    pub last_message_id: String,
    pub last_sender_id: String,
    pub last_message_time: Option<DateTime<Utc>>,
    /// Seqs handed out in the session.
    pub message_count: i64,
    pub read_seq: i64,
    pub unread_count: i64,
}

/// Database lookups run at once for one request, at most (a request names up to 500 sessions).
const CONCURRENT_LOOKUPS: usize = 8;

impl Sessions {
    /// `user`'s view of each of `session_ids` (of one tenant), in order; a session named twice
    /// is answered twice.
    pub async fn states(&self, tenant_id: &str, user: &str, session_ids: &[String]) -> Result<Vec<SessionView>, Error> {
        let mut unique: Vec<String> = Vec::with_capacity(session_ids.len());
        let mut seen = std::collections::HashSet::new();
        for session_id in session_ids {
            if seen.insert(session_id.as_str()) {
                unique.push(session_id.clone());
            }
        }
        let keys: Vec<SessionKeys> = unique.iter().map(|session| SessionKeys::new(tenant_id, session)).collect();
        let cached = self.cached_states(tenant_id, user, &unique, &keys).await?;
        let mut views: Vec<SessionView> = unique
            .iter()
            .zip(&cached)
            .map(|(session_id, cached)| match cached {
                Some(state) => from_cache(session_id, state),
                None => SessionView { session_id: session_id.clone(), ..SessionView::default() },
            })
            .collect();
        let heads = self.rebuild_states(tenant_id, &keys, &cached, &mut views).await?;
        let reads = self.rebuild_reads(tenant_id, user, &keys, &cached, &mut views).await?;
        if let Some(cache) = &self.cache {
            cache.remember(&heads, &reads, user).await;
        }
        self.count_unread(tenant_id, user, &cached, &mut views).await?;
        let by_session: HashMap<&str, &SessionView> =
            views.iter().map(|view| (view.session_id.as_str(), view)).collect();
        Ok(session_ids
            .iter()
            .map(|session_id| by_session.get(session_id.as_str()).map(|view| (*view).clone()).unwrap_or_default())
            .collect())
    }

    /// What Redis holds of each session for `user` (`None` where it does not know the state).
    /// Sessions whose unread messages the hot window could count once their per-user views
    /// are in Redis get them loaded from the databases and are asked again.
    async fn cached_states(
        &self,
        tenant_id: &str,
        user: &str,
        session_ids: &[String],
        keys: &[SessionKeys],
    ) -> Result<Vec<Option<CachedState>>, Error> {
        let Some(cache) = &self.cache else { return Ok(vec![None; keys.len()]) };
        let now_us = Utc::now().timestamp_micros();
        let Some(mut cached) = cache.session_states(keys, user, now_us).await else {
            return Ok(vec![None; keys.len()]);
        };
        let without_views: Vec<usize> =
            (0..cached.len()).filter(|&index| cached[index].as_ref().is_some_and(|state| state.needs_views)).collect();
        if without_views.is_empty() {
            return Ok(cached);
        }
        for chunk in without_views.chunks(CONCURRENT_LOOKUPS) {
            let loads = chunk
                .iter()
                .map(|&index| load_views(&self.databases, cache, &keys[index], tenant_id, &session_ids[index]));
            futures::future::try_join_all(loads).await?;
        }
        let again: Vec<SessionKeys> = without_views.iter().map(|&index| keys[index].clone()).collect();
        if let Some(answers) = cache.session_states(&again, user, now_us).await {
            for (index, answer) in without_views.into_iter().zip(answers) {
                cached[index] = answer;
            }
        }
        Ok(cached)
    }

    /// The state of the sessions Redis does not know: their newest message in the databases.
    /// Returns what to put back in Redis.
    async fn rebuild_states(
        &self,
        tenant_id: &str,
        keys: &[SessionKeys],
        cached: &[Option<CachedState>],
        views: &mut [SessionView],
    ) -> Result<Vec<(SessionKeys, SessionHead)>, Error> {
        let unknown: Vec<usize> = (0..views.len()).filter(|&index| cached[index].is_none()).collect();
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let sessions: Vec<String> = unknown.iter().map(|&index| views[index].session_id.clone()).collect();
        let position: HashMap<String, usize> =
            unknown.iter().map(|&index| (views[index].session_id.clone(), index)).collect();
        let mut heads = Vec::new();
        for head in self.databases.session_heads(tenant_id, &sessions).await? {
            let Some(&index) = position.get(&head.session_id) else { continue };
            let view = &mut views[index];
            view.last_seq = head.last_seq;
            view.message_count = head.last_seq;
            view.last_message_id = head.last_message_id.clone();
            view.last_sender_id = head.last_sender_id.clone();
            // Session state keeps milliseconds, whichever store answers.
            view.last_message_time = DateTime::from_timestamp_millis(head.last_message_time.timestamp_millis());
            heads.push((keys[index].clone(), head));
        }
        Ok(heads)
    }

    /// `user`'s read seq where Redis does not hold it: the recorded read position or the
    /// user's newest own message, whichever is later. Returns what to put back in Redis.
    async fn rebuild_reads(
        &self,
        tenant_id: &str,
        user: &str,
        keys: &[SessionKeys],
        cached: &[Option<CachedState>],
        views: &mut [SessionView],
    ) -> Result<Vec<(SessionKeys, i64)>, Error> {
        let unknown: Vec<usize> = (0..views.len())
            .filter(|&index| {
                views[index].last_seq > 0 && cached[index].as_ref().is_none_or(|state| state.read_seq.is_none())
            })
            .collect();
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let sessions: Vec<String> = unknown.iter().map(|&index| views[index].session_id.clone()).collect();
        let recorded = self.databases.read_seqs(tenant_id, user, &sessions).await?;
        Ok(unknown
            .into_iter()
            .map(|index| {
                let read_seq = recorded.get(&views[index].session_id).copied().unwrap_or(0);
                views[index].read_seq = read_seq;
                (keys[index].clone(), read_seq)
            })
            .collect())
    }

    /// Unread counts the hot window could not give, counted in the databases (one query for
    /// all of them in PostgreSQL).
    async fn count_unread(
        &self,
        tenant_id: &str,
        user: &str,
        cached: &[Option<CachedState>],
        views: &mut [SessionView],
    ) -> Result<(), Error> {
        let from_window = |index: usize| {
            cached[index].as_ref().is_some_and(|state| state.read_seq.is_some() && state.unread.is_some())
        };
        let mut ranges = Vec::new();
        for (index, view) in views.iter_mut().enumerate() {
            view.read_seq = view.read_seq.min(view.last_seq);
            if view.read_seq >= view.last_seq {
                view.unread_count = 0;
            } else if from_window(index) {
                self.metrics.unread_from_cache.inc();
            } else {
                ranges.push(UnreadRange {
                    session_id: view.session_id.clone(),
                    read_seq: view.read_seq,
                    last_seq: view.last_seq,
                });
            }
        }
        if ranges.is_empty() {
            return Ok(());
        }
        self.metrics.unread_from_database.inc_by(ranges.len() as u64);
        let counts = self.databases.unread_counts(tenant_id, user, &ranges).await?;
        for view in views {
            if let Some(count) = counts.get(&view.session_id) {
                view.unread_count = *count;
            }
        }
        Ok(())
    }

    /// Moves `user`'s read position in a session forward to `read_seq` (0, or anything beyond
    /// the last seq: to the last seq); never back. Returns the session as the user now sees it.
    pub async fn mark_read(
        &self,
        tenant_id: &str,
        session_id: &str,
        user: &str,
        read_seq: i64,
    ) -> Result<SessionView, Error> {
        let sessions = [session_id.to_owned()];
        let before = self.states(tenant_id, user, &sessions).await?.pop().unwrap_or_default();
        let target = if read_seq == 0 || read_seq > before.last_seq { before.last_seq } else { read_seq };
        if target <= before.read_seq {
            return Ok(before);
        }
        self.advance(tenant_id, session_id, user, target).await?;
        Ok(self.states(tenant_id, user, &sessions).await?.pop().unwrap_or_default())
    }

    /// Records that `user` read `session_id` up to `seq`: in every database, then in the
    /// cache. Like every command, a cache that does not take it is UNAVAILABLE (the retry
    /// completes it: recording a read twice changes nothing).
    pub async fn advance(&self, tenant_id: &str, session_id: &str, user: &str, seq: i64) -> Result<(), Error> {
        self.databases.save_read_seq(tenant_id, session_id, user, seq).await?;
        if let Some(cache) = &self.cache {
            cache
                .advance_read(&SessionKeys::new(tenant_id, session_id), user, seq)
                .await
                .map_err(|_| Error::CacheUnavailable)?;
        }
        Ok(())
    }
}

fn from_cache(session_id: &str, state: &CachedState) -> SessionView {
    SessionView {
        session_id: session_id.to_owned(),
        last_seq: state.last_seq,
        last_message_id: state.last_message_id.clone(),
        last_sender_id: state.last_sender_id.clone(),
        last_message_time: DateTime::from_timestamp_millis(state.last_message_ms),
        message_count: state.message_count,
        read_seq: state.read_seq.unwrap_or(0),
        unread_count: state.unread.unwrap_or(0),
    }
}
