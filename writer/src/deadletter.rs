//! The dead-letter topic: records that can never be stored (undecodable, invalid, too large)
//! are copied there unchanged — same key and value — with headers saying why and where they
//! came from, so an operator can fix and replay them. Only after the copy is acknowledged does
//! the consumer move past the record.
//!
//! A record too large for the dead-letter topic (the producer's or the broker's message size
//! limit) would otherwise be refused on every retry and stall its partition: it is
//! dead-lettered without its key and value instead, with a header giving the value's size;
//! the source headers say where the whole record still is.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::record::Record;

pub const HEADER_REASON: &str = "flare-dlq-reason";
pub const HEADER_SOURCE_TOPIC: &str = "flare-dlq-source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "flare-dlq-source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "flare-dlq-source-offset";
/// Set (to the value's size in bytes) when the record is dead-lettered without key and value.
pub const HEADER_VALUE_OMITTED: &str = "flare-dlq-value-omitted-bytes";

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
    pub async fn send(&self, record: &Record, reason: &str) -> Result<(), KafkaError> {
        match self.send_copy(record, reason, true).await {
            Err(error) if too_large(&error) => self.send_copy(record, reason, false).await,
            result => result,
        }
    }

    async fn send_copy(&self, record: &Record, reason: &str, whole: bool) -> Result<(), KafkaError> {
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let value_size = record.payload.as_ref().map_or(0, Vec::len).to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_REASON, value: Some(reason) })
            .insert(Header { key: HEADER_SOURCE_TOPIC, value: Some(&record.topic) })
            .insert(Header { key: HEADER_SOURCE_PARTITION, value: Some(&partition) })
            .insert(Header { key: HEADER_SOURCE_OFFSET, value: Some(&offset) });
        if !whole {
            headers = headers.insert(Header { key: HEADER_VALUE_OMITTED, value: Some(&value_size) });
        }
        let mut dead_letter: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if whole {
            if let Some(key) = &record.key {
                dead_letter = dead_letter.key(key.as_slice());
            }
            if let Some(payload) = &record.payload {
                dead_letter = dead_letter.payload(payload.as_slice());
            }
        }
        self.producer
            .send(dead_letter, Duration::from_secs(30))
            .await
            .map(|_delivery| ())
            .map_err(|(error, _record)| error)
    }
}

/// Whether the producer (locally) or the broker refused a record for its size.
fn too_large(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
        )
    )
}
