//! Lua scripts in Redis pipelines, called by SHA (`EVALSHA`) rather than sent in full with
//! every call. A Redis that does not know a script — it restarted, or `SCRIPT FLUSH` — answers
//! NOSCRIPT, having run none of that script's calls; the scripts are then loaded and the
//! pipeline sent once more. Callers' scripts must be idempotent: other commands of the
//! pipeline may run twice.

use redis::{ErrorKind, FromRedisValue, Pipeline, RedisResult, Script, ServerErrorKind};

/// Lua function of the scripts that write a hot window (the writer's cache stage, the reader's
/// fills), prepended to them: `trim_window(seq_zset, time_zset, bodies, stamps, keep)` drops
/// the entries beyond the newest `keep` by seq, with their bodies and stamps (in chunks within
/// Lua's unpack limit), and returns the newest timestamp (µs) it dropped — the floor the window
/// is complete above — or `nil` when it dropped nothing. Layout: `keys::SessionKeys`.
pub const TRIM_WINDOW: &str = r#"
local function trim_window(seq_zset, time_zset, bodies, stamps, keep)
  local excess = redis.call('ZCARD', seq_zset) - keep
  if excess <= 0 then return nil end
  local old = redis.call('ZRANGE', seq_zset, 0, excess - 1)
  local evicted_max = nil
  for _, id in ipairs(old) do
    local ts = tonumber(redis.call('ZSCORE', time_zset, id))
    if ts and (not evicted_max or ts > evicted_max) then evicted_max = ts end
  end
  redis.call('ZREMRANGEBYRANK', seq_zset, 0, excess - 1)
  for start = 1, #old, 1000 do
    local chunk = {unpack(old, start, math.min(start + 999, #old))}
    redis.call('ZREM', time_zset, unpack(chunk))
    redis.call('HDEL', bodies, unpack(chunk))
    redis.call('HDEL', stamps, unpack(chunk))
  end
  return evicted_max
end
"#;

/// Sends `pipe`, which calls `scripts` by SHA, loading them on NOSCRIPT.
pub async fn query_calling<T, C>(connection: &mut C, pipe: &Pipeline, scripts: &[&Script]) -> RedisResult<T>
where
    T: FromRedisValue,
    C: redis::aio::ConnectionLike,
{
    match pipe.query_async(connection).await {
        Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            for script in scripts {
                script.load_async(connection).await?;
            }
            pipe.query_async(connection).await
        }
        result => result,
    }
}
