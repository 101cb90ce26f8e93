//! `flare-storage` — operator commands around a running flare-storage: migrations, partitioning
//! the messages table, topics,
//! sample traffic, reading and exporting sessions, replaying dead letters, reindexing
//! MongoDB. `flare-storage --help` lists them; every option is also an environment variable.

mod export;
mod partition;
mod progress;
mod reader_client;
mod replay;
mod traffic;

use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::{CommandFactory as _, Parser, Subcommand};
use flare_storage_common::message::to_timestamp;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    Message, MessageContent, MessageType, QueryMessagesRequest, StoreMessageRequest, TextContent, message_content,
};
use flare_storage_common::settings::{self, parse};
use flare_storage_writer::store::mongo::MongoStore;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::reader_client::ReaderArgs;

#[derive(Parser)]
#[command(name = "flare-storage", version, about = "Operator commands for flare-storage", propagate_version = true)]
struct Cli {
    /// Kafka brokers, host:port[,host:port].
    #[arg(long, global = true, env = "KAFKA_BOOTSTRAP_SERVERS", default_value = "127.0.0.1:9092", value_parser = parse::text)]
    kafka_bootstrap_servers: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the PostgreSQL migrations.
    Migrate {
        #[arg(long, env = "POSTGRES_URL", hide_env_values = true, value_parser = parse::postgres_url)]
        postgres_url: String,
    },
    /// Move a plain `messages` table that holds rows to monthly partitions, online and without
    /// copying: it becomes the partition of everything before a month boundary. Resumable.
    PartitionMessages {
        #[arg(long, env = "POSTGRES_URL", hide_env_values = true, value_parser = parse::postgres_url)]
        postgres_url: String,
        /// Days ahead of now that the boundary lies at least (it is the first day of the month
        /// after); more than WRITER_MAX_FUTURE_SECONDS, so no message written meanwhile is past it.
        #[arg(long, default_value_t = 31, value_parser = parse::positive::<u32>)]
        margin_days: u32,
    },
    /// Create Kafka topics (existing ones are left as they are).
    CreateTopics {
        #[arg(long, default_value_t = 8, value_parser = parse::positive::<i32>)]
        partitions: i32,
        #[arg(required = true, value_parser = parse::text)]
        topics: Vec<String>,
    },
    /// Send one short sample conversation (8 messages, Chinese and English) to a session.
    SendSample {
        /// Session id.
        #[arg(long, value_parser = parse::text)]
        session: String,
        /// Tenant id.
        #[arg(long, default_value = "demo", value_parser = parse::text)]
        tenant: String,
        /// Topic of StoreMessageRequest records.
        #[arg(long, default_value = "storage-messages", value_parser = parse::text)]
        topic: String,
    },
    /// Sample traffic: one-to-one and group sessions, Chinese and English, at a chosen rate.
    Produce {
        #[arg(long, default_value_t = 10_000, value_parser = parse::positive::<u64>)]
        messages: u64,
        /// Messages per second; 0 sends as fast as the broker takes them.
        #[arg(long, default_value_t = 1_000, value_parser = parse::number)]
        rate: u64,
        /// One-to-one sessions.
        #[arg(long, default_value_t = 1_000, value_parser = parse::number_of::<u32>)]
        direct: u32,
        /// Group sessions (5 to 50 members each).
        #[arg(long, default_value_t = 100, value_parser = parse::number_of::<u32>)]
        groups: u32,
        /// Tenant id.
        #[arg(long, default_value = "demo", value_parser = parse::text)]
        tenant: String,
        /// Topic of StoreMessageRequest records.
        #[arg(long, default_value = "storage-messages", value_parser = parse::text)]
        topic: String,
        /// The same seed sends the same sessions, senders and texts.
        #[arg(long, default_value_t = 1, value_parser = parse::number)]
        seed: u64,
    },
    /// Print a session's newest messages, oldest first.
    Query {
        /// Session id.
        #[arg(long, value_parser = parse::text)]
        session: String,
        /// Tenant id.
        #[arg(long, default_value = "demo", value_parser = parse::text)]
        tenant: String,
        #[arg(long, default_value_t = 20, value_parser = parse::positive::<i32>)]
        limit: i32,
        /// Wait (up to 30 s) until the session holds this many messages; fail if it does not.
        #[arg(long, default_value_t = 0, value_parser = parse::number_of::<usize>)]
        expect: usize,
        #[command(flatten)]
        reader: ReaderArgs,
    },
    /// Export a session (or a time range of it) as JSON Lines, oldest first.
    Export {
        /// Session id.
        #[arg(long, value_parser = parse::text)]
        session: String,
        /// Tenant id.
        #[arg(long, default_value = "demo", value_parser = parse::text)]
        tenant: String,
        /// Oldest message time, RFC 3339.
        #[arg(long, value_parser = rfc3339)]
        from: Option<DateTime<Utc>>,
        /// Newest message time, RFC 3339.
        #[arg(long, value_parser = rfc3339)]
        to: Option<DateTime<Utc>>,
        /// File to write; standard output by default.
        #[arg(long, value_parser = parse::text)]
        out: Option<String>,
        #[command(flatten)]
        reader: ReaderArgs,
    },
    /// Re-send dead-lettered records to the message topic after their cause is fixed.
    ReplayDlq {
        #[arg(long, default_value = "storage-messages-dlq", value_parser = parse::text)]
        from: String,
        #[arg(long, default_value = "storage-messages", value_parser = parse::text)]
        to: String,
        /// Consumer group that remembers what was replayed, so a second run sends nothing twice.
        #[arg(long, default_value = "flare-storage-dlq-replay", value_parser = parse::text)]
        group: String,
    },
    /// Give MongoDB documents stored by older writers their search fields; resumable.
    ReindexMongo {
        #[arg(long, default_value_t = 500, value_parser = parse::positive::<i64>)]
        batch: i64,
        #[arg(long, env = "MONGO_URL", hide_env_values = true, value_parser = parse::mongo_url)]
        mongo_url: String,
        #[arg(long, env = "MONGO_DATABASE", default_value = "flare_im", value_parser = parse::text)]
        mongo_database: String,
        #[arg(long, env = "MONGO_COLLECTION", default_value = "messages", value_parser = parse::text)]
        mongo_collection: String,
    },
    /// Print a shell completion script (e.g. `flare-storage completions bash > /etc/bash_completion.d/flare-storage`).
    Completions { shell: clap_complete::Shell },
}

fn rfc3339(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value.trim())
        .map(|time| time.with_timezone(&Utc))
        .map_err(|_| "must be an RFC 3339 time, e.g. 2026-01-31T08:00:00Z".into())
}

/// A sample conversation: (sender, receiver, text).
const CONVERSATION: [(&str, &str, &str); 8] = [
    ("alice", "bob", "Hi Bob, are we still on for the design review?"),
    ("bob", "alice", "Yes — 3pm in the big room."),
    ("alice", "bob", "你好，这是一条测试消息"),
    ("bob", "alice", "收到！周五见。"),
    ("alice", "bob", "I'll bring the latency numbers 📈"),
    ("bob", "alice", "好的，不见不散"),
    ("alice", "bob", "Danke! Bis später."),
    ("bob", "alice", "See you 👋"),
];

#[tokio::main]
async fn main() {
    let cli: Cli = settings::parse();
    if let Err(error) = run(cli).await {
        eprintln!("flare-storage: {error:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let kafka = cli.kafka_bootstrap_servers;
    match cli.command {
        Command::Migrate { postgres_url } => {
            let pool = sqlx::PgPool::connect(&postgres_url).await.context("cannot connect to POSTGRES_URL")?;
            flare_storage_common::schema::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::PartitionMessages { postgres_url, margin_days } => {
            let pool = sqlx::PgPool::connect(&postgres_url).await.context("cannot connect to POSTGRES_URL")?;
            partition::run(&pool, margin_days).await
        }
        Command::CreateTopics { partitions, topics } => create_topics(&kafka, &topics, partitions).await,
        Command::SendSample { session, tenant, topic } => send_sample(&kafka, &topic, &tenant, &session).await,
        Command::Produce { messages, rate, direct, groups, tenant, topic, seed } => {
            traffic::run(
                &kafka,
                traffic::Traffic {
                    topic,
                    tenant,
                    direct_sessions: direct,
                    group_sessions: groups,
                    messages,
                    rate,
                    seed,
                },
            )
            .await
        }
        Command::Query { session, tenant, limit, expect, reader } => {
            query(&reader, &tenant, &session, limit, expect).await
        }
        Command::Export { session, tenant, from, to, out, reader } => {
            export::run(&reader, export::Export { tenant, session, from, to, out }).await
        }
        Command::ReplayDlq { from, to, group } => replay::run(&kafka, &from, &to, &group).await,
        Command::ReindexMongo { batch, mongo_url, mongo_database, mongo_collection } => {
            let store = MongoStore::connect(&mongo_url, &mongo_database, &mongo_collection).await?;
            let updated = store.backfill_search(batch, |done| eprintln!("{done} documents reindexed")).await?;
            println!("search fields written on {updated} documents");
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "flare-storage", &mut std::io::stdout());
            Ok(())
        }
    }
}

async fn create_topics(kafka: &str, names: &[String], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", kafka).create()?;
    let topics: Vec<NewTopic<'_>> =
        names.iter().map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(topic) => println!("created topic {topic} ({partitions} partitions)"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => println!("topic {topic} already exists"),
            Err((topic, code)) => bail!("failed to create topic {topic}: {code}"),
        }
    }
    Ok(())
}

async fn send_sample(kafka: &str, topic: &str, tenant: &str, session: &str) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", kafka).set("acks", "all").create()?;
    let start = chrono::Utc::now() - chrono::Duration::seconds(CONVERSATION.len() as i64);
    for (index, (sender, receiver, text)) in CONVERSATION.iter().enumerate() {
        let request = StoreMessageRequest {
            session_id: session.into(),
            message: Some(Message {
                id: format!("{session}-{index}"),
                sender_id: (*sender).into(),
                receiver_id: (*receiver).into(),
                receiver_ids: vec![(*receiver).into()],
                session_type: "single".into(),
                message_type: MessageType::Text as i32,
                content: Some(MessageContent {
                    content: Some(message_content::Content::Text(TextContent {
                        text: (*text).into(),
                        mentions: vec![],
                    })),
                }),
                timestamp: Some(to_timestamp(start + chrono::Duration::seconds(index as i64))),
                ..Default::default()
            }),
            tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
            ..Default::default()
        };
        let payload = request.encode_to_vec();
        producer
            .send(FutureRecord::to(topic).key(session).payload(&payload), Duration::from_secs(10))
            .await
            .map_err(|(error, _)| anyhow::anyhow!("failed to produce to {topic}: {error}"))?;
        println!("sent    {sender:>6} → {receiver:<6} {text}");
    }
    Ok(())
}

async fn query(reader: &ReaderArgs, tenant: &str, session: &str, limit: i32, expect: usize) -> anyhow::Result<()> {
    let mut client = reader.connect().await?;
    let request = || QueryMessagesRequest {
        session_id: session.into(),
        limit,
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    };
    // With --expect, wait (up to 30 s) until the writer has stored that many messages.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let response = loop {
        let response = client.query_messages(request()).await?.into_inner();
        if response.messages.len() >= expect || tokio::time::Instant::now() >= deadline {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Oldest first reads like a chat transcript; the API returns newest first.
    for message in response.messages.iter().rev() {
        let text = match message.content.as_ref().and_then(|content| content.content.as_ref()) {
            Some(message_content::Content::Text(text)) => text.text.clone(),
            Some(other) => format!("<{other:?}>"),
            None => "<no content>".into(),
        };
        let time = message
            .timestamp
            .as_ref()
            .and_then(flare_storage_common::message::to_datetime)
            .map(|time| time.format("%H:%M:%S").to_string())
            .unwrap_or_default();
        println!("read    {time} {:>6}: {text}", message.sender_id);
    }
    println!(
        "{} message(s) in session {session} (tenant {tenant}), has_more={}",
        response.messages.len(),
        response.has_more
    );
    if response.messages.len() < expect {
        bail!("expected {expect} messages, found {}", response.messages.len());
    }
    Ok(())
}
