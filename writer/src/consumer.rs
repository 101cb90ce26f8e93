//! The Kafka side of the writer: fetches records in batches (closed by count or time), hands
//! each batch to the pipeline and stores offsets only once the whole batch is durable.
//!
//! Batches are processed one after the other, so when offsets are stored every record at or
//! below them in that partition is done: a failed record holds its partition because the
//! batch containing it never completes, and no later batch is fetched meanwhile. Offsets are
//! stored with `enable.auto.offset.store=false` and committed by librdkafka's auto-commit,
//! on partition revoke and once more at shutdown.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, warn};

use crate::config::Config;
use crate::pipeline::Pipeline;

/// A Kafka record, copied out of the consumer's buffer so a batch can outlive the fetch.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

/// Logs group membership changes; librdkafka's auto-commit commits the stored offsets of
/// revoked partitions itself.
struct WriterContext;

impl ClientContext for WriterContext {}

impl ConsumerContext for WriterContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => info!(partitions = partitions.count(), "partitions revoked"),
            Rebalance::Assign(partitions) => info!(partitions = partitions.count(), "partitions assigned"),
            Rebalance::Error(error) => warn!(%error, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result
            && !matches!(error, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
        {
            warn!(%error, "offset commit failed; it is retried with the next commit");
        }
    }
}

fn create_consumer(config: &Config) -> KafkaResult<StreamConsumer<WriterContext>> {
    let session_timeout_ms = config.kafka_session_timeout.as_millis().max(1);
    ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_bootstrap_servers)
        .set("group.id", &config.kafka_group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (session_timeout_ms / 3).max(1).to_string())
        .set("enable.partition.eof", "false")
        // A fetch returns as soon as records wait; this bounds how long an idle fetch is held
        // (brokers that hold it the full time would otherwise add up to 500 ms to every message).
        .set("fetch.wait.max.ms", config.kafka_fetch_wait.as_millis().max(1).to_string())
        // Prefetched records are memory: bounded, so a backlog does not grow the process.
        .set("queued.max.messages.kbytes", config.kafka_prefetch_kbytes.max(1).to_string())
        .create_with_context(WriterContext)
}

/// Consumes until `shutdown` is cancelled, then commits what is done and returns.
pub async fn run(config: &Config, pipeline: &Pipeline, shutdown: &CancellationToken) -> KafkaResult<()> {
    let consumer = create_consumer(config)?;
    consumer.subscribe(&[&config.kafka_topic])?;
    info!(topic = %config.kafka_topic, group = %config.kafka_group_id, "consuming");

    while !shutdown.is_cancelled() {
        let batch = next_batch(&consumer, config, shutdown).await;
        if batch.is_empty() {
            continue;
        }
        let span = batch_span(&batch);
        if pipeline.process(&batch, shutdown).instrument(span).await.is_err() {
            info!(records = batch.len(), "shutdown with a batch unfinished; it will be redelivered");
            break;
        }
        store_offsets(&consumer, &batch);
    }

    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => warn!(%error, "final offset commit failed"),
    }
    info!("consumer stopped");
    Ok(())
}

/// Waits for a first record, then collects more until the batch is full or
/// `batch_max_wait` has passed. Returns early (possibly empty) on shutdown.
async fn next_batch(
    consumer: &StreamConsumer<WriterContext>,
    config: &Config,
    shutdown: &CancellationToken,
) -> Vec<Record> {
    let mut batch = Vec::with_capacity(config.batch_max_messages);
    let mut deadline: Option<Instant> = None;
    while batch.len() < config.batch_max_messages {
        let received = tokio::select! {
            received = consumer.recv() => received,
            () = shutdown.cancelled() => break,
            () = sleep_until(deadline) => break,
        };
        match received {
            Ok(message) => {
                batch.push(Record {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    timestamp_ms: message.timestamp().to_millis(),
                });
                deadline.get_or_insert_with(|| Instant::now() + config.batch_max_wait);
            }
            // Fetch errors are about the connection, not about a record: no offset moves, so
            // nothing is skipped. Pause briefly so a broker outage does not spin.
            Err(error) => {
                warn!(%error, "kafka fetch failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    batch
}

/// A span per batch: how many records, from which partitions and offsets (never content).
fn batch_span(batch: &[Record]) -> tracing::Span {
    let mut ranges: Vec<(i32, i64, i64)> = Vec::new();
    for record in batch {
        match ranges.iter_mut().find(|(partition, _, _)| *partition == record.partition) {
            Some((_, first, last)) => {
                *first = (*first).min(record.offset);
                *last = (*last).max(record.offset);
            }
            None => ranges.push((record.partition, record.offset, record.offset)),
        }
    }
    ranges.sort_unstable();
    let offsets = ranges
        .iter()
        .map(|(partition, first, last)| format!("{partition}:{first}-{last}"))
        .collect::<Vec<_>>()
        .join(",");
    tracing::info_span!("batch", records = batch.len(), offsets)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Stores, per partition, the offset after the batch's highest record.
fn store_offsets(consumer: &StreamConsumer<WriterContext>, batch: &[Record]) {
    let mut next_offsets: HashMap<(&str, i32), i64> = HashMap::new();
    for record in batch {
        let next = next_offsets.entry((record.topic.as_str(), record.partition)).or_insert(0);
        *next = (*next).max(record.offset + 1);
    }
    let mut offsets = TopicPartitionList::with_capacity(next_offsets.len());
    for ((topic, partition), offset) in next_offsets {
        if let Err(error) = offsets.add_partition_offset(topic, partition, Offset::Offset(offset)) {
            warn!(%error, topic, partition, "invalid offset");
        }
    }
    // Fails for partitions revoked while the batch ran; their new owner re-reads from the last
    // commit and the stores ignore what is already there.
    if let Err(error) = consumer.store_offsets(&offsets) {
        info!(%error, "offsets not stored (partition revoked?)");
    }
}
