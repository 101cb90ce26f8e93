//! Redis: idempotency markers, per-session seq, the hot cache, session state and read seqs.
//! Key layout in `flare_storage_common::keys`.
//!
//! Every operation here is idempotent, so the pipeline can repeat a whole batch after any
//! failure: markers are `SET NX`, seqs are remembered per message id until the message is
//! durable, state and read seqs only move forward by seq, cache writes overwrite.
//! Commands are pipelined per batch; the multi-key steps are Lua scripts over the keys of one
//! session, which share a hash tag.

use std::time::Duration;

use flare_storage_common::keys::{HOT_FLOOR_ALL, SessionKeys};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, Script};

/// A message already durable everywhere, as its marker records it: its seq, when it was
/// persisted, and the Kafka record (topic, partition, offset) that completed it — so a
/// redelivery of that same record is told apart from a new record carrying the same message
/// id, even one at the same position of another topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub seq: i64,
    pub persisted_ms: i64,
    pub origin: Option<(i32, i64)>,
    /// The origin's topic; markers written before it was recorded have none.
    pub topic: Option<String>,
}

impl Done {
    /// `seq:persisted_ms[:partition:offset[:topic]]` — topic names cannot contain ':'.
    fn encode(&self) -> String {
        match (self.origin, &self.topic) {
            (Some((partition, offset)), Some(topic)) => {
                format!("{}:{}:{partition}:{offset}:{topic}", self.seq, self.persisted_ms)
            }
            (Some((partition, offset)), None) => format!("{}:{}:{partition}:{offset}", self.seq, self.persisted_ms),
            (None, _) => format!("{}:{}", self.seq, self.persisted_ms),
        }
    }

    fn decode(value: &str) -> Option<Self> {
        let mut parts = value.splitn(5, ':');
        let seq = parts.next()?.parse().ok()?;
        let persisted_ms = parts.next()?.parse().ok()?;
        let origin = match (parts.next(), parts.next()) {
            (Some(partition), Some(offset)) => Some((partition.parse().ok()?, offset.parse().ok()?)),
            _ => None,
        };
        let topic = parts.next().filter(|topic| !topic.is_empty()).map(str::to_owned);
        Some(Self { seq, persisted_ms, origin, topic })
    }

    /// Whether this marker was left by the record at `origin` of `topic`.
    pub fn left_by(&self, topic: &str, origin: Option<(i32, i64)>) -> bool {
        self.origin == origin && self.topic.as_deref().is_none_or(|marked| marked == topic)
    }
}

/// Seq assignment for the messages of one session, in order.
pub struct SeqRequest<'a> {
    pub keys: SessionKeys,
    pub message_ids: Vec<&'a str>,
    /// Where the session's counter is missing: the highest seq the stores hold.
    pub seed: Option<i64>,
}

/// One message for a session's hot window.
pub struct HotEntry<'a> {
    pub seq: i64,
    pub message_id: &'a str,
    pub timestamp_us: i64,
    /// The encoded protobuf `Message`.
    pub body: Vec<u8>,
}

/// One message's effect on its session's state.
pub struct StateEntry<'a> {
    pub seq: i64,
    pub message_id: &'a str,
    pub sender_id: &'a str,
    pub message_type: i32,
    pub content_type: &'a str,
    pub timestamp_ms: i64,
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

/// Adds messages to a session's hot window, trims it to the newest ARGV[1] by seq and keeps
/// its completeness floor (see `SessionKeys::hot_meta`): a window that receives a session's
/// first message (seq 1) holds the whole session; trimming raises the floor to the newest
/// evicted timestamp; a window of unknown completeness stays unknown.
const CACHE_HOT: &str = r#"
-- KEYS[1] zset seq -> id, KEYS[2] hash id -> body, KEYS[3] zset time -> id, KEYS[4] meta hash,
-- KEYS[5] gone hash (only its expiry is refreshed, so it outlives the window)
-- ARGV[1] window, ARGV[2] ttl, ARGV[3] floor meaning 'all', then groups of four:
-- seq, message_id, timestamp_us, body
local starts_session = false
for i = 4, #ARGV, 4 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[3], ARGV[i + 2], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 3])
  if ARGV[i] == '1' then starts_session = true end
end
if starts_session and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[4], 'floor_us', ARGV[3])
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
  local evicted_max = nil
  for _, id in ipairs(old) do
    local ts = tonumber(redis.call('ZSCORE', KEYS[3], id))
    if ts and (not evicted_max or ts > evicted_max) then evicted_max = ts end
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
  redis.call('ZREM', KEYS[3], unpack(old))
  redis.call('HDEL', KEYS[2], unpack(old))
  local floor = redis.call('HGET', KEYS[4], 'floor_us')
  if floor and evicted_max and evicted_max > tonumber(floor) then
    redis.call('HSET', KEYS[4], 'floor_us', string.format('%.0f', evicted_max))
  end
end
for k = 1, 5 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return 1
"#;

/// Applies messages (ascending seq) to a session's state, and moves each sender's read seq
/// to their message (replying means having read). A message at or below the applied seq was
/// applied before and changes nothing; read seqs only move forward. The work is the same for
/// a session of two members or five thousand: nothing is written per member.
const UPDATE_STATE: &str = r#"
-- KEYS[1] state hash, KEYS[2] reads hash (user -> read seq)
-- ARGV: groups of seq, message_id, sender_id, message_type, content_type, ts_ms
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
local latest = nil
for i = 1, #ARGV, 6 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    last = seq
    latest = i
  end
  local sender = ARGV[i + 2]
  if sender ~= '' and seq > tonumber(redis.call('HGET', KEYS[2], sender) or '0') then
    redis.call('HSET', KEYS[2], sender, ARGV[i])
  end
end
if latest then
  redis.call('HSET', KEYS[1],
    'last_seq', ARGV[latest], 'last_message_id', ARGV[latest + 1], 'last_sender_id', ARGV[latest + 2],
    'last_message_type', ARGV[latest + 3], 'last_content_type', ARGV[latest + 4],
    'last_message_ts', ARGV[latest + 5], 'message_count', ARGV[latest])
end
return 1
"#;

#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    hot_ttl: Duration,
    idempotency_ttl: Duration,
    hot_window: usize,
    assign_seq: Script,
    reseed: Script,
    cache_hot: Script,
    update_state: Script,
}

impl RedisStore {
    /// Connects lazily-retrying: the manager reconnects by itself after Redis restarts.
    pub async fn connect(
        url: &str,
        hot_ttl: Duration,
        idempotency_ttl: Duration,
        hot_window: usize,
    ) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            connection,
            hot_ttl,
            idempotency_ttl,
            hot_window,
            assign_seq: Script::new(ASSIGN_SEQ),
            reseed: Script::new(RESEED),
            cache_hot: Script::new(CACHE_HOT),
            update_state: Script::new(UPDATE_STATE),
        })
    }

    /// The done marker of each (session keys, message id), in order.
    pub async fn done_markers(&self, messages: &[(SessionKeys, &str)]) -> RedisResult<Vec<Option<Done>>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (keys, message_id) in messages {
            pipe.get(keys.done(message_id));
        }
        let values: Vec<Option<String>> = pipe.query_async(&mut self.connection.clone()).await?;
        Ok(values.into_iter().map(|value| value.as_deref().and_then(Done::decode)).collect())
    }

    /// Seqs for each request's messages, in order; `None` for a session whose counter is
    /// missing and that had no seed.
    pub async fn assign_seqs(&self, requests: &[SeqRequest<'_>]) -> RedisResult<Vec<Option<Vec<i64>>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = self.idempotency_ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        pipe.load_script(&self.assign_seq).ignore();
        let mut invocations = Vec::with_capacity(requests.len());
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
            invocations.push(invocation);
        }
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let results: Vec<Vec<i64>> = pipe.query_async(&mut self.connection.clone()).await?;
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

    /// Adds messages to each session's hot window.
    pub async fn cache_hot(&self, sessions: &[(SessionKeys, Vec<HotEntry<'_>>)]) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.load_script(&self.cache_hot).ignore();
        let ttl = self.hot_ttl.as_secs().max(1);
        let mut invocations = Vec::with_capacity(sessions.len());
        for (keys, entries) in sessions {
            let mut invocation = self.cache_hot.key(keys.hot_index());
            invocation
                .key(keys.hot_bodies())
                .key(keys.hot_time_index())
                .key(keys.hot_meta())
                .key(keys.gone())
                .arg(self.hot_window)
                .arg(ttl)
                .arg(HOT_FLOOR_ALL);
            for entry in entries {
                invocation.arg(entry.seq).arg(entry.message_id).arg(entry.timestamp_us).arg(entry.body.as_slice());
            }
            invocations.push(invocation);
        }
        for invocation in &invocations {
            pipe.invoke_script(invocation).ignore();
        }
        pipe.query_async(&mut self.connection.clone()).await
    }

    /// Applies each session's messages (ascending seq) to its state and its senders' read seqs.
    pub async fn update_states(&self, sessions: &[(SessionKeys, Vec<StateEntry<'_>>)]) -> RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.load_script(&self.update_state).ignore();
        let mut invocations = Vec::with_capacity(sessions.len());
        for (keys, entries) in sessions {
            let mut invocation = self.update_state.key(keys.state());
            invocation.key(keys.reads());
            for entry in entries {
                invocation
                    .arg(entry.seq)
                    .arg(entry.message_id)
                    .arg(entry.sender_id)
                    .arg(entry.message_type)
                    .arg(entry.content_type)
                    .arg(entry.timestamp_ms);
            }
            invocations.push(invocation);
        }
        for invocation in &invocations {
            pipe.invoke_script(invocation).ignore();
        }
        pipe.query_async(&mut self.connection.clone()).await
    }

    /// `HDEL wal_key id…`: the upstream's write-ahead entries of stored messages.
    pub async fn remove_from_wal(&self, wal_key: &str, message_ids: &[&str]) -> RedisResult<()> {
        if message_ids.is_empty() {
            return Ok(());
        }
        redis::cmd("HDEL").arg(wal_key).arg(message_ids).query_async(&mut self.connection.clone()).await
    }

    /// Records messages as durable (`SET NX EX`, one command each) and forgets their
    /// remembered seqs, which the markers now carry.
    pub async fn mark_done(&self, messages: &[(SessionKeys, &str, Done)]) -> RedisResult<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let ttl = self.idempotency_ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        for (keys, message_id, done) in messages {
            pipe.cmd("SET").arg(keys.done(message_id)).arg(done.encode()).arg("NX").arg("EX").arg(ttl).ignore();
            pipe.hdel(keys.seq_assigned(), *message_id).ignore();
        }
        pipe.query_async(&mut self.connection.clone()).await
    }

    /// Round trip for readiness checks.
    pub async fn ping(&self) -> RedisResult<()> {
        redis::cmd("PING").query_async(&mut self.connection.clone()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_markers_round_trip() {
        for done in [
            Done { seq: 42, persisted_ms: 1_700_000_000_000, origin: Some((3, 1234)), topic: Some("in.v1".into()) },
            Done { seq: 42, persisted_ms: 1_700_000_000_000, origin: Some((3, 1234)), topic: None },
            Done { seq: 1, persisted_ms: 5, origin: None, topic: None },
        ] {
            assert_eq!(Done::decode(&done.encode()), Some(done));
        }
        let marker = Done::decode("7:9:3:1234:messages").expect("marker");
        assert!(marker.left_by("messages", Some((3, 1234))));
        assert!(!marker.left_by("messages-v2", Some((3, 1234))), "same position of another topic");
        assert!(!marker.left_by("messages", Some((3, 1235))));
        let old = Done::decode("7:9:3:1234").expect("marker without topic");
        assert!(old.left_by("anything", Some((3, 1234))), "markers from before the topic was kept");
        assert_eq!(Done::decode("garbage"), None);
        assert_eq!(Done::decode("1:2:x:4"), None);
    }
}
