//! Lua scripts in Redis pipelines, called by SHA (`EVALSHA`) rather than sent in full with
//! every call. A Redis that does not know a script — it restarted, or `SCRIPT FLUSH` — answers
//! NOSCRIPT, having run none of that script's calls; the scripts are then loaded and the
//! pipeline sent once more. Callers' scripts must be idempotent: other commands of the
//! pipeline may run twice.

use redis::{ErrorKind, FromRedisValue, Pipeline, RedisResult, Script, ServerErrorKind};

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
