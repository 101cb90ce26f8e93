//! Read logic between the gRPC layer and the stores: applies defaults and bounds, turns stored
//! rows back into `Message`s and pages through a session's history.

use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::message::to_timestamp;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{Message, MessageTimeline};

use crate::cursor::Cursor;
use crate::error::Error;
use crate::store::postgres::{Before, PostgresStore, StoredRow};

/// Page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

pub struct Lookup {
    pub postgres: PostgresStore,
    pub default_range: Duration,
    pub max_page_size: u32,
}

/// A validated QueryMessages request.
pub struct PageQuery<'a> {
    pub tenant_id: &'a str,
    pub session_id: &'a str,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// 0 means the default page size; above the maximum it is lowered to the maximum.
    pub limit: u32,
    pub after: Option<Cursor>,
}

pub struct Page {
    pub messages: Vec<Message>,
    pub next_cursor: Option<String>,
    pub limit: u32,
}

impl Lookup {
    pub async fn message(&self, tenant_id: &str, message_id: &str) -> Result<Message, Error> {
        let row = self.postgres.message(tenant_id, message_id).await?;
        row.map(to_message).transpose()?.ok_or(Error::NotFound("message"))
    }

    /// One page of a session, newest first. `next_cursor` is set when older messages remain
    /// in the range.
    pub async fn session_page(&self, query: PageQuery<'_>) -> Result<Page, Error> {
        let limit = match query.limit {
            0 => DEFAULT_PAGE_SIZE.min(self.max_page_size),
            requested => requested.min(self.max_page_size),
        };
        let to = query.to.unwrap_or_else(Utc::now);
        let from = match query.from {
            Some(from) => from,
            None => to - chrono::Duration::from_std(self.default_range).unwrap_or(chrono::Duration::days(7)),
        };
        if from > to {
            return Err(Error::invalid("start_time", "must not be after end_time"));
        }
        let before =
            query.after.as_ref().map(|cursor| Before { timestamp: cursor.timestamp, message_id: &cursor.message_id });
        // One row more than the page tells whether another page exists, without counting.
        let mut rows = self
            .postgres
            .session_page(query.tenant_id, query.session_id, from, to, before, i64::from(limit) + 1)
            .await?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_cursor = match (has_more, rows.last()) {
            (true, Some(last)) => Some(
                Cursor { timestamp: last.timestamp, message_id: last.message_id.clone() }
                    .encode(query.tenant_id, query.session_id),
            ),
            _ => None,
        };
        let messages = rows.into_iter().map(to_message).collect::<Result<_, _>>()?;
        Ok(Page { messages, next_cursor, limit })
    }
}

/// The message as first stored, with the columns that may have changed since laid over it.
fn to_message(row: StoredRow) -> Result<Message, Error> {
    let mut message =
        Message::decode(row.payload.as_slice()).map_err(|_| Error::Corrupt { message_id: row.message_id.clone() })?;
    message.seq = row.seq.unwrap_or(0);
    message.status = row.status;
    message.tags = row.tags;
    message.attributes = row.attributes.0;
    message.is_recalled = row.is_recalled;
    message.recalled_at = row.recalled_at.map(to_timestamp);
    if message.is_recalled {
        message.content = None;
    }
    let timeline = message.timeline.get_or_insert_with(MessageTimeline::default);
    timeline.persisted_time = Some(to_timestamp(row.created_at));
    Ok(message)
}
