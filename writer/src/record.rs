//! A Kafka record as the writer handles it, copied out of the consumer's buffer so a batch can
//! outlive the fetch.

#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The record's timestamp (epoch milliseconds), the same on every delivery.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// Where the record sits in Kafka.
    pub fn origin(&self) -> Origin {
        Origin { topic: self.topic.clone(), partition: self.partition, offset: self.offset }
    }
}

/// The Kafka record that stored a message (topic, partition, offset), kept with the message's
/// id in the database: a later record carrying the same message id is that very record
/// redelivered only when its origin is this one — even one at the same position of another
/// topic is a second sending.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}
