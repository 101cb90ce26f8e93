//! Writer configuration, read once from the environment (SPEC §4) and validated at start.

use std::net::SocketAddr;
use std::time::Duration;

use flare_storage_common::settings::Settings;

use crate::error::Stage;

/// Everything the writer needs to run. Built by [`Config::from_env`]; tests build it directly.
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
    pub redis_url: String,
    pub redis_hot_ttl: Duration,
    pub redis_idempotency_ttl: Duration,
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

#[derive(Clone)]
pub struct MongoConfig {
    pub url: String,
    pub database: String,
    pub collection: String,
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

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (the environment in production, a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let settings = Settings::new(lookup);
        let postgres_url = settings.url("POSTGRES_URL", &["postgres", "postgresql"])?;
        let mongo = settings.url("MONGO_URL", &["mongodb", "mongodb+srv"])?.map(|url| MongoConfig {
            url,
            database: settings.text("MONGO_DATABASE", "flare_im"),
            collection: settings.text("MONGO_COLLECTION", "messages"),
        });
        if postgres_url.is_none() && mongo.is_none() {
            return Err(ConfigError("set POSTGRES_URL, MONGO_URL or both: messages need a database".into()));
        }
        let redis_url = settings
            .url("REDIS_URL", &["redis", "rediss"])?
            .ok_or_else(|| ConfigError("REDIS_URL is required".into()))?;
        let retry_initial_backoff = settings.millis("WRITER_RETRY_INITIAL_BACKOFF_MS", 100)?;
        let retry_max_backoff = settings.millis("WRITER_RETRY_MAX_BACKOFF_MS", 5_000)?;
        if retry_max_backoff < retry_initial_backoff {
            return Err(ConfigError(
                "WRITER_RETRY_MAX_BACKOFF_MS must not be below WRITER_RETRY_INITIAL_BACKOFF_MS".into(),
            ));
        }

        Ok(Self {
            kafka_bootstrap_servers: settings.required("KAFKA_BOOTSTRAP_SERVERS")?,
            kafka_topic: settings.text("KAFKA_TOPIC", "storage-messages"),
            kafka_group_id: settings.text("KAFKA_GROUP_ID", "storage-writer"),
            kafka_dlq_topic: settings.text("KAFKA_DLQ_TOPIC", "storage-messages-dlq"),
            kafka_ack_topic: settings.get("KAFKA_ACK_TOPIC"),
            redis_url,
            redis_hot_ttl: settings.seconds("REDIS_HOT_TTL_SECONDS", 3600)?,
            redis_idempotency_ttl: settings.seconds("REDIS_IDEMPOTENCY_TTL_SECONDS", 86_400)?,
            redis_hot_window: settings.size("REDIS_HOT_MAX_MESSAGES", 200)?,
            mongo,
            wal_hash_key: settings.get("WAL_HASH_KEY"),
            kafka_session_timeout: settings.millis("KAFKA_SESSION_TIMEOUT_MS", 10_000)?,
            kafka_fetch_wait: settings.millis("KAFKA_FETCH_WAIT_MAX_MS", 100)?,
            kafka_max_poll_interval: settings.millis("KAFKA_MAX_POLL_INTERVAL_MS", 300_000)?,
            kafka_prefetch_kbytes: settings.size("KAFKA_PREFETCH_KBYTES", 16_384)?,
            postgres_url,
            postgres_max_connections: settings.size("POSTGRES_MAX_CONNECTIONS", 8)?,
            batch_max_messages: settings.size("WRITER_BATCH_SIZE", 500)?,
            batch_max_wait: settings.millis("WRITER_BATCH_TIMEOUT_MS", 20)?,
            lanes: settings.positive("WRITER_LANES", 1).and_then(|lanes| {
                usize::try_from(lanes).map_err(|_| ConfigError("WRITER_LANES is too large".into()))
            })?,
            max_message_bytes: settings.size("WRITER_MAX_MESSAGE_BYTES", 1_048_576)?,
            max_future: settings.seconds("WRITER_MAX_FUTURE_SECONDS", 86_400)?,
            retry_initial_backoff,
            retry_max_backoff,
            metrics_addr: settings.address("METRICS_ADDR", "0.0.0.0:9100")?,
            shutdown_timeout: settings.seconds("WRITER_SHUTDOWN_TIMEOUT_SECONDS", 25)?,
            retention: match settings.number("STORAGE_RETENTION_DAYS", 0)? {
                0 => None,
                days => Some(Duration::from_secs(days.saturating_mul(86_400))),
            },
            retention_interval: settings.seconds("STORAGE_RETENTION_INTERVAL_SECONDS", 3600)?,
            crash_after_stage: match settings.get("WRITER_CRASH_AFTER_STAGE") {
                None => None,
                Some(name) => Some(Stage::from_name(&name).ok_or_else(|| {
                    let names: Vec<&str> = Stage::ALL.iter().map(|stage| stage.name()).collect();
                    ConfigError(format!(
                        "WRITER_CRASH_AFTER_STAGE must name a stage ({}), not {name:?}",
                        names.join(", ")
                    ))
                })?),
            },
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
        assert!(error.to_string().starts_with("WRITER_BATCH_SIZE must be"), "{error}");
        let mut vars = MINIMAL.to_vec();
        vars.push(("WRITER_BATCH_SIZE", "0"));
        assert!(config(&vars).is_err());
        let error =
            config(&[("KAFKA_BOOTSTRAP_SERVERS", "k:9092"), ("POSTGRES_URL", "mysql://x")]).expect_err("bad url");
        assert!(error.to_string().contains("POSTGRES_URL"), "{error}");
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
