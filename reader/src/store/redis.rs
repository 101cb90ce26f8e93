//! The hot cache the writer fills (layout in `flare_storage_common::keys`), and the overlays
//! the reader's commands keep there: what happened to a cached message (`gone`) and per-user
//! views (hidden messages, clear watermarks).
//!
//! Reads are one Lua call per page. The cache is optional at run time: while Redis is
//! unreachable every read goes to the databases, and after a failure the cache is skipped for
//! [`PAUSE_AFTER_FAILURE`], so an outage costs one timeout, not one per request. Commands
//! write the database first and the cache second; a command whose cache write fails still
//! succeeded, and its effect reaches the cache when the window is next refilled — except the
//! overlays, which are why a failed overlay write fails the command (see `grpc.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flare_storage_common::keys::{
    HOT_FLOOR_ALL, SESSION_STATE_TTL_SECONDS, SessionKeys, VIEW_FIELDS_LUA, message_session,
};
use flare_storage_common::redis_connection::{
    RedisConnection, RedisTarget, Timeouts, WAIT_TIMEOUT, is_unreplicated, query_calling, query_replicated,
};
use flare_storage_common::scripts::TRIM_WINDOW;
use redis::{AsyncCommands as _, RedisResult, Script, Value};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::store::rows::SessionHead;

const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Lua helper of the window reads: `many('HMGET', key, fields)` (or ZMSCORE) in chunks, so a
/// page of any size stays within Lua's limit on unpacked values (about 8,000). Missing values
/// are `false`, as HMGET gives them.
const MANY: &str = r#"
local function many(command, key, fields)
  local out = {}
  for first = 1, #fields, 1000 do
    local part = redis.call(command, key, unpack(fields, first, math.min(first + 999, #fields)))
    for i = 1, #part do out[#out + 1] = part[i] end
  end
  return out
end
"#;

/// Newest-first window entries between two timestamps, with everything needed to filter them
/// for one user. Reply: floor, views loaded ('1'/'0'), lower bound used (the user's clear
/// watermark can raise it), then four arrays: ids and timestamps interleaved, bodies, gone
/// states and hidden flags ('1'), the last three aligned with the ids (nil where none; empty
/// when the session has no gone states, or for no user). Nothing when the window's
/// completeness is unknown. The entries are not walked: a fixed number of commands, and the
/// arrays go back as the commands gave them.
const READ_BY_TIME: &str = r#"
-- KEYS: meta, time zset, bodies, gone, views
-- ARGV: max_us, min_us, count, user ('' = none)
local floor = redis.call('HGET', KEYS[1], 'floor_us')
if not floor then return false end
local user = ARGV[4]
local loaded = '1'
local min = tonumber(ARGV[2])
if user ~= '' then
  if redis.call('HEXISTS', KEYS[5], LOADED) == 0 then loaded = '0' end
  local clear = redis.call('HGET', KEYS[5], clear_field(user))
  if clear and tonumber(clear) + 1 > min then min = tonumber(clear) + 1 end
end
if loaded == '0' then return {floor, loaded, string.format('%.0f', min)} end
local entries = redis.call('ZREVRANGEBYSCORE', KEYS[2], ARGV[1], string.format('%.0f', min), 'WITHSCORES', 'LIMIT', 0, ARGV[3])
local ids = {}
for i = 1, #entries, 2 do ids[#ids + 1] = entries[i] end
local bodies, gone, hidden = {}, {}, {}
if #ids > 0 then
  bodies = many('HMGET', KEYS[3], ids)
  if redis.call('EXISTS', KEYS[4]) == 1 then gone = many('HMGET', KEYS[4], ids) end
  if user ~= '' then
    local fields = {}
    local prefix = hide_prefix(user)
    for i, id in ipairs(ids) do fields[i] = prefix .. id end
    hidden = many('HMGET', KEYS[5], fields)
  end
end
return {floor, loaded, string.format('%.0f', min), entries, bodies, gone, hidden}
"#;

/// Ascending window entries by seq in (ARGV[1], ARGV[2]) that the user can see (not deleted,
/// not hidden, not before their clear watermark), ARGV[3] of them when the range has as many:
/// entries the user cannot see are stepped over in further reads, so a page reads exactly
/// itself unless some are. Reply: lowest seq, size, highest seq, views loaded, whether the range
/// ran out ('1'/'0'), then three arrays: ids and seqs interleaved, bodies and gone states (both
/// aligned with the ids; gone empty when the session has none). Nothing when the window is
/// empty. Without a user or gone states the entries are not walked.
const READ_BY_SEQ: &str = r#"
-- KEYS: seq zset, bodies, gone, views, time zset
-- ARGV: after, before, count, user ('' = none)
local lowest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #lowest == 0 then return false end
local highest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local user = ARGV[4]
local loaded = '1'
local clear = nil
if user ~= '' then
  if redis.call('HEXISTS', KEYS[4], LOADED) == 0 then loaded = '0' end
  clear = redis.call('HGET', KEYS[4], clear_field(user))
end
local out = {lowest[2], tostring(redis.call('ZCARD', KEYS[1])), highest[2], loaded, '0'}
if loaded == '0' then return out end
local wanted = tonumber(ARGV[3])
local after, before = '(' .. ARGV[1], '(' .. ARGV[2]
local any_gone = redis.call('EXISTS', KEYS[3]) == 1
if user == '' and not any_gone then
  local entries = redis.call('ZRANGEBYSCORE', KEYS[1], after, before, 'WITHSCORES', 'LIMIT', 0, wanted)
  if #entries / 2 < wanted then out[5] = '1' end
  local ids = {}
  for i = 1, #entries, 2 do ids[#ids + 1] = entries[i] end
  out[6] = entries
  out[7] = #ids > 0 and many('HMGET', KEYS[2], ids) or {}
  out[8] = {}
  return out
end
local shown, gone_shown = {}, {}
local offset, exhausted = 0, false
-- Each further read is as large as what is still missing; a user hiding most of the range
-- costs a few reads, never the whole window at once.
while #shown < 2 * wanted and not exhausted do
  local batch = wanted - #shown / 2
  local entries = redis.call('ZRANGEBYSCORE', KEYS[1], after, before, 'WITHSCORES', 'LIMIT', offset, batch)
  offset = offset + #entries / 2
  if #entries / 2 < batch then exhausted = true end
  if #entries == 0 then break end
  local ids = {}
  for i = 1, #entries, 2 do ids[#ids + 1] = entries[i] end
  local gone = {}
  if any_gone then gone = many('HMGET', KEYS[3], ids) end
  local hidden = {}
  if user ~= '' then
    local fields = {}
    local prefix = hide_prefix(user)
    for i, id in ipairs(ids) do fields[i] = prefix .. id end
    hidden = many('HMGET', KEYS[4], fields)
  end
  local times = {}
  if clear then times = many('ZMSCORE', KEYS[5], ids) end
  for i, id in ipairs(ids) do
    local cleared = clear and times[i] and tonumber(times[i]) <= tonumber(clear)
    if not hidden[i] and gone[i] ~= 'deleted' and not cleared then
      shown[#shown + 1] = id
      shown[#shown + 1] = entries[2 * i]
      gone_shown[#gone_shown + 1] = gone[i] or ''
    end
  end
end
if exhausted then out[5] = '1' end
local ids = {}
for i = 1, #shown, 2 do ids[#ids + 1] = shown[i] end
out[6] = shown
out[7] = #ids > 0 and many('HMGET', KEYS[2], ids) or {}
out[8] = gone_shown
return out
"#;

/// One message of the window as `user` may see it, for a read by id. Reply: body, gone state;
/// `{'views'}` when the session's per-user views are not loaded; nothing when the window does
/// not list it with a body, or when it is deleted, hidden or cleared for the user — the
/// databases answer those.
const READ_ONE: &str = r#"
-- KEYS: seq zset, bodies, gone, views, time zset; ARGV: message_id, user ('' = none)
local id, user = ARGV[1], ARGV[2]
if not redis.call('ZSCORE', KEYS[1], id) then return false end
local body = redis.call('HGET', KEYS[2], id)
if not body then return false end
local gone = redis.call('HGET', KEYS[3], id) or ''
if gone == 'deleted' then return false end
if user ~= '' then
  if redis.call('HEXISTS', KEYS[4], LOADED) == 0 then return {'views'} end
  if redis.call('HEXISTS', KEYS[4], hide_prefix(user) .. id) == 1 then return false end
  local clear = redis.call('HGET', KEYS[4], clear_field(user))
  if clear and tonumber(redis.call('ZSCORE', KEYS[5], id) or '0') <= tonumber(clear) then return false end
end
return {body, gone}
"#;

/// Merges a database read into a window: the newest messages of the session, complete above
/// ARGV[3] (or the whole session). ARGV[4] is the session's ticket (`SessionKeys::tickets`)
/// read before the database read: a body a command put after a later ticket is newer than this
/// read and is kept (a message such a command changed without a body stays without one, and
/// the window's completeness is left unknown, so the next page refills it); every other body
/// is replaced and stamped with that ticket. A message's
/// gone fact from the database (recalled, burn time) is added where the gone hash has none.
/// Keeps the lower of the two floors, then trims like the writer does (`TRIM_WINDOW`).
const FILL: &str = r#"
-- KEYS: seq zset, bodies, time zset, meta, gone, stamps
-- ARGV: window, ttl, floor of this fill, ticket, then groups: seq, id, ts_us, body, gone ('' = none)
local ticket = tonumber(ARGV[4])
local bodiless = {}
for i = 5, #ARGV, 5 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], ARGV[i + 2], ARGV[i + 1])
  local stamp = redis.call('HGET', KEYS[6], ARGV[i + 1])
  if not stamp or tonumber(stamp) <= ticket then
    redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 3])
    redis.call('HSET', KEYS[6], ARGV[i + 1], ARGV[4])
  elseif redis.call('HEXISTS', KEYS[2], ARGV[i + 1]) == 0 then
    bodiless[#bodiless + 1] = ARGV[i + 1]
  end
  if ARGV[i + 4] ~= '' then redis.call('HSETNX', KEYS[5], ARGV[i + 1], ARGV[i + 4]) end
end
local floor = tonumber(ARGV[3])
local current = redis.call('HGET', KEYS[4], 'floor_us')
if current and tonumber(current) < floor then floor = tonumber(current) end
local evicted_max = trim_window(KEYS[1], KEYS[3], KEYS[2], KEYS[6], tonumber(ARGV[1]))
if evicted_max and evicted_max > floor then floor = evicted_max end
-- A message a command changed after this read, listed without its body: the next page
-- refills (after a later ticket) rather than trusting the window around it.
local listed_bodiless = false
for _, id in ipairs(bodiless) do
  if redis.call('ZSCORE', KEYS[1], id) then listed_bodiless = true end
end
if listed_bodiless then
  redis.call('HDEL', KEYS[4], 'floor_us')
else
  redis.call('HSET', KEYS[4], 'floor_us', string.format('%.0f', floor))
end
-- Tickets of messages the window does not list matter only to fills begun before them: drop
-- those a minute older than this one's (tickets run with the clock in µs).
local stamps = redis.call('HGETALL', KEYS[6])
for k = 1, #stamps, 2 do
  if tonumber(stamps[k + 1]) < ticket - 60000000 and not redis.call('ZSCORE', KEYS[1], stamps[k]) then
    redis.call('HDEL', KEYS[6], stamps[k])
  end
end
for k = 1, 5 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
redis.call('EXPIRE', KEYS[6], ARGV[2])
return 1
"#;

/// Records what happened to messages, keeping the strongest fact: deleted beats recalled
/// beats burn, and of two burns the earlier (fills only add facts where none is).
const MARK_GONE: &str = r#"
-- KEYS: gone; ARGV: ttl, then pairs: message_id, state
local function rank(state)
  if state == 'deleted' then return 3 end
  if string.sub(state, 1, 9) == 'recalled:' then return 2 end
  if string.sub(state, 1, 5) == 'burn:' then return 1 end
  return 0
end
for i = 2, #ARGV, 2 do
  local id, new = ARGV[i], ARGV[i + 1]
  local current = redis.call('HGET', KEYS[1], id)
  local keep = false
  if current then
    local a, b = rank(current), rank(new)
    if a > b then keep = true end
    if a == b and a == 1 and tonumber(string.sub(current, 6)) <= tonumber(string.sub(new, 6)) then keep = true end
  end
  if not keep then redis.call('HSET', KEYS[1], id, new) end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"#;

/// The session's ticket counter (see `SessionKeys::tickets`), first raised to the clock (µs)
/// when behind it, so tickets follow the clock and none repeats one handed out before the
/// counter expired. With ARGV[2] = '1' (a command) it hands out the next ticket; with '0' (a
/// fill, before its database read) it returns the last one: every later ticket is above it,
/// and it is above every ticket handed out before the counter expired.
const TICKET: &str = r#"
-- KEYS: ticket counter; ARGV: ttl, take ('1') or read ('0')
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
if tonumber(redis.call('GET', KEYS[1]) or '0') < clock then
  redis.call('SET', KEYS[1], string.format('%.0f', clock))
end
local ticket = tonumber(redis.call('GET', KEYS[1]))
if ARGV[2] == '1' then ticket = redis.call('INCR', KEYS[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return ticket
"#;

/// Puts a message's body, read from the databases after the command took ticket ARGV[2],
/// into the window, unless a body read at the same or a later ticket is there. A message the
/// window does not list gets its body too when the writer seems yet to add it (its seq is above
/// the session state's `last_seq`; the writer keeps a body it finds). Any other unlisted
/// message keeps only the ticket, and loses any body: a fill that read it before this command
/// then lists it without a body (the database answers for it) instead of with its older read,
/// and so does the writer if `last_seq` was ahead of it (a state rebuilt from the databases);
/// either leaves the window's completeness unknown, so the next page refills it.
/// Reply: 1 when the body was written.
const REWRITE: &str = r#"
-- KEYS: bodies, stamps, seq zset, state; ARGV: message_id, ticket, body, ttl, seq
local stamp = redis.call('HGET', KEYS[2], ARGV[1])
if stamp and tonumber(stamp) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
local listed = redis.call('ZSCORE', KEYS[3], ARGV[1])
local applied = tonumber(redis.call('HGET', KEYS[4], 'last_seq') or '0')
if not listed and tonumber(ARGV[5]) <= applied then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// Merges per-user view facts: hides (field -> '1') and clear watermarks (the higher wins).
/// ARGV[2] = '1' marks the views as loaded from the database.
const MERGE_VIEWS: &str = r#"
-- KEYS: views; ARGV: ttl, loaded flag, then pairs: field, value
for i = 3, #ARGV, 2 do
  local field, value = ARGV[i], ARGV[i + 1]
  if is_clear_field(field) then
    local current = redis.call('HGET', KEYS[1], field)
    if not current or tonumber(current) < tonumber(value) then redis.call('HSET', KEYS[1], field, value) end
  else
    redis.call('HSET', KEYS[1], field, value)
  end
end
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], LOADED, '1') end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"#;

/// A session's state for one user: the state fields, the user's read seq ('' = not known),
/// whether the session's per-user views would be needed and are missing ('1'/'0'), and, when
/// the hot window holds every message above the read seq and the views are loaded, how many
/// of those the user can see ('' = the window cannot tell). Nothing when the state itself is
/// not known. The user sent none of them: their own messages moved their read seq.
const SESSION_STATE: &str = r#"
-- KEYS: state, reads, seq zset, gone, views, time zset
-- ARGV: user, now_us
local state = redis.call('HMGET', KEYS[1], 'last_seq', 'last_message_id', 'last_sender_id', 'last_message_ts', 'message_count')
if not state[1] then return false end
local read = redis.call('HGET', KEYS[2], ARGV[1])
local out = {state[1], state[2] or '', state[3] or '', state[4] or '0', state[5] or state[1], read or '', '0', ''}
if not read then return out end
local last, read_seq = tonumber(state[1]), tonumber(read)
if read_seq >= last then
  out[8] = '0'
  return out
end
-- Only a window holding every seq of (read, last] can count: seqs are unique, so it does when
-- it holds that many of them.
if redis.call('ZCOUNT', KEYS[3], '(' .. read, state[1]) ~= last - read_seq then return out end
if redis.call('HEXISTS', KEYS[5], LOADED) == 0 then
  out[7] = '1'
  return out
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. read, state[1])
local clear = redis.call('HGET', KEYS[5], clear_field(ARGV[1]))
local now = tonumber(ARGV[2])
local prefix = hide_prefix(ARGV[1])
local unread = 0
for _, id in ipairs(ids) do
  local visible = true
  local gone = redis.call('HGET', KEYS[4], id)
  if gone then
    if gone == 'deleted' or string.sub(gone, 1, 9) == 'recalled:' then visible = false end
    if string.sub(gone, 1, 5) == 'burn:' and tonumber(string.sub(gone, 6)) <= now then visible = false end
  end
  if visible and redis.call('HEXISTS', KEYS[5], prefix .. id) == 1 then visible = false end
  if visible and clear then
    local ts = redis.call('ZSCORE', KEYS[6], id)
    if ts and tonumber(ts) <= tonumber(clear) then visible = false end
  end
  if visible then unread = unread + 1 end
end
out[8] = tostring(unread)
return out
"#;

/// Puts a session's newest message into its state when the state is missing or older (the
/// writer may have moved it on meanwhile).
const SET_STATE: &str = r#"
-- KEYS: state; ARGV: last_seq, message_id, sender_id, message_type, content_type, ts_ms, ttl
if tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0') then
  redis.call('HSET', KEYS[1], 'last_seq', ARGV[1], 'last_message_id', ARGV[2], 'last_sender_id', ARGV[3],
    'last_message_type', ARGV[4], 'last_content_type', ARGV[5], 'last_message_ts', ARGV[6], 'message_count', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"#;

/// Moves a user's read seq forward (or sets it when unknown); returns the read seq now held.
const ADVANCE_READ: &str = r#"
-- KEYS: reads; ARGV: user, seq, ttl
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current or tonumber(ARGV[2]) > tonumber(current) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  current = ARGV[2]
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return tonumber(current)
"#;

/// A session's state as Redis holds it, for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedState {
    pub last_seq: i64,
    pub last_message_id: String,
    pub last_sender_id: String,
    pub last_message_ms: i64,
    pub message_count: i64,
    /// `None`: not known (Redis lost it, or the user never sent nor read).
    pub read_seq: Option<i64>,
    /// The window could count the unread messages once the session's per-user views (hides,
    /// clears) are loaded into Redis.
    pub needs_views: bool,
    /// `None`: the hot window cannot tell.
    pub unread: Option<i64>,
}

impl CachedState {
    fn parse(reply: &[Vec<u8>]) -> Option<Self> {
        let [last_seq, message_id, sender_id, message_ms, count, read, loaded, unread] = reply else { return None };
        let optional = |field: &[u8]| if field.is_empty() { Some(None) } else { parse_i64(field).map(Some) };
        Some(Self {
            last_seq: parse_i64(last_seq)?,
            last_message_id: String::from_utf8(message_id.clone()).ok()?,
            last_sender_id: String::from_utf8(sender_id.clone()).ok()?,
            last_message_ms: parse_i64(message_ms)?,
            message_count: parse_i64(count)?,
            read_seq: optional(read)?,
            needs_views: loaded.as_slice() == b"1",
            unread: optional(unread)?,
        })
    }
}

/// A cached message with its overlays.
#[derive(Debug, Clone)]
pub struct CachedEntry {
    pub id: String,
    /// Timestamp (µs) in time reads, seq in seq reads, 0 in reads by id.
    pub position: i64,
    /// The message encoded as it is sent; empty when missing.
    pub body: Vec<u8>,
    /// `deleted`, `recalled:<µs>`, `burn:<µs>`, or empty.
    pub gone: String,
    pub hidden: bool,
}

/// Newest-first window entries in a time range.
#[derive(Debug)]
pub struct TimeSlice {
    /// Every message of the session with a timestamp above this (µs) is in the window.
    pub floor_us: i64,
    /// The lower bound actually read: the request's, raised by the user's clear watermark.
    pub min_us: i64,
    pub entries: Vec<CachedEntry>,
}

/// Ascending window entries in a seq range that the user can see (none hidden, deleted or
/// cleared for them).
#[derive(Debug)]
pub struct SeqSlice {
    pub lowest_seq: i64,
    pub highest_seq: i64,
    pub size: i64,
    /// Every entry of the window in the range was read (fewer may be shown than were asked).
    pub exhausted: bool,
    pub entries: Vec<CachedEntry>,
}

/// What a window read found.
pub enum WindowRead<T> {
    Found(T),
    /// Completeness unknown: fill the window first (for a read by id: the window cannot
    /// answer).
    Unknown,
    /// The session's per-user views are not in Redis: load them first.
    ViewsNotLoaded,
}

/// A message to put in a window by [`RedisCache::fill`].
pub struct FillEntry {
    pub seq: i64,
    pub message_id: String,
    pub timestamp_us: i64,
    pub body: Vec<u8>,
    /// What happened to the message, as `SessionKeys::gone` spells it.
    pub gone: Option<String>,
}

type Connection = RedisConnection;

#[derive(Clone)]
pub struct RedisCache {
    connection: Arc<OnceCell<Connection>>,
    /// With `REDIS_WAIT_REPLICAS`, the connection of commands' waited writes: `WAIT` blocks the
    /// connection that sent it, and reads must not queue behind a replica's acknowledgement.
    waited: Arc<OnceCell<Connection>>,
    in_flight: Arc<AtomicI64>,
    paused_until_ms: Arc<AtomicU64>,
    started: Instant,
    hot_ttl: Duration,
    hot_window: usize,
    /// Replicas that must hold a command's writes before it answers (`REDIS_WAIT_REPLICAS`).
    wait_replicas: usize,
    read_by_time: Script,
    read_by_seq: Script,
    read_one: Script,
    fill: Script,
    mark_gone: Script,
    ticket: Script,
    rewrite: Script,
    merge_views: Script,
    session_state: Script,
    set_state: Script,
    advance_read: Script,
}

impl RedisCache {
    /// Connects, or — when Redis does not answer at start — keeps trying in the background
    /// while reads skip the cache.
    pub async fn connect(
        target: &RedisTarget,
        hot_ttl: Duration,
        hot_window: usize,
        wait_replicas: usize,
    ) -> RedisResult<Self> {
        // A URL that cannot be used is an error at start, not a cache that never connects.
        for url in &target.urls {
            redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
        }
        let cache = Self {
            connection: Arc::new(OnceCell::new()),
            waited: Arc::new(OnceCell::new()),
            in_flight: Arc::default(),
            paused_until_ms: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
            hot_ttl,
            hot_window,
            wait_replicas,
            read_by_time: Script::new(&format!("{VIEW_FIELDS_LUA}{MANY}{READ_BY_TIME}")),
            read_by_seq: Script::new(&format!("{VIEW_FIELDS_LUA}{MANY}{READ_BY_SEQ}")),
            read_one: Script::new(&format!("{VIEW_FIELDS_LUA}{READ_ONE}")),
            fill: Script::new(&format!("{TRIM_WINDOW}{FILL}")),
            mark_gone: Script::new(MARK_GONE),
            ticket: Script::new(TICKET),
            rewrite: Script::new(REWRITE),
            merge_views: Script::new(&format!("{VIEW_FIELDS_LUA}{MERGE_VIEWS}")),
            session_state: Script::new(&format!("{VIEW_FIELDS_LUA}{SESSION_STATE}")),
            set_state: Script::new(SET_STATE),
            advance_read: Script::new(ADVANCE_READ),
        };
        match Self::open(target, cache.in_flight.clone(), wait_replicas).await {
            Ok((connection, waited)) => {
                cache.opened(connection, waited);
                return Ok(cache);
            }
            Err(error) => warn!(%error, "redis cache not reachable at start, reading from the databases"),
        }
        let (cache_later, target) = (cache.clone(), target.clone());
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                tokio::time::sleep(delay).await;
                match Self::open(&target, cache_later.in_flight.clone(), wait_replicas).await {
                    Ok((connection, waited)) => {
                        cache_later.opened(connection, waited);
                        info!("redis cache connected");
                        return;
                    }
                    Err(error) => warn!(%error, "redis cache still not reachable"),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
        Ok(cache)
    }

    /// The connection of reads and unwaited writes, and with `wait_replicas` the one of waited
    /// writes, whose replies may take WAIT's whole second.
    async fn open(
        target: &RedisTarget,
        in_flight: Arc<AtomicI64>,
        wait_replicas: usize,
    ) -> RedisResult<(Connection, Option<Connection>)> {
        let timeouts = Timeouts { connect: Duration::from_secs(1), response: Duration::from_millis(500), retries: 1 };
        let connection = RedisConnection::connect(target, timeouts, in_flight.clone()).await?;
        let waited = match wait_replicas {
            0 => None,
            _ => {
                let timeouts = Timeouts { response: timeouts.response + WAIT_TIMEOUT, ..timeouts };
                Some(RedisConnection::connect(target, timeouts, in_flight).await?)
            }
        };
        Ok((connection, waited))
    }

    fn opened(&self, connection: Connection, waited: Option<Connection>) {
        if let Some(waited) = waited {
            let _ = self.waited.set(waited);
        }
        let _ = self.connection.set(connection);
    }

    /// The connection, unless not connected yet or paused after a failure.
    /// Commands in flight, for the pool metrics.
    pub fn in_flight(&self) -> Arc<AtomicI64> {
        self.in_flight.clone()
    }

    fn connection(&self) -> Option<Connection> {
        let now_ms = self.started.elapsed().as_millis() as u64;
        if now_ms < self.paused_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        self.connection.get().cloned()
    }

    fn failed(&self, error: &redis::RedisError) {
        warn!(%error, "redis cache failed, reading from the databases");
        let until = self.started.elapsed() + PAUSE_AFTER_FAILURE;
        self.paused_until_ms.store(until.as_millis() as u64, Ordering::Relaxed);
    }

    /// Runs a cache call; `None` when the cache is unavailable or the call failed.
    async fn call<T>(&self, call: impl AsyncFnOnce(Connection) -> RedisResult<T>) -> Option<T> {
        let connection = self.connection()?;
        match call(connection).await {
            Ok(value) => Some(value),
            Err(error) => {
                self.failed(&error);
                None
            }
        }
    }

    /// Like [`Self::call`] but reports the failure, and does not wait out the pause after an
    /// earlier failure: for what a command depends on. Writes a replica was too late to
    /// acknowledge fail the command but do not pause the cache for reads: Redis answered.
    async fn must<T>(&self, call: impl AsyncFnOnce(Connection) -> RedisResult<T>) -> Result<T, CacheDown> {
        self.must_on(self.connection.get().cloned(), call).await
    }

    async fn must_on<T>(
        &self,
        connection: Option<Connection>,
        call: impl AsyncFnOnce(Connection) -> RedisResult<T>,
    ) -> Result<T, CacheDown> {
        let Some(connection) = connection else { return Err(CacheDown) };
        match call(connection).await {
            Ok(value) => Ok(value),
            Err(error) if is_unreplicated(&error) => {
                warn!(%error, "a command's cache writes were not acknowledged by enough replicas");
                Err(CacheDown)
            }
            Err(error) => {
                self.failed(&error);
                Err(CacheDown)
            }
        }
    }

    /// Up to `count` entries with timestamps in [min_us, max_us], newest first, for `user`
    /// ('' = no per-user filtering). `None`: no cache.
    pub async fn by_time(
        &self,
        keys: &SessionKeys,
        max_us: i64,
        min_us: i64,
        count: usize,
        user: &str,
    ) -> Option<WindowRead<TimeSlice>> {
        self.call(async |mut connection| {
            let reply: Option<Vec<Value>> = self
                .read_by_time
                .key(keys.hot_meta())
                .key(keys.hot_time_index())
                .key(keys.hot_bodies())
                .key(keys.gone())
                .key(keys.views())
                .arg(max_us)
                .arg(min_us)
                .arg(count)
                .arg(user)
                .invoke_async(&mut connection)
                .await?;
            let Some(reply) = reply else { return Ok(Some(WindowRead::Unknown)) };
            let mut reply = reply.into_iter();
            let (Some(floor), Some(loaded), Some(min)) = (reply.next(), reply.next(), reply.next()) else {
                return Ok(None);
            };
            if bulk(loaded).as_deref() != Some(b"1") {
                return Ok(Some(WindowRead::ViewsNotLoaded));
            }
            Ok((|| {
                let [entries, bodies, gone, hidden] = [reply.next()?, reply.next()?, reply.next()?, reply.next()?];
                Some(WindowRead::Found(TimeSlice {
                    floor_us: parse_i64(&bulk(floor)?)?,
                    min_us: parse_i64(&bulk(min)?)?,
                    entries: entries_of(entries, bodies, gone, Some(hidden))?,
                }))
            })())
        })
        .await
        .flatten()
    }

    /// Up to `count` entries with seq in (after, before) that `user` can see, ascending, with
    /// the window's extent (see [`READ_BY_SEQ`]).
    pub async fn by_seq(
        &self,
        keys: &SessionKeys,
        after: i64,
        before: i64,
        count: usize,
        user: &str,
    ) -> Option<WindowRead<SeqSlice>> {
        self.call(async |mut connection| {
            let reply: Option<Vec<Value>> = self
                .read_by_seq
                .key(keys.hot_index())
                .key(keys.hot_bodies())
                .key(keys.gone())
                .key(keys.views())
                .key(keys.hot_time_index())
                .arg(after)
                .arg(before)
                .arg(count)
                .arg(user)
                .invoke_async(&mut connection)
                .await?;
            let Some(reply) = reply else { return Ok(Some(WindowRead::Unknown)) };
            let mut reply = reply.into_iter();
            let mut header = || reply.next().and_then(bulk);
            let (Some(lowest), Some(size), Some(highest), Some(loaded), Some(exhausted)) =
                (header(), header(), header(), header(), header())
            else {
                return Ok(None);
            };
            if loaded.as_slice() != b"1" {
                return Ok(Some(WindowRead::ViewsNotLoaded));
            }
            Ok((|| {
                let [entries, bodies, gone] = [reply.next()?, reply.next()?, reply.next()?];
                Some(WindowRead::Found(SeqSlice {
                    lowest_seq: parse_i64(&lowest)?,
                    size: parse_i64(&size)?,
                    highest_seq: parse_i64(&highest)?,
                    exhausted: exhausted.as_slice() == b"1",
                    entries: entries_of(entries, bodies, gone, None)?,
                }))
            })())
        })
        .await
        .flatten()
    }

    /// Message `message_id` of a session's window as `user` may see it ('' = no per-user
    /// filtering), when the window can answer for it (see [`READ_ONE`]); `Unknown` when it
    /// cannot.
    pub async fn one(&self, keys: &SessionKeys, message_id: &str, user: &str) -> Option<WindowRead<CachedEntry>> {
        self.call(async |mut connection| {
            let reply: Option<Vec<Vec<u8>>> = self
                .read_one
                .key(keys.hot_index())
                .key(keys.hot_bodies())
                .key(keys.gone())
                .key(keys.views())
                .key(keys.hot_time_index())
                .arg(message_id)
                .arg(user)
                .invoke_async(&mut connection)
                .await?;
            let mut reply = reply.unwrap_or_default().into_iter();
            Ok(match (reply.next(), reply.next()) {
                (Some(body), Some(gone)) => String::from_utf8(gone).ok().map(|gone| {
                    WindowRead::Found(CachedEntry { id: message_id.to_owned(), position: 0, body, gone, hidden: false })
                }),
                (Some(_), None) => Some(WindowRead::ViewsNotLoaded),
                _ => Some(WindowRead::Unknown),
            })
        })
        .await
        .flatten()
    }

    /// The session of a tenant's message, when a reader recorded it (see
    /// [`message_session`]).
    pub async fn session_of(&self, tenant_id: &str, message_id: &str) -> Option<String> {
        let key = message_session(tenant_id, message_id);
        self.call(async |mut connection| connection.get::<_, Option<String>>(&key).await).await.flatten()
    }

    /// Records the session of a tenant's message for later reads by id.
    pub async fn remember_session_of(&self, tenant_id: &str, message_id: &str, session_id: &str) {
        let key = message_session(tenant_id, message_id);
        let ttl = self.hot_ttl.as_secs().max(1);
        self.call(async |mut connection| connection.set_ex::<_, _, ()>(&key, session_id, ttl).await).await;
    }

    /// The session's last ticket, read before a database read that may fill the window (see
    /// [`TICKET`]).
    pub async fn ticket_now(&self, keys: &SessionKeys) -> Option<i64> {
        let ttl = self.hot_ttl.as_secs().max(1);
        self.call(async |mut connection| {
            self.ticket.key(keys.tickets()).arg(ttl).arg("0").invoke_async::<i64>(&mut connection).await
        })
        .await
    }

    /// Puts the newest messages of a session (from a database read begun after `ticket`) into
    /// its window. `complete` says the read returned the whole session.
    pub async fn fill(&self, keys: &SessionKeys, ticket: i64, messages: &[FillEntry], complete: bool) {
        let floor = match (complete, messages.iter().map(|entry| entry.timestamp_us).min()) {
            (true, _) | (false, None) => HOT_FLOOR_ALL,
            (false, Some(oldest)) => oldest,
        };
        let ttl = self.hot_ttl.as_secs().max(1);
        let _ = self
            .call(async |mut connection| {
                let mut invocation = self.fill.key(keys.hot_index());
                invocation
                    .key(keys.hot_bodies())
                    .key(keys.hot_time_index())
                    .key(keys.hot_meta())
                    .key(keys.gone())
                    .key(keys.hot_stamps())
                    .arg(self.hot_window)
                    .arg(ttl)
                    .arg(floor)
                    .arg(ticket);
                for entry in messages {
                    invocation
                        .arg(entry.seq)
                        .arg(&entry.message_id)
                        .arg(entry.timestamp_us)
                        .arg(entry.body.as_slice())
                        .arg(entry.gone.as_deref().unwrap_or_default());
                }
                invocation.invoke_async::<i64>(&mut connection).await
            })
            .await;
    }

    /// A command's write: `invocation` of `script`, which with `REDIS_WAIT_REPLICAS` returns
    /// only once that many replicas hold it (`WAIT` after it, on its key's node), so a failover
    /// to a replica that acknowledged it cannot lose what the command's reply stands for.
    async fn must_write(&self, script: &Script, invocation: &redis::ScriptInvocation<'_>) -> Result<(), CacheDown> {
        self.must_write_waiting(script, invocation, self.wait_replicas).await
    }

    async fn must_write_waiting(
        &self,
        script: &Script,
        invocation: &redis::ScriptInvocation<'_>,
        replicas: usize,
    ) -> Result<(), CacheDown> {
        let connection = if replicas > 0 { self.waited.get() } else { self.connection.get() };
        self.must_on(connection.cloned(), async |connection| {
            let mut pipe = redis::pipe();
            pipe.invoke_script(invocation);
            query_replicated::<Vec<Value>>(&connection, &pipe, &[script], replicas).await.map(drop)
        })
        .await
    }

    /// Lays facts over cached messages of one session, `(message id, state)` each (see
    /// `SessionKeys::gone`), in one call.
    pub async fn mark_gone(&self, keys: &SessionKeys, facts: &[(&str, &str)]) -> Result<(), CacheDown> {
        let ttl = self.hot_ttl.as_secs().max(1);
        let mut invocation = self.mark_gone.key(keys.gone());
        invocation.arg(ttl);
        for (message_id, state) in facts {
            invocation.arg(message_id).arg(state);
        }
        self.must_write(&self.mark_gone, &invocation).await
    }

    /// Merges per-user view facts (`hidden_view_field` → 1, `clear:<user>` → µs); `loaded`
    /// marks them as the complete set from the database.
    pub async fn merge_views(
        &self,
        keys: &SessionKeys,
        facts: &[(String, String)],
        loaded: bool,
    ) -> Result<(), CacheDown> {
        let ttl = self.hot_ttl.as_secs().max(1);
        let mut invocation = self.merge_views.key(keys.views());
        invocation.arg(ttl).arg(if loaded { "1" } else { "0" });
        for (field, value) in facts {
            invocation.arg(field).arg(value);
        }
        // Views loaded from the database need no replica: they are rebuilt from it when lost.
        let replicas = if loaded { 0 } else { self.wait_replicas };
        self.must_write_waiting(&self.merge_views, &invocation, replicas).await
    }

    /// The session's next ticket, taken by a command after its database write and before it
    /// reads the message back for [`Self::rewrite`].
    pub async fn ticket(&self, keys: &SessionKeys) -> Result<i64, CacheDown> {
        let ttl = self.hot_ttl.as_secs().max(1);
        self.must(async |mut connection| {
            self.ticket.key(keys.tickets()).arg(ttl).arg("1").invoke_async::<i64>(&mut connection).await
        })
        .await
    }

    /// Puts a message's body (`seq` its seq, 0 when unknown), read after `ticket`, into the
    /// window (see [`REWRITE`]).
    pub async fn rewrite(
        &self,
        keys: &SessionKeys,
        message_id: &str,
        seq: i64,
        ticket: i64,
        body: &[u8],
    ) -> Result<(), CacheDown> {
        let ttl = self.hot_ttl.as_secs().max(1);
        let mut invocation = self.rewrite.key(keys.hot_bodies());
        invocation.key(keys.hot_stamps()).key(keys.hot_index()).key(keys.state());
        invocation.arg(message_id).arg(ticket).arg(body).arg(ttl).arg(seq);
        self.must_write(&self.rewrite, &invocation).await
    }

    /// Each session's state for `user`, in one round trip; per session `None` when Redis does
    /// not know its state. `None` altogether: no cache.
    pub async fn session_states(
        &self,
        sessions: &[SessionKeys],
        user: &str,
        now_us: i64,
    ) -> Option<Vec<Option<CachedState>>> {
        self.call(async |connection| {
            let mut pipe = redis::pipe();
            let invocations: Vec<_> = sessions
                .iter()
                .map(|keys| {
                    let mut invocation = self.session_state.key(keys.state());
                    invocation
                        .key(keys.reads())
                        .key(keys.hot_index())
                        .key(keys.gone())
                        .key(keys.views())
                        .key(keys.hot_time_index())
                        .arg(user)
                        .arg(now_us);
                    invocation
                })
                .collect();
            for invocation in &invocations {
                pipe.invoke_script(invocation);
            }
            let replies: Vec<Option<Vec<Vec<u8>>>> = query_calling(&connection, &pipe, &[&self.session_state]).await?;
            Ok(replies.iter().map(|reply| reply.as_deref().and_then(CachedState::parse)).collect())
        })
        .await
    }

    /// Puts back what a read rebuilt from the databases, in one round trip: sessions' newest
    /// messages into their states (unless a state shows a newer one) and `user`'s read seqs
    /// (unless Redis holds a later one). Best effort: what does not land is rebuilt again.
    pub async fn remember(&self, heads: &[(SessionKeys, SessionHead)], reads: &[(SessionKeys, i64)], user: &str) {
        if heads.is_empty() && reads.is_empty() {
            return;
        }
        let _ = self
            .call(async |connection| {
                let mut pipe = redis::pipe();
                for (keys, head) in heads {
                    let mut invocation = self.set_state.key(keys.state());
                    invocation
                        .arg(head.last_seq)
                        .arg(&head.last_message_id)
                        .arg(&head.last_sender_id)
                        .arg(head.message_type)
                        .arg(&head.content_type)
                        .arg(head.last_message_time.timestamp_millis())
                        .arg(SESSION_STATE_TTL_SECONDS);
                    pipe.invoke_script(&invocation);
                }
                for (keys, read_seq) in reads {
                    let mut advance = self.advance_read.key(keys.reads());
                    advance.arg(user).arg(*read_seq).arg(SESSION_STATE_TTL_SECONDS);
                    pipe.invoke_script(&advance);
                }
                query_calling::<()>(&connection, &pipe, &[&self.set_state, &self.advance_read]).await
            })
            .await;
    }

    /// Moves `user`'s read seq in a session forward to `seq`.
    pub async fn advance_read(&self, keys: &SessionKeys, user: &str, seq: i64) -> Result<(), CacheDown> {
        let mut advance = self.advance_read.key(keys.reads());
        advance.arg(user).arg(seq).arg(SESSION_STATE_TTL_SECONDS);
        self.must_write(&self.advance_read, &advance).await
    }

    pub fn window(&self) -> usize {
        self.hot_window
    }

    /// Whether a cache is in use at all (connected or still connecting).
    pub fn is_connected(&self) -> bool {
        self.connection.get().is_some()
    }
}

/// Redis did not take a write a command needs.
#[derive(Debug, thiserror::Error)]
#[error("the message cache is unavailable")]
pub struct CacheDown;

fn parse_i64(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.parse::<i64>().ok().or_else(|| text.parse::<f64>().ok().map(|value| value as i64))
}

fn bulk(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        _ => None,
    }
}

/// An array reply of strings, `None` where a value was missing (Lua's `false`).
fn bulks(value: Value) -> Option<Vec<Option<Vec<u8>>>> {
    match value {
        Value::Array(values) => values
            .into_iter()
            .map(|value| match value {
                Value::BulkString(bytes) => Some(Some(bytes)),
                // Lua's `false`: nil in RESP2, a boolean in RESP3.
                Value::Nil | Value::Boolean(false) => Some(None),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// Window entries from a read's arrays, taking the bodies without copying them: ids and
/// positions interleaved, then bodies, gone states and hidden flags aligned with the ids (an
/// empty array: none of them has one).
fn entries_of(pairs: Value, bodies: Value, gone: Value, hidden: Option<Value>) -> Option<Vec<CachedEntry>> {
    let pairs = bulks(pairs)?;
    let mut bodies = bulks(bodies)?.into_iter();
    let mut gone = bulks(gone)?.into_iter();
    let mut hidden = match hidden {
        Some(hidden) => bulks(hidden)?.into_iter(),
        None => Vec::new().into_iter(),
    };
    let mut entries = Vec::with_capacity(pairs.len() / 2);
    let mut pairs = pairs.into_iter();
    while let (Some(id), Some(position)) = (pairs.next(), pairs.next()) {
        entries.push(CachedEntry {
            id: String::from_utf8(id?).ok()?,
            position: parse_i64(&position?)?,
            body: bodies.next().flatten().unwrap_or_default(),
            gone: gone.next().flatten().map(String::from_utf8).transpose().ok()?.unwrap_or_default(),
            hidden: hidden.next().flatten().is_some(),
        });
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use redis::AsyncCommands as _;

    use super::*;

    /// A cache on the test Redis (`REDIS_URL`) and keys of a session no other test uses.
    async fn cache_and_keys() -> anyhow::Result<(RedisCache, SessionKeys, redis::aio::MultiplexedConnection)> {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let cache = RedisCache::connect(&RedisTarget::new(&url, false), Duration::from_secs(60), 10, 0).await?;
        for _ in 0..100 {
            if cache.is_connected() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::ensure!(cache.is_connected(), "Redis is not reachable at {url}");
        let tenant = format!("stamps-{}", uuid::Uuid::new_v4());
        let connection = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
        Ok((cache, SessionKeys::new(&tenant, "s"), connection))
    }

    fn entry(seq: i64, id: &str, body: &str) -> FillEntry {
        FillEntry { seq, message_id: id.into(), timestamp_us: seq, body: body.into(), gone: None }
    }

    /// The scripts spell the views' fields as `keys` does, for users whose ids hold the
    /// separator or characters of several bytes.
    #[tokio::test]
    async fn scripts_spell_view_fields_as_the_keys_module() -> anyhow::Result<()> {
        let (_cache, _keys, mut redis) = cache_and_keys().await?;
        let script = Script::new(&format!(
            "{VIEW_FIELDS_LUA} return {{clear_field(ARGV[1]), hide_prefix(ARGV[1]) .. ARGV[2], \
             tostring(is_clear_field(clear_field(ARGV[1]))), tostring(is_clear_field(ARGV[2]))}}"
        ));
        for user in ["bob", "a:b", "é李", ""] {
            let spelled: Vec<String> = script.arg(user).arg("m:1").invoke_async(&mut redis).await?;
            let expected = [
                flare_storage_common::keys::clear_view_field(user),
                flare_storage_common::keys::hidden_view_field(user, "m:1"),
                "true".to_owned(),
                "false".to_owned(),
            ];
            assert_eq!(spelled, expected, "user {user:?}");
        }
        Ok(())
    }

    /// The protocol that keeps the newest body whatever order commands and fills arrive in:
    /// a body read after a later ticket is never replaced by one read after an earlier one.
    #[tokio::test]
    async fn the_body_read_after_the_latest_ticket_stays() -> anyhow::Result<()> {
        let (cache, keys, mut redis) = cache_and_keys().await?;
        let body = async |redis: &mut redis::aio::MultiplexedConnection, id: &str| -> anyhow::Result<String> {
            Ok(redis.hget::<_, _, Option<String>>(keys.hot_bodies(), id).await?.unwrap_or_default())
        };
        // Tickets follow the clock (µs) and only grow, so they never repeat one handed out
        // before the counter expired; a fill's reading is the clock too, and below the next.
        let started = cache.ticket_now(&keys).await.unwrap_or_default();
        assert!(started > 1_700_000_000_000_000, "{started}");
        let first = cache.ticket(&keys).await.map_err(|_| anyhow::anyhow!("ticket"))?;
        let second = cache.ticket(&keys).await.map_err(|_| anyhow::anyhow!("ticket"))?;
        assert!(started < first && first < second, "{started} {first} {second}");
        let read = cache.ticket_now(&keys).await.unwrap_or_default();
        assert!(read >= second && read < cache.ticket(&keys).await.unwrap_or_default());
        let _: () = redis.hset(keys.state(), "last_seq", 3).await?;

        cache.fill(&keys, 0, &[entry(1, "a", "a0"), entry(2, "b", "b0"), entry(3, "c", "c0")], true).await;
        let rewrite = async |id: &str, seq: i64, ticket: i64, text: &str| {
            cache.rewrite(&keys, id, seq, ticket, text.as_bytes()).await.map_err(|_| anyhow::anyhow!("rewrite"))
        };
        rewrite("b", 2, first + 10, "b10").await?;
        rewrite("b", 2, first + 5, "b5").await?;
        assert_eq!(body(&mut redis, "b").await?, "b10", "a body read after an earlier ticket does not replace it");
        cache.fill(&keys, first + 7, &[entry(2, "b", "b-fill7"), entry(3, "c", "c-fill7")], true).await;
        assert_eq!(body(&mut redis, "b").await?, "b10", "nor does a fill begun before the command's ticket");
        assert_eq!(body(&mut redis, "c").await?, "c-fill7", "a body no command put is the fill's");
        cache.fill(&keys, first + 12, &[entry(2, "b", "b-fill12")], true).await;
        assert_eq!(body(&mut redis, "b").await?, "b-fill12", "a fill begun after it replaces it");
        rewrite("b", 2, first + 11, "b11").await?;
        assert_eq!(body(&mut redis, "b").await?, "b-fill12");

        // Not listed: a message the writer has yet to add gets its body (the writer keeps it);
        // an older one keeps only the ticket and loses any body, so a fill that read it before
        // lists it without one and leaves the window to be refilled.
        rewrite("d", 4, first + 20, "d20").await?;
        assert_eq!(body(&mut redis, "d").await?, "d20");
        let _: () = redis.hset(keys.hot_bodies(), "y", "y-old").await?;
        rewrite("y", 0, first + 21, "y21").await?;
        assert_eq!(body(&mut redis, "y").await?, "", "older than the session's applied seq");
        cache.fill(&keys, first + 15, &[entry(0, "y", "y-fill15")], true).await;
        assert_eq!(body(&mut redis, "y").await?, "", "the fill read it before the command");
        let floor: Option<String> = redis.hget(keys.hot_meta(), "floor_us").await?;
        assert_eq!(floor, None, "a window listing a message without its body is refilled");
        cache.fill(&keys, first + 21, &[entry(0, "y", "y-fill21")], true).await;
        assert_eq!(body(&mut redis, "y").await?, "y-fill21");
        let floor: Option<String> = redis.hget(keys.hot_meta(), "floor_us").await?;
        assert!(floor.is_some());
        let _: () = redis
            .del(&[keys.hot_index(), keys.hot_time_index(), keys.hot_bodies(), keys.hot_meta(), keys.hot_stamps()])
            .await?;
        let _: () = redis.del(&[keys.tickets(), keys.gone(), keys.state()]).await?;
        Ok(())
    }
}
