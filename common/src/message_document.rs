//! Field names of a message's MongoDB document: the writer inserts it, the reader reads it and
//! its commands update it. (The reader's own collections — hides, clears, read positions —
//! name their `tenant_id`, `session_id` and `message_id` fields alike.)

pub const ID: &str = "_id";
pub const TENANT_ID: &str = "tenant_id";
pub const MESSAGE_ID: &str = "message_id";
pub const SESSION_ID: &str = "session_id";
pub const SEQ: &str = "seq";
pub const SENDER_ID: &str = "sender_id";
pub const SENDER_TYPE: &str = "sender_type";
pub const RECEIVER_ID: &str = "receiver_id";
pub const RECEIVER_IDS: &str = "receiver_ids";
pub const MESSAGE_TYPE: &str = "message_type";
pub const CONTENT_TYPE: &str = "content_type";
pub const BUSINESS_TYPE: &str = "business_type";
pub const SESSION_TYPE: &str = "session_type";
pub const STATUS: &str = "status";
/// Search normal form of the text (`text_search`), null when nothing can find it.
pub const SEARCH_TEXT: &str = "search_text";
/// Search terms (`text_search`), multikey-indexed.
pub const SEARCH_TERMS: &str = "search_terms";
/// BSON date (ms), for TTL indexes and people reading the collection.
pub const TIMESTAMP: &str = "timestamp";
/// Microseconds since the epoch: what reads order and compare by.
pub const TIMESTAMP_US: &str = "timestamp_us";
pub const CREATED_AT: &str = "created_at";
/// Microseconds, as PostgreSQL keeps `created_at`.
pub const CREATED_AT_US: &str = "created_at_us";
pub const IS_RECALLED: &str = "is_recalled";
pub const RECALLED_AT_US: &str = "recalled_at_us";
pub const IS_BURN_AFTER_READ: &str = "is_burn_after_read";
pub const BURN_AFTER_SECONDS: &str = "burn_after_seconds";
pub const BURNED_AT_US: &str = "burned_at_us";
/// Set once burned content is wiped from the document.
pub const BURN_WIPED: &str = "burn_wiped";
pub const DELETED_AT_US: &str = "deleted_at_us";
pub const TAGS: &str = "tags";
pub const ATTRIBUTES: &str = "attributes";
/// Counter the reader's attribute merge compares and sets.
pub const ATTRIBUTES_VERSION: &str = "attributes_version";
pub const EXTRA: &str = "extra";
pub const READ_BY: &str = "read_by";
pub const OPERATIONS: &str = "operations";
/// The Kafka record that stored the message, `{topic, partition, offset}`: the writer tells a
/// redelivery of that record from a second sending by it (written only by the writer).
pub const ORIGIN: &str = "origin";
/// The protobuf `Message` as stored.
pub const PAYLOAD: &str = "payload";
