//! `flare-storage-bench reader`: a gRPC load generator against the reader — QueryMessages
//! (page of 20) on hot sessions (answered from the Redis window) and on cold ones (a reader
//! without Redis: every page from PostgreSQL), GetMessage, QueryMessagesBySeq — beside the
//! same load on two baselines in the same run: an empty handler (`empty-server`) and one that
//! answers the very responses the reader gave (`canned-server`).
//!
//! Sessions are drawn Zipf (s = 1) by activity, messages Zipf over each session's newest
//! [`RECENT`] (recent history: the chats people open, the messages they quote and link). The
//! generator skips response fields by their lengths instead of decoding them, so the rates
//! measure the servers, not the client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::serving;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::proto::storage::{GetMessageRequest, QueryMessagesBySeqRequest, QueryMessagesRequest};
use serde_json::json;
use sqlx::Connection as _;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::baseline::Canned;

use crate::report::{Latencies, Report, Row, peak_rss_mib};
use crate::services::{
    Database, Services, create_database, create_topics, drop_database, forget_tenant, produce_all, unique,
    writer_command,
};
use crate::workload::{Random, Record, Workload, draw, zipf};

/// Newest messages of a session that GetMessage asks for.
const RECENT: usize = 50;
/// Messages per QueryMessages and QueryMessagesBySeq page.
const PAGE: i32 = 20;

#[derive(clap::Args)]
pub struct ReaderBench {
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    #[arg(long, default_value_t = 1_000)]
    pub sessions: usize,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Found after parsing (FLARE_WRITER_BIN, else beside the bench binary).
    #[arg(skip)]
    pub writer_binary: PathBuf,
    /// Found after parsing (FLARE_READER_BIN, else beside the bench binary).
    #[arg(skip)]
    pub reader_binary: PathBuf,
    #[arg(long, default_value = "target/bench/reader.json")]
    pub json: PathBuf,
}

/// What the load generator asks for.
struct Targets {
    tenant: String,
    /// Busiest first.
    sessions: Vec<Session>,
    /// Cumulative Zipf weights over `sessions`.
    session_weights: Vec<f64>,
    /// Cumulative Zipf weights over a session's newest messages, newest first.
    recent_weights: Vec<f64>,
}

struct Session {
    id: String,
    last_seq: i64,
    /// Ids of the newest [`RECENT`] messages, newest first.
    recent: Vec<String>,
}

#[derive(Clone, Copy, Debug)]
enum Call {
    QueryPage,
    GetMessage,
    BySeq,
}

impl Call {
    fn path(self) -> &'static str {
        match self {
            Self::QueryPage => "/flare.storage.v1.StorageReaderService/QueryMessages",
            Self::GetMessage => "/flare.storage.v1.StorageReaderService/GetMessage",
            Self::BySeq => "/flare.storage.v1.StorageReaderService/QueryMessagesBySeq",
        }
    }
}

pub async fn run(bench: ReaderBench, services: Services) -> anyhow::Result<()> {
    let mut report = Report::new(
        "reader",
        json!({
            "messages": bench.messages, "sessions": bench.sessions, "concurrency": bench.concurrency,
            "connections": bench.connections, "seconds": bench.seconds,
        }),
    );
    let database = create_database(&services, "bench_reader").await?;
    let tenant = unique("bench");
    eprintln!("storing {} messages over {} sessions through the writer…", bench.messages, bench.sessions);
    store(&bench, &services, &database, &tenant).await?;
    let targets = Arc::new(targets(&database, &tenant).await?);

    let empty = Server::start_baseline(&["empty-server"])?;
    let cached = Server::start_reader(&bench.reader_binary, &database, Some(&services.redis))?;
    let uncached = Server::start_reader(&bench.reader_binary, &database, None)?;
    for server in [&empty, &cached, &uncached] {
        server.wait_ready().await?;
    }
    let canned = capture(cached.grpc, &targets).await?;
    let responses = bench.json.with_extension("canned.bin");
    if let Some(folder) = responses.parent() {
        std::fs::create_dir_all(folder)?;
    }
    canned.save(&responses)?;
    let canned_server = Server::start_baseline(&["canned-server", "--responses", &responses.to_string_lossy()])?;
    canned_server.wait_ready().await?;

    let load = |server: &Server, call: Call, rate: Option<f64>| {
        drive(server.grpc, call, targets.clone(), bench.concurrency, bench.connections, bench.seconds, rate)
    };
    let mut empty_run = load(&empty, Call::GetMessage, None).await?;
    report.push(empty_run.row("limit: empty tonic handler", ""));
    let sizes = [
        (Call::QueryPage, canned.page.encoded_len(), "QueryMessages"),
        (Call::GetMessage, canned.message.encoded_len(), "GetMessage"),
        (Call::BySeq, canned.by_seq.encoded_len(), "BySeq"),
    ];
    let mut canned_rates = Vec::new();
    for (call, bytes, name) in sizes {
        let mut run = load(&canned_server, call, None).await?;
        report.push(run.row(&format!("limit: canned {name} ({bytes} B)"), "the reader's response, answered as is"));
        canned_rates.push(run.rate);
    }
    let [canned_page, canned_get, canned_by_seq] = canned_rates[..] else { unreachable!("three baselines") };

    let mut measured = Vec::new();
    for (call, name, key, canned_rate) in [
        (Call::QueryPage, "QueryMessages hot (page 20)", "query_hot", canned_page),
        (Call::GetMessage, "GetMessage", "get_message", canned_get),
        (Call::BySeq, "QueryMessagesBySeq (page 20)", "by_seq", canned_by_seq),
    ] {
        let before = cache_lookups(cached.metrics).await?;
        let mut run = load(&cached, call, None).await?;
        let after = cache_lookups(cached.metrics).await?;
        let hits = after.0 - before.0;
        let hit_rate = hits / (hits + after.1 - before.1).max(1.0);
        let note = format!(
            "{:.0}% of canned, {:.0}% of empty; cache hit {:.1}%",
            100.0 * run.rate / canned_rate,
            100.0 * run.rate / empty_run.rate,
            100.0 * hit_rate
        );
        report.push(run.row(name, note));
        report.result(&format!("{key}_ratio_to_canned"), run.rate / canned_rate);
        report.result(&format!("{key}_ratio_to_empty"), run.rate / empty_run.rate);
        report.result(&format!("{key}_cache_hit_rate"), hit_rate);
        measured.push((call, name, run.rate));
    }
    let mut cold = load(&uncached, Call::QueryPage, None).await?;
    let note = format!("{:.0}% of empty", 100.0 * cold.rate / empty_run.rate);
    report.push(cold.row("QueryMessages cold (no cache, DB)", note));
    for (call, name, rate) in measured {
        let mut half = load(&cached, call, Some(rate / 2.0)).await?;
        report.push(half.row(&format!("{name} at half load"), "offered 50% of its maximum"));
    }

    report.result("reader_peak_rss_mib", cached.peak_rss());
    report.result("reader_without_cache_peak_rss_mib", uncached.peak_rss());
    drop((empty, canned_server, cached, uncached));
    drop_database(&services, &database).await?;
    forget_tenant(&services, &tenant).await?;
    report.finish(&bench.json)
}

/// The reader's answers to one call of each kind on the busiest session, as the canned
/// baseline serves them.
async fn capture(addr: SocketAddr, targets: &Targets) -> anyhow::Result<Canned> {
    let mut client = StorageReaderServiceClient::new(Channel::from_shared(format!("http://{addr}"))?.connect().await?);
    let session = targets.sessions.first().context("no sessions stored")?;
    let tenant = Some(TenantContext { tenant_id: targets.tenant.clone(), ..Default::default() });
    let page = client
        .query_messages(QueryMessagesRequest {
            session_id: session.id.clone(),
            limit: PAGE,
            tenant: tenant.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let message = client
        .get_message(GetMessageRequest {
            message_id: session.recent.first().context("empty session")?.clone(),
            context: None,
            tenant: tenant.clone(),
        })
        .await?
        .into_inner();
    let by_seq = client
        .query_messages_by_seq(QueryMessagesBySeqRequest {
            session_id: session.id.clone(),
            after_seq: (session.last_seq - 2 * i64::from(PAGE)).max(0),
            limit: PAGE,
            tenant,
            ..Default::default()
        })
        .await?
        .into_inner();
    // Decoded by the client, then read as the served types, which keep the messages encoded.
    Ok(Canned {
        page: serving::QueryMessagesResponse::decode(page.encode_to_vec().as_slice())?,
        message: serving::GetMessageResponse::decode(message.encode_to_vec().as_slice())?,
        by_seq: serving::QueryMessagesBySeqResponse::decode(by_seq.encode_to_vec().as_slice())?,
    })
}

/// Stores the benchmark's history through the writer (so the Redis windows are what
/// production has), waiting until every message is in PostgreSQL.
async fn store(bench: &ReaderBench, services: &Services, database: &Database, tenant: &str) -> anyhow::Result<()> {
    let topic = unique("bench-reader-messages");
    create_topics(services, &[&topic], 8).await?;
    let mut workload = Workload::new(tenant, bench.sessions, 11);
    let records: Vec<Record> = (0..bench.messages).map(|_| workload.next_record()).collect();
    produce_all(services, &topic, &records).await?;
    let mut writer = writer_command(&bench.writer_binary, services, &topic, &database.url)
        .spawn()
        .with_context(|| format!("cannot start {}", bench.writer_binary.display()))?;
    let mut connection = sqlx::PgConnection::connect(&database.url).await?;
    let started = Instant::now();
    loop {
        // Until the writer has created the table, the count fails: nothing stored yet.
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut connection).await.unwrap_or_default();
        if stored as usize >= bench.messages {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1200), "only {stored} messages stored in 20 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let the last batch's cache writes land before stopping.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Command::new("kill").args(["-TERM", &writer.id().to_string()]).status()?;
    writer.wait()?;
    Ok(())
}

async fn targets(database: &Database, tenant: &str) -> anyhow::Result<Targets> {
    let mut connection = sqlx::PgConnection::connect(&database.url).await?;
    let rows: Vec<(String, i64, Vec<String>)> = sqlx::query_as(
        r#"SELECT session_id, max(seq),
                  (array_agg(message_id ORDER BY seq DESC))[1:$1]
           FROM messages GROUP BY session_id ORDER BY count(*) DESC, session_id"#,
    )
    .bind(RECENT as i32)
    .fetch_all(&mut connection)
    .await?;
    let sessions: Vec<Session> =
        rows.into_iter().map(|(id, last_seq, recent)| Session { id, last_seq, recent }).collect();
    Ok(Targets {
        tenant: tenant.to_owned(),
        session_weights: zipf(sessions.len()),
        recent_weights: zipf(RECENT),
        sessions,
    })
}

/// A server process under load: the reader, or the empty handler.
pub(crate) struct Server {
    child: Child,
    pub(crate) grpc: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Server {
    fn free_addr() -> anyhow::Result<SocketAddr> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
    }

    /// This binary's `empty-server` or `canned-server` with these arguments.
    fn start_baseline(args: &[&str]) -> anyhow::Result<Self> {
        let grpc = Self::free_addr()?;
        let child = Command::new(std::env::current_exe()?)
            .args(args)
            .args(["--addr", &grpc.to_string()])
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Self { child, grpc, metrics: None })
    }

    fn start_reader(binary: &PathBuf, database: &Database, redis: Option<&str>) -> anyhow::Result<Self> {
        let mut settings = vec![("POSTGRES_URL", database.url.as_str())];
        settings.extend(redis.map(|redis| ("REDIS_URL", redis)));
        Self::start_reader_with(binary, &settings)
    }

    /// The reader with these settings and no others of the environment's stores.
    pub(crate) fn start_reader_with(binary: &PathBuf, settings: &[(&str, &str)]) -> anyhow::Result<Self> {
        let (grpc, metrics) = (Self::free_addr()?, Self::free_addr()?);
        let mut command = Command::new(binary);
        command
            .env("STORAGE_READER_GRPC_ADDR", grpc.to_string())
            .env("METRICS_ADDR", metrics.to_string())
            .env("RUST_LOG", "warn")
            .env_remove("POSTGRES_URL")
            .env_remove("REDIS_URL")
            .env_remove("MONGO_URL")
            .envs(settings.iter().copied())
            .stdout(Stdio::null());
        let child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self { child, grpc, metrics: Some(metrics) })
    }

    pub(crate) async fn wait_ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        while tokio::net::TcpStream::connect(self.grpc).await.is_err() {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "{} did not listen in 30 s", self.grpc);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub(crate) fn peak_rss(&self) -> f64 {
        peak_rss_mib(self.child.id()).unwrap_or(0.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// The reader's cache lookups so far: (hits, misses).
async fn cache_lookups(metrics: Option<SocketAddr>) -> anyhow::Result<(f64, f64)> {
    let Some(addr) = metrics else { return Ok((0.0, 0.0)) };
    let body = crate::services::http_get(addr, "/metrics").await?;
    let value = |label: &str| {
        body.lines()
            .find(|line| line.starts_with(&format!("storage_reader_cache_lookups_total{{result=\"{label}\"}}")))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((value("hit"), value("miss")))
}

struct LoadRun {
    rate: f64,
    errors: usize,
    latencies: Latencies,
}

impl LoadRun {
    fn row(&mut self, scenario: &str, note: impl Into<String>) -> Row {
        let mut note = note.into();
        if self.errors > 0 {
            note = format!("{note}; {} errors", self.errors);
        }
        let rate = self.rate;
        Row::with_latencies(scenario, rate, &mut self.latencies, note)
    }
}

/// `concurrency` callers over `connections` HTTP/2 connections for `seconds` (after a second
/// of warm-up), each calling as fast as answers come, or together at about `rate` per second.
async fn drive(
    addr: SocketAddr,
    call: Call,
    targets: Arc<Targets>,
    concurrency: usize,
    connections: usize,
    seconds: u64,
    rate: Option<f64>,
) -> anyhow::Result<LoadRun> {
    let mut channels = Vec::new();
    for _ in 0..connections.max(1) {
        // HTTP/2's default 64 KiB connection window would cap a connection at a few pages
        // in flight (a page of 20 is ~8 KiB); a gateway sets larger windows, and so do we.
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .initial_connection_window_size(8 << 20)
            .initial_stream_window_size(1 << 20)
            .connect()
            .await?;
        channels.push(channel);
    }
    let warmup = Duration::from_secs(1);
    let measured = Duration::from_secs(seconds);
    let started = Instant::now() + Duration::from_millis(50);
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let mut client = tonic::client::Grpc::new(channels[worker % channels.len()].clone());
        let targets = targets.clone();
        workers.push(tokio::spawn(async move {
            let mut random = Random::new(worker as u64 * 7919 + 1);
            let mut latencies = Latencies::default();
            let (mut count, mut errors) = (0usize, 0usize);
            // A worker's share of a fixed rate: one call every `interval`, offset per worker.
            let interval = rate.map(|rate| Duration::from_secs_f64(concurrency as f64 / rate));
            let mut next =
                started + interval.map_or(Duration::ZERO, |interval| interval * worker as u32 / concurrency as u32);
            loop {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                }
                let sent = Instant::now();
                if sent >= started + warmup + measured {
                    break;
                }
                let ok = one_call(&mut client, call, &targets, &mut random).await;
                if sent >= started + warmup {
                    count += 1;
                    if ok {
                        latencies.record(sent.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (count, errors, latencies)
        }));
    }
    let mut run = LoadRun { rate: 0.0, errors: 0, latencies: Latencies::default() };
    let mut total = 0;
    for worker in workers {
        let (count, errors, latencies) = worker.await?;
        total += count;
        run.errors += errors;
        run.latencies.extend(latencies);
    }
    run.rate = total as f64 / measured.as_secs_f64();
    Ok(run)
}

async fn one_call(
    client: &mut tonic::client::Grpc<Channel>,
    call: Call,
    targets: &Targets,
    random: &mut Random,
) -> bool {
    let tenant = Some(TenantContext { tenant_id: targets.tenant.clone(), ..Default::default() });
    let session = &targets.sessions[draw(&targets.session_weights, random)];
    match call {
        Call::QueryPage => {
            let request =
                QueryMessagesRequest { session_id: session.id.clone(), limit: PAGE, tenant, ..Default::default() };
            unary(client, call, request).await
        }
        Call::GetMessage => {
            // Zipf over the messages the session has, when it has fewer than RECENT.
            let weights = &targets.recent_weights[..session.recent.len().min(RECENT)];
            let Some(message_id) = session.recent.get(draw(weights, random)).cloned() else { return false };
            unary(client, call, GetMessageRequest { message_id, context: None, tenant }).await
        }
        Call::BySeq => {
            // Within the newest 200 (the hot window): gap filling after a short disconnect.
            let after_seq = (session.last_seq - i64::from(PAGE) - random.below(160) as i64).max(0);
            let request = QueryMessagesBySeqRequest {
                session_id: session.id.clone(),
                after_seq,
                limit: PAGE,
                tenant,
                ..Default::default()
            };
            unary(client, call, request).await
        }
    }
}

/// One call whose response is received whole but not decoded.
async fn unary<T: flare_storage_common::prost::Message + Send + Sync + 'static>(
    client: &mut tonic::client::Grpc<Channel>,
    call: Call,
    request: T,
) -> bool {
    if client.ready().await.is_err() {
        return false;
    }
    let codec = tonic_prost::ProstCodec::<T, Skipped>::default();
    client.unary(tonic::Request::new(request), PathAndQuery::from_static(call.path()), codec).await.is_ok()
}

/// A response read by skipping each field by its length, without decoding it.
#[derive(Debug, Default, Clone)]
struct Skipped;

impl flare_storage_common::prost::Message for Skipped {
    fn encode_raw(&self, _: &mut impl flare_storage_common::prost::bytes::BufMut) {}

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: flare_storage_common::prost::encoding::WireType,
        buf: &mut impl flare_storage_common::prost::bytes::Buf,
        ctx: flare_storage_common::prost::encoding::DecodeContext,
    ) -> Result<(), flare_storage_common::prost::DecodeError> {
        flare_storage_common::prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {}
}
