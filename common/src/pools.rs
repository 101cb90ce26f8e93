//! How busy each store's connections are, for saturation dashboards and alerts, sampled when
//! Prometheus scrapes:
//!
//! - `<app>_pool_connections{pool, state="in_use"|"idle"}` and `<app>_pool_max_connections{pool}`
//!   for the PostgreSQL (sqlx) and MongoDB (driver) pools;
//! - `<app>_redis_in_flight_commands`: Redis is one multiplexed connection per process (per
//!   node on a cluster, one call per hash slot of a pipeline), so its load is the calls waiting
//!   for their answers, not connections taken.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts};

/// Connections of a pool the application counts itself, from driver events, by connection:
/// an event the driver sends without its pair (a checkout abandoned while its connection was
/// being set up is checked in without having been checked out) cannot make the counts drift.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    /// Open connections and those of them taken, by (server, connection id).
    open: Mutex<HashSet<(String, u32)>>,
    in_use: Mutex<HashSet<(String, u32)>>,
    /// Most connections per server; 0: no bound.
    max_per_server: u32,
}

impl ConnectionCount {
    pub fn with_max(max_per_server: u32) -> Arc<Self> {
        Arc::new(Self { max_per_server, ..Self::default() })
    }

    pub fn opened(&self, server: String, id: u32) {
        lock(&self.open).insert((server, id));
    }

    pub fn closed(&self, server: String, id: u32) {
        let connection = (server, id);
        lock(&self.in_use).remove(&connection);
        lock(&self.open).remove(&connection);
    }

    pub fn taken(&self, server: String, id: u32) {
        lock(&self.in_use).insert((server, id));
    }

    pub fn returned(&self, server: String, id: u32) {
        lock(&self.in_use).remove(&(server, id));
    }

    /// (open, in use, max): max is per server times the servers with connections.
    fn sample(&self) -> (i64, i64, Option<i64>) {
        let open = lock(&self.open);
        let servers: HashSet<&String> = open.iter().map(|(server, _)| server).collect();
        let max = (self.max_per_server > 0).then(|| i64::from(self.max_per_server) * servers.len().max(1) as i64);
        (open.len() as i64, lock(&self.in_use).len() as i64, max)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

enum Pool {
    Postgres(sqlx::PgPool),
    Counted(Arc<ConnectionCount>),
}

/// The pools of one application; registered once in its registry, pools added as they are
/// connected.
#[derive(Clone)]
pub struct PoolMetrics {
    connections: IntGaugeVec,
    max: IntGaugeVec,
    redis_in_flight: IntGauge,
    pools: Arc<Mutex<Vec<(&'static str, Pool)>>>,
    redis: Arc<Mutex<Vec<Arc<AtomicI64>>>>,
}

impl PoolMetrics {
    /// Metrics named `<app>_pool_connections` and so on (`app`: `storage_writer`).
    pub fn new(app: &str) -> Result<Self, prometheus::Error> {
        Ok(Self {
            connections: IntGaugeVec::new(
                Opts::new(format!("{app}_pool_connections"), "Open connections of a database pool, by state"),
                &["pool", "state"],
            )?,
            max: IntGaugeVec::new(
                Opts::new(format!("{app}_pool_max_connections"), "Most connections a database pool opens"),
                &["pool"],
            )?,
            redis_in_flight: IntGauge::new(
                format!("{app}_redis_in_flight_commands"),
                "Redis commands and pipelines sent and not yet answered",
            )?,
            pools: Arc::default(),
            redis: Arc::default(),
        })
    }

    pub fn add_postgres(&self, pool: sqlx::PgPool) {
        lock(&self.pools).push(("postgres", Pool::Postgres(pool)));
    }

    pub fn add_counted(&self, name: &'static str, count: Arc<ConnectionCount>) {
        lock(&self.pools).push((name, Pool::Counted(count)));
    }

    pub fn add_redis(&self, in_flight: Arc<AtomicI64>) {
        lock(&self.redis).push(in_flight);
    }
}

impl Collector for PoolMetrics {
    fn desc(&self) -> Vec<&Desc> {
        [self.connections.desc(), self.max.desc(), self.redis_in_flight.desc()].concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for (name, pool) in lock(&self.pools).iter() {
            let (open, in_use, max) = match pool {
                Pool::Postgres(pool) => {
                    let open = i64::from(pool.size());
                    (open, open - pool.num_idle() as i64, Some(i64::from(pool.options().get_max_connections())))
                }
                Pool::Counted(count) => count.sample(),
            };
            self.connections.with_label_values(&[name, "in_use"]).set(in_use.max(0));
            self.connections.with_label_values(&[name, "idle"]).set((open - in_use).max(0));
            if let Some(max) = max {
                self.max.with_label_values(&[name]).set(max);
            }
        }
        let redis = lock(&self.redis);
        self.redis_in_flight.set(redis.iter().map(|count| count.load(Ordering::Relaxed)).sum());
        [self.connections.collect(), self.max.collect(), self.redis_in_flight.collect()].concat()
    }
}

/// A MongoDB client whose pool is counted from the driver's connection events (the driver
/// exposes no pool figures); the count is for [`PoolMetrics::add_counted`].
pub async fn mongo_client(url: &str) -> mongodb::error::Result<(mongodb::Client, Arc<ConnectionCount>)> {
    use mongodb::event::EventHandler;
    use mongodb::event::cmap::CmapEvent;

    let mut options = mongodb::options::ClientOptions::parse(url).await?;
    // 10: the driver's default pool size per server.
    let count = ConnectionCount::with_max(options.max_pool_size.unwrap_or(10));
    let events = count.clone();
    options.cmap_event_handler = Some(EventHandler::callback(move |event: CmapEvent| match event {
        CmapEvent::ConnectionCreated(event) => events.opened(event.address.to_string(), event.connection_id),
        CmapEvent::ConnectionClosed(event) => events.closed(event.address.to_string(), event.connection_id),
        CmapEvent::ConnectionCheckedOut(event) => events.taken(event.address.to_string(), event.connection_id),
        CmapEvent::ConnectionCheckedIn(event) => events.returned(event.address.to_string(), event.connection_id),
        _ => {}
    }));
    Ok((mongodb::Client::with_options(options)?, count))
}
