//! Retention against the real servers: messages older than STORAGE_RETENTION_DAYS leave
//! Postgres (batched deletes) and MongoDB (TTL index plus the job), newer ones stay; a message
//! already that old when it arrives is dead-lettered rather than stored and deleted at once.

use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{Message, StoreMessageRequest};
use flare_storage_e2e::*;
use futures::TryStreamExt as _;
use mongodb::bson::doc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_messages_are_removed_and_recent_ones_kept() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let mongo_database = unique("flare");
    let producer = producer()?;
    let now = chrono::Utc::now();
    let message = |id: &str, days_ago: i64| StoreMessageRequest {
        session_id: "s".into(),
        message: Some(Message {
            id: id.into(),
            sender_id: "a".into(),
            timestamp: Some(to_timestamp(now - chrono::Duration::days(days_ago))),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
        ..Default::default()
    };
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.mongo = Some(flare_storage_writer::config::MongoConfig {
        url: mongo_url(),
        database: mongo_database.clone(),
        collection: "messages".into(),
    });

    // Stored while retention was off (or shorter than their age, when they arrived).
    for (id, days_ago) in [("old-1", 40), ("old-2", 31), ("old-3", 400), ("new-1", 29), ("new-2", 0)] {
        produce_message(&producer, &topic, &message(id, days_ago)).await?;
    }
    let writer = RunningWriter::start(config.clone()).await?;
    writer.wait_processed(5).await?;
    writer.stop().await?;

    config.retention = Some(Duration::from_secs(30 * 86_400));
    config.retention_interval = Duration::from_secs(1);
    let writer = RunningWriter::start(config).await?;
    produce_message(&producer, &topic, &message("arrives-too-old", 31)).await?;

    let remaining = || async {
        let mut db = database.connect().await?;
        let mut ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM messages").fetch_all(&mut db).await?;
        ids.sort();
        anyhow::Ok(ids)
    };
    eventually(Duration::from_secs(60), "old messages removed from Postgres", || async {
        Ok((remaining().await? == ["new-1", "new-2"]).then_some(()))
    })
    .await?;
    let dead = read_topic(&dlq_topic, 2, 1, Duration::from_secs(30)).await?;
    let reason = dead.first().and_then(|letter| letter.header("flare-dlq-reason")).unwrap_or_default();
    assert!(reason.contains("past the retention of 2592000 s"), "{reason}");

    let client = mongodb::Client::with_uri_str(mongo_url()).await?;
    let collection = client.database(&mongo_database).collection::<mongodb::bson::Document>("messages");
    eventually(Duration::from_secs(30), "old messages removed from MongoDB", || async {
        let documents: Vec<mongodb::bson::Document> = collection.find(doc! {}).await?.try_collect().await?;
        let mut ids: Vec<String> =
            documents.iter().filter_map(|d| d.get_str("message_id").ok().map(str::to_owned)).collect();
        ids.sort();
        Ok((ids == ["new-1", "new-2"]).then_some(()))
    })
    .await?;
    let indexes: Vec<mongodb::IndexModel> = collection.list_indexes().await?.try_collect().await?;
    let ttl = indexes
        .iter()
        .filter_map(|index| index.options.as_ref())
        .find(|options| options.name.as_deref() == Some("retention_ttl"))
        .and_then(|options| options.expire_after);
    assert_eq!(ttl, Some(Duration::from_secs(30 * 86_400)));

    writer.stop().await?;
    client.database(&mongo_database).drop().await?;
    database.drop().await?;
    Ok(())
}
