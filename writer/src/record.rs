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
