//! `flare-storage-bench writer`: the writer's sustained throughput and its produce → ACK
//! latency, beside this machine's limits measured in the same run on the same records — a
//! raw Kafka consume, a raw PostgreSQL COPY and UNNEST insert, and the writer's own Redis
//! commands without the rest of the writer.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flare_storage_common::message::{
    TimeBounds, content_type, message_tenant_id, normalize, searchable_text, to_datetime,
};
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::storage::{Message, StoreMessageRequest};
use flare_storage_common::text_search;
use flare_storage_writer::store::postgres::PostgresStore;
use flare_storage_writer::store::redis::RedisStore;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::Connection as _;

use crate::report::{Latencies, Report, Row, peak_rss_mib, rate};
use crate::services::{
    Services, create_database, create_topics, drop_database, forget_tenant, produce_all, unique, writer_command,
};
use crate::workload::{Record, TextMode, Workload};

#[derive(clap::Args)]
pub struct WriterBench {
    #[arg(long, default_value_t = 500_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    #[arg(long, default_value_t = 30)]
    pub latency_seconds: u64,
    /// The latency run's offered rate, as a fraction of the measured sustained rate.
    #[arg(long, default_value_t = 0.5)]
    pub latency_fraction: f64,
    /// Also store into MongoDB (a slow stand-in here), with this many messages.
    #[arg(long)]
    pub mongo_messages: Option<usize>,
    #[arg(long, value_enum, default_value = "natural")]
    pub text: TextMode,
    /// Share of messages sent to a 5,000-member group.
    #[arg(long, default_value_t = 0.0)]
    pub big_group_share: f64,
    /// Record a CPU profile of the writer during the sustained run into this file.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Found after parsing (FLARE_WRITER_BIN, else beside the bench binary).
    #[arg(skip)]
    pub writer_binary: PathBuf,
    #[arg(long, default_value = "target/bench/writer.json")]
    pub json: PathBuf,
}

impl WriterBench {
    fn workload(&self, tenant: &str, seed: u64) -> Workload {
        Workload::new(tenant, self.sessions, seed).with_text(self.text).with_big_group(self.big_group_share)
    }
}

pub async fn run(bench: WriterBench, services: Services) -> anyhow::Result<()> {
    let mut report = Report::new(
        "writer",
        json!({
            "messages": bench.messages, "sessions": bench.sessions, "partitions": bench.partitions,
            "batch": bench.batch, "latency_seconds": bench.latency_seconds,
            "latency_fraction": bench.latency_fraction, "mongo_messages": bench.mongo_messages,
            "text": format!("{:?}", bench.text), "big_group_share": bench.big_group_share,
        }),
    );
    let tenant = unique("bench");
    eprintln!("generating {} records over {} sessions…", bench.messages, bench.sessions);
    let mut workload = bench.workload(&tenant, 42);
    let records: Vec<Record> = (0..bench.messages).map(|_| workload.next_record()).collect();
    let bytes: usize = records.iter().map(|record| record.payload.len()).sum();
    report.result("average_record_bytes", bytes / records.len().max(1));

    let topic = unique("bench-messages");
    create_topics(&services, &[&topic], bench.partitions).await?;
    let started = Instant::now();
    produce_all(&services, &topic, &records).await?;
    report.push(Row::rate("kafka produce (preload)", rate(records.len(), started.elapsed()), ""));

    let consume = raw_consume(&services, &topic, bench.partitions, records.len()).await?;
    report.push(Row::rate("limit: raw kafka consume", consume, "BaseConsumer, all partitions"));

    let messages = normalized(&records, &mut HashMap::new())?;
    let raw = raw_postgres(&services, &messages, bench.batch).await?;
    let (copy, unnest) = (raw.copy, raw.unnest);
    report.push(Row::rate("limit: raw postgres COPY", copy, "messages and search entries: same tables and indexes"));
    report.push(Row::rate("  COPY of the messages alone", raw.copy_messages, "no search entries"));
    report.push(Row::rate(
        "limit: raw postgres UNNEST",
        unnest,
        format!("writer's INSERT (messages + search queue), batches of {}", bench.batch),
    ));
    let (redis, redis_stages) = raw_redis(&services, &messages, bench.batch).await?;
    report.result("raw_redis_stage_seconds", redis_stages);
    report.push(Row::rate(
        "limit: raw redis (writer commands)",
        redis,
        "cache stage: window, state, read seqs per batch",
    ));
    drop(messages);
    forget_tenant(&services, &tenant).await?;

    let database = create_database(&services, "bench_writer").await?;
    let writer_run = sustained(&bench, &services, &topic, &database, None, bench.messages).await?;
    let slowest = consume.min(copy).min(unnest).min(redis);
    report.push(Row::rate(
        "writer sustained (postgres+redis)",
        writer_run.rate,
        format!(
            "{:.0}% of COPY, {:.0}% of slowest limit; {:.1}s incl. {:.1}s until first ACK; Redis CPU {:.1} µs/message",
            100.0 * writer_run.rate / copy,
            100.0 * writer_run.rate / slowest,
            writer_run.elapsed.as_secs_f64(),
            writer_run.first_ack.as_secs_f64(),
            writer_run.redis_cpu_us_per_message
        ),
    ));
    if let Some(indexed_all) = writer_run.indexed_all {
        let searchable = rate(bench.messages, indexed_all);
        report.push(Row::rate(
            "writer stored and searchable",
            searchable,
            format!(
                "first ACK until the search indexer had indexed all: {:.1}s; {:.0}% of COPY",
                indexed_all.as_secs_f64(),
                100.0 * searchable / copy
            ),
        ));
        report.result("searchable_ratio_to_copy", searchable / copy);
    }
    report.result("writer_ratio_to_copy", writer_run.rate / copy);
    report.result("writer_ratio_to_slowest_limit", writer_run.rate / slowest);
    report.result("writer_peak_rss_mib", writer_run.peak_rss_mib);
    report.result("redis_cpu_us_per_message", writer_run.redis_cpu_us_per_message);

    report.result("writer_stage_seconds", writer_run.stages.clone());
    if let Some(profile) = &writer_run.profile {
        report.result("writer_profile_top", profile.clone());
    }

    // A message is stored when it is searchable too: half of the slower of the two rates.
    let sustained_rate = writer_run
        .indexed_all
        .map_or(writer_run.rate, |indexed_all| writer_run.rate.min(rate(bench.messages, indexed_all)));
    let offered = (sustained_rate * bench.latency_fraction).max(1.0);
    let (mut latencies, mut findable) = latency(&bench, &services, &database, &tenant, None, offered).await?;
    report.push(Row::with_latencies(
        "writer produce→ACK latency",
        offered,
        &mut latencies,
        format!(
            "offered {:.0}% of sustained (stored and searchable) for {}s",
            bench.latency_fraction * 100.0,
            bench.latency_seconds
        ),
    ));
    let followed = findable.len();
    report.push(Row::with_latencies(
        "ACK→findable by search (index lag)",
        offered,
        &mut findable,
        format!("{followed} messages followed (1 ACK in 10), looked up every 20 ms"),
    ));
    drop_database(&services, &database).await?;

    if let Some(count) = bench.mongo_messages {
        let mongo_url = services.mongo_url.clone().context("MONGO_URL is needed for --mongo")?;
        // Records of their own: a tenant no other run wrote.
        let mongo_tenant = unique("bench");
        let mut workload = bench.workload(&mongo_tenant, 43);
        let mongo_records: Vec<Record> = (0..count).map(|_| workload.next_record()).collect();
        let mongo_topic = unique("bench-messages-mongo");
        create_topics(&services, &[&mongo_topic], bench.partitions).await?;
        produce_all(&services, &mongo_topic, &mongo_records).await?;
        let database = create_database(&services, "bench_writer_mongo").await?;
        let mongo = Some((mongo_url, unique("bench")));
        let run = sustained(&bench, &services, &mongo_topic, &database, mongo.clone(), count).await?;
        report.push(Row::rate(
            "writer sustained (+mongo stand-in)",
            run.rate,
            format!("{count} messages; the MongoDB stand-in is a slow Python server"),
        ));
        let offered = (run.rate * bench.latency_fraction).max(1.0);
        let (mut latencies, _) = latency(&bench, &services, &database, &mongo_tenant, mongo, offered).await?;
        report.push(Row::with_latencies(
            "writer latency (+mongo stand-in)",
            run.rate * bench.latency_fraction,
            &mut latencies,
            "",
        ));
        drop_database(&services, &database).await?;
        forget_tenant(&services, &mongo_tenant).await?;
    }
    forget_tenant(&services, &tenant).await?;
    report.finish(&bench.json)
}

/// Reads every record of the topic by direct assignment: the broker and client's own rate.
async fn raw_consume(services: &Services, topic: &str, partitions: i32, expected: usize) -> anyhow::Result<f64> {
    let consumer = assigned_consumer(services, topic, partitions)?;
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut seen = 0;
        while seen < expected {
            if started.elapsed() > Duration::from_secs(600) {
                anyhow::bail!("raw consume read {seen} of {expected} records in 10 minutes");
            }
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                message?;
                seen += 1;
            }
        }
        Ok(rate(seen, started.elapsed()))
    })
    .await?
}

fn assigned_consumer(services: &Services, topic: &str, partitions: i32) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .set("group.id", unique("bench-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// The records as the writer stores them: normalised, with per-session seqs following those in
/// `seqs` (the last seq given in each session so far).
pub(crate) fn normalized(records: &[Record], seqs: &mut HashMap<String, i64>) -> anyhow::Result<Vec<Message>> {
    let now = chrono::Utc::now();
    records
        .iter()
        .map(|record| {
            let request = StoreMessageRequest::decode(record.payload.as_slice())?;
            let bounds = TimeBounds { max_ahead: chrono::Duration::days(1), max_age: None };
            let mut message = normalize(request, now, now, bounds)?;
            let seq = seqs.entry(message.session_id.clone()).or_insert(0);
            *seq += 1;
            message.seq = *seq;
            Ok(message)
        })
        .collect()
}

/// A fresh database with the product's schema: COPY of all rows, then (emptied) the writer's
/// UNNEST insert in batches. Rates in rows per second.
async fn raw_postgres(services: &Services, messages: &[Message], batch: usize) -> anyhow::Result<RawPostgres> {
    let database = create_database(services, "bench_raw").await?;
    let store = PostgresStore::connect(&database.url, 4)?;
    flare_storage_common::schema::migrate(store.pool()).await?;

    let text = copy_text(messages);
    let ids_text = copy_ids_text(messages);
    let search_text = copy_search_text(messages);
    let mut connection = sqlx::PgConnection::connect(&database.url).await?;
    create_partitions(&mut connection, messages).await?;
    let started = Instant::now();
    let copied = copy_in(&mut connection, COPY_STATEMENT, &text).await?;
    copy_in(&mut connection, COPY_IDS_STATEMENT, &ids_text).await?;
    let messages_elapsed = started.elapsed();
    let started = Instant::now();
    copy_in(&mut connection, COPY_SEARCH_STATEMENT, &search_text).await?;
    let search_elapsed = started.elapsed();
    // The rows are stored when both are: the search entries belong to the writer's work.
    let copy_rate = rate(copied, messages_elapsed + search_elapsed);
    let copy_messages_rate = rate(copied, messages_elapsed);
    anyhow::ensure!(copied == messages.len(), "COPY stored {copied} of {} rows", messages.len());

    sqlx::query("TRUNCATE messages, message_ids, message_search, search_index_queue").execute(&mut connection).await?;
    let started = Instant::now();
    for chunk in messages.chunks(batch) {
        // Encoding is part of the writer's work too: it happens once per message.
        let encoded: Vec<flare_storage_writer::store::Encoded> =
            chunk.iter().cloned().map(flare_storage_writer::store::Encoded::new).collect();
        store.insert_batch(&encoded).await?;
    }
    let unnest_rate = rate(messages.len(), started.elapsed());
    drop(connection);
    drop(store);
    drop_database(services, &database).await?;
    Ok(RawPostgres { copy: copy_rate, copy_messages: copy_messages_rate, unnest: unnest_rate })
}

/// Rows per second of the raw PostgreSQL limits.
struct RawPostgres {
    /// COPY of the messages and of their search entries (terms computed beforehand).
    copy: f64,
    /// COPY of the messages and their ids (message_ids) alone.
    copy_messages: f64,
    /// The writer's INSERT (ids, messages and search queue), batch after batch.
    unnest: f64,
}

/// Creates the monthly partitions of `messages` that COPY of `messages` needs (the writer
/// creates them before its inserts).
pub(crate) async fn create_partitions(connection: &mut sqlx::PgConnection, messages: &[Message]) -> anyhow::Result<()> {
    let months: std::collections::BTreeSet<String> = messages
        .iter()
        .filter_map(|message| message.timestamp.as_ref().and_then(to_datetime))
        .map(|time| time.format("%Y-%m-01T00:00:00Z").to_string())
        .collect();
    for month in months {
        sqlx::query("SELECT flare_ensure_message_partition($1::timestamptz)")
            .bind(month)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

pub(crate) async fn copy_in(
    connection: &mut sqlx::PgConnection,
    statement: &str,
    text: &[u8],
) -> anyhow::Result<usize> {
    let mut copy = connection.copy_in_raw(statement).await?;
    for chunk in text.chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    Ok(copy.finish().await? as usize)
}

pub(crate) const COPY_IDS_STATEMENT: &str = r#"COPY message_ids (tenant_id, message_id, session_id, seq, "timestamp",
    origin_topic, origin_partition, origin_offset) FROM STDIN"#;

/// The id index's rows of the messages in COPY's text format, as the writer's insert records
/// them (with an origin in the default input topic, the offset the message's position).
pub(crate) fn copy_ids_text(messages: &[Message]) -> Vec<u8> {
    let mut out = String::with_capacity(messages.len() * 128);
    for (offset, message) in messages.iter().enumerate() {
        let timestamp = message.timestamp.as_ref().and_then(to_datetime).unwrap_or_default().to_rfc3339();
        let seq = if message.seq > 0 { message.seq.to_string() } else { "\\N".to_owned() };
        let fields = [
            escape(message_tenant_id(message)),
            escape(&message.id),
            escape(&message.session_id),
            seq,
            timestamp,
            "storage-messages".to_owned(),
            "0".to_owned(),
            offset.to_string(),
        ];
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
    out.into_bytes()
}

pub(crate) const COPY_SEARCH_STATEMENT: &str = r#"COPY message_search (tenant_id, message_id, session_id, "timestamp", terms, normal_text, terms_version) FROM STDIN"#;

/// The search entries of the searchable messages in COPY's text format, as the indexer
/// writes them.
pub(crate) fn copy_search_text(messages: &[Message]) -> Vec<u8> {
    let mut out = String::with_capacity(messages.len() * 1024);
    for message in messages {
        let Some((normal, terms)) =
            searchable_text(message).and_then(|text| text_search::index_entry(text, text_search::Terms::Ordered))
        else {
            continue;
        };
        // Terms are letters, digits, CJK characters and order terms (U+001F and hex digits):
        // quoted, they need no escaping.
        let terms: Vec<String> = terms.iter().map(|term| format!("\"{term}\"")).collect();
        let timestamp = message.timestamp.as_ref().and_then(to_datetime).unwrap_or_default().to_rfc3339();
        let fields = [
            escape(message_tenant_id(message)),
            escape(&message.id),
            escape(&message.session_id),
            timestamp,
            format!("{{{}}}", terms.join(",")),
            escape(&normal),
            text_search::ORDER_TERMS_VERSION.to_string(),
        ];
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
    out.into_bytes()
}

pub(crate) const COPY_STATEMENT: &str = r#"COPY messages (
    tenant_id, message_id, session_id, seq, sender_id, sender_type, receiver_id, receiver_ids,
    content, content_type, message_type, business_type, session_type, status, "timestamp",
    is_recalled, is_burn_after_read, burn_after_seconds, extra, tags, attributes,
    payload, created_at, updated_at) FROM STDIN"#;

/// The rows in COPY's text format, the same values the writer's insert stores.
pub(crate) fn copy_text(messages: &[Message]) -> Vec<u8> {
    let mut out = String::with_capacity(messages.len() * 1024);
    let now = chrono::Utc::now().to_rfc3339();
    for message in messages {
        let timestamp = message.timestamp.as_ref().and_then(to_datetime).unwrap_or_default().to_rfc3339();
        let content =
            message.content.as_ref().map_or_else(|| "\\N".to_owned(), |content| hex(&content.encode_to_vec()));
        let receivers: Vec<String> = message.receiver_ids.iter().map(|id| format!("\"{id}\"")).collect();
        let fields = [
            escape(message_tenant_id(message)),
            escape(&message.id),
            escape(&message.session_id),
            message.seq.to_string(),
            escape(&message.sender_id),
            escape(&message.sender_type),
            escape(&message.receiver_id),
            escape(&format!("{{{}}}", receivers.join(","))),
            content,
            escape(content_type(message)),
            message.message_type.to_string(),
            escape(&message.business_type),
            escape(&message.session_type),
            escape(&message.status),
            timestamp,
            "f".into(),
            "f".into(),
            "0".into(),
            "{}".into(),
            "{}".into(),
            "{}".into(),
            hex(&message.encode_to_vec()),
            now.clone(),
            now.clone(),
        ];
        out.push_str(&fields.join("\t"));
        out.push('\n');
    }
    out.into_bytes()
}

fn escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '\t' => escaped.push_str("\\t"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// A bytea value in COPY text format (`\\x…`, the backslash itself escaped).
fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(3 + bytes.len() * 2);
    text.push_str("\\\\x");
    for byte in bytes {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// The writer's Redis cache stage (hot windows, session states and senders' read seqs: one
/// round trip) for every batch, nothing else. Messages per second, and the
/// seconds spent in it.
async fn raw_redis(
    services: &Services,
    messages: &[Message],
    batch: usize,
) -> anyhow::Result<(f64, serde_json::Map<String, serde_json::Value>)> {
    use flare_storage_writer::store::Encoded;
    use flare_storage_writer::store::redis::DurableMessage;
    let store = RedisStore::connect(
        &flare_storage_common::redis_connection::RedisTarget::new(&services.redis, false),
        Duration::from_secs(600),
        Duration::from_secs(600),
        200,
        0,
    )
    .await?;
    let mut spent = Duration::ZERO;
    let started = Instant::now();
    for chunk in messages.chunks(batch) {
        let encoded: Vec<Encoded> = chunk.iter().cloned().map(Encoded::new).collect();
        let durable: Vec<DurableMessage<'_>> =
            encoded.iter().map(|message| DurableMessage { message, stored_before: false }).collect();
        let step = Instant::now();
        store.finish(&durable, None).await?;
        spent += step.elapsed();
    }
    let rate = rate(messages.len(), started.elapsed());
    let stages = [("cache".to_owned(), serde_json::Value::from(spent.as_secs_f64()))].into_iter().collect();
    Ok((rate, stages))
}

struct SustainedRun {
    rate: f64,
    elapsed: Duration,
    first_ack: Duration,
    peak_rss_mib: f64,
    profile: Option<String>,
    /// Seconds spent per pipeline stage.
    stages: serde_json::Map<String, serde_json::Value>,
    /// Redis's own CPU time (system + user) per stored message over the run, µs.
    redis_cpu_us_per_message: f64,
    /// From the first ACK until the search indexer had indexed every message (PostgreSQL).
    indexed_all: Option<Duration>,
}

/// Redis's own CPU time so far, seconds (`used_cpu_sys` + `used_cpu_user` of `INFO cpu`).
async fn redis_cpu_seconds(services: &Services) -> anyhow::Result<f64> {
    let mut connection = redis::Client::open(services.redis.as_str())?.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut connection).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_sys") + field("used_cpu_user"))
}

fn start_writer(
    bench: &WriterBench,
    services: &Services,
    topic: &str,
    ack_topic: &str,
    database_url: &str,
    mongo: Option<&(String, String)>,
) -> anyhow::Result<(Child, std::net::SocketAddr)> {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut command = writer_command(&bench.writer_binary, services, topic, database_url);
    command
        .env("KAFKA_ACK_TOPIC", ack_topic)
        .env("WRITER_BATCH_SIZE", bench.batch.to_string())
        .env("METRICS_ADDR", metrics.to_string());
    if let Some((url, database)) = mongo {
        command.env("MONGO_URL", url).env("MONGO_DATABASE", database);
    }
    let child = command.spawn().with_context(|| format!("cannot start {}", bench.writer_binary.display()))?;
    Ok((child, metrics))
}

/// Seconds the writer spent in each pipeline stage so far, from its own metrics.
async fn stage_seconds(metrics: std::net::SocketAddr) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let body = crate::services::http_get(metrics, "/metrics").await?;
    let prefix = "storage_writer_stage_latency_seconds_sum{stage=\"";
    let mut stages: serde_json::Map<String, serde_json::Value> = body
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(prefix)?;
            let (stage, value) = rest.split_once("\"} ")?;
            Some((stage.to_owned(), serde_json::Value::from(value.trim().parse::<f64>().ok()?)))
        })
        .collect();
    // The number of batches, so stage times can be read per batch.
    if let Some(count) = body
        .lines()
        .find_map(|line| line.strip_prefix("storage_writer_stage_latency_seconds_count{stage=\"postgres\"} "))
        .and_then(|count| count.trim().parse::<f64>().ok())
    {
        stages.insert("batches".into(), count.into());
    }
    Ok(stages)
}

/// Starts a writer on a topic holding `expected` records and times it until every one is
/// ACKed `persisted`.
async fn sustained(
    bench: &WriterBench,
    services: &Services,
    topic: &str,
    database: &crate::services::Database,
    mongo: Option<(String, String)>,
    expected: usize,
) -> anyhow::Result<SustainedRun> {
    let ack_topic = unique("bench-acks");
    create_topics(services, &[&ack_topic], bench.partitions).await?;
    let acks = assigned_consumer(services, &ack_topic, bench.partitions)?;
    let redis_cpu_before = redis_cpu_seconds(services).await?;
    let started = Instant::now();
    let (mut writer, metrics) = start_writer(bench, services, topic, &ack_topic, &database.url, mongo.as_ref())?;
    let pid = writer.id();
    let mut profiler = match &bench.profile {
        Some(path) if mongo.is_none() => Some(
            Command::new("perf")
                .args(["record", "-e", "cpu-clock", "-F", "499", "-g", "-o"])
                .arg(path)
                .args(["-p", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("perf record (Debian package linux-perf)")?,
        ),
        _ => None,
    };
    let (first_ack, last_ack) = tokio::task::spawn_blocking(move || {
        let mut persisted = HashSet::with_capacity(expected);
        let mut first = None;
        while persisted.len() < expected {
            if started.elapsed() > Duration::from_secs(1800) {
                anyhow::bail!("{} of {expected} ACKs after 30 minutes", persisted.len());
            }
            let Some(message) = acks.poll(Duration::from_millis(100)) else { continue };
            let message = message?;
            let ack: serde_json::Value =
                serde_json::from_slice(rdkafka::Message::payload(&message).unwrap_or_default())?;
            if ack["status"] == "persisted"
                && let Some(id) = ack["message_id"].as_str()
            {
                first.get_or_insert_with(|| started.elapsed());
                persisted.insert(id.to_owned());
            }
        }
        Ok((first.unwrap_or_default(), started.elapsed()))
    })
    .await??;
    // The indexer keeps working after the last ACK: the run ends when the queue is empty.
    let mut queue = sqlx::PgConnection::connect(&database.url).await?;
    let indexed_all = loop {
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM search_index_queue").fetch_one(&mut queue).await?;
        if queued == 0 {
            break Some(started.elapsed() - first_ack);
        }
        if started.elapsed() > Duration::from_secs(3600) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let redis_cpu = redis_cpu_seconds(services).await? - redis_cpu_before;
    let peak_rss_mib = peak_rss_mib(pid).unwrap_or(0.0);
    let stages = stage_seconds(metrics).await.unwrap_or_default();
    let profile = match profiler.as_mut() {
        Some(profiler) => {
            Command::new("kill").args(["-INT", &profiler.id().to_string()]).status()?;
            profiler.wait()?;
            bench.profile.as_ref().map(|path| top_of_profile(path)).transpose()?
        }
        None => None,
    };
    Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    writer.wait()?;
    let mut connection = sqlx::PgConnection::connect(&database.url).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut connection).await?;
    anyhow::ensure!(stored as usize >= expected, "the writer ACKed {expected} but stored {stored}");
    Ok(SustainedRun {
        rate: rate(expected, last_ack - first_ack),
        elapsed: last_ack,
        first_ack,
        peak_rss_mib,
        profile,
        stages,
        redis_cpu_us_per_message: redis_cpu * 1e6 / expected.max(1) as f64,
        indexed_all,
    })
}

/// The functions with the most samples of their own, from `perf report`.
fn top_of_profile(path: &std::path::Path) -> anyhow::Result<String> {
    let output = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "--sort", "symbol", "--percent-limit", "1", "-g", "none", "-i"])
        .arg(path)
        .output()
        .context("perf report")?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().filter(|line| line.contains('%')).take(25).collect::<Vec<_>>().join("\n"))
}

/// Offers `rate` messages per second for the configured time to a running writer and
/// measures each message from the moment it was handed to the producer to its ACK.
async fn latency(
    bench: &WriterBench,
    services: &Services,
    database: &crate::services::Database,
    tenant: &str,
    mongo: Option<(String, String)>,
    rate: f64,
) -> anyhow::Result<(Latencies, Latencies)> {
    let (topic, ack_topic) = (unique("bench-latency"), unique("bench-latency-acks"));
    create_topics(services, &[&topic, &ack_topic], bench.partitions).await?;
    let acks = assigned_consumer(services, &ack_topic, bench.partitions)?;
    let (mut writer, metrics) = start_writer(bench, services, &topic, &ack_topic, &database.url, mongo.as_ref())?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services.kafka)
        .set("linger.ms", "0")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut workload = bench.workload(tenant, 7);
    let total = (rate * bench.latency_seconds as f64) as usize;
    let warmup = 200;
    let (sent_tx, sent_rx) = std::sync::mpsc::channel::<(String, Instant)>();
    let (acked_tx, acked_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let findable = tokio::spawn(findable_after_ack(database.url.clone(), tenant.to_owned(), acked_rx));
    let collector = tokio::task::spawn_blocking(move || -> anyhow::Result<Latencies> {
        let mut sent: HashMap<String, Instant> = HashMap::new();
        let mut acked: HashMap<String, Instant> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(600);
        while acked.len() < total + warmup && Instant::now() < deadline {
            sent.extend(sent_rx.try_iter());
            let Some(message) = acks.poll(Duration::from_millis(5)) else { continue };
            let received = Instant::now();
            let ack: serde_json::Value =
                serde_json::from_slice(rdkafka::Message::payload(&message?).unwrap_or_default())?;
            if let Some(id) = ack["message_id"].as_str()
                && !acked.contains_key(id)
            {
                acked.insert(id.to_owned(), received);
                // One ACK in ten after the warm-up is followed until search finds it.
                if acked.len() > warmup && acked.len().is_multiple_of(10) {
                    let _ = acked_tx.send((id.to_owned(), received));
                }
            }
        }
        drop(acked_tx);
        sent.extend(sent_rx.try_iter());
        let mut latencies = Latencies::default();
        for (id, at) in &acked {
            if let Some(sent_at) = sent.get(id) {
                latencies.record(at.saturating_duration_since(*sent_at));
            }
        }
        anyhow::ensure!(acked.len() >= total + warmup, "{} of {} ACKs arrived", acked.len(), total + warmup);
        Ok(latencies)
    });

    // Warm-up: the writer has joined its group and served a first batch before timing starts.
    let mut warm = Vec::new();
    for _ in 0..warmup {
        let record = workload.next_record();
        let delivery = FutureRecord::to(&topic).key(&record.session_id).payload(&record.payload);
        warm.push(producer.send_result(delivery).map_err(|(error, _)| error)?);
    }
    for delivery in futures::future::join_all(warm).await {
        delivery?.map_err(|(error, _)| error)?;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;

    let started = Instant::now();
    let mut pending = Vec::new();
    for index in 0..total {
        let due = started + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let record = workload.next_record();
        let delivery = FutureRecord::to(&topic).key(&record.session_id).payload(&record.payload);
        sent_tx.send((record.message_id.clone(), Instant::now()))?;
        pending.push(producer.send_result(delivery).map_err(|(error, _)| error)?);
        if pending.len() >= 10_000 {
            for delivery in futures::future::join_all(pending.drain(..)).await {
                delivery?.map_err(|(error, _)| error)?;
            }
        }
    }
    for delivery in futures::future::join_all(pending).await {
        delivery?.map_err(|(error, _)| error)?;
    }
    let latencies = collector.await??;
    let findable = findable.await??;
    let stages = stage_seconds(metrics).await.unwrap_or_default();
    let batches = stages.get("batches").and_then(serde_json::Value::as_f64).unwrap_or(0.0).max(1.0);
    let per_batch: serde_json::Map<String, serde_json::Value> = stages
        .iter()
        .filter(|(stage, _)| *stage != "batches")
        .filter_map(|(stage, seconds)| Some((stage.clone(), (seconds.as_f64()? * 1000.0 / batches).into())))
        .collect();
    eprintln!("  latency run: {batches:.0} batches, ms per batch by stage: {}", serde_json::Value::from(per_batch));
    Command::new("kill").args(["-TERM", &writer.id().to_string()]).status()?;
    writer.wait()?;
    anyhow::ensure!(latencies.len() >= total, "measured {} of {total} messages", latencies.len());
    Ok((latencies, findable))
}

/// Time from each ACK received on `acked` until PostgreSQL's search index holds its message:
/// the pending ids are looked up together every 20 ms (the measurement's resolution).
async fn findable_after_ack(
    url: String,
    tenant: String,
    mut acked: tokio::sync::mpsc::UnboundedReceiver<(String, Instant)>,
) -> anyhow::Result<Latencies> {
    let mut connection = sqlx::PgConnection::connect(&url).await?;
    let mut pending: Vec<(String, Instant)> = Vec::new();
    let mut latencies = Latencies::default();
    let mut open = true;
    while open || !pending.is_empty() {
        loop {
            match acked.try_recv() {
                Ok(sample) => pending.push(sample),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !pending.is_empty() {
            let ids: Vec<&str> = pending.iter().map(|(id, _)| id.as_str()).collect();
            let found: HashSet<String> = sqlx::query_scalar(
                "SELECT message_id FROM message_search WHERE tenant_id = $1 AND message_id = ANY($2)",
            )
            .bind(&tenant)
            .bind(&ids)
            .fetch_all(&mut connection)
            .await?
            .into_iter()
            .collect();
            let now = Instant::now();
            pending.retain(|(id, acked_at)| {
                let indexed = found.contains(id);
                if indexed {
                    latencies.record(now.saturating_duration_since(*acked_at));
                }
                !indexed
            });
            if let Some((id, acked_at)) = pending.first() {
                anyhow::ensure!(
                    acked_at.elapsed() < Duration::from_secs(120),
                    "{id} not searchable 120 s after its ACK"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(latencies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        assert_eq!(escape("a\tb\\c\nd"), "a\\tb\\\\c\\nd");
        assert_eq!(hex(&[0, 255]), "\\\\x00ff");
    }
}
