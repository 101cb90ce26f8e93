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
use crate::store::postgres::UnreadRange;
use crate::store::redis::{CachedState, RedisCache};
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

impl Sessions {
    /// `user`'s view of each of `session_ids` (of one tenant), in order.
    pub async fn states(&self, tenant_id: &str, user: &str, session_ids: &[String]) -> Result<Vec<SessionView>, Error> {
        let keys: Vec<SessionKeys> = session_ids.iter().map(|session| SessionKeys::new(tenant_id, session)).collect();
        let cached = self.cached_states(tenant_id, user, session_ids, &keys).await?;

        let mut views: Vec<SessionView> = session_ids
            .iter()
            .zip(&cached)
            .map(|(session_id, cached)| match cached {
                Some(state) => from_cache(session_id, state),
                None => SessionView { session_id: session_id.clone(), ..SessionView::default() },
            })
            .collect();

        // The state Redis does not hold: the newest message in the databases.
        let unknown_state: Vec<usize> = (0..views.len()).filter(|&index| cached[index].is_none()).collect();
        if !unknown_state.is_empty() {
            let sessions: Vec<String> = unknown_state.iter().map(|&index| session_ids[index].clone()).collect();
            let heads = self.databases.session_heads(tenant_id, &sessions).await?;
            let position: HashMap<&str, usize> =
                unknown_state.iter().map(|&index| (session_ids[index].as_str(), index)).collect();
            for head in heads {
                let Some(&index) = position.get(head.session_id.as_str()) else { continue };
                let view = &mut views[index];
                view.last_seq = head.last_seq;
                view.message_count = head.last_seq;
                view.last_message_id = head.last_message_id.clone();
                view.last_sender_id = head.last_sender_id.clone();
                // Session state keeps milliseconds, whichever store answers.
                view.last_message_time = DateTime::from_timestamp_millis(head.last_message_time.timestamp_millis());
                if let Some(cache) = &self.cache {
                    cache.set_state(&keys[index], &head).await;
                }
            }
        }

        // The read seqs Redis does not hold: the recorded position or the user's own newest
        // message, whichever is later.
        let unknown_read: Vec<usize> = (0..views.len())
            .filter(|&index| {
                views[index].last_seq > 0 && cached[index].as_ref().is_none_or(|state| state.read_seq.is_none())
            })
            .collect();
        if !unknown_read.is_empty() {
            let sessions: Vec<String> = unknown_read.iter().map(|&index| session_ids[index].clone()).collect();
            let reads = self.databases.read_seqs(tenant_id, user, &sessions).await?;
            for &index in &unknown_read {
                let read_seq = reads.get(&session_ids[index]).copied().unwrap_or(0);
                views[index].read_seq = read_seq;
                if let Some(cache) = &self.cache {
                    // Best effort: without it the next read rebuilds it again.
                    let _ = cache.advance_read(&keys[index], user, read_seq).await;
                }
            }
        }

        // Unread counts the hot window could not give.
        let ranges: Vec<UnreadRange> = views
            .iter()
            .zip(&cached)
            .filter(|(view, cached)| {
                view.read_seq < view.last_seq
                    && cached.as_ref().is_none_or(|state| state.unread.is_none() || state.read_seq.is_none())
            })
            .map(|(view, _)| UnreadRange {
                session_id: view.session_id.clone(),
                read_seq: view.read_seq,
                last_seq: view.last_seq,
            })
            .collect();
        let from_cache = views.iter().zip(&cached).filter(|(view, cached)| {
            view.read_seq < view.last_seq
                && cached.as_ref().is_some_and(|state| state.unread.is_some() && state.read_seq.is_some())
        });
        self.metrics.unread_from_cache.inc_by(from_cache.count() as u64);
        self.metrics.unread_from_database.inc_by(ranges.len() as u64);
        if !ranges.is_empty() {
            let counts = self.databases.unread_counts(tenant_id, user, &ranges).await?;
            for view in &mut views {
                if let Some(count) = counts.get(&view.session_id) {
                    view.unread_count = *count;
                }
            }
        }
        for view in &mut views {
            view.read_seq = view.read_seq.min(view.last_seq);
        }
        Ok(views)
    }

    /// What Redis holds of each session for `user` (`None` where it does not know the state).
    /// Sessions with unread messages whose per-user views Redis lacks get them loaded from
    /// the databases and are asked again, so the hot window can count for them.
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
        let without_views: Vec<usize> = (0..cached.len())
            .filter(|&index| {
                cached[index].as_ref().is_some_and(|state| {
                    !state.views_loaded && state.read_seq.is_some_and(|read_seq| read_seq < state.last_seq)
                })
            })
            .collect();
        if without_views.is_empty() {
            return Ok(cached);
        }
        let loads = without_views
            .iter()
            .map(|&index| load_views(&self.databases, cache, &keys[index], tenant_id, &session_ids[index]));
        futures::future::try_join_all(loads).await?;
        let again: Vec<SessionKeys> = without_views.iter().map(|&index| keys[index].clone()).collect();
        if let Some(answers) = cache.session_states(&again, user, now_us).await {
            for (index, answer) in without_views.into_iter().zip(answers) {
                cached[index] = answer;
            }
        }
        Ok(cached)
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
