//! Redis: per-session seq, and the cache stage — hot window, session state and senders' read
//! seqs. Key layout in `flare_storage_common::keys`. Nothing here is kept per message beyond
//! the hot window: which messages are stored, and by which record, the databases say.
//!
//! Every operation here is idempotent, so the pipeline can repeat a stage after any failure:
//! seqs are remembered per message id until the message is durable, state and read seqs only
//! move forward by seq, cache writes keep what they find.
//!
//! A batch costs two round trips here: the seq scripts, and the cache stage. Both are one
//! pipeline of Lua scripts, one call per session over keys that share the session's hash tag
//! (one Redis Cluster slot). The cache stage's script writes a session's window and state
//! together. Scripts are
//! called by SHA; a Redis that forgot them (restart, `SCRIPT FLUSH`) answers NOSCRIPT, and they
//! are loaded and the pipeline sent again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use chrono::DateTime;
use flare_storage_common::keys::{HOT_FLOOR_ALL, SESSION_STATE_TTL_SECONDS, SessionKeys};
use flare_storage_common::message::{content_type, message_tenant_id, to_datetime};
use flare_storage_common::redis_connection::{RedisConnection, RedisTarget, Timeouts, query_calling, query_replicated};
use flare_storage_common::scripts::TRIM_WINDOW;
use redis::{RedisResult, Script};

use super::Encoded;

/// Seq assignment for the messages of one session, in order.
pub struct SeqRequest<'a> {
    pub keys: SessionKeys,
    pub message_ids: Vec<&'a str>,
    /// Where the session's counter is missing: the highest seq the stores hold.
    pub seed: Option<i64>,
}

/// Hands out seqs. Returns, per message id, the seq it got, or an empty list when the session
/// counter is missing and no seed was given (the caller seeds it from the stores and calls
/// again).
const ASSIGN_SEQ: &str = r#"
-- KEYS[1] counter, KEYS[2] message_id -> seq hash
-- ARGV[1] hash ttl, ARGV[2] seed max ('' = none), then message ids
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '' then return {} end
  redis.call('SET', KEYS[1], ARGV[2])
end
local out = {}
for i = 3, #ARGV do
  local seq = redis.call('HGET', KEYS[2], ARGV[i])
  if not seq then
    seq = redis.call('INCR', KEYS[1])
    redis.call('HSET', KEYS[2], ARGV[i], seq)
  end
  out[#out + 1] = tonumber(seq)
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return out
"#;

/// Raises a session counter to at least ARGV[1] and forgets the seqs of the given messages, so
/// they are assigned anew above everything stored.
const RESEED: &str = r#"
-- KEYS[1] counter, KEYS[2] message_id -> seq hash; ARGV[1] max stored seq, ARGV[2..] ids
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
for i = 2, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
return 1
"#;

/// The cache stage of one session, atomically: adds its messages (ascending seq) to the hot
/// window, applies them to the session state and its senders' read seqs, then forgets their
/// remembered seqs. Run again for a redelivered message, it changes no state or read seq and
/// keeps a body a command stamped.
///
/// Window: trimmed to the newest ARGV[1] by seq, keeping its completeness floor (see
/// `SessionKeys::hot_meta`): an empty window that receives a session's first message (seq 1,
/// stored by this batch) holds the whole session; trimming raises the floor to the newest
/// evicted timestamp; a window of unknown completeness stays unknown; a new message more than
/// one seq past the window's newest makes it unknown (Redis lost the writes between, as a
/// failover can: the next page refills it from the databases). A message a reader's
/// command has stamped (`SessionKeys::hot_stamps`) keeps the body that command put, or none:
/// the command changed it before this batch (or this redelivery) reached the cache, and this
/// payload is the one first sent. State: a message at or below the applied seq was applied
/// before and changes nothing; read seqs only move forward. Nothing is written per member.
/// A message a database held before this batch (a redelivery, a resend) may be old: it only
/// raises a state or read seq that exists, and never creates one — when Redis lost them, the
/// reader rebuilds them from the databases, which know the newest.
const FINISH_SESSION: &str = r#"
-- KEYS: 1 seq zset, 2 bodies, 3 time zset, 4 meta, 5 gone (only its expiry is refreshed, so
-- it outlives the window), 6 state, 7 reads, 8 seq-of hash, 9 body stamps
-- ARGV: 1 window, 2 hot ttl, 3 floor meaning 'all', 4 state and read seqs' ttl, then per
-- message: seq, message_id, timestamp_us, body, sender_id, message_type, content_type, ts_ms,
-- new ('1': stored by this batch, '0': held before)
local starts_session = false
local bodiless = false
local window_empty = redis.call('EXISTS', KEYS[1]) == 0
-- The window's newest seq before this batch: a new message further on than the next one means
-- the window lost writes between them (a Redis failover drops the last writes its replica had
-- not received), so its completeness is no longer known.
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
local gap = false
local state_known = redis.call('EXISTS', KEYS[6]) == 1
local last = tonumber(redis.call('HGET', KEYS[6], 'last_seq') or '0')
local latest = nil
local n = 0
for i = 5, #ARGV, 9 do
  n = n + 1
  local seq, id, sender, new = ARGV[i], ARGV[i + 1], ARGV[i + 4], ARGV[i + 8] == '1'
  redis.call('ZADD', KEYS[1], seq, id)
  redis.call('ZADD', KEYS[3], ARGV[i + 2], id)
  if redis.call('HEXISTS', KEYS[9], id) == 0 then
    redis.call('HSETNX', KEYS[2], id, ARGV[i + 3])
  elseif redis.call('HEXISTS', KEYS[2], id) == 0 then
    -- Stamped by a command without a body: the next page refills the window.
    bodiless = true
  end
  if seq == '1' and new and window_empty then starts_session = true end
  if top and tonumber(seq) > tonumber(top) + 1 then gap = true end
  if top and tonumber(seq) > tonumber(top) then top = seq end
  if (new or state_known) and tonumber(seq) > last then
    last = tonumber(seq)
    latest = i
  end
  if sender ~= '' then
    local read = redis.call('HGET', KEYS[7], sender)
    if (read and tonumber(seq) > tonumber(read)) or (not read and new) then
      redis.call('HSET', KEYS[7], sender, seq)
    end
  end
end
if starts_session and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[4], 'floor_us', ARGV[3])
end
if bodiless or gap then redis.call('HDEL', KEYS[4], 'floor_us') end
local evicted_max = trim_window(KEYS[1], KEYS[3], KEYS[2], KEYS[9], tonumber(ARGV[1]))
local floor = redis.call('HGET', KEYS[4], 'floor_us')
if floor and evicted_max and evicted_max > tonumber(floor) then
  redis.call('HSET', KEYS[4], 'floor_us', string.format('%.0f', evicted_max))
end
for k = 1, 5 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
if redis.call('EXISTS', KEYS[9]) == 1 then redis.call('EXPIRE', KEYS[9], ARGV[2]) end
if latest then
  redis.call('HSET', KEYS[6],
    'last_seq', ARGV[latest], 'last_message_id', ARGV[latest + 1], 'last_sender_id', ARGV[latest + 4],
    'last_message_type', ARGV[latest + 5], 'last_content_type', ARGV[latest + 6],
    'last_message_ts', ARGV[latest + 7], 'message_count', ARGV[latest])
end
for k = 6, 7 do
  if redis.call('EXISTS', KEYS[k]) == 1 then redis.call('EXPIRE', KEYS[k], ARGV[4]) end
end
for i = 5, #ARGV, 9 do redis.call('HDEL', KEYS[8], ARGV[i + 1]) end
return n
"#;

/// A message durable in the databases, for the cache stage.
pub struct DurableMessage<'a> {
    pub message: &'a Encoded,
    /// A database held it before this batch (a redelivery, a resend): it may be old.
    pub stored_before: bool,
}

#[derive(Clone)]
pub struct RedisStore {
    connection: RedisConnection,
    /// Replicas that must acknowledge the cache stage's writes (`REDIS_WAIT_REPLICAS`).
    wait_replicas: usize,
    hot_ttl: Duration,
    idempotency_ttl: Duration,
    hot_window: usize,
    assign_seq: Script,
    reseed: Script,
    finish_session: Script,
}

impl RedisStore {
    /// Connects to a node or cluster; the connection reconnects by itself after Redis restarts
    /// or fails over.
    pub async fn connect(
        target: &RedisTarget,
        hot_ttl: Duration,
        idempotency_ttl: Duration,
        hot_window: usize,
        wait_replicas: usize,
    ) -> RedisResult<Self> {
        let timeouts = Timeouts { connect: Duration::from_secs(2), response: Duration::from_secs(5), retries: 2 };
        let connection = RedisConnection::connect(target, timeouts, Arc::default()).await?;
        Ok(Self {
            connection,
            wait_replicas,
            hot_ttl,
            idempotency_ttl,
            hot_window,
            assign_seq: Script::new(ASSIGN_SEQ),
            reseed: Script::new(RESEED),
            finish_session: Script::new(&format!("{TRIM_WINDOW}{FINISH_SESSION}")),
        })
    }

    /// Commands in flight, for the pool metrics.
    pub fn in_flight(&self) -> Arc<AtomicI64> {
        self.connection.in_flight()
    }

    /// Seqs for each request's messages, in order; `None` for a session whose counter is
    /// missing and that had no seed.
    pub async fn assign_seqs(&self, requests: &[SeqRequest<'_>]) -> RedisResult<Vec<Option<Vec<i64>>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = self.idempotency_ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        for request in requests {
            let mut invocation = self.assign_seq.key(request.keys.seq_counter());
            invocation.key(request.keys.seq_assigned()).arg(ttl);
            match request.seed {
                Some(max_seq) => invocation.arg(max_seq),
                None => invocation.arg(""),
            };
            for message_id in &request.message_ids {
                invocation.arg(*message_id);
            }
            pipe.invoke_script(&invocation);
        }
        let results: Vec<Vec<i64>> = query_calling(&self.connection, &pipe, &[&self.assign_seq]).await?;
        Ok(results.into_iter().map(|seqs| (!seqs.is_empty()).then_some(seqs)).collect())
    }

    /// Raises a session's counter to `max_seq` and drops the seqs remembered for `message_ids`.
    pub async fn reseed(&self, keys: &SessionKeys, max_seq: i64, message_ids: &[&str]) -> RedisResult<()> {
        let mut invocation = self.reseed.key(keys.seq_counter());
        invocation.key(keys.seq_assigned()).arg(max_seq);
        for message_id in message_ids {
            invocation.arg(*message_id);
        }
        invocation.invoke_async(&mut self.connection.clone()).await
    }

    /// The cache stage of a batch, in one round trip: every session's hot window, state and
    /// senders' read seqs (one script call per session, see [`FINISH_SESSION`]), and the
    /// removal of the messages' upstream write-ahead entries (`HDEL wal_key id…`).
    pub async fn finish(&self, durable: &[DurableMessage<'_>], wal: Option<(&str, &[&str])>) -> RedisResult<()> {
        let wal = wal.filter(|(_, ids)| !ids.is_empty());
        if durable.is_empty() && wal.is_none() {
            return Ok(());
        }
        let hot_ttl = self.hot_ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        for (keys, mut messages) in by_session(durable) {
            messages.sort_by_key(|durable| durable.message.message.seq);
            let mut invocation = self.finish_session.key(keys.hot_index());
            invocation
                .key(keys.hot_bodies())
                .key(keys.hot_time_index())
                .key(keys.hot_meta())
                .key(keys.gone())
                .key(keys.state())
                .key(keys.reads())
                .key(keys.seq_assigned())
                .key(keys.hot_stamps())
                .arg(self.hot_window)
                .arg(hot_ttl)
                .arg(HOT_FLOOR_ALL)
                .arg(SESSION_STATE_TTL_SECONDS);
            for DurableMessage { message: Encoded { message, payload, .. }, stored_before } in messages {
                let time = message.timestamp.as_ref().and_then(to_datetime).unwrap_or(DateTime::UNIX_EPOCH);
                invocation
                    .arg(message.seq)
                    .arg(&message.id)
                    .arg(time.timestamp_micros())
                    .arg(payload.as_slice())
                    .arg(&message.sender_id)
                    .arg(message.message_type)
                    .arg(content_type(message))
                    .arg(time.timestamp_millis())
                    .arg(if *stored_before { "0" } else { "1" });
            }
            pipe.invoke_script(&invocation);
        }
        if let Some((wal_key, ids)) = wal {
            pipe.cmd("HDEL").arg(wal_key).arg(ids);
        }
        query_replicated(&self.connection, &pipe, &[&self.finish_session], self.wait_replicas).await
    }

    /// Round trip for readiness checks.
    pub async fn ping(&self) -> RedisResult<()> {
        redis::cmd("PING").query_async(&mut self.connection.clone()).await
    }
}

/// Messages grouped by session, each group in batch order.
fn by_session<'a, 'b>(durable: &'a [DurableMessage<'b>]) -> Vec<(SessionKeys, Vec<&'a DurableMessage<'b>>)> {
    let mut groups: Vec<(SessionKeys, Vec<&DurableMessage<'_>>)> = Vec::new();
    let mut slot_of: HashMap<(&str, &str), usize> = HashMap::new();
    for entry in durable {
        let message = &entry.message.message;
        let session = (message_tenant_id(message), message.session_id.as_str());
        let slot = *slot_of.entry(session).or_insert_with(|| {
            groups.push((SessionKeys::new(session.0, session.1), Vec::new()));
            groups.len() - 1
        });
        groups[slot].1.push(entry);
    }
    groups
}
