//! Reader metrics (SPEC §6 names), registered once in the app's own registry.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub const QUERIES: &str = "storage_reader_queries_total";
pub const QUERY_LATENCY: &str = "storage_reader_query_latency_seconds";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Calls by RPC and gRPC status code.
    pub queries: IntCounterVec,
    /// Call latency by RPC.
    pub query_latency: HistogramVec,
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
        registry.register(Box::new(queries.clone()))?;
        registry.register(Box::new(query_latency.clone()))?;
        Ok(Self { registry, queries, query_latency })
    }
}
