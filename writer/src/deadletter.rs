//! The dead-letter topic: records that can never be stored (undecodable, invalid, too large)
//! are copied there unchanged — same key and value — with headers saying why and where they
//! came from, so an operator can fix and replay them. Only after the copy is acknowledged does
//! the consumer move past the record.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::consumer::Record;

pub const HEADER_REASON: &str = "flare-dlq-reason";
pub const HEADER_SOURCE_TOPIC: &str = "flare-dlq-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "flare-dlq-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "flare-dlq-source-offset";

#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: String) -> Self {
        Self { producer, topic }
    }

    /// Copies `record` to the dead-letter topic; returns once the broker acknowledged it.
    pub async fn send(&self, record: &Record, reason: &str) -> Result<(), rdkafka::error::KafkaError> {
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_REASON, value: Some(reason) })
            .insert(Header { key: HEADER_SOURCE_TOPIC, value: Some(&record.topic) })
            .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(&partition) })
            .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(&offset) });
        let mut dead_letter: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &record.key {
            dead_letter = dead_letter.key(key.as_slice());
        }
        if let Some(payload) = &record.payload {
            dead_letter = dead_letter.payload(payload.as_slice());
        }
        self.producer
            .send(dead_letter, Duration::from_secs(30))
            .await
            .map(|_delivery| ())
            .map_err(|(error, _record)| error)
    }
}
