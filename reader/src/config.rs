//! Reader configuration, read once from the environment (SPEC §4) and validated at start.

use std::net::SocketAddr;
use std::time::Duration;

use flare_storage_common::settings::Settings;

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
    pub redis_url: Option<String>,
    /// Lifetime and size of a hot window the reader fills; the same as the writer's settings.
    pub redis_hot_ttl: Duration,
    pub redis_hot_window: usize,
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

#[derive(Clone)]
pub struct MongoConfig {
    pub url: String,
    pub database: String,
    pub collection: String,
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
            .field("redis", &self.redis_url.is_some())
            .field("default_range", &self.default_range)
            .field("max_page_size", &self.max_page_size)
            .field("tls", &self.tls)
            .field("export_dir", &self.export_dir)
            .field("auth_token", &self.auth_token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

pub use flare_storage_common::settings::ConfigError;

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let settings = Settings::new(lookup);
        let postgres_url = settings.url("POSTGRES_URL", &["postgres", "postgresql"])?;
        let mongo = settings.url("MONGO_URL", &["mongodb", "mongodb+srv"])?.map(|url| MongoConfig {
            url,
            database: settings.get("MONGO_DATABASE").unwrap_or_else(|| "flare_im".into()),
            collection: settings.get("MONGO_COLLECTION").unwrap_or_else(|| "messages".into()),
        });
        if postgres_url.is_none() && mongo.is_none() {
            return Err(ConfigError("POSTGRES_URL or MONGO_URL is required (at least one database)".into()));
        }
        let max_page_size = settings.positive("STORAGE_READER_MAX_PAGE_SIZE", 200)?;
        let get = |name: &str| settings.get(name);
        Ok(Self {
            grpc_addr: settings.address("STORAGE_READER_GRPC_ADDR", "0.0.0.0:50051")?,
            metrics_addr: settings.address("METRICS_ADDR", "0.0.0.0:9101")?,
            postgres_url,
            mongo,
            redis_url: settings.url("REDIS_URL", &["redis", "rediss"])?,
            redis_hot_ttl: settings.seconds("REDIS_HOT_TTL_SECONDS", 3600)?,
            redis_hot_window: settings.size("REDIS_HOT_MAX_MESSAGES", 200)?,
            postgres_max_connections: settings.size("POSTGRES_MAX_CONNECTIONS", 16)?,
            default_range: settings.seconds("STORAGE_READER_DEFAULT_RANGE_SECONDS", 7 * 24 * 3600)?,
            recall_limit: settings.seconds("STORAGE_READER_RECALL_LIMIT_SECONDS", 120)?,
            tls: match (
                get("STORAGE_READER_TLS_CERT"),
                get("STORAGE_READER_TLS_KEY"),
                get("STORAGE_READER_TLS_CLIENT_CA"),
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
            },
            auth_token: get("STORAGE_READER_AUTH_TOKEN"),
            export_dir: get("STORAGE_READER_EXPORT_DIR").map(Into::into),
            max_page_size: u32::try_from(max_page_size)
                .ok()
                .filter(|size| *size <= 10_000)
                .ok_or_else(|| ConfigError("STORAGE_READER_MAX_PAGE_SIZE must be at most 10000".into()))?,
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
        assert_eq!(error.to_string(), "POSTGRES_URL or MONGO_URL is required (at least one database)");
        let error = config(&[("MONGO_URL", "http://h")]).expect_err("not a MongoDB URL");
        assert!(error.to_string().starts_with("MONGO_URL"), "{error}");
        let error = config(&[("POSTGRES_URL", "postgres://h/db"), ("STORAGE_READER_MAX_PAGE_SIZE", "-1")])
            .expect_err("negative page size");
        assert!(error.to_string().starts_with("STORAGE_READER_MAX_PAGE_SIZE"), "{error}");
        let error = config(&[("POSTGRES_URL", "postgres://h/db"), ("STORAGE_READER_GRPC_ADDR", "nowhere")])
            .expect_err("bad address");
        assert!(error.to_string().starts_with("STORAGE_READER_GRPC_ADDR"), "{error}");
    }
}
