//! What happens to one batch of records, in two halves that a lane overlaps (batch N+1's
//! first half runs while batch N's second half does; see `consumer.rs`):
//!
//! 1. [`Pipeline::store`]: decode and validate each record (what can never be stored goes to
//!    the dead-letter topic); decide which message each record stands for (`dedup`: the ids
//!    the databases hold, with the record that stored each); assign seqs (`seq`); write
//!    PostgreSQL, then MongoDB. A database refusing a message for good costs only that message.
//! 2. [`Pipeline::finish`]: the cache stage — hot windows, session states, senders' read seqs
//!    and WAL entry removal, in one Redis round trip — then the ACK events, then the dead
//!    letters of refused messages. The consumer stores the batch's offsets after it.
//!
//! Each half is one unit repeated whole until it succeeds (with backoff, forever); every step
//! is idempotent, so a repeat after any failure has no second effect.
//!
//! A message id is unique within a tenant. Before a seq is handed out, the databases say which
//! messages they already hold: one stored in another session is a duplicate and touches
//! nothing of the session it was resent to. The databases keep the Kafka record that stored
//! each message (its origin): that record delivered again (a redelivery) is carried on as
//! stored, with its seq, its cache stage run again, and ACKed `persisted` again; any other
//! record (a resend) is a duplicate that writes nothing. Redis keeps no key per message.
//!
//! Postgres comes before MongoDB because its unique (tenant, session, seq) index (in
//! `message_ids`) is the guard that catches a seq counter that went backwards. The hot cache
//! is written after the databases, so it never shows a message that is not durable, and the
//! ACKs after it: a crash anywhere before them means redelivery and completion, never a false
//! "duplicate" (the redelivered record is the one the database names as the message's origin).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flare_storage_common::message::{InvalidMessage, TimeBounds, drop_store_owned, in_micros, normalize, to_timestamp};
use flare_storage_common::ops::Readiness;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{Message, StoreMessageRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::ack::{Ack, AckStatus, Acks};
use crate::deadletter::DeadLetters;
use crate::dedup::{self, Candidate, Decision, Fate, Outcome, outcome};
use crate::error::{Error, Stage};
use crate::metrics::Metrics;
use crate::record::{Origin, Record};
use crate::seq;
use crate::store::mongo::document_size_refusal;
use crate::store::redis::DurableMessage;
use crate::store::{Encoded, MessageKey, Partial, Stores, Written, message_key};

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
    #[error("message too large for a store: {0}")]
    TooLargeForStore(String),
    /// A database refused the message when it was written (what validation did not foresee).
    #[error("{0}")]
    Refused(String),
}

impl Rejection {
    /// Bounded label for the dead-letter metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::TooLarge { .. } | Rejection::TooLargeForStore(_) => "too_large",
            Rejection::Undecodable(_) => "undecodable",
            Rejection::Invalid(_) => "invalid",
            Rejection::Refused(_) => "refused",
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
    pub stores: Stores,
    pub acks: Option<Acks>,
    pub wal_hash_key: Option<String>,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
    pub readiness: Arc<Readiness>,
    pub backoff: Backoff,
    pub max_message_bytes: usize,
    /// How far a message's timestamp may stray from its record's time.
    pub time_bounds: TimeBounds,
    /// Fault injection for crash tests: abort the process right after this stage.
    pub crash_after_stage: Option<Stage>,
}

/// A batch through [`Pipeline::store`]: its messages are in the databases.
pub struct Stored {
    records: Vec<Record>,
    /// The records that decoded (indexes into `records`), their messages and keys, aligned.
    accepted: Vec<usize>,
    batch: Vec<Message>,
    keys: Vec<MessageKey>,
    decisions: HashMap<MessageKey, Decision>,
    /// The messages this batch persists, in batch order.
    pending: Vec<Encoded>,
    /// Keys a database held before this batch.
    stored_before: HashSet<MessageKey>,
    refused: HashMap<MessageKey, String>,
    started: Instant,
}

/// What the attempts at one batch learned, kept across its retries.
#[derive(Default)]
struct Learned {
    /// Messages a database refused for good, with the reason: looked for only once, left out
    /// of every later attempt, dead-lettered when the batch is done.
    refused: HashMap<MessageKey, String>,
    /// Messages this batch stored itself, so that a retry after a later stage failed does not
    /// take them for messages stored before.
    stored: HashSet<MessageKey>,
}

type Memory = Mutex<Learned>;

/// The result of one attempt at the first half.
struct Attempt {
    decisions: HashMap<MessageKey, Decision>,
    pending: Vec<Encoded>,
    stored_before: HashSet<MessageKey>,
}

impl Pipeline {
    /// Both halves of a batch, one after the other. Returns `Err(Interrupted)` only on shutdown.
    pub async fn process(&self, records: Vec<Record>, shutdown: &CancellationToken) -> Result<Vec<Record>, Error> {
        let stored = self.store(records, shutdown).await?;
        self.finish(stored, shutdown).await
    }

    /// The first half: every record of `records` decoded and validated (what can never be
    /// stored is dead-lettered), and every message in the databases.
    pub async fn store(&self, records: Vec<Record>, shutdown: &CancellationToken) -> Result<Stored, Error> {
        self.metrics.batch_size.observe(records.len() as f64);
        let started = Instant::now();
        let ingested_at = Utc::now();
        let mut accepted = Vec::with_capacity(records.len());
        let mut batch = Vec::with_capacity(records.len());
        for (index, record) in records.iter().enumerate() {
            match self.decode(record, ingested_at) {
                Ok(message) => {
                    accepted.push(index);
                    batch.push(message);
                }
                Err(rejection) => self.dead_letter(record, &rejection, shutdown).await?,
            }
        }
        let keys: Vec<MessageKey> = batch.iter().map(message_key).collect();
        let origins: Vec<Origin> = accepted.iter().map(|&index| records[index].origin()).collect();
        let memory = Memory::default();
        let Attempt { decisions, pending, stored_before } = if batch.is_empty() {
            Attempt { decisions: HashMap::new(), pending: Vec::new(), stored_before: HashSet::new() }
        } else {
            self.retry(shutdown, || self.store_attempt(&batch, &keys, &origins, &memory)).await?
        };
        let refused = memory.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner).refused;
        Ok(Stored { records, accepted, batch, keys, decisions, pending, stored_before, refused, started })
    }

    /// The second half: the cache stage, ACKs and dead letters of what a database refused.
    /// Returns the batch's records, all done: their offsets may be stored.
    pub async fn finish(&self, stored: Stored, shutdown: &CancellationToken) -> Result<Vec<Record>, Error> {
        if !stored.batch.is_empty() {
            let outcomes = self.retry(shutdown, || self.finish_attempt(&stored)).await?;
            let count = |keep: fn(&Outcome<'_>) -> bool| outcomes.iter().filter(|outcome| keep(outcome)).count() as u64;
            let new = count(|outcome| outcome.status == AckStatus::Persisted && !outcome.deduplicated);
            let duplicates = count(|outcome| outcome.status == AckStatus::Duplicate);
            // Before the counts: whoever sees them moved sees this batch's time too.
            self.metrics.last_batch.set(Utc::now().timestamp_micros() as f64 / 1e6);
            self.metrics.processed.inc_by(new);
            self.metrics.duplicated.inc_by(duplicates);
            self.metrics.redelivered.inc_by(count(|outcome| outcome.redelivery));
            self.metrics.write_latency.observe(stored.started.elapsed().as_secs_f64());
            // Each record from its producer's timestamp to now: what a user waits for a
            // message to be readable, Kafka's queue included.
            let now_ms = Utc::now().timestamp_millis();
            for &index in &stored.accepted {
                if let Some(produced_ms) = stored.records[index].timestamp_ms {
                    self.metrics.end_to_end_latency.observe((now_ms - produced_ms).max(0) as f64 / 1e3);
                }
            }
            debug!(stored = new, duplicates, "batch done");
        }
        for (&index, key) in stored.accepted.iter().zip(&stored.keys) {
            if let Some(reason) = stored.refused.get(key) {
                self.dead_letter(&stored.records[index], &Rejection::Refused(reason.clone()), shutdown).await?;
            }
        }
        if stored.batch.is_empty() {
            // A batch of dead letters alone is done too.
            self.metrics.last_batch.set(Utc::now().timestamp_micros() as f64 / 1e6);
        }
        Ok(stored.records)
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
        let message = normalize(request, record_time, ingested_at, self.time_bounds)?;
        if self.stores.mongo.is_some()
            && let Some(reason) = document_size_refusal(&message)
        {
            return Err(Rejection::TooLargeForStore(reason));
        }
        Ok(message)
    }

    async fn dead_letter(
        &self,
        record: &Record,
        rejection: &Rejection,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let reason = rejection.to_string();
        warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason = %reason, "dead-lettering record");
        self.retry(shutdown, || async {
            self.dead_letters.send(record, &reason).await.map_err(Error::at(Stage::DeadLetter))
        })
        .await?;
        self.metrics.dead_lettered.with_label_values(&[rejection.kind()]).inc();
        Ok(())
    }

    /// One attempt at the first half for the decoded `batch` (`keys` aligned). Messages a
    /// database refuses are recorded in `memory` and left out of every later attempt.
    async fn store_attempt(
        &self,
        batch: &[Message],
        keys: &[MessageKey],
        origins: &[Origin],
        memory: &Memory,
    ) -> Result<Attempt, Error> {
        let (mut decisions, mut pending, mut stored_before) = self.decide(batch, keys, origins, memory).await?;

        let started = Instant::now();
        seq::assign(&self.stores, &self.metrics, &mut pending).await?;
        self.observe_stage(Stage::Seq, started);
        self.crash_point(Stage::Seq);

        // Each message with the record that stands for it: the database keeps it as its origin.
        let mut pending: Vec<Encoded> = pending
            .into_iter()
            .map(|message| {
                let origin =
                    decisions.get(&message_key(&message)).map(|decision| origins[decision.representative].clone());
                Encoded::new(message).with_origin(origin)
            })
            .collect();
        stored_before.extend(self.store_in_databases(&mut pending, &mut decisions, memory).await?);
        Ok(Attempt { decisions, pending, stored_before })
    }

    /// The idempotency stage: looks up which of the batch's ids the databases hold (with the
    /// session, seq and origin of each) and decides each message (`dedup`). Returns the
    /// decisions, the messages to persist in batch order (as a database holds them where it
    /// does) and the keys of those a database held before this batch.
    async fn decide(
        &self,
        batch: &[Message],
        keys: &[MessageKey],
        origins: &[Origin],
        memory: &Memory,
    ) -> Result<(HashMap<MessageKey, Decision>, Vec<Message>, HashSet<MessageKey>), Error> {
        let refused: HashSet<MessageKey> = lock(memory).refused.keys().cloned().collect();
        let mut id_lookups: Vec<(MessageKey, &str)> = Vec::new();
        let mut looked_up: HashSet<&MessageKey> = HashSet::new();
        for (message, key) in batch.iter().zip(keys) {
            if !refused.contains(key) && looked_up.insert(key) {
                id_lookups.push((key.clone(), &message.session_id));
            }
        }
        let started = Instant::now();
        let stored = self.stores.stored_messages(&id_lookups).await?;
        self.observe_stage(Stage::Idempotency, started);

        let records: Vec<Candidate<'_>> = keys
            .iter()
            .zip(batch)
            .zip(origins)
            .map(|((key, message), origin)| Candidate { key, session_id: &message.session_id, origin })
            .collect();
        let decisions = dedup::decide(&records, &stored, &refused);
        let mut representatives: Vec<(usize, &MessageKey, Option<&crate::store::StoredMessage>)> = decisions
            .iter()
            .filter_map(|(key, decision)| match &decision.fate {
                Fate::Pending { stored } => Some((decision.representative, key, stored.as_ref())),
                _ => None,
            })
            .collect();
        // Batch order: a session's messages take their seqs in partition order.
        representatives.sort_unstable_by_key(|(index, _, _)| *index);
        // In µs, as the databases keep it (PostgreSQL's timestamptz, MongoDB's `created_at_us`):
        // the cached body then reads as the databases' rows.
        let persisted_at = to_timestamp(in_micros(Utc::now()));
        let stored_by_this_batch = lock(memory).stored.clone();
        let mut stored_before = HashSet::new();
        let mut pending = Vec::with_capacity(representatives.len());
        for (index, key, found) in representatives {
            let mut message = batch[index].clone();
            match found {
                Some(found) => {
                    if !stored_by_this_batch.contains(key) {
                        stored_before.insert(key.clone());
                    }
                    // What a database holds is the message; a resend's copy may differ. A payload
                    // stored before the store-owned fields were dropped is cached without them.
                    message =
                        found.payload.as_deref().and_then(|payload| Message::decode(payload).ok()).unwrap_or(message);
                    drop_store_owned(&mut message);
                    if found.seq > 0 {
                        message.seq = found.seq;
                    }
                }
                None => message.timeline.get_or_insert_with(Default::default).persisted_time = Some(persisted_at),
            }
            pending.push(message);
        }
        Ok((decisions, pending, stored_before))
    }

    /// Writes the batch to Postgres and MongoDB; returns the keys a database held before this
    /// batch (what this batch stored itself is recorded in `memory`). Afterwards `pending`
    /// holds only what is stored in every database: a message a database refuses is recorded
    /// in `memory` (and taken back from the database this batch stored it in), one found
    /// stored in another session (a resend racing its first copy) becomes a duplicate of it,
    /// and one already stored under another seq takes the stored seq.
    async fn store_in_databases(
        &self,
        pending: &mut Vec<Encoded>,
        decisions: &mut HashMap<MessageKey, Decision>,
        memory: &Memory,
    ) -> Result<HashSet<MessageKey>, Error> {
        let mut stored_before = HashSet::new();
        if pending.is_empty() {
            return Ok(stored_before);
        }
        if let Some(postgres) = &self.stores.postgres {
            let started = Instant::now();
            let written = remember(postgres.insert_batch(pending).await, memory, Stage::Postgres)?;
            refuse(pending, &written.refused, Stage::Postgres, memory);
            stored_before.extend(self.settle(pending, written.already_stored, decisions, memory).await?);
            self.observe_stage(Stage::Postgres, started);
            self.crash_point(Stage::Postgres);
        }
        if let Some(mongo) = &self.stores.mongo {
            let started = Instant::now();
            let result = mongo.insert_batch(pending).await;
            let written = if self.stores.postgres.is_none() {
                remember(result, memory, Stage::Mongo)?
            } else {
                result.map_err(|partial| Error::at(Stage::Mongo)(partial.error))?
            };
            if !written.refused.is_empty()
                && let Some(postgres) = &self.stores.postgres
            {
                let stored_now = lock(memory).stored.clone();
                let take_back: Vec<&Message> = written
                    .refused
                    .iter()
                    .map(|(index, _)| &pending[*index].message)
                    .filter(|message| stored_now.contains(&message_key(message)))
                    .collect();
                postgres.delete_refused(&take_back).await.map_err(Error::at(Stage::Mongo))?;
            }
            refuse(pending, &written.refused, Stage::Mongo, memory);
            if self.stores.postgres.is_none() {
                stored_before.extend(self.settle(pending, written.already_stored, decisions, memory).await?);
            }
            self.observe_stage(Stage::Mongo, started);
            self.crash_point(Stage::Mongo);
        }
        Ok(stored_before)
    }

    /// Handles the messages the first database already held when they were written, found
    /// only now (a resend racing its first copy, or a seq collision): one stored by another
    /// record (in another session, or from another origin) becomes a duplicate of it and leaves
    /// `pending`; one stored by this record (an earlier attempt of this batch) takes the stored
    /// seq; one not stored under its id collided on its seq, and the counter
    /// is reseeded for the retry. Returns the keys stored before this batch.
    async fn settle(
        &self,
        pending: &mut Vec<Encoded>,
        already_stored: HashSet<MessageKey>,
        decisions: &mut HashMap<MessageKey, Decision>,
        memory: &Memory,
    ) -> Result<HashSet<MessageKey>, Error> {
        if already_stored.is_empty() {
            return Ok(already_stored);
        }
        let lookups: Vec<(MessageKey, &str)> = pending
            .iter()
            .map(|encoded| (message_key(&encoded.message), encoded.message.session_id.as_str()))
            .filter(|(key, _)| already_stored.contains(key))
            .collect();
        let stored = self.stores.stored_messages(&lookups).await?;
        let conflicting: Vec<&MessageKey> = already_stored.iter().filter(|key| !stored.contains_key(*key)).collect();
        if !conflicting.is_empty() {
            let messages = pending.iter().map(|encoded| &encoded.message);
            return Err(seq::reseed_after_conflict(&self.stores, messages, &conflicting).await);
        }
        pending.retain_mut(|encoded| {
            let key = message_key(&encoded.message);
            let Some(found) = stored.get(&key) else { return true };
            let another_record = found.origin.is_some() && found.origin != encoded.origin;
            if found.session_id != encoded.message.session_id || another_record {
                warn!(message_id = %encoded.message.id, session_id = %encoded.message.session_id, stored_session_id = %found.session_id, "message id already stored by another record; a duplicate");
                if let Some(decision) = decisions.get_mut(&key) {
                    decision.fate = Fate::Stored(found.clone());
                }
                return false;
            }
            if found.seq > 0 && found.seq != encoded.message.seq {
                warn!(message_id = %encoded.message.id, assigned = encoded.message.seq, stored = found.seq, "message already stored with another seq; keeping the stored one");
                encoded.set_seq(found.seq);
            }
            if let Some(decision) = decisions.get_mut(&key) {
                decision.fate = Fate::Pending { stored: Some(found.clone()) };
            }
            true
        });
        let stored_by_this_batch = lock(memory).stored.clone();
        Ok(already_stored.into_iter().filter(|key| !stored_by_this_batch.contains(key)).collect())
    }

    /// One attempt at the second half; returns what became of every record.
    async fn finish_attempt<'a>(&self, stored: &'a Stored) -> Result<Vec<Outcome<'a>>, Error> {
        let started = Instant::now();
        let durable: Vec<DurableMessage<'_>> = stored
            .pending
            .iter()
            .map(|encoded| DurableMessage {
                message: encoded,
                stored_before: stored.stored_before.contains(&message_key(&encoded.message)),
            })
            .collect();
        let wal_ids: Vec<&str> = match &self.wal_hash_key {
            None => Vec::new(),
            Some(_) => {
                let ids: HashSet<&str> = stored
                    .batch
                    .iter()
                    .zip(&stored.keys)
                    .filter(|(_, key)| !stored.refused.contains_key(*key))
                    .map(|(message, _)| message.id.as_str())
                    .collect();
                ids.into_iter().collect()
            }
        };
        let wal = self.wal_hash_key.as_deref().map(|key| (key, wal_ids.as_slice()));
        self.stores.redis.finish(&durable, wal).await.map_err(Error::at(Stage::Cache))?;
        self.observe_stage(Stage::Cache, started);
        self.crash_point(Stage::Cache);

        let persisted: HashMap<MessageKey, &Message> =
            stored.pending.iter().map(|encoded| (message_key(&encoded.message), &encoded.message)).collect();
        let outcomes: Vec<(usize, Outcome<'_>)> = stored
            .keys
            .iter()
            .enumerate()
            .filter_map(|(index, key)| {
                let decision = stored.decisions.get(key)?;
                let persisted = persisted.get(key).copied();
                let stored_before = stored.stored_before.contains(key);
                outcome(index, decision, persisted, stored_before).map(|outcome| (index, outcome))
            })
            .collect();
        if let Some(acks) = &self.acks {
            let started = Instant::now();
            let events: Vec<Ack> = outcomes
                .iter()
                .map(|(index, outcome)| Ack::of(&stored.batch[*index], &stored.keys[*index].0, outcome))
                .collect();
            acks.publish(&events).await.map_err(Error::at(Stage::Ack))?;
            self.observe_stage(Stage::Ack, started);
            self.crash_point(Stage::Ack);
        }
        Ok(outcomes.into_iter().map(|(_, outcome)| outcome).collect())
    }

    fn observe_stage(&self, stage: Stage, started: Instant) {
        self.metrics.stage_latency.with_label_values(&[stage.name()]).observe(started.elapsed().as_secs_f64());
    }

    fn crash_point(&self, stage: Stage) {
        if self.crash_after_stage == Some(stage) {
            warn!(%stage, "crash requested by WRITER_CRASH_AFTER_STAGE; aborting");
            std::process::abort();
        }
    }

    /// Runs `attempt` until it succeeds, backing off between failures. An attempt under way
    /// is allowed to finish so a shutdown still lands the batch in flight; after a failure,
    /// shutdown stops the retries. While attempts fail the writer reports itself not ready.
    async fn retry<T, F, Fut>(&self, shutdown: &CancellationToken, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut delay = self.backoff.initial;
        loop {
            match attempt().await {
                Ok(value) => {
                    self.readiness.set(true);
                    return Ok(value);
                }
                Err(Error::Interrupted) => return Err(Error::Interrupted),
                Err(failure) => {
                    self.readiness.set(false);
                    let stage = failure.stage().map_or("unknown", Stage::name);
                    self.metrics.stage_errors.with_label_values(&[stage]).inc();
                    warn!(stage, error = %failure, retry_in_ms = delay.as_millis() as u64, "stage failed, retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return Err(Error::Interrupted),
                    }
                    delay = (delay * 2).min(self.backoff.max);
                }
            }
        }
    }
}

fn lock(memory: &Memory) -> std::sync::MutexGuard<'_, Learned> {
    memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The result of a database write, with what it stored — before a failure too — recorded in
/// `memory` as stored by this batch.
fn remember<E>(result: Result<Written, Partial<E>>, memory: &Memory, stage: Stage) -> Result<Written, Error>
where
    E: std::error::Error + Into<crate::error::Cause>,
{
    match result {
        Ok(written) => {
            lock(memory).stored.extend(written.inserted.iter().cloned());
            Ok(written)
        }
        Err(partial) => {
            lock(memory).stored.extend(partial.written.inserted.iter().cloned());
            Err(Error::at(stage)(partial.error))
        }
    }
}

/// Records the messages at `refused` (indexes into `pending`) as refused by the database of
/// `stage` and takes them out of `pending`.
fn refuse(pending: &mut Vec<Encoded>, refused: &[(usize, String)], stage: Stage, memory: &Memory) {
    if refused.is_empty() {
        return;
    }
    if refused.len() == pending.len() && pending.len() > 1 {
        // Possible, but more likely the database or its schema does not match this version:
        // the records stay in the dead-letter topic to be replayed once that is fixed.
        error!(store = %stage, records = pending.len(), "the database refused every message of the batch; check its schema and settings");
    }
    let mut memory = lock(memory);
    let mut gone = HashSet::new();
    for (index, reason) in refused {
        let Some(encoded) = pending.get(*index) else { continue };
        let message = &encoded.message;
        warn!(store = %stage, message_id = %message.id, session_id = %message.session_id, reason = %reason, "database refused a message; it will be dead-lettered");
        memory.refused.insert(message_key(message), reason.clone());
        gone.insert(*index);
    }
    let mut index = 0;
    pending.retain(|_| {
        let keep = !gone.contains(&index);
        index += 1;
        keep
    });
}
