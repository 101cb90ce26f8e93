//! `flare-storage replay-dlq`: after the cause of dead letters is fixed, sends each
//! dead-lettered record (its original key and value) back to the message topic, then commits
//! its position in a consumer group, so a second replay does not send it again. Records that
//! are still unstorable simply return to the dead-letter topic with their reason.
//!
//! It reads by direct partition assignment (no group join) from the group's committed
//! position, and stops at the end offsets it saw when it started.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

use crate::progress::Progress;

pub async fn run(kafka: &str, from: &str, to: &str, group: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", kafka).set("acks", "all").create()?;

    let metadata = consumer
        .fetch_metadata(Some(from), Duration::from_secs(10))
        .with_context(|| format!("cannot read metadata of {from}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|topic| topic.name() == from)
        .map(|topic| topic.partitions().iter().map(|partition| partition.id()).collect())
        .unwrap_or_default();
    anyhow::ensure!(!partitions.is_empty(), "topic {from} has no partitions (does it exist?)");

    // Where to start (the group's committed offsets) and where to stop (the end now).
    let mut wanted = TopicPartitionList::new();
    for &partition in &partitions {
        wanted.add_partition(from, partition);
    }
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    let mut end: HashMap<i32, i64> = HashMap::new();
    let mut waiting = 0u64;
    for &partition in &partitions {
        let (low, high) = consumer.fetch_watermarks(from, partition, Duration::from_secs(10))?;
        let start = match committed.find_partition(from, partition).map(|element| element.offset()) {
            Some(Offset::Offset(offset)) => offset,
            _ => low,
        };
        if start < high {
            assignment.add_partition_offset(from, partition, Offset::Offset(start))?;
            end.insert(partition, high);
            waiting += u64::try_from(high - start).unwrap_or_default();
        }
    }
    if end.is_empty() {
        println!("nothing to replay from {from}");
        return Ok(());
    }
    consumer.assign(&assignment)?;

    let mut progress = Progress::new("records replayed", Some(waiting));
    let mut idle_since = Instant::now();
    while !end.is_empty() && idle_since.elapsed() < Duration::from_secs(10) {
        let Some(received) = consumer.poll(Duration::from_millis(200)) else { continue };
        let record = received?;
        idle_since = Instant::now();
        let partition = record.partition();
        let mut resend: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(to);
        if let Some(key) = record.key() {
            resend = resend.key(key);
        }
        if let Some(payload) = record.payload() {
            resend = resend.payload(payload);
        }
        producer.send(resend, Duration::from_secs(30)).await.map_err(|(error, _)| error)?;
        let mut done = TopicPartitionList::new();
        done.add_partition_offset(from, partition, Offset::Offset(record.offset() + 1))?;
        consumer.commit(&done, CommitMode::Sync)?;
        progress.inc(1);
        if end.get(&partition).is_some_and(|&high| record.offset() + 1 >= high) {
            end.remove(&partition);
        }
    }
    progress.finish();
    Ok(())
}
