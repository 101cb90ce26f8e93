//! Writer configuration, read once from the environment (SPEC §4) and validated at start.

use std::net::SocketAddr;
use std::time::Duration;

use clap::CommandFactory as _;
use flare_storage_common::redis_connection::RedisTarget;
pub use flare_storage_common::settings::MongoConfig;
use flare_storage_common::settings::{self, DatabaseArgs, RedisArgs, parse};
use flare_storage_common::telemetry::TelemetryArgs;

use crate::error::Stage;

/// Everything the writer needs to run. Built by [`Config::from_settings`]; tests build it directly.
#[derive(Clone)]
pub struct Config {
    pub kafka_bootstrap_servers: String,
    pub kafka_topic: String,
    pub kafka_group_id: String,
    pub kafka_dlq_topic: String,
    /// Where ACK events go; none are sent when unset.
    pub kafka_ack_topic: Option<String>,
    pub kafka_session_timeout: Duration,
    /// Longest time the broker may hold a fetch when no records are waiting.
    pub kafka_fetch_wait: Duration,
    /// librdkafka `max.poll.interval.ms`: the consumer leaves the group when not polled this
    /// long. The writer keeps polling (with blocked lanes' partitions paused) during outages.
    pub kafka_max_poll_interval: Duration,
    /// Bound of the client's prefetch queue, in KiB (librdkafka `queued.max.messages.kbytes`).
    pub kafka_prefetch_kbytes: usize,
    /// Redis node or cluster.
    pub redis: RedisTarget,
    pub redis_hot_ttl: Duration,
    pub redis_idempotency_ttl: Duration,
    /// Replicas that must acknowledge the cache stage's writes (`WAIT`); 0: none.
    pub redis_wait_replicas: usize,
    /// Newest messages kept per session in the hot cache.
    pub redis_hot_window: usize,
    pub mongo: Option<MongoConfig>,
    pub postgres_url: Option<String>,
    pub postgres_max_connections: u32,
    /// Upstream write-ahead hash whose entries are removed once stored (`HDEL key message_id`).
    pub wal_hash_key: Option<String>,
    pub batch_max_messages: usize,
    pub batch_max_wait: Duration,
    /// Batches in flight at once, each over its own share of the partitions.
    pub lanes: usize,
    pub max_message_bytes: usize,
    /// How far ahead of the writer's clock a message may be dated; later ones are
    /// dead-lettered.
    pub max_future: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub metrics_addr: SocketAddr,
    /// Messages older than this are removed by the retention job; `None`: kept forever.
    pub retention: Option<Duration>,
    pub retention_interval: Duration,
    /// Longest time from SIGTERM to exit; a batch not finished by then is redelivered.
    pub shutdown_timeout: Duration,
    /// Fault injection for crash tests: abort right after this pipeline stage.
    pub crash_after_stage: Option<Stage>,
}

impl std::fmt::Debug for Config {
    // Connection URLs may carry passwords; they are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)
            .field("kafka_topic", &self.kafka_topic)
            .field("kafka_group_id", &self.kafka_group_id)
            .field("kafka_dlq_topic", &self.kafka_dlq_topic)
            .field("kafka_ack_topic", &self.kafka_ack_topic)
            .field("postgres", &self.postgres_url.is_some())
            .field("mongo", &self.mongo.as_ref().map(|mongo| (&mongo.database, &mongo.collection)))
            .field("wal_hash_key", &self.wal_hash_key)
            .field("batch_max_messages", &self.batch_max_messages)
            .field("batch_max_wait", &self.batch_max_wait)
            .field("lanes", &self.lanes)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

pub use flare_storage_common::settings::ConfigError;

/// The writer's settings as flags and environment variables (README "Configuration"); turned
/// into a [`Config`] by [`Config::from_settings`], which checks the rules between them.
// No Debug: the URLs may carry passwords.
#[derive(clap::Parser, Clone)]
#[command(name = "flare-storage-writer")]
pub struct Settings {
    /// Kafka brokers, host:port[,host:port] (required to run).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", value_parser = parse::text)]
    pub kafka_bootstrap_servers: Option<String>,
    /// Topic of StoreMessageRequest records.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "storage-messages", value_parser = parse::text)]
    pub kafka_topic: String,
    /// Consumer group shared by all writer instances.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "storage-writer", value_parser = parse::text)]
    pub kafka_group_id: String,
    /// Dead-letter topic for records that can never be stored.
    #[arg(long, env = "KAFKA_DLQ_TOPIC", default_value = "storage-messages-dlq", value_parser = parse::text)]
    pub kafka_dlq_topic: String,
    /// Topic for ACK events; none are sent when unset.
    #[arg(long, env = "KAFKA_ACK_TOPIC", value_parser = parse::text)]
    pub kafka_ack_topic: Option<String>,
    /// Consumer group session timeout, in milliseconds.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value = "10000", value_parser = parse::millis)]
    pub kafka_session_timeout_ms: Duration,
    /// librdkafka max.poll.interval.ms; not below KAFKA_SESSION_TIMEOUT_MS.
    #[arg(long, env = "KAFKA_MAX_POLL_INTERVAL_MS", default_value = "300000", value_parser = parse::millis)]
    pub kafka_max_poll_interval_ms: Duration,
    /// Longest time the broker may hold a fetch while no records wait, in milliseconds.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX_MS", default_value = "100", value_parser = parse::millis)]
    pub kafka_fetch_wait_max_ms: Duration,
    /// Bound of the consumer's prefetch queue, in KiB.
    #[arg(long, env = "KAFKA_PREFETCH_KBYTES", default_value = "16384", value_parser = parse::positive::<usize>)]
    pub kafka_prefetch_kbytes: usize,
    /// redis://[:password@]host:port[/db] (required to run).
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = parse::redis_url)]
    pub redis_url: Option<String>,
    /// How long the seq handed to a message not yet stored is remembered, in seconds: its
    /// redelivery within that time gets the same seq.
    #[arg(long, env = "REDIS_IDEMPOTENCY_TTL_SECONDS", default_value = "86400", value_parser = parse::seconds)]
    pub redis_idempotency_ttl_seconds: Duration,
    /// PostgreSQL connection pool size.
    #[arg(long, env = "POSTGRES_MAX_CONNECTIONS", default_value = "8", value_parser = parse::positive::<u32>)]
    pub postgres_max_connections: u32,
    /// Redis hash of the upstream's write-ahead entries, emptied of each message once stored.
    #[arg(long, env = "WAL_HASH_KEY", value_parser = parse::text)]
    pub wal_hash_key: Option<String>,
    /// Records per batch at most.
    #[arg(long, env = "WRITER_BATCH_SIZE", default_value = "500", value_parser = parse::positive::<usize>)]
    pub writer_batch_size: usize,
    /// How long a batch waits to fill after its first record, in milliseconds.
    #[arg(long, env = "WRITER_BATCH_TIMEOUT_MS", default_value = "20", value_parser = parse::millis)]
    pub writer_batch_timeout_ms: Duration,
    /// Batches in flight at once, each over its own share of the partitions.
    #[arg(long, env = "WRITER_LANES", default_value = "1", value_parser = parse::positive::<usize>)]
    pub writer_lanes: usize,
    /// Larger record values are dead-lettered, in bytes.
    #[arg(long, env = "WRITER_MAX_MESSAGE_BYTES", default_value = "1048576", value_parser = parse::positive::<usize>)]
    pub writer_max_message_bytes: usize,
    /// How far ahead of its Kafka record's time a message may be dated, in seconds.
    #[arg(long, env = "WRITER_MAX_FUTURE_SECONDS", default_value = "86400", value_parser = parse::seconds)]
    pub writer_max_future_seconds: Duration,
    /// First pause after a failed batch, in milliseconds.
    #[arg(long, env = "WRITER_RETRY_INITIAL_BACKOFF_MS", default_value = "100", value_parser = parse::millis)]
    pub writer_retry_initial_backoff_ms: Duration,
    /// Longest pause between retries, in milliseconds (retries never stop).
    #[arg(long, env = "WRITER_RETRY_MAX_BACKOFF_MS", default_value = "5000", value_parser = parse::millis)]
    pub writer_retry_max_backoff_ms: Duration,
    /// Messages older than this many days are removed; 0 keeps them forever.
    #[arg(long, env = "STORAGE_RETENTION_DAYS", default_value = "0", value_parser = parse::number)]
    pub storage_retention_days: u64,
    /// How often the retention job runs, in seconds.
    #[arg(long, env = "STORAGE_RETENTION_INTERVAL_SECONDS", default_value = "3600", value_parser = parse::seconds)]
    pub storage_retention_interval_seconds: Duration,
    /// Longest drain after SIGTERM, in seconds; keep the pod's grace period above it.
    #[arg(long, env = "WRITER_SHUTDOWN_TIMEOUT_SECONDS", default_value = "25", value_parser = parse::seconds)]
    pub writer_shutdown_timeout_seconds: Duration,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9100", value_parser = parse::address)]
    pub metrics_addr: SocketAddr,
    /// Fault injection for crash tests only: abort right after the named stage.
    #[arg(long, env = "WRITER_CRASH_AFTER_STAGE", value_parser = stage)]
    pub writer_crash_after_stage: Option<Stage>,
    #[command(flatten)]
    pub databases: DatabaseArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

fn stage(name: &str) -> Result<Stage, String> {
    Stage::from_name(name.trim()).ok_or_else(|| {
        let names: Vec<&str> = Stage::ALL.iter().map(|stage| stage.name()).collect();
        format!("must name a stage ({})", names.join(", "))
    })
}

impl Config {
    /// Reads settings through `lookup` (an environment as a map: manifests, tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_settings(settings::from_lookup(Settings::command(), lookup)?)
    }

    /// Checks the rules between settings: a database, Redis and Kafka are needed, and the
    /// retry and poll bounds must be in order.
    pub fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        let (postgres_url, mongo) = settings.databases.into_configs()?;
        let redis_url = settings.redis_url.ok_or_else(|| ConfigError("REDIS_URL is required".into()))?;
        let kafka_bootstrap_servers = settings
            .kafka_bootstrap_servers
            .ok_or_else(|| ConfigError("KAFKA_BOOTSTRAP_SERVERS is required".into()))?;
        if settings.writer_retry_max_backoff_ms < settings.writer_retry_initial_backoff_ms {
            return Err(ConfigError(
                "WRITER_RETRY_MAX_BACKOFF_MS must not be below WRITER_RETRY_INITIAL_BACKOFF_MS".into(),
            ));
        }
        if settings.kafka_max_poll_interval_ms < settings.kafka_session_timeout_ms {
            return Err(ConfigError("KAFKA_MAX_POLL_INTERVAL_MS must not be below KAFKA_SESSION_TIMEOUT_MS".into()));
        }
        Ok(Self {
            kafka_bootstrap_servers,
            kafka_topic: settings.kafka_topic,
            kafka_group_id: settings.kafka_group_id,
            kafka_dlq_topic: settings.kafka_dlq_topic,
            kafka_ack_topic: settings.kafka_ack_topic,
            kafka_session_timeout: settings.kafka_session_timeout_ms,
            kafka_fetch_wait: settings.kafka_fetch_wait_max_ms,
            kafka_max_poll_interval: settings.kafka_max_poll_interval_ms,
            kafka_prefetch_kbytes: settings.kafka_prefetch_kbytes,
            redis: RedisTarget::new(&redis_url, settings.redis.redis_cluster),
            redis_hot_ttl: settings.redis.redis_hot_ttl_seconds,
            redis_idempotency_ttl: settings.redis_idempotency_ttl_seconds,
            redis_wait_replicas: settings.redis.redis_wait_replicas,
            redis_hot_window: settings.redis.redis_hot_max_messages,
            mongo,
            postgres_url,
            postgres_max_connections: settings.postgres_max_connections,
            wal_hash_key: settings.wal_hash_key,
            batch_max_messages: settings.writer_batch_size,
            batch_max_wait: settings.writer_batch_timeout_ms,
            lanes: settings.writer_lanes,
            max_message_bytes: settings.writer_max_message_bytes,
            max_future: settings.writer_max_future_seconds,
            retry_initial_backoff: settings.writer_retry_initial_backoff_ms,
            retry_max_backoff: settings.writer_retry_max_backoff_ms,
            metrics_addr: settings.metrics_addr,
            retention: match settings.storage_retention_days {
                0 => None,
                days => Some(Duration::from_secs(days.saturating_mul(86_400))),
            },
            retention_interval: settings.storage_retention_interval_seconds,
            shutdown_timeout: settings.writer_shutdown_timeout_seconds,
            crash_after_stage: settings.writer_crash_after_stage,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    const MINIMAL: [(&str, &str); 3] = [
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        ("POSTGRES_URL", "postgres://u@h/db"),
        ("REDIS_URL", "redis://127.0.0.1:6379"),
    ];

    #[test]
    fn defaults_follow_the_spec() {
        let config = config(&MINIMAL).expect("valid");
        assert_eq!(config.kafka_topic, "storage-messages");
        assert_eq!(config.kafka_group_id, "storage-writer");
        assert_eq!(config.kafka_dlq_topic, "storage-messages-dlq");
        assert_eq!(config.metrics_addr.to_string(), "0.0.0.0:9100");
        assert_eq!(config.batch_max_messages, 500);
        assert_eq!(config.redis_hot_ttl, Duration::from_secs(3600));
        assert_eq!(config.redis_idempotency_ttl, Duration::from_secs(86_400));
        assert_eq!(config.max_future, Duration::from_secs(86_400));
        assert!(config.kafka_ack_topic.is_none() && config.wal_hash_key.is_none() && config.mongo.is_none());
    }

    #[test]
    fn a_database_is_required_and_mongo_has_defaults() {
        let error = config(&[("KAFKA_BOOTSTRAP_SERVERS", "k:9092"), ("REDIS_URL", "redis://r")]).expect_err("no db");
        assert!(error.to_string().contains("POSTGRES_URL, MONGO_URL"), "{error}");
        let config = config(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "k:9092"),
            ("REDIS_URL", "redis://r"),
            ("MONGO_URL", "mongodb://m:27017"),
        ])
        .expect("mongo alone is enough");
        let mongo = config.mongo.expect("mongo configured");
        assert_eq!((mongo.database.as_str(), mongo.collection.as_str()), ("flare_im", "messages"));
        assert!(config.postgres_url.is_none());
    }

    #[test]
    fn missing_and_bad_values_name_the_variable() {
        let error =
            config(&[("POSTGRES_URL", "postgres://h/db"), ("REDIS_URL", "redis://r")]).expect_err("missing kafka");
        assert_eq!(error.to_string(), "KAFKA_BOOTSTRAP_SERVERS is required");
        let mut vars = MINIMAL.to_vec();
        vars.push(("WRITER_BATCH_SIZE", "lots"));
        let error = config(&vars).expect_err("bad batch size");
        assert_eq!(
            error.to_string(),
            "invalid value 'lots' for '--writer-batch-size <WRITER_BATCH_SIZE>': must be a non-negative integer"
        );
        let mut vars = MINIMAL.to_vec();
        vars.push(("WRITER_BATCH_SIZE", "0"));
        assert!(config(&vars).is_err());
        let error =
            config(&[("KAFKA_BOOTSTRAP_SERVERS", "k:9092"), ("POSTGRES_URL", "mysql://x")]).expect_err("bad url");
        assert!(error.to_string().contains("POSTGRES_URL"), "{error}");
        let mut vars = MINIMAL.to_vec();
        vars.extend([("KAFKA_SESSION_TIMEOUT_MS", "30000"), ("KAFKA_MAX_POLL_INTERVAL_MS", "20000")]);
        let error = config(&vars).expect_err("poll interval below the session timeout");
        assert!(error.to_string().starts_with("KAFKA_MAX_POLL_INTERVAL_MS"), "{error}");
        let mut vars = MINIMAL.to_vec();
        vars.push(("WRITER_CRASH_AFTER_STAGE", "nowhere"));
        let error = config(&vars).expect_err("unknown stage");
        assert!(error.to_string().contains("must name a stage (idempotency, seq"), "{error}");
    }

    #[test]
    fn debug_output_hides_urls() {
        let config = config(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "k:9092"),
            ("REDIS_URL", "redis://:secret@r"),
            ("POSTGRES_URL", "postgres://u:secret@h/db"),
        ])
        .expect("valid");
        assert!(!format!("{config:?}").contains("secret"));
    }
}
