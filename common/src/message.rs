//! The message as every store keeps it: [`normalize`] turns a `StoreMessageRequest` from Kafka
//! into one validated `Message` whose tenant, session and timestamp are always set, so the
//! writer's sinks and the reader agree on what a stored message is.
//!
//! Invariants of a normalised message: `id`, `session_id` are non-empty, at most
//! [`MAX_ID_BYTES`] bytes and free of control characters; `tenant.tenant_id` is the resolved
//! tenant (SPEC §2.1: request tenant, else message tenant, else empty); `timestamp` is set and
//! representable as a database timestamp.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::proto::common::TenantContext;
use crate::proto::storage::{Message, StoreMessageRequest, message_content};

/// Upper bound on every identifier (message, session, tenant, user).
pub const MAX_ID_BYTES: usize = 64;

/// Why a record can never be stored. The writer dead-letters it with this text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("field {field} is longer than {MAX_ID_BYTES} bytes")]
    TooLong { field: &'static str },
    #[error("field {field} contains control characters")]
    ControlCharacters { field: &'static str },
    #[error("session_id of the request and of the message differ")]
    SessionMismatch,
    #[error("field {0} is not a valid timestamp")]
    BadTimestamp(&'static str),
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
        return Err(InvalidMessage::TooLong { field });
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidMessage::ControlCharacters { field });
    }
    Ok(())
}

/// Builds the stored form of a request.
///
/// `record_time` stands in for a missing message timestamp. It must be the same on every
/// delivery of the record (the Kafka record timestamp), because the timestamp is part of the
/// message's identity in a TimescaleDB hypertable.
pub fn normalize(
    request: StoreMessageRequest,
    record_time: DateTime<Utc>,
    ingested_at: DateTime<Utc>,
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
    check_id("message.sender_id", &message.sender_id, false)?;

    let mut message_tenant = message.tenant.take().or(tenant).unwrap_or_default();
    message_tenant.tenant_id = tenant_id;
    message.tenant = Some(message_tenant);

    match &message.timestamp {
        Some(timestamp) => {
            to_datetime(timestamp).ok_or(InvalidMessage::BadTimestamp("message.timestamp"))?;
        }
        None => message.timestamp = Some(to_timestamp(record_time)),
    }
    let timeline = message.timeline.get_or_insert_with(Default::default);
    if timeline.ingestion_time.is_none() {
        timeline.ingestion_time = Some(to_timestamp(ingested_at));
    }
    // Request-level tags are key/value labels; they become attributes unless the message
    // already carries an attribute of the same name.
    for (key, value) in tags {
        message.attributes.entry(key).or_insert(value);
    }
    Ok(message)
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

/// The text a search looks in: text content, or JSON content as written.
pub fn searchable_text(message: &Message) -> Option<&str> {
    match message.content.as_ref()?.content.as_ref()? {
        message_content::Content::Text(text) => Some(&text.text),
        message_content::Content::Json(json) => Some(json),
        message_content::Content::Binary(_) | message_content::Content::Custom(_) => None,
    }
}

/// Converts a protobuf timestamp; `None` when it is out of chrono's range or malformed.
pub fn to_datetime(timestamp: &Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::from_timestamp(timestamp.seconds, nanos)
}

/// Converts to a protobuf timestamp.
pub fn to_timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: time.timestamp(), nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::storage::{MessageContent, TextContent};

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
        let message = normalize(req, now(), now()).expect("valid");
        assert_eq!(message.session_id, "s1");
        assert_eq!(message_tenant_id(&message), "t1");
        assert_eq!(message.timestamp, Some(to_timestamp(now())));
        assert_eq!(message.attributes.get("channel").map(String::as_str), Some("app"));
        assert_eq!(content_type(&message), "text");
    }

    #[test]
    fn normalize_rejects_bad_records() {
        let missing_message = StoreMessageRequest { session_id: "s".into(), ..Default::default() };
        assert_eq!(normalize(missing_message, now(), now()), Err(InvalidMessage::Missing("message")));
        assert_eq!(normalize(request("s", ""), now(), now()), Err(InvalidMessage::Missing("message.id")));
        assert_eq!(normalize(request("", "m"), now(), now()), Err(InvalidMessage::Missing("session_id")));
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert_eq!(normalize(request("s", &long), now(), now()), Err(InvalidMessage::TooLong { field: "message.id" }));
        assert_eq!(
            normalize(request("s\n", "m"), now(), now()),
            Err(InvalidMessage::ControlCharacters { field: "session_id" })
        );
        let mut mismatch = request("s1", "m");
        mismatch.message.as_mut().expect("message").session_id = "s2".into();
        assert_eq!(normalize(mismatch, now(), now()), Err(InvalidMessage::SessionMismatch));
        let mut bad_time = request("s", "m");
        bad_time.message.as_mut().expect("message").timestamp = Some(Timestamp { seconds: i64::MAX, nanos: 0 });
        assert_eq!(normalize(bad_time, now(), now()), Err(InvalidMessage::BadTimestamp("message.timestamp")));
    }

    #[test]
    fn exact_id_limit_is_accepted() {
        let id = "x".repeat(MAX_ID_BYTES);
        assert!(normalize(request("s", &id), now(), now()).is_ok());
    }
}
