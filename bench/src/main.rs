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

use clap::{Parser, Subcommand};

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
    Writer(writer::WriterBench),
    /// QueryMessages hot/cold, GetMessage, QueryMessagesBySeq (sessions and messages drawn Zipf
    /// over recent history), beside an empty gRPC handler and one answering the reader's own
    /// responses (captured from it), under the same load.
    Reader(reader::ReaderBench),
    /// SearchMessages tenant-wide for 1-, 2- and 4-character Chinese and English words, over
    /// PostgreSQL (history loaded by COPY) and MongoDB (0 messages: no MongoDB run).
    Search(search::SearchBench),
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
        Command::Writer(mut bench) => {
            bench.writer_binary = binary("FLARE_WRITER_BIN", "flare-storage-writer")?;
            writer::run(bench, services::Services::from_env()?).await
        }
        Command::Reader(mut bench) => {
            bench.writer_binary = binary("FLARE_WRITER_BIN", "flare-storage-writer")?;
            bench.reader_binary = binary("FLARE_READER_BIN", "flare-storage-reader")?;
            reader::run(bench, services::Services::from_env()?).await
        }
        Command::Search(mut bench) => {
            bench.reader_binary = binary("FLARE_READER_BIN", "flare-storage-reader")?;
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
