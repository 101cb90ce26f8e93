//! The Kafka side of the writer: fetches records, deals them to lanes by partition, and each
//! lane hands its records to the pipeline in batches (closed at once on a backlog, by time on a
//! trickle), storing offsets only once the whole batch is done.
//!
//! A partition always goes to the same lane (`partition % WRITER_LANES`) and a lane takes each
//! half of its batches one after the other, so when offsets are stored every record at or
//! below them in that partition is done: a failed record holds its partition because the
//! batch containing it never completes. A session is one partition, so its messages stay in
//! order. Within a lane, consecutive batches overlap (one is stored in the databases while the
//! one before it goes through the cache stage and its ACKs); with several lanes, batches of
//! different partitions run side by side too. The stages wait on the stores, not on this
//! process. Offsets are stored with `enable.auto.offset.store=false` and committed by
//! librdkafka's auto-commit, on partition revoke and once more at shutdown.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, info, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::record::Record;

/// How often librdkafka reports statistics (the consumer lag gauges).
const STATISTICS_INTERVAL_MS: &str = "5000";

/// Logs and counts group membership changes; librdkafka's auto-commit commits the stored
/// offsets of revoked partitions itself.
struct WriterContext {
    metrics: Metrics,
    /// Partitions with a lag gauge, so a partition moved to another writer stops reporting.
    lagging: std::sync::Mutex<HashSet<i32>>,
}

impl ClientContext for WriterContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): the lag of each partition this
    /// writer consumes, from the broker's high watermark and the group's committed offset.
    fn stats(&self, statistics: Statistics) {
        let mut now = HashSet::new();
        for topic in statistics.topics.values() {
            for (&partition, stats) in &topic.partitions {
                // -1: the internal unassigned partition; a negative lag: not known yet.
                if partition < 0 || !stats.desired || stats.consumer_lag < 0 {
                    continue;
                }
                self.metrics.consumer_lag.with_label_values(&[&partition.to_string()]).set(stats.consumer_lag);
                now.insert(partition);
            }
        }
        let mut lagging = self.lagging.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in lagging.difference(&now) {
            let _ = self.metrics.consumer_lag.remove_label_values(&[&gone.to_string()]);
        }
        *lagging = now;
    }
}

impl ConsumerContext for WriterContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                info!(partitions = partitions.count(), "partitions revoked");
                self.metrics.partitions_revoked.inc_by(partitions.count() as u64);
            }
            Rebalance::Assign(partitions) => {
                info!(partitions = partitions.count(), "partitions assigned");
                self.metrics.partitions_assigned.inc_by(partitions.count() as u64);
            }
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

fn create_consumer(config: &Config, metrics: Metrics) -> KafkaResult<StreamConsumer<WriterContext>> {
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
        .set("max.poll.interval.ms", config.kafka_max_poll_interval.as_millis().max(session_timeout_ms).to_string())
        .set("enable.partition.eof", "false")
        // A fetch returns as soon as records wait; this bounds how long an idle fetch is held
        // (brokers that hold it the full time would otherwise add up to 500 ms to every message).
        .set("fetch.wait.max.ms", config.kafka_fetch_wait.as_millis().max(1).to_string())
        // Prefetched records are memory: bounded, so a backlog does not grow the process.
        .set("queued.max.messages.kbytes", config.kafka_prefetch_kbytes.max(1).to_string())
        // With the prefetch queue at that bound, fetch again soon after the writer takes
        // records: librdkafka's default waits a second, which stalled a backlog in steps.
        .set("fetch.queue.backoff.ms", "10")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .create_with_context(WriterContext { metrics, lagging: Default::default() })
}

/// How long the consumer waits for room in a lane's queue before it takes the lane for
/// stalled and pauses its partitions (well within any poll interval).
const LANE_STALL: Duration = Duration::from_secs(1);

/// Consumes until `shutdown` is cancelled, then commits what is done and returns.
pub async fn run(config: &Config, pipeline: &Pipeline, shutdown: &CancellationToken) -> KafkaResult<()> {
    let consumer = create_consumer(config, pipeline.metrics.clone())?;
    consumer.subscribe(&[&config.kafka_topic])?;
    info!(topic = %config.kafka_topic, group = %config.kafka_group_id, lanes = config.lanes, "consuming");

    // A lane's queue holds about two batches: enough to start its next batch at once, small
    // enough that a lane stuck on a failing store soon stops the fetching (backpressure).
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..config.lanes.max(1)).map(|_| mpsc::channel::<Record>(config.batch_max_messages.max(1) * 2)).unzip();
    // A lane that stops (shutdown mid-batch) stops the fetching too.
    let lanes_done = CancellationToken::new();
    let consumer = &consumer;
    let lanes = futures::future::join_all(receivers.into_iter().map(|receiver| {
        let lanes_done = lanes_done.clone();
        async move {
            lane(receiver, consumer, config, pipeline, shutdown).await;
            lanes_done.cancel();
        }
    }));
    // A lane whose queue stays full (its store is down) holds the records that keep arriving
    // for it, and its partitions are paused; fetching goes on for the others, and the consumer
    // keeps polling, so however long the outage it stays in its group.
    let deal = async {
        let mut held: Vec<VecDeque<Record>> = (0..senders.len()).map(|_| VecDeque::new()).collect();
        loop {
            let blocked: Vec<usize> = (0..held.len()).filter(|&lane| !held[lane].is_empty()).collect();
            let senders = &senders;
            let room = async move {
                if blocked.is_empty() {
                    return std::future::pending().await;
                }
                let waits =
                    blocked.into_iter().map(|lane| Box::pin(async move { (lane, senders[lane].reserve().await) }));
                futures::future::select_all(waits).await.0
            };
            tokio::select! {
                received = consumer.recv() => match received {
                    Ok(message) => {
                        let record = Record {
                            topic: message.topic().to_owned(),
                            partition: message.partition(),
                            offset: message.offset(),
                            key: message.key().map(<[u8]>::to_vec),
                            payload: message.payload().map(<[u8]>::to_vec),
                            timestamp_ms: message.timestamp().to_millis(),
                        };
                        let lane = record.partition.unsigned_abs() as usize % senders.len();
                        if !held[lane].is_empty() {
                            held[lane].push_back(record);
                            continue;
                        }
                        // A full queue is normal on a backlog: wait a moment for room, as the
                        // lane takes a batch at a time. Only a lane that stays full (its store
                        // is failing) has its partitions paused: resuming a partition costs
                        // this client about a second before it fetches again.
                        let room = tokio::select! {
                            room = tokio::time::timeout(LANE_STALL, senders[lane].reserve()) => room,
                            () = shutdown.cancelled() => break,
                        };
                        match room {
                            Ok(Ok(permit)) => permit.send(record),
                            Ok(Err(_)) => break,
                            Err(_) => {
                                held[lane].push_back(record);
                                pause_lane(consumer, lane, senders.len(), true);
                            }
                        }
                    }
                    // Fetch errors are about the connection, not about a record: no offset moves,
                    // so nothing is skipped. Pause briefly so a broker outage does not spin.
                    Err(error) => {
                        warn!(%error, "kafka fetch failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                (lane, permit) = room => {
                    let Ok(permit) = permit else { break };
                    if let Some(record) = held[lane].pop_front() {
                        permit.send(record);
                    }
                    while let Some(record) = held[lane].pop_front() {
                        if let Err(error) = senders[lane].try_send(record) {
                            match error {
                                mpsc::error::TrySendError::Full(record) => held[lane].push_front(record),
                                mpsc::error::TrySendError::Closed(_) => break,
                            }
                            break;
                        }
                    }
                    if held[lane].is_empty() {
                        pause_lane(consumer, lane, senders.len(), false);
                    }
                }
                () = shutdown.cancelled() => break,
                () = lanes_done.cancelled() => break,
            }
        }
        // Closing the queues lets each lane finish what it holds (until the shutdown bound).
        drop(senders);
    };
    tokio::join!(deal, lanes);

    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => warn!(%error, "final offset commit failed"),
    }
    Ok(())
}

/// One lane: batches of its partitions' records, in two halves that overlap — while batch N
/// goes through the cache stage and its ACKs, batch N+1 is stored in the databases. Batches
/// complete, and their offsets are stored, in order; one batch at most waits between the
/// halves, so memory stays bounded.
async fn lane(
    mut receiver: mpsc::Receiver<Record>,
    consumer: &StreamConsumer<WriterContext>,
    config: &Config,
    pipeline: &Pipeline,
    shutdown: &CancellationToken,
) {
    let (stored_sender, mut stored_receiver) = mpsc::channel(1);
    let first_half = async move {
        loop {
            let batch = next_batch(&mut receiver, config, shutdown).await;
            if batch.is_empty() {
                if receiver.is_closed() || shutdown.is_cancelled() {
                    return;
                }
                continue;
            }
            let span = batch_span(&batch);
            let records = batch.len();
            match pipeline.store(batch, shutdown).instrument(span.clone()).await {
                Ok(stored) => {
                    if stored_sender.send((stored, span)).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    info!(records, "shutdown with a batch unfinished; it will be redelivered");
                    return;
                }
            }
        }
    };
    let second_half = async {
        while let Some((stored, span)) = stored_receiver.recv().await {
            match pipeline.finish(stored, shutdown).instrument(span).await {
                Ok(records) => store_offsets(consumer, &records),
                Err(_) => {
                    info!("shutdown with a batch unfinished; it will be redelivered");
                    return;
                }
            }
        }
    };
    tokio::join!(first_half, second_half);
}

/// Waits for a first record, then takes what is queued behind it: a backlog closes the batch
/// at once (up to `batch_max_messages`); a trickle collects more until `batch_max_wait` has
/// passed. Returns early (possibly empty) on shutdown or when the queue is closed and empty.
async fn next_batch(
    receiver: &mut mpsc::Receiver<Record>,
    config: &Config,
    shutdown: &CancellationToken,
) -> Vec<Record> {
    let mut batch = Vec::with_capacity(config.batch_max_messages);
    let first = tokio::select! {
        received = receiver.recv() => received,
        () = shutdown.cancelled() => None,
    };
    let Some(first) = first else { return batch };
    batch.push(first);
    while batch.len() < config.batch_max_messages {
        match receiver.try_recv() {
            Ok(record) => batch.push(record),
            Err(_) => break,
        }
    }
    if batch.len() > 1 {
        return batch;
    }
    let deadline = Instant::now() + config.batch_max_wait;
    while batch.len() < config.batch_max_messages {
        let received = tokio::select! {
            received = receiver.recv() => received,
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(deadline) => break,
        };
        match received {
            Some(record) => batch.push(record),
            None => break,
        }
    }
    batch
}

/// Pauses (or resumes) fetching for the assigned partitions of `lane`.
fn pause_lane(consumer: &StreamConsumer<WriterContext>, lane: usize, lanes: usize, pause: bool) {
    let Ok(assignment) = consumer.assignment() else { return };
    let mut partitions = TopicPartitionList::new();
    for element in assignment.elements() {
        if element.partition().unsigned_abs() as usize % lanes == lane {
            partitions.add_partition(element.topic(), element.partition());
        }
    }
    let result = if pause { consumer.pause(&partitions) } else { consumer.resume(&partitions) };
    match result {
        Ok(()) => info!(
            lane,
            partitions = partitions.count(),
            paused = pause,
            "lane {}",
            if pause { "full: its partitions paused" } else { "has room: its partitions resumed" }
        ),
        Err(error) => warn!(%error, lane, "failed to pause or resume partitions"),
    }
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
