//! Per-session sequence numbers: 1, 2, 3… in partition order, the same on every delivery.
//!
//! A message without a seq gets the next one of its (tenant, session), or the one it got on an
//! earlier delivery (Redis remembers message id → seq until the message is durable). A session
//! whose counter is missing (new, or Redis lost its data) is seeded from the highest seq in the
//! databases, atomically, before the next one is handed out (open-im-server#3249, #3436).
//! Messages a database already holds carry their stored seq and take none. When the counter
//! went backwards anyway (Redis restored from an old snapshot), PostgreSQL's id index
//! (`message_ids`, unique on tenant, session and seq, in every table layout) refuses the collision and [`reseed_after_conflict`] raises the counter
//! above the stored maximum for the retry.

use std::collections::HashMap;

use flare_storage_common::keys::SessionKeys;
use flare_storage_common::message::message_tenant_id;
use flare_storage_common::proto::storage::Message;
use tracing::warn;

use crate::error::{Cause, Error, Stage};
use crate::metrics::Metrics;
use crate::store::redis::SeqRequest;
use crate::store::{MessageKey, Stores, message_key};

/// Gives every message of `messages` without a seq its seq (see the module header).
pub async fn assign(stores: &Stores, metrics: &Metrics, messages: &mut [Message]) -> Result<(), Error> {
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
    let mut assigned = stores.redis.assign_seqs(&requests).await.map_err(Error::at(Stage::Seq))?;

    let unseeded: Vec<usize> = (0..sessions.len()).filter(|&slot| assigned[slot].is_none()).collect();
    metrics.seq_counter_hits.inc_by((sessions.len() - unseeded.len()) as u64);
    metrics.seq_counter_misses.inc_by(unseeded.len() as u64);
    metrics.update_cache_hit_rate();
    if !unseeded.is_empty() {
        let session_keys: Vec<(String, String)> =
            unseeded.iter().map(|&slot| (sessions[slot].0.clone(), sessions[slot].1.clone())).collect();
        let max_seqs = stores.max_seqs(&session_keys).await?;
        let seeded_requests: Vec<SeqRequest<'_>> = unseeded
            .iter()
            .zip(&session_keys)
            .map(|(&slot, key)| request(&sessions[slot], Some(max_seqs.get(key).copied().unwrap_or(0))))
            .collect();
        let seeded = stores.redis.assign_seqs(&seeded_requests).await.map_err(Error::at(Stage::Seq))?;
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
        return Err(Error::Stage { stage: Stage::Seq, cause: Cause::NoSeq(message.id.clone()) });
    }
    Ok(())
}

/// A seq collided with another message's: the counter is behind the stores. Raises it above
/// the stored maximum and forgets the colliding assignments so the retry hands out new ones.
/// Returns the error that makes the batch retry.
pub async fn reseed_after_conflict<'a>(
    stores: &Stores,
    pending: impl IntoIterator<Item = &'a Message>,
    conflicting: &[&MessageKey],
) -> Error {
    let conflict = Error::Stage { stage: Stage::Postgres, cause: Cause::SeqConflict(conflicting.len()) };
    let Some(postgres) = &stores.postgres else { return conflict };
    let mut by_session: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for message in pending {
        if conflicting.contains(&&message_key(message)) {
            by_session.entry((message_tenant_id(message), message.session_id.as_str())).or_default().push(&message.id);
        }
    }
    for ((tenant_id, session_id), ids) in by_session {
        let max_seq = match postgres.max_seq(tenant_id, session_id).await {
            Ok(max_seq) => max_seq,
            Err(error) => return Error::at(Stage::SeqSeed)(error),
        };
        warn!(tenant_id, session_id, max_seq, "seq counter behind the stored messages; reseeding");
        if let Err(error) = stores.redis.reseed(&SessionKeys::new(tenant_id, session_id), max_seq, &ids).await {
            return Error::at(Stage::Seq)(error);
        }
    }
    conflict
}
