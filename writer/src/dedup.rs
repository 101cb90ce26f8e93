//! Which message each record of a batch stands for, and what becomes of the record.
//!
//! A message is its (tenant, message id), unique within a tenant. Several records of a batch
//! may carry one id: a resend, a redelivery, the same id sent to another session. For each id
//! one record is the message's *representative*: the one completed earlier (the done marker
//! left in its session says so), else the one in the session a database holds the id in,
//! else the first. Every other record of the id is a duplicate of that message, whatever
//! session it names. Pure logic: the pipeline looks up markers and stored ids, and applies
//! the decisions.

use std::collections::{HashMap, HashSet};

use flare_storage_common::message::to_datetime;
use flare_storage_common::proto::storage::Message;

use crate::ack::AckStatus;
use crate::store::redis::Done;
use crate::store::{MessageKey, StoredMessage};

/// What becomes of a message of the batch.
#[derive(Debug, Clone)]
pub enum Fate {
    /// Completed earlier: its done marker says so.
    Done(Done),
    /// Stored in a session none of its records name: every record is a duplicate of it.
    StoredElsewhere(StoredMessage),
    /// Persisted by this batch; `stored` when a database holds it already, in this session.
    Pending { stored: Option<StoredMessage> },
}

#[derive(Debug, Clone)]
pub struct Decision {
    /// Index in the batch of the record that stands for the message.
    pub representative: usize,
    pub fate: Fate,
}

/// Decides every message of a batch. `records[i]` is the key and session of record `i`;
/// `markers` holds the done markers found, by key and session; `stored` what the databases
/// hold, by key. Messages in `refused` are left out.
pub fn decide(
    records: &[(&MessageKey, &str)],
    markers: &HashMap<(MessageKey, String), Done>,
    stored: &HashMap<MessageKey, StoredMessage>,
    refused: &HashSet<MessageKey>,
) -> HashMap<MessageKey, Decision> {
    let mut records_of: HashMap<&MessageKey, Vec<usize>> = HashMap::new();
    for (index, (key, _)) in records.iter().enumerate() {
        if !refused.contains(*key) {
            records_of.entry(key).or_default().push(index);
        }
    }
    let session = |index: usize| records[index].1;
    records_of
        .into_iter()
        .map(|(key, indexes)| {
            let first = indexes[0];
            let marked = indexes
                .iter()
                .find_map(|&index| markers.get(&(key.clone(), session(index).to_owned())).map(|done| (index, done)));
            let decision = match (marked, stored.get(key)) {
                (Some((index, done)), _) => Decision { representative: index, fate: Fate::Done(done.clone()) },
                (None, Some(found)) => match indexes.iter().find(|&&index| session(index) == found.session_id) {
                    Some(&index) => {
                        Decision { representative: index, fate: Fate::Pending { stored: Some(found.clone()) } }
                    }
                    None => Decision { representative: first, fate: Fate::StoredElsewhere(found.clone()) },
                },
                (None, None) => Decision { representative: first, fate: Fate::Pending { stored: None } },
            };
            (key.clone(), decision)
        })
        .collect()
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

/// What became of record `index`, decided by `decision`: `representative_session` is the
/// session of the decision's representative record, `persisted` the message as persisted by
/// this batch (`None` when it was not), `left_by_this_record` whether a done marker names this
/// very record (same topic, partition and offset), `stored_before` whether a database held
/// the message before this batch.
pub fn outcome<'a>(
    index: usize,
    decision: &'a Decision,
    representative_session: &'a str,
    persisted: Option<&'a Message>,
    left_by_this_record: bool,
    stored_before: bool,
) -> Option<Outcome<'a>> {
    let representative = index == decision.representative;
    Some(match &decision.fate {
        Fate::Done(marker) => {
            let redelivery = representative && left_by_this_record;
            Outcome {
                status: if redelivery { AckStatus::Persisted } else { AckStatus::Duplicate },
                session_id: representative_session,
                seq: marker.seq,
                persisted_ms: marker.persisted_ms,
                deduplicated: true,
                redelivery,
            }
        }
        Fate::StoredElsewhere(found) => Outcome {
            status: AckStatus::Duplicate,
            session_id: &found.session_id,
            seq: found.seq,
            persisted_ms: found.persisted_ms,
            deduplicated: true,
            redelivery: false,
        },
        Fate::Pending { .. } => {
            let message = persisted?;
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

    fn stored_in(session: &str, seq: i64) -> StoredMessage {
        StoredMessage { session_id: session.into(), seq, persisted_ms: 5, payload: None }
    }

    fn done(seq: i64) -> Done {
        Done { seq, persisted_ms: 7, origin: Some((0, 1)), topic: Some("in".into()) }
    }

    fn decide_for(
        records: &[(&str, &str)],
        markers: &[(&str, &str, Done)],
        stored: &[(&str, StoredMessage)],
    ) -> HashMap<MessageKey, Decision> {
        let keys: Vec<MessageKey> = records.iter().map(|(id, _)| key(id)).collect();
        let records: Vec<(&MessageKey, &str)> = keys.iter().zip(records).map(|(key, (_, s))| (key, *s)).collect();
        let markers = markers.iter().map(|(id, s, done)| ((key(id), (*s).to_owned()), done.clone())).collect();
        let stored = stored.iter().map(|(id, found)| (key(id), found.clone())).collect();
        decide(&records, &markers, &stored, &HashSet::new())
    }

    #[test]
    fn a_new_message_is_represented_by_its_first_record() {
        let decisions = decide_for(&[("x", "s1"), ("x", "s2"), ("y", "s1")], &[], &[]);
        assert_eq!(decisions[&key("x")].representative, 0);
        assert!(matches!(decisions[&key("x")].fate, Fate::Pending { stored: None }));
        assert_eq!(decisions[&key("y")].representative, 2);
    }

    #[test]
    fn the_record_in_the_stored_session_stands_for_the_message_whatever_comes_first() {
        // x resent to s2, then redelivered in s1 where an earlier attempt stored it.
        let decisions = decide_for(&[("x", "s2"), ("x", "s1")], &[], &[("x", stored_in("s1", 4))]);
        let x = &decisions[&key("x")];
        assert_eq!(x.representative, 1);
        assert!(matches!(&x.fate, Fate::Pending { stored: Some(found) } if found.seq == 4));
    }

    #[test]
    fn an_id_stored_in_a_session_no_record_names_makes_every_record_a_duplicate() {
        let decisions = decide_for(&[("x", "s2"), ("x", "s3")], &[], &[("x", stored_in("s1", 4))]);
        assert!(matches!(&decisions[&key("x")].fate, Fate::StoredElsewhere(found) if found.session_id == "s1"));
    }

    #[test]
    fn a_done_marker_decides_first() {
        let decisions = decide_for(&[("x", "s2"), ("x", "s1")], &[("x", "s1", done(4))], &[("x", stored_in("s1", 4))]);
        let x = &decisions[&key("x")];
        assert_eq!(x.representative, 1);
        assert!(matches!(&x.fate, Fate::Done(marker) if marker.seq == 4));
    }

    #[test]
    fn refused_messages_are_left_out() {
        let keys = [key("x")];
        let records = [(&keys[0], "s1")];
        let refused = HashSet::from([key("x")]);
        assert!(decide(&records, &HashMap::new(), &HashMap::new(), &refused).is_empty());
    }

    #[test]
    fn outcomes_follow_the_decision() {
        let message = Message { id: "x".into(), session_id: "s1".into(), seq: 3, ..Default::default() };
        let pending = Decision { representative: 0, fate: Fate::Pending { stored: None } };
        let first = outcome(0, &pending, "s1", Some(&message), false, false).expect("persisted");
        assert_eq!((first.status, first.deduplicated, first.redelivery), (AckStatus::Persisted, false, false));
        let copy = outcome(1, &pending, "s1", Some(&message), false, false).expect("a copy");
        assert_eq!((copy.status, copy.seq, copy.deduplicated), (AckStatus::Duplicate, 3, true));
        let again = outcome(0, &pending, "s1", Some(&message), false, true).expect("stored before");
        assert_eq!((again.status, again.deduplicated, again.redelivery), (AckStatus::Persisted, true, true));
        assert_eq!(outcome(0, &pending, "s1", None, false, false), None, "not persisted: no outcome");

        let elsewhere = Decision { representative: 0, fate: Fate::StoredElsewhere(stored_in("s9", 8)) };
        let duplicate = outcome(0, &elsewhere, "s2", None, false, false).expect("duplicate");
        assert_eq!((duplicate.status, duplicate.session_id, duplicate.seq), (AckStatus::Duplicate, "s9", 8));

        let marked = Decision { representative: 1, fate: Fate::Done(done(4)) };
        let redelivered = outcome(1, &marked, "s1", None, true, false).expect("redelivery");
        assert_eq!((redelivered.status, redelivered.redelivery), (AckStatus::Persisted, true));
        let resent = outcome(1, &marked, "s1", None, false, false).expect("resend");
        assert_eq!((resent.status, resent.seq), (AckStatus::Duplicate, 4));
        let other = outcome(0, &marked, "s1", None, true, false).expect("another record");
        assert_eq!((other.status, other.session_id), (AckStatus::Duplicate, "s1"));
    }
}
