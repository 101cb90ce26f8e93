//! The writer's whole pipeline against the real services: seq, session state, read seqs, hot
//! cache, WAL removal, ACKs, dead letters, MongoDB, crashes and store outages.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use flare_storage_common::keys::SessionKeys;
use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    Message, MessageContent, MessageType, StoreMessageRequest, TextContent, message_content,
};
use flare_storage_common::redis_connection::RedisTarget;
use flare_storage_e2e::*;
use redis::AsyncCommands as _;

const PARTITIONS: i32 = 4;

fn base_time() -> chrono::DateTime<chrono::Utc> {
    static BASE: std::sync::OnceLock<chrono::DateTime<chrono::Utc>> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| chrono::Utc::now() - chrono::Duration::hours(1))
}

/// A text message; `order` spaces the timestamps so production order is time order.
fn chat(tenant: &str, session: &str, id: &str, sender: &str, receivers: &[&str], order: i64) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: session.into(),
        message: Some(Message {
            id: id.into(),
            sender_id: sender.into(),
            receiver_ids: receivers.iter().map(|r| (*r).to_owned()).collect(),
            message_type: MessageType::Text as i32,
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent {
                    text: format!("{sender} says {id} 你好"),
                    mentions: vec![],
                })),
            }),
            timestamp: Some(to_timestamp(base_time() + chrono::Duration::milliseconds(order))),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    }
}

async fn stored_seqs(database: &TestDatabase) -> anyhow::Result<HashMap<String, i64>> {
    let mut db = database.connect().await?;
    let rows: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT message_id, seq FROM messages").fetch_all(&mut db).await?;
    Ok(rows.into_iter().map(|(id, seq)| (id, seq.unwrap_or(0))).collect())
}

async fn row_count(database: &TestDatabase) -> anyhow::Result<i64> {
    let mut db = database.connect().await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?)
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    Ok(metric_value(&body, name).unwrap_or(0.0))
}

async fn wait_for_metric(addr: std::net::SocketAddr, name: &str, at_least: f64) -> anyhow::Result<()> {
    eventually(Duration::from_secs(60), name, || async { Ok((metric(addr, name).await? >= at_least).then_some(())) })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_read_seqs_cache_wal_and_acks() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic, ack_topic) = (unique("messages"), unique("dlq"), unique("acks"));
    create_topics(&[&topic, &dlq_topic, &ack_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let wal_key = unique("wal");
    let mut redis = redis_connection().await?;

    let group = ["a", "b", "c", "d"];
    let others = |sender: &str| group.iter().copied().filter(|m| *m != sender).collect::<Vec<_>>();
    // Interleaved sessions: a group and a direct chat, in one production order.
    let script: Vec<(&str, &str, &str, Vec<&str>)> = vec![
        ("g", "g-a1", "a", others("a")),
        ("g", "g-a2", "a", others("a")),
        ("dm", "dm-a1", "a", vec!["e"]),
        ("g", "g-a3", "a", others("a")),
        ("dm", "dm-a2", "a", vec!["e"]),
        ("g", "g-b1", "b", others("b")),
        ("dm", "dm-e1", "e", vec!["a"]),
        ("g", "g-b2", "b", others("b")),
        ("g", "g-c1", "c", others("c")),
    ];
    let producer = producer()?;
    for (order, (session, id, sender, receivers)) in script.iter().enumerate() {
        let _: () = redis.hset(&wal_key, *id, "pending").await?;
        produce_message(&producer, &topic, &chat(&tenant, session, id, sender, receivers, order as i64)).await?;
    }
    let _: () = redis.hset(&wal_key, "someone-elses-message", "pending").await?;

    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.kafka_ack_topic = Some(ack_topic.clone());
    config.wal_hash_key = Some(wal_key.clone());
    config.redis_hot_window = 3;
    let started = chrono::Utc::now().timestamp() as f64;
    let writer = RunningWriter::start(config).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_messages_processed_total", 9.0).await?;
    let last_batch = metric(writer.metrics_addr, "storage_writer_last_batch_timestamp_seconds").await?;
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((started - 1.0..=now + 1.0).contains(&last_batch), "last batch at {last_batch}, run {started}..{now}");

    // Seqs follow production order within each session.
    let seqs = stored_seqs(&database).await?;
    let expected: HashMap<String, i64> = [
        ("g-a1", 1),
        ("g-a2", 2),
        ("g-a3", 3),
        ("g-b1", 4),
        ("g-b2", 5),
        ("g-c1", 6),
        ("dm-a1", 1),
        ("dm-a2", 2),
        ("dm-e1", 3),
    ]
    .into_iter()
    .map(|(id, seq)| (id.to_owned(), seq))
    .collect();
    assert_eq!(seqs, expected);

    // Session state, once per session; read seqs of the senders only — nothing per member.
    let g = SessionKeys::new(&tenant, "g");
    let state: HashMap<String, String> = redis.hgetall(g.state()).await?;
    assert_eq!(state.get("last_seq").map(String::as_str), Some("6"));
    assert_eq!(state.get("message_count").map(String::as_str), Some("6"));
    assert_eq!(state.get("last_message_id").map(String::as_str), Some("g-c1"));
    assert_eq!(state.get("last_sender_id").map(String::as_str), Some("c"));
    assert_eq!(state.get("last_message_type").map(String::as_str), Some("1"));
    assert_eq!(state.get("last_content_type").map(String::as_str), Some("text"));
    assert!(state.get("last_message_ts").is_some_and(|ts| ts.parse::<i64>().is_ok_and(|ts| ts > 0)));
    let reads: HashMap<String, i64> = redis.hgetall(g.reads()).await?;
    assert_eq!(reads, HashMap::from([("a".into(), 3), ("b".into(), 5), ("c".into(), 6)]));
    let dm = SessionKeys::new(&tenant, "dm");
    let reads: HashMap<String, i64> = redis.hgetall(dm.reads()).await?;
    assert_eq!(reads, HashMap::from([("a".into(), 2), ("e".into(), 3)]));

    // Hot cache: the newest three by seq, bodies carrying their seq.
    let hot: Vec<(String, i64)> = redis.zrange_withscores(g.hot_index(), 0, -1).await?;
    assert_eq!(hot, [("g-b1".to_owned(), 4), ("g-b2".to_owned(), 5), ("g-c1".to_owned(), 6)]);
    let by_time: Vec<(String, i64)> = redis.zrange_withscores(g.hot_time_index(), 0, -1).await?;
    let expected_time = |order: i64| (base_time() + chrono::Duration::milliseconds(order)).timestamp_micros();
    assert_eq!(
        by_time,
        [
            ("g-b1".to_owned(), expected_time(5)),
            ("g-b2".to_owned(), expected_time(7)),
            ("g-c1".to_owned(), expected_time(8))
        ]
    );
    // The window started with the session (complete), then trimming raised its floor to the
    // newest evicted message (g-a3).
    let floor: Option<i64> = redis.hget(g.hot_meta(), "floor_us").await?;
    assert_eq!(floor, Some(expected_time(3)));
    let bodies: HashMap<String, Vec<u8>> = redis.hgetall(g.hot_bodies()).await?;
    assert_eq!(bodies.len(), 3);
    let cached = <Message as prost::Message>::decode(bodies["g-c1"].as_slice())?;
    assert_eq!((cached.seq, cached.sender_id.as_str()), (6, "c"));
    assert!(cached.timeline.and_then(|t| t.persisted_time).is_some());
    let ttl: i64 = redis.ttl(g.hot_index()).await?;
    assert!(ttl > 0 && ttl <= 600, "hot cache ttl {ttl}");

    // WAL entries of stored messages are gone; others stay.
    let wal: HashMap<String, String> = redis.hgetall(&wal_key).await?;
    assert_eq!(wal.keys().collect::<Vec<_>>(), ["someone-elses-message"]);

    // A true duplicate: ACKed as such with its first seq, and nothing counts twice.
    produce_message(&producer, &topic, &chat(&tenant, "g", "g-a2", "a", &others("a"), 1)).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_messages_duplicated_total", 1.0).await?;
    let acks = read_topic(&ack_topic, PARTITIONS, 10, Duration::from_secs(30)).await?;
    assert_eq!(acks.len(), 10);
    let mut persisted = 0;
    for ack in &acks {
        let json = ack.json()?;
        assert_eq!(ack.key.as_deref(), json["session_id"].as_str());
        assert_eq!(json["tenant_id"].as_str(), Some(tenant.as_str()));
        assert!(json["ingestion_ts"].as_i64().is_some_and(|ts| ts > 0));
        assert!(json["persisted_ts"].as_i64().is_some_and(|ts| ts > 0));
        let id = json["message_id"].as_str().unwrap_or_default();
        assert_eq!(json["seq"].as_i64(), expected.get(id).copied(), "{json}");
        match json["status"].as_str() {
            Some("persisted") => {
                persisted += 1;
                assert_eq!(json["deduplicated"], false);
            }
            Some("duplicate") => {
                assert_eq!(id, "g-a2");
                assert_eq!(json["deduplicated"], true);
            }
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(persisted, 9);
    let state_after: HashMap<String, String> = redis.hgetall(g.state()).await?;
    assert_eq!(state_after, state);
    let reads_after: HashMap<String, i64> = redis.hgetall(g.reads()).await?;
    assert_eq!(reads_after, HashMap::from([("a".into(), 3), ("b".into(), 5), ("c".into(), 6)]));
    assert_eq!(row_count(&database).await?, 9);

    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_records_are_dead_lettered_with_their_reason() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    // One partition: the valid record comes after every poison record in the same log.
    create_topics(&[&topic, &dlq_topic], 1).await?;
    let tenant = unique("acme");
    let producer = producer()?;

    let long_id = "x".repeat(65);
    let mut no_session = chat(&tenant, "s", "m-no-session", "a", &["b"], 0);
    no_session.session_id.clear();
    let mut big = chat(&tenant, "s", "m-big", "a", &["b"], 0);
    if let Some(message) = big.message.as_mut() {
        message.extra.insert("blob".into(), "z".repeat(70 * 1024));
    }
    producer
        .send(rdkafka::producer::FutureRecord::<str, [u8]>::to(&topic).key("s"), Duration::from_secs(10))
        .await
        .map_err(|(error, _)| error)?;
    produce_message(&producer, &topic, &big).await?;
    produce_message(&producer, &topic, &chat(&tenant, "s", &long_id, "a", &["b"], 0)).await?;
    produce_message(&producer, &topic, &no_session).await?;
    produce(&producer, &topic, "s", b"\x08\x96\x01garbage").await?;
    produce_message(&producer, &topic, &chat(&tenant, "s", "m-good", "a", &["b"], 1)).await?;

    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_messages_processed_total", 1.0).await?;
    assert_eq!(stored_seqs(&database).await?, HashMap::from([("m-good".to_owned(), 1)]));

    let dead = read_topic(&dlq_topic, 1, 5, Duration::from_secs(30)).await?;
    let reasons: Vec<&str> = dead.iter().filter_map(|record| record.header("flare-dlq-reason")).collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert_eq!(reasons[0], "record has no value");
    assert!(reasons[1].contains("exceeds the limit"), "{}", reasons[1]);
    assert!(reasons[2].contains("message.id is longer than 64 bytes"), "{}", reasons[2]);
    assert!(reasons[3].contains("missing field session_id"), "{}", reasons[3]);
    assert!(reasons[4].contains("not a StoreMessageRequest"), "{}", reasons[4]);
    for (offset, record) in dead.iter().enumerate() {
        assert_eq!(record.header("flare-dlq-source-topic"), Some(topic.as_str()));
        assert_eq!(record.header("flare-dlq-source-partition"), Some("0"));
        assert_eq!(record.header("flare-dlq-source-offset"), Some(offset.to_string().as_str()));
    }
    let (_, body) = http_get(writer.metrics_addr, "/metrics").await?;
    for (kind, count) in [("empty", 1), ("too_large", 1), ("invalid", 2), ("undecodable", 1)] {
        let name = format!("storage_writer_dead_lettered_total{{reason=\"{kind}\"}}");
        assert_eq!(metric_value(&body, &name), Some(f64::from(count)), "{name}");
    }
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

/// `REDIS_WAIT_REPLICAS=1`: on a Redis without replicas the cache stage fails and retries and
/// no message is done; on the cluster (a replica per master) batches are done once a replica
/// holds their cache-stage writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stage_waits_for_a_replica_when_asked() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let tenant = unique("acme");
    let producer = producer()?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut alone = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.redis = RedisTarget::new(&format!("redis://127.0.0.1:{port}"), false);
    config.redis_wait_replicas = 1;
    let writer = RunningWriter::start(config).await?;
    produce_message(&producer, &topic, &chat(&tenant, "alone", "m0", "a", &["b"], 0)).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_stage_errors_total{stage=\"cache\"}", 2.0).await?;
    assert_eq!(writer.processed().await?, 0.0, "done without a replica's acknowledgement");
    writer.stop().await?;
    alone.kill()?;
    alone.wait()?;

    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.redis = RedisTarget::new(&redis_cluster_url(), false);
    config.redis_wait_replicas = 1;
    let writer = RunningWriter::start(config).await?;
    for index in 1..=20 {
        let session = format!("s{}", index % 7);
        produce_message(&producer, &topic, &chat(&tenant, &session, &format!("m{index}"), "a", &["b"], index)).await?;
    }
    writer.wait_processed(20).await?;
    assert_eq!(metric(writer.metrics_addr, "storage_writer_stage_errors_total{stage=\"cache\"}").await?, 0.0);
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_redis_outages_lose_nothing() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let postgres_proxy = Proxy::start(url_addr(&database.url)?).await?;
    let redis_proxy = Proxy::start(url_addr(&redis_url())?).await?;
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.postgres_url = Some(url_through(&database.url, postgres_proxy.addr)?);
    config.redis = RedisTarget::new(&url_through(&redis_url(), redis_proxy.addr)?, false);
    let writer = RunningWriter::start(config).await?;
    let producer = producer()?;
    let send = |from: usize, to: usize| {
        let producer = producer.clone();
        let (tenant, topic) = (tenant.clone(), topic.clone());
        async move {
            for index in from..to {
                let request = chat(&tenant, "s", &format!("m{index:03}"), "a", &["b"], index as i64);
                produce_message(&producer, &topic, &request).await?;
            }
            anyhow::Ok(())
        }
    };
    let rows_reach = |count: i64| {
        let database = &database;
        eventually(Duration::from_secs(60), "stored rows", move || async move {
            Ok((row_count(database).await? == count).then_some(()))
        })
    };

    send(0, 10).await?;
    rows_reach(10).await?;

    // Postgres goes away: the writer notices, holds the batch, and resumes by itself.
    postgres_proxy.cut();
    send(10, 20).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_stage_errors_total{stage=\"postgres\"}", 1.0).await?;
    assert_eq!(http_get(writer.metrics_addr, "/readyz").await?.0, 503);
    postgres_proxy.restore();
    rows_reach(20).await?;

    // Redis goes away.
    redis_proxy.cut();
    send(20, 30).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_stage_errors_total{stage=\"seq\"}", 1.0).await?;
    redis_proxy.restore();
    rows_reach(30).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_messages_processed_total", 30.0).await?;
    assert_eq!(http_get(writer.metrics_addr, "/readyz").await?.0, 200);

    let seqs = stored_seqs(&database).await?;
    let expected: HashMap<String, i64> = (0..30).map(|index| (format!("m{index:03}"), index as i64 + 1)).collect();
    assert_eq!(seqs, expected);
    assert_eq!(metric(writer.metrics_addr, "storage_writer_messages_duplicated_total").await?, 0.0);
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

/// A store down for longer than librdkafka's poll interval: the writer keeps polling (the
/// blocked lane's partitions paused) and so keeps its partitions — no rebalance, no loop of
/// them — and stores everything once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_poll_interval_keeps_the_partitions() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let postgres_proxy = Proxy::start(url_addr(&database.url)?).await?;
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.postgres_url = Some(url_through(&database.url, postgres_proxy.addr)?);
    config.kafka_max_poll_interval = Duration::from_secs(7);
    config.batch_max_messages = 20;
    config.lanes = 1;
    let writer = RunningWriter::start(config).await?;
    let producer = producer()?;
    produce_message(&producer, &topic, &chat(&tenant, "s0", "first", "a", &["b"], 0)).await?;
    writer.wait_processed(1).await?;
    let rebalanced = |change: &'static str| {
        let addr = writer.metrics_addr;
        async move {
            let name = format!("storage_writer_partitions_rebalanced_total{{change=\"{change}\"}}");
            metric(addr, &name).await
        }
    };
    let assigned = rebalanced("assigned").await?;
    assert!(assigned > 0.0, "the writer holds partitions");

    postgres_proxy.cut();
    // More than the lane's queue and the batches in flight hold: the lane blocks.
    for index in 0..400 {
        let request = chat(&tenant, &format!("s{}", index % 8), &format!("m{index}"), "a", &["b"], index as i64 + 1);
        produce_message(&producer, &topic, &request).await?;
    }
    wait_for_metric(writer.metrics_addr, "storage_writer_stage_errors_total{stage=\"postgres\"}", 1.0).await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(rebalanced("revoked").await?, 0.0, "the writer kept its partitions through the outage");
    postgres_proxy.restore();
    writer.wait_processed(401).await?;
    assert_eq!(row_count(&database).await?, 401);
    assert_eq!((rebalanced("revoked").await?, rebalanced("assigned").await?), (0.0, assigned));
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_postgres_loses_nothing_and_keeps_seqs() -> anyhow::Result<()> {
    crash_and_restart("postgres").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_acks_reports_no_duplicates() -> anyhow::Result<()> {
    crash_and_restart("ack").await
}

/// Runs the writer binary with a crash injected right after `stage` of its first batch, then
/// again normally, and checks that every message is stored once with the seq it first got.
async fn crash_and_restart(stage: &str) -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic, ack_topic) = (unique("messages"), unique("dlq"), unique("acks"));
    create_topics(&[&topic, &dlq_topic, &ack_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let group = unique("group");
    let producer = producer()?;
    let sessions = ["s1", "s2", "s3"];
    for index in 0..24 {
        let session = sessions[index % 3];
        let request = chat(&tenant, session, &format!("{session}-m{:02}", index / 3), "a", &["b"], index as i64);
        produce_message(&producer, &topic, &request).await?;
    }

    let spawn_writer = |crash: Option<&str>| -> anyhow::Result<std::process::Child> {
        let mut command = writer_process(&topic, &dlq_topic, &group, &database.url, crash)?;
        command.env("KAFKA_ACK_TOPIC", &ack_topic).env("WRITER_BATCH_SIZE", "5");
        Ok(command.spawn()?)
    };

    let mut crashing = spawn_writer(Some(stage))?;
    let status = eventually(Duration::from_secs(60), "the injected crash", || {
        let status = crashing.try_wait();
        async move { Ok(status?) }
    })
    .await?;
    assert!(!status.success(), "the writer should have aborted, got {status}");
    let after_crash = stored_seqs(&database).await?;
    assert!(!after_crash.is_empty(), "the crash came after a store write");

    let mut writer = spawn_writer(None)?;
    eventually(Duration::from_secs(90), "all 24 rows", || async {
        Ok((row_count(&database).await? == 24).then_some(()))
    })
    .await?;
    let acks = eventually(Duration::from_secs(60), "24 distinct persisted acks", || async {
        let acks = read_topic(&ack_topic, PARTITIONS, usize::MAX, Duration::from_secs(2)).await?;
        let mut persisted = std::collections::HashSet::new();
        for ack in &acks {
            let json = ack.json()?;
            anyhow::ensure!(json["status"] == "persisted", "a redelivered message was reported as {json}");
            persisted.insert(json["message_id"].as_str().unwrap_or_default().to_owned());
        }
        Ok((persisted.len() == 24).then_some(acks))
    })
    .await?;
    assert!(acks.len() >= 24);

    let seqs = stored_seqs(&database).await?;
    for session in sessions {
        for index in 0..8 {
            let id = format!("{session}-m{index:02}");
            assert_eq!(seqs.get(&id), Some(&(index + 1)), "{id}");
        }
    }
    for (id, seq) in &after_crash {
        assert_eq!(seqs.get(id), Some(seq), "{id} changed its seq after the crash");
    }
    let mut redis = redis_connection().await?;
    for session in sessions {
        let state: HashMap<String, String> = redis.hgetall(SessionKeys::new(&tenant, session).state()).await?;
        assert_eq!(state.get("message_count").map(String::as_str), Some("8"), "{session}: {state:?}");
        assert_eq!(state.get("last_seq").map(String::as_str), Some("8"));
        let reads: HashMap<String, i64> = redis.hgetall(SessionKeys::new(&tenant, session).reads()).await?;
        assert_eq!(reads.get("a"), Some(&8), "{session}: the sender's read seq at its last message");
    }

    // SIGTERM: the writer drains and exits cleanly.
    std::process::Command::new("kill").arg("-TERM").arg(writer.id().to_string()).status()?;
    let status = eventually(Duration::from_secs(30), "graceful exit", || {
        let status = writer.try_wait();
        async move { Ok(status?) }
    })
    .await?;
    assert!(status.success(), "writer exited with {status}");
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_receives_every_message_once() -> anyhow::Result<()> {
    use futures::TryStreamExt as _;
    use mongodb::bson::doc;

    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let mongo_database = unique("flare");
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.mongo = Some(flare_storage_writer::config::MongoConfig {
        url: mongo_url(),
        database: mongo_database.clone(),
        collection: "messages".into(),
    });
    let producer = producer()?;
    for index in 0..6 {
        let session = if index % 2 == 0 { "s1" } else { "s2" };
        produce_message(&producer, &topic, &chat(&tenant, session, &format!("m{index}"), "a", &["b"], index)).await?;
    }
    // An upstream resend of m0.
    produce_message(&producer, &topic, &chat(&tenant, "s1", "m0", "a", &["b"], 0)).await?;
    let writer = RunningWriter::start(config).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_messages_processed_total", 6.0).await?;
    wait_for_metric(writer.metrics_addr, "storage_writer_messages_duplicated_total", 1.0).await?;

    let client = mongodb::Client::with_uri_str(mongo_url()).await?;
    let collection = client.database(&mongo_database).collection::<mongodb::bson::Document>("messages");
    let documents: Vec<mongodb::bson::Document> =
        collection.find(doc! { "tenant_id": &tenant }).await?.try_collect().await?;
    let mut seqs: Vec<(String, String, i64)> = documents
        .iter()
        .map(|d| {
            (
                d.get_str("session_id").unwrap_or_default().to_owned(),
                d.get_str("message_id").unwrap_or_default().to_owned(),
                d.get_i64("seq").unwrap_or_default(),
            )
        })
        .collect();
    seqs.sort();
    let expected: Vec<(String, String, i64)> =
        [("s1", "m0", 1), ("s1", "m2", 2), ("s1", "m4", 3), ("s2", "m1", 1), ("s2", "m3", 2), ("s2", "m5", 3)]
            .into_iter()
            .map(|(s, m, q)| (s.to_owned(), m.to_owned(), q))
            .collect();
    assert_eq!(seqs, expected);
    assert_eq!(stored_seqs(&database).await?.len(), 6);

    writer.stop().await?;
    client.database(&mongo_database).drop().await?;
    database.drop().await?;
    Ok(())
}

/// The database keeps the Kafka record that stored each message, so a record carrying a
/// stored message's id is told apart for as long as the message is kept: the very record read
/// again (a redelivery) is ACKed `persisted`; another record — even at the same partition and
/// offset of *another* topic — is a second sending, ACKed `duplicate`. Both with PostgreSQL and
/// with MongoDB alone, and with Redis emptied in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_told_from_a_second_sending_by_the_database() -> anyhow::Result<()> {
    for store in [Store::Postgres, Store::Mongo] {
        redelivery_and_second_sending(store).await.with_context(|| format!("{store:?}"))?;
    }
    Ok(())
}

async fn redelivery_and_second_sending(store: Store) -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mongo_database = unique("flare");
    let tenant = unique("acme");
    let (first, second, dlq_topic, ack_topic) = (unique("in-a"), unique("in-b"), unique("dlq"), unique("acks"));
    create_topics(&[&first, &second, &dlq_topic, &ack_topic], 1).await?;
    let producer = producer()?;
    let message = chat(&tenant, "s", "m1", "alice", &["bob"], 0);
    produce_message(&producer, &first, &message).await?;
    produce_message(&producer, &second, &message).await?;
    // One writer after another, each in a group of its own: the first stores the message, the
    // second reads that same record again, the third reads the other topic's offset 0. Redis
    // loses the tenant's keys before each of the last two: only the database can tell.
    let mut redis = redis_connection().await?;
    let pattern = format!("fs:{{{}:{tenant}:*", tenant.len());
    for (topic, acks) in [(&first, 1), (&first, 2), (&second, 3)] {
        let keys: Vec<String> = redis.keys(&pattern).await?;
        anyhow::ensure!(acks == 1 || !keys.is_empty(), "the session's keys are in Redis");
        if !keys.is_empty() {
            let _: () = redis.del(keys).await?;
        }
        let mut config = writer_config(&database.url, topic, &dlq_topic);
        config.kafka_ack_topic = Some(ack_topic.clone());
        store.configure_writer(&mut config, &mongo_database);
        let writer = RunningWriter::start(config).await?;
        eventually(Duration::from_secs(30), "the ACK", || async {
            let read = read_topic(&ack_topic, 1, usize::MAX, Duration::from_secs(1)).await?;
            Ok((read.len() >= acks).then_some(()))
        })
        .await?;
        writer.stop().await?;
    }
    let acks = read_topic(&ack_topic, 1, 3, Duration::from_secs(10)).await?;
    let statuses: Vec<(String, bool, i64)> = acks
        .iter()
        .map(|ack| {
            let json = ack.json()?;
            let status = json["status"].as_str().unwrap_or_default().to_owned();
            Ok((status, json["deduplicated"].as_bool().unwrap_or_default(), json["seq"].as_i64().unwrap_or_default()))
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(
        statuses,
        [("persisted".into(), false, 1), ("persisted".into(), true, 1), ("duplicate".into(), true, 1)],
        "stored, redelivered, sent again at the same position of another topic"
    );
    let stored = match store {
        Store::Postgres => row_count(&database).await?,
        Store::Mongo => {
            let client = mongodb::Client::with_uri_str(mongo_url()).await?;
            let collection = client.database(&mongo_database).collection::<mongodb::bson::Document>("messages");
            let count = collection.count_documents(mongodb::bson::doc! { "tenant_id": &tenant }).await?;
            client.database(&mongo_database).drop().await?;
            count as i64
        }
    };
    assert_eq!(stored, 1);
    database.drop().await
}

/// Idempotency lives in the databases (each message's id, with the record that stored it):
/// Redis keeps a fixed set of keys per session and sender, whatever the number of messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keeps_no_key_per_message() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let producer = producer()?;
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    let mut redis = redis_connection().await?;
    let pattern = format!("fs:{{{}:{tenant}:*", tenant.len());
    let mut sent = 0;
    let mut key_sets = Vec::new();
    for count in [6, 60] {
        for index in sent..sent + count {
            let session = ["s1", "s2"][index % 2];
            let request = chat(&tenant, session, &format!("m{index:03}"), "alice", &["bob"], index as i64);
            produce_message(&producer, &topic, &request).await?;
        }
        sent += count;
        writer.wait_processed(sent).await?;
        let mut keys: Vec<String> = redis.keys(&pattern).await?;
        keys.sort();
        key_sets.push(keys);
    }
    assert!(!key_sets[0].is_empty(), "the sessions' keys are in Redis");
    assert_eq!(key_sets[0], key_sets[1], "the keys after 6 messages and after 66");
    assert_eq!(row_count(&database).await?, 66);
    writer.stop().await?;
    database.drop().await
}

/// A reader's command that lands between the writer's database write and its cache stage (the
/// writer crashed in between) is not undone when the writer, restarted, puts the redelivered
/// messages in the hot window: the window's pages show the command's change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_before_the_cache_stage_survives_the_redelivery() -> anyhow::Result<()> {
    use flare_storage_common::proto::common::{ActorContext, RequestContext};
    use flare_storage_common::proto::storage::{QueryMessagesBySeqRequest, SetMessageAttributesRequest};

    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let (tenant, group) = (unique("acme"), unique("group"));
    let producer = producer()?;
    for index in 0..3 {
        produce_message(&producer, &topic, &chat(&tenant, "s1", &format!("m{index}"), "a", &["b"], index)).await?;
    }
    let spawn_writer = |crash: Option<&str>| -> anyhow::Result<std::process::Child> {
        Ok(writer_process(&topic, &dlq_topic, &group, &database.url, crash)?.spawn()?)
    };
    let mut crashing = spawn_writer(Some("postgres"))?;
    eventually(Duration::from_secs(60), "the injected crash", || {
        let status = crashing.try_wait();
        async move { Ok(status?) }
    })
    .await?;
    assert_eq!(row_count(&database).await?, 3, "stored, not yet cached");

    let reader = RunningReader::start(&database.url).await?;
    let mut client = reader.client().await?;
    client
        .set_message_attributes(SetMessageAttributesRequest {
            context: Some(RequestContext {
                actor: Some(ActorContext { actor_id: "a".into(), ..Default::default() }),
                ..Default::default()
            }),
            tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
            message_id: "m1".into(),
            attributes: HashMap::from([("pinned".to_owned(), "1".to_owned())]),
            tags: vec!["starred".into()],
        })
        .await?;

    let mut writer = spawn_writer(None)?;
    let keys = SessionKeys::new(&tenant, "s1");
    let redis = redis_connection().await?;
    eventually(Duration::from_secs(60), "the redelivered messages in the window", || {
        let (mut redis, index) = (redis.clone(), keys.hot_index());
        async move { Ok((redis.zcard::<_, i64>(index).await? == 3).then_some(())) }
    })
    .await?;
    let page = client
        .query_messages_by_seq(QueryMessagesBySeqRequest {
            session_id: "s1".into(),
            limit: 10,
            tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let m1 = page.messages.iter().find(|message| message.id == "m1").expect("m1 on the page");
    assert_eq!(m1.attributes.get("pinned").map(String::as_str), Some("1"), "{m1:?}");
    assert_eq!(m1.tags, ["starred"]);
    writer.kill()?;
    writer.wait()?;
    reader.stop().await?;
    database.drop().await
}

/// A message deleted for everyone and then sent again by its producer (another record with its
/// id, in its own session) after Redis forgot the session (the window's TTL passed): the second
/// sending is a duplicate that writes nothing, so no read path shows the deleted message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_message_sent_again_stays_gone() -> anyhow::Result<()> {
    use flare_storage_common::proto::common::{ActorContext, RequestContext};
    use flare_storage_common::proto::storage::{DeleteMessageRequest, QueryMessagesBySeqRequest, QueryMessagesRequest};

    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 1).await?;
    let tenant = unique("acme");
    let producer = producer()?;
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    for (order, id) in ["m1", "m2"].into_iter().enumerate() {
        produce_message(&producer, &topic, &chat(&tenant, "s1", id, "a", &["b"], order as i64)).await?;
    }
    writer.wait_processed(2).await?;

    let reader = RunningReader::start_with(&database.url, Some(redis_url())).await?;
    let mut client = reader.client().await?;
    let context = || {
        Some(RequestContext {
            actor: Some(ActorContext { actor_id: "a".into(), ..Default::default() }),
            ..Default::default()
        })
    };
    let tenant_context = || Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() });
    client
        .delete_message(DeleteMessageRequest {
            session_id: "s1".into(),
            message_ids: vec!["m1".into()],
            context: context(),
            tenant: tenant_context(),
        })
        .await?;
    let mut redis = redis_connection().await?;
    let keys: Vec<String> = redis.keys(format!("fs:{{{}:{tenant}:*", tenant.len())).await?;
    anyhow::ensure!(!keys.is_empty(), "the session's keys are in Redis");
    let _: () = redis.del(keys).await?;

    produce_message(&producer, &topic, &chat(&tenant, "s1", "m1", "a", &["b"], 5)).await?;
    eventually(Duration::from_secs(30), "the second sending handled", || async {
        let duplicated = metric(writer.metrics_addr, "storage_writer_messages_duplicated_total").await?;
        let redelivered = metric(writer.metrics_addr, "storage_writer_messages_redelivered_total").await?;
        Ok((duplicated + redelivered >= 1.0).then_some(()))
    })
    .await?;
    for _ in 0..2 {
        // The first page fills the window from the database, the second reads it.
        let page = client
            .query_messages(QueryMessagesRequest {
                session_id: "s1".into(),
                limit: 10,
                tenant: tenant_context(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let ids: Vec<&str> = page.messages.iter().map(|message| message.id.as_str()).collect();
        assert_eq!(ids, ["m2"], "the deleted message stays gone");
        let by_seq = client
            .query_messages_by_seq(QueryMessagesBySeqRequest {
                session_id: "s1".into(),
                limit: 10,
                tenant: tenant_context(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let ids: Vec<&str> = by_seq.messages.iter().map(|message| message.id.as_str()).collect();
        assert_eq!(ids, ["m2"], "by seq too");
    }
    assert_eq!(row_count(&database).await?, 2);
    let duplicated = metric(writer.metrics_addr, "storage_writer_messages_duplicated_total").await?;
    assert_eq!(duplicated, 1.0, "another record with a stored id is a duplicate");
    writer.stop().await?;
    reader.stop().await?;
    database.drop().await
}
