//! `flare-storage export`: a session (or a time range of it) as JSON Lines, one message per
//! line, oldest first, through the reader's StreamExportMessages. Progress (count and rate)
//! goes to stderr, so stdout can be piped.

use std::io::Write as _;
use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use flare_storage_common::message::{to_datetime, to_timestamp};
use flare_storage_common::proto::common::{TenantContext, TimeRange};
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::proto::storage::{ExportMessagesRequest, Message, message_content};
use flare_storage_common::tonic::transport::Channel;
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;

pub struct Export {
    pub addr: String,
    pub tenant: String,
    pub session: String,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub out: Option<String>,
}

pub async fn run(export: Export) -> anyhow::Result<()> {
    let channel = Channel::from_shared(export.addr.clone())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the reader at {}", export.addr))?;
    let mut client = StorageReaderServiceClient::new(channel);
    let request = ExportMessagesRequest {
        tenant: Some(TenantContext { tenant_id: export.tenant.clone(), ..Default::default() }),
        session_id: export.session.clone(),
        time_range: Some(TimeRange {
            start_time: export.from.map(to_timestamp),
            end_time: export.to.map(to_timestamp),
        }),
        ..Default::default()
    };
    let mut stream = client.stream_export_messages(request).await?.into_inner();
    let mut out: Box<dyn std::io::Write> = match &export.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {path}"))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let started = Instant::now();
    let mut exported = 0u64;
    while let Some(chunk) = stream.next().await {
        for message in chunk?.messages {
            serde_json::to_writer(&mut out, &to_json(&message))?;
            out.write_all(b"\n")?;
            exported += 1;
        }
        let rate = exported as f64 / started.elapsed().as_secs_f64().max(0.001);
        eprint!("\rexported {exported} messages ({rate:.0}/s)");
    }
    out.flush()?;
    eprintln!(
        "\rexported {exported} messages in {:.1}s from session {} (tenant {})",
        started.elapsed().as_secs_f64(),
        export.session,
        export.tenant
    );
    Ok(())
}

/// The fields of a message an export keeps, as JSON.
pub fn to_json(message: &Message) -> Value {
    let time = |timestamp: Option<&flare_storage_common::prost_types::Timestamp>| {
        timestamp.and_then(to_datetime).map(|time| time.to_rfc3339())
    };
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
