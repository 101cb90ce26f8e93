//! Exports: the messages an export selects, in chunks ([`chunks`], for StreamExportMessages and
//! the jobs alike), and the jobs of the unary ExportMessages. A job writes the messages of a
//! session (time range and filters as in search), oldest first, as JSON Lines to
//! `<STORAGE_READER_EXPORT_DIR>/<tenant>/<task id>.jsonl`, beside a manifest `<task id>.json`
//! that GetExportTask reads. On a volume shared by the readers, any replica answers for any
//! task. The file is written as `.jsonl.part` and renamed when complete, so a consumer never
//! reads half an export as a whole one. Memory stays bounded: one chunk at a time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::export::to_json;
use flare_storage_common::proto::storage::Message;
use futures::{Stream, TryStreamExt as _};
use tokio::io::AsyncWriteExt as _;

use crate::cursor::Cursor;
use crate::error::Error;
use crate::lookup::to_message;
use crate::search::SearchQuery;
use crate::store::Databases;

/// Messages read from the database per step of a job.
const CHUNK: i64 = 500;

/// What `query` selects, in its order, as chunks of at most `size` messages, read one at a
/// time as the stream is polled (a slow consumer stops the reads); ends after an error.
pub fn chunks(
    databases: Databases,
    query: SearchQuery,
    size: i64,
) -> impl Stream<Item = Result<Vec<Message>, Error>> + Send {
    futures::stream::try_unfold(Some(query), move |query| {
        let databases = databases.clone();
        async move {
            let Some(mut query) = query else { return Ok(None) };
            let rows = databases.search(&query, size).await?;
            let full = rows.len() as i64 == size;
            let last = rows.last().map(|row| Cursor { timestamp: row.timestamp, message_id: row.message_id.clone() });
            let messages = rows.into_iter().map(to_message).collect::<Result<Vec<_>, _>>()?;
            if messages.is_empty() {
                return Ok(None);
            }
            let next = match (full, last) {
                (true, Some(last)) => {
                    query.after = Some(last);
                    Some(query)
                }
                _ => None,
            };
            Ok(Some((messages, next)))
        }
    })
}

/// A running job refreshes its manifest at least this often; one not refreshed for
/// `STALE_AFTER` belonged to a reader that stopped.
const STALE_AFTER: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Exports {
    pub directory: PathBuf,
    pub databases: Databases,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Completed,
    Failed,
}

/// What `<task id>.json` says about a job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub task_id: String,
    pub tenant_id: String,
    pub session_id: String,
    pub state: State,
    pub message_count: u64,
    /// The JSON Lines file, relative to the export directory.
    pub location: String,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Exports {
    /// Starts a job exporting what `query` selects; returns its task id once its manifest is
    /// written, so GetExportTask finds it at once.
    pub async fn start(&self, query: SearchQuery, session_id: &str) -> Result<String, Error> {
        let task_id = uuid::Uuid::new_v4().simple().to_string();
        let folder = tenant_folder(&query.tenant_id);
        tokio::fs::create_dir_all(self.directory.join(&folder)).await.map_err(export_failed)?;
        let now = Utc::now();
        let manifest = Manifest {
            task_id: task_id.clone(),
            tenant_id: query.tenant_id.clone(),
            session_id: session_id.to_owned(),
            state: State::Running,
            message_count: 0,
            location: format!("{folder}/{task_id}.jsonl"),
            error: None,
            started_at: now,
            updated_at: now,
            finished_at: None,
        };
        self.write_manifest(&manifest).await.map_err(export_failed)?;
        let exports = self.clone();
        tokio::spawn(async move { exports.run(manifest, query).await });
        Ok(task_id)
    }

    async fn run(self, mut manifest: Manifest, query: SearchQuery) {
        let outcome = self.write_messages(&mut manifest, query).await;
        manifest.updated_at = Utc::now();
        manifest.finished_at = Some(manifest.updated_at);
        match outcome {
            Ok(()) => {
                manifest.state = State::Completed;
                tracing::info!(task_id = manifest.task_id, messages = manifest.message_count, "export completed");
            }
            Err(error) => {
                tracing::warn!(task_id = manifest.task_id, error, "export failed");
                manifest.state = State::Failed;
                manifest.error = Some(error);
            }
        }
        if let Err(error) = self.write_manifest(&manifest).await {
            tracing::warn!(task_id = manifest.task_id, %error, "failed to record the end of an export");
        }
    }

    async fn write_messages(&self, manifest: &mut Manifest, query: SearchQuery) -> Result<(), String> {
        let path = self.directory.join(&manifest.location);
        let partial = path.with_extension("jsonl.part");
        let file = tokio::fs::File::create(&partial).await.map_err(|error| error.to_string())?;
        let mut out = tokio::io::BufWriter::new(file);
        let mut chunks = std::pin::pin!(chunks(self.databases.clone(), query, CHUNK));
        while let Some(messages) = chunks.try_next().await.map_err(|error| error.to_string())? {
            let mut lines = Vec::new();
            for message in &messages {
                serde_json::to_writer(&mut lines, &to_json(message)).map_err(|error| error.to_string())?;
                lines.push(b'\n');
                manifest.message_count += 1;
            }
            out.write_all(&lines).await.map_err(|error| error.to_string())?;
            if manifest.updated_at + STALE_AFTER / 4 < Utc::now() {
                manifest.updated_at = Utc::now();
                self.write_manifest(manifest).await.map_err(|error| error.to_string())?;
            }
        }
        out.flush().await.map_err(|error| error.to_string())?;
        out.into_inner().sync_all().await.map_err(|error| error.to_string())?;
        tokio::fs::rename(&partial, &path).await.map_err(|error| error.to_string())
    }

    /// The manifest of a task of `tenant_id`; a task of another tenant is not found. A job whose
    /// reader stopped before it finished is reported failed.
    pub async fn manifest(&self, tenant_id: &str, task_id: &str) -> Result<Manifest, Error> {
        let task_id = uuid::Uuid::try_parse(task_id)
            .map_err(|_| Error::invalid("export_task_id", "is not an export task id"))?
            .simple()
            .to_string();
        let path = self.directory.join(tenant_folder(tenant_id)).join(format!("{task_id}.json"));
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound("export task")),
            Err(error) => return Err(export_failed(error)),
        };
        let mut manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|_| Error::FailedPrecondition("the export task's manifest is unreadable".into()))?;
        if manifest.state == State::Running && manifest.updated_at + STALE_AFTER < Utc::now() {
            manifest.state = State::Failed;
            manifest.error = Some("interrupted: the reader running it stopped; start a new export".into());
        }
        Ok(manifest)
    }

    /// Replaces the manifest whole (written aside, then renamed over it).
    async fn write_manifest(&self, manifest: &Manifest) -> std::io::Result<()> {
        let path = self.directory.join(tenant_folder(&manifest.tenant_id)).join(format!("{}.json", manifest.task_id));
        let aside = path.with_extension("json.tmp");
        tokio::fs::write(&aside, serde_json::to_vec_pretty(manifest)?).await?;
        tokio::fs::rename(&aside, &path).await
    }
}

/// A tenant's folder: its id in hex, so no tenant id can name a path of another.
fn tenant_folder(tenant_id: &str) -> String {
    let mut folder = String::with_capacity(1 + tenant_id.len() * 2);
    folder.push('t');
    for byte in tenant_id.bytes() {
        folder.push_str(&format!("{byte:02x}"));
    }
    folder
}

fn export_failed(error: std::io::Error) -> Error {
    tracing::warn!(%error, "export directory not usable");
    Error::ExportDirectory
}

/// The export directory is checked at start: it must exist or be creatable, and writable.
pub fn check_directory(directory: &Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(directory)
        .with_context(|| format!("cannot create STORAGE_READER_EXPORT_DIR {}", directory.display()))?;
    let probe = directory.join(".write-check");
    std::fs::write(&probe, b"")
        .with_context(|| format!("STORAGE_READER_EXPORT_DIR {} is not writable", directory.display()))?;
    std::fs::remove_file(probe)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_folders_are_distinct_and_path_safe() {
        assert_eq!(tenant_folder(""), "t");
        assert_eq!(tenant_folder("a/.."), "t612f2e2e");
        assert_ne!(tenant_folder("ab"), tenant_folder("a"));
        assert!(tenant_folder("租户").chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
