//! `flare-storage-bench` — benchmarks of the writer and reader, each beside this machine's own
//! limits measured in the same run (see [`USAGE`] and docs/BENCHMARKS.md). They report; they
//! never pass or fail on a number.

mod baseline;
mod reader;
mod report;
mod search;
mod services;
mod workload;
mod writer;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};

const USAGE: &str = "usage (after `eval \"$(scripts/services.sh up)\"` and `cargo build --release --bins`):
  flare-storage-bench writer [--messages 500000] [--sessions 10000] [--partitions 8] [--batch 500]
                             [--latency-seconds 30] [--latency-fraction 0.5] [--mongo-messages N]
                             [--text natural|phrases] [--big-group-share 0.1]
                             [--profile FILE] [--json target/bench/writer.json]
      preload, then the writer's sustained rate (until every message is ACKed) and produce→ACK
      latency at a fraction of it, beside raw Kafka consume, PostgreSQL COPY/UNNEST and Redis
  flare-storage-bench reader [--messages 100000] [--sessions 1000] [--concurrency 64]
                             [--connections 4] [--seconds 15] [--json target/bench/reader.json]
      QueryMessages hot/cold, GetMessage, QueryMessagesBySeq (sessions and messages drawn Zipf
      over recent history), beside an empty gRPC handler and one answering the reader's own
      responses (captured from it), under the same load
  flare-storage-bench search [--messages 1000000] [--sessions 10000] [--queries 20] [--repeats 5]
                             [--mongo-messages 2000] [--keep false] [--json target/bench/search.json]
      SearchMessages tenant-wide for 1-, 2- and 4-character Chinese and English words, over
      PostgreSQL (history loaded by COPY) and MongoDB (0 messages: no MongoDB run); --keep true
      leaves the PostgreSQL database for EXPLAIN and prints its URL
  flare-storage-bench empty-server --addr 127.0.0.1:50099
  flare-storage-bench canned-server --addr 127.0.0.1:50099 --responses FILE
      the baselines on their own (the reader benchmark starts them itself)

The writer and reader binaries are taken from target/release (override with FLARE_WRITER_BIN,
FLARE_READER_BIN); services from POSTGRES_URL, REDIS_URL, KAFKA_BOOTSTRAP_SERVERS, MONGO_URL.";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(error) = run(args).await {
        eprintln!("flare-storage-bench: {error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let options = Options::parse(rest)?;
    match command.as_str() {
        "writer" => {
            let bench = writer::WriterBench {
                messages: options.number("messages", 500_000)?,
                sessions: options.number("sessions", 10_000)?,
                partitions: options.number("partitions", 8)?,
                batch: options.number("batch", 500)?,
                latency_seconds: options.number("latency-seconds", 30)?,
                latency_fraction: options.number("latency-fraction", 0.5)?,
                mongo_messages: options.get("mongo-messages").map(str::parse).transpose()?,
                text: match options.get("text").unwrap_or("natural") {
                    "natural" => workload::TextMode::Natural,
                    "phrases" => workload::TextMode::Phrases,
                    other => anyhow::bail!("--text: natural or phrases, not {other:?}"),
                },
                big_group_share: options.number("big-group-share", 0.0)?,
                profile: options.get("profile").map(PathBuf::from),
                writer_binary: binary("FLARE_WRITER_BIN", "flare-storage-writer")?,
                json: options.get("json").unwrap_or("target/bench/writer.json").into(),
            };
            writer::run(bench, services::Services::from_env()?).await
        }
        "reader" => {
            let bench = reader::ReaderBench {
                messages: options.number("messages", 100_000)?,
                sessions: options.number("sessions", 1_000)?,
                concurrency: options.number("concurrency", 64)?,
                connections: options.number("connections", 4)?,
                seconds: options.number("seconds", 15)?,
                writer_binary: binary("FLARE_WRITER_BIN", "flare-storage-writer")?,
                reader_binary: binary("FLARE_READER_BIN", "flare-storage-reader")?,
                json: options.get("json").unwrap_or("target/bench/reader.json").into(),
            };
            reader::run(bench, services::Services::from_env()?).await
        }
        "search" => {
            let bench = search::SearchBench {
                messages: options.number("messages", 1_000_000)?,
                sessions: options.number("sessions", 10_000)?,
                queries: options.number("queries", 20)?,
                repeats: options.number("repeats", 5)?,
                mongo_messages: options.number("mongo-messages", 2_000)?,
                keep: options.get("keep").is_some_and(|keep| keep == "true"),
                reader_binary: binary("FLARE_READER_BIN", "flare-storage-reader")?,
                json: options.get("json").unwrap_or("target/bench/search.json").into(),
            };
            search::run(bench, services::Services::from_env()?).await
        }
        "empty-server" => {
            let addr = options.get("addr").context("--addr is required")?.parse()?;
            baseline::serve(addr, baseline::Canned::default()).await
        }
        "canned-server" => {
            let addr = options.get("addr").context("--addr is required")?.parse()?;
            let responses = options.get("responses").context("--responses is required")?;
            baseline::serve(addr, baseline::Canned::load(responses.as_ref())?).await
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// `--name value` pairs.
struct Options(HashMap<String, String>);

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = HashMap::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let name = arg.strip_prefix("--").with_context(|| format!("unexpected argument {arg:?}\n{USAGE}"))?;
            let value = args.next().with_context(|| format!("--{name} needs a value"))?;
            options.insert(name.to_owned(), value.clone());
        }
        Ok(Self(options))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|_| anyhow::anyhow!("--{name}: {value:?} is not a number")),
        }
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
