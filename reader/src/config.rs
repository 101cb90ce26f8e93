//! Reader configuration, read once from the environment (SPEC §4) and validated at start.

use std::net::SocketAddr;
use std::time::Duration;

use flare_storage_common::redis_connection::RedisTarget;
pub use flare_storage_common::settings::MongoConfig;
use flare_storage_common::settings::{self, DatabaseArgs, RedisArgs, parse};
use flare_storage_common::telemetry::TelemetryArgs;

#[derive(Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The archive; optional when MongoDB is configured (at least one of the two).
    pub postgres_url: Option<String>,
    pub postgres_max_connections: u32,
    /// The realtime store, read before Postgres.
    pub mongo: Option<MongoConfig>,
    /// The writer's hot cache; reads go to the databases only when unset.
    pub redis: Option<RedisTarget>,
    /// Lifetime and size of a hot window the reader fills; the same as the writer's settings.
    pub redis_hot_ttl: Duration,
    pub redis_hot_window: usize,
    /// Replicas that must hold a command's cache writes before the command answers (Redis
    /// `WAIT`, within 1 s; 0: none), so a failover cannot lose them.
    pub redis_wait_replicas: usize,
    /// QueryMessages looks this far back when the request gives no start time.
    pub default_range: Duration,
    pub max_page_size: u32,
    /// Longest time after sending that a message can be recalled.
    pub recall_limit: Duration,
    /// TLS for the gRPC port; `None`: plain text (for use behind a mesh or on a private network).
    pub tls: Option<TlsConfig>,
    /// When set, callers must send `authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// Where the unary ExportMessages writes its exports; without it that call is refused.
    pub export_dir: Option<std::path::PathBuf>,
}

/// Server certificate and key (PEM files), and with `client_ca` mutual TLS: only clients with
/// a certificate signed by that CA get in.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Config {
    // Connection URLs may carry passwords; they are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("grpc_addr", &self.grpc_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("postgres", &self.postgres_url.is_some())
            .field("mongo", &self.mongo.as_ref().map(|mongo| (&mongo.database, &mongo.collection)))
            .field("redis", &self.redis.as_ref().map(|redis| redis.cluster))
            .field("default_range", &self.default_range)
            .field("max_page_size", &self.max_page_size)
            .field("tls", &self.tls)
            .field("export_dir", &self.export_dir)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

pub use flare_storage_common::settings::ConfigError;

/// The reader's settings as flags and environment variables (README "Configuration"); turned
/// into a [`Config`] by [`Config::from_settings`], which checks the rules between them.
// No Debug: the URLs and the token are secrets.
#[derive(clap::Parser, Clone)]
#[command(name = "flare-storage-reader")]
pub struct Settings {
    /// PostgreSQL connection pool size.
    #[arg(long, env = "POSTGRES_MAX_CONNECTIONS", default_value = "16", value_parser = parse::positive::<u32>)]
    pub postgres_max_connections: u32,
    /// The writer's Redis; without it every read goes to the databases.
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_parser = parse::redis_url)]
    pub redis_url: Option<String>,
    /// gRPC listen address.
    #[arg(long, env = "STORAGE_READER_GRPC_ADDR", default_value = "0.0.0.0:50051", value_parser = parse::address)]
    pub storage_reader_grpc_addr: SocketAddr,
    /// How far back queries look when no start time is given, in seconds.
    #[arg(
        long,
        env = "STORAGE_READER_DEFAULT_RANGE_SECONDS",
        default_value = "604800",
        value_parser = parse::seconds
    )]
    pub storage_reader_default_range_seconds: Duration,
    /// Larger limits are lowered to this (at most 10000).
    #[arg(long, env = "STORAGE_READER_MAX_PAGE_SIZE", default_value = "200", value_parser = page_size)]
    pub storage_reader_max_page_size: u32,
    /// PEM certificate chain of the gRPC server: the port speaks TLS (with the key).
    #[arg(long, env = "STORAGE_READER_TLS_CERT", value_parser = parse::text)]
    pub storage_reader_tls_cert: Option<String>,
    /// PEM key of the gRPC server's certificate.
    #[arg(long, env = "STORAGE_READER_TLS_KEY", value_parser = parse::text)]
    pub storage_reader_tls_key: Option<String>,
    /// PEM CA: mutual TLS, only clients with a certificate from this CA connect.
    #[arg(long, env = "STORAGE_READER_TLS_CLIENT_CA", value_parser = parse::text)]
    pub storage_reader_tls_client_ca: Option<String>,
    /// Callers must send `authorization: Bearer <token>`.
    #[arg(long, env = "STORAGE_READER_AUTH_TOKEN", hide_env_values = true, value_parser = parse::text)]
    pub storage_reader_auth_token: Option<String>,
    /// Directory where ExportMessages jobs write their files; unset, that call is refused.
    #[arg(long, env = "STORAGE_READER_EXPORT_DIR", value_parser = parse::text)]
    pub storage_reader_export_dir: Option<String>,
    /// Longest time after sending that a message can be recalled, in seconds.
    #[arg(long, env = "STORAGE_READER_RECALL_LIMIT_SECONDS", default_value = "120", value_parser = parse::seconds)]
    pub storage_reader_recall_limit_seconds: Duration,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9101", value_parser = parse::address)]
    pub metrics_addr: SocketAddr,
    #[command(flatten)]
    pub databases: DatabaseArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

fn page_size(value: &str) -> Result<u32, String> {
    parse::positive(value).and_then(|size| if size <= 10_000 { Ok(size) } else { Err("must be at most 10000".into()) })
}

impl Config {
    /// Reads settings through `lookup` (an environment as a map: manifests, tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_settings(settings::from_lookup(<Settings as clap::CommandFactory>::command(), lookup)?)
    }

    /// Checks the rules between settings: a database is needed, and TLS needs its certificate
    /// and key together.
    pub fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        let (postgres_url, mongo) = settings.databases.into_configs()?;
        let tls = match (
            settings.storage_reader_tls_cert,
            settings.storage_reader_tls_key,
            settings.storage_reader_tls_client_ca,
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => {
                Some(TlsConfig { cert: cert.into(), key: key.into(), client_ca: client_ca.map(Into::into) })
            }
            _ => {
                return Err(ConfigError(
                    "STORAGE_READER_TLS_CERT and STORAGE_READER_TLS_KEY go together (STORAGE_READER_TLS_CLIENT_CA needs both)".into(),
                ));
            }
        };
        Ok(Self {
            grpc_addr: settings.storage_reader_grpc_addr,
            metrics_addr: settings.metrics_addr,
            postgres_url,
            postgres_max_connections: settings.postgres_max_connections,
            mongo,
            redis: settings.redis_url.map(|urls| RedisTarget::new(&urls, settings.redis.redis_cluster)),
            redis_hot_ttl: settings.redis.redis_hot_ttl_seconds,
            redis_hot_window: settings.redis.redis_hot_max_messages,
            redis_wait_replicas: settings.redis.redis_wait_replicas,
            default_range: settings.storage_reader_default_range_seconds,
            max_page_size: settings.storage_reader_max_page_size,
            recall_limit: settings.storage_reader_recall_limit_seconds,
            tls,
            auth_token: settings.storage_reader_auth_token,
            export_dir: settings.storage_reader_export_dir.map(Into::into),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| vars.iter().find(|(key, _)| *key == name).map(|(_, v)| (*v).to_owned()))
    }

    #[test]
    fn defaults_follow_the_spec() {
        let defaults = config(&[("POSTGRES_URL", "postgres://h/db")]).expect("valid");
        assert_eq!(defaults.grpc_addr.to_string(), "0.0.0.0:50051");
        assert_eq!(defaults.metrics_addr.to_string(), "0.0.0.0:9101");
        assert_eq!(defaults.default_range, Duration::from_secs(604_800));
        assert_eq!(defaults.max_page_size, 200);
        assert!(defaults.mongo.is_none());
        let mongo_only = config(&[("MONGO_URL", "mongodb://h:27017")]).expect("MongoDB alone is enough");
        assert!(mongo_only.postgres_url.is_none());
        let mongo = mongo_only.mongo.expect("mongo");
        assert_eq!((mongo.database.as_str(), mongo.collection.as_str()), ("flare_im", "messages"));
    }

    #[test]
    fn tls_needs_certificate_and_key_and_secrets_stay_hidden() {
        let error =
            config(&[("POSTGRES_URL", "postgres://h/db"), ("STORAGE_READER_TLS_CERT", "c.pem")]).expect_err("no key");
        assert!(error.to_string().contains("STORAGE_READER_TLS_KEY"), "{error}");
        let config = config(&[
            ("POSTGRES_URL", "postgres://u:pw@h/db"),
            ("STORAGE_READER_TLS_CERT", "c.pem"),
            ("STORAGE_READER_TLS_KEY", "k.pem"),
            ("STORAGE_READER_AUTH_TOKEN", "s3cret"),
        ])
        .expect("valid");
        assert!(config.tls.as_ref().is_some_and(|tls| tls.client_ca.is_none()));
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret") && !printed.contains("pw@"), "{printed}");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let error = config(&[]).expect_err("no database");
        assert_eq!(error.to_string(), "set POSTGRES_URL, MONGO_URL or both: messages need a database");
        let error = config(&[("MONGO_URL", "http://h")]).expect_err("not a MongoDB URL");
        assert!(error.to_string().contains("MONGO_URL"), "{error}");
        let error = config(&[("POSTGRES_URL", "postgres://h/db"), ("STORAGE_READER_MAX_PAGE_SIZE", "-1")])
            .expect_err("negative page size");
        assert!(error.to_string().contains("STORAGE_READER_MAX_PAGE_SIZE"), "{error}");
        let error = config(&[("POSTGRES_URL", "postgres://h/db"), ("STORAGE_READER_MAX_PAGE_SIZE", "10001")])
            .expect_err("page size above the bound");
        assert!(error.to_string().ends_with("must be at most 10000"), "{error}");
        let error = config(&[("POSTGRES_URL", "postgres://h/db"), ("STORAGE_READER_GRPC_ADDR", "nowhere")])
            .expect_err("bad address");
        assert!(error.to_string().contains("--storage-reader-grpc-addr <STORAGE_READER_GRPC_ADDR>"), "{error}");
    }
}
