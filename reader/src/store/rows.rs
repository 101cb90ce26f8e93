//! What the reader's stores give back and the shapes of the queries both take, the same for
//! PostgreSQL and MongoDB: each store maps its own rows or documents into these. (`FromRow`
//! is derived for PostgreSQL's rows; its JSON columns decode into plain fields.)

use chrono::{DateTime, Utc};
use flare_storage_common::stored_text::JsonStrings;

/// The stored payload and the columns that may have changed since it was written.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredRow {
    pub message_id: String,
    #[sqlx(rename = "timestamp")]
    pub timestamp: DateTime<Utc>,
    pub payload: Vec<u8>,
    pub seq: Option<i64>,
    pub is_recalled: bool,
    pub recalled_at: Option<DateTime<Utc>>,
    pub tags: Vec<String>,
    #[sqlx(json)]
    pub attributes: JsonStrings,
    pub created_at: DateTime<Utc>,
    pub burned_at: Option<DateTime<Utc>>,
    #[sqlx(json)]
    pub read_by: Vec<ReadRecord>,
    #[sqlx(json)]
    pub operations: Vec<Operation>,
}

/// A read receipt as kept in `messages.read_by`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReadRecord {
    pub user_id: String,
    pub read_at_us: i64,
}

/// An entry of `messages.operations`: who did what to the message, when.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Operation {
    pub operation_type: String,
    pub operator_id: String,
    pub operated_at_us: i64,
    #[serde(default)]
    pub target_user_id: String,
    #[serde(default)]
    pub metadata: JsonStrings,
}

/// A message a command acts on: the stored row and who it concerns.
#[derive(Debug, sqlx::FromRow)]
pub struct TargetRow {
    #[sqlx(flatten)]
    pub row: StoredRow,
    pub session_id: String,
    pub sender_id: String,
    pub receiver_id: String,
    pub receiver_ids: Vec<String>,
    pub is_burn_after_read: bool,
    pub burn_after_seconds: i32,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The newest message of a session: what its state shows.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionHead {
    pub session_id: String,
    pub last_seq: i64,
    pub last_message_id: String,
    pub last_sender_id: String,
    pub last_message_time: DateTime<Utc>,
    pub message_type: i32,
    pub content_type: String,
}

/// The seq range whose unread messages a user wants counted in a session: (read, last].
#[derive(Debug, Clone)]
pub struct UnreadRange {
    pub session_id: String,
    pub read_seq: i64,
    pub last_seq: i64,
}

/// Every per-user view fact of a session, to load into the cache.
#[derive(Debug, Default)]
pub struct SessionViews {
    pub hidden: Vec<(String, String)>,
    pub clears: Vec<(String, DateTime<Utc>)>,
}

/// A page of a session's history, newest first.
#[derive(Clone, Copy)]
pub struct SessionPage<'a> {
    pub tenant_id: &'a str,
    pub session_id: &'a str,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub before: Option<Before<'a>>,
    pub limit: i64,
    /// Leaves out what this user may not see ('' = nobody's view).
    pub user: &'a str,
}

/// Where a page of a session's history starts: strictly older than this message.
#[derive(Clone, Copy)]
pub struct Before<'a> {
    pub timestamp: DateTime<Utc>,
    pub message_id: &'a str,
}
