//! The stores the writer persists into. Each is idempotent on (tenant_id, message_id), so a
//! redelivered batch can be written again without effect.
//!
//! A database refuses some values for good (PostgreSQL SQLSTATE classes 22 and 54, MongoDB's
//! validation codes): such a record must not hold up the others. [`write_isolating`] halves
//! a refused range until the refused records stand alone; the rest is written. What was
//! written before a transient failure is reported with it ([`Partial`]), so the retry knows
//! what this batch stored itself.

pub mod mongo;
pub mod postgres;
pub mod redis;

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use flare_storage_common::message::message_tenant_id;
use flare_storage_common::proto::storage::Message;

use crate::error::{Error, Stage};
use crate::record::Origin;

/// The stores one writer writes: Redis always, and at least one database.
pub struct Stores {
    pub redis: redis::RedisStore,
    pub postgres: Option<postgres::PostgresStore>,
    pub mongo: Option<mongo::MongoStore>,
}

impl Stores {
    /// Which of `keys` a database holds (with the payload where it holds it in the session
    /// given beside the key), from PostgreSQL when configured (the first store written), else
    /// MongoDB. A failure counts against that database's stage.
    pub async fn stored_messages(
        &self,
        keys: &[(MessageKey, &str)],
    ) -> Result<HashMap<MessageKey, StoredMessage>, Error> {
        if let Some(postgres) = &self.postgres {
            return postgres.stored_messages(keys).await.map_err(Error::at(Stage::Postgres));
        }
        match &self.mongo {
            Some(mongo) => mongo.stored_messages(keys).await.map_err(Error::at(Stage::Mongo)),
            None => Ok(HashMap::new()),
        }
    }

    /// The highest seq any database holds for each (tenant, session): one query per database.
    pub async fn max_seqs(&self, sessions: &[(String, String)]) -> Result<HashMap<(String, String), i64>, Error> {
        let mut max_seqs: HashMap<(String, String), i64> = HashMap::new();
        let mut merge = |found: Vec<((String, String), i64)>| {
            for (session, max) in found {
                let current = max_seqs.entry(session).or_insert(0);
                *current = (*current).max(max);
            }
        };
        if let Some(postgres) = &self.postgres {
            merge(postgres.max_seqs(sessions).await.map_err(Error::at(Stage::SeqSeed))?);
        }
        if let Some(mongo) = &self.mongo {
            merge(mongo.max_seqs(sessions).await.map_err(Error::at(Stage::SeqSeed))?);
        }
        Ok(max_seqs)
    }
}

/// (tenant_id, message_id): a message's identity; unique within a tenant.
pub type MessageKey = (String, String);

/// The identity of a normalised message.
pub fn message_key(message: &Message) -> MessageKey {
    (message_tenant_id(message).to_owned(), message.id.clone())
}

/// A message ready for the stores with its encoding (protobuf `Message`), made once and
/// written as is everywhere: the databases' payload and the hot window's body.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub message: Message,
    pub payload: Vec<u8>,
    /// The Kafka record that stores it, kept with its id by the first database.
    pub origin: Option<Origin>,
}

impl Encoded {
    pub fn new(message: Message) -> Self {
        use flare_storage_common::prost::Message as _;
        let payload = message.encode_to_vec();
        Self { message, payload, origin: None }
    }

    pub fn with_origin(self, origin: Option<Origin>) -> Self {
        Self { origin, ..self }
    }

    /// Gives the message another seq (the one a database holds), encoding it again.
    pub fn set_seq(&mut self, seq: i64) {
        use flare_storage_common::prost::Message as _;
        self.message.seq = seq;
        self.payload = self.message.encode_to_vec();
    }
}

/// What a database made of a batch.
#[derive(Debug, Default)]
pub struct Written {
    /// Messages it stored now.
    pub inserted: HashSet<MessageKey>,
    /// Messages it already held under their key.
    pub already_stored: HashSet<MessageKey>,
    /// Messages it refuses for good, by index in the batch, with its reason.
    pub refused: Vec<(usize, String)>,
}

impl Written {
    fn absorb(&mut self, other: Written) {
        self.inserted.extend(other.inserted);
        self.already_stored.extend(other.already_stored);
        self.refused.extend(other.refused);
    }

    /// What a write of `messages` (at `offset` in the batch) reported, every message neither
    /// already stored nor refused counted as inserted.
    fn of(
        messages: &[Encoded],
        offset: usize,
        already_stored: HashSet<MessageKey>,
        refused: Vec<(usize, String)>,
    ) -> Self {
        let refused_at: HashSet<usize> = refused.iter().map(|(index, _)| *index).collect();
        let inserted = messages
            .iter()
            .enumerate()
            .filter(|(index, _)| !refused_at.contains(&(offset + index)))
            .map(|(_, encoded)| message_key(&encoded.message))
            .filter(|key| !already_stored.contains(key))
            .collect();
        Self { inserted, already_stored, refused }
    }
}

/// A write that failed for a reason unrelated to the data, with what it had written before.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Partial<E: std::error::Error> {
    pub written: Written,
    #[source]
    pub error: E,
}

/// A message as a database holds it, for telling redeliveries and resends apart.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub session_id: String,
    /// 0 when stored without one.
    pub seq: i64,
    /// Epoch milliseconds.
    pub persisted_ms: i64,
    /// The record that stored it; `None` for messages stored before origins were kept.
    pub origin: Option<Origin>,
    /// The message as first stored (protobuf `Message`), when it was asked for.
    pub payload: Option<Vec<u8>>,
}

/// Why an attempt to write a range of a batch failed.
#[derive(Debug)]
pub enum WriteFailure<E> {
    /// The store refuses something in the range for good; the text is its reason.
    Refused(String),
    /// The store is unavailable or failed for a reason unrelated to the data: retry later.
    Failed(E),
}

/// Writes each of `ranges` with `write`. A range the store refuses is halved, and the halves
/// written, until a refused range is a single record; that record is refused with the
/// store's reason. A failure of any other kind ends the write (the caller retries the batch;
/// every write is idempotent). Returns what the successful writes reported, merged.
pub async fn write_isolating<E, F, Fut>(
    ranges: impl IntoIterator<Item = Range<usize>>,
    mut write: F,
) -> Result<Written, Partial<E>>
where
    E: std::error::Error,
    F: FnMut(Range<usize>) -> Fut,
    Fut: Future<Output = Result<Written, WriteFailure<E>>>,
{
    let mut written = Written::default();
    // Last in, first out: the first half is written before the second.
    let mut ranges: Vec<Range<usize>> = ranges.into_iter().collect();
    ranges.reverse();
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        match write(range.clone()).await {
            Ok(part) => written.absorb(part),
            Err(WriteFailure::Failed(error)) => return Err(Partial { written, error }),
            Err(WriteFailure::Refused(reason)) if range.len() == 1 => written.refused.push((range.start, reason)),
            Err(WriteFailure::Refused(_)) => {
                let middle = range.start + range.len() / 2;
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
            }
        }
    }
    written.refused.sort_unstable();
    Ok(written)
}

/// Consecutive ranges of `messages` whose encoded sizes add up to at most `max_bytes` each
/// (a single larger message is a range of its own), so that no statement carries more than a
/// database accepts in one parameter or request.
pub fn ranges_by_size(messages: &[Encoded], max_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, encoded) in messages.iter().enumerate() {
        let size = encoded.payload.len();
        if index > start && bytes + size > max_bytes {
            ranges.push(start..index);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < messages.len() {
        ranges.push(start..messages.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, thiserror::Error, PartialEq)]
    #[error("store down")]
    struct Down;

    /// A store that refuses every range holding one of `bad`, fails when asked to, and
    /// records what it was asked to write.
    async fn write_to_fake(
        len: usize,
        bad: &[usize],
        fail_at: Option<usize>,
    ) -> (Result<Written, Partial<Down>>, usize) {
        let calls = RefCell::new(0);
        let written = RefCell::new(Vec::new());
        let result = write_isolating(std::iter::once(0..len), |range: Range<usize>| {
            *calls.borrow_mut() += 1;
            let refused = bad.iter().any(|index| range.contains(index));
            let fails = fail_at.is_some_and(|index| range.contains(&index));
            if !refused && !fails {
                written.borrow_mut().extend(range.clone());
            }
            async move {
                match (refused, fails) {
                    (true, _) => Err(WriteFailure::Refused(format!("bad in {range:?}"))),
                    (_, true) => Err(WriteFailure::Failed(Down)),
                    _ => Ok(Written {
                        inserted: range.map(|index| (String::new(), index.to_string())).collect(),
                        ..Written::default()
                    }),
                }
            }
        })
        .await;
        let mut written = written.into_inner();
        written.sort_unstable();
        if let Ok(result) = &result {
            let expected: Vec<usize> = (0..len).filter(|index| !bad.contains(index)).collect();
            assert_eq!(written, expected, "everything but the refused is written exactly once");
            let refused: Vec<usize> = result.refused.iter().map(|(index, _)| *index).collect();
            assert_eq!(refused, bad, "exactly the bad records are refused");
        }
        (result, calls.into_inner())
    }

    #[tokio::test]
    async fn a_clean_batch_is_one_write() {
        let (result, calls) = write_to_fake(500, &[], None).await;
        assert!(result.is_ok());
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn refused_records_are_isolated_in_logarithmic_writes() {
        let (result, calls) = write_to_fake(500, &[137], None).await;
        let refused = result.expect("isolated").refused;
        assert_eq!(refused, [(137, "bad in 137..138".to_owned())]);
        assert!(calls <= 2 * 10 + 1, "{calls} writes for one bad record in 500");

        for bad in [vec![0], vec![499], vec![0, 1, 2], vec![3, 250, 251, 498], (0..10).collect()] {
            let (result, _) = write_to_fake(500, &bad, None).await;
            assert!(result.is_ok(), "{bad:?}");
        }
        let (result, _) = write_to_fake(1, &[0], None).await;
        assert_eq!(result.expect("refused").refused.len(), 1);
    }

    #[tokio::test]
    async fn a_failure_that_is_not_about_data_ends_the_write_and_says_what_was_written() {
        let (result, _) = write_to_fake(100, &[7], Some(60)).await;
        let partial = result.expect_err("store down");
        assert_eq!(partial.error, Down);
        // The first half was written but for the refused record; the failing half was not.
        let mut written: Vec<usize> =
            partial.written.inserted.iter().map(|(_, index)| index.parse().unwrap_or(usize::MAX)).collect();
        written.sort_unstable();
        assert_eq!(written, (0..50).filter(|index| *index != 7).collect::<Vec<_>>());
        assert_eq!(partial.written.refused.len(), 1);
    }

    #[test]
    fn ranges_respect_the_size_bound() {
        let message = |bytes: usize| Encoded::new(Message { id: "x".repeat(bytes), ..Default::default() });
        let messages: Vec<Encoded> = [10, 10, 10, 100, 10].into_iter().map(message).collect();
        let sizes: Vec<usize> = messages.iter().map(|encoded| encoded.payload.len()).collect();
        let bound = sizes[0] * 2;
        assert_eq!(ranges_by_size(&messages, bound), [0..2, 2..3, 3..4, 4..5]);
        assert_eq!(ranges_by_size(&messages, usize::MAX), std::iter::once(0..5).collect::<Vec<_>>());
        assert!(ranges_by_size(&[], 10).is_empty());
    }
}
