//! The message as every store keeps it: [`normalize`] turns a `StoreMessageRequest` from Kafka
//! into one validated `Message` whose tenant, session and timestamp are always set, so the
//! writer's sinks and the reader agree on what a stored message is.
//!
//! Invariants of a normalised message:
//! - `id`, `session_id`, the tenant, the sender and every receiver are at most
//!   [`MAX_ID_BYTES`] bytes and free of control characters (`id` and `session_id` non-empty);
//!   tags and the keys of `extra` and `attributes` are free of control characters. These are
//!   names: they are compared, filtered on and used as keys in every store, and PostgreSQL's
//!   text types cannot hold U+0000 at all.
//! - `tenant.tenant_id` is the resolved tenant (SPEC §2.1: request tenant, else message
//!   tenant, else empty).
//! - `timestamp` is set, not in the future by more than the writer allows, and like
//!   `recalled_at` within [`EARLIEST_STORABLE`]..=[`LATEST_STORABLE`], the times every store
//!   can hold. A zero timestamp (1970-01-01T00:00:00Z, what a default-initialised client
//!   sends) counts as absent.
//!
//! Free text (text and JSON content, values of `extra` and `attributes`, the label fields) is
//! kept as sent, U+0000 included; `stored_text` says how it goes into PostgreSQL.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::proto::common::TenantContext;
use crate::proto::storage::{Message, MessageContent, StoreMessageRequest, message_content};

/// Upper bound on every identifier (message, session, tenant, user).
pub const MAX_ID_BYTES: usize = 64;

/// The earliest time every store holds: PostgreSQL's `timestamptz` starts at
/// 4714-11-24 00:00:00 UTC BC (Julian day 0; ISO year -4713). BSON dates and MongoDB's
/// microsecond `timestamp_us` reach much further back.
pub const EARLIEST_STORABLE: DateTime<Utc> = match DateTime::from_timestamp(-210_866_803_200, 0) {
    Some(time) => time,
    None => DateTime::<Utc>::MIN_UTC,
};

/// The latest time every store and both services represent: chrono's last instant,
/// +262142-12-31T23:59:59.999999999Z. PostgreSQL goes on to 294276 AD and MongoDB's
/// microsecond `timestamp_us` to 294247 AD, so this conversion is the binding limit.
pub const LATEST_STORABLE: DateTime<Utc> = DateTime::<Utc>::MAX_UTC;

/// Why a record can never be stored. The writer dead-letters it with this text as the reason;
/// every variant names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("field {field} is longer than {MAX_ID_BYTES} bytes")]
    TooLong { field: String },
    #[error("field {field} contains control characters")]
    ControlCharacters { field: String },
    #[error("session_id of the request and of the message differ")]
    SessionMismatch,
    #[error("field {field} is not a valid timestamp: nanos must be within 0..=999999999")]
    MalformedTimestamp { field: &'static str },
    #[error("field {field} is before 4714-11-24T00:00:00Z BC (-210866803200 s), the earliest time PostgreSQL stores")]
    TooEarly { field: &'static str },
    #[error("field {field} is after +262142-12-31T23:59:59.999999999Z, the latest time flare-storage represents")]
    TooLate { field: &'static str },
    #[error(
        "field {field} is {ahead_seconds} s ahead of the record's time; at most {limit_seconds} s are accepted (WRITER_MAX_FUTURE_SECONDS)"
    )]
    InFuture { field: &'static str, ahead_seconds: i64, limit_seconds: i64 },
    #[error(
        "field {field} is {age_seconds} s before the record's time, past the retention of {limit_seconds} s (STORAGE_RETENTION_DAYS): it would be deleted at once"
    )]
    PastRetention { field: &'static str, age_seconds: i64, limit_seconds: i64 },
}

impl InvalidMessage {
    /// The same problem, located at element `index` of the field.
    fn at(self, index: usize) -> Self {
        self.located(|field| format!("{field}[{index}]"))
    }

    /// The same problem, located at key `key` of the (map) field.
    fn key(self, key: &str) -> Self {
        self.located(|field| format!("{field} key {key:?}"))
    }

    fn located(self, locate: impl FnOnce(&str) -> String) -> Self {
        match self {
            InvalidMessage::TooLong { field } => InvalidMessage::TooLong { field: locate(&field) },
            InvalidMessage::ControlCharacters { field } => InvalidMessage::ControlCharacters { field: locate(&field) },
            other => other,
        }
    }
}

/// Tenant of a request: `tenant.tenant_id` of the request, else of the message, else `""`.
pub fn tenant_id(request: &StoreMessageRequest) -> &str {
    let from_request = request.tenant.as_ref().map(|tenant| tenant.tenant_id.as_str());
    let from_message =
        request.message.as_ref().and_then(|message| message.tenant.as_ref()).map(|tenant| tenant.tenant_id.as_str());
    [from_request, from_message].into_iter().flatten().find(|id| !id.is_empty()).unwrap_or("")
}

/// Validates an identifier field; empty is allowed only where `required` is false.
pub fn check_id(field: &'static str, value: &str, required: bool) -> Result<(), InvalidMessage> {
    if value.is_empty() {
        return if required { Err(InvalidMessage::Missing(field)) } else { Ok(()) };
    }
    if value.len() > MAX_ID_BYTES {
        return Err(InvalidMessage::TooLong { field: field.to_owned() });
    }
    check_name(field, value)
}

/// Clears what only the store writes — read receipts, operations — and the content of a
/// recalled message, and cuts `recalled_at` to µs as the databases keep it, so a message reads
/// the same from the cache as from either database. For messages being stored and for payloads
/// stored before this rule (the writer caches those on a redelivery).
pub fn drop_store_owned(message: &mut Message) {
    message.read_by.clear();
    message.operations.clear();
    message.recalled_at = message.recalled_at.take().filter(|timestamp| !is_unset(timestamp)).map(|recalled_at| {
        match to_datetime(&recalled_at) {
            Some(time) => to_timestamp(in_micros(time)),
            None => recalled_at,
        }
    });
    if message.is_recalled {
        message.content = None;
    }
}

/// `time` cut to whole microseconds, the precision both databases keep.
pub fn in_micros(time: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(time.timestamp_micros()).unwrap_or(time)
}

/// Validates a name (tag, map key): any length, no control characters.
pub fn check_name(field: &'static str, value: &str) -> Result<(), InvalidMessage> {
    if value.chars().any(char::is_control) {
        return Err(InvalidMessage::ControlCharacters { field: field.to_owned() });
    }
    Ok(())
}

/// How far a message's own timestamp may stray from its record's time.
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    /// Later is refused: a message dated ahead sorts above everything sent after it until
    /// that time.
    pub max_ahead: chrono::Duration,
    /// Earlier is refused when set (the retention): such a message would be deleted at once.
    pub max_age: Option<chrono::Duration>,
}

/// Builds the stored form of a request.
///
/// `record_time` stands in for a missing (or zero) message timestamp and is what `bounds`
/// are measured from. It must be the same on every delivery of the record (the Kafka record
/// timestamp), because the timestamp is part of the message's identity in a TimescaleDB
/// hypertable, and a redelivery must be judged as the first delivery was. A `seq` sent by the
/// producer is dropped: the writer numbers every session itself. So are read receipts and
/// operations (only the reader's commands add them), and the content of a message sent
/// already recalled; its `recalled_at` is kept in µs, as the databases keep it — so the
/// message reads the same from the cache as from either database.
pub fn normalize(
    request: StoreMessageRequest,
    record_time: DateTime<Utc>,
    ingested_at: DateTime<Utc>,
    bounds: TimeBounds,
) -> Result<Message, InvalidMessage> {
    let tenant_id = tenant_id(&request).to_owned();
    let StoreMessageRequest { session_id, message, tenant, tags, .. } = request;
    let mut message = message.ok_or(InvalidMessage::Missing("message"))?;

    check_id("message.id", &message.id, true)?;
    if !session_id.is_empty() && !message.session_id.is_empty() && session_id != message.session_id {
        return Err(InvalidMessage::SessionMismatch);
    }
    if message.session_id.is_empty() {
        message.session_id = session_id;
    }
    check_id("session_id", &message.session_id, true)?;
    check_id("tenant.tenant_id", &tenant_id, false)?;
    check_names(&message, &tags)?;

    let mut message_tenant = message.tenant.take().or(tenant).unwrap_or_default();
    message_tenant.tenant_id = tenant_id;
    message.tenant = Some(message_tenant);

    match message.timestamp.take().filter(|timestamp| !is_unset(timestamp)) {
        Some(timestamp) => {
            let time = storable_time("message.timestamp", &timestamp)?;
            check_bounds("message.timestamp", time, record_time, bounds)?;
            message.timestamp = Some(timestamp);
        }
        None => message.timestamp = Some(to_timestamp(record_time)),
    }
    message.seq = 0;
    if let Some(recalled_at) = message.recalled_at.as_ref().filter(|timestamp| !is_unset(timestamp)) {
        storable_time("message.recalled_at", recalled_at)?;
    }
    if message.is_recalled && message.recalled_at.as_ref().is_none_or(is_unset) {
        // Sent recalled without a time: recalled when it was sent, as far as anyone can tell.
        message.recalled_at = Some(to_timestamp(record_time));
    }
    drop_store_owned(&mut message);
    let timeline = message.timeline.get_or_insert_with(Default::default);
    if timeline.ingestion_time.as_ref().is_none_or(is_unset) {
        timeline.ingestion_time = Some(to_timestamp(ingested_at));
    }
    // Request-level tags are key/value labels; they become attributes unless the message
    // already carries an attribute of the same name.
    for (key, value) in tags {
        message.attributes.entry(key).or_insert(value);
    }
    Ok(message)
}

/// The name rules of the users, tags and map keys a message carries.
fn check_names(
    message: &Message,
    request_tags: &std::collections::HashMap<String, String>,
) -> Result<(), InvalidMessage> {
    check_id("message.sender_id", &message.sender_id, false)?;
    check_id("message.receiver_id", &message.receiver_id, false)?;
    for (index, receiver) in message.receiver_ids.iter().enumerate() {
        check_id("message.receiver_ids", receiver, false).map_err(|invalid| invalid.at(index))?;
    }
    for (index, tag) in message.tags.iter().enumerate() {
        check_name("message.tags", tag).map_err(|invalid| invalid.at(index))?;
    }
    let maps = [("message.extra", &message.extra), ("message.attributes", &message.attributes), ("tags", request_tags)];
    for (field, map) in maps {
        for key in map.keys() {
            check_name(field, key).map_err(|invalid| invalid.key(key))?;
        }
    }
    Ok(())
}

/// Whether a timestamp means "not set": zero (1970-01-01T00:00:00Z) is what a
/// default-initialised client sends. Writer and reader both read it so.
pub fn is_unset(timestamp: &Timestamp) -> bool {
    timestamp.seconds == 0 && timestamp.nanos == 0
}

fn check_bounds(
    field: &'static str,
    time: DateTime<Utc>,
    record_time: DateTime<Utc>,
    bounds: TimeBounds,
) -> Result<(), InvalidMessage> {
    let ahead = time.signed_duration_since(record_time);
    if ahead > bounds.max_ahead {
        return Err(InvalidMessage::InFuture {
            field,
            ahead_seconds: ahead.num_seconds(),
            limit_seconds: bounds.max_ahead.num_seconds(),
        });
    }
    if let Some(max_age) = bounds.max_age
        && -ahead > max_age
    {
        return Err(InvalidMessage::PastRetention {
            field,
            age_seconds: (-ahead).num_seconds(),
            limit_seconds: max_age.num_seconds(),
        });
    }
    Ok(())
}

/// The time of `timestamp` when every store can hold it.
pub fn storable_time(field: &'static str, timestamp: &Timestamp) -> Result<DateTime<Utc>, InvalidMessage> {
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return Err(InvalidMessage::MalformedTimestamp { field });
    }
    match to_datetime(timestamp) {
        Some(time) if time < EARLIEST_STORABLE => Err(InvalidMessage::TooEarly { field }),
        Some(time) => Ok(time),
        None if timestamp.seconds < 0 => Err(InvalidMessage::TooEarly { field }),
        None => Err(InvalidMessage::TooLate { field }),
    }
}

/// Tenant id of a normalised message.
pub fn message_tenant_id(message: &Message) -> &str {
    message.tenant.as_ref().map(|tenant: &TenantContext| tenant.tenant_id.as_str()).unwrap_or("")
}

/// The `content_type` column value for a message's content.
pub fn content_type(message: &Message) -> &'static str {
    match message.content.as_ref().and_then(|content| content.content.as_ref()) {
        Some(message_content::Content::Text(_)) => "text",
        Some(message_content::Content::Binary(_)) => "binary",
        Some(message_content::Content::Json(_)) => "json",
        Some(message_content::Content::Custom(_)) => "custom",
        None => "",
    }
}

/// The text a search looks in: text content, or JSON content as written. (The writer's
/// search queue condition, `content_type IN ('text', 'json')`, follows this rule.)
pub fn searchable_text(message: &Message) -> Option<&str> {
    searchable_content(message.content.as_ref()?)
}

/// [`searchable_text`] of a message's content alone.
pub fn searchable_content(content: &MessageContent) -> Option<&str> {
    match content.content.as_ref()? {
        message_content::Content::Text(text) => Some(&text.text),
        message_content::Content::Json(json) => Some(json),
        message_content::Content::Binary(_) | message_content::Content::Custom(_) => None,
    }
}

/// Converts a protobuf timestamp; `None` when it is malformed (nanos outside
/// 0..=999,999,999, as the protobuf definition requires) or out of chrono's range.
pub fn to_datetime(timestamp: &Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok().filter(|nanos| *nanos < 1_000_000_000)?;
    DateTime::from_timestamp(timestamp.seconds, nanos)
}

/// Converts to a protobuf timestamp.
pub fn to_timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: time.timestamp(), nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::storage::{MessageOperation, MessageReadRecord, TextContent};

    fn request(session: &str, id: &str) -> StoreMessageRequest {
        StoreMessageRequest {
            session_id: session.into(),
            message: Some(Message {
                id: id.into(),
                content: Some(MessageContent {
                    content: Some(message_content::Content::Text(TextContent {
                        text: "你好".into(),
                        mentions: vec![],
                    })),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).expect("valid time")
    }

    fn day() -> TimeBounds {
        TimeBounds { max_ahead: chrono::Duration::days(1), max_age: None }
    }

    fn normalized(request: StoreMessageRequest) -> Result<Message, InvalidMessage> {
        normalize(request, now(), now(), day())
    }

    fn with(edit: impl FnOnce(&mut StoreMessageRequest)) -> StoreMessageRequest {
        let mut request = request("s", "m");
        edit(&mut request);
        request
    }

    fn message_of(request: &mut StoreMessageRequest) -> &mut Message {
        request.message.as_mut().expect("message")
    }

    #[test]
    fn tenant_prefers_request_then_message() {
        let mut req = request("s", "m");
        assert_eq!(tenant_id(&req), "");
        req.message.as_mut().expect("message").tenant =
            Some(TenantContext { tenant_id: "from-message".into(), ..Default::default() });
        assert_eq!(tenant_id(&req), "from-message");
        req.tenant = Some(TenantContext { tenant_id: "from-request".into(), ..Default::default() });
        assert_eq!(tenant_id(&req), "from-request");
        req.tenant = Some(TenantContext::default());
        assert_eq!(tenant_id(&req), "from-message");
    }

    #[test]
    fn normalize_fills_session_tenant_and_time() {
        let mut req = request("s1", "m1");
        req.tenant = Some(TenantContext { tenant_id: "t1".into(), ..Default::default() });
        req.tags.insert("channel".into(), "app".into());
        let message = normalized(req).expect("valid");
        assert_eq!(message.session_id, "s1");
        assert_eq!(message_tenant_id(&message), "t1");
        assert_eq!(message.timestamp, Some(to_timestamp(now())));
        assert_eq!(message.attributes.get("channel").map(String::as_str), Some("app"));
        assert_eq!(content_type(&message), "text");
    }

    #[test]
    fn normalize_rejects_bad_records() {
        let missing_message = StoreMessageRequest { session_id: "s".into(), ..Default::default() };
        assert_eq!(normalized(missing_message), Err(InvalidMessage::Missing("message")));
        assert_eq!(normalized(request("s", "")), Err(InvalidMessage::Missing("message.id")));
        assert_eq!(normalized(request("", "m")), Err(InvalidMessage::Missing("session_id")));
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert_eq!(normalized(request("s", &long)), Err(InvalidMessage::TooLong { field: "message.id".into() }));
        assert_eq!(
            normalized(request("s\n", "m")),
            Err(InvalidMessage::ControlCharacters { field: "session_id".into() })
        );
        let mut mismatch = request("s1", "m");
        mismatch.message.as_mut().expect("message").session_id = "s2".into();
        assert_eq!(normalized(mismatch), Err(InvalidMessage::SessionMismatch));
    }

    #[test]
    fn exact_id_limit_is_accepted() {
        let id = "x".repeat(MAX_ID_BYTES);
        assert!(normalized(request("s", &id)).is_ok());
    }

    /// Every name a message carries refuses U+0000 (and other control characters), naming
    /// where it is; PostgreSQL's text types cannot hold it and names are compared as given.
    #[test]
    fn names_with_nul_are_refused_where_they_are() {
        let cases: Vec<(StoreMessageRequest, &str)> = vec![
            (with(|r| message_of(r).id = "m\0".into()), "field message.id contains"),
            (with(|r| r.session_id = "s\0".into()), "field session_id contains"),
            (
                with(|r| r.tenant = Some(TenantContext { tenant_id: "t\0".into(), ..Default::default() })),
                "field tenant.tenant_id contains",
            ),
            (with(|r| message_of(r).sender_id = "a\0".into()), "field message.sender_id contains"),
            (with(|r| message_of(r).receiver_id = "b\0".into()), "field message.receiver_id contains"),
            (
                with(|r| message_of(r).receiver_ids = vec!["b".into(), "c\0".into()]),
                "field message.receiver_ids[1] contains",
            ),
            (with(|r| message_of(r).tags = vec!["\0".into()]), "field message.tags[0] contains"),
            (
                with(|r| {
                    message_of(r).extra.insert("k\0".into(), "v".into());
                }),
                "field message.extra key \"k\\0\" contains",
            ),
            (
                with(|r| {
                    message_of(r).attributes.insert("\0".into(), "v".into());
                }),
                "field message.attributes key \"\\0\" contains",
            ),
            (
                with(|r| {
                    r.tags.insert("a\0b".into(), "v".into());
                }),
                "field tags key \"a\\0b\" contains",
            ),
            (
                with(|r| message_of(r).receiver_ids = vec!["x".repeat(MAX_ID_BYTES + 1)]),
                "field message.receiver_ids[0] is longer than 64 bytes",
            ),
        ];
        for (request, expected) in cases {
            let reason = normalized(request).expect_err(expected).to_string();
            assert!(reason.starts_with(expected), "{reason:?} should start with {expected:?}");
        }
    }

    /// Free text keeps U+0000: it is legal text, and the payload carries it intact.
    #[test]
    fn free_text_with_nul_is_kept() {
        let request = with(|r| {
            let message = message_of(r);
            message.content = Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent {
                    text: "before\0after".into(),
                    mentions: vec![],
                })),
            });
            message.extra.insert("k".into(), "v\0".into());
            message.attributes.insert("k".into(), "\0".into());
            message.business_type = "b\0".into();
            message.status = "s\0".into();
            r.tags.insert("t".into(), "x\0y".into());
        });
        let message = normalized(request).expect("storable");
        assert_eq!(searchable_text(&message), Some("before\0after"));
        assert_eq!(message.attributes.get("t").map(String::as_str), Some("x\0y"));
        assert_eq!(message.extra.get("k").map(String::as_str), Some("v\0"));
    }

    #[test]
    fn timestamps_are_checked_at_both_ends_of_the_stores_range() {
        let at = |seconds: i64, nanos: i32| {
            normalized(with(|r| message_of(r).timestamp = Some(Timestamp { seconds, nanos })))
        };
        let earliest = EARLIEST_STORABLE.timestamp();
        assert!(at(earliest, 0).is_ok(), "PostgreSQL's first instant is storable");
        assert_eq!(at(earliest - 1, 999_999_999), Err(InvalidMessage::TooEarly { field: "message.timestamp" }));
        assert_eq!(at(-300_000_000_000, 0), Err(InvalidMessage::TooEarly { field: "message.timestamp" }));
        assert_eq!(at(i64::MIN, 0), Err(InvalidMessage::TooEarly { field: "message.timestamp" }));
        assert_eq!(at(i64::MAX, 0), Err(InvalidMessage::TooLate { field: "message.timestamp" }));
        assert_eq!(at(1, -1), Err(InvalidMessage::MalformedTimestamp { field: "message.timestamp" }));
        assert_eq!(at(1, 1_000_000_000), Err(InvalidMessage::MalformedTimestamp { field: "message.timestamp" }));

        // The latest representable instant is storable when the writer allows that much future.
        let latest = LATEST_STORABLE.timestamp();
        let unlimited = TimeBounds { max_ahead: chrono::Duration::seconds(latest), max_age: None };
        let far = |seconds: i64| {
            normalize(
                with(|r| message_of(r).timestamp = Some(Timestamp { seconds, nanos: 0 })),
                now(),
                now(),
                unlimited,
            )
        };
        assert!(far(latest).is_ok());
        assert_eq!(far(latest + 1), Err(InvalidMessage::TooLate { field: "message.timestamp" }));

        let recalled =
            |seconds: i64| normalized(with(|r| message_of(r).recalled_at = Some(Timestamp { seconds, nanos: 0 })));
        assert_eq!(recalled(earliest - 1), Err(InvalidMessage::TooEarly { field: "message.recalled_at" }));
        assert!(recalled(earliest).is_ok());
    }

    #[test]
    fn timestamps_beyond_the_future_limit_are_refused() {
        let ahead = |seconds: i64| {
            normalized(with(|r| {
                message_of(r).timestamp = Some(to_timestamp(now() + chrono::Duration::seconds(seconds)))
            }))
        };
        assert!(ahead(180).is_ok(), "a fast clock within the limit");
        assert!(ahead(86_400).is_ok(), "exactly at the limit");
        let refused = ahead(86_401).expect_err("a second past the limit");
        assert_eq!(
            refused,
            InvalidMessage::InFuture { field: "message.timestamp", ahead_seconds: 86_401, limit_seconds: 86_400 }
        );
        assert!(refused.to_string().contains("WRITER_MAX_FUTURE_SECONDS"), "{refused}");

        // Judged from the record's time, so every delivery of a record is judged alike.
        let request = with(|r| message_of(r).timestamp = Some(to_timestamp(now() + chrono::Duration::days(2))));
        let much_later = now() + chrono::Duration::days(3);
        assert!(normalize(request, now(), much_later, day()).is_err());
    }

    #[test]
    fn timestamps_past_the_retention_are_refused() {
        let bounds = TimeBounds { max_ahead: chrono::Duration::days(1), max_age: Some(chrono::Duration::days(30)) };
        let aged = |days: i64| {
            let request = with(|r| message_of(r).timestamp = Some(to_timestamp(now() - chrono::Duration::days(days))));
            normalize(request, now(), now(), bounds)
        };
        assert!(aged(29).is_ok());
        let refused = aged(31).expect_err("past the retention");
        assert!(matches!(refused, InvalidMessage::PastRetention { limit_seconds: 2_592_000, .. }), "{refused}");
        assert!(refused.to_string().contains("STORAGE_RETENTION_DAYS"), "{refused}");
        assert!(
            normalized(with(|r| message_of(r).timestamp = Some(to_timestamp(now() - chrono::Duration::days(31)))))
                .is_ok(),
            "no retention, no limit"
        );
    }

    /// What only the store writes, and the content of a message sent recalled, never come
    /// from the producer; times come in the databases' µs.
    #[test]
    fn fields_the_store_owns_are_not_taken_from_the_producer() {
        let recalled = with(|request| {
            let sent = request.message.as_mut().expect("message");
            sent.is_recalled = true;
            sent.recalled_at = Some(Timestamp { seconds: 1_700_000_000, nanos: 123_456_789 });
            sent.read_by = vec![MessageReadRecord { user_id: "bob".into(), ..Default::default() }];
            sent.operations = vec![MessageOperation { operation_type: "recall".into(), ..Default::default() }];
        });
        let message = normalized(recalled).expect("valid");
        assert_eq!(message.content, None);
        assert!(message.read_by.is_empty() && message.operations.is_empty());
        assert_eq!(message.recalled_at, Some(Timestamp { seconds: 1_700_000_000, nanos: 123_456_000 }));
        assert!(message.is_recalled);

        let recalled_untimed = with(|request| request.message.as_mut().expect("message").is_recalled = true);
        let message = normalized(recalled_untimed).expect("valid");
        assert_eq!(message.recalled_at, Some(to_timestamp(now())), "recalled when sent");

        let sent = request("s", "m");
        let content = sent.message.as_ref().and_then(|message| message.content.clone());
        assert!(content.is_some());
        assert_eq!(normalized(sent).expect("valid").content, content, "content stays unless recalled");
    }

    #[test]
    fn a_producer_seq_is_dropped() {
        let message = normalized(with(|r| message_of(r).seq = 42)).expect("valid");
        assert_eq!(message.seq, 0);
    }

    #[test]
    fn zero_timestamps_count_as_absent() {
        let request = with(|r| {
            let message = message_of(r);
            message.timestamp = Some(Timestamp::default());
            message.recalled_at = Some(Timestamp::default());
            message.timeline = Some(crate::proto::storage::MessageTimeline {
                ingestion_time: Some(Timestamp::default()),
                ..Default::default()
            });
        });
        let record_time = now() - chrono::Duration::seconds(5);
        let message = normalize(request, record_time, now(), day()).expect("valid");
        assert_eq!(message.timestamp, Some(to_timestamp(record_time)));
        assert_eq!(message.recalled_at, None);
        assert_eq!(message.timeline.and_then(|timeline| timeline.ingestion_time), Some(to_timestamp(now())));
        // Only exactly zero: a time just after the epoch is a real time.
        let just_after = with(|r| message_of(r).timestamp = Some(Timestamp { seconds: 0, nanos: 1 }));
        assert_eq!(normalized(just_after).expect("valid").timestamp, Some(Timestamp { seconds: 0, nanos: 1 }));
    }
}
