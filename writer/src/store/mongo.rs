//! MongoDB realtime store: one unordered `insert_many` per batch. Documents are keyed by
//! `_id` = `<len>:<tenant>:<message_id>`, so a redelivered message is a duplicate-key error
//! (code 11000) on its own document and nothing else. Besides the `timestamp` date (for the
//! TTL index) each document keeps `timestamp_us`, the microsecond time Postgres and the cache
//! order by, so the reader pages every store the same way.

use std::collections::{HashMap, HashSet};

use flare_storage_common::keys::document_id;
use flare_storage_common::message::{content_type, message_tenant_id, to_datetime};
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{Message, message_content};
use futures::TryStreamExt as _;
use mongodb::bson::{Bson, Document, doc, spec::BinarySubtype};
use mongodb::error::{ErrorKind, Result};
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, IndexModel};

use crate::store::postgres::MessageKey;

const DUPLICATE_KEY: i32 = 11000;
const NAMESPACE_NOT_FOUND: i32 = 26;
const RETENTION_INDEX: &str = "retention_ttl";

#[derive(Clone)]
pub struct MongoStore {
    collection: Collection<Document>,
}

impl MongoStore {
    pub async fn connect(url: &str, database: &str, collection: &str) -> Result<Self> {
        let client = Client::with_uri_str(url).await?;
        Ok(Self { collection: client.database(database).collection(collection) })
    }

    /// Creates the indexes the reader's queries need, and with `retention` a TTL index that
    /// expires documents that much after their `timestamp`; safe to repeat, and a changed
    /// retention replaces the TTL index.
    pub async fn ensure_indexes(&self, retention: Option<std::time::Duration>) -> Result<()> {
        self.ensure_retention_index(retention).await?;
        let indexes = [
            doc! { "tenant_id": 1, "session_id": 1, "timestamp_us": -1, "message_id": -1 },
            doc! { "tenant_id": 1, "session_id": 1, "seq": 1 },
            doc! { "tenant_id": 1, "sender_id": 1, "timestamp_us": -1 },
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
                .create_index(IndexModel::builder().keys(doc! { "timestamp": 1 }).options(options).build())
                .await?;
        }
        Ok(())
    }

    /// Deletes documents older than `cutoff` (what the TTL monitor has not removed yet).
    pub async fn delete_before(&self, cutoff: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        let cutoff = mongodb::bson::DateTime::from_millis(cutoff.timestamp_millis());
        Ok(self.collection.delete_many(doc! { "timestamp": { "$lt": cutoff } }).await?.deleted_count)
    }

    /// Inserts every message not stored yet; returns the keys of those that already were.
    pub async fn insert_batch(&self, messages: &[Message]) -> Result<HashSet<MessageKey>> {
        if messages.is_empty() {
            return Ok(HashSet::new());
        }
        let documents: Vec<Document> = messages.iter().map(to_document).collect();
        match self.collection.insert_many(documents).ordered(false).await {
            Ok(_) => Ok(HashSet::new()),
            Err(error) => {
                let ErrorKind::InsertMany(failure) = error.kind.as_ref() else {
                    return Err(error);
                };
                let write_errors = failure.write_errors.as_deref().unwrap_or_default();
                if failure.write_concern_error.is_some()
                    || write_errors.iter().any(|write_error| write_error.code != DUPLICATE_KEY)
                {
                    return Err(error);
                }
                Ok(write_errors
                    .iter()
                    .filter_map(|write_error| messages.get(write_error.index))
                    .map(|message| (message_tenant_id(message).to_owned(), message.id.clone()))
                    .collect())
            }
        }
    }

    /// The stored seq of each of `keys` that exists.
    pub async fn stored_seqs(&self, keys: &[MessageKey]) -> Result<HashMap<MessageKey, i64>> {
        let ids: Vec<String> = keys.iter().map(|(tenant, id)| document_id(tenant, id)).collect();
        let mut cursor = self
            .collection
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "tenant_id": 1, "message_id": 1, "seq": 1 })
            .await?;
        let mut seqs = HashMap::new();
        while let Some(document) = cursor.try_next().await? {
            let (Ok(tenant), Ok(id)) = (document.get_str("tenant_id"), document.get_str("message_id")) else {
                continue;
            };
            seqs.insert((tenant.to_owned(), id.to_owned()), document.get_i64("seq").unwrap_or(0));
        }
        Ok(seqs)
    }

    /// The highest seq stored for each (tenant, session), in one aggregation; sessions with
    /// nothing stored are absent.
    pub async fn max_seqs(&self, sessions: &[(String, String)]) -> Result<Vec<((String, String), i64)>> {
        let tenants: Vec<&str> = sessions.iter().map(|(tenant, _)| tenant.as_str()).collect();
        let session_ids: Vec<&str> = sessions.iter().map(|(_, session)| session.as_str()).collect();
        let pipeline = [
            doc! { "$match": { "tenant_id": { "$in": tenants }, "session_id": { "$in": session_ids } } },
            doc! { "$group": { "_id": { "tenant": "$tenant_id", "session": "$session_id" }, "max": { "$max": "$seq" } } },
        ];
        let groups: Vec<Document> = self.collection.aggregate(pipeline).await?.try_collect().await?;
        let wanted: HashSet<&(String, String)> = sessions.iter().collect();
        Ok(groups
            .iter()
            .filter_map(|group| {
                let id = group.get_document("_id").ok()?;
                let key = (id.get_str("tenant").ok()?.to_owned(), id.get_str("session").ok()?.to_owned());
                let max = group.get_i64("max").ok()?;
                // $in on both fields also matches other tenants' sessions of the same name.
                wanted.contains(&key).then_some((key, max))
            })
            .collect())
    }

    pub async fn ping(&self) -> Result<()> {
        self.collection.client().database("admin").run_command(doc! { "ping": 1 }).await.map(|_| ())
    }
}

fn to_document(message: &Message) -> Document {
    let tenant_id = message_tenant_id(message);
    let timestamp = message.timestamp.as_ref().and_then(to_datetime).unwrap_or_default();
    let text = match message.content.as_ref().and_then(|content| content.content.as_ref()) {
        Some(message_content::Content::Text(text)) => Bson::String(text.text.clone()),
        _ => Bson::Null,
    };
    let strings = |map: &std::collections::HashMap<String, String>| -> Document {
        map.iter().map(|(key, value)| (key.clone(), Bson::String(value.clone()))).collect()
    };
    doc! {
        "_id": document_id(tenant_id, &message.id),
        "tenant_id": tenant_id,
        "message_id": &message.id,
        "session_id": &message.session_id,
        "seq": message.seq,
        "sender_id": &message.sender_id,
        "sender_type": &message.sender_type,
        "receiver_id": &message.receiver_id,
        "receiver_ids": &message.receiver_ids,
        "message_type": message.message_type,
        "content_type": content_type(message),
        "text": text,
        "business_type": &message.business_type,
        "session_type": &message.session_type,
        "status": &message.status,
        "timestamp": mongodb::bson::DateTime::from_millis(timestamp.timestamp_millis()),
        "timestamp_us": timestamp.timestamp_micros(),
        "created_at": message
            .timeline
            .as_ref()
            .and_then(|timeline| timeline.persisted_time.as_ref())
            .and_then(to_datetime)
            .map(|time| mongodb::bson::DateTime::from_millis(time.timestamp_millis()))
            .unwrap_or_else(mongodb::bson::DateTime::now),
        "is_recalled": message.is_recalled,
        "is_burn_after_read": message.is_burn_after_read,
        "burn_after_seconds": message.burn_after_seconds,
        "tags": &message.tags,
        "attributes": strings(&message.attributes),
        "extra": strings(&message.extra),
        "payload": Bson::Binary(mongodb::bson::Binary { subtype: BinarySubtype::Generic, bytes: message.encode_to_vec() }),
    }
}
