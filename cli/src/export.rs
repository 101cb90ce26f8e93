//! `flare-storage export`: a session (or a time range of it) as JSON Lines, one message per
//! line, oldest first, through the reader's StreamExportMessages. Progress (count and rate)
//! goes to stderr, so stdout can be piped.

use std::io::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use flare_storage_common::export::to_json;
use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::{TenantContext, TimeRange};
use flare_storage_common::proto::storage::ExportMessagesRequest;
use tokio_stream::StreamExt as _;

use crate::progress::Progress;
use crate::reader_client::ReaderArgs;

pub struct Export {
    pub tenant: String,
    pub session: String,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub out: Option<String>,
}

pub async fn run(reader: &ReaderArgs, export: Export) -> anyhow::Result<()> {
    let mut client = reader.connect().await?;
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
    let mut progress = Progress::new("messages exported", None);
    while let Some(chunk) = stream.next().await {
        let messages = chunk?.messages;
        for message in &messages {
            serde_json::to_writer(&mut out, &to_json(message))?;
            out.write_all(b"\n")?;
        }
        progress.inc(messages.len() as u64);
    }
    out.flush()?;
    progress.finish();
    Ok(())
}
