//! MongoDB realtime store: the reader's queries and the changes of its commands on the
//! documents the writer stores (one per message, `_id` = `keys::document_id`), and two
//! collections of per-user views beside them: `<collection>_hidden` (one document per hidden
//! message and user) and `<collection>_clears` (one clear watermark per session and user).
//!
//! Times are compared on the microsecond fields (`timestamp_us`, `deleted_at_us`, …), the
//! precision Postgres and the cache order by, so a page means the same in every store. Every
//! filter names the tenant, through `tenant_id` or a tenant-prefixed `_id`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::keys::document_id;
use flare_storage_common::message_document as fields;
use flare_storage_common::pools::{self, ConnectionCount};
use flare_storage_common::stored_text::JsonStrings;
use flare_storage_common::text_search::query_terms;
use futures::TryStreamExt as _;
use mongodb::bson::{Bson, Document, doc, spec::BinarySubtype};
use mongodb::error::{ErrorKind, Result};
use mongodb::options::FindOptions;
use mongodb::{Collection, IndexModel};

use crate::search::{Among, Comparison, SearchQuery};
use crate::store::rows::{
    Operation, ReadRecord, SessionHead, SessionPage, SessionViews, StoredRow, TargetRow, UnreadRange,
};

#[derive(Clone)]
pub struct MongoStore {
    messages: Collection<Document>,
    hidden: Collection<Document>,
    clears: Collection<Document>,
    /// Read positions (MarkMessageRead, MarkSessionRead): `_id` as [`clear_id`], `read_seq`.
    reads: Collection<Document>,
    connections: Arc<ConnectionCount>,
}

/// Attribute merges retried when another command changed the attributes in between.
const ATTRIBUTE_RETRIES: usize = 8;

/// What a compare-and-set merge of a message's attributes came to.
pub enum Merge {
    Done,
    /// No such message (or deleted).
    NotFound,
    /// Other merges won every attempt.
    Contended,
}

impl MongoStore {
    /// A client for the server; it connects on first use, so the reader starts while MongoDB
    /// is still coming up.
    pub async fn connect(url: &str, database: &str, collection: &str) -> Result<Self> {
        let (client, connections) = pools::mongo_client(url).await?;
        let database = client.database(database);
        Ok(Self {
            connections,
            messages: database.collection(collection),
            hidden: database.collection(&format!("{collection}_hidden")),
            clears: database.collection(&format!("{collection}_clears")),
            reads: database.collection(&format!("{collection}_reads")),
        })
    }

    /// The pool's connections, for the pool metrics.
    pub fn connections(&self) -> Arc<ConnectionCount> {
        self.connections.clone()
    }

    /// Indexes of the view collections (the writer creates the messages' own); safe to repeat.
    pub async fn ensure_indexes(&self) -> Result<()> {
        for collection in [&self.hidden, &self.clears, &self.reads] {
            for keys in [
                doc! { (fields::TENANT_ID): 1, (fields::SESSION_ID): 1 },
                doc! { (fields::TENANT_ID): 1, "user_id": 1 },
            ] {
                collection.create_index(IndexModel::builder().keys(keys).build()).await?;
            }
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        self.messages.client().database("admin").run_command(doc! { "ping": 1 }).await.map(drop)
    }

    async fn find(&self, clauses: Vec<Document>, sort: Document, limit: i64) -> Result<Vec<StoredRow>> {
        let options = FindOptions::builder().sort(sort).limit(limit).build();
        let documents: Vec<Document> =
            self.messages.find(doc! { "$and": clauses }).with_options(options).await?.try_collect().await?;
        documents.iter().map(stored_row).collect()
    }

    /// A message as `user` may see it ('' = no per-user filtering); deleted ones are absent.
    pub async fn message(&self, tenant_id: &str, message_id: &str, user: &str) -> Result<Option<StoredRow>> {
        let filter = doc! { (fields::ID): document_id(tenant_id, message_id), (fields::DELETED_AT_US): Bson::Null };
        let Some(document) = self.messages.find_one(filter).await? else { return Ok(None) };
        let row = stored_row(&document)?;
        if !user.is_empty() {
            let session_id = document.get_str(fields::SESSION_ID).unwrap_or_default();
            let hidden = self.hidden.find_one(doc! { (fields::ID): hidden_id(tenant_id, user, message_id) }).await?;
            let cleared_before = self.cleared_before(tenant_id, session_id, user).await?;
            if hidden.is_some() || cleared_before.is_some_and(|before| row.timestamp.timestamp_micros() <= before) {
                return Ok(None);
            }
        }
        Ok(Some(row))
    }

    /// A message whatever its state, for commands that change it.
    pub async fn target(&self, tenant_id: &str, message_id: &str) -> Result<Option<TargetRow>> {
        let Some(document) = self.messages.find_one(doc! { (fields::ID): document_id(tenant_id, message_id) }).await?
        else {
            return Ok(None);
        };
        Self::target_row(&document).map(Some)
    }

    /// The messages of these ids.
    pub async fn targets(&self, tenant_id: &str, message_ids: &[String]) -> Result<Vec<TargetRow>> {
        let ids: Vec<String> = message_ids.iter().map(|message_id| document_id(tenant_id, message_id)).collect();
        let documents: Vec<Document> =
            self.messages.find(doc! { (fields::ID): { "$in": ids } }).await?.try_collect().await?;
        documents.iter().map(Self::target_row).collect()
    }

    /// A message document as the target of a command.
    fn target_row(document: &Document) -> Result<TargetRow> {
        let text = |field: &str| document.get_str(field).unwrap_or_default().to_owned();
        Ok(TargetRow {
            row: stored_row(document)?,
            session_id: text(fields::SESSION_ID),
            sender_id: text(fields::SENDER_ID),
            receiver_id: text(fields::RECEIVER_ID),
            receiver_ids: strings(document.get(fields::RECEIVER_IDS)),
            is_burn_after_read: document.get_bool(fields::IS_BURN_AFTER_READ).unwrap_or(false),
            burn_after_seconds: integer(document.get(fields::BURN_AFTER_SECONDS)) as i32,
            deleted_at: micros(document.get(fields::DELETED_AT_US)),
        })
    }

    /// The newest `limit` messages of a session, newest first (to fill the hot window).
    pub async fn newest(&self, tenant_id: &str, session_id: &str, limit: i64) -> Result<Vec<StoredRow>> {
        let clauses = vec![
            doc! { (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id, (fields::DELETED_AT_US): Bson::Null },
        ];
        self.find(clauses, doc! { (fields::TIMESTAMP_US): -1, (fields::MESSAGE_ID): -1 }, limit).await
    }

    /// Up to `limit` messages of a session with seq in (after, before), ascending.
    pub async fn seq_range(
        &self,
        tenant_id: &str,
        session_id: &str,
        after: i64,
        before: i64,
        limit: i64,
        user: &str,
    ) -> Result<Vec<StoredRow>> {
        let mut clauses = vec![doc! {
            (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id, (fields::DELETED_AT_US): Bson::Null,
            (fields::SEQ): { "$gt": after, "$lt": before },
        }];
        clauses.extend(self.user_clauses(tenant_id, Some(session_id), user).await?);
        self.find(clauses, doc! { (fields::SEQ): 1 }, limit).await
    }

    /// Up to `limit` messages of a session in [from, to], newest first, older than `before`,
    /// as `user` may see them.
    pub async fn session_page(&self, page: SessionPage<'_>) -> Result<Vec<StoredRow>> {
        let SessionPage { tenant_id, session_id, from, to, before, limit, user } = page;
        let mut clauses = vec![doc! {
            (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id, (fields::DELETED_AT_US): Bson::Null,
            (fields::TIMESTAMP_US): { "$gte": from.timestamp_micros(), "$lte": to.timestamp_micros() },
        }];
        if let Some(before) = before {
            clauses.push(keyset("$lt", before.timestamp, before.message_id));
        }
        clauses.extend(self.user_clauses(tenant_id, Some(session_id), user).await?);
        self.find(clauses, doc! { (fields::TIMESTAMP_US): -1, (fields::MESSAGE_ID): -1 }, limit).await
    }

    /// Conditions leaving out what `user` hid and what their clear watermarks cover, in one
    /// session or (`None`) all of the tenant's.
    async fn user_clauses(&self, tenant_id: &str, session_id: Option<&str>, user: &str) -> Result<Vec<Document>> {
        if user.is_empty() {
            return Ok(Vec::new());
        }
        let mut filter = doc! { (fields::TENANT_ID): tenant_id, "user_id": user };
        if let Some(session_id) = session_id {
            filter.insert(fields::SESSION_ID, session_id);
        }
        let hidden: Vec<Document> = self.hidden.find(filter.clone()).await?.try_collect().await?;
        let clears: Vec<Document> = self.clears.find(filter).await?.try_collect().await?;
        let mut clauses = Vec::new();
        if !hidden.is_empty() {
            let ids: Vec<&str> = hidden.iter().filter_map(|view| view.get_str(fields::MESSAGE_ID).ok()).collect();
            clauses.push(doc! { (fields::MESSAGE_ID): { "$nin": ids } });
        }
        if !clears.is_empty() {
            let covered: Vec<Document> = clears
                .iter()
                .map(|clear| {
                    doc! {
                        (fields::SESSION_ID): clear.get_str(fields::SESSION_ID).unwrap_or_default(),
                        (fields::TIMESTAMP_US): { "$lte": integer(clear.get("cleared_before_us")) },
                    }
                })
                .collect();
            clauses.push(doc! { "$nor": covered });
        }
        Ok(clauses)
    }

    /// The newest message of each of `session_ids` that has any: one aggregation over the
    /// (tenant_id, session_id, seq) index, walked backwards (session and seq both descending).
    pub async fn session_heads(&self, tenant_id: &str, session_ids: &[String]) -> Result<Vec<SessionHead>> {
        let pipeline = [
            doc! { "$match": { (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): { "$in": session_ids }, (fields::SEQ): { "$gt": 0_i64 } } },
            doc! { "$sort": { (fields::TENANT_ID): -1, (fields::SESSION_ID): -1, (fields::SEQ): -1 } },
            doc! { "$group": {
                (fields::ID): format!("${}", fields::SESSION_ID), (fields::SEQ): { "$first": format!("${}", fields::SEQ) }, (fields::MESSAGE_ID): { "$first": format!("${}", fields::MESSAGE_ID) },
                (fields::SENDER_ID): { "$first": format!("${}", fields::SENDER_ID) }, (fields::TIMESTAMP_US): { "$first": format!("${}", fields::TIMESTAMP_US) },
                (fields::MESSAGE_TYPE): { "$first": format!("${}", fields::MESSAGE_TYPE) }, (fields::CONTENT_TYPE): { "$first": format!("${}", fields::CONTENT_TYPE) },
            } },
        ];
        let groups: Vec<Document> = self.messages.aggregate(pipeline).await?.try_collect().await?;
        Ok(groups
            .iter()
            .map(|group| {
                let text = |field: &str| group.get_str(field).unwrap_or_default().to_owned();
                SessionHead {
                    session_id: text(fields::ID),
                    last_seq: integer(group.get(fields::SEQ)),
                    last_message_id: text(fields::MESSAGE_ID),
                    last_sender_id: text(fields::SENDER_ID),
                    last_message_time: micros(group.get(fields::TIMESTAMP_US)).unwrap_or_default(),
                    message_type: integer(group.get(fields::MESSAGE_TYPE)) as i32,
                    content_type: text(fields::CONTENT_TYPE),
                }
            })
            .collect())
    }

    /// `user_id`'s read seq in each of `session_ids`: the larger of the last read position
    /// recorded and the seq of the user's newest own message (0 when neither exists).
    pub async fn read_seqs(
        &self,
        tenant_id: &str,
        user_id: &str,
        session_ids: &[String],
    ) -> Result<HashMap<String, i64>> {
        let mut seqs: HashMap<String, i64> = session_ids.iter().map(|session| (session.clone(), 0)).collect();
        let ids: Vec<String> = session_ids.iter().map(|session| clear_id(tenant_id, session, user_id)).collect();
        let recorded: Vec<Document> =
            self.reads.find(doc! { (fields::ID): { "$in": ids } }).await?.try_collect().await?;
        let own = [
            doc! { "$match": { (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): { "$in": session_ids }, (fields::SENDER_ID): user_id } },
            doc! { "$group": { (fields::ID): format!("${}", fields::SESSION_ID), "read_seq": { "$max": format!("${}", fields::SEQ) } } },
        ];
        let own: Vec<Document> = self.messages.aggregate(own).await?.try_collect().await?;
        let found =
            recorded.iter().filter_map(|read| Some((read.get_str(fields::SESSION_ID).ok()?, read.get("read_seq"))));
        let found =
            found.chain(own.iter().filter_map(|group| Some((group.get_str(fields::ID).ok()?, group.get("read_seq")))));
        for (session_id, read_seq) in found {
            if let Some(seq) = seqs.get_mut(session_id) {
                *seq = (*seq).max(integer(read_seq));
            }
        }
        Ok(seqs)
    }

    /// Records that `user_id` read `session_id` up to `read_seq`, never lowering what was
    /// recorded.
    pub async fn save_read_seq(&self, tenant_id: &str, session_id: &str, user_id: &str, read_seq: i64) -> Result<()> {
        self.reads
            .update_one(
                doc! { (fields::ID): clear_id(tenant_id, session_id, user_id) },
                doc! {
                    "$setOnInsert": { (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id, "user_id": user_id },
                    "$max": { "read_seq": read_seq },
                },
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// How many messages of each range `user_id` can see and did not send: not deleted,
    /// recalled or burned, not hidden or cleared for the user. The user's views of all the
    /// sessions in two queries, then one count per session, eight at a time.
    pub async fn unread_counts(
        &self,
        tenant_id: &str,
        user_id: &str,
        ranges: &[UnreadRange],
    ) -> Result<HashMap<String, i64>> {
        let now_us = Utc::now().timestamp_micros();
        let sessions: Vec<&str> = ranges.iter().map(|range| range.session_id.as_str()).collect();
        let filter =
            doc! { (fields::TENANT_ID): tenant_id, "user_id": user_id, (fields::SESSION_ID): { "$in": &sessions } };
        let hidden: Vec<Document> = self.hidden.find(filter.clone()).await?.try_collect().await?;
        let clears: Vec<Document> = self.clears.find(filter).await?.try_collect().await?;
        let count = |range: &UnreadRange| {
            let session = range.session_id.as_str();
            let hidden: Vec<&str> = hidden
                .iter()
                .filter(|view| view.get_str(fields::SESSION_ID).is_ok_and(|id| id == session))
                .filter_map(|view| view.get_str(fields::MESSAGE_ID).ok())
                .collect();
            let cleared_before = clears
                .iter()
                .find(|clear| clear.get_str(fields::SESSION_ID).is_ok_and(|id| id == session))
                .map_or(i64::MIN, |clear| integer(clear.get("cleared_before_us")));
            let filter = doc! {
                (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session,
                (fields::SEQ): { "$gt": range.read_seq, "$lte": range.last_seq },
                (fields::DELETED_AT_US): Bson::Null, (fields::IS_RECALLED): { "$ne": true }, (fields::SENDER_ID): { "$ne": user_id },
                "$or": [{ (fields::BURNED_AT_US): Bson::Null }, { (fields::BURNED_AT_US): { "$gt": now_us } }],
                (fields::MESSAGE_ID): { "$nin": hidden },
                (fields::TIMESTAMP_US): { "$gt": cleared_before },
            };
            let session = session.to_owned();
            async move { Ok::<_, mongodb::error::Error>((session, self.messages.count_documents(filter).await? as i64)) }
        };
        let mut counts = HashMap::new();
        for chunk in ranges.chunks(8) {
            counts.extend(futures::future::try_join_all(chunk.iter().map(count)).await?);
        }
        Ok(counts)
    }

    async fn cleared_before(&self, tenant_id: &str, session_id: &str, user: &str) -> Result<Option<i64>> {
        let clear = self.clears.find_one(doc! { (fields::ID): clear_id(tenant_id, session_id, user) }).await?;
        Ok(clear.map(|clear| integer(clear.get("cleared_before_us"))))
    }

    /// Soft-deletes messages of a session for everyone; returns the ids newly deleted.
    pub async fn delete_for_everyone(
        &self,
        tenant_id: &str,
        session_id: &str,
        message_ids: &[String],
        operation: &Operation,
    ) -> Result<Vec<String>> {
        let now = Utc::now().timestamp_micros();
        let mut deleted = Vec::new();
        for message_id in message_ids {
            let result = self
                .messages
                .update_one(
                    doc! { (fields::ID): document_id(tenant_id, message_id), (fields::SESSION_ID): session_id, (fields::DELETED_AT_US): Bson::Null },
                    doc! { "$set": { (fields::DELETED_AT_US): now, (fields::SEARCH_TEXT): Bson::Null, (fields::SEARCH_TERMS): [] }, "$push": { (fields::OPERATIONS): operation_document(operation)? } },
                )
                .await?;
            if result.modified_count > 0 {
                deleted.push(message_id.clone());
            }
        }
        Ok(deleted)
    }

    /// Marks a message recalled and drops its content; returns the recall time, or `None`
    /// when it was already recalled.
    pub async fn recall(
        &self,
        tenant_id: &str,
        message_id: &str,
        recalled_at: DateTime<Utc>,
        payload_without_content: &[u8],
        operation: &Operation,
    ) -> Result<Option<DateTime<Utc>>> {
        let result = self
            .messages
            .update_one(
                doc! { (fields::ID): document_id(tenant_id, message_id), (fields::IS_RECALLED): { "$ne": true } },
                doc! {
                    "$set": {
                        (fields::IS_RECALLED): true,
                        (fields::RECALLED_AT_US): recalled_at.timestamp_micros(),
                        (fields::SEARCH_TEXT): Bson::Null,
                        (fields::SEARCH_TERMS): [],
                        (fields::PAYLOAD): binary(payload_without_content),
                    },
                    "$push": { (fields::OPERATIONS): operation_document(operation)? },
                },
            )
            .await?;
        Ok((result.modified_count > 0).then_some(recalled_at))
    }

    /// Hides a message for one user; `permanent` is never taken back once set. Returns
    /// whether it is newly hidden.
    pub async fn hide_for_user(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        message_id: &str,
        permanent: bool,
    ) -> Result<bool> {
        let mut on_insert = doc! { (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id, "user_id": user_id, (fields::MESSAGE_ID): message_id };
        let mut update = doc! {};
        if permanent {
            update.insert("$set", doc! { "permanent": true });
        } else {
            on_insert.insert("permanent", false);
        }
        update.insert("$setOnInsert", on_insert);
        let result = self
            .hidden
            .update_one(doc! { (fields::ID): hidden_id(tenant_id, user_id, message_id) }, update)
            .upsert(true)
            .await?;
        Ok(result.upserted_id.is_some())
    }

    /// Raises a user's clear watermark for a session to `before` (never lowers it); returns
    /// the watermark in force and how many visible messages it newly covers.
    pub async fn clear_session(
        &self,
        tenant_id: &str,
        session_id: &str,
        user_id: &str,
        before: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, i64)> {
        let previous = self.cleared_before(tenant_id, session_id, user_id).await?;
        self.clears
            .update_one(
                doc! { (fields::ID): clear_id(tenant_id, session_id, user_id) },
                doc! {
                    "$setOnInsert": { (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id, "user_id": user_id },
                    "$max": { "cleared_before_us": before.timestamp_micros() },
                    "$set": { "cleared_at_us": Utc::now().timestamp_micros() },
                },
            )
            .upsert(true)
            .await?;
        let watermark = self.cleared_before(tenant_id, session_id, user_id).await?.unwrap_or(before.timestamp_micros());
        let covered = self
            .messages
            .count_documents(doc! {
                (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id, (fields::DELETED_AT_US): Bson::Null,
                (fields::TIMESTAMP_US): { "$gt": previous.unwrap_or(i64::MIN), "$lte": watermark },
            })
            .await?;
        Ok((DateTime::from_timestamp_micros(watermark).unwrap_or(before), covered as i64))
    }

    /// Records that `user_id` read a message (once; a later read keeps the first time) and,
    /// for burn-after-read messages, the time its content is gone for everyone (the earliest
    /// wins). Returns the read receipts and the burn time.
    pub async fn mark_read(
        &self,
        tenant_id: &str,
        message_id: &str,
        user_id: &str,
        read_at: DateTime<Utc>,
        burn_at: Option<DateTime<Utc>>,
    ) -> Result<Option<(Vec<ReadRecord>, Option<DateTime<Utc>>)>> {
        let id = document_id(tenant_id, message_id);
        self.messages
            .update_one(
                doc! { (fields::ID): &id, (fields::DELETED_AT_US): Bson::Null, (format!("{}.user_id", fields::READ_BY)): { "$ne": user_id } },
                doc! { "$push": { (fields::READ_BY): { "user_id": user_id, "read_at_us": read_at.timestamp_micros() } } },
            )
            .await?;
        if let Some(burn_at) = burn_at {
            let burn_us = burn_at.timestamp_micros();
            self.messages
                .update_one(
                    doc! {
                        (fields::ID): &id, (fields::DELETED_AT_US): Bson::Null,
                        "$or": [{ (fields::BURNED_AT_US): Bson::Null }, { (fields::BURNED_AT_US): { "$gt": burn_us } }],
                    },
                    doc! { "$set": { (fields::BURNED_AT_US): burn_us } },
                )
                .await?;
        }
        let Some(document) =
            self.messages.find_one(doc! { (fields::ID): &id, (fields::DELETED_AT_US): Bson::Null }).await?
        else {
            return Ok(None);
        };
        Ok(Some((read_records(&document), micros(document.get(fields::BURNED_AT_US)))))
    }

    /// Merges attributes into a message and, when `tags` is given, replaces its tags. The
    /// merge is a compare-and-set on an attribute version, so concurrent merges both land
    /// (attribute names may hold dots, which an update path would split); a lost race is
    /// retried after a random pause of up to 2^attempt ms, [`ATTRIBUTE_RETRIES`] times.
    pub async fn set_attributes(
        &self,
        tenant_id: &str,
        message_id: &str,
        attributes: &HashMap<String, String>,
        tags: Option<&[String]>,
        operation: &Operation,
    ) -> Result<Merge> {
        let id = document_id(tenant_id, message_id);
        for attempt in 0..ATTRIBUTE_RETRIES {
            if attempt > 0 {
                let jitter = uuid::Uuid::new_v4().as_u128() % (1 << attempt);
                tokio::time::sleep(Duration::from_millis(jitter as u64)).await;
            }
            let Some(document) =
                self.messages.find_one(doc! { (fields::ID): &id, (fields::DELETED_AT_US): Bson::Null }).await?
            else {
                return Ok(Merge::NotFound);
            };
            let version = document.get(fields::ATTRIBUTES_VERSION).cloned().unwrap_or(Bson::Null);
            let mut merged = document.get_document(fields::ATTRIBUTES).cloned().unwrap_or_default();
            for (name, value) in attributes {
                merged.insert(name.clone(), value.clone());
            }
            let mut set = doc! { (fields::ATTRIBUTES): merged };
            if let Some(tags) = tags {
                set.insert(fields::TAGS, tags);
            }
            let result = self
                .messages
                .update_one(
                    doc! { (fields::ID): &id, (fields::DELETED_AT_US): Bson::Null, (fields::ATTRIBUTES_VERSION): version },
                    doc! {
                        "$set": set,
                        "$inc": { (fields::ATTRIBUTES_VERSION): 1_i64 },
                        "$push": { (fields::OPERATIONS): operation_document(operation)? },
                    },
                )
                .await?;
            if result.matched_count > 0 {
                return Ok(Merge::Done);
            }
        }
        Ok(Merge::Contended)
    }

    /// The tenant's distinct tags, sorted, at most `limit`.
    pub async fn tags(&self, tenant_id: &str, limit: i64) -> Result<Vec<String>> {
        let values = self
            .messages
            .distinct(fields::TAGS, doc! { (fields::TENANT_ID): tenant_id, (fields::DELETED_AT_US): Bson::Null })
            .await?;
        let mut tags: Vec<String> = values.into_iter().filter_map(|tag| tag.as_str().map(str::to_owned)).collect();
        tags.sort_unstable();
        tags.dedup();
        tags.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(tags)
    }

    /// Every per-user view fact of a session (hides and clear watermarks).
    pub async fn session_views(&self, tenant_id: &str, session_id: &str) -> Result<SessionViews> {
        let filter = doc! { (fields::TENANT_ID): tenant_id, (fields::SESSION_ID): session_id };
        let hidden: Vec<Document> = self.hidden.find(filter.clone()).await?.try_collect().await?;
        let clears: Vec<Document> = self.clears.find(filter).await?.try_collect().await?;
        let text = |view: &Document, field: &str| view.get_str(field).unwrap_or_default().to_owned();
        Ok(SessionViews {
            hidden: hidden.iter().map(|view| (text(view, "user_id"), text(view, fields::MESSAGE_ID))).collect(),
            clears: clears
                .iter()
                .filter_map(|clear| Some((text(clear, "user_id"), micros(clear.get("cleared_before_us"))?)))
                .collect(),
        })
    }

    /// Messages matching a search, `limit` at most, in its time order, after its cursor.
    /// Text is found as in PostgreSQL: candidates by their index terms (multikey index on
    /// `search_terms`), then the exact substring in the normal form `search_text`.
    pub async fn search(&self, query: &SearchQuery, limit: i64) -> Result<Vec<StoredRow>> {
        let now_us = Utc::now().timestamp_micros();
        let mut clauses = vec![doc! { (fields::TENANT_ID): &query.tenant_id, (fields::DELETED_AT_US): Bson::Null }];
        if !query.contains.is_empty() {
            let terms: BTreeSet<String> = query.contains.iter().flat_map(|text| query_terms(text)).collect();
            if !terms.is_empty() {
                clauses.push(doc! { (fields::SEARCH_TERMS): { "$all": terms.into_iter().collect::<Vec<_>>() } });
            }
            for text in &query.contains {
                clauses.push(doc! { (fields::SEARCH_TEXT): { "$regex": regex_literal(text) } });
            }
            // Recalled and burned content is never found, even before its terms are removed.
            clauses.push(doc! { (fields::IS_RECALLED): { "$ne": true } });
            clauses.push(
                doc! { "$or": [{ (fields::BURNED_AT_US): Bson::Null }, { (fields::BURNED_AT_US): { "$gt": now_us } }] },
            );
        }
        among(&mut clauses, fields::SESSION_ID, &query.session_id);
        among(&mut clauses, fields::SENDER_ID, &query.sender_id);
        among(&mut clauses, fields::BUSINESS_TYPE, &query.business_type);
        among(&mut clauses, fields::MESSAGE_TYPE, &query.message_type);
        among(&mut clauses, fields::TAGS, &query.tags);
        for (comparison, value) in &query.seq {
            clauses.push(doc! { (fields::SEQ): { operator(*comparison): *value } });
        }
        if let Some(from) = query.from {
            clauses.push(doc! { (fields::TIMESTAMP_US): { "$gte": from.timestamp_micros() } });
        }
        if let Some(to) = query.to {
            clauses.push(doc! { (fields::TIMESTAMP_US): { "$lte": to.timestamp_micros() } });
        }
        if let Some(after) = &query.after {
            clauses.push(keyset(if query.ascending { "$gt" } else { "$lt" }, after.timestamp, &after.message_id));
        }
        clauses.extend(self.user_clauses(&query.tenant_id, None, &query.user).await?);
        let order = if query.ascending { 1 } else { -1 };
        self.find(clauses, doc! { (fields::TIMESTAMP_US): order, (fields::MESSAGE_ID): order }, limit).await
    }

    /// Removes the content of up to `limit` messages whose burn time has passed (reads
    /// already hide it by time). Returns how many were wiped.
    pub async fn wipe_burned(&self, limit: i64, strip: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Result<u64> {
        let due = doc! { (fields::BURNED_AT_US): { "$lte": Utc::now().timestamp_micros() }, (fields::BURN_WIPED): { "$ne": true } };
        let options = FindOptions::builder().limit(limit).projection(doc! { (fields::PAYLOAD): 1 }).build();
        let documents: Vec<Document> = self.messages.find(due).with_options(options).await?.try_collect().await?;
        let mut wiped = 0;
        for document in documents {
            let mut set =
                doc! { (fields::SEARCH_TEXT): Bson::Null, (fields::SEARCH_TERMS): [], (fields::BURN_WIPED): true };
            if let Some(payload) = payload(&document).and_then(|payload| strip(&payload)) {
                set.insert(fields::PAYLOAD, binary(&payload));
            }
            let id = document.get(fields::ID).cloned().unwrap_or(Bson::Null);
            wiped += self.messages.update_one(doc! { (fields::ID): id }, doc! { "$set": set }).await?.modified_count;
        }
        Ok(wiped)
    }
}

/// Whether a MongoDB error means the server could not be reached (worth retrying elsewhere
/// or later) rather than a failed operation.
pub fn unreachable(error: &mongodb::error::Error) -> bool {
    matches!(
        error.kind.as_ref(),
        ErrorKind::ServerSelection { .. } | ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. }
    )
}

fn hidden_id(tenant_id: &str, user_id: &str, message_id: &str) -> String {
    format!("{}:{tenant_id}:{}:{user_id}:{message_id}", tenant_id.len(), user_id.len())
}

fn clear_id(tenant_id: &str, session_id: &str, user_id: &str) -> String {
    format!("{}:{tenant_id}:{}:{session_id}:{user_id}", tenant_id.len(), session_id.len())
}

/// Strictly after (`$gt`) or before (`$lt`) a (time, message id) position.
fn keyset(direction: &str, timestamp: DateTime<Utc>, message_id: &str) -> Document {
    let timestamp_us = timestamp.timestamp_micros();
    doc! { "$or": [
        { (fields::TIMESTAMP_US): { direction: timestamp_us } },
        { (fields::TIMESTAMP_US): timestamp_us, (fields::MESSAGE_ID): { direction: message_id } },
    ] }
}

fn among<T: Into<Bson> + Clone>(clauses: &mut Vec<Document>, field: &str, among: &Among<T>) {
    if let Some(include) = &among.include {
        clauses.push(doc! { field: { "$in": include.iter().cloned().map(Into::into).collect::<Vec<Bson>>() } });
    }
    if !among.exclude.is_empty() {
        clauses.push(doc! { field: { "$nin": among.exclude.iter().cloned().map(Into::into).collect::<Vec<Bson>>() } });
    }
}

fn operator(comparison: Comparison) -> &'static str {
    match comparison {
        Comparison::Eq => "$eq",
        Comparison::Ne => "$ne",
        Comparison::Gt => "$gt",
        Comparison::Ge => "$gte",
        Comparison::Lt => "$lt",
        Comparison::Le => "$lte",
    }
}

/// A regular expression matching `text` literally: search text is data, never a pattern.
fn regex_literal(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 8);
    for character in text.chars() {
        if "\\^$.|?*+()[]{}".contains(character) {
            pattern.push('\\');
        }
        pattern.push(character);
    }
    pattern
}

fn binary(bytes: &[u8]) -> Bson {
    Bson::Binary(mongodb::bson::Binary { subtype: BinarySubtype::Generic, bytes: bytes.to_vec() })
}

fn payload(document: &Document) -> Option<Vec<u8>> {
    match document.get(fields::PAYLOAD)? {
        Bson::Binary(binary) => Some(binary.bytes.clone()),
        _ => None,
    }
}

fn operation_document(operation: &Operation) -> Result<Bson> {
    mongodb::bson::to_bson(operation).map_err(|error| mongodb::error::Error::custom(error.to_string()))
}

/// A number of any BSON integer or double type; 0 when absent.
fn integer(value: Option<&Bson>) -> i64 {
    match value {
        Some(Bson::Int64(value)) => *value,
        Some(Bson::Int32(value)) => i64::from(*value),
        Some(Bson::Double(value)) => *value as i64,
        _ => 0,
    }
}

fn micros(value: Option<&Bson>) -> Option<DateTime<Utc>> {
    match value {
        None | Some(Bson::Null) => None,
        value => DateTime::from_timestamp_micros(integer(value)),
    }
}

fn strings(value: Option<&Bson>) -> Vec<String> {
    match value {
        Some(Bson::Array(values)) => values.iter().filter_map(|value| value.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

fn read_records(document: &Document) -> Vec<ReadRecord> {
    let Ok(records) = document.get_array(fields::READ_BY) else { return Vec::new() };
    records
        .iter()
        .filter_map(Bson::as_document)
        .map(|record| ReadRecord {
            user_id: record.get_str("user_id").unwrap_or_default().to_owned(),
            read_at_us: integer(record.get("read_at_us")),
        })
        .collect()
}

/// The stored payload and the fields that may have changed since it was written, shaped like
/// a Postgres row so both stores answer alike.
fn stored_row(document: &Document) -> Result<StoredRow> {
    let message_id = document.get_str(fields::MESSAGE_ID).unwrap_or_default().to_owned();
    let timestamp = match document.get(fields::TIMESTAMP_US) {
        Some(value) => micros(Some(value)),
        None => document
            .get_datetime(fields::TIMESTAMP)
            .ok()
            .and_then(|time| DateTime::from_timestamp_millis(time.timestamp_millis())),
    }
    .unwrap_or_default();
    let operations = match document.get_array(fields::OPERATIONS) {
        Ok(operations) => {
            operations.iter().filter_map(|operation| mongodb::bson::from_bson(operation.clone()).ok()).collect()
        }
        Err(_) => Vec::new(),
    };
    let attributes = document
        .get_document(fields::ATTRIBUTES)
        .map(|attributes| {
            attributes.iter().filter_map(|(name, value)| Some((name.clone(), value.as_str()?.to_owned()))).collect()
        })
        .unwrap_or_default();
    Ok(StoredRow {
        payload: payload(document).unwrap_or_default(),
        timestamp,
        seq: document.get(fields::SEQ).map(|seq| integer(Some(seq))),
        is_recalled: document.get_bool(fields::IS_RECALLED).unwrap_or(false),
        recalled_at: micros(document.get(fields::RECALLED_AT_US)),
        tags: strings(document.get(fields::TAGS)),
        attributes: JsonStrings(attributes),
        // Microseconds where the writer kept them (created_at_us), else the BSON date's ms.
        created_at: micros(document.get(fields::CREATED_AT_US))
            .or_else(|| {
                let time = document.get_datetime(fields::CREATED_AT).ok()?;
                DateTime::from_timestamp_millis(time.timestamp_millis())
            })
            .unwrap_or(timestamp),
        burned_at: micros(document.get(fields::BURNED_AT_US)),
        read_by: read_records(document),
        operations,
        message_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_text_is_matched_literally() {
        assert_eq!(regex_literal("100%"), "100%");
        assert_eq!(regex_literal("a.b*c"), r"a\.b\*c");
        assert_eq!(regex_literal("(消息)|[x]"), r"\(消息\)\|\[x\]");
        assert_eq!(regex_literal(r"\d+$"), r"\\d\+\$");
    }

    #[test]
    fn view_ids_cannot_collide_across_tenants_or_users() {
        assert_ne!(hidden_id("a:b", "c", "m"), hidden_id("a", "b:c", "m"));
        assert_ne!(hidden_id("t", "u:v", "m"), hidden_id("t", "u", "v:m"));
        assert_ne!(clear_id("t", "s:u", "v"), clear_id("t", "s", "u:v"));
    }
}
