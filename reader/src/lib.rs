//! flare-storage-reader: the gRPC `StorageReaderService` over the message stores, plus the
//! standard gRPC health service and the ops endpoint (`/metrics`, `/healthz`, `/readyz`).
//!
//! `grpc.rs` validates and answers calls, `lookup.rs` holds the read logic, `store/` the
//! queries, `cursor.rs` the opaque paging cursor.

pub mod commands;
pub mod config;
pub mod cursor;
pub mod error;
pub mod export;
pub mod grpc;
pub mod lookup;
pub mod metrics;
pub mod permissions;
pub mod search;
pub mod sessions;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flare_storage_common::ops::{self, Readiness};
use flare_storage_common::proto::serving::storage_reader_service_server::StorageReaderServiceServer;
use flare_storage_common::schema;
use flare_storage_common::tonic::{
    self,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{Config, MongoConfig, Settings, TlsConfig};

use crate::commands::Commands;
use crate::grpc::StorageReader;
use crate::lookup::{Lookup, SESSIONS_OF_CAPACITY, SingleFlight};
use crate::metrics::Metrics;
use crate::sessions::Sessions;
use crate::store::Databases;
use crate::store::mongo::MongoStore;
use crate::store::postgres::PostgresStore;
use crate::store::redis::RedisCache;

/// How often burned message content is physically removed (reads hide it at once).
const BURN_WIPE_INTERVAL: Duration = Duration::from_secs(10);
/// Longest wait at shutdown for commands still running (each retries nothing; a database
/// statement or a Redis call bounds it).
const COMMANDS_DRAIN: Duration = Duration::from_secs(10);

/// How often the reader checks that its stores answer, for `/readyz` and gRPC health.
const READINESS_INTERVAL: Duration = Duration::from_secs(5);

/// Binds the configured addresses and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("failed to bind STORAGE_READER_GRPC_ADDR {}", config.grpc_addr))?;
    let ops_listener = TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("failed to bind METRICS_ADDR {}", config.metrics_addr))?;
    serve(config, grpc_listener, ops_listener, shutdown).await
}

/// Serves on already bound listeners (tests bind port 0). In-flight calls finish before it
/// returns.
pub async fn serve(
    config: Config,
    grpc_listener: TcpListener,
    ops_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("failed to register metrics")?;
    let readiness = Arc::new(Readiness::reported_by(metrics.ready.clone()));
    let databases = connect_databases(&config, &metrics).await?;
    if let Some(directory) = &config.export_dir {
        export::check_directory(directory)?;
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // Server reflection, so grpcurl, grpcui, Postman, Evans and similar tools can discover the
    // API: both versions of the protocol (older clients speak only v1alpha), listing every
    // service served here.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(flare_storage_common::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("failed to build the reflection service")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("failed to build the reflection service")?;
    let ops_task =
        tokio::spawn(ops::serve(ops_listener, metrics.registry.clone(), readiness.clone(), shutdown.clone()));
    let readiness_task = tokio::spawn(watch_readiness(databases.clone(), readiness, health_reporter, shutdown.clone()));

    let cache = match &config.redis {
        Some(target) => Some(
            RedisCache::connect(target, config.redis_hot_ttl, config.redis_hot_window, config.redis_wait_replicas)
                .await
                .context("invalid REDIS_URL")?,
        ),
        None => None,
    };
    if let Some(cache) = &cache {
        metrics.pools.add_redis(cache.in_flight());
    }
    let sessions = Sessions { databases: databases.clone(), cache: cache.clone(), metrics: metrics.clone() };
    let commands = Commands {
        databases: databases.clone(),
        cache: cache.clone(),
        sessions: sessions.clone(),
        recall_limit: config.recall_limit,
    };
    let wipe_task = {
        let commands = Commands {
            databases: databases.clone(),
            cache: None,
            sessions: Sessions { databases: databases.clone(), cache: None, metrics: metrics.clone() },
            recall_limit: config.recall_limit,
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move { commands.wipe_burned_periodically(BURN_WIPE_INTERVAL, shutdown).await })
    };
    let exports =
        config.export_dir.clone().map(|directory| export::Exports { directory, databases: databases.clone() });
    let commands_running = TaskTracker::new();
    let reader = StorageReader {
        commands: Arc::new(commands),
        sessions: Arc::new(sessions),
        commands_running: commands_running.clone(),
        exports,
        lookup: Lookup {
            databases,
            cache,
            metrics: metrics.clone(),
            default_range: config.default_range,
            max_page_size: config.max_page_size,
            fills: SingleFlight::default(),
            sessions_of: quick_cache::sync::Cache::new(SESSIONS_OF_CAPACITY),
        },
        metrics,
    };
    info!(addr = %grpc_listener.local_addr()?, tls = config.tls.is_some(), auth = config.auth_token.is_some(), "serving gRPC");
    let mut server = Server::builder();
    if let Some(tls) = &config.tls {
        server = server.tls_config(tls_config(tls)?).context("invalid TLS configuration")?;
    }
    // Health stays open to the platform's probes; the API needs the token when one is set.
    let served = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(StorageReaderServiceServer::with_interceptor(
            reader,
            BearerToken::new(config.auth_token.as_deref()),
        ))
        .serve_with_incoming_shutdown(incoming(grpc_listener), shutdown.clone().cancelled_owned())
        .await;
    commands_running.close();
    if tokio::time::timeout(COMMANDS_DRAIN, commands_running.wait()).await.is_err() {
        warn!(running = commands_running.len(), "commands still running at shutdown");
    }
    shutdown.cancel();
    let _ = readiness_task.await;
    let _ = wipe_task.await;
    let _ = ops_task.await;
    served.context("gRPC server failed")?;
    info!("reader stopped");
    Ok(())
}

/// Clients for the configured databases. Neither needs to be up yet: migrations and indexes
/// that fail here are only logged (the writer applies them too) and readiness tells when
/// queries can be answered.
async fn connect_databases(config: &Config, metrics: &Metrics) -> anyhow::Result<Databases> {
    let postgres = match &config.postgres_url {
        Some(url) => {
            let postgres =
                PostgresStore::connect(url, config.postgres_max_connections).context("invalid POSTGRES_URL")?;
            if let Err(error) = schema::migrate(postgres.pool()).await {
                warn!(%error, "failed to apply migrations at start");
            }
            metrics.pools.add_postgres(postgres.pool().clone());
            Some(postgres)
        }
        None => None,
    };
    let mongo = match &config.mongo {
        Some(mongo) => {
            let store = MongoStore::connect(&mongo.url, &mongo.database, &mongo.collection)
                .await
                .context("invalid MONGO_URL")?;
            metrics.pools.add_counted("mongodb", store.connections());
            // In the background: server selection waits out a MongoDB that is not up yet.
            let indexing = store.clone();
            tokio::spawn(async move {
                if let Err(error) = indexing.ensure_indexes().await {
                    warn!(%error, "failed to create MongoDB indexes at start");
                }
            });
            Some(store)
        }
        None => None,
    };
    Ok(Databases::new(mongo, postgres))
}

/// Accepted connections with TCP_NODELAY: a response goes out in more than one write
/// (headers, then data), and with Nagle's algorithm the second waits for the client's delayed
/// ACK — about 40 ms on every call that follows another on the same connection.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The server's TLS identity and, for mutual TLS, the CA that client certificates must chain to.
fn tls_config(tls: &TlsConfig) -> anyhow::Result<ServerTlsConfig> {
    let read = |path: &std::path::Path| std::fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(client_ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(client_ca)?));
    }
    Ok(config)
}

/// Checks `authorization: Bearer <token>` on every API call when a token is configured.
#[derive(Clone)]
struct BearerToken {
    expected: Option<Arc<[u8]>>,
}

impl BearerToken {
    fn new(token: Option<&str>) -> Self {
        Self { expected: token.map(|token| format!("Bearer {token}").into_bytes().into()) }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(expected) = &self.expected else { return Ok(request) };
        let given = request.metadata().get("authorization").map(|value| value.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, expected) {
            Ok(request)
        } else {
            Err(tonic::Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// Compares without an early exit, so response time does not reveal how much matched.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (index, byte) in expected.iter().enumerate() {
        difference |= usize::from(given.get(index).copied().unwrap_or(0) ^ byte);
    }
    difference == 0
}

/// Marks the reader ready (HTTP `/readyz` and gRPC health) while a database answers.
async fn watch_readiness(
    databases: Databases,
    readiness: Arc<Readiness>,
    health: tonic_health::server::HealthReporter,
    shutdown: CancellationToken,
) {
    loop {
        let ready = databases.answers().await;
        if ready != readiness.is_ready() {
            info!(ready, "readiness changed");
        }
        readiness.set(ready);
        if ready {
            health.set_serving::<StorageReaderServiceServer<StorageReader>>().await;
        } else {
            health.set_not_serving::<StorageReaderServiceServer<StorageReader>>().await;
        }
        tokio::select! {
            () = tokio::time::sleep(READINESS_INTERVAL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
