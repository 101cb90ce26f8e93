//! Helpers for the end-to-end tests: each test gets its own Postgres database, Kafka topics and
//! consumer group on the real local services (`scripts/services.sh up`), and runs the writer
//! and reader in-process on port 0. A service that is not reachable fails the test.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::redis_connection::{RedisConnection, RedisTarget, Timeouts};
use flare_storage_common::tonic::transport::Channel;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{Connection as _, PgConnection};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Addresses of the local services, as `scripts/services.sh env` prints them.
pub fn postgres_url() -> String {
    std::env::var("POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/test".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The local Redis Cluster's seed nodes (`scripts/services.sh` starts it); tests that fail its
/// nodes over use it whatever `REDIS_URL` is.
pub fn redis_cluster_url() -> String {
    std::env::var("REDIS_CLUSTER_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002".into())
}

pub fn mongo_url() -> String {
    std::env::var("MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".into())
}

pub fn kafka_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A short unique name for this test's resources.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple().to_string().get(..12).unwrap_or("x"))
}

/// A database of its own for one test, migrated by whoever connects first.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_on(&postgres_url()).await
    }

    /// A new database on the server of `admin_url` (a test's own server, say).
    pub async fn create_on(admin_url: &str) -> anyhow::Result<Self> {
        let mut admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("Postgres is not reachable at {admin_url} (run scripts/services.sh up)"))?;
        let name = unique("flare_test");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
        Ok(Self { url: with_database(admin_url, &name), name, admin_url: admin_url.to_owned() })
    }

    /// Drops the database; call at the end of a test that passed (a failed one leaves it for
    /// inspection).
    pub async fn drop(self) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut admin).await?;
        Ok(())
    }

    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        Ok(PgConnection::connect(&self.url).await?)
    }
}

fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base.find("://").map(|scheme| scheme + 3).unwrap_or(0);
    let server = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// Creates topics before any consumer subscribes (the test broker does not show a topic to a
/// consumer that subscribed before it existed).
pub async fn create_topics(names: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .context("failed to create the Kafka admin client")?;
    let topics: Vec<NewTopic<'_>> =
        names.iter().map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = tokio::time::timeout(Duration::from_secs(20), admin.create_topics(&topics, &options))
        .await
        .context("Kafka did not answer CreateTopics (run scripts/services.sh up)")??;
    for result in results {
        if let Err((topic, code)) = result {
            bail!("failed to create topic {topic}: {code}");
        }
    }
    Ok(())
}

pub fn producer() -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?)
}

/// A producer that sends records of up to `max_bytes` (librdkafka refuses larger ones itself).
pub fn producer_for_large_records(max_bytes: usize) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", max_bytes.to_string())
        .create()?)
}

/// Produces one record to a given partition and waits for the broker's acknowledgement.
pub async fn produce_to(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    value: &[u8],
) -> anyhow::Result<()> {
    producer
        .send(FutureRecord::to(topic).partition(partition).key(key).payload(value), Duration::from_secs(30))
        .await
        .map_err(|(error, _)| anyhow::anyhow!("failed to produce to {topic}/{partition}: {error}"))?;
    Ok(())
}

/// Produces one record and waits for the broker's acknowledgement.
pub async fn produce(producer: &FutureProducer, topic: &str, key: &str, value: &[u8]) -> anyhow::Result<()> {
    producer
        .send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(10))
        .await
        .map_err(|(error, _)| anyhow::anyhow!("failed to produce to {topic}: {error}"))?;
    Ok(())
}

/// Produces a protobuf message keyed by its session.
pub async fn produce_message(
    producer: &FutureProducer,
    topic: &str,
    request: &flare_storage_common::proto::storage::StoreMessageRequest,
) -> anyhow::Result<()> {
    produce(producer, topic, &request.session_id, &request.encode_to_vec()).await
}

/// A writer running in this process.
pub struct RunningWriter {
    pub metrics_addr: SocketAddr,
    /// The writer's PostgreSQL, whose search queue [`RunningWriter::wait_processed`] watches.
    pub postgres_url: Option<String>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl RunningWriter {
    pub async fn start(config: flare_storage_writer::Config) -> anyhow::Result<Self> {
        let _ = flare_storage_common::telemetry::init("flare-storage-test", &test_telemetry());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let metrics_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let postgres_url = config.postgres_url.clone();
        let task = tokio::spawn(flare_storage_writer::run_with_listener(config, listener, shutdown.clone()));
        Ok(Self { metrics_addr, postgres_url, shutdown, task })
    }

    /// The writer's `storage_writer_messages_processed_total`.
    pub async fn processed(&self) -> anyhow::Result<f64> {
        let (_, body) = http_get(self.metrics_addr, "/metrics").await?;
        Ok(metric_value(&body, "storage_writer_messages_processed_total").unwrap_or(0.0))
    }

    /// Waits (a minute at most) until the writer has newly stored exactly `count` messages
    /// and, with PostgreSQL, its search indexer has caught up with them.
    pub async fn wait_processed(&self, count: usize) -> anyhow::Result<()> {
        eventually(Duration::from_secs(60), "messages stored", || async {
            Ok((self.processed().await? == count as f64).then_some(()))
        })
        .await?;
        self.wait_search_indexed().await
    }

    /// Waits (a minute at most) until PostgreSQL's search queue is empty: the indexer commits
    /// its entries in the transaction that takes them off the queue.
    pub async fn wait_search_indexed(&self) -> anyhow::Result<()> {
        let Some(url) = &self.postgres_url else { return Ok(()) };
        let db = sqlx::PgPool::connect(url).await?;
        let caught_up = eventually(Duration::from_secs(60), "search index caught up", || async {
            let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM search_index_queue").fetch_one(&db).await?;
            Ok((queued == 0).then_some(()))
        })
        .await;
        db.close().await;
        caught_up
    }

    /// Asks the writer to stop and waits until it has.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.context("writer did not stop within 30 s")??
    }
}

/// The database a test's writer and reader store in and read from: PostgreSQL, or MongoDB
/// alone (either one is a whole deployment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Postgres,
    Mongo,
}

impl Store {
    /// Points a test writer at this store: with `Mongo`, at the collection `messages` of the
    /// MongoDB database `mongo_database` instead of PostgreSQL.
    pub fn configure_writer(self, writer: &mut flare_storage_writer::Config, mongo_database: &str) {
        if self == Store::Mongo {
            writer.postgres_url = None;
            writer.mongo = Some(flare_storage_writer::MongoConfig {
                url: mongo_url(),
                database: mongo_database.into(),
                collection: "messages".into(),
            });
        }
    }

    /// Points a test reader at this store, as [`Store::configure_writer`] does a writer.
    pub fn configure_reader(self, reader: &mut flare_storage_reader::Config, mongo_database: &str) {
        if self == Store::Mongo {
            reader.postgres_url = None;
            reader.mongo = Some(flare_storage_reader::MongoConfig {
                url: mongo_url(),
                database: mongo_database.into(),
                collection: "messages".into(),
            });
        }
    }
}

/// Writer settings for a test: its own topic, group and dead-letter topic, Postgres only (a
/// test adds MongoDB, ACKs or a WAL key where it needs them). Redis keys are isolated by the
/// test's own tenant ids.
pub fn writer_config(database_url: &str, topic: &str, dlq_topic: &str) -> flare_storage_writer::Config {
    flare_storage_writer::Config {
        kafka_bootstrap_servers: kafka_bootstrap(),
        kafka_topic: topic.into(),
        kafka_group_id: unique("group"),
        kafka_dlq_topic: dlq_topic.into(),
        kafka_ack_topic: None,
        // The test broker holds each group join for about half the session timeout.
        kafka_session_timeout: Duration::from_millis(6000),
        kafka_fetch_wait: Duration::from_millis(100),
        kafka_max_poll_interval: Duration::from_secs(300),
        kafka_prefetch_kbytes: 16_384,
        redis: redis_target(),
        redis_hot_ttl: Duration::from_secs(600),
        redis_idempotency_ttl: Duration::from_secs(600),
        redis_wait_replicas: 0,
        redis_hot_window: 200,
        mongo: None,
        postgres_url: Some(database_url.into()),
        postgres_max_connections: 4,
        wal_hash_key: None,
        batch_max_messages: 100,
        batch_max_wait: Duration::from_millis(20),
        lanes: 2,
        max_message_bytes: 64 * 1024,
        max_future: Duration::from_secs(86_400),
        retry_initial_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(500),
        metrics_addr: ([127, 0, 0, 1], 0).into(),
        shutdown_timeout: Duration::from_secs(25),
        retention: None,
        retention_interval: Duration::from_secs(3600),
        crash_after_stage: None,
    }
}

/// A reader running in this process.
pub struct RunningReader {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl RunningReader {
    pub async fn start(database_url: &str) -> anyhow::Result<Self> {
        Self::start_with(database_url, Some(redis_url())).await
    }

    /// A reader with the given Redis (or none: database reads only).
    pub async fn start_with(database_url: &str, redis_url: Option<String>) -> anyhow::Result<Self> {
        Self::start_configured(database_url, redis_url, |_| {}).await
    }

    /// A reader whose test configuration `adjust` may change (TLS, tokens…).
    pub async fn start_configured(
        database_url: &str,
        redis_url: Option<String>,
        adjust: impl FnOnce(&mut flare_storage_reader::Config),
    ) -> anyhow::Result<Self> {
        let _ = flare_storage_common::telemetry::init("flare-storage-test", &test_telemetry());
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let ops = TcpListener::bind("127.0.0.1:0").await?;
        let (grpc_addr, metrics_addr) = (grpc.local_addr()?, ops.local_addr()?);
        let mut config = flare_storage_reader::Config {
            grpc_addr,
            metrics_addr,
            postgres_url: Some(database_url.into()),
            postgres_max_connections: 4,
            mongo: None,
            redis: redis_url.map(|urls| RedisTarget::new(&urls, false)),
            redis_hot_ttl: Duration::from_secs(600),
            redis_hot_window: 200,
            redis_wait_replicas: 0,
            default_range: Duration::from_secs(7 * 24 * 3600),
            recall_limit: Duration::from_secs(120),
            max_page_size: 200,
            tls: None,
            auth_token: None,
            export_dir: None,
        };
        adjust(&mut config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(flare_storage_reader::serve(config, grpc, ops, shutdown.clone()));
        Ok(Self { grpc_addr, metrics_addr, shutdown, task })
    }

    pub async fn client(&self) -> anyhow::Result<StorageReaderServiceClient<Channel>> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc_addr))?.connect().await?;
        Ok(StorageReaderServiceClient::new(channel))
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task).await.context("reader did not stop within 30 s")??
    }
}

/// GETs a path of an ops endpoint; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).context("malformed HTTP response")?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Asks an ops endpoint's `/readyz` every 50 ms, from its first 200 until
/// [`ReadinessWatch::finish`], counting the answers and those that were not 200.
pub struct ReadinessWatch {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<(usize, usize)>>,
}

impl ReadinessWatch {
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        eventually(Duration::from_secs(60), "ready", || async {
            Ok((http_get(addr, "/readyz").await?.0 == 200).then_some(()))
        })
        .await?;
        let stop = CancellationToken::new();
        let watching = stop.clone();
        let task = tokio::spawn(async move {
            let (mut answers, mut not_ready) = (0, 0);
            while !watching.is_cancelled() {
                answers += 1;
                if http_get(addr, "/readyz").await?.0 != 200 {
                    not_ready += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok((answers, not_ready))
        });
        Ok(Self { stop, task })
    }

    /// Stops watching; returns (answers, answers that were not 200).
    pub async fn finish(self) -> anyhow::Result<(usize, usize)> {
        self.stop.cancel();
        self.task.await?
    }
}

/// The value of an unlabelled metric in Prometheus text output.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with the last state.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if tokio::time::Instant::now() >= deadline {
            match last_error {
                Some(error) => bail!("timed out waiting for {what}; last error: {error:#}"),
                None => bail!("timed out waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every record of a topic present within `timeout` by direct partition assignment (no
/// group join), stopping early once `expected` records arrived.
pub async fn read_topic(
    topic: &str,
    partitions: i32,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<TopicRecord>> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::message::Headers as _;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + timeout;
        let mut records = Vec::new();
        while records.len() < expected && std::time::Instant::now() < deadline {
            let Some(received) = consumer.poll(Duration::from_millis(100)) else { continue };
            let message = received?;
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|header| {
                            let value =
                                header.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
                            (header.key.to_owned(), value)
                        })
                        .collect()
                })
                .unwrap_or_default();
            records.push(TopicRecord {
                key: message.key().map(|key| String::from_utf8_lossy(key).into_owned()),
                payload: message.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
        Ok(records)
    })
    .await?
}

/// A record read back from a topic.
pub struct TopicRecord {
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl TopicRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(self.payload.as_deref().unwrap_or_default())?)
    }
}

/// A Redis connection for checking what the writer left there: to the node or the cluster
/// `REDIS_URL` names, as the binaries connect.
pub async fn redis_connection() -> anyhow::Result<RedisConnection> {
    let timeouts = Timeouts { connect: Duration::from_secs(2), response: Duration::from_secs(5), retries: 2 };
    RedisConnection::connect(&redis_target(), timeouts, Default::default())
        .await
        .context("Redis is not reachable at REDIS_URL")
}

/// The Redis of the tests: `REDIS_URL`, a cluster when it lists several seed nodes.
pub fn redis_target() -> RedisTarget {
    RedisTarget::new(&redis_url(), false)
}

/// A node of the local Redis Cluster, as `CLUSTER NODES` lists it.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    pub port: u16,
    pub id: String,
    pub master: bool,
    /// `CLUSTER NODES` flags, e.g. `myself,master` or `slave` or `master,fail`.
    pub flags: String,
    /// Hash slot ranges it serves (masters).
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    /// The cluster's nodes, as the first answering node of `seeds` (`REDIS_URL` form) sees them.
    pub async fn list(seeds: &str) -> anyhow::Result<Vec<ClusterNode>> {
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut Self::seed(seeds).await?).await?;
        nodes.lines().map(ClusterNode::parse).collect()
    }

    /// A connection to the first node of `seeds` that answers.
    async fn seed(seeds: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        for seed in seeds.split(',') {
            let Ok(client) = redis::Client::open(seed.trim()) else { continue };
            let Ok(mut connection) = client.get_multiplexed_async_connection().await else { continue };
            if redis::cmd("PING").query_async::<()>(&mut connection).await.is_ok() {
                return Ok(connection);
            }
        }
        bail!("no node of {seeds} answers")
    }

    /// `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot>…`
    fn parse(line: &str) -> anyhow::Result<ClusterNode> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(fields.len() >= 8, "unexpected CLUSTER NODES line {line:?}");
        let port = fields[1].split('@').next().and_then(|addr| addr.rsplit(':').next()).unwrap_or_default();
        let slots = fields[8..]
            .iter()
            .filter(|range| !range.starts_with('['))
            .map(|range| {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                anyhow::Ok((first.parse()?, last.parse()?))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(ClusterNode {
            port: port.parse()?,
            id: fields[0].to_owned(),
            master: fields[2].split(',').any(|flag| flag == "master") && !fields[2].contains("fail"),
            flags: fields[2].to_owned(),
            slots,
        })
    }

    /// Whether the cluster is whole: `redis-cli --cluster check` finds every node agreeing on
    /// the slots, no slot open (migrating or importing), every slot covered, and no node failing.
    pub async fn whole(seeds: &str) -> anyhow::Result<bool> {
        let nodes = ClusterNode::list(seeds).await?;
        let Some(node) = nodes.iter().find(|node| node.master) else { return Ok(false) };
        let address = format!("127.0.0.1:{}", node.port);
        let check = tokio::task::spawn_blocking(move || {
            std::process::Command::new("redis-cli").args(["--cluster", "check", &address]).output()
        })
        .await??;
        let report = String::from_utf8_lossy(&check.stdout);
        Ok(check.status.success()
            && !report.contains("[ERR]")
            && !report.contains("[WARNING]")
            && nodes.iter().all(|node| !node.flags.contains("fail")))
    }

    /// The hash slot of `key`.
    pub async fn slot_of(seeds: &str, key: &str) -> anyhow::Result<u16> {
        Ok(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut Self::seed(seeds).await?).await?)
    }

    /// The master serving `key`'s hash slot.
    pub async fn master_of(seeds: &str, key: &str) -> anyhow::Result<ClusterNode> {
        let slot = Self::slot_of(seeds, key).await?;
        ClusterNode::list(seeds)
            .await?
            .into_iter()
            .find(|node| node.master && node.slots.iter().any(|(first, last)| (*first..=*last).contains(&slot)))
            .with_context(|| format!("no master serves slot {slot} of {key}"))
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// How many `ASK`, `MOVED` and `TRYAGAIN` replies this node has given since it started
    /// (`INFO errorstats`).
    pub async fn redirections(&self) -> anyhow::Result<[u64; 3]> {
        let info: String = redis::cmd("INFO").arg("errorstats").query_async(&mut self.connection().await?).await?;
        let count = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(&format!("errorstat_{name}:count=")))
                .and_then(|count| count.trim().parse().ok())
                .unwrap_or(0)
        };
        Ok([count("ASK"), count("MOVED"), count("TRYAGAIN")])
    }

    async fn connection(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?.get_multiplexed_async_connection().await?)
    }

    /// Moves hash slot `slot` from this master to `target` as `redis-cli --cluster reshard`
    /// does, while clients go on using it: the slot is marked migrating here and importing
    /// there (clients get `ASK` for keys already moved, `TRYAGAIN` for scripts whose keys are
    /// split), its keys move `batch` at a time with `pause` between batches, then every master
    /// is told the slot's new owner (clients get `MOVED`).
    pub async fn migrate_slot(
        &self,
        target: &ClusterNode,
        masters: &[ClusterNode],
        slot: u16,
        batch: usize,
        pause: Duration,
    ) -> anyhow::Result<usize> {
        let (mut source, mut destination) = (self.connection().await?, target.connection().await?);
        let setslot = |state: &str, id: &str| {
            let mut command = redis::cmd("CLUSTER");
            command.arg("SETSLOT").arg(slot).arg(state).arg(id);
            command
        };
        setslot("IMPORTING", &self.id).query_async::<()>(&mut destination).await?;
        setslot("MIGRATING", &target.id).query_async::<()>(&mut source).await?;
        let mut moved = 0;
        loop {
            let keys: Vec<String> =
                redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(batch).query_async(&mut source).await?;
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(target.port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("REPLACE")
                .arg("KEYS")
                .arg(&keys)
                .query_async::<()>(&mut source)
                .await?;
            moved += keys.len();
            tokio::time::sleep(pause).await;
        }
        setslot("NODE", &target.id).query_async::<()>(&mut destination).await?;
        setslot("NODE", &target.id).query_async::<()>(&mut source).await?;
        for master in masters.iter().filter(|master| master.port != self.port && master.port != target.port) {
            setslot("NODE", &target.id).query_async::<()>(&mut master.connection().await?).await?;
        }
        Ok(moved)
    }

    /// Kills the node's process with SIGKILL and returns the command line that starts it again
    /// with its configuration (its node id and cluster state are in its cluster config file).
    pub async fn kill(&self) -> anyhow::Result<std::process::Command> {
        let mut connection = redis::Client::open(self.url())?.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await?;
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .context("INFO server names no process_id")?
            .trim()
            .to_owned();
        let config = |name: &'static str| {
            let mut connection = connection.clone();
            async move {
                let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(&mut connection).await?;
                pair.get(1).cloned().with_context(|| format!("CONFIG GET {name}"))
            }
        };
        let (dir, config_file, timeout) =
            (config("dir").await?, config("cluster-config-file").await?, config("cluster-node-timeout").await?);
        let killed = std::process::Command::new("kill").args(["-9", &pid]).status()?;
        anyhow::ensure!(killed.success(), "kill -9 {pid} failed");
        let mut restart = std::process::Command::new("redis-server");
        restart.args(["--daemonize", "yes", "--bind", "127.0.0.1", "--port", &self.port.to_string()]);
        restart.args(["--save", "", "--appendonly", "no", "--cluster-enabled", "yes"]);
        restart.args(["--cluster-config-file", &config_file, "--cluster-node-timeout", &timeout, "--dir", &dir]);
        restart.args(["--logfile", &format!("{dir}/redis.log"), "--pidfile", &format!("{dir}/redis.pid")]);
        Ok(restart)
    }
}

/// The writer binary built next to the test binaries, for tests that need a real process.
pub fn writer_binary() -> anyhow::Result<std::path::PathBuf> {
    binary("flare-storage-writer")
}

/// The writer binary for a test's topics, consumer group and PostgreSQL database (no MongoDB),
/// quiet, with a crash injected after `crash_after` (`WRITER_CRASH_AFTER_STAGE`) when given;
/// add settings, then spawn it.
pub fn writer_process(
    topic: &str,
    dlq_topic: &str,
    group: &str,
    postgres_url: &str,
    crash_after: Option<&str>,
) -> anyhow::Result<std::process::Command> {
    let mut command = std::process::Command::new(writer_binary()?);
    command
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
        .env("KAFKA_TOPIC", topic)
        .env("KAFKA_GROUP_ID", group)
        .env("KAFKA_DLQ_TOPIC", dlq_topic)
        .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("REDIS_URL", redis_url())
        .env("POSTGRES_URL", postgres_url)
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "error")
        .env_remove("MONGO_URL")
        .stdout(std::process::Stdio::null());
    if let Some(stage) = crash_after {
        command.env("WRITER_CRASH_AFTER_STAGE", stage);
    }
    Ok(command)
}

/// A binary of the workspace built next to the test binaries (`cargo build --bins`;
/// `scripts/test.sh` does it).
pub fn binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let test_binary = std::env::current_exe()?;
    let profile_dir = test_binary
        .parent()
        .and_then(std::path::Path::parent)
        .context("test binary is not in target/<profile>/deps")?;
    let path = profile_dir.join(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it first (cargo build --bins, as scripts/test.sh does)",
        path.display()
    );
    Ok(path)
}

/// A TCP proxy in front of a real server, to take that server away from the app under test
/// and bring it back (an outage as the app sees it) without disturbing other tests.
pub struct Proxy {
    pub addr: SocketAddr,
    down: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (down, down_changes) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *down_changes.borrow() {
                    continue; // refused: dropped at once
                }
                let mut down_changes = down_changes.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down_changes.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Ok(Self { addr, down })
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        let _ = self.down.send(true);
    }

    pub fn restore(&self) {
        let _ = self.down.send(false);
    }
}

/// `host:port` of a URL such as `postgres://u:p@host:port/db` or `redis://host:port`.
pub fn url_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let after_scheme = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let authority = after_scheme.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map(|(_, host)| host).unwrap_or(authority);
    let host_port = if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:0") };
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(&host_port.replace("localhost", "127.0.0.1"))?
        .next()
        .with_context(|| format!("cannot resolve {host_port}"))?;
    Ok(resolved)
}

/// `url` with its host:port replaced by `addr`.
pub fn url_through(url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("URL without scheme")?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let credentials = authority.rsplit_once('@').map(|(credentials, _)| format!("{credentials}@")).unwrap_or_default();
    Ok(format!("{scheme}://{credentials}{addr}{tail}"))
}

/// A MongoDB-protocol server of a test's own (the launcher `scripts/services.sh` installs),
/// keeping its data in `directory` so it can be killed and restarted without losing it.
pub fn own_mongo(port: u16, directory: &std::path::Path) -> anyhow::Result<std::process::Child> {
    let launcher = std::env::var("FLARE_SECANTUSD").map_err(|_| {
        anyhow::anyhow!("FLARE_SECANTUSD is not set: run scripts/services.sh up (it installs the server)")
    })?;
    Ok(std::process::Command::new(launcher)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--sync-on-commit", "--storage-path"])
        .arg(directory)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?)
}

/// Logging for tests: `RUST_LOG` as the binaries read it, text lines.
fn test_telemetry() -> flare_storage_common::telemetry::TelemetryArgs {
    flare_storage_common::telemetry::TelemetryArgs {
        rust_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ..Default::default()
    }
}

/// Applies the migrations before `first_left_out` (a migration's version), as a database of
/// an earlier version has them.
pub async fn migrate_before(url: &str, first_left_out: &str) -> anyhow::Result<()> {
    let released = std::env::temp_dir().join(unique("released-migrations"));
    std::fs::create_dir_all(&released)?;
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    for entry in std::fs::read_dir(&source)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_owned();
        if name.as_str() < first_left_out {
            std::fs::copy(&path, released.join(name))?;
        }
    }
    let pool = sqlx::PgPool::connect(url).await?;
    sqlx::migrate::Migrator::new(released.as_path()).await?.run(&pool).await?;
    pool.close().await;
    std::fs::remove_dir_all(&released)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_swapped_in_urls() {
        assert_eq!(with_database("postgres://u:p@h:5432/test", "x"), "postgres://u:p@h:5432/x");
        assert_eq!(with_database("postgres://h/test?sslmode=disable", "x"), "postgres://h/x?sslmode=disable");
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }

    #[test]
    fn urls_are_rerouted_through_a_proxy() -> anyhow::Result<()> {
        let proxy: SocketAddr = "127.0.0.1:4000".parse()?;
        assert_eq!(url_addr("postgres://u:p@127.0.0.1:5432/db")?.port(), 5432);
        assert_eq!(url_through("postgres://u:p@127.0.0.1:5432/db?x=1", proxy)?, "postgres://u:p@127.0.0.1:4000/db?x=1");
        assert_eq!(url_through("redis://127.0.0.1:6379", proxy)?, "redis://127.0.0.1:4000");
        Ok(())
    }

    #[test]
    fn metric_values_are_found_by_exact_name() {
        let text = "# HELP a_total x\na_total 3\na_total_other 5\n";
        assert_eq!(metric_value(text, "a_total"), Some(3.0));
        assert_eq!(metric_value(text, "missing"), None);
    }
}
