//! Writer metrics (SPEC §6 names), registered once in the app's own registry.

use flare_storage_common::pools::PoolMetrics;
use prometheus::process_collector::ProcessCollector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub const MESSAGES_PROCESSED: &str = "storage_writer_messages_processed_total";
pub const MESSAGES_DUPLICATED: &str = "storage_writer_messages_duplicated_total";
pub const WRITE_LATENCY: &str = "storage_writer_write_latency_seconds";
pub const DEAD_LETTERED: &str = "storage_writer_dead_lettered_total";
pub const BATCH_SIZE: &str = "storage_writer_batch_size";
pub const STAGE_ERRORS: &str = "storage_writer_stage_errors_total";
pub const MESSAGES_REDELIVERED: &str = "storage_writer_messages_redelivered_total";
pub const STAGE_LATENCY: &str = "storage_writer_stage_latency_seconds";
pub const CACHE_HIT_RATE: &str = "storage_writer_cache_hit_rate";
pub const SEQ_COUNTER_LOOKUPS: &str = "storage_writer_seq_counter_lookups_total";
pub const PARTITIONS_REBALANCED: &str = "storage_writer_partitions_rebalanced_total";
pub const SEARCH_INDEXED: &str = "storage_writer_search_indexed_total";
pub const SEARCH_INDEX_LAG: &str = "storage_writer_search_index_lag_seconds";
pub const LAST_BATCH: &str = "storage_writer_last_batch_timestamp_seconds";
pub const CONSUMER_LAG: &str = "storage_writer_consumer_lag_messages";
pub const END_TO_END_LATENCY: &str = "storage_writer_end_to_end_latency_seconds";
pub const READY: &str = "storage_writer_ready";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Messages newly stored.
    pub processed: IntCounter,
    /// Records carrying a message another record stored (upstream resends, in any session).
    pub duplicated: IntCounter,
    /// Records delivered again after they had stored their message (a crash or rebalance
    /// before the offset commit): the record the database names as the message's origin, or
    /// the first in its session where it names none. ACKed as persisted again.
    pub redelivered: IntCounter,
    /// Time to make one batch durable in the stores.
    pub write_latency: Histogram,
    /// Records sent to the dead-letter topic, by reason kind.
    pub dead_lettered: IntCounterVec,
    pub batch_size: Histogram,
    /// Failed attempts per pipeline stage; each is retried.
    pub stage_errors: IntCounterVec,
    /// Time spent in each pipeline stage per batch.
    pub stage_latency: HistogramVec,
    /// Sessions whose seq counter was in Redis / had to be seeded from the databases.
    pub seq_counter_hits: IntCounter,
    pub seq_counter_misses: IntCounter,
    /// hits / (hits + misses) of the seq counter lookups since start.
    pub cache_hit_rate: Gauge,
    /// Partitions assigned to / revoked from this writer by group rebalances.
    pub partitions_assigned: IntCounter,
    pub partitions_revoked: IntCounter,
    /// Messages the search indexer took from its queue (indexed, or gone by then).
    pub search_indexed: IntCounter,
    /// Time from a message's insert (when it was queued) to its search row's commit.
    pub search_index_lag: Histogram,
    /// When the last batch was done (Unix seconds): alert when it stops moving while records
    /// wait.
    pub last_batch: Gauge,
    /// Records of each assigned partition not yet committed (librdkafka statistics).
    pub consumer_lag: IntGaugeVec,
    /// From a record's Kafka timestamp to its batch being done.
    pub end_to_end_latency: Histogram,
    /// 1 while /readyz answers ready.
    pub ready: IntGauge,
    /// Connections of the database pools and Redis commands in flight.
    pub pools: PoolMetrics,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let processed = IntCounter::new(MESSAGES_PROCESSED, "Messages newly persisted")?;
        let duplicated = IntCounter::new(MESSAGES_DUPLICATED, "Messages found already persisted")?;
        let redelivered =
            IntCounter::new(MESSAGES_REDELIVERED, "Records delivered again after they had been persisted")?;
        let write_latency = Histogram::with_opts(
            HistogramOpts::new(WRITE_LATENCY, "Time to persist one batch in the stores")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )?;
        let dead_lettered =
            IntCounterVec::new(Opts::new(DEAD_LETTERED, "Records sent to the dead-letter topic"), &["reason"])?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(BATCH_SIZE, "Records per processed batch")
                .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0]),
        )?;
        let stage_errors =
            IntCounterVec::new(Opts::new(STAGE_ERRORS, "Failed attempts of a pipeline stage (retried)"), &["stage"])?;
        let stage_latency = HistogramVec::new(
            HistogramOpts::new(STAGE_LATENCY, "Time per pipeline stage per batch")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["stage"],
        )?;
        let seq_lookups = IntCounterVec::new(
            Opts::new(
                SEQ_COUNTER_LOOKUPS,
                "Session seq counter lookups by result (hit: in Redis, miss: seeded from the databases)",
            ),
            &["result"],
        )?;
        let seq_counter_hits = seq_lookups.with_label_values(&["hit"]);
        let seq_counter_misses = seq_lookups.with_label_values(&["miss"]);
        let cache_hit_rate = Gauge::new(CACHE_HIT_RATE, "Share of session seq counters found in Redis since start")?;
        // Every stage from zero, so rates and alerts see the first failure.
        for stage in crate::error::Stage::ALL {
            stage_errors.with_label_values(&[stage.name()]);
        }
        let rebalanced = IntCounterVec::new(
            Opts::new(PARTITIONS_REBALANCED, "Partitions assigned to or revoked from this writer, by change"),
            &["change"],
        )?;
        let search_indexed =
            IntCounter::new(SEARCH_INDEXED, "Messages taken from the search queue and indexed (or found gone)")?;
        let search_index_lag = Histogram::with_opts(
            HistogramOpts::new(SEARCH_INDEX_LAG, "Time from a message's insert to its search index entry")
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
        )?;
        let last_batch = Gauge::new(LAST_BATCH, "When the last batch was done, in Unix seconds")?;
        let consumer_lag = IntGaugeVec::new(
            Opts::new(CONSUMER_LAG, "Records of an assigned partition after the group's committed offset"),
            &["partition"],
        )?;
        let end_to_end_latency = Histogram::with_opts(
            HistogramOpts::new(END_TO_END_LATENCY, "Time from a record's Kafka timestamp to its batch being persisted")
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0]),
        )?;
        let ready = IntGauge::new(READY, "1 while the writer is ready (its stores answer), else 0")?;
        let pools = PoolMetrics::new("storage_writer")?;
        registry.register(Box::new(consumer_lag.clone()))?;
        registry.register(Box::new(end_to_end_latency.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(pools.clone()))?;
        registry.register(Box::new(ProcessCollector::for_self()))?;
        registry.register(Box::new(last_batch.clone()))?;
        registry.register(Box::new(search_indexed.clone()))?;
        registry.register(Box::new(search_index_lag.clone()))?;
        registry.register(Box::new(rebalanced.clone()))?;
        registry.register(Box::new(stage_latency.clone()))?;
        registry.register(Box::new(seq_lookups))?;
        registry.register(Box::new(cache_hit_rate.clone()))?;
        registry.register(Box::new(processed.clone()))?;
        registry.register(Box::new(duplicated.clone()))?;
        registry.register(Box::new(redelivered.clone()))?;
        registry.register(Box::new(write_latency.clone()))?;
        registry.register(Box::new(dead_lettered.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(stage_errors.clone()))?;
        Ok(Self {
            registry,
            processed,
            duplicated,
            redelivered,
            write_latency,
            dead_lettered,
            batch_size,
            stage_errors,
            stage_latency,
            seq_counter_hits,
            seq_counter_misses,
            cache_hit_rate,
            partitions_assigned: rebalanced.with_label_values(&["assigned"]),
            partitions_revoked: rebalanced.with_label_values(&["revoked"]),
            search_indexed,
            search_index_lag,
            last_batch,
            consumer_lag,
            end_to_end_latency,
            ready,
            pools,
        })
    }

    pub fn update_cache_hit_rate(&self) {
        let hits = self.seq_counter_hits.get() as f64;
        let total = hits + self.seq_counter_misses.get() as f64;
        if total > 0.0 {
            self.cache_hit_rate.set(hits / total);
        }
    }
}
