//! The reader's read path against the real services: hot-window hits, cold-window fills
//! shared by concurrent readers, answers identical to the database's, QueryMessagesBySeq,
//! tenant isolation and a Redis outage.

use std::time::Duration;

use flare_storage_common::keys::SessionKeys;
use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::proto::storage::{
    Message, MessageContent, QueryMessagesBySeqRequest, QueryMessagesRequest, StoreMessageRequest, TextContent,
    message_content,
};
use flare_storage_common::tonic::Code;
use flare_storage_common::tonic::transport::Channel;
use flare_storage_e2e::*;
use redis::AsyncCommands as _;

const PARTITIONS: i32 = 4;

fn message(tenant: &str, session: &str, index: usize, base: chrono::DateTime<chrono::Utc>) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: session.into(),
        message: Some(Message {
            id: format!("{session}-{index:03}"),
            sender_id: if index.is_multiple_of(2) { "alice".into() } else { "bob".into() },
            receiver_ids: vec!["alice".into(), "bob".into()],
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent {
                    text: format!("message {index} 消息"),
                    mentions: vec![],
                })),
            }),
            // Pairs of messages share a timestamp, so paging must break ties by id.
            timestamp: Some(to_timestamp(base + chrono::Duration::milliseconds((index / 2) as i64))),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    }
}

fn query(tenant: &str, session: &str, limit: i32, cursor: &str) -> QueryMessagesRequest {
    QueryMessagesRequest {
        session_id: session.into(),
        limit,
        cursor: cursor.into(),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    }
}

/// Every id of a session, newest first, by following cursors `limit` at a time.
async fn page_through(
    client: &mut StorageReaderServiceClient<Channel>,
    tenant: &str,
    session: &str,
    limit: i32,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut cursor = String::new();
    for _ in 0..100 {
        let page = client.query_messages(query(tenant, session, limit, &cursor)).await?.into_inner();
        ids.extend(page.messages.iter().map(|message| message.id.clone()));
        if !page.has_more {
            return Ok(ids);
        }
        cursor = page.next_cursor;
    }
    anyhow::bail!("paging did not end")
}

async fn lookups(reader: &RunningReader, result: &str) -> anyhow::Result<f64> {
    let (_, body) = http_get(reader.metrics_addr, "/metrics").await?;
    Ok(metric_value(&body, &format!("storage_reader_cache_lookups_total{{result=\"{result}\"}}")).unwrap_or(0.0))
}

/// Stores `count` messages in each session through the real writer, with a hot window of
/// `window`; returns once all are stored.
async fn store_sessions(
    database: &TestDatabase,
    tenant: &str,
    sessions: &[&str],
    count: usize,
    window: usize,
) -> anyhow::Result<()> {
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let base = chrono::Utc::now() - chrono::Duration::minutes(30);
    let producer = producer()?;
    for index in 0..count {
        for session in sessions {
            produce_message(&producer, &topic, &message(tenant, session, index, base)).await?;
        }
    }
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.redis_hot_window = window;
    let writer = RunningWriter::start(config).await?;
    writer.wait_processed(count * sessions.len()).await?;
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_window_answers_like_the_database() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let tenant = unique("acme");
    store_sessions(&database, &tenant, &["hot"], 40, 15).await?;

    let cached = RunningReader::start(&database.url).await?;
    let uncached = RunningReader::start_with(&database.url, None).await?;
    let (mut cached_client, mut uncached_client) = (cached.client().await?, uncached.client().await?);

    // The newest page comes from the window.
    let first = cached_client.query_messages(query(&tenant, "hot", 10, "")).await?.into_inner();
    assert_eq!(first.messages.len(), 10);
    assert_eq!(first.messages[0].id, "hot-039");
    assert_eq!(first.messages[0].seq, 40);
    assert_eq!(lookups(&cached, "hit").await?, 1.0);

    // Paging through the whole session, across the window's floor into the database, gives
    // exactly what the database alone gives, for several page sizes.
    for limit in [3, 7, 20] {
        let through_cache = page_through(&mut cached_client, &tenant, "hot", limit).await?;
        let from_database = page_through(&mut uncached_client, &tenant, "hot", limit).await?;
        assert_eq!(through_cache.len(), 40, "limit {limit}");
        assert_eq!(through_cache, from_database, "limit {limit}");
    }
    assert!(lookups(&cached, "miss").await? >= 1.0, "older pages must come from the database");

    // By seq: inside the window from Redis, below it from the database; same answers.
    for (after, before, limit) in [(30, 0, 5), (30, 0, 20), (2, 6, 10), (0, 0, 3), (40, 0, 5)] {
        let request = |tenant: &str| QueryMessagesBySeqRequest {
            session_id: "hot".into(),
            after_seq: after,
            before_seq: before,
            limit,
            tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
            ..Default::default()
        };
        let a = cached_client.query_messages_by_seq(request(&tenant)).await?.into_inner();
        let b = uncached_client.query_messages_by_seq(request(&tenant)).await?.into_inner();
        let seqs: Vec<i64> = a.messages.iter().map(|message| message.seq).collect();
        assert_eq!(seqs, b.messages.iter().map(|message| message.seq).collect::<Vec<_>>());
        let end = if before == 0 { 41 } else { before };
        let expected: Vec<i64> = (after + 1..end).take(limit as usize).collect();
        assert_eq!(seqs, expected, "after {after} before {before} limit {limit}");
        assert_eq!(a.has_more, (after + 1 + i64::from(limit)) < end);
        assert_eq!(a.last_seq, expected.last().copied().unwrap_or(after));
    }

    // Another tenant sees nothing of this session, from the cache or the database.
    let other = cached_client.query_messages(query(&unique("globex"), "hot", 10, "")).await?.into_inner();
    assert!(other.messages.is_empty());
    let error = cached_client
        .query_messages_by_seq(QueryMessagesBySeqRequest {
            session_id: "hot".into(),
            after_seq: -1,
            ..Default::default()
        })
        .await
        .expect_err("negative after_seq");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("after_seq"));

    cached.stop().await?;
    uncached.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_window_is_filled_once_for_concurrent_readers() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let tenant = unique("acme");
    store_sessions(&database, &tenant, &["cold"], 12, 200).await?;
    // Redis lost the window (eviction, restart): completeness is unknown.
    let keys = SessionKeys::new(&tenant, "cold");
    let mut redis = redis_connection().await?;
    let _: () = redis.del(&[keys.hot_index(), keys.hot_time_index(), keys.hot_bodies(), keys.hot_meta()]).await?;

    let reader = RunningReader::start(&database.url).await?;
    let client = reader.client().await?;
    // Wait for the reader's cache connection (a hit or miss is counted once it is up).
    eventually(Duration::from_secs(10), "the reader's Redis connection", || {
        let mut client = client.clone();
        let reader = &reader;
        async move {
            client.query_messages(query("warm-up", "none", 1, "")).await?;
            Ok((lookups(reader, "hit").await? + lookups(reader, "miss").await? > 0.0).then_some(()))
        }
    })
    .await?;
    let (hits_before, misses_before) = (lookups(&reader, "hit").await?, lookups(&reader, "miss").await?);

    let readers = (0..20).map(|_| {
        let mut client = client.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move { client.query_messages(query(&tenant, "cold", 5, "")).await.map(|r| r.into_inner()) })
    });
    for reader in futures::future::join_all(readers).await {
        let page = reader??;
        let ids: Vec<&str> = page.messages.iter().map(|message| message.id.as_str()).collect();
        assert_eq!(ids, ["cold-011", "cold-010", "cold-009", "cold-008", "cold-007"]);
        assert!(page.has_more);
    }
    // One database fill, nineteen answers from the filled window.
    assert_eq!(lookups(&reader, "miss").await? - misses_before, 1.0);
    assert_eq!(lookups(&reader, "hit").await? - hits_before, 19.0);
    let floor: Option<i64> = redis.hget(keys.hot_meta(), "floor_us").await?;
    assert_eq!(floor, Some(flare_storage_common::keys::HOT_FLOOR_ALL), "12 < window: the whole session is cached");
    let cached: usize = redis.zcard(keys.hot_index()).await?;
    assert_eq!(cached, 12);

    reader.stop().await?;
    database.drop().await?;
    Ok(())
}

/// A Redis failover can drop the last writes the old master took before its replica received
/// them: here the window and state of a session lose its two newest messages. The next message
/// must not be appended to the window as if nothing were missing; every read path still shows
/// all six messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_lost_its_newest_writes_is_refilled() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let tenant = unique("acme");
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let base = chrono::Utc::now() - chrono::Duration::minutes(30);
    let producer = producer()?;
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    for index in 0..5 {
        produce_message(&producer, &topic, &message(&tenant, "lossy", index, base)).await?;
    }
    writer.wait_processed(5).await?;

    let keys = SessionKeys::new(&tenant, "lossy");
    let mut redis = redis_connection().await?;
    let lost = ["lossy-003", "lossy-004"];
    let _: () = redis.zrem(keys.hot_index(), &lost).await?;
    let _: () = redis.zrem(keys.hot_time_index(), &lost).await?;
    let _: () = redis.hdel(keys.hot_bodies(), &lost).await?;
    let _: () = redis.hset_multiple(keys.state(), &[("last_seq", "3"), ("last_message_id", "lossy-002")]).await?;
    let floor: Option<i64> = redis.hget(keys.hot_meta(), "floor_us").await?;
    assert_eq!(floor, Some(flare_storage_common::keys::HOT_FLOOR_ALL), "the window held the whole session");

    produce_message(&producer, &topic, &message(&tenant, "lossy", 5, base)).await?;
    writer.wait_processed(6).await?;
    writer.stop().await?;

    let reader = RunningReader::start(&database.url).await?;
    let mut client = reader.client().await?;
    let expected: Vec<String> = (0..6).rev().map(|index| format!("lossy-{index:03}")).collect();
    let page = client.query_messages(query(&tenant, "lossy", 20, "")).await?.into_inner();
    let ids: Vec<String> = page.messages.iter().map(|message| message.id.clone()).collect();
    assert_eq!(ids, expected, "QueryMessages");
    let by_seq = client
        .query_messages_by_seq(QueryMessagesBySeqRequest {
            tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
            session_id: "lossy".into(),
            after_seq: 0,
            limit: 20,
            ..Default::default()
        })
        .await?
        .into_inner();
    let seqs: Vec<i64> = by_seq.messages.iter().map(|message| message.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "QueryMessagesBySeq");

    reader.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_redis_outage() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let tenant = unique("acme");
    store_sessions(&database, &tenant, &["s"], 10, 200).await?;
    let proxy = Proxy::start(url_addr(&redis_url())?).await?;
    let reader = RunningReader::start_with(&database.url, Some(url_through(&redis_url(), proxy.addr)?)).await?;
    let mut client = reader.client().await?;
    eventually(Duration::from_secs(10), "a cache hit", || {
        let mut client = client.clone();
        let (reader, tenant) = (&reader, tenant.clone());
        async move {
            client.query_messages(query(&tenant, "s", 5, "")).await?;
            Ok((lookups(reader, "hit").await? > 0.0).then_some(()))
        }
    })
    .await?;

    proxy.cut();
    for _ in 0..5 {
        let page = client.query_messages(query(&tenant, "s", 5, "")).await?.into_inner();
        assert_eq!(page.messages.len(), 5);
        assert_eq!(page.messages[0].id, "s-009");
    }
    assert_eq!(http_get(reader.metrics_addr, "/readyz").await?.0, 200, "Postgres still answers");
    proxy.restore();
    let hits = lookups(&reader, "hit").await?;
    eventually(Duration::from_secs(15), "cache hits after Redis is back", || {
        let mut client = client.clone();
        let (reader, tenant) = (&reader, tenant.clone());
        async move {
            client.query_messages(query(&tenant, "s", 5, "")).await?;
            Ok((lookups(reader, "hit").await? > hits).then_some(()))
        }
    })
    .await?;
    reader.stop().await?;
    database.drop().await?;
    Ok(())
}
