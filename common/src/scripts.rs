//! Lua shared by the writer's and the reader's scripts. The scripts are called by SHA
//! (`EVALSHA`) in pipelines, see `redis_connection::query_calling`.

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
