//! `flare-storage` — operator commands around a running flare-storage (see [`USAGE`]).
//!
//! Kafka is found through `KAFKA_BOOTSTRAP_SERVERS` (default `127.0.0.1:9092`), PostgreSQL
//! through `POSTGRES_URL`, the reader through `--addr`.

mod export;
mod replay;
mod traffic;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use flare_storage_common::message::to_timestamp;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::proto::storage::{
    Message, MessageContent, MessageType, QueryMessagesRequest, StoreMessageRequest, TextContent, message_content,
};
use flare_storage_common::tonic::transport::Channel;
use flare_storage_writer::store::mongo::MongoStore;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub const USAGE: &str = "usage:
  flare-storage migrate                          apply database migrations (POSTGRES_URL)
  flare-storage create-topics [--partitions 8] TOPIC...
  flare-storage send-sample --session ID [--tenant ID] [--topic storage-messages]
                                                 one short sample conversation
  flare-storage produce [--messages 10000] [--rate 1000] [--direct 1000] [--groups 100] [--tenant demo] [--topic storage-messages] [--seed 1]
                                                 sample traffic: one-to-one and group sessions, Chinese and English
  flare-storage query --session ID [--tenant ID] [--addr http://127.0.0.1:50051] [--limit 20] [--expect N]
  flare-storage export --session ID [--tenant ID] [--addr URL] [--from RFC3339] [--to RFC3339] [--out FILE]
                                                 a session as JSON Lines (stdout by default)
  flare-storage replay-dlq [--from storage-messages-dlq] [--to storage-messages] [--group flare-storage-dlq-replay]
                                                 re-send dead-lettered records after a fix
  flare-storage reindex-mongo [--batch 500]      give MongoDB documents stored by older writers their search
                                                 fields (MONGO_URL, MONGO_DATABASE, MONGO_COLLECTION); resumable";

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(error) = run(args).await {
        eprintln!("flare-storage: {error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Vec<String>) -> anyhow::Result<()> {
    let Some((command, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    let (options, positional) = parse_options(rest)?;
    let option = |name: &str, default: &str| options.get(name).cloned().unwrap_or_else(|| default.to_owned());
    match command.as_str() {
        "migrate" => {
            let url = std::env::var("POSTGRES_URL").context("POSTGRES_URL is required")?;
            let pool = sqlx::PgPool::connect(&url).await.context("cannot connect to POSTGRES_URL")?;
            flare_storage_common::schema::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        "export" => {
            let session = options.get("session").context("--session is required")?;
            let time = |name: &str| -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
                options
                    .get(name)
                    .map(|value| {
                        chrono::DateTime::parse_from_rfc3339(value)
                            .map(|time| time.with_timezone(&chrono::Utc))
                            .with_context(|| format!("--{name} must be an RFC 3339 time"))
                    })
                    .transpose()
            };
            export::run(export::Export {
                addr: option("addr", "http://127.0.0.1:50051"),
                tenant: option("tenant", "demo"),
                session: session.clone(),
                from: time("from")?,
                to: time("to")?,
                out: options.get("out").cloned(),
            })
            .await
        }
        "produce" => {
            let number = |name: &str, default: &str| -> anyhow::Result<u64> {
                option(name, default).parse().with_context(|| format!("--{name} must be a number"))
            };
            traffic::run(traffic::Traffic {
                topic: option("topic", "storage-messages"),
                tenant: option("tenant", "demo"),
                direct_sessions: u32::try_from(number("direct", "1000")?)?,
                group_sessions: u32::try_from(number("groups", "100")?)?,
                messages: number("messages", "10000")?,
                rate: number("rate", "1000")?,
                seed: number("seed", "1")?,
            })
            .await
        }
        "replay-dlq" => {
            replay::run(
                &option("from", "storage-messages-dlq"),
                &option("to", "storage-messages"),
                &option("group", "flare-storage-dlq-replay"),
            )
            .await
        }
        "reindex-mongo" => {
            let batch: i64 = option("batch", "500").parse().context("--batch must be a number")?;
            let url = std::env::var("MONGO_URL").context("MONGO_URL is required")?;
            let setting = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
            let store = MongoStore::connect(
                &url,
                &setting("MONGO_DATABASE", "flare_im"),
                &setting("MONGO_COLLECTION", "messages"),
            )
            .await?;
            let updated = store.backfill_search(batch.max(1), |done| eprintln!("{done} documents reindexed")).await?;
            println!("search fields written on {updated} documents");
            Ok(())
        }
        "create-topics" => {
            let partitions: i32 = option("partitions", "8").parse().context("--partitions must be a number")?;
            create_topics(&positional, partitions).await
        }
        "send-sample" => {
            let session = options.get("session").context("--session is required")?;
            send_sample(&option("topic", "storage-messages"), &option("tenant", "demo"), session).await
        }
        "query" => {
            let session = options.get("session").context("--session is required")?;
            let limit: i32 = option("limit", "20").parse().context("--limit must be a number")?;
            let expect: usize = option("expect", "0").parse().context("--expect must be a number")?;
            query(&option("addr", "http://127.0.0.1:50051"), &option("tenant", "demo"), session, limit, expect).await
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// Splits `--name value` pairs from positional arguments.
fn parse_options(args: &[String]) -> anyhow::Result<(HashMap<String, String>, Vec<String>)> {
    let mut options = HashMap::new();
    let mut positional = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.strip_prefix("--") {
            Some(name) => {
                let value = iter.next().with_context(|| format!("--{name} needs a value"))?;
                options.insert(name.to_owned(), value.clone());
            }
            None => positional.push(arg.clone()),
        }
    }
    Ok((options, positional))
}

pub fn bootstrap_servers() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn create_topics(names: &[String], partitions: i32) -> anyhow::Result<()> {
    if names.is_empty() {
        bail!("name at least one topic");
    }
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap_servers()).create()?;
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

async fn send_sample(topic: &str, tenant: &str, session: &str) -> anyhow::Result<()> {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", bootstrap_servers()).set("acks", "all").create()?;
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

async fn query(addr: &str, tenant: &str, session: &str, limit: i32, expect: usize) -> anyhow::Result<()> {
    let channel = Channel::from_shared(addr.to_owned())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the reader at {addr}"))?;
    let mut client = StorageReaderServiceClient::new(channel);
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
