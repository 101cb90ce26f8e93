//! What happens to one batch of records.
//!
//! 1. Decode and validate each record; what can never be stored goes to the dead-letter topic.
//! 2. Persist the rest, as one unit that is repeated whole until it succeeds (every step is
//!    idempotent, so a repeat after any failure has no second effect):
//!    idempotency (done markers and the databases, at once) → per-session seq → Postgres →
//!    MongoDB → hot cache → session state and senders' read seqs → WAL entry removal → ACKs →
//!    done markers.
//! 3. Dead-letter what a database refused for good; the rest is stored and its offsets advance.
//!
//! A message id is unique within a tenant. Before a seq is handed out, the databases say which
//! messages they already hold: one stored in another session is a duplicate and touches
//! nothing of the session it was resent to; one stored in its own session (a redelivery, or a
//! resend after its done marker expired) is carried on as stored, with its seq.
//!
//! Postgres comes before MongoDB because its unique (tenant, session, seq) index is the guard
//! that catches a seq counter that went backwards (Redis restored from an old snapshot); the
//! seqs are corrected before anything else sees them. The hot cache is written after the
//! databases so it never shows a message that is not durable. The done marker is written last:
//! a crash anywhere before it means the batch is redelivered and completed, never reported as a
//! duplicate. Until a batch is finished the consumer fetches nothing new, which bounds memory
//! while a store is down.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flare_storage_common::keys::SessionKeys;
use flare_storage_common::message::{
    InvalidMessage, TimeBounds, content_type, message_tenant_id, normalize, to_datetime, to_timestamp,
};
use flare_storage_common::ops::Readiness;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{Message, StoreMessageRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::ack::{Ack, AckStatus, Acks};
use crate::consumer::Record;
use crate::deadletter::DeadLetters;
use crate::dedup::{self, Decision, Fate, Outcome, outcome, persisted_ms};
use crate::metrics::Metrics;
use crate::store::mongo::{MongoStore, document_size_refusal};
use crate::store::postgres::PostgresStore;
use crate::store::redis::{Done, HotEntry, RedisStore, SeqRequest, StateEntry};
use crate::store::{MessageKey, Partial, StoredMessage, Written, message_key};

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

/// A failed pipeline stage; the whole batch is retried.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage} failed: {message}")]
pub struct StageError {
    pub stage: &'static str,
    pub message: String,
}

fn stage_error(stage: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> StageError {
    move |error| StageError { stage, message: error.to_string() }
}

/// Backoff between attempts of a failing batch: doubles from `initial` up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

pub struct Pipeline {
    pub redis: RedisStore,
    pub postgres: Option<PostgresStore>,
    pub mongo: Option<MongoStore>,
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
    pub crash_after_stage: Option<String>,
}

/// What one attempt at persisting a batch achieved.
struct Persisted {
    stored: usize,
    duplicates: usize,
    /// Records delivered again after they had completed (a crash or rebalance before their
    /// offset was committed): ACKed as persisted again, counted neither as new nor duplicate.
    redelivered: usize,
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

impl Pipeline {
    /// Makes every record of `records` durable, or dead-letters it with the reason it can
    /// never be. Returns `Err(Interrupted)` only on shutdown.
    pub async fn process(&self, records: &[Record], shutdown: &CancellationToken) -> Result<(), Interrupted> {
        self.metrics.batch_size.observe(records.len() as f64);
        let ingested_at = Utc::now();
        let mut messages = Vec::with_capacity(records.len());
        let mut accepted = Vec::with_capacity(records.len());
        for record in records {
            match self.decode(record, ingested_at) {
                Ok(message) => {
                    messages.push(message);
                    accepted.push(record);
                }
                Err(rejection) => self.dead_letter(record, &rejection, shutdown).await?,
            }
        }
        if messages.is_empty() {
            return Ok(());
        }

        let started = Instant::now();
        // One subscription, one topic: every record of a batch comes from it.
        let topic = records.first().map_or("", |record| record.topic.as_str());
        let origins: Vec<(i32, i64)> = accepted.iter().map(|record| (record.partition, record.offset)).collect();
        let memory = Memory::default();
        let persisted = self.retry(shutdown, || self.persist(&messages, topic, &origins, &memory)).await?;
        self.metrics.write_latency.observe(started.elapsed().as_secs_f64());
        self.metrics.processed.inc_by(persisted.stored as u64);
        self.metrics.duplicated.inc_by(persisted.duplicates as u64);
        self.metrics.redelivered.inc_by(persisted.redelivered as u64);
        debug!(stored = persisted.stored, duplicates = persisted.duplicates, "batch persisted");

        let refused = memory.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner).refused;
        for (record, message) in accepted.iter().zip(&messages) {
            let key = (message_tenant_id(message).to_owned(), message.id.clone());
            if let Some(reason) = refused.get(&key) {
                self.dead_letter(record, &Rejection::Refused(reason.clone()), shutdown).await?;
            }
        }
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
        let message = normalize(request, record_time, ingested_at, self.time_bounds)?;
        if self.mongo.is_some()
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
    ) -> Result<(), Interrupted> {
        let reason = rejection.to_string();
        warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason = %reason, "dead-lettering record");
        self.retry(shutdown, || async {
            self.dead_letters.send(record, &reason).await.map_err(|error| stage_error("dead_letter")(&error))
        })
        .await?;
        self.metrics.dead_lettered.with_label_values(&[rejection.kind()]).inc();
        Ok(())
    }

    /// One attempt at every persistence stage for a batch of valid messages; `origins[i]` is
    /// the (partition, offset) in `topic` of the record of `batch[i]`. Messages a database
    /// refuses are recorded in `memory` and left out of every later stage and attempt.
    async fn persist(
        &self,
        batch: &[Message],
        topic: &str,
        origins: &[(i32, i64)],
        memory: &Memory,
    ) -> Result<Persisted, StageError> {
        let keys: Vec<MessageKey> = batch.iter().map(message_key).collect();
        let (mut decisions, mut pending, stored_before) = self.decide(batch, &keys, memory).await?;

        let started = Instant::now();
        self.assign_seqs(&mut pending).await?;
        self.observe_stage("seq", started);
        self.crash_point("seq");

        let mut stored_before = stored_before;
        stored_before.extend(self.store_in_databases(&mut pending, &mut decisions, memory).await?);

        let started = Instant::now();
        self.cache_hot(&pending).await.map_err(|e| stage_error("cache")(&e))?;
        self.observe_stage("cache", started);
        self.crash_point("cache");

        let started = Instant::now();
        self.update_session_states(&pending).await.map_err(|e| stage_error("session_state")(&e))?;
        self.observe_stage("session_state", started);
        self.crash_point("session_state");

        let refused = lock(memory).refused.clone();
        if let Some(wal_key) = &self.wal_hash_key {
            let started = Instant::now();
            let ids: HashSet<&str> = batch
                .iter()
                .zip(&keys)
                .filter(|(_, key)| !refused.contains_key(*key))
                .map(|(message, _)| message.id.as_str())
                .collect();
            let ids: Vec<&str> = ids.into_iter().collect();
            self.redis.remove_from_wal(wal_key, &ids).await.map_err(|e| stage_error("wal")(&e))?;
            self.observe_stage("wal", started);
        }

        let persisted: HashMap<MessageKey, &Message> =
            pending.iter().map(|message| (message_key(message), message)).collect();
        let outcomes: Vec<(usize, Outcome<'_>)> = keys
            .iter()
            .enumerate()
            .filter_map(|(index, key)| {
                let decision = decisions.get(key)?;
                let left_by_this_record = match &decision.fate {
                    Fate::Done(marker) => marker.left_by(topic, origins.get(index).copied()),
                    _ => false,
                };
                let representative_session = batch[decision.representative].session_id.as_str();
                let persisted = persisted.get(key).copied();
                outcome(
                    index,
                    decision,
                    representative_session,
                    persisted,
                    left_by_this_record,
                    stored_before.contains(key),
                )
                .map(|outcome| (index, outcome))
            })
            .collect();
        if let Some(publisher) = &self.acks {
            let started = Instant::now();
            let events: Vec<Ack> = outcomes
                .iter()
                .map(|(index, outcome)| Ack {
                    message_id: batch[*index].id.clone(),
                    session_id: outcome.session_id.to_owned(),
                    status: outcome.status,
                    ingestion_ts: ingestion_ms(&batch[*index]),
                    persisted_ts: outcome.persisted_ms,
                    deduplicated: outcome.deduplicated,
                    tenant_id: keys[*index].0.clone(),
                    seq: outcome.seq,
                })
                .collect();
            publisher.publish(&events).await.map_err(|e| stage_error("ack")(&e))?;
            self.observe_stage("ack", started);
            self.crash_point("ack");
        }

        let started = Instant::now();
        let markers: Vec<(SessionKeys, &str, Done)> = pending
            .iter()
            .map(|message| {
                let origin = decisions.get(&message_key(message)).and_then(|d| origins.get(d.representative)).copied();
                let done = Done {
                    seq: message.seq,
                    persisted_ms: persisted_ms(message),
                    origin,
                    topic: Some(topic.to_owned()),
                };
                (SessionKeys::new(message_tenant_id(message), &message.session_id), message.id.as_str(), done)
            })
            .collect();
        self.redis.mark_done(&markers).await.map_err(|e| stage_error("mark_done")(&e))?;
        self.observe_stage("mark_done", started);

        let count = |keep: fn(&Outcome<'_>) -> bool| outcomes.iter().filter(|(_, outcome)| keep(outcome)).count();
        Ok(Persisted {
            stored: count(|outcome| outcome.status == AckStatus::Persisted && !outcome.deduplicated),
            duplicates: count(|outcome| outcome.status == AckStatus::Duplicate),
            redelivered: count(|outcome| outcome.redelivery),
        })
    }

    /// The idempotency stage: looks up the done markers of every (message, session) of the
    /// batch and, at the same time, which ids the databases hold; decides each message
    /// (`dedup`). Returns the decisions, the messages to persist in batch order (as a database
    /// holds them where it does) and the keys of those a database held before this batch.
    async fn decide(
        &self,
        batch: &[Message],
        keys: &[MessageKey],
        memory: &Memory,
    ) -> Result<(HashMap<MessageKey, Decision>, Vec<Message>, HashSet<MessageKey>), StageError> {
        let refused: HashSet<MessageKey> = lock(memory).refused.keys().cloned().collect();
        let mut pairs: HashSet<(&MessageKey, &str)> = HashSet::new();
        let mut marker_lookups: Vec<(SessionKeys, &str)> = Vec::new();
        let mut marker_of: Vec<(MessageKey, String)> = Vec::new();
        let mut id_lookups: Vec<(MessageKey, &str)> = Vec::new();
        let mut looked_up: HashSet<&MessageKey> = HashSet::new();
        for (message, key) in batch.iter().zip(keys) {
            if refused.contains(key) {
                continue;
            }
            if pairs.insert((key, &message.session_id)) {
                marker_lookups.push((SessionKeys::new(&key.0, &message.session_id), &message.id));
                marker_of.push((key.clone(), message.session_id.clone()));
            }
            if looked_up.insert(key) {
                id_lookups.push((key.clone(), &message.session_id));
            }
        }
        let started = Instant::now();
        let (markers, stored) =
            tokio::join!(self.redis.done_markers(&marker_lookups), self.stored_messages(&id_lookups));
        let markers: HashMap<(MessageKey, String), Done> = marker_of
            .into_iter()
            .zip(markers.map_err(|e| stage_error("idempotency")(&e))?)
            .filter_map(|(pair, marker)| Some((pair, marker?)))
            .collect();
        let stored = stored?;
        self.observe_stage("idempotency", started);

        let records: Vec<(&MessageKey, &str)> =
            keys.iter().zip(batch).map(|(key, message)| (key, message.session_id.as_str())).collect();
        let decisions = dedup::decide(&records, &markers, &stored, &refused);
        let mut representatives: Vec<(usize, &MessageKey, Option<&StoredMessage>)> = decisions
            .iter()
            .filter_map(|(key, decision)| match &decision.fate {
                Fate::Pending { stored } => Some((decision.representative, key, stored.as_ref())),
                _ => None,
            })
            .collect();
        // Batch order: a session's messages take their seqs in partition order.
        representatives.sort_unstable_by_key(|(index, _, _)| *index);
        let persisted_at = to_timestamp(Utc::now());
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
                    // What a database holds is the message; a resend's copy may differ.
                    message =
                        found.payload.as_deref().and_then(|payload| Message::decode(payload).ok()).unwrap_or(message);
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

    /// Which of `keys` a database holds (with the payload where it holds it in the session
    /// given beside the key), from PostgreSQL when configured (the first store written), else
    /// MongoDB. A failure counts against that store's stage.
    async fn stored_messages(
        &self,
        keys: &[(MessageKey, &str)],
    ) -> Result<HashMap<MessageKey, StoredMessage>, StageError> {
        if let Some(postgres) = &self.postgres {
            return postgres.stored_messages(keys).await.map_err(|e| stage_error("postgres")(&e));
        }
        match &self.mongo {
            Some(mongo) => mongo.stored_messages(keys).await.map_err(|e| stage_error("mongo")(&e)),
            None => Ok(HashMap::new()),
        }
    }

    /// Gives every message without a seq the next seq of its session, or the seq it got on an
    /// earlier delivery. A session whose counter is missing (new, or Redis lost its data) is
    /// seeded from the highest seq in the stores. Messages the stores already hold carry
    /// their stored seq and take none.
    async fn assign_seqs(&self, messages: &mut [Message]) -> Result<(), StageError> {
        let mut sessions: Vec<(String, String, Vec<usize>)> = Vec::new();
        let mut session_of: HashMap<(&str, &str), usize> = HashMap::new();
        for (index, message) in messages.iter().enumerate() {
            if message.seq > 0 {
                continue;
            }
            let session = (message_tenant_id(message), message.session_id.as_str());
            let slot = *session_of.entry(session).or_insert_with(|| {
                sessions.push((session.0.to_owned(), session.1.to_owned(), Vec::new()));
                sessions.len() - 1
            });
            sessions[slot].2.push(index);
        }
        if sessions.is_empty() {
            return Ok(());
        }

        let request = |session: &(String, String, Vec<usize>), seed: Option<i64>| SeqRequest {
            keys: SessionKeys::new(&session.0, &session.1),
            message_ids: session.2.iter().map(|&index| messages[index].id.as_str()).collect(),
            seed,
        };
        let requests: Vec<SeqRequest<'_>> = sessions.iter().map(|session| request(session, None)).collect();
        let mut assigned = self.redis.assign_seqs(&requests).await.map_err(|e| stage_error("seq")(&e))?;

        let unseeded: Vec<usize> = (0..sessions.len()).filter(|&slot| assigned[slot].is_none()).collect();
        self.metrics.seq_counter_hits.inc_by((sessions.len() - unseeded.len()) as u64);
        self.metrics.seq_counter_misses.inc_by(unseeded.len() as u64);
        self.metrics.update_cache_hit_rate();
        if !unseeded.is_empty() {
            let session_keys: Vec<(String, String)> =
                unseeded.iter().map(|&slot| (sessions[slot].0.clone(), sessions[slot].1.clone())).collect();
            let max_seqs = self.max_seqs(&session_keys).await?;
            let seeded_requests: Vec<SeqRequest<'_>> = unseeded
                .iter()
                .zip(&session_keys)
                .map(|(&slot, key)| request(&sessions[slot], Some(max_seqs.get(key).copied().unwrap_or(0))))
                .collect();
            let seeded = self.redis.assign_seqs(&seeded_requests).await.map_err(|e| stage_error("seq")(&e))?;
            for (slot, seqs) in unseeded.into_iter().zip(seeded) {
                assigned[slot] = seqs;
            }
        }

        let updates: Vec<(usize, i64)> = sessions
            .iter()
            .zip(assigned)
            .flat_map(|(session, seqs)| session.2.iter().copied().zip(seqs.unwrap_or_default()))
            .collect();
        for (index, seq) in updates {
            messages[index].seq = seq;
        }
        if let Some(message) = messages.iter().find(|message| message.seq <= 0) {
            return Err(StageError { stage: "seq", message: format!("no seq assigned to message {}", message.id) });
        }
        Ok(())
    }

    /// The highest seq every store holds for each (tenant, session): one query per store for
    /// the whole batch.
    async fn max_seqs(&self, sessions: &[(String, String)]) -> Result<HashMap<(String, String), i64>, StageError> {
        let mut max_seqs: HashMap<(String, String), i64> = HashMap::new();
        let mut merge = |found: Vec<((String, String), i64)>| {
            for (session, max) in found {
                let current = max_seqs.entry(session).or_insert(0);
                *current = (*current).max(max);
            }
        };
        if let Some(postgres) = &self.postgres {
            merge(postgres.max_seqs(sessions).await.map_err(|e| stage_error("seq_seed")(&e))?);
        }
        if let Some(mongo) = &self.mongo {
            merge(mongo.max_seqs(sessions).await.map_err(|e| stage_error("seq_seed")(&e))?);
        }
        Ok(max_seqs)
    }

    /// Writes the batch to Postgres and MongoDB; returns the keys a database held before this
    /// batch (what this batch stored itself is recorded in `memory`). Afterwards `pending`
    /// holds only what is stored in every database: a message a database refuses is recorded
    /// in `memory` (and taken back from the database this batch stored it in), one found
    /// stored in another session (a resend racing its first copy) becomes a duplicate of it,
    /// and one already stored under another seq takes the stored seq.
    async fn store_in_databases(
        &self,
        pending: &mut Vec<Message>,
        decisions: &mut HashMap<MessageKey, Decision>,
        memory: &Memory,
    ) -> Result<HashSet<MessageKey>, StageError> {
        let mut stored_before = HashSet::new();
        if pending.is_empty() {
            return Ok(stored_before);
        }
        if let Some(postgres) = &self.postgres {
            let started = Instant::now();
            let written = remember(postgres.insert_batch(pending).await, memory, "postgres")?;
            refuse(pending, &written.refused, "postgres", memory);
            stored_before.extend(self.settle(pending, written.already_stored, decisions, memory, "postgres").await?);
            self.observe_stage("postgres", started);
            self.crash_point("postgres");
        }
        if let Some(mongo) = &self.mongo {
            let started = Instant::now();
            let result = mongo.insert_batch(pending).await;
            let written = if self.postgres.is_none() {
                remember(result, memory, "mongo")?
            } else {
                result.map_err(|partial| stage_error("mongo")(&partial))?
            };
            if !written.refused.is_empty()
                && let Some(postgres) = &self.postgres
            {
                let stored_now = lock(memory).stored.clone();
                let take_back: Vec<&Message> = written
                    .refused
                    .iter()
                    .map(|(index, _)| &pending[*index])
                    .filter(|message| stored_now.contains(&message_key(message)))
                    .collect();
                postgres.delete_refused(&take_back).await.map_err(|e| stage_error("mongo")(&e))?;
            }
            refuse(pending, &written.refused, "mongo", memory);
            if self.postgres.is_none() {
                stored_before.extend(self.settle(pending, written.already_stored, decisions, memory, "mongo").await?);
            }
            self.observe_stage("mongo", started);
            self.crash_point("mongo");
        }
        Ok(stored_before)
    }

    /// Handles the messages the first database already held when they were written, found
    /// only now (a resend racing its first copy, or a seq collision): one stored in another
    /// session becomes a duplicate of it and leaves `pending`; one stored in its own session
    /// takes the stored seq; one not stored under its id collided on its seq, and the counter
    /// is reseeded for the retry. Returns the keys stored before this batch.
    async fn settle(
        &self,
        pending: &mut Vec<Message>,
        already_stored: HashSet<MessageKey>,
        decisions: &mut HashMap<MessageKey, Decision>,
        memory: &Memory,
        stage: &'static str,
    ) -> Result<HashSet<MessageKey>, StageError> {
        if already_stored.is_empty() {
            return Ok(already_stored);
        }
        let lookups: Vec<(MessageKey, &str)> = pending
            .iter()
            .map(|message| (message_key(message), message.session_id.as_str()))
            .filter(|(key, _)| already_stored.contains(key))
            .collect();
        let stored = self.stored_messages(&lookups).await?;
        let conflicting: Vec<&MessageKey> = already_stored.iter().filter(|key| !stored.contains_key(*key)).collect();
        if !conflicting.is_empty() {
            self.reseed_after_conflict(pending, &conflicting).await?;
            return Err(StageError {
                stage,
                message: format!("{} message(s) hit a seq already in use; counters reseeded", conflicting.len()),
            });
        }
        pending.retain_mut(|message| {
            let key = message_key(message);
            let Some(found) = stored.get(&key) else { return true };
            if found.session_id != message.session_id {
                warn!(message_id = %message.id, session_id = %message.session_id, stored_session_id = %found.session_id, "message id already stored in another session; a duplicate");
                if let Some(decision) = decisions.get_mut(&key) {
                    decision.fate = Fate::StoredElsewhere(found.clone());
                }
                return false;
            }
            if found.seq > 0 && found.seq != message.seq {
                warn!(message_id = %message.id, assigned = message.seq, stored = found.seq, "message already stored with another seq; keeping the stored one");
                message.seq = found.seq;
            }
            true
        });
        let stored_by_this_batch = lock(memory).stored.clone();
        Ok(already_stored.into_iter().filter(|key| !stored_by_this_batch.contains(key)).collect())
    }

    /// A seq collided with another message's: the counter is behind the stores. Raise it above
    /// the stored maximum and forget the colliding assignments so the retry hands out new ones.
    async fn reseed_after_conflict(&self, pending: &[Message], conflicting: &[&MessageKey]) -> Result<(), StageError> {
        let postgres = self.postgres.as_ref().ok_or_else(|| StageError { stage: "seq", message: "no store".into() })?;
        let mut by_session: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
        for message in pending {
            let key = (message_tenant_id(message).to_owned(), message.id.clone());
            if conflicting.contains(&&key) {
                by_session
                    .entry((message_tenant_id(message), message.session_id.as_str()))
                    .or_default()
                    .push(&message.id);
            }
        }
        for ((tenant_id, session_id), ids) in by_session {
            let max_seq = postgres.max_seq(tenant_id, session_id).await.map_err(|e| stage_error("seq_seed")(&e))?;
            warn!(tenant_id, session_id, max_seq, "seq counter behind the stored messages; reseeding");
            self.redis
                .reseed(&SessionKeys::new(tenant_id, session_id), max_seq, &ids)
                .await
                .map_err(|e| stage_error("seq")(&e))?;
        }
        Ok(())
    }

    async fn cache_hot(&self, pending: &[Message]) -> redis::RedisResult<()> {
        write_hot_windows(&self.redis, pending).await
    }

    async fn update_session_states(&self, pending: &[Message]) -> redis::RedisResult<()> {
        write_session_states(&self.redis, pending).await
    }

    fn observe_stage(&self, stage: &'static str, started: Instant) {
        self.metrics.stage_latency.with_label_values(&[stage]).observe(started.elapsed().as_secs_f64());
    }

    fn crash_point(&self, stage: &str) {
        if self.crash_after_stage.as_deref() == Some(stage) {
            warn!(stage, "crash requested by WRITER_CRASH_AFTER_STAGE; aborting");
            std::process::abort();
        }
    }

    /// Runs `attempt` until it succeeds, backing off between failures. An attempt under way
    /// is allowed to finish so a shutdown still lands the batch in flight; after a failure,
    /// shutdown stops the retries. While attempts fail the writer reports itself not ready.
    async fn retry<T, F, Fut>(&self, shutdown: &CancellationToken, mut attempt: F) -> Result<T, Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StageError>>,
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
                    self.metrics.stage_errors.with_label_values(&[error.stage]).inc();
                    warn!(stage = error.stage, error = %error.message, retry_in_ms = delay.as_millis() as u64, "batch failed, retrying");
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

fn lock(memory: &Memory) -> std::sync::MutexGuard<'_, Learned> {
    memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The result of a database write, with what it stored — before a failure too — recorded in
/// `memory` as stored by this batch.
fn remember<E: std::error::Error>(
    result: Result<Written, Partial<E>>,
    memory: &Memory,
    stage: &'static str,
) -> Result<Written, StageError> {
    match result {
        Ok(written) => {
            lock(memory).stored.extend(written.inserted.iter().cloned());
            Ok(written)
        }
        Err(partial) => {
            lock(memory).stored.extend(partial.written.inserted.iter().cloned());
            Err(stage_error(stage)(&partial.error))
        }
    }
}

/// Records the messages at `refused` (indexes into `pending`) as refused by `store` and takes
/// them out of `pending`.
fn refuse(pending: &mut Vec<Message>, refused: &[(usize, String)], store: &str, memory: &Memory) {
    if refused.is_empty() {
        return;
    }
    if refused.len() == pending.len() && pending.len() > 1 {
        // Possible, but more likely the database or its schema does not match this version:
        // the records stay in the dead-letter topic to be replayed once that is fixed.
        error!(
            store,
            records = pending.len(),
            "the database refused every message of the batch; check its schema and settings"
        );
    }
    let mut memory = lock(memory);
    let mut gone = HashSet::new();
    for (index, reason) in refused {
        let Some(message) = pending.get(*index) else { continue };
        warn!(store, message_id = %message.id, session_id = %message.session_id, reason = %reason, "database refused a message; it will be dead-lettered");
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

/// The hot-cache stage: adds a batch's messages to their sessions' windows. Public so the
/// benchmarks drive Redis with exactly the writer's commands.
pub async fn write_hot_windows(redis: &RedisStore, pending: &[Message]) -> redis::RedisResult<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let sessions = group_by_session(pending)
        .into_iter()
        .map(|(keys, messages)| {
            let entries = messages
                .iter()
                .map(|message| HotEntry {
                    seq: message.seq,
                    message_id: &message.id,
                    timestamp_us: timestamp_us(message),
                    body: message.encode_to_vec(),
                })
                .collect();
            (keys, entries)
        })
        .collect::<Vec<_>>();
    redis.cache_hot(&sessions).await
}

/// The session-state stage: last message and seq of each session, and its senders' read seqs.
pub async fn write_session_states(redis: &RedisStore, pending: &[Message]) -> redis::RedisResult<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let sessions = group_by_session(pending)
        .into_iter()
        .map(|(keys, mut messages)| {
            messages.sort_by_key(|message| message.seq);
            let entries = messages
                .into_iter()
                .map(|message| StateEntry {
                    seq: message.seq,
                    message_id: &message.id,
                    sender_id: &message.sender_id,
                    message_type: message.message_type,
                    content_type: content_type(message),
                    timestamp_ms: message
                        .timestamp
                        .as_ref()
                        .and_then(to_datetime)
                        .map(|t| t.timestamp_millis())
                        .unwrap_or(0),
                })
                .collect();
            (keys, entries)
        })
        .collect::<Vec<_>>();
    redis.update_states(&sessions).await
}

/// Messages grouped by session, each group in batch order.
fn group_by_session(messages: &[Message]) -> Vec<(SessionKeys, Vec<&Message>)> {
    let mut groups: Vec<(SessionKeys, Vec<&Message>)> = Vec::new();
    let mut slot_of: HashMap<(&str, &str), usize> = HashMap::new();
    for message in messages {
        let session = (message_tenant_id(message), message.session_id.as_str());
        let slot = *slot_of.entry(session).or_insert_with(|| {
            groups.push((SessionKeys::new(session.0, session.1), Vec::new()));
            groups.len() - 1
        });
        groups[slot].1.push(message);
    }
    groups
}

fn timestamp_us(message: &Message) -> i64 {
    message.timestamp.as_ref().and_then(to_datetime).map(|time| time.timestamp_micros()).unwrap_or(0)
}

fn ingestion_ms(message: &Message) -> i64 {
    message
        .timeline
        .as_ref()
        .and_then(|timeline| timeline.ingestion_time.as_ref())
        .and_then(to_datetime)
        .map(|time| time.timestamp_millis())
        .unwrap_or(0)
}
