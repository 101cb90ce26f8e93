//! `flare-storage-bench search`: SearchMessages over one tenant's history, tenant-wide, for
//! one-, two- and four-character Chinese queries and one English word, each drawn from stored
//! text, through the reader — over PostgreSQL, and over MongoDB on a smaller history.
//!
//! The history is loaded with COPY (messages, then their search entries, with the GIN index
//! built after the load, as a restore would), not through the writer: what is measured is the
//! search, and a million messages through the writer would take most of an hour here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use flare_storage_common::message::searchable_text;
use flare_storage_common::proto::common::{FilterExpression, FilterOperator, Pagination, TenantContext, TimeRange};
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::proto::storage::{Message, SearchMessagesRequest};
use flare_storage_writer::store::Encoded;
use flare_storage_writer::store::mongo::MongoStore;
use serde_json::json;
use sqlx::Connection as _;

use crate::reader::Server;
use crate::report::{Latencies, Report, Row, rate};
use crate::services::{Services, create_database, drop_database, unique};
use crate::workload::{Random, Record, Workload};
use crate::writer::{
    COPY_SEARCH_STATEMENT, COPY_STATEMENT, copy_in, copy_search_text, copy_text, create_partitions, normalized,
};

#[derive(clap::Args)]
pub struct SearchBench {
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Distinct queries per kind.
    #[arg(long, default_value_t = 20)]
    pub queries: usize,
    /// Times each query is asked.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Months the PostgreSQL history spans up to now, its messages' times spread evenly over
    /// them (each month's partition holds its share); 0 keeps the times of the load (minutes).
    #[arg(long, default_value_t = 0)]
    pub history_months: u32,
    /// Messages of the MongoDB run (0: none).
    #[arg(long, default_value_t = 2_000)]
    pub mongo_messages: usize,
    /// Leave the PostgreSQL database (to look at plans) and print its URL, instead of dropping it.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub keep: bool,
    /// Found after parsing (FLARE_READER_BIN, else beside the bench binary).
    #[arg(skip)]
    pub reader_binary: PathBuf,
    #[arg(long, default_value = "target/bench/search.json")]
    pub json: PathBuf,
}

/// The query kinds of the target: Chinese of 1, 2 and 4 characters, one English word.
const KINDS: [(&str, Kind); 4] = [
    ("1 Chinese character", Kind::Chinese(1)),
    ("2 Chinese characters", Kind::Chinese(2)),
    ("4 Chinese characters", Kind::Chinese(4)),
    ("1 English word", Kind::Word),
];

#[derive(Clone, Copy)]
enum Kind {
    Chinese(usize),
    Word,
}

const PAGE: u32 = 20;
/// Messages per COPY round, to bound the memory of the generated text.
const LOAD_CHUNK: usize = 100_000;

pub async fn run(bench: SearchBench, services: Services) -> anyhow::Result<()> {
    let mut report = Report::new(
        "search",
        json!({
            "messages": bench.messages, "sessions": bench.sessions, "queries": bench.queries,
            "repeats": bench.repeats, "mongo_messages": bench.mongo_messages, "page": PAGE,
            "history_months": bench.history_months,
        }),
    );
    let tenant = unique("bench");
    let database = create_database(&services, "bench_search").await?;
    let pool = sqlx::PgPool::connect(&database.url).await?;
    flare_storage_common::schema::migrate(&pool).await?;
    pool.close().await;

    eprintln!("loading {} messages into PostgreSQL…", bench.messages);
    let mut workload = Workload::new(&tenant, bench.sessions, 23);
    let mut texts = Vec::new();
    let history = chrono::Duration::days(i64::from(bench.history_months) * 30);
    let (copy_elapsed, entries) =
        load_postgres(&database.url, &mut workload, bench.messages, history, &mut texts).await?;
    report.push(Row::rate(
        "load: COPY messages + search entries",
        rate(bench.messages, copy_elapsed),
        format!("{entries} search entries; GIN index built after the load"),
    ));
    let queries = draw_queries(&texts, bench.queries, 99);

    let reader = Server::start_reader_with(&bench.reader_binary, &[("POSTGRES_URL", &database.url)])?;
    reader.wait_ready().await?;
    // Over a history of months the search asks for all of it (the reader's default range is
    // the last 7 days).
    let since = (bench.history_months > 0).then(|| chrono::Utc::now() - history - chrono::Duration::days(1));
    measure(&mut report, &reader, &tenant, &queries, bench.repeats, "PostgreSQL", since).await?;
    report.result("reader_peak_rss_mib", reader.peak_rss());
    drop(reader);
    if bench.keep {
        eprintln!("kept {} (tenant {tenant})", database.url);
    } else {
        drop_database(&services, &database).await?;
    }

    if bench.mongo_messages > 0 {
        let mongo_url = services.mongo_url.clone().ok_or_else(|| anyhow::anyhow!("MONGO_URL is not set"))?;
        let mongo_database = unique("bench_search");
        let store = MongoStore::connect(&mongo_url, &mongo_database, "messages").await?;
        store.ensure_indexes(None).await?;
        let tenant = unique("bench");
        let mut workload = Workload::new(&tenant, bench.sessions, 29);
        let mut texts = Vec::new();
        eprintln!("loading {} messages into MongoDB…", bench.mongo_messages);
        let started = Instant::now();
        let records: Vec<Record> = (0..bench.mongo_messages).map(|_| workload.next_record()).collect();
        let messages = normalized(&records, &mut HashMap::new())?;
        texts.extend(messages.iter().filter_map(|message| searchable_text(message).map(str::to_owned)));
        for chunk in messages.chunks(1_000) {
            let encoded: Vec<Encoded> = chunk.iter().cloned().map(Encoded::new).collect();
            store.insert_batch(&encoded).await.map_err(|partial| anyhow::anyhow!("{}", partial.error))?;
        }
        report.push(Row::rate("load: MongoDB insert_many", rate(messages.len(), started.elapsed()), ""));
        let queries = draw_queries(&texts, bench.queries, 99);
        let reader = Server::start_reader_with(
            &bench.reader_binary,
            &[("MONGO_URL", &mongo_url), ("MONGO_DATABASE", &mongo_database), ("MONGO_COLLECTION", "messages")],
        )?;
        reader.wait_ready().await?;
        measure(&mut report, &reader, &tenant, &queries, bench.repeats.min(2), "MongoDB stand-in", None).await?;
        drop(reader);
        let client = mongodb::Client::with_uri_str(&mongo_url).await?;
        client.database(&mongo_database).drop().await?;
    }
    report.finish(&bench.json)
}

/// COPYs `count` messages and their search entries in rounds, building the search GIN index
/// once at the end; with a `history` longer than zero the messages' times are spread evenly
/// over it, oldest first, up to now. Keeps every searchable text (for drawing queries). Returns
/// the time spent in the database and the number of search entries.
async fn load_postgres(
    url: &str,
    workload: &mut Workload,
    count: usize,
    history: chrono::Duration,
    texts: &mut Vec<String>,
) -> anyhow::Result<(Duration, usize)> {
    let start = chrono::Utc::now() - history;
    let mut connection = sqlx::PgConnection::connect(url).await?;
    sqlx::query("DROP INDEX message_search_terms").execute(&mut connection).await?;
    let mut elapsed = Duration::ZERO;
    let mut entries = 0;
    let mut loaded = 0;
    let mut seqs = HashMap::new();
    while loaded < count {
        let round = LOAD_CHUNK.min(count - loaded);
        let records: Vec<Record> = (0..round).map(|_| workload.next_record()).collect();
        let mut messages: Vec<Message> = normalized(&records, &mut seqs)?;
        if history > chrono::Duration::zero() {
            for (index, message) in messages.iter_mut().enumerate() {
                let at = start + history * i32::try_from(loaded + index)? / i32::try_from(count)?;
                message.timestamp = Some(flare_storage_common::message::to_timestamp(at));
            }
        }
        texts.extend(messages.iter().filter_map(|message| searchable_text(message).map(str::to_owned)));
        let (rows, search_rows) = (copy_text(&messages), copy_search_text(&messages));
        create_partitions(&mut connection, &messages).await?;
        let started = Instant::now();
        copy_in(&mut connection, COPY_STATEMENT, &rows).await?;
        entries += copy_in(&mut connection, COPY_SEARCH_STATEMENT, &search_rows).await?;
        elapsed += started.elapsed();
        loaded += round;
        eprintln!("  {loaded} loaded");
    }
    let started = Instant::now();
    sqlx::query("SET maintenance_work_mem = '1GB'").execute(&mut connection).await?;
    sqlx::query("CREATE INDEX message_search_terms ON message_search USING GIN (tenant_id, session_id, terms)")
        .execute(&mut connection)
        .await?;
    sqlx::query("ANALYZE").execute(&mut connection).await?;
    elapsed += started.elapsed();
    Ok((elapsed, entries))
}

/// `per_kind` queries of each kind, each a piece of a stored text: a run of Chinese characters
/// or a whole English word.
fn draw_queries(texts: &[String], per_kind: usize, seed: u64) -> Vec<(&'static str, Vec<String>)> {
    let mut random = Random::new(seed);
    KINDS
        .iter()
        .map(|(name, kind)| {
            let mut queries = Vec::new();
            while queries.len() < per_kind && !texts.is_empty() {
                let text = &texts[random.below(texts.len() as u64) as usize];
                let candidates: Vec<String> = match kind {
                    Kind::Chinese(length) => {
                        let characters: Vec<char> = text.chars().collect();
                        characters
                            .windows(*length)
                            .filter(|window| {
                                window.iter().all(|character| ('\u{4e00}'..='\u{9fff}').contains(character))
                            })
                            .map(|window| window.iter().collect())
                            .collect()
                    }
                    Kind::Word => text
                        .split(|character: char| !character.is_alphabetic())
                        .filter(|word| word.len() >= 3 && word.is_ascii())
                        .map(str::to_lowercase)
                        .collect(),
                };
                if !candidates.is_empty() {
                    queries.push(candidates[random.below(candidates.len() as u64) as usize].clone());
                }
            }
            (*name, queries)
        })
        .collect()
}

/// Asks every query `repeats` times, one at a time, and reports latency per kind; with `since`,
/// every search asks for the time range from then on.
async fn measure(
    report: &mut Report,
    reader: &Server,
    tenant: &str,
    queries: &[(&'static str, Vec<String>)],
    repeats: usize,
    store: &str,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", reader.grpc))?.connect().await?;
    let mut client = StorageReaderServiceClient::new(channel);
    for (kind, texts) in queries {
        let mut latencies = Latencies::default();
        let (mut found, mut full_pages) = (0usize, 0usize);
        let started = Instant::now();
        for _ in 0..repeats {
            for text in texts {
                let request = SearchMessagesRequest {
                    tenant: Some(TenantContext { tenant_id: tenant.to_owned(), ..Default::default() }),
                    filters: vec![FilterExpression {
                        field: "content".into(),
                        op: FilterOperator::Contains as i32,
                        values: vec![text.clone()],
                    }],
                    pagination: Some(Pagination { limit: PAGE as i32, ..Default::default() }),
                    time_range: since.map(|since| TimeRange {
                        start_time: Some(flare_storage_common::message::to_timestamp(since)),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let asked = Instant::now();
                let response = client.search_messages(request).await?.into_inner();
                latencies.record(asked.elapsed());
                anyhow::ensure!(!response.messages.is_empty(), "{text:?} is stored but was not found");
                found += response.messages.len();
                full_pages += usize::from(response.messages.len() == PAGE as usize);
            }
        }
        let asked = latencies.len();
        let note = format!(
            "{store}; {} queries × {repeats}, e.g. {:?}; {:.1} hits per page, {} of {asked} pages full",
            texts.len(),
            texts.first().map(String::as_str).unwrap_or_default(),
            found as f64 / asked.max(1) as f64,
            full_pages,
        );
        report.push(Row::with_latencies(
            &format!("SearchMessages {kind} ({store})"),
            rate(asked, started.elapsed()),
            &mut latencies,
            note,
        ));
    }
    Ok(())
}
