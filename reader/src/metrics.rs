//! Reader metrics (SPEC §6 names), registered once in the app's own registry.

use flare_storage_common::pools::PoolMetrics;
use prometheus::process_collector::ProcessCollector;
use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub const QUERIES: &str = "storage_reader_queries_total";
pub const QUERY_LATENCY: &str = "storage_reader_query_latency_seconds";
pub const CACHE_HIT_RATE: &str = "storage_reader_cache_hit_rate";
pub const CACHE_LOOKUPS: &str = "storage_reader_cache_lookups_total";
pub const UNREAD_COUNTS: &str = "storage_reader_unread_counts_total";
pub const IN_FLIGHT: &str = "storage_reader_in_flight_calls";
pub const READY: &str = "storage_reader_ready";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Calls by RPC and gRPC status code.
    pub queries: IntCounterVec,
    /// Call latency by RPC.
    pub query_latency: HistogramVec,
    /// Calls being answered now, by RPC.
    pub in_flight: IntGaugeVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    /// hits / (hits + misses) of hot-window lookups since start.
    cache_hit_rate: Gauge,
    /// Unread counts derived from the hot window / counted in a database.
    pub unread_from_cache: IntCounter,
    pub unread_from_database: IntCounter,
    /// 1 while /readyz answers ready.
    pub ready: IntGauge,
    /// Connections of the database pools and Redis commands in flight.
    pub pools: PoolMetrics,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let queries = IntCounterVec::new(Opts::new(QUERIES, "gRPC calls answered"), &["rpc", "code"])?;
        let query_latency = HistogramVec::new(
            HistogramOpts::new(QUERY_LATENCY, "gRPC call latency")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["rpc"],
        )?;
        let cache_lookups = IntCounterVec::new(
            Opts::new(CACHE_LOOKUPS, "Hot-window lookups by result (hit: answered from Redis)"),
            &["result"],
        )?;
        let cache_hit_rate = Gauge::new(CACHE_HIT_RATE, "Share of hot-window lookups answered from Redis since start")?;
        let unread_counts = IntCounterVec::new(
            Opts::new(
                UNREAD_COUNTS,
                "Unread counts of a session for a user, by where they were derived (cache, database)",
            ),
            &["source"],
        )?;
        let in_flight = IntGaugeVec::new(Opts::new(IN_FLIGHT, "gRPC calls being answered now"), &["rpc"])?;
        let ready = IntGauge::new(READY, "1 while the reader is ready (a database answers), else 0")?;
        let pools = PoolMetrics::new("storage_reader")?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(pools.clone()))?;
        registry.register(Box::new(ProcessCollector::for_self()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(unread_counts.clone()))?;
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(query_latency.clone()))?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(cache_hit_rate.clone()))?;
        Ok(Self {
            registry,
            queries,
            query_latency,
            in_flight,
            cache_hits: cache_lookups.with_label_values(&["hit"]),
            cache_misses: cache_lookups.with_label_values(&["miss"]),
            cache_hit_rate,
            unread_from_cache: unread_counts.with_label_values(&["cache"]),
            unread_from_database: unread_counts.with_label_values(&["database"]),
            ready,
            pools,
        })
    }

    pub fn cache_hit(&self) {
        self.cache_hits.inc();
        self.update_hit_rate();
    }

    pub fn cache_miss(&self) {
        self.cache_misses.inc();
        self.update_hit_rate();
    }

    fn update_hit_rate(&self) {
        let hits = self.cache_hits.get() as f64;
        self.cache_hit_rate.set(hits / (hits + self.cache_misses.get() as f64));
    }
}
