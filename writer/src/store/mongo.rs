//! MongoDB realtime store: one unordered `insert_many` per batch. Documents are keyed by
//! `_id` = `<len>:<tenant>:<message_id>`, so a redelivered message is a duplicate-key error
//! (code 11000) on its own document and nothing else. Besides the `timestamp` date (for the
//! TTL index) each document keeps `timestamp_us`, the microsecond time Postgres and the cache
//! order by, so the reader pages every store the same way.
//!
//! Strings are stored as sent (BSON strings hold U+0000; keys, which cannot, are names without
//! control characters). A document over MongoDB's 16 MiB limit is refused before it is sent
//! ([`document_size_refusal`]); a document the server refuses for good (validation codes)
//! is reported with the server's reason while the rest of the batch is stored.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use flare_storage_common::keys::document_id;
use flare_storage_common::message::{content_type, message_tenant_id, searchable_text, to_datetime};
use flare_storage_common::message_document as fields;
use flare_storage_common::pools::{self, ConnectionCount};
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::Message;
use flare_storage_common::text_search::{Terms, index_entry};
use futures::TryStreamExt as _;
use mongodb::bson::{Bson, Document, doc, spec::BinarySubtype};
use mongodb::error::{ErrorKind, Result};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};

use crate::record::Origin;

use super::{Encoded, MessageKey, Partial, StoredMessage, WriteFailure, Written, message_key, write_isolating};

/// MongoDB's hard limit on a document (`maxBsonObjectSize`).
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// Codes of a write error that refuse one document for what it holds, whatever the server's
/// state: BadValue (2), FailedToParse (9), TypeMismatch (14), DollarPrefixedFieldName (52),
/// InvalidDBRef (55), EmptyFieldName (56), DottedFieldName (57), DocumentValidationFailure
/// (121), BSONObjectTooLarge (10334), KeyTooLong (17280) and the "object to insert too large"
/// family (17419, 17420).
const DOCUMENT_REFUSED: &[i32] = &[2, 9, 14, 52, 55, 56, 57, 121, 10334, 17280, 17419, 17420];

/// Codes that refuse a whole insert command for a document it carries (a server that checks
/// documents before writing any, as the MongoDB-protocol server of the tests does): BadValue
/// and the size codes. Other command errors are about the server or the request's options,
/// which no record can be blamed for.
const COMMAND_REFUSED: &[i32] = &[2, 10334, 17419, 17420];

const DUPLICATE_KEY: i32 = 11000;
const NAMESPACE_NOT_FOUND: i32 = 26;
const RETENTION_INDEX: &str = "retention_ttl";

#[derive(Clone)]
pub struct MongoStore {
    collection: Collection<Document>,
    connections: Arc<ConnectionCount>,
}

impl MongoStore {
    pub async fn connect(url: &str, database: &str, collection: &str) -> Result<Self> {
        let (client, connections) = pools::mongo_client(url).await?;
        Ok(Self { collection: client.database(database).collection(collection), connections })
    }

    /// The pool's connections, for the pool metrics.
    pub fn connections(&self) -> Arc<ConnectionCount> {
        self.connections.clone()
    }

    /// Creates the indexes the reader's queries need, and with `retention` a TTL index that
    /// expires documents that much after their `timestamp`; safe to repeat, and a changed
    /// retention replaces the TTL index.
    pub async fn ensure_indexes(&self, retention: Option<std::time::Duration>) -> Result<()> {
        self.ensure_retention_index(retention).await?;
        let indexes = [
            doc! { (fields::TENANT_ID): 1, (fields::SESSION_ID): 1, (fields::TIMESTAMP_US): -1, (fields::MESSAGE_ID): -1 },
            doc! { (fields::TENANT_ID): 1, (fields::SESSION_ID): 1, (fields::SEQ): 1 },
            doc! { (fields::TENANT_ID): 1, (fields::SENDER_ID): 1, (fields::TIMESTAMP_US): -1 },
            doc! { (fields::TENANT_ID): 1, (fields::SEARCH_TERMS): 1, (fields::TIMESTAMP_US): -1, (fields::MESSAGE_ID): -1 },
        ];
        for keys in indexes {
            self.collection.create_index(IndexModel::builder().keys(keys).build()).await?;
        }
        Ok(())
    }

    async fn ensure_retention_index(&self, retention: Option<std::time::Duration>) -> Result<()> {
        let existing: Vec<IndexModel> = match self.collection.list_indexes().await {
            Ok(cursor) => cursor.try_collect().await?,
            // A collection that does not exist yet has no indexes.
            Err(error) if matches!(error.kind.as_ref(), ErrorKind::Command(failure) if failure.code == NAMESPACE_NOT_FOUND) => {
                Vec::new()
            }
            Err(error) => return Err(error),
        };
        let current = existing
            .iter()
            .find(|index| index.options.as_ref().and_then(|options| options.name.as_deref()) == Some(RETENTION_INDEX));
        let current_ttl = current.and_then(|index| index.options.as_ref()?.expire_after);
        if current.is_some() && current_ttl != retention {
            self.collection.drop_index(RETENTION_INDEX).await?;
        }
        if let Some(retention) = retention
            && current_ttl != Some(retention)
        {
            let options = IndexOptions::builder().name(RETENTION_INDEX.to_owned()).expire_after(retention).build();
            self.collection
                .create_index(IndexModel::builder().keys(doc! { (fields::TIMESTAMP): 1 }).options(options).build())
                .await?;
        }
        Ok(())
    }

    /// Deletes documents older than `cutoff` (what the TTL monitor has not removed yet).
    pub async fn delete_before(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        let cutoff = mongodb::bson::DateTime::from_millis(cutoff.timestamp_millis());
        Ok(self.collection.delete_many(doc! { (fields::TIMESTAMP): { "$lt": cutoff } }).await?.deleted_count)
    }

    /// Inserts every message not stored yet. Reports those stored now, those already stored
    /// and those the server refuses for good (with its reason); every other message is stored.
    pub async fn insert_batch(
        &self,
        messages: &[Encoded],
    ) -> std::result::Result<Written, Partial<mongodb::error::Error>> {
        if messages.is_empty() {
            return Ok(Written::default());
        }
        // The driver splits an insert_many into requests the server accepts by itself.
        write_isolating(std::iter::once(0..messages.len()), |range| self.insert_range(messages, range)).await
    }

    async fn insert_range(
        &self,
        messages: &[Encoded],
        range: Range<usize>,
    ) -> std::result::Result<Written, WriteFailure<mongodb::error::Error>> {
        let offset = range.start;
        let messages = &messages[range];
        let documents: Vec<Document> = messages.iter().map(to_document).collect();
        let error = match self.collection.insert_many(documents).ordered(false).await {
            Ok(_) => return Ok(Written::of(messages, offset, Default::default(), Vec::new())),
            Err(error) => error,
        };
        let refused = |cause: &dyn std::fmt::Display| WriteFailure::Refused(format!("refused by MongoDB: {cause}"));
        let failure = match error.kind.as_ref() {
            ErrorKind::InsertMany(failure) if failure.write_concern_error.is_none() => failure,
            // The driver refuses a document it cannot encode, or one over the server's size
            // limit, before sending anything: as final as the server refusing it.
            ErrorKind::BsonSerialization(cause) => return Err(refused(cause)),
            ErrorKind::InvalidArgument { message, .. } => return Err(refused(message)),
            ErrorKind::Command(command) if COMMAND_REFUSED.contains(&command.code) => {
                return Err(refused(&format_args!("{} (code {})", command.message, command.code)));
            }
            _ => return Err(WriteFailure::Failed(error)),
        };
        let mut already_stored = std::collections::HashSet::new();
        let mut refused = Vec::new();
        for write_error in failure.write_errors.as_deref().unwrap_or_default() {
            let Some(encoded) = messages.get(write_error.index) else { continue };
            match write_error.code {
                DUPLICATE_KEY => {
                    already_stored.insert(message_key(&encoded.message));
                }
                code if DOCUMENT_REFUSED.contains(&code) => refused.push((
                    offset + write_error.index,
                    format!("refused by MongoDB: {} (code {code})", write_error.message),
                )),
                _ => return Err(WriteFailure::Failed(error)),
            }
        }
        Ok(Written::of(messages, offset, already_stored, refused))
    }

    /// Each of `keys` that is stored, in whichever session; the payload only where it is
    /// stored in the session given beside the key.
    pub async fn stored_messages(&self, keys: &[(MessageKey, &str)]) -> Result<HashMap<MessageKey, StoredMessage>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let sessions: HashMap<&MessageKey, &str> = keys.iter().map(|(key, session)| (key, *session)).collect();
        let ids: Vec<String> = keys.iter().map(|((tenant, id), _)| document_id(tenant, id)).collect();
        let mut cursor = self
            .collection
            .find(doc! { (fields::ID): { "$in": ids } })
            .projection(
                doc! { (fields::TENANT_ID): 1, (fields::MESSAGE_ID): 1, (fields::SESSION_ID): 1, (fields::SEQ): 1, (fields::CREATED_AT): 1, (fields::CREATED_AT_US): 1, (fields::PAYLOAD): 1, (fields::ORIGIN): 1 },
            )
            .await?;
        let mut stored = HashMap::new();
        while let Some(document) = cursor.try_next().await? {
            let (Ok(tenant), Ok(id), Ok(session_id)) = (
                document.get_str(fields::TENANT_ID),
                document.get_str(fields::MESSAGE_ID),
                document.get_str(fields::SESSION_ID),
            ) else {
                continue;
            };
            let key = (tenant.to_owned(), id.to_owned());
            let same_session = sessions.get(&key).is_some_and(|session| *session == session_id);
            let message = StoredMessage {
                session_id: session_id.to_owned(),
                seq: document.get_i64(fields::SEQ).unwrap_or(0),
                persisted_ms: document
                    .get_datetime(fields::CREATED_AT)
                    .map(|time| time.timestamp_millis())
                    .unwrap_or(0),
                payload: same_session
                    .then(|| document.get_binary_generic(fields::PAYLOAD).cloned().unwrap_or_default()),
                origin: origin_of(&document),
            };
            stored.insert(key, message);
        }
        Ok(stored)
    }

    /// The highest seq stored for each (tenant, session), in one aggregation; sessions with
    /// nothing stored are absent.
    pub async fn max_seqs(&self, sessions: &[(String, String)]) -> Result<Vec<((String, String), i64)>> {
        let tenants: Vec<&str> = sessions.iter().map(|(tenant, _)| tenant.as_str()).collect();
        let session_ids: Vec<&str> = sessions.iter().map(|(_, session)| session.as_str()).collect();
        let pipeline = [
            doc! { "$match": { (fields::TENANT_ID): { "$in": tenants }, (fields::SESSION_ID): { "$in": session_ids } } },
            doc! { "$group": { (fields::ID): { "tenant": "$tenant_id", "session": "$session_id" }, "max": { "$max": "$seq" } } },
        ];
        let groups: Vec<Document> = self.collection.aggregate(pipeline).await?.try_collect().await?;
        let wanted: HashSet<&(String, String)> = sessions.iter().collect();
        Ok(groups
            .iter()
            .filter_map(|group| {
                let id = group.get_document(fields::ID).ok()?;
                let key = (id.get_str("tenant").ok()?.to_owned(), id.get_str("session").ok()?.to_owned());
                let max = group.get_i64("max").ok()?;
                // $in on both fields also matches other tenants' sessions of the same name.
                wanted.contains(&key).then_some((key, max))
            })
            .collect())
    }

    /// Gives the search fields (`search_text`, `search_terms`) to documents stored without them
    /// — by writers older than the search index, whose documents carried `text` instead —
    /// `batch` documents at a time, in `_id` order, calling `progress` with the running count
    /// after each batch; recalled, deleted and burned messages get empty fields. Then empties
    /// the fields of documents a reader older than them recalled, deleted or burn-wiped (it
    /// left them). Returns how many documents it changed. Idempotent and resumable: it looks
    /// only for documents still without `search_terms` or gone with terms, so run it again
    /// after an interruption, and once more after the last older binary has stopped.
    pub async fn backfill_search(&self, batch: i64, mut progress: impl FnMut(u64)) -> Result<u64> {
        let mut updated = 0;
        let mut after: Option<Bson> = None;
        loop {
            let mut filter = doc! { (fields::SEARCH_TERMS): { "$exists": false } };
            if let Some(after) = &after {
                filter.insert(fields::ID, doc! { "$gt": after.clone() });
            }
            let documents: Vec<Document> = self
                .collection
                .find(filter)
                .sort(doc! { (fields::ID): 1 })
                .limit(batch)
                .projection(doc! {
                    (fields::PAYLOAD): 1, (fields::IS_RECALLED): 1, (fields::DELETED_AT_US): 1, (fields::BURNED_AT_US): 1, (fields::BURN_WIPED): 1,
                })
                .await?
                .try_collect()
                .await?;
            let Some(last) = documents.last() else { break };
            after = last.get(fields::ID).cloned();
            let now_us = chrono::Utc::now().timestamp_micros();
            for document in &documents {
                let gone = document.get_bool(fields::IS_RECALLED).unwrap_or(false)
                    || !matches!(document.get(fields::DELETED_AT_US), None | Some(Bson::Null))
                    || document.get_i64(fields::BURNED_AT_US).is_ok_and(|burned| burned <= now_us)
                    || document.get_bool(fields::BURN_WIPED).unwrap_or(false);
                let message = match document.get(fields::PAYLOAD) {
                    Some(Bson::Binary(payload)) if !gone => Message::decode(payload.bytes.as_slice()).ok(),
                    _ => None,
                };
                let (search_text, search_terms) = message.as_ref().map_or_else(no_search_fields, search_fields);
                let Some(id) = document.get(fields::ID) else { continue };
                self.collection
                    .update_one(
                        doc! { (fields::ID): id.clone(), (fields::SEARCH_TERMS): { "$exists": false } },
                        doc! { "$set": { (fields::SEARCH_TEXT): search_text, (fields::SEARCH_TERMS): search_terms }, "$unset": { "text": "" } },
                    )
                    .await?;
                updated += 1;
            }
            progress(updated);
        }
        let gone_with_terms = doc! {
            "search_terms.0": { "$exists": true },
            "$or": [{ (fields::IS_RECALLED): true }, { (fields::DELETED_AT_US): { "$ne": Bson::Null } }, { (fields::BURN_WIPED): true }],
        };
        let cleared = self
            .collection
            .update_many(
                gone_with_terms,
                doc! { "$set": { (fields::SEARCH_TEXT): Bson::Null, (fields::SEARCH_TERMS): [] } },
            )
            .await?;
        Ok(updated + cleared.modified_count)
    }

    pub async fn ping(&self) -> Result<()> {
        self.collection.client().database("admin").run_command(doc! { "ping": 1 }).await.map(|_| ())
    }
}

/// Why `message` cannot be a MongoDB document, when its document would exceed
/// [`MAX_DOCUMENT_BYTES`]. A document holds the payload plus copies of parts of it, so it is
/// measured only when the payload comes within a tenth of the limit: the document's copies
/// of lists and maps cost more per entry than the payload's (an empty tag or receiver id is
/// 2 bytes in the payload and up to 14 more in the document), 8 times the payload at most.
pub fn document_size_refusal(message: &Message) -> Option<String> {
    if message.encoded_len().saturating_mul(10) < MAX_DOCUMENT_BYTES {
        return None;
    }
    // Measured with the longest origin: a Kafka topic name has at most 249 characters.
    let origin = Origin { topic: "t".repeat(249), partition: i32::MAX, offset: i64::MAX };
    let document = to_document(&Encoded::new(message.clone()).with_origin(Some(origin)));
    let size = mongodb::bson::to_vec(&document).map_or(usize::MAX, |bytes| bytes.len());
    (size > MAX_DOCUMENT_BYTES)
        .then(|| format!("its MongoDB document of {size} bytes exceeds MongoDB's limit of {MAX_DOCUMENT_BYTES} bytes"))
}

/// A message's `search_text` and `search_terms`: the same normal form and terms as
/// PostgreSQL's search index, kept on the document (multikey index on `search_terms`); none
/// for a text over `text_search::MAX_SEARCHABLE_BYTES` in normal form, as in PostgreSQL.
fn search_fields(message: &Message) -> (Bson, Bson) {
    match searchable_text(message).and_then(|text| index_entry(text, Terms::Plain)) {
        Some((normal, terms)) => (Bson::String(normal), Bson::from(terms)),
        None => no_search_fields(),
    }
}

/// The search fields of a document nothing can find.
fn no_search_fields() -> (Bson, Bson) {
    (Bson::Null, Bson::Array(Vec::new()))
}

fn to_document(Encoded { message, payload, origin }: &Encoded) -> Document {
    let tenant_id = message_tenant_id(message);
    let persisted_at = message
        .timeline
        .as_ref()
        .and_then(|timeline| timeline.persisted_time.as_ref())
        .and_then(to_datetime)
        .unwrap_or_else(chrono::Utc::now);
    let timestamp = message.timestamp.as_ref().and_then(to_datetime).unwrap_or_default();
    let (search_text, search_terms) = search_fields(message);
    let strings = |map: &std::collections::HashMap<String, String>| -> Document {
        map.iter().map(|(key, value)| (key.clone(), Bson::String(value.clone()))).collect()
    };
    doc! {
        (fields::ID): document_id(tenant_id, &message.id),
        (fields::TENANT_ID): tenant_id,
        (fields::MESSAGE_ID): &message.id,
        (fields::SESSION_ID): &message.session_id,
        (fields::SEQ): message.seq,
        (fields::SENDER_ID): &message.sender_id,
        (fields::SENDER_TYPE): &message.sender_type,
        (fields::RECEIVER_ID): &message.receiver_id,
        (fields::RECEIVER_IDS): &message.receiver_ids,
        (fields::MESSAGE_TYPE): message.message_type,
        (fields::CONTENT_TYPE): content_type(message),
        (fields::SEARCH_TEXT): search_text,
        (fields::SEARCH_TERMS): search_terms,
        (fields::BUSINESS_TYPE): &message.business_type,
        (fields::SESSION_TYPE): &message.session_type,
        (fields::STATUS): &message.status,
        (fields::TIMESTAMP): mongodb::bson::DateTime::from_millis(timestamp.timestamp_millis()),
        (fields::TIMESTAMP_US): timestamp.timestamp_micros(),
        (fields::CREATED_AT): mongodb::bson::DateTime::from_millis(persisted_at.timestamp_millis()),
        // Microseconds, as PostgreSQL keeps created_at: persisted_time reads the same from both.
        (fields::CREATED_AT_US): persisted_at.timestamp_micros(),
        (fields::IS_RECALLED): message.is_recalled,
        // As the reader's recall command keeps it; PostgreSQL's `recalled_at` column alike.
        (fields::RECALLED_AT_US): message
            .recalled_at
            .as_ref()
            .and_then(to_datetime)
            .map_or(Bson::Null, |time| Bson::Int64(time.timestamp_micros())),
        (fields::IS_BURN_AFTER_READ): message.is_burn_after_read,
        (fields::BURN_AFTER_SECONDS): message.burn_after_seconds,
        (fields::TAGS): &message.tags,
        (fields::ATTRIBUTES): strings(&message.attributes),
        (fields::EXTRA): strings(&message.extra),
        (fields::PAYLOAD): Bson::Binary(mongodb::bson::Binary { subtype: BinarySubtype::Generic, bytes: payload.to_vec() }),
        (fields::ORIGIN): origin.as_ref().map_or(Bson::Null, |origin| {
            Bson::Document(doc! { "topic": &origin.topic, "partition": origin.partition, "offset": origin.offset })
        }),
    }
}

/// The origin a document records, if it records one.
fn origin_of(document: &Document) -> Option<Origin> {
    let origin = document.get_document(fields::ORIGIN).ok()?;
    Some(Origin {
        topic: origin.get_str("topic").ok()?.to_owned(),
        partition: origin.get_i32("partition").ok()?,
        offset: origin.get_i64("offset").ok()?,
    })
}
