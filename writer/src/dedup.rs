//! Which message each record of a batch stands for, and what becomes of the record.
//!
//! A message is its (tenant, message id), unique within a tenant. Several records of a batch
//! may carry one id: a resend, a redelivery, the same id sent to another session. For each id
//! one record is the message's *representative*: when a database holds the id, the very record
//! that stored it (its origin), redelivered — its message is carried on as stored, its cache
//! stage run again — and when that record is not in the batch, none: every record is a second
//! sending of a stored message and nothing is written again. When no database holds the id, the
//! first record stores it. Every other record of the id is a duplicate of that message,
//! whatever session it names. Pure logic: the pipeline looks up the stored ids, and applies the
//! decisions.
//!
//! The databases carry idempotency: the id (and the Kafka record that stored it) is kept with
//! the message, so a redelivery is told from a second sending for as long as the message is
//! kept, and Redis holds no key per message.

use std::collections::{HashMap, HashSet};

use flare_storage_common::message::to_datetime;
use flare_storage_common::proto::storage::Message;

use crate::ack::AckStatus;
use crate::record::Origin;
use crate::store::{MessageKey, StoredMessage};

/// What becomes of a message of the batch.
#[derive(Debug, Clone)]
pub enum Fate {
    /// Stored by a record not in the batch (in whichever session): every record is a duplicate
    /// of it, and nothing is written again.
    Stored(StoredMessage),
    /// Persisted by this batch; `stored` when a database holds it already, in this session.
    Pending { stored: Option<StoredMessage> },
}

#[derive(Debug, Clone)]
pub struct Decision {
    /// Index in the batch of the record that stands for the message.
    pub representative: usize,
    pub fate: Fate,
}

/// One record of a batch, as deciding needs it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub key: &'a MessageKey,
    pub session_id: &'a str,
    pub origin: &'a Origin,
}

/// Decides every message of a batch. `records[i]` describes record `i`; `stored` holds what
/// the databases hold, by key. Messages in `refused` are left out.
pub fn decide(
    records: &[Candidate<'_>],
    stored: &HashMap<MessageKey, StoredMessage>,
    refused: &HashSet<MessageKey>,
) -> HashMap<MessageKey, Decision> {
    let mut records_of: HashMap<&MessageKey, Vec<usize>> = HashMap::new();
    for (index, record) in records.iter().enumerate() {
        if !refused.contains(record.key) {
            records_of.entry(record.key).or_default().push(index);
        }
    }
    records_of
        .into_iter()
        .map(|(key, indexes)| {
            let decision = match stored.get(key) {
                Some(found) => match indexes.iter().copied().find(|&index| stored_by(found, &records[index])) {
                    Some(index) => {
                        Decision { representative: index, fate: Fate::Pending { stored: Some(found.clone()) } }
                    }
                    None => Decision { representative: indexes[0], fate: Fate::Stored(found.clone()) },
                },
                None => Decision { representative: indexes[0], fate: Fate::Pending { stored: None } },
            };
            (key.clone(), decision)
        })
        .collect()
}

/// Whether `record` is the one that stored `found`: its origin, in its session. A message stored
/// by a version that kept no origin is taken for a redelivery of the first record in its
/// session.
pub fn stored_by(found: &StoredMessage, record: &Candidate<'_>) -> bool {
    record.session_id == found.session_id && found.origin.as_ref().is_none_or(|origin| origin == record.origin)
}

/// How one record of the batch ended, for its ACK and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<'a> {
    pub status: AckStatus,
    /// The session of the message as stored (for a duplicate, maybe not the record's).
    pub session_id: &'a str,
    pub seq: i64,
    /// Epoch milliseconds.
    pub persisted_ms: i64,
    /// A store held the message before this record.
    pub deduplicated: bool,
    /// The record was delivered again after its message was stored.
    pub redelivery: bool,
}

/// What became of record `index`, decided by `decision`: `persisted` is the message as
/// persisted by this batch (`None` when it was not), `stored_before` whether a database held
/// the message before this batch (the representative is then its origin, redelivered).
pub fn outcome<'a>(
    index: usize,
    decision: &'a Decision,
    persisted: Option<&'a Message>,
    stored_before: bool,
) -> Option<Outcome<'a>> {
    Some(match &decision.fate {
        Fate::Stored(found) => Outcome {
            status: AckStatus::Duplicate,
            session_id: &found.session_id,
            seq: found.seq,
            persisted_ms: found.persisted_ms,
            deduplicated: true,
            redelivery: false,
        },
        Fate::Pending { .. } => {
            let message = persisted?;
            let representative = index == decision.representative;
            Outcome {
                status: if representative { AckStatus::Persisted } else { AckStatus::Duplicate },
                session_id: &message.session_id,
                seq: message.seq,
                persisted_ms: persisted_ms(message),
                deduplicated: !representative || stored_before,
                redelivery: representative && stored_before,
            }
        }
    })
}

/// When a message was persisted, by its timeline (epoch milliseconds).
pub fn persisted_ms(message: &Message) -> i64 {
    message
        .timeline
        .as_ref()
        .and_then(|timeline| timeline.persisted_time.as_ref())
        .and_then(to_datetime)
        .map_or(0, |time| time.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> MessageKey {
        ("t".to_owned(), id.to_owned())
    }

    fn at(offset: i64) -> Origin {
        Origin { topic: "in".into(), partition: 0, offset }
    }

    fn stored_in(session: &str, seq: i64, origin: Option<Origin>) -> StoredMessage {
        StoredMessage { session_id: session.into(), seq, persisted_ms: 5, payload: None, origin }
    }

    /// Records `(id, session)` at offsets 0, 1, ….
    fn decide_for(records: &[(&str, &str)], stored: &[(&str, StoredMessage)]) -> HashMap<MessageKey, Decision> {
        let keys: Vec<MessageKey> = records.iter().map(|(id, _)| key(id)).collect();
        let origins: Vec<Origin> = (0..records.len() as i64).map(at).collect();
        let records: Vec<Candidate<'_>> = keys
            .iter()
            .zip(records)
            .zip(&origins)
            .map(|((key, (_, session_id)), origin)| Candidate { key, session_id, origin })
            .collect();
        let stored = stored.iter().map(|(id, found)| (key(id), found.clone())).collect();
        decide(&records, &stored, &HashSet::new())
    }

    #[test]
    fn a_new_message_is_represented_by_its_first_record() {
        let decisions = decide_for(&[("x", "s1"), ("x", "s2"), ("y", "s1")], &[]);
        assert_eq!(decisions[&key("x")].representative, 0);
        assert!(matches!(decisions[&key("x")].fate, Fate::Pending { stored: None }));
        assert_eq!(decisions[&key("y")].representative, 2);
    }

    #[test]
    fn the_record_that_stored_the_message_stands_for_it_whatever_comes_first() {
        // x resent to s2 (offset 0), then offset 1, which stored x in s1, redelivered.
        let decisions = decide_for(&[("x", "s2"), ("x", "s1")], &[("x", stored_in("s1", 4, Some(at(1))))]);
        let x = &decisions[&key("x")];
        assert_eq!(x.representative, 1);
        assert!(matches!(&x.fate, Fate::Pending { stored: Some(found) } if found.seq == 4));
        // Offsets 0 and 1 both carry x in s1; the database names offset 1.
        let decisions = decide_for(&[("x", "s1"), ("x", "s1")], &[("x", stored_in("s1", 4, Some(at(1))))]);
        assert_eq!(decisions[&key("x")].representative, 1);
    }

    #[test]
    fn records_that_did_not_store_the_message_are_second_sendings_and_write_nothing() {
        // In its own session but from other records, or in another session.
        for session in ["s1", "s2"] {
            let decisions = decide_for(&[("x", session), ("x", "s3")], &[("x", stored_in("s1", 4, Some(at(9))))]);
            assert!(
                matches!(&decisions[&key("x")].fate, Fate::Stored(found) if found.session_id == "s1" && found.seq == 4),
                "{session}"
            );
        }
    }

    #[test]
    fn a_message_stored_without_an_origin_is_taken_for_a_redelivery_in_its_session() {
        let decisions = decide_for(&[("x", "s2"), ("x", "s1"), ("x", "s1")], &[("x", stored_in("s1", 4, None))]);
        let x = &decisions[&key("x")];
        assert_eq!(x.representative, 1);
        assert!(matches!(&x.fate, Fate::Pending { stored: Some(_) }));
        let decisions = decide_for(&[("x", "s2")], &[("x", stored_in("s1", 4, None))]);
        assert!(matches!(&decisions[&key("x")].fate, Fate::Stored(_)));
    }

    #[test]
    fn refused_messages_are_left_out() {
        let keys = [key("x")];
        let origin = at(0);
        let records = [Candidate { key: &keys[0], session_id: "s1", origin: &origin }];
        let refused = HashSet::from([key("x")]);
        assert!(decide(&records, &HashMap::new(), &refused).is_empty());
    }

    #[test]
    fn outcomes_follow_the_decision() {
        let message = Message { id: "x".into(), session_id: "s1".into(), seq: 3, ..Default::default() };
        let pending = Decision { representative: 0, fate: Fate::Pending { stored: None } };
        let first = outcome(0, &pending, Some(&message), false).expect("persisted");
        assert_eq!((first.status, first.deduplicated, first.redelivery), (AckStatus::Persisted, false, false));
        let copy = outcome(1, &pending, Some(&message), false).expect("a copy");
        assert_eq!((copy.status, copy.seq, copy.deduplicated), (AckStatus::Duplicate, 3, true));
        assert_eq!(outcome(0, &pending, None, false), None, "not persisted: no outcome");

        let redelivered =
            Decision { representative: 0, fate: Fate::Pending { stored: Some(stored_in("s1", 3, Some(at(0)))) } };
        let again = outcome(0, &redelivered, Some(&message), true).expect("redelivery");
        assert_eq!((again.status, again.deduplicated, again.redelivery), (AckStatus::Persisted, true, true));

        let stored = Decision { representative: 0, fate: Fate::Stored(stored_in("s9", 8, Some(at(5)))) };
        let duplicate = outcome(0, &stored, None, false).expect("duplicate");
        assert_eq!(
            (duplicate.status, duplicate.session_id, duplicate.seq, duplicate.redelivery),
            (AckStatus::Duplicate, "s9", 8, false)
        );
    }

    #[test]
    fn the_same_position_of_another_topic_is_another_record() {
        let found = stored_in("s1", 4, Some(at(7)));
        let key = key("x");
        let other_topic = Origin { topic: "other".into(), ..at(7) };
        assert!(stored_by(&found, &Candidate { key: &key, session_id: "s1", origin: &at(7) }));
        assert!(!stored_by(&found, &Candidate { key: &key, session_id: "s1", origin: &other_topic }));
        assert!(!stored_by(&found, &Candidate { key: &key, session_id: "s1", origin: &at(8) }));
    }
}
