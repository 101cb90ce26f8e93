//! `flare-storage-bench` — benchmarks of the writer and reader, each beside this machine's own
//! limits measured in the same run (`--help`, docs/BENCHMARKS.md). They report; they never
//! pass or fail on a number.

mod baseline;
mod reader;
mod report;
mod search;
mod services;
mod workload;
mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand};

/// Benchmarks of flare-storage beside this machine's own limits, run after
/// `eval "$(scripts/services.sh up)"` and `cargo build --release --bins`. The writer and reader
/// binaries are taken from beside this one (override with FLARE_WRITER_BIN, FLARE_READER_BIN);
/// services from POSTGRES_URL, REDIS_URL, KAFKA_BOOTSTRAP_SERVERS, MONGO_URL.
#[derive(Parser)]
#[command(name = "flare-storage-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preload, then the writer's sustained rate (until every message is ACKed) and
    /// produce→ACK latency at a fraction of it, beside raw Kafka consume, PostgreSQL COPY/UNNEST
    /// and Redis.
    Writer {
        #[arg(long, default_value_t = 500_000)]
        messages: usize,
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[arg(long, default_value_t = 30)]
        latency_seconds: u64,
        /// The latency run's rate as a share of the sustained rate.
        #[arg(long, default_value_t = 0.5)]
        latency_fraction: f64,
        /// Also store into MongoDB (a slow stand-in here), with this many messages.
        #[arg(long)]
        mongo_messages: Option<usize>,
        #[arg(long, value_enum, default_value = "natural")]
        text: workload::TextMode,
        /// Share of messages sent to a 5,000-member group.
        #[arg(long, default_value_t = 0.0)]
        big_group_share: f64,
        /// Record a CPU profile of the writer during the sustained run into this file.
        #[arg(long)]
        profile: Option<PathBuf>,
        #[arg(long, default_value = "target/bench/writer.json")]
        json: PathBuf,
    },
    /// QueryMessages hot/cold, GetMessage, QueryMessagesBySeq (sessions and messages drawn Zipf
    /// over recent history), beside an empty gRPC handler and one answering the reader's own
    /// responses (captured from it), under the same load.
    Reader {
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        #[arg(long, default_value_t = 1_000)]
        sessions: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        #[arg(long, default_value = "target/bench/reader.json")]
        json: PathBuf,
    },
    /// SearchMessages tenant-wide for 1-, 2- and 4-character Chinese and English words, over
    /// PostgreSQL (history loaded by COPY) and MongoDB (0 messages: no MongoDB run).
    Search {
        #[arg(long, default_value_t = 1_000_000)]
        messages: usize,
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        #[arg(long, default_value_t = 20)]
        queries: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        #[arg(long, default_value_t = 2_000)]
        mongo_messages: usize,
        /// Leave the PostgreSQL database for EXPLAIN and print its URL.
        #[arg(long, default_value_t = false, action = ArgAction::Set)]
        keep: bool,
        #[arg(long, default_value = "target/bench/search.json")]
        json: PathBuf,
    },
    /// The empty gRPC handler on its own (the reader benchmark starts it itself).
    EmptyServer {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// The handler answering captured responses on its own.
    CannedServer {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        responses: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli.command).await {
        eprintln!("flare-storage-bench: {error:#}");
        std::process::exit(1);
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Writer {
            messages,
            sessions,
            partitions,
            batch,
            latency_seconds,
            latency_fraction,
            mongo_messages,
            text,
            big_group_share,
            profile,
            json,
        } => {
            let bench = writer::WriterBench {
                messages,
                sessions,
                partitions,
                batch,
                latency_seconds,
                latency_fraction,
                mongo_messages,
                text,
                big_group_share,
                profile,
                writer_binary: binary("FLARE_WRITER_BIN", "flare-storage-writer")?,
                json,
            };
            writer::run(bench, services::Services::from_env()?).await
        }
        Command::Reader { messages, sessions, concurrency, connections, seconds, json } => {
            let bench = reader::ReaderBench {
                messages,
                sessions,
                concurrency,
                connections,
                seconds,
                writer_binary: binary("FLARE_WRITER_BIN", "flare-storage-writer")?,
                reader_binary: binary("FLARE_READER_BIN", "flare-storage-reader")?,
                json,
            };
            reader::run(bench, services::Services::from_env()?).await
        }
        Command::Search { messages, sessions, queries, repeats, mongo_messages, keep, json } => {
            let bench = search::SearchBench {
                messages,
                sessions,
                queries,
                repeats,
                mongo_messages,
                keep,
                reader_binary: binary("FLARE_READER_BIN", "flare-storage-reader")?,
                json,
            };
            search::run(bench, services::Services::from_env()?).await
        }
        Command::EmptyServer { addr } => baseline::serve(addr, baseline::Canned::default()).await,
        Command::CannedServer { addr, responses } => baseline::serve(addr, baseline::Canned::load(&responses)?).await,
    }
}

/// A product binary: `$variable`, else beside this one (target/release when run from there).
fn binary(variable: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var(variable) {
        return Ok(path.into());
    }
    let beside = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        beside.exists(),
        "{} not found: build it (`cargo build --release --bins`) or set {variable}",
        beside.display()
    );
    Ok(beside)
}
