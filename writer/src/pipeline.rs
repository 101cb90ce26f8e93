//! What happens to one batch of records.
//!
//! 1. Decode and validate each record; what can never be stored goes to the dead-letter topic.
//! 2. Persist the rest, as one unit that is repeated whole until it succeeds (every step is
//!    idempotent, so a repeat after any failure has no second effect):
//!    idempotency markers → per-session seq → Postgres → MongoDB → hot cache → session state
//!    → user cursors → WAL entry removal → ACKs → done markers.
//!
//! Postgres comes before MongoDB because its unique (tenant, session, seq) index is the guard
//! that catches a seq counter that went backwards (Redis restored from an old snapshot); the
//! seqs are corrected before anything else sees them. The hot cache is written after the
//! databases so it never shows a message that is not durable. The done marker is written last:
//! a crash anywhere before it means the batch is redelivered and completed, never reported as a
//! duplicate. Until a batch is finished the consumer fetches nothing new, which bounds memory
//! while a store is down.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flare_storage_common::keys::SessionKeys;
use flare_storage_common::message::{
    InvalidMessage, content_type, message_tenant_id, normalize, to_datetime, to_timestamp,
};
use flare_storage_common::ops::Readiness;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{Message, StoreMessageRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::ack::{Ack, AckStatus, Acks};
use crate::consumer::Record;
use crate::deadletter::DeadLetters;
use crate::metrics::Metrics;
use crate::store::mongo::MongoStore;
use crate::store::postgres::{MessageKey, PostgresStore};
use crate::store::redis::{Done, HotEntry, RedisStore, Seed, SeqRequest, StateEntry};

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

impl Pipeline {
    /// Makes every record of `records` durable. Returns `Err(Interrupted)` only on shutdown.
    pub async fn process(&self, records: &[Record], shutdown: &CancellationToken) -> Result<(), Interrupted> {
        self.metrics.batch_size.observe(records.len() as f64);
        let ingested_at = Utc::now();
        let mut messages = Vec::with_capacity(records.len());
        let mut origins = Vec::with_capacity(records.len());
        for record in records {
            match self.decode(record, ingested_at) {
                Ok(message) => {
                    messages.push(message);
                    origins.push((record.partition, record.offset));
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
        let persisted = self.retry(shutdown, || self.persist(&messages, topic, &origins)).await?;
        self.metrics.write_latency.observe(started.elapsed().as_secs_f64());
        self.metrics.processed.inc_by(persisted.stored as u64);
        self.metrics.duplicated.inc_by(persisted.duplicates as u64);
        self.metrics.redelivered.inc_by(persisted.redelivered as u64);
        debug!(stored = persisted.stored, duplicates = persisted.duplicates, "batch persisted");
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
        warn!(topic = %record.topic, partition = record.partition, offset = record.offset, reason = %reason, "dead-lettering record");
        self.retry(shutdown, || async {
            self.dead_letters.send(record, &reason).await.map_err(|error| stage_error("dead_letter")(&error))
        })
        .await?;
        self.metrics.dead_lettered.with_label_values(&[rejection.kind()]).inc();
        Ok(())
    }

    /// One attempt at every persistence stage for a batch of valid messages; `origins[i]` is
    /// the (partition, offset) in `topic` of the record of `batch[i]`.
    async fn persist(&self, batch: &[Message], topic: &str, origins: &[(i32, i64)]) -> Result<Persisted, StageError> {
        let keys: Vec<MessageKey> =
            batch.iter().map(|message| (message_tenant_id(message).to_owned(), message.id.clone())).collect();

        // A message appearing twice in one batch is handled once; later copies are duplicates.
        let mut first_of: HashMap<&MessageKey, usize> = HashMap::new();
        let mut unique = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            if !first_of.contains_key(key) {
                first_of.insert(key, index);
                unique.push(index);
            }
        }

        // Idempotency: a message with a done marker is already durable everywhere.
        let started = Instant::now();
        let marker_keys: Vec<(SessionKeys, &str)> = unique
            .iter()
            .map(|&index| {
                let message = &batch[index];
                (SessionKeys::new(message_tenant_id(message), &message.session_id), message.id.as_str())
            })
            .collect();
        let markers = self.redis.done_markers(&marker_keys).await.map_err(|e| stage_error("idempotency")(&e))?;
        self.observe_stage("idempotency", started);
        let mut done: HashMap<usize, Done> = HashMap::new();
        let mut pending: Vec<Message> = Vec::new();
        let mut pending_index: HashMap<usize, usize> = HashMap::new();
        for (&index, marker) in unique.iter().zip(markers) {
            match marker {
                Some(marker) => {
                    done.insert(index, marker);
                }
                None => {
                    pending_index.insert(index, pending.len());
                    pending.push(batch[index].clone());
                }
            }
        }

        let started = Instant::now();
        self.assign_seqs(&mut pending).await?;
        self.observe_stage("seq", started);
        self.crash_point("seq");

        let persisted_at = Utc::now();
        for message in &mut pending {
            message.timeline.get_or_insert_with(Default::default).persisted_time = Some(to_timestamp(persisted_at));
        }
        let already_stored = self.store_in_databases(&mut pending).await?;

        let started = Instant::now();
        self.cache_hot(&pending).await.map_err(|e| stage_error("cache")(&e))?;
        self.observe_stage("cache", started);
        self.crash_point("cache");

        let started = Instant::now();
        self.update_session_states(&pending).await.map_err(|e| stage_error("session_state")(&e))?;
        self.observe_stage("session_state", started);

        let started = Instant::now();
        self.advance_cursors(&pending).await.map_err(|e| stage_error("cursors")(&e))?;
        self.observe_stage("cursors", started);
        self.crash_point("cursors");

        if let Some(wal_key) = &self.wal_hash_key {
            let started = Instant::now();
            let ids: HashSet<&str> = batch.iter().map(|message| message.id.as_str()).collect();
            let ids: Vec<&str> = ids.into_iter().collect();
            self.redis.remove_from_wal(wal_key, &ids).await.map_err(|e| stage_error("wal")(&e))?;
            self.observe_stage("wal", started);
        }

        let persisted_ms = persisted_at.timestamp_millis();
        // A marker left by this very record (same topic, partition and offset) means a
        // redelivery of completed work, not a second sending of the message.
        let redelivery = |index: usize, marker: &Done| marker.left_by(topic, origins.get(index).copied());
        let redelivered = done.iter().filter(|(index, marker)| redelivery(**index, marker)).count();
        if let Some(acks) = &self.acks {
            let started = Instant::now();
            let mut events = Vec::with_capacity(batch.len());
            for (index, key) in keys.iter().enumerate() {
                let first = first_of[key];
                let (message, status, seq, persisted_ts, deduplicated) =
                    match (done.get(&first), pending_index.get(&first)) {
                        (Some(marker), _) if index == first && redelivery(index, marker) => {
                            (&batch[index], AckStatus::Persisted, marker.seq, marker.persisted_ms, true)
                        }
                        (Some(marker), _) => {
                            (&batch[index], AckStatus::Duplicate, marker.seq, marker.persisted_ms, true)
                        }
                        (None, Some(&position)) => {
                            let message = &pending[position];
                            let copy = index != first;
                            let status = if copy { AckStatus::Duplicate } else { AckStatus::Persisted };
                            (message, status, message.seq, persisted_ms, copy || already_stored.contains(key))
                        }
                        (None, None) => continue,
                    };
                events.push(Ack {
                    message_id: message.id.clone(),
                    session_id: message.session_id.clone(),
                    status,
                    ingestion_ts: ingestion_ms(message),
                    persisted_ts,
                    deduplicated,
                    tenant_id: key.0.clone(),
                    seq,
                });
            }
            acks.publish(&events).await.map_err(|e| stage_error("ack")(&e))?;
            self.observe_stage("ack", started);
            self.crash_point("ack");
        }

        let started = Instant::now();
        let mut markers: Vec<(SessionKeys, &str, Done)> = Vec::with_capacity(pending.len());
        for (&index, &position) in &pending_index {
            let message = &pending[position];
            let keys = SessionKeys::new(message_tenant_id(message), &message.session_id);
            let origin = origins.get(index).copied();
            let topic = Some(topic.to_owned());
            markers.push((keys, message.id.as_str(), Done { seq: message.seq, persisted_ms, origin, topic }));
        }
        self.redis.mark_done(&markers).await.map_err(|e| stage_error("mark_done")(&e))?;
        self.observe_stage("mark_done", started);

        Ok(Persisted { stored: pending.len(), duplicates: batch.len() - pending.len() - redelivered, redelivered })
    }

    /// Gives every message without an upstream seq the next seq of its session, or the seq it
    /// got on an earlier delivery. A session whose counter is missing (new, or Redis lost its
    /// data) is seeded from the highest seq in the stores, and messages the stores already
    /// hold keep their stored seq.
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

        let request = |session: &(String, String, Vec<usize>), seed: Option<Seed>| SeqRequest {
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
            let ids: Vec<Vec<MessageKey>> = unseeded
                .iter()
                .map(|&slot| {
                    sessions[slot]
                        .2
                        .iter()
                        .map(|&index| (sessions[slot].0.clone(), messages[index].id.clone()))
                        .collect()
                })
                .collect();
            let mut seeds = self.seeds(&session_keys, &ids).await?;
            let seeded_requests: Vec<SeqRequest<'_>> = unseeded
                .iter()
                .zip(&session_keys)
                .map(|(&slot, key)| request(&sessions[slot], Some(seeds.remove(key).unwrap_or_default())))
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

    /// For each session, the highest stored seq and the stored seqs of its messages
    /// (`ids[i]` belongs to `sessions[i]`), from every store: one query per store and kind
    /// for the whole batch.
    async fn seeds(
        &self,
        sessions: &[(String, String)],
        ids: &[Vec<MessageKey>],
    ) -> Result<HashMap<(String, String), Seed>, StageError> {
        let mut seeds: HashMap<(String, String), Seed> =
            sessions.iter().map(|session| (session.clone(), Seed::default())).collect();
        let all_ids: Vec<MessageKey> = ids.iter().flatten().cloned().collect();
        let mut known: HashMap<MessageKey, i64> = HashMap::new();
        if let Some(postgres) = &self.postgres {
            for (session, max) in postgres.max_seqs(sessions).await.map_err(|e| stage_error("seq_seed")(&e))? {
                if let Some(seed) = seeds.get_mut(&session) {
                    seed.max_seq = seed.max_seq.max(max);
                }
            }
            known = postgres.stored_seqs(&all_ids).await.map_err(|e| stage_error("seq_seed")(&e))?;
        }
        if let Some(mongo) = &self.mongo {
            for (session, max) in mongo.max_seqs(sessions).await.map_err(|e| stage_error("seq_seed")(&e))? {
                if let Some(seed) = seeds.get_mut(&session) {
                    seed.max_seq = seed.max_seq.max(max);
                }
            }
            if self.postgres.is_none() {
                known = mongo.stored_seqs(&all_ids).await.map_err(|e| stage_error("seq_seed")(&e))?;
            }
        }
        // A message the stores already hold keeps its seq.
        for (session, keys) in sessions.iter().zip(ids) {
            let Some(seed) = seeds.get_mut(session) else { continue };
            for key in keys {
                if let Some(&seq) = known.get(key)
                    && seq > 0
                {
                    seed.known.insert(key.1.clone(), seq);
                }
            }
        }
        Ok(seeds)
    }

    /// Writes the batch to Postgres and MongoDB; returns the keys that a store already held.
    /// A message already stored under another seq takes the stored one.
    async fn store_in_databases(&self, pending: &mut [Message]) -> Result<HashSet<MessageKey>, StageError> {
        let mut already_stored = HashSet::new();
        if pending.is_empty() {
            return Ok(already_stored);
        }
        if let Some(postgres) = &self.postgres {
            let started = Instant::now();
            let inserted = postgres.insert_batch(pending).await.map_err(|e| stage_error("postgres")(&e))?;
            let not_inserted: Vec<MessageKey> = pending
                .iter()
                .map(|message| (message_tenant_id(message).to_owned(), message.id.clone()))
                .filter(|key| !inserted.contains(key))
                .collect();
            if !not_inserted.is_empty() {
                let stored = postgres.stored_seqs(&not_inserted).await.map_err(|e| stage_error("postgres")(&e))?;
                let conflicting: Vec<&MessageKey> =
                    not_inserted.iter().filter(|key| !stored.contains_key(*key)).collect();
                if !conflicting.is_empty() {
                    self.reseed_after_conflict(pending, &conflicting).await?;
                    return Err(StageError {
                        stage: "postgres",
                        message: format!(
                            "{} message(s) hit a seq already in use; counters reseeded",
                            conflicting.len()
                        ),
                    });
                }
                take_stored_seqs(pending, &stored);
                already_stored.extend(stored.into_keys());
            }
            self.observe_stage("postgres", started);
            self.crash_point("postgres");
        }
        if let Some(mongo) = &self.mongo {
            let started = Instant::now();
            let existing = mongo.insert_batch(pending).await.map_err(|e| stage_error("mongo")(&e))?;
            if self.postgres.is_none() && !existing.is_empty() {
                let keys: Vec<MessageKey> = existing.iter().cloned().collect();
                let stored = mongo.stored_seqs(&keys).await.map_err(|e| stage_error("mongo")(&e))?;
                take_stored_seqs(pending, &stored);
            }
            already_stored.extend(existing);
            self.observe_stage("mongo", started);
            self.crash_point("mongo");
        }
        Ok(already_stored)
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

    async fn advance_cursors(&self, pending: &[Message]) -> redis::RedisResult<()> {
        write_cursors(&self.redis, pending).await
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

/// Takes the seq a store already holds for a message over the one just assigned.
fn take_stored_seqs(pending: &mut [Message], stored: &HashMap<MessageKey, i64>) {
    for message in pending {
        let key = (message_tenant_id(message).to_owned(), message.id.clone());
        if let Some(&seq) = stored.get(&key)
            && seq > 0
            && seq != message.seq
        {
            warn!(message_id = %message.id, assigned = message.seq, stored = seq, "message already stored with another seq; keeping the stored one");
            message.seq = seq;
        }
    }
}

/// Messages grouped by session, each group in batch order.
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

/// The session-state stage: last message, seq and unread counts of each session.
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
                    receivers: receivers(message),
                })
                .collect();
            (keys, entries)
        })
        .collect::<Vec<_>>();
    redis.update_states(&sessions).await
}

/// The cursor stage: every member's position in each session of the batch.
pub async fn write_cursors(redis: &RedisStore, pending: &[Message]) -> redis::RedisResult<()> {
    // One update per (user, session) per batch: the highest seq the user now has there.
    let mut positions: HashMap<(&str, &str, &str), i64> = HashMap::new();
    for message in pending {
        let tenant_id = message_tenant_id(message);
        let users =
            std::iter::once(message.sender_id.as_str()).chain(receivers(message)).filter(|user| !user.is_empty());
        for user in users {
            let position = positions.entry((tenant_id, user, message.session_id.as_str())).or_insert(0);
            *position = (*position).max(message.seq);
        }
    }
    let cursors: Vec<(&str, &str, &str, i64)> =
        positions.into_iter().map(|((tenant, user, session), seq)| (tenant, user, session, seq)).collect();
    redis.advance_cursors(&cursors).await
}

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

/// Everyone a message is addressed to, once each, without its sender.
fn receivers(message: &Message) -> Vec<&str> {
    let mut receivers: Vec<&str> = message
        .receiver_ids
        .iter()
        .chain(std::iter::once(&message.receiver_id))
        .map(String::as_str)
        .filter(|receiver| !receiver.is_empty() && *receiver != message.sender_id)
        .collect();
    // Groups have hundreds of members: sort + dedup rather than a quadratic scan.
    receivers.sort_unstable();
    receivers.dedup();
    receivers
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receivers_are_unique_and_exclude_the_sender() {
        let message = Message {
            sender_id: "a".into(),
            receiver_id: "b".into(),
            receiver_ids: vec!["a".into(), "b".into(), "c".into(), "".into()],
            ..Default::default()
        };
        assert_eq!(receivers(&message), ["b", "c"]);
    }
}
