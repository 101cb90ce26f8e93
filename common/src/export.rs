//! The JSON form of an exported message, one per line in an export file (JSON Lines), shared by
//! the reader's export jobs and the operator CLI. Binary content is base64; times are RFC 3339.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::message::to_datetime;
use crate::proto::storage::{Message, message_content};

/// The fields of a message an export keeps, as JSON.
pub fn to_json(message: &Message) -> Value {
    let time =
        |timestamp: Option<&prost_types::Timestamp>| timestamp.and_then(to_datetime).map(|time| time.to_rfc3339());
    let content = match message.content.as_ref().and_then(|content| content.content.as_ref()) {
        Some(message_content::Content::Text(text)) => json!({ "text": text.text }),
        Some(message_content::Content::Json(text)) => json!({ "json": text }),
        Some(message_content::Content::Binary(bytes)) => {
            json!({ "binary": base64::engine::general_purpose::STANDARD.encode(bytes) })
        }
        Some(message_content::Content::Custom(custom)) => json!({
            "custom": {
                "type": custom.r#type,
                "payload": base64::engine::general_purpose::STANDARD.encode(&custom.payload),
                "metadata": custom.metadata,
            }
        }),
        None => Value::Null,
    };
    json!({
        "id": message.id,
        "session_id": message.session_id,
        "seq": message.seq,
        "tenant_id": message.tenant.as_ref().map(|tenant| tenant.tenant_id.as_str()).unwrap_or(""),
        "sender_id": message.sender_id,
        "receiver_id": message.receiver_id,
        "receiver_ids": message.receiver_ids,
        "timestamp": time(message.timestamp.as_ref()),
        "message_type": message.message_type,
        "business_type": message.business_type,
        "session_type": message.session_type,
        "content": content,
        "is_recalled": message.is_recalled,
        "recalled_at": time(message.recalled_at.as_ref()),
        "tags": message.tags,
        "attributes": message.attributes,
        "extra": message.extra,
    })
}
