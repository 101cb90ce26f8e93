//! The hot cache the writer fills (layout in `flare_storage_common::keys`): one Lua call per
//! page read, a fill after a database read when the window's completeness is unknown.
//!
//! The cache is optional at run time: while Redis is unreachable every read goes to the
//! databases. After a failure the cache is skipped for [`PAUSE_AFTER_FAILURE`], so an outage
//! costs one timeout, not one per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flare_storage_common::keys::{HOT_FLOOR_ALL, SessionKeys};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};
use tokio::sync::OnceCell;
use tracing::{info, warn};

const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Newest-first entries of a window between two timestamps, with the window's floor; nothing
/// when the window's completeness is unknown.
const READ_BY_TIME: &str = r#"
-- KEYS[1] meta, KEYS[2] zset time -> id, KEYS[3] hash id -> body; ARGV max_us, min_us, count
local floor = redis.call('HGET', KEYS[1], 'floor_us')
if not floor then return false end
local entries = redis.call('ZREVRANGEBYSCORE', KEYS[2], ARGV[1], ARGV[2], 'WITHSCORES', 'LIMIT', 0, ARGV[3])
local out = {floor}
for i = 1, #entries, 2 do
  out[#out + 1] = entries[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[3], entries[i]) or ''
end
return out
"#;

/// Ascending entries of a window by seq in (ARGV[1], ARGV[2]), after the window's lowest seq
/// and size, so the caller can tell whether the window covers the range.
const READ_BY_SEQ: &str = r#"
-- KEYS[1] zset seq -> id, KEYS[2] hash id -> body; ARGV after (exclusive), before (exclusive), count
local lowest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #lowest == 0 then return false end
local out = {lowest[2], tostring(redis.call('ZCARD', KEYS[1]))}
local highest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
out[#out + 1] = highest[2]
local entries = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '(' .. ARGV[2], 'WITHSCORES', 'LIMIT', 0, ARGV[3])
for i = 1, #entries, 2 do
  out[#out + 1] = entries[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], entries[i]) or ''
end
return out
"#;

/// Merges a database read into a window: the newest messages of the session, complete above
/// ARGV[3] (or the whole session). Keeps the lower of the two floors, then trims like the
/// writer does.
const FILL: &str = r#"
-- KEYS[1] zset seq -> id, KEYS[2] hash id -> body, KEYS[3] zset time -> id, KEYS[4] meta
-- ARGV[1] window, ARGV[2] ttl, ARGV[3] floor of this fill, then groups: seq, id, ts_us, body
for i = 4, #ARGV, 4 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], ARGV[i + 2], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 3])
end
local floor = tonumber(ARGV[3])
local current = redis.call('HGET', KEYS[4], 'floor_us')
if current and tonumber(current) < floor then floor = tonumber(current) end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
  for _, id in ipairs(old) do
    local ts = tonumber(redis.call('ZSCORE', KEYS[3], id))
    if ts and ts > floor then floor = ts end
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
  redis.call('ZREM', KEYS[3], unpack(old))
  redis.call('HDEL', KEYS[2], unpack(old))
end
redis.call('HSET', KEYS[4], 'floor_us', string.format('%.0f', floor))
for k = 1, 4 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return 1
"#;

/// A cached message: its position and encoded body (empty when the body is missing).
#[derive(Debug, Clone)]
pub struct CachedEntry {
    pub position: i64,
    pub body: Vec<u8>,
}

/// Newest-first window entries in a time range.
#[derive(Debug)]
pub struct TimeSlice {
    /// Every message with a timestamp above this (µs) is in the window.
    pub floor_us: i64,
    pub entries: Vec<CachedEntry>,
}

/// Ascending window entries in a seq range.
#[derive(Debug)]
pub struct SeqSlice {
    pub lowest_seq: i64,
    pub highest_seq: i64,
    pub size: i64,
    pub entries: Vec<CachedEntry>,
}

/// A message to put in a window by [`RedisCache::fill`].
pub struct FillEntry {
    pub seq: i64,
    pub message_id: String,
    pub timestamp_us: i64,
    pub body: Vec<u8>,
}

#[derive(Clone)]
pub struct RedisCache {
    connection: Arc<OnceCell<ConnectionManager>>,
    paused_until_ms: Arc<AtomicU64>,
    started: Instant,
    hot_ttl: Duration,
    hot_window: usize,
    read_by_time: Script,
    read_by_seq: Script,
    fill: Script,
}

impl RedisCache {
    /// Connects, or — when Redis does not answer at start — keeps trying in the background
    /// while reads skip the cache.
    pub async fn connect(url: &str, hot_ttl: Duration, hot_window: usize) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let cache = Self {
            connection: Arc::new(OnceCell::new()),
            paused_until_ms: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
            hot_ttl,
            hot_window,
            read_by_time: Script::new(READ_BY_TIME),
            read_by_seq: Script::new(READ_BY_SEQ),
            fill: Script::new(FILL),
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(connection) => {
                let _ = cache.connection.set(connection);
                return Ok(cache);
            }
            Err(error) => warn!(%error, "redis cache not reachable at start, reading from the databases"),
        }
        let cell = cache.connection.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                tokio::time::sleep(delay).await;
                match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                    Ok(connection) => {
                        let _ = cell.set(connection);
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

    /// The connection, unless not connected yet or paused after a failure.
    fn connection(&self) -> Option<ConnectionManager> {
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
    async fn call<T>(&self, call: impl AsyncFnOnce(ConnectionManager) -> RedisResult<T>) -> Option<T> {
        let connection = self.connection()?;
        match call(connection).await {
            Ok(value) => Some(value),
            Err(error) => {
                self.failed(&error);
                None
            }
        }
    }

    /// Up to `count` entries with timestamps in [min_us, max_us], newest first. `Some(None)`:
    /// the window's completeness is unknown; `None`: no cache.
    pub async fn by_time(
        &self,
        keys: &SessionKeys,
        max_us: i64,
        min_us: i64,
        count: usize,
    ) -> Option<Option<TimeSlice>> {
        self.call(async |mut connection| {
            let reply: Option<Vec<Vec<u8>>> = self
                .read_by_time
                .key(keys.hot_meta())
                .key(keys.hot_time_index())
                .key(keys.hot_bodies())
                .arg(max_us)
                .arg(min_us)
                .arg(count)
                .invoke_async(&mut connection)
                .await?;
            Ok(reply.and_then(|reply| {
                let (floor, rest) = reply.split_first()?;
                Some(TimeSlice { floor_us: parse_i64(floor)?, entries: entries(rest)? })
            }))
        })
        .await
    }

    /// Up to `count` entries with seq in (after, before), ascending, with the window's extent.
    pub async fn by_seq(&self, keys: &SessionKeys, after: i64, before: i64, count: usize) -> Option<Option<SeqSlice>> {
        self.call(async |mut connection| {
            let reply: Option<Vec<Vec<u8>>> = self
                .read_by_seq
                .key(keys.hot_index())
                .key(keys.hot_bodies())
                .arg(after)
                .arg(before)
                .arg(count)
                .invoke_async(&mut connection)
                .await?;
            Ok(reply.and_then(|reply| {
                let [lowest, size, highest, rest @ ..] = reply.as_slice() else { return None };
                Some(SeqSlice {
                    lowest_seq: parse_i64(lowest)?,
                    size: parse_i64(size)?,
                    highest_seq: parse_i64(highest)?,
                    entries: entries(rest)?,
                })
            }))
        })
        .await
    }

    /// Puts the newest messages of a session (from a database read) into its window.
    /// `complete` says the read returned the whole session.
    pub async fn fill(&self, keys: &SessionKeys, messages: &[FillEntry], complete: bool) {
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
                    .arg(self.hot_window)
                    .arg(ttl)
                    .arg(floor);
                for entry in messages {
                    invocation.arg(entry.seq).arg(&entry.message_id).arg(entry.timestamp_us).arg(entry.body.as_slice());
                }
                invocation.invoke_async::<i64>(&mut connection).await
            })
            .await;
    }

    pub fn window(&self) -> usize {
        self.hot_window
    }
}

fn parse_i64(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.parse::<i64>().ok().or_else(|| text.parse::<f64>().ok().map(|value| value as i64))
}

fn entries(pairs: &[Vec<u8>]) -> Option<Vec<CachedEntry>> {
    pairs
        .chunks(2)
        .map(|pair| match pair {
            [position, body] => Some(CachedEntry { position: parse_i64(position)?, body: body.clone() }),
            _ => None,
        })
        .collect()
}
