//! The Redis connection of both binaries: one node through redis-rs's `ConnectionManager`, or a
//! Redis Cluster through redis-rs's cluster client, which follows `MOVED`/`ASK` redirections,
//! slot migrations and failovers by itself.
//!
//! Every script touches the keys of one session, which share one hash tag
//! (`keys::SessionKeys`), so a script runs on one node. A pipeline spanning sessions is split
//! by hash slot in [`query_calling`]: a cluster node refuses commands for slots it does not own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Arg, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisFuture, RedisResult, Script, ServerErrorKind, Value};

/// Where Redis is: `REDIS_URL` (one `redis://` URL, or several separated by commas: seed
/// nodes of a cluster) and `REDIS_CLUSTER` (a single URL is a cluster seed too).
#[derive(Clone, Debug)]
pub struct RedisTarget {
    pub urls: Vec<String>,
    pub cluster: bool,
}

impl RedisTarget {
    /// `urls` as `REDIS_URL` spells it; several URLs always mean a cluster.
    pub fn new(urls: &str, cluster: bool) -> Self {
        let urls: Vec<String> =
            urls.split(',').map(str::trim).filter(|url| !url.is_empty()).map(String::from).collect();
        let cluster = cluster || urls.len() > 1;
        Self { urls, cluster }
    }
}

/// How long to wait for Redis: to connect and for each reply, and how often to retry a
/// command whose connection broke.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub retries: usize,
}

/// A connection to a Redis node or cluster, cheap to clone (clones share it), counting the
/// commands it has in flight for `storage_*_redis_in_flight_commands`.
#[derive(Clone)]
pub struct RedisConnection {
    link: Link,
    in_flight: Arc<AtomicI64>,
}

#[derive(Clone)]
enum Link {
    Node(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// A cluster connection that is replaced when it stops working. redis-rs's cluster connection
/// can stop answering for good after a failover that happens with many calls in flight (every
/// call times out, even to healthy nodes; reproduced here with ~150 calls in flight and a
/// master killed); a new connection from the same client works at once. At most one
/// replacement a second, so a cluster that is really down costs no more than that.
struct Cluster {
    client: ClusterClient,
    connect_timeout: Duration,
    /// The connection in use and its generation (raised by each replacement).
    connection: RwLock<(u64, ClusterConnection)>,
    replacing: AtomicBool,
    replaced_at: Mutex<Instant>,
}

/// Whether `error` may come from a cluster connection that stopped working: a timeout, or a
/// connection refused, dropped or failing, as while a dead master is still in its slot map.
/// (Redirections and script errors are answers, not a broken connection.)
fn broken(error: &redis::RedisError) -> bool {
    error.is_timeout() || error.is_connection_refusal() || error.is_connection_dropped() || error.is_io_error()
}

/// Shortest time between two replacements of a cluster connection.
const REPLACE_INTERVAL: Duration = Duration::from_secs(1);

impl Cluster {
    /// Runs `call` on the connection in use, replacing that connection when the call finds it
    /// [`broken`].
    async fn call<T, F, Fut>(&self, call: F) -> RedisResult<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let (generation, connection) = self.current();
        let result = call(connection).await;
        if matches!(&result, Err(error) if broken(error)) {
            self.replace(generation).await;
        }
        result
    }

    /// The connection in use and its generation.
    fn current(&self) -> (u64, ClusterConnection) {
        self.connection.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// After a call on connection `generation` failed as [`broken`]: a new connection, unless that one
    /// was already replaced (calls still in flight on it time out later), one was made less
    /// than [`REPLACE_INTERVAL`] ago, or another call is making one.
    async fn replace(&self, generation: u64) {
        let replaced = self.current().0 != generation;
        let recent =
            self.replaced_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).elapsed() < REPLACE_INTERVAL;
        if replaced || recent || self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let _done = scopeguard::guard(&self.replacing, |replacing| replacing.store(false, Ordering::Release));
        // Connecting can hang too (redis-rs#1953): bounded.
        match tokio::time::timeout(self.connect_timeout, self.client.get_async_connection()).await {
            Ok(Ok(connection)) => {
                *self.connection.write().unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    (generation + 1, connection);
                *self.replaced_at.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Instant::now();
                tracing::warn!("redis cluster connection stopped answering; replaced it");
            }
            Ok(Err(error)) => tracing::warn!(%error, "redis cluster connection stopped answering; reconnecting failed"),
            Err(_) => tracing::warn!("redis cluster connection stopped answering; reconnecting timed out"),
        }
    }
}

impl RedisConnection {
    /// Connects to `target`, counting commands in flight into `in_flight`; errors when no
    /// node answers within `timeouts.connect`.
    pub async fn connect(target: &RedisTarget, timeouts: Timeouts, in_flight: Arc<AtomicI64>) -> RedisResult<Self> {
        let link = if target.cluster {
            let client = ClusterClient::builder(target.urls.iter().map(String::as_str))
                .connection_timeout(timeouts.connect)
                .response_timeout(timeouts.response)
                .retries(timeouts.retries as u32)
                .build()?;
            let connection = tokio::time::timeout(timeouts.connect, client.get_async_connection())
                .await
                .map_err(|_| redis::RedisError::from((ErrorKind::Io, "timed out connecting to the cluster")))??;
            Link::Cluster(Arc::new(Cluster {
                client,
                connect_timeout: timeouts.connect,
                connection: RwLock::new((0, connection)),
                replacing: AtomicBool::new(false),
                replaced_at: Mutex::new(Instant::now()),
            }))
        } else {
            let url = target.urls.first().map(String::as_str).unwrap_or_default();
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeouts.connect))
                .set_response_timeout(Some(timeouts.response))
                .set_number_of_retries(timeouts.retries)
                .set_max_delay(Duration::from_secs(1));
            Link::Node(ConnectionManager::new_with_config(redis::Client::open(url)?, config).await?)
        };
        Ok(Self { link, in_flight })
    }

    /// Commands in flight, for the pool metrics (`PoolMetrics::add_redis`).
    pub fn in_flight(&self) -> Arc<AtomicI64> {
        self.in_flight.clone()
    }
}

/// Counts one call in `in_flight` until the guard drops, however the call ends.
fn counted(in_flight: &Arc<AtomicI64>) -> scopeguard::ScopeGuard<Arc<AtomicI64>, impl FnOnce(Arc<AtomicI64>)> {
    in_flight.fetch_add(1, Ordering::Relaxed);
    scopeguard::guard(in_flight.clone(), |in_flight| {
        in_flight.fetch_sub(1, Ordering::Relaxed);
    })
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let _counted = counted(&self.in_flight);
            match &mut self.link {
                Link::Node(connection) => connection.req_packed_command(cmd).await,
                Link::Cluster(cluster) => {
                    cluster.call(|mut connection| async move { connection.req_packed_command(cmd).await }).await
                }
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let _counted = counted(&self.in_flight);
            match &mut self.link {
                Link::Node(connection) => connection.req_packed_commands(pipeline, offset, count).await,
                Link::Cluster(cluster) => {
                    let call = |mut connection: ClusterConnection| async move {
                        connection.req_packed_commands(pipeline, offset, count).await
                    };
                    cluster.call(call).await
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        match &self.link {
            Link::Node(connection) => connection.get_db(),
            Link::Cluster(cluster) => cluster.current().1.get_db(),
        }
    }
}

/// Sends `pipe`, whose scripts are called by SHA, loading `scripts` on NOSCRIPT, and returns
/// every command's reply in the pipeline's order (so no command may be `ignore()`d).
///
/// On a cluster the pipeline goes as one pipeline per hash slot, all at once. A Redis that
/// does not know a script (it restarted, failed over, or `SCRIPT FLUSH`) answers NOSCRIPT
/// having run none of that script's calls; the scripts are loaded on every node and that
/// pipeline is sent once more. Other commands of it may run twice, so callers' scripts must be
/// idempotent — as they must be anyway for a redelivered batch.
pub async fn query_calling<T: FromRedisValue>(
    connection: &RedisConnection,
    pipe: &Pipeline,
    scripts: &[&Script],
) -> RedisResult<T> {
    query_replicated(connection, pipe, scripts, 0).await
}

/// [`query_calling`], then, when `replicas` is above 0, `WAIT replicas` on every node the
/// pipeline went to: an error unless that many replicas acknowledged its writes within
/// [`WAIT_TIMEOUT`]. Redis replicates asynchronously; a failover loses what no replica got.
pub async fn query_replicated<T: FromRedisValue>(
    connection: &RedisConnection,
    pipe: &Pipeline,
    scripts: &[&Script],
    replicas: usize,
) -> RedisResult<T> {
    if matches!(connection.link, Link::Node(_)) {
        let replies: Vec<Value> =
            send_calling(&mut connection.clone(), &waiting(pipe.clone(), replicas), scripts).await?;
        let replies = acknowledged(replies, replicas)?;
        return T::from_redis_value(Value::Array(replies)).map_err(Into::into);
    }
    let mut by_slot: HashMap<Option<Slot>, (Vec<usize>, Pipeline)> = HashMap::new();
    for (position, command) in pipe.cmd_iter().enumerate() {
        let slot = routing_key(command).map(Slot::for_key);
        let (positions, part) = by_slot.entry(slot).or_insert_with(|| (Vec::new(), redis::pipe()));
        positions.push(position);
        part.add_command(command.clone());
    }
    let parts = by_slot.into_values().map(|(positions, part)| {
        let mut connection = connection.clone();
        async move {
            let replies: Vec<Value> = send_calling(&mut connection, &waiting(part, replicas), scripts).await?;
            RedisResult::Ok((positions, acknowledged(replies, replicas)?))
        }
    });
    let mut replies = vec![Value::Nil; pipe.len()];
    let answered: Vec<(Vec<usize>, Vec<Value>)> =
        futures::stream::iter(parts).buffer_unordered(PARTS_IN_FLIGHT).try_collect().await?;
    for (positions, part_replies) in answered {
        for (position, reply) in positions.into_iter().zip(part_replies) {
            replies[position] = reply;
        }
    }
    T::from_redis_value(Value::Array(replies)).map_err(Into::into)
}

/// How long a pipeline waits for its replicas' acknowledgement (`WAIT`).
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(1);

/// `pipe` with `WAIT replicas` after its commands, when `replicas` is above 0.
fn waiting(mut pipe: Pipeline, replicas: usize) -> Pipeline {
    if replicas > 0 {
        pipe.cmd("WAIT").arg(replicas).arg(WAIT_TIMEOUT.as_millis() as u64);
    }
    pipe
}

/// The replies of a pipeline built by [`waiting`] without the `WAIT`'s; an error when fewer
/// than `replicas` replicas acknowledged.
/// What the error of writes fewer replicas acknowledged than asked says.
const UNREPLICATED: &str = "writes not replicated";

/// Whether `error` says writes were made but fewer replicas acknowledged them than asked: the
/// server answered, so it is no reason to think Redis is down.
pub fn is_unreplicated(error: &redis::RedisError) -> bool {
    error.kind() == ErrorKind::Io && error.to_string().contains(UNREPLICATED)
}

fn acknowledged(mut replies: Vec<Value>, replicas: usize) -> RedisResult<Vec<Value>> {
    if replicas == 0 {
        return Ok(replies);
    }
    let acknowledged = match replies.pop() {
        Some(Value::Int(count)) => count,
        _ => -1,
    };
    if acknowledged < replicas as i64 {
        return Err(redis::RedisError::from((
            ErrorKind::Io,
            UNREPLICATED,
            format!(
                "{acknowledged} of the {replicas} replicas REDIS_WAIT_REPLICAS asks for acknowledged within {WAIT_TIMEOUT:?}"
            ),
        )));
    }
    Ok(replies)
}

/// Per-slot pipelines of one call in flight at once.
const PARTS_IN_FLIGHT: usize = 16;

/// The key a pipelined command is routed by: the first key of a script call
/// (`EVALSHA sha numkeys key…`), otherwise the first argument — the pipelines here hold script
/// calls and single-key commands only. `None`: no key (any node may answer).
fn routing_key(command: &Cmd) -> Option<&[u8]> {
    let args: Vec<&[u8]> = command
        .args_iter()
        .filter_map(|arg| match arg {
            Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    let name = args.first()?;
    if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL") {
        if args.get(2).copied() == Some(b"0".as_slice()) {
            return None;
        }
        return args.get(3).copied();
    }
    args.get(1).copied()
}

async fn send_calling(
    connection: &mut RedisConnection,
    pipe: &Pipeline,
    scripts: &[&Script],
) -> RedisResult<Vec<Value>> {
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
