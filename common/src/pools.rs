//! How busy each store's connections are, for saturation dashboards and alerts, sampled when
//! Prometheus scrapes:
//!
//! - `<app>_pool_connections{pool, state="in_use"|"idle"}` and `<app>_pool_max_connections{pool}`
//!   for the PostgreSQL (sqlx) and MongoDB (driver) pools;
//! - `<app>_redis_in_flight_commands`: Redis is one multiplexed connection per process, so its
//!   load is the commands waiting for their answers, not connections taken.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, IntGaugeVec, Opts};
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Connections of a pool the application counts itself (from driver events).
#[derive(Debug, Default)]
pub struct ConnectionCount {
    open: AtomicI64,
    in_use: AtomicI64,
    max: AtomicI64,
}

impl ConnectionCount {
    pub fn with_max(max: u32) -> Arc<Self> {
        Arc::new(Self { max: AtomicI64::new(i64::from(max)), ..Self::default() })
    }

    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn taken(&self) {
        self.in_use.fetch_add(1, Ordering::Relaxed);
    }

    pub fn returned(&self) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn in_use(&self) -> i64 {
        self.in_use.load(Ordering::Relaxed)
    }
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
        self.pools.lock().unwrap_or_else(|poison| poison.into_inner()).push(("postgres", Pool::Postgres(pool)));
    }

    pub fn add_counted(&self, name: &'static str, count: Arc<ConnectionCount>) {
        self.pools.lock().unwrap_or_else(|poison| poison.into_inner()).push((name, Pool::Counted(count)));
    }

    pub fn add_redis(&self, in_flight: Arc<AtomicI64>) {
        self.redis.lock().unwrap_or_else(|poison| poison.into_inner()).push(in_flight);
    }
}

impl Collector for PoolMetrics {
    fn desc(&self) -> Vec<&Desc> {
        [self.connections.desc(), self.max.desc(), self.redis_in_flight.desc()].concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for (name, pool) in self.pools.lock().unwrap_or_else(|poison| poison.into_inner()).iter() {
            let (open, idle, max) = match pool {
                Pool::Postgres(pool) => {
                    (i64::from(pool.size()), pool.num_idle() as i64, i64::from(pool.options().get_max_connections()))
                }
                Pool::Counted(count) => {
                    let open = count.open.load(Ordering::Relaxed);
                    (open, open - count.in_use(), count.max.load(Ordering::Relaxed))
                }
            };
            self.connections.with_label_values(&[name, "in_use"]).set((open - idle).max(0));
            self.connections.with_label_values(&[name, "idle"]).set(idle.max(0));
            self.max.with_label_values(&[name]).set(max);
        }
        let redis = self.redis.lock().unwrap_or_else(|poison| poison.into_inner());
        self.redis_in_flight.set(redis.iter().map(|count| count.load(Ordering::Relaxed)).sum());
        [self.connections.collect(), self.max.collect(), self.redis_in_flight.collect()].concat()
    }
}

/// A Redis connection that counts the commands it has in flight.
#[derive(Clone)]
pub struct CountedRedis<C> {
    inner: C,
    in_flight: Arc<AtomicI64>,
}

impl<C> CountedRedis<C> {
    /// Counts into `in_flight`, which [`PoolMetrics::add_redis`] reports.
    pub fn new(inner: C, in_flight: Arc<AtomicI64>) -> Self {
        Self { inner, in_flight }
    }
}

impl<C: ConnectionLike + Send> ConnectionLike for CountedRedis<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let in_flight = self.in_flight.clone();
        Box::pin(async move {
            in_flight.fetch_add(1, Ordering::Relaxed);
            // Counted down however the call ends, dropped futures included.
            let _answered = scopeguard::guard((), |()| {
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            self.inner.req_packed_command(cmd).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let in_flight = self.in_flight.clone();
        Box::pin(async move {
            in_flight.fetch_add(1, Ordering::Relaxed);
            let _answered = scopeguard::guard((), |()| {
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            self.inner.req_packed_commands(cmd, offset, count).await
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// A MongoDB client whose pool is counted from the driver's connection events (the driver
/// exposes no pool figures); the count is for [`PoolMetrics::add_counted`].
pub async fn mongo_client(url: &str) -> mongodb::error::Result<(mongodb::Client, Arc<ConnectionCount>)> {
    use mongodb::event::EventHandler;
    use mongodb::event::cmap::CmapEvent;

    let mut options = mongodb::options::ClientOptions::parse(url).await?;
    // The driver's default pool size.
    let count = ConnectionCount::with_max(options.max_pool_size.unwrap_or(10));
    let events = count.clone();
    options.cmap_event_handler = Some(EventHandler::callback(move |event: CmapEvent| match event {
        CmapEvent::ConnectionCreated(_) => events.opened(),
        CmapEvent::ConnectionClosed(_) => events.closed(),
        CmapEvent::ConnectionCheckedOut(_) => events.taken(),
        CmapEvent::ConnectionCheckedIn(_) => events.returned(),
        _ => {}
    }));
    Ok((mongodb::Client::with_options(options)?, count))
}
