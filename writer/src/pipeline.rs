//! What happens to one batch of records: decode and validate each, dead-letter what can never
//! be stored, persist the rest idempotently. A batch is finished only when every one of its
//! records is durable somewhere (a store or the dead-letter topic); until then each failing
//! stage is retried with backoff and the consumer fetches nothing new, which bounds memory
//! while a store is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flare_storage_common::message::{InvalidMessage, message_tenant_id, normalize};
use flare_storage_common::ops::Readiness;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{Message, StoreMessageRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::consumer::Record;
use crate::deadletter::DeadLetters;
use crate::metrics::Metrics;
use crate::store::postgres::PostgresStore;

/// Shutdown arrived before the batch was finished; none of it may be committed.
#[derive(Debug, thiserror::Error)]
#[error("shutdown before the batch was persisted")]
pub struct Interrupted;

/// Why a record goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("record has no value")]
    Empty,
    #[error("record value of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("record value is not a StoreMessageRequest: {0}")]
    Undecodable(String),
    #[error("invalid message: {0}")]
    Invalid(#[from] InvalidMessage),
}

impl Rejection {
    /// Bounded label for the dead-letter metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::Undecodable(_) => "undecodable",
            Rejection::Invalid(_) => "invalid",
        }
    }
}

/// Backoff between attempts of a failing stage: doubles from `initial` up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

pub struct Pipeline {
    pub postgres: PostgresStore,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    pub backoff: Backoff,
    pub max_message_bytes: usize,
}

impl Pipeline {
    /// Makes every record of `records` durable. Returns `Err(Interrupted)` only on shutdown.
    pub async fn process(&self, records: &[Record], shutdown: &CancellationToken) -> Result<(), Interrupted> {
        self.metrics.batch_size.observe(records.len() as f64);
        let ingested_at = Utc::now();
        let mut messages = Vec::with_capacity(records.len());
        for record in records {
            match self.decode(record, ingested_at) {
                Ok(message) => messages.push(message),
                Err(rejection) => self.dead_letter(record, &rejection, shutdown).await?,
            }
        }
        if messages.is_empty() {
            return Ok(());
        }

        let started = Instant::now();
        let mut inserted = self.retry("postgres", shutdown, || self.postgres.insert_batch(&messages)).await?;
        self.metrics.write_latency.observe(started.elapsed().as_secs_f64());

        // A key is new once: a second copy in the same batch is a duplicate of the first.
        let new = messages
            .iter()
            .filter(|message| inserted.remove(&(message_tenant_id(message).to_owned(), message.id.clone())))
            .count();
        self.metrics.processed.inc_by(new as u64);
        self.metrics.duplicated.inc_by((messages.len() - new) as u64);
        debug!(stored = new, duplicates = messages.len() - new, "batch persisted");
        Ok(())
    }

    fn decode(&self, record: &Record, ingested_at: DateTime<Utc>) -> Result<Message, Rejection> {
        let payload = record.payload.as_deref().ok_or(Rejection::Empty)?;
        if payload.len() > self.max_message_bytes {
            return Err(Rejection::TooLarge { size: payload.len(), limit: self.max_message_bytes });
        }
        let request =
            StoreMessageRequest::decode(payload).map_err(|error| Rejection::Undecodable(error.to_string()))?;
        // The record time stands in for a missing message time; it is the same on redelivery.
        let record_time = record.timestamp_ms.and_then(DateTime::from_timestamp_millis).unwrap_or(ingested_at);
        Ok(normalize(request, record_time, ingested_at)?)
    }

    async fn dead_letter(
        &self,
        record: &Record,
        rejection: &Rejection,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let reason = rejection.to_string();
        warn!(
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            reason = %reason,
            "dead-lettering record"
        );
        self.retry("dead_letter", shutdown, || self.dead_letters.send(record, &reason)).await?;
        self.metrics.dead_lettered.with_label_values(&[rejection.kind()]).inc();
        Ok(())
    }

    /// Runs `attempt` until it succeeds, backing off between failures. An attempt under way
    /// is allowed to finish so a shutdown still lands the batch in flight; after a failure,
    /// shutdown stops the retries. While a stage fails the writer reports itself not ready.
    async fn retry<T, E, F, Fut>(
        &self,
        stage: &'static str,
        shutdown: &CancellationToken,
        mut attempt: F,
    ) -> Result<T, Interrupted>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut delay = self.backoff.initial;
        loop {
            match attempt().await {
                Ok(value) => {
                    self.readiness.set(true);
                    return Ok(value);
                }
                Err(error) => {
                    self.readiness.set(false);
                    self.metrics.stage_errors.with_label_values(&[stage]).inc();
                    warn!(stage, error = %error, retry_in_ms = delay.as_millis() as u64, "stage failed, retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return Err(Interrupted),
                    }
                    delay = (delay * 2).min(self.backoff.max);
                }
            }
        }
    }
}
