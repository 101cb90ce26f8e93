//! `flare-storage export`: a session (or a time range of it) as JSON Lines, one message per
//! line, oldest first, through the reader's StreamExportMessages. Progress (count and rate)
//! goes to stderr, so stdout can be piped.

use std::io::Write as _;
use std::time::Instant;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use flare_storage_common::export::to_json;
use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::{TenantContext, TimeRange};
use flare_storage_common::proto::storage::ExportMessagesRequest;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::tonic::transport::Channel;
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
