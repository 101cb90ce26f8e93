//! Read logic between the gRPC layer and the stores: Redis hot window first, then the
//! database; defaults and bounds; stored rows back into `Message`s.
//!
//! A page is served from the hot window only when the window provably holds every message
//! the page needs (its completeness floor, see `flare_storage_common::keys`); otherwise the
//! database answers. A window of unknown completeness is filled from the database once, with
//! concurrent readers of the same session waiting for that one query instead of each running
//! their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::keys::{SessionKeys, document_id};
use flare_storage_common::message::{LATEST_STORABLE, to_timestamp};
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::EncodedMessage;
use flare_storage_common::proto::storage::{Message, MessageOperation, MessageReadRecord, MessageTimeline};

use crate::cursor::Cursor;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::search::{CURSOR_SCOPE, SearchQuery};
use crate::store::redis::{CachedEntry, FillEntry, RedisCache, SeqSlice, TimeSlice, WindowRead};
use crate::store::rows::{Before, SessionPage, StoredRow};
use crate::store::{Databases, load_views};

/// Page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// Extra window entries read past a page, to step over messages sharing the cursor's
/// timestamp without a second round trip.
const TIE_SLACK: usize = 16;

pub struct Lookup {
    pub databases: Databases,
    pub cache: Option<RedisCache>,
    pub metrics: Metrics,
    pub default_range: Duration,
    pub max_page_size: u32,
    pub fills: SingleFlight,
    /// Sessions of messages read by id or listed by a read (`keys::document_id` → session id),
    /// kept in the process: a message never changes session, so no replica can contradict an
    /// entry. (A record reusing a stored id in a second session is ACKed as a duplicate of the
    /// stored message and stored nowhere else.)
    pub sessions_of: quick_cache::sync::Cache<String, String>,
}

/// Messages whose session a reader keeps in memory for reads by id (about 150 bytes each).
pub const SESSIONS_OF_CAPACITY: usize = 100_000;

/// A validated QueryMessages request.
pub struct PageQuery<'a> {
    pub tenant_id: &'a str,
    pub session_id: &'a str,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// 0 means the default page size; above the maximum it is lowered to the maximum.
    pub limit: u32,
    pub after: Option<Cursor>,
    /// The acting user, whose hidden and cleared messages are left out ('' = nobody's).
    pub user: &'a str,
}

/// A page of messages encoded as they are sent.
pub struct Page {
    pub messages: Vec<EncodedMessage>,
    pub next_cursor: Option<String>,
    pub limit: u32,
}

/// A validated QueryMessagesBySeq request: seq in (after, before), ascending.
pub struct SeqQuery<'a> {
    pub tenant_id: &'a str,
    pub session_id: &'a str,
    pub after: i64,
    /// Exclusive; `i64::MAX` when open.
    pub before: i64,
    pub limit: u32,
    pub user: &'a str,
}

pub struct SeqPage {
    pub messages: Vec<EncodedMessage>,
    pub has_more: bool,
    /// Seq of the page's last message.
    pub last_seq: Option<i64>,
    pub limit: u32,
}

/// A message on its way out: its encoding, and where it stands in the order being paged
/// (`position`: timestamp in µs for time pages, seq for seq pages; then id).
#[derive(Debug)]
struct Listed {
    position: i64,
    id: String,
    encoded: EncodedMessage,
}

impl Listed {
    fn by_time(message: &Message) -> Self {
        Self { position: timestamp_us(message), id: message.id.clone(), encoded: EncodedMessage::from(message) }
    }

    fn by_seq(message: &Message) -> Self {
        Self { position: message.seq, id: message.id.clone(), encoded: EncodedMessage::from(message) }
    }
}

/// What the hot window could say about a page.
enum FromCache<T> {
    Answer(T),
    /// The window's completeness is unknown: fill it.
    Unknown,
    /// The window cannot answer (too old, incomplete, no cache): ask the database.
    Miss,
    /// The session's per-user views must be loaded into the cache first.
    ViewsNotLoaded,
}

/// Resolved bounds of a time page.
struct Bounds {
    from_us: i64,
    to_us: i64,
    limit: usize,
}

impl Lookup {
    /// One message as `user` may see it ('' = no per-user filtering): from its session's hot
    /// window when the message's session is known and the window holds it as the user sees it,
    /// else from the databases (which then tell its session for the next read).
    pub async fn message(&self, tenant_id: &str, message_id: &str, user: &str) -> Result<EncodedMessage, Error> {
        let mut session_known = false;
        if let Some(cache) = &self.cache {
            let session_id = self.session_of(cache, tenant_id, message_id).await;
            session_known = session_id.is_some();
            if let Some(session_id) = session_id
                && let Some(encoded) = self.cached_message(cache, tenant_id, &session_id, message_id, user).await
            {
                self.metrics.cache_hit();
                return Ok(encoded);
            }
            self.metrics.cache_miss();
        }
        let row = self.databases.message(tenant_id, message_id, user).await?;
        let message = row.map(to_message).transpose()?.ok_or(Error::NotFound("message"))?;
        if let Some(cache) = &self.cache
            && !session_known
            && !message.session_id.is_empty()
        {
            self.sessions_of.insert(document_id(tenant_id, message_id), message.session_id.clone());
            // Not awaited: the answer does not depend on it.
            let (cache, tenant_id, message_id, session_id) =
                (cache.clone(), tenant_id.to_owned(), message_id.to_owned(), message.session_id.clone());
            tokio::spawn(async move { cache.remember_session_of(&tenant_id, &message_id, &session_id).await });
        }
        Ok(EncodedMessage::from(&message))
    }

    /// The session of a message, if this process or Redis knows it.
    async fn session_of(&self, cache: &RedisCache, tenant_id: &str, message_id: &str) -> Option<String> {
        let known = document_id(tenant_id, message_id);
        if let Some(session_id) = self.sessions_of.get(&known) {
            return Some(session_id);
        }
        let session_id = cache.session_of(tenant_id, message_id).await?;
        self.sessions_of.insert(known, session_id.clone());
        Some(session_id)
    }

    /// A message from its session's hot window, when the window can answer for it. Anything
    /// the window does not show as visible (not listed, deleted, hidden, cleared) is left to
    /// the databases.
    async fn cached_message(
        &self,
        cache: &RedisCache,
        tenant_id: &str,
        session_id: &str,
        message_id: &str,
        user: &str,
    ) -> Option<EncodedMessage> {
        let keys = SessionKeys::new(tenant_id, session_id);
        let mut read = cache.one(&keys, message_id, user).await?;
        if let WindowRead::ViewsNotLoaded = read {
            load_views(&self.databases, cache, &keys, tenant_id, session_id).await.ok()?;
            read = cache.one(&keys, message_id, user).await?;
        }
        match read {
            WindowRead::Found(entry) => visible(entry, Utc::now()).flatten(),
            WindowRead::Unknown | WindowRead::ViewsNotLoaded => None,
        }
    }

    /// The time range a read covers. Without an end it has none: a message dated ahead by
    /// its sender's fast clock is still the newest of its session. Without a start it reaches
    /// `default_range` back from the end, or from now when the end is open.
    fn time_range(&self, from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> (DateTime<Utc>, DateTime<Utc>) {
        let default_range = chrono::Duration::from_std(self.default_range).unwrap_or(chrono::Duration::days(7));
        let from = from.unwrap_or_else(|| to.unwrap_or_else(Utc::now) - default_range);
        (from, to.unwrap_or(LATEST_STORABLE))
    }

    fn page_size(&self, requested: u32) -> u32 {
        match requested {
            0 => DEFAULT_PAGE_SIZE.min(self.max_page_size),
            requested => requested.min(self.max_page_size),
        }
    }

    /// One page of a session, newest first. `next_cursor` is set when older messages remain
    /// in the range.
    pub async fn session_page(&self, query: PageQuery<'_>) -> Result<Page, Error> {
        let limit = self.page_size(query.limit);
        let (from, to) = self.time_range(query.from, query.to);
        if from > to {
            return Err(Error::invalid("start_time", "must not be after end_time"));
        }
        let bounds = Bounds { from_us: from.timestamp_micros(), to_us: to.timestamp_micros(), limit: limit as usize };

        let messages = match self.cached_page(&query, &bounds).await? {
            Some(messages) => messages,
            None => {
                let before = query
                    .after
                    .as_ref()
                    .map(|cursor| Before { timestamp: cursor.timestamp, message_id: &cursor.message_id });
                // One row more than the page tells whether another page exists, without counting.
                let rows = self
                    .databases
                    .session_page(SessionPage {
                        tenant_id: query.tenant_id,
                        session_id: query.session_id,
                        from,
                        to,
                        before,
                        limit: i64::from(limit) + 1,
                        user: query.user,
                    })
                    .await?;
                listed(rows, Listed::by_time)?
            }
        };
        self.learn_sessions(query.tenant_id, query.session_id, messages.iter().map(|message| &message.id));
        Ok(cut_page(messages, limit, query.tenant_id, query.session_id))
    }

    /// The page (limit + 1 messages at most) from the hot window, filling the window first
    /// when its completeness is unknown; `None` when the database must answer.
    async fn cached_page(&self, query: &PageQuery<'_>, bounds: &Bounds) -> Result<Option<Vec<Listed>>, Error> {
        let Some(cache) = &self.cache else { return Ok(None) };
        let keys = SessionKeys::new(query.tenant_id, query.session_id);
        let read = async || page_from_window(cache, &keys, query.after.as_ref(), bounds, query.user).await;
        let mut answer = read().await;
        if let FromCache::ViewsNotLoaded = answer {
            load_views(&self.databases, cache, &keys, query.tenant_id, query.session_id).await?;
            answer = read().await;
        }
        match answer {
            FromCache::Answer(messages) => {
                self.metrics.cache_hit();
                return Ok(Some(messages));
            }
            FromCache::Miss | FromCache::ViewsNotLoaded => {
                self.metrics.cache_miss();
                return Ok(None);
            }
            FromCache::Unknown => {}
        }
        // Cold window: one reader fills it, the others wait and then read the filled window. A
        // waiter the filled window still cannot answer (a command changed a message during the
        // fill, the page is older than the window) asks the database rather than fill again.
        let key = keys.hot_meta();
        let keys = &keys;
        let (answer, hit) = self
            .fills
            .run(&key, |led| async move {
                if let FromCache::Answer(messages) = read().await {
                    return Ok::<_, Error>((Some(messages), true));
                }
                if led {
                    self.fill_window(cache, keys, query.tenant_id, query.session_id).await?;
                    if let FromCache::Answer(messages) = read().await {
                        return Ok((Some(messages), false));
                    }
                }
                Ok((None, false))
            })
            .await?;
        // A read that went to the database, to fill or to answer, is a miss.
        if hit {
            self.metrics.cache_hit();
        } else {
            self.metrics.cache_miss();
        }
        Ok(answer)
    }

    /// Reads the newest messages of a session from the database into its hot window.
    async fn fill_window(
        &self,
        cache: &RedisCache,
        keys: &SessionKeys,
        tenant_id: &str,
        session_id: &str,
    ) -> Result<(), Error> {
        let window = cache.window();
        // Bodies commands put after this ticket are newer than this read: the fill keeps them.
        let Some(ticket) = cache.ticket_now(keys).await else { return Ok(()) };
        let rows = self.databases.newest(tenant_id, session_id, window as i64).await?;
        let complete = rows.len() < window;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let timestamp_us = row.timestamp.timestamp_micros();
            // The facts the databases hold, for windows rebuilt after Redis lost its overlays.
            let gone = match (row.is_recalled, row.recalled_at, row.burned_at) {
                (true, recalled_at, _) => {
                    Some(format!("recalled:{}", recalled_at.unwrap_or_default().timestamp_micros()))
                }
                (false, _, Some(burned_at)) => Some(format!("burn:{}", burned_at.timestamp_micros())),
                (false, _, None) => None,
            };
            let message = to_message(row)?;
            entries.push(FillEntry {
                seq: message.seq,
                message_id: message.id.clone(),
                timestamp_us,
                body: message.encode_to_vec(),
                gone,
            });
        }
        cache.fill(keys, ticket, &entries, complete).await;
        self.learn_sessions(tenant_id, session_id, entries.iter().map(|entry| &entry.message_id));
        Ok(())
    }

    /// Remembers the session of messages a read listed, so that reading one of them by id
    /// (GetMessage after a page, the usual order of a client) finds it in the window at once.
    fn learn_sessions<'a>(&self, tenant_id: &str, session_id: &str, message_ids: impl Iterator<Item = &'a String>) {
        if self.cache.is_none() {
            return;
        }
        for message_id in message_ids {
            self.sessions_of.insert(document_id(tenant_id, message_id), session_id.to_owned());
        }
    }

    /// One page of a search, in its time order; the cursor is set when more match.
    pub async fn search(&self, mut query: SearchQuery) -> Result<Page, Error> {
        let limit = self.page_size(query.limit);
        if query.from.is_none() && query.to.is_none() {
            // A search without a time range looks as far back as a history query does.
            let (from, to) = self.time_range(None, None);
            (query.from, query.to) = (Some(from), Some(to));
        }
        let rows = self.databases.search(&query, i64::from(limit) + 1).await?;
        Ok(cut_page(listed(rows, Listed::by_time)?, limit, &query.tenant_id, CURSOR_SCOPE))
    }

    /// Messages of a session by seq, ascending, for gap filling.
    pub async fn seq_range(&self, query: SeqQuery<'_>) -> Result<SeqPage, Error> {
        let limit = self.page_size(query.limit);
        let wanted = limit as usize + 1;
        if let Some(cache) = &self.cache {
            let keys = SessionKeys::new(query.tenant_id, query.session_id);
            let read = async || cache.by_seq(&keys, query.after, query.before, wanted, query.user).await;
            let mut slice = read().await;
            if let Some(WindowRead::ViewsNotLoaded) = slice {
                load_views(&self.databases, cache, &keys, query.tenant_id, query.session_id).await?;
                slice = read().await;
            }
            if let Some(WindowRead::Found(slice)) = slice
                && let Some(messages) = seq_page_from_window(slice, query.after, wanted)
            {
                self.metrics.cache_hit();
                self.learn_sessions(query.tenant_id, query.session_id, messages.iter().map(|message| &message.id));
                return Ok(seq_page(messages, limit));
            }
            self.metrics.cache_miss();
        }
        let rows = self
            .databases
            .seq_range(query.tenant_id, query.session_id, query.after, query.before, wanted as i64, query.user)
            .await?;
        let messages = listed(rows, Listed::by_seq)?;
        self.learn_sessions(query.tenant_id, query.session_id, messages.iter().map(|message| &message.id));
        Ok(seq_page(messages, limit))
    }
}

/// Stored rows as messages on their way out.
fn listed(rows: Vec<StoredRow>, list: fn(&Message) -> Listed) -> Result<Vec<Listed>, Error> {
    rows.into_iter().map(|row| to_message(row).map(|message| list(&message))).collect()
}

/// Cuts `limit + 1` newest-first messages into a page and its cursor.
fn cut_page(mut messages: Vec<Listed>, limit: u32, tenant_id: &str, session_id: &str) -> Page {
    let has_more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    let next_cursor = match (has_more, messages.last()) {
        (true, Some(last)) => DateTime::from_timestamp_micros(last.position)
            .map(|timestamp| Cursor { timestamp, message_id: last.id.clone() }.encode(tenant_id, session_id)),
        _ => None,
    };
    Page { messages: messages.into_iter().map(|message| message.encoded).collect(), next_cursor, limit }
}

fn seq_page(mut messages: Vec<Listed>, limit: u32) -> SeqPage {
    let has_more = messages.len() > limit as usize;
    messages.truncate(limit as usize);
    let last_seq = messages.last().map(|message| message.position);
    SeqPage { messages: messages.into_iter().map(|message| message.encoded).collect(), has_more, last_seq, limit }
}

/// Up to `wanted` visible messages from a seq slice, if the window covers the range.
fn seq_page_from_window(slice: SeqSlice, after: i64, wanted: usize) -> Option<Vec<Listed>> {
    // Seqs are contiguous in a session, so a window with as many entries as its seq span
    // holds every message from its lowest seq up.
    let contiguous = slice.size == slice.highest_seq - slice.lowest_seq + 1;
    if !contiguous || slice.lowest_seq > after.saturating_add(1) {
        return None;
    }
    // The script left out what the user cannot see: a page short of `wanted` is right only
    // when the range ran out.
    if slice.entries.len() < wanted && !slice.exhausted {
        return None;
    }
    let now = Utc::now();
    let mut messages = Vec::with_capacity(wanted);
    for entry in slice.entries.into_iter().take(wanted) {
        let (position, id) = (entry.position, entry.id.clone());
        if let Some(encoded) = visible(entry, now)? {
            messages.push(Listed { position, id, encoded });
        }
    }
    Some(messages)
}

/// Answers a time page from the window if it provably can.
async fn page_from_window(
    cache: &RedisCache,
    keys: &SessionKeys,
    cursor: Option<&Cursor>,
    bounds: &Bounds,
    user: &str,
) -> FromCache<Vec<Listed>> {
    let wanted = bounds.limit + 1;
    // Only a page after a cursor steps over entries (those sharing the cursor's timestamp that
    // earlier pages returned); a first page — opening a chat, the most common read — reads
    // just what it returns, which keeps Redis' reply and its parsing small.
    let fetch = if cursor.is_some() { wanted + TIE_SLACK } else { wanted };
    let max_us = match cursor {
        Some(cursor) => bounds.to_us.min(cursor.timestamp.timestamp_micros()),
        None => bounds.to_us,
    };
    match cache.by_time(keys, max_us, bounds.from_us, fetch, user).await {
        None => FromCache::Miss,
        Some(WindowRead::Unknown) => FromCache::Unknown,
        Some(WindowRead::ViewsNotLoaded) => FromCache::ViewsNotLoaded,
        Some(WindowRead::Found(slice)) => match page_from_slice(slice, cursor, wanted, fetch, Utc::now()) {
            Some(page) => FromCache::Answer(page),
            None => FromCache::Miss,
        },
    }
}

/// The `wanted` newest messages (fewer when the range has fewer) after `cursor` that a window
/// slice provably holds — read newest first, at most `fetch` entries, from the cursor's
/// timestamp (or the range's end) down to the range's start — or `None` when the window may
/// lack one of them (or an entry cannot be read) and the database must answer.
fn page_from_slice(
    slice: TimeSlice,
    cursor: Option<&Cursor>,
    wanted: usize,
    fetch: usize,
    now: DateTime<Utc>,
) -> Option<Vec<Listed>> {
    let range_exhausted = slice.entries.len() < fetch;
    let mut page = Vec::with_capacity(wanted);
    let mut oldest_examined_us = None;
    for entry in slice.entries {
        let (position, id) = (entry.position, entry.id.clone());
        // Messages sharing the cursor's timestamp with an id at or above it were on earlier
        // pages.
        if let Some(cursor) = cursor
            && position == cursor.timestamp.timestamp_micros()
            && id >= cursor.message_id
        {
            continue;
        }
        oldest_examined_us = Some(position);
        if let Some(encoded) = visible(entry, now)? {
            page.push(Listed { position, id, encoded });
            if page.len() == wanted {
                break;
            }
        }
    }
    let complete = if page.len() == wanted {
        // A full page whose oldest entry is above the floor: everything between is cached.
        oldest_examined_us.is_some_and(|oldest| oldest > slice.floor_us)
    } else {
        // The range ran out inside the window and the window covers the whole range (down to
        // the user's clear watermark, below which nothing is shown anyway).
        range_exhausted && slice.floor_us < slice.min_us
    };
    complete.then_some(page)
}

/// A cached entry as its reader may see it: `Some(None)` when it is gone for them, `None`
/// when the entry cannot be trusted (body missing, or undecodable where it must be changed).
/// The body is sent as stored; only a message recalled or burned since it was cached, whose
/// content must not be shown, is decoded and encoded again.
fn visible(entry: CachedEntry, now: DateTime<Utc>) -> Option<Option<EncodedMessage>> {
    if entry.hidden || entry.gone == "deleted" {
        return Some(None);
    }
    if entry.body.is_empty() {
        return None;
    }
    let encoded = EncodedMessage(entry.body);
    let recalled_at = entry
        .gone
        .strip_prefix("recalled:")
        .map(|recalled_us| recalled_us.parse().ok().and_then(DateTime::from_timestamp_micros).map(to_timestamp));
    let burned = entry
        .gone
        .strip_prefix("burn:")
        .is_some_and(|burn_us| burn_us.parse::<i64>().is_ok_and(|burn_us| burn_us <= now.timestamp_micros()));
    if recalled_at.is_none() && !burned {
        return Some(Some(encoded));
    }
    let mut message = encoded.decode().ok()?;
    if let Some(recalled_at) = recalled_at {
        message.is_recalled = true;
        message.recalled_at = recalled_at;
    }
    message.content = None;
    Some(Some(EncodedMessage::from(&message)))
}

fn timestamp_us(message: &Message) -> i64 {
    message
        .timestamp
        .as_ref()
        .and_then(flare_storage_common::message::to_datetime)
        .map(|time| time.timestamp_micros())
        .unwrap_or(0)
}

/// The message as first stored, with the columns that may have changed since laid over it.
pub fn to_message(row: StoredRow) -> Result<Message, Error> {
    let mut message =
        Message::decode(row.payload.as_slice()).map_err(|_| Error::Corrupt { message_id: row.message_id.clone() })?;
    message.seq = row.seq.unwrap_or(0);
    message.tags = row.tags;
    message.attributes = row.attributes.0;
    message.is_recalled = row.is_recalled;
    message.recalled_at = row.recalled_at.map(to_timestamp);
    // Recalled and burned content is never returned, whatever a store still holds.
    if message.is_recalled || row.burned_at.is_some_and(|burned_at| burned_at <= Utc::now()) {
        message.content = None;
    }
    message.read_by = row
        .read_by
        .into_iter()
        .map(|record| MessageReadRecord {
            user_id: record.user_id,
            read_at: DateTime::from_timestamp_micros(record.read_at_us).map(to_timestamp),
            burned_at: row.burned_at.map(to_timestamp),
        })
        .collect();
    message.operations = row
        .operations
        .into_iter()
        .map(|operation| MessageOperation {
            operation_type: operation.operation_type,
            operator_id: operation.operator_id,
            operated_at: DateTime::from_timestamp_micros(operation.operated_at_us).map(to_timestamp),
            target_user_id: operation.target_user_id,
            metadata: operation.metadata.0,
        })
        .collect();
    let timeline = message.timeline.get_or_insert_with(MessageTimeline::default);
    timeline.persisted_time = Some(to_timestamp(row.created_at));
    Ok(message)
}

/// Lets one task per key do a piece of work while others with the same key wait for it.
#[derive(Default)]
pub struct SingleFlight {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl SingleFlight {
    /// Runs `work(led)` with the key's turn: `led` is true when no other task held the turn as
    /// this one asked for it, false when it waited for one that did — whose work is then done,
    /// so a waiter should use its result rather than do it again. A run dropped midway (its RPC
    /// cancelled) leaves nothing behind.
    pub async fn run<F: Future>(&self, key: &str, work: impl FnOnce(bool) -> F) -> F::Output {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.entry(key.to_owned()).or_default().clone()
        };
        // Declared first, dropped last: after the turn below has let go of its copy.
        let forget = Forget { flights: self, key, lock: Some(lock.clone()) };
        let (_turn, led) = match lock.try_lock_owned() {
            Ok(turn) => (turn, true),
            Err(_) => (forget.turn().lock_owned().await, false),
        };
        work(led).await
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

/// Removes a key's entry when its last run ends, however it ends.
struct Forget<'a> {
    flights: &'a SingleFlight,
    key: &'a str,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Forget<'_> {
    fn turn(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.lock.clone().unwrap_or_default()
    }
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        let mut locks = self.flights.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(self.lock.take());
        // Only the map's copy left: nobody else runs or waits under this key.
        if locks.get(self.key).is_some_and(|entry| Arc::strong_count(entry) == 1) {
            locks.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use flare_storage_common::keys::HOT_FLOOR_ALL;
    use proptest::prelude::*;

    use super::*;

    /// A stored message of a test session: id, timestamp (µs), gone state.
    #[derive(Debug, Clone)]
    struct Stored {
        id: String,
        timestamp_us: i64,
        gone: &'static str,
    }

    /// A session in seq order (timestamps out of order and shared, as senders' clocks make
    /// them; ids in no relation to seqs, as clients make them), of which the window keeps the
    /// newest `kept` by seq, as the writer trims it.
    fn session() -> impl Strategy<Value = (Vec<Stored>, usize)> {
        let message = (0i64..TIMES, prop::sample::select(vec!["", "", "", "deleted", "recalled:5"]));
        let ids = Just((0..40).collect::<Vec<usize>>()).prop_shuffle();
        (prop::collection::vec(message, 0..40), ids, 0usize..45).prop_map(|(messages, ids, kept)| {
            let stored = messages
                .into_iter()
                .zip(ids)
                .map(|((timestamp_us, gone), id)| Stored { id: format!("m{id:02}"), timestamp_us, gone })
                .collect();
            (stored, kept)
        })
    }

    /// Timestamps (µs) the test sessions use: few, so that many messages share one.
    const TIMES: i64 = 12;

    /// Newest first by (timestamp, id), as the window's time index and the databases order.
    fn newest_first(messages: &mut [&Stored]) {
        messages.sort_by(|a, b| (b.timestamp_us, &b.id).cmp(&(a.timestamp_us, &a.id)));
    }

    /// What READ_BY_TIME returns: window entries in [min_us, max_us], newest first, `fetch` at
    /// most, with the window's floor (every message above it is in the window).
    fn read_by_time(window: &[Stored], evicted: &[Stored], max_us: i64, min_us: i64, fetch: usize) -> TimeSlice {
        let floor_us = evicted.iter().map(|message| message.timestamp_us).max().unwrap_or(HOT_FLOOR_ALL);
        let mut entries: Vec<&Stored> =
            window.iter().filter(|message| (min_us..=max_us).contains(&message.timestamp_us)).collect();
        newest_first(&mut entries);
        let entries = entries
            .into_iter()
            .take(fetch)
            .map(|message| CachedEntry {
                id: message.id.clone(),
                position: message.timestamp_us,
                body: Message {
                    id: message.id.clone(),
                    timestamp: DateTime::from_timestamp_micros(message.timestamp_us).map(to_timestamp),
                    ..Default::default()
                }
                .encode_to_vec(),
                gone: message.gone.to_owned(),
                hidden: false,
            })
            .collect();
        TimeSlice { floor_us, min_us, entries }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Whatever page the window answers is the page the databases give: the `wanted`
        /// newest visible messages in the range after the cursor. A first page of a window
        /// holding the whole session with nothing deleted is always answered (a deleted entry
        /// among the few a first page reads leaves it short, and the database answers).
        #[test]
        fn a_page_from_the_window_is_the_database_page(
            (messages, kept) in session(),
            from_us in 0i64..TIMES,
            to_us in 0i64..TIMES,
            limit in 1usize..6,
            cursor_at in prop::option::of((0i64..TIMES, 0usize..40)),
        ) {
            let split = messages.len().saturating_sub(kept);
            let (evicted, window) = messages.split_at(split);
            let cursor = cursor_at.map(|(timestamp_us, seq)| Cursor {
                timestamp: DateTime::from_timestamp_micros(timestamp_us).unwrap_or_default(),
                message_id: format!("m{seq:02}"),
            });
            let wanted = limit + 1;
            let fetch = if cursor.is_some() { wanted + TIE_SLACK } else { wanted };
            let max_us = cursor.as_ref().map_or(to_us, |cursor| to_us.min(cursor.timestamp.timestamp_micros()));
            let slice = read_by_time(window, evicted, max_us, from_us, fetch);
            let answer = page_from_slice(slice, cursor.as_ref(), wanted, fetch, Utc::now());

            let mut expected: Vec<&Stored> = messages
                .iter()
                .filter(|message| message.gone != "deleted" && (from_us..=to_us).contains(&message.timestamp_us))
                .filter(|message| cursor.as_ref().is_none_or(|cursor| {
                    (message.timestamp_us, &message.id) < (cursor.timestamp.timestamp_micros(), &cursor.message_id)
                }))
                .collect();
            newest_first(&mut expected);
            let expected: Vec<&str> = expected.iter().take(wanted).map(|message| message.id.as_str()).collect();
            if let Some(page) = &answer {
                let ids: Vec<&str> = page.iter().map(|message| message.id.as_str()).collect();
                prop_assert_eq!(ids, expected);
                for listed in page {
                    let message = listed.encoded.decode()?;
                    prop_assert_eq!(&message.id, &listed.id);
                    let recalled = messages.iter().any(|stored| stored.id == message.id && stored.gone.starts_with("recalled:"));
                    prop_assert_eq!(message.is_recalled, recalled);
                }
            }
            let deleted = messages.iter().any(|message| message.gone == "deleted");
            if evicted.is_empty() && !deleted && cursor.is_none() && from_us <= to_us {
                prop_assert!(answer.is_some(), "a window of the whole session answers a first page");
            }
        }
    }

    #[tokio::test]
    async fn one_run_leads_and_the_others_wait_for_it() {
        let flights = Arc::new(SingleFlight::default());
        let (led, ran) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (release, gate) = tokio::sync::oneshot::channel::<()>();
        let mut gate = Some(gate);
        let mut runs = Vec::new();
        for _ in 0..8 {
            let (flights, led, ran, gate) = (flights.clone(), led.clone(), ran.clone(), gate.take());
            runs.push(tokio::spawn(async move {
                flights
                    .run("session", |leader| async move {
                        led.fetch_add(usize::from(leader), Ordering::SeqCst);
                        // The first run holds the turn until the test lets it go.
                        if let Some(gate) = gate {
                            let _ = gate.await;
                        }
                        ran.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            }));
        }
        // Every run has asked for the turn (this runtime runs one task at a time).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the others wait for the first");
        let _ = release.send(());
        for run in runs {
            run.await.expect("run");
        }
        assert_eq!(led.load(Ordering::SeqCst), 1, "one leader");
        assert_eq!(ran.load(Ordering::SeqCst), 8);
        assert_eq!(flights.keys(), 0, "the key goes with its last run");
    }

    #[tokio::test]
    async fn a_cancelled_run_leaves_no_key() {
        let flights = SingleFlight::default();
        // Cancelled while leading, and while waiting behind a run that is cancelled too.
        let leading = flights.run("a", |_| std::future::pending::<()>());
        assert!(tokio::time::timeout(Duration::from_millis(10), leading).await.is_err());
        assert_eq!(flights.keys(), 0);
        let first = flights.run("b", |_| std::future::pending::<()>());
        let second = flights.run("b", |_| std::future::pending::<()>());
        let both = futures::future::join(first, second);
        assert!(tokio::time::timeout(Duration::from_millis(10), both).await.is_err());
        assert_eq!(flights.keys(), 0);
        // A later run of the same key leads again.
        assert!(flights.run("b", |led| async move { led }).await);
    }
}
