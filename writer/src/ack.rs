//! ACK events (SPEC §2.2): one JSON record per message on `KAFKA_ACK_TOPIC`, keyed by session
//! id, once the message is durable ("persisted") or found already durable ("duplicate").
//! Delivery is at least once: a batch repeated after a failure may ACK a message again.

use std::time::Duration;

use flare_storage_common::message::to_datetime;
use flare_storage_common::proto::storage::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use crate::dedup::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Persisted,
    Duplicate,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ack {
    pub message_id: String,
    pub session_id: String,
    pub status: AckStatus,
    /// Epoch milliseconds.
    pub ingestion_ts: i64,
    /// Epoch milliseconds.
    pub persisted_ts: i64,
    pub deduplicated: bool,
    pub tenant_id: String,
    pub seq: i64,
}

impl Ack {
    /// The ACK of a record carrying `message` (its own copy, as decoded) that ended as
    /// `outcome`.
    pub fn of(message: &Message, tenant_id: &str, outcome: &Outcome<'_>) -> Self {
        Self {
            message_id: message.id.clone(),
            session_id: outcome.session_id.to_owned(),
            status: outcome.status,
            ingestion_ts: ingestion_ms(message),
            persisted_ts: outcome.persisted_ms,
            deduplicated: outcome.deduplicated,
            tenant_id: tenant_id.to_owned(),
            seq: outcome.seq,
        }
    }
}

/// When the message entered the platform (its timeline's ingestion time), epoch milliseconds.
fn ingestion_ms(message: &Message) -> i64 {
    message
        .timeline
        .as_ref()
        .and_then(|timeline| timeline.ingestion_time.as_ref())
        .and_then(to_datetime)
        .map_or(0, |time| time.timestamp_millis())
}

#[derive(Clone)]
pub struct Acks {
    producer: FutureProducer,
    topic: String,
}

impl Acks {
    pub fn new(producer: FutureProducer, topic: String) -> Self {
        Self { producer, topic }
    }

    /// Publishes every ACK and waits until the broker acknowledged all of them.
    pub async fn publish(&self, acks: &[Ack]) -> Result<(), rdkafka::error::KafkaError> {
        let payloads: Vec<Vec<u8>> = acks.iter().map(|ack| serde_json::to_vec(ack).unwrap_or_default()).collect();
        let deliveries = acks.iter().zip(&payloads).map(|(ack, payload)| {
            self.producer.send(
                FutureRecord::to(&self.topic).key(ack.session_id.as_str()).payload(payload.as_slice()),
                Duration::from_secs(30),
            )
        });
        for delivery in futures::future::join_all(deliveries).await {
            delivery.map_err(|(error, _)| error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_json_has_the_contract_fields() {
        let ack = Ack {
            message_id: "m1".into(),
            session_id: "s1".into(),
            status: AckStatus::Duplicate,
            ingestion_ts: 1,
            persisted_ts: 2,
            deduplicated: true,
            tenant_id: "t".into(),
            seq: 7,
        };
        let json: serde_json::Value = serde_json::to_value(&ack).expect("serialises");
        assert_eq!(json["status"], "duplicate");
        for field in ["message_id", "session_id", "ingestion_ts", "persisted_ts", "deduplicated", "tenant_id", "seq"] {
            assert!(json.get(field).is_some(), "{field} missing");
        }
    }
}
