//! The servers a benchmark runs against, found the way the rest of the project finds them
//! (`scripts/services.sh env`), and the scratch databases and topics it makes there.

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Connection as _;

use crate::workload::Record;

#[derive(Clone)]
pub struct Services {
    pub postgres: String,
    pub redis: String,
    pub kafka: String,
    pub mongo_url: Option<String>,
}

impl Services {
    pub fn from_env() -> anyhow::Result<Self> {
        let required = |name: &str| {
            std::env::var(name).with_context(|| format!("{name} is not set: run `eval \"$(scripts/services.sh up)\"`"))
        };
        Ok(Self {
            postgres: required("POSTGRES_URL")?,
            redis: required("REDIS_URL")?,
            kafka: required("KAFKA_BOOTSTRAP_SERVERS")?,
            mongo_url: std::env::var("MONGO_URL").ok(),
        })
    }
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_nanos());
    format!("{prefix}_{:x}", nanos % (1 << 48))
}

pub struct Database {
    pub name: String,
    pub url: String,
}

/// A new empty database on the server of `POSTGRES_URL`.
pub async fn create_database(services: &Services, prefix: &str) -> anyhow::Result<Database> {
    let mut admin = sqlx::PgConnection::connect(&services.postgres).await.context("POSTGRES_URL")?;
    let name = unique(prefix);
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
    let (base, query) = match services.postgres.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (services.postgres.as_str(), String::new()),
    };
    let server = &base[..base.rfind('/').filter(|slash| *slash > "postgres://".len()).unwrap_or(base.len())];
    Ok(Database { url: format!("{server}/{name}{query}"), name })
}

pub async fn drop_database(services: &Services, database: &Database) -> anyhow::Result<()> {
    let mut admin = sqlx::PgConnection::connect(&services.postgres).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", database.name)).execute(&mut admin).await?;
    Ok(())
}

/// Creates topics before anything subscribes (the test broker does not show a topic created
/// later to a waiting consumer).
pub async fn create_topics(services: &Services, names: &[&str], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &services.kafka).create()?;
    let topics: Vec<NewTopic<'_>> =
        names.iter().map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1))).collect();
    for result in admin.create_topics(&topics, &AdminOptions::new()).await? {
        result.map_err(|(topic, error)| anyhow::anyhow!("cannot create topic {topic}: {error}"))?;
    }
    Ok(())
}

/// Removes every Redis key of `tenant` (all share the prefix `fs:{<len>:<tenant>:`), so runs
/// start from an empty cache and leave nothing behind.
pub async fn forget_tenant(services: &Services, tenant: &str) -> anyhow::Result<usize> {
    use redis::AsyncCommands as _;
    let client = redis::Client::open(services.redis.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let pattern = format!("fs:{{{}:{tenant}:*", tenant.len());
    let keys: Vec<String> = {
        let mut scan = connection.scan_match::<_, String>(&pattern).await?;
        let mut keys = Vec::new();
        while let Some(key) = futures::StreamExt::next(&mut scan).await {
            keys.push(key?);
        }
        keys
    };
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("UNLINK").arg(chunk).query_async(&mut connection).await?;
    }
    Ok(keys.len())
}

/// A plain HTTP/1.0 GET, enough for a metrics page.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// Produces every record (keyed by session) and waits until the broker has them all.
pub async fn produce_all(services: &Services, topic: &str, records: &[Record]) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut pending = Vec::with_capacity(50_000);
    for record in records {
        let delivery = FutureRecord::to(topic).key(&record.session_id).payload(&record.payload);
        pending.push(producer.send_result(delivery).map_err(|(error, _)| error)?);
        if pending.len() == 50_000 {
            for delivery in futures::future::join_all(pending.drain(..)).await {
                delivery?.map_err(|(error, _)| error)?;
            }
        }
    }
    for delivery in futures::future::join_all(pending).await {
        delivery?.map_err(|(error, _)| error)?;
    }
    Ok(())
}

/// The writer binary set up for a benchmark: its own group and dead-letter topic, the
/// benchmark's Redis and database, no MongoDB, quiet logs. Callers add what their run needs.
pub fn writer_command(
    binary: &std::path::Path,
    services: &Services,
    topic: &str,
    database_url: &str,
) -> std::process::Command {
    let mut command = std::process::Command::new(binary);
    command
        .env("KAFKA_BOOTSTRAP_SERVERS", &services.kafka)
        .env("KAFKA_TOPIC", topic)
        .env("KAFKA_GROUP_ID", unique("bench-writer"))
        .env("KAFKA_DLQ_TOPIC", unique("bench-dlq"))
        .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("REDIS_URL", &services.redis)
        .env("POSTGRES_URL", database_url)
        .env("METRICS_ADDR", "127.0.0.1:0")
        // The writer's own logs (stderr), quiet unless asked for.
        .env("RUST_LOG", std::env::var("FLARE_BENCH_WRITER_LOG").unwrap_or_else(|_| "warn".into()))
        .env_remove("MONGO_URL")
        .stdout(std::process::Stdio::null());
    command
}
