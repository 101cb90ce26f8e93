//! MongoDB in the read path, with Postgres beside it: reads ask MongoDB first, fall back to
//! Postgres while MongoDB is down (the reader stays ready), and commands, which must change
//! every database, wait for MongoDB to come back. Search over MongoDB finds Chinese substrings
//! and treats pattern characters as text.

use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::{FilterExpression, FilterOperator, TenantContext};
use flare_storage_common::proto::storage::*;
use flare_storage_common::tonic::Code;
use flare_storage_e2e::*;
use mongodb::bson::{Document, doc};

const TEXTS: [&str; 4] = ["这是一条测试消息", "Hello World", "100% sure.", "another 测试 line"];

fn tenant(id: &str) -> Option<TenantContext> {
    Some(TenantContext { tenant_id: id.into(), ..Default::default() })
}

fn contains(text: &str) -> FilterExpression {
    FilterExpression { field: "content".into(), op: FilterOperator::Contains as i32, values: vec![text.into()] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_mongo_first_and_to_postgres_while_mongo_is_down() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let directory = std::env::temp_dir().join(unique("mongo"));
    std::fs::create_dir_all(&directory)?;
    let mongo_url = format!("mongodb://127.0.0.1:{port}/?directConnection=true&serverSelectionTimeoutMS=2000");
    let mut server = own_mongo(port, &directory)?;
    eventually(Duration::from_secs(30), "the Mongo server", || async {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop))
    })
    .await?;

    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let mut writer_config = writer_config(&database.url, &topic, &dlq_topic);
    writer_config.mongo = Some(flare_storage_writer::MongoConfig {
        url: mongo_url.clone(),
        database: "chat".into(),
        collection: "messages".into(),
    });
    let writer = RunningWriter::start(writer_config).await?;
    let reader_mongo = flare_storage_reader::MongoConfig {
        url: mongo_url.clone(),
        database: "chat".into(),
        collection: "messages".into(),
    };
    let reader =
        RunningReader::start_configured(&database.url, None, |config| config.mongo = Some(reader_mongo)).await?;

    let tenant_id = unique("acme");
    let producer = producer()?;
    let base = chrono::Utc::now() - chrono::Duration::minutes(5);
    for (index, text) in TEXTS.iter().enumerate() {
        let request = StoreMessageRequest {
            session_id: "room".into(),
            message: Some(Message {
                id: format!("m{index}"),
                sender_id: "alice".into(),
                content: Some(MessageContent {
                    content: Some(message_content::Content::Text(TextContent {
                        text: (*text).into(),
                        mentions: vec![],
                    })),
                }),
                timestamp: Some(to_timestamp(base + chrono::Duration::seconds(index as i64))),
                ..Default::default()
            }),
            tenant: tenant(&tenant_id),
            ..Default::default()
        };
        produce_message(&producer, &topic, &request).await?;
    }
    writer.wait_processed(TEXTS.len()).await?;

    // Mark MongoDB's copies, so an answer shows which database it came from.
    let documents =
        mongodb::Client::with_uri_str(&mongo_url).await?.database("chat").collection::<Document>("messages");
    documents.update_many(doc! {}, doc! { "$set": { "attributes": { "answered_by": "mongo" } } }).await?;

    let mut client = reader.client().await?;
    let search = |text: &str| SearchMessagesRequest {
        tenant: tenant(&tenant_id),
        filters: vec![contains(text)],
        ..Default::default()
    };
    let query = || QueryMessagesRequest {
        session_id: "room".into(),
        limit: 10,
        tenant: tenant(&tenant_id),
        ..Default::default()
    };
    let get = || GetMessageRequest { message_id: "m0".into(), context: None, tenant: tenant(&tenant_id) };
    let found = |messages: &[Message]| messages.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    let from_mongo = |message: &Message| message.attributes.get("answered_by").is_some_and(|by| by == "mongo");

    let page = client.query_messages(query()).await?.into_inner();
    assert_eq!(found(&page.messages), ["m3", "m2", "m1", "m0"]);
    assert!(page.messages.iter().all(from_mongo), "MongoDB answers first");
    assert!(from_mongo(&client.get_message(get()).await?.into_inner().message.unwrap_or_default()));
    let chinese = client.search_messages(search("测试")).await?.into_inner();
    assert_eq!(found(&chinese.messages), ["m3", "m0"]);
    assert!(chinese.messages.iter().all(from_mongo));
    let substring = client.search_messages(search("试消")).await?.into_inner();
    assert_eq!(found(&substring.messages), ["m0"]);
    let word = client.search_messages(search("hello")).await?.into_inner();
    assert_eq!(found(&word.messages), ["m1"], "case-insensitive");
    let literal = client.search_messages(search("0% sure.")).await?.into_inner();
    assert_eq!(found(&literal.messages), ["m2"]);
    let pattern = client.search_messages(search(".*")).await?.into_inner();
    assert!(pattern.messages.is_empty(), "pattern characters are text");

    // MongoDB goes away: reads come from Postgres, the reader stays ready.
    server.kill()?;
    server.wait()?;
    let page = client.query_messages(query()).await?.into_inner();
    assert_eq!(found(&page.messages), ["m3", "m2", "m1", "m0"]);
    assert!(!page.messages.iter().any(from_mongo), "Postgres answers");
    assert_eq!(found(&client.search_messages(search("测试")).await?.into_inner().messages), ["m3", "m0"]);
    assert!(client.get_message(get()).await.is_ok());
    eventually(Duration::from_secs(20), "readiness checked with MongoDB down", || async {
        let (status, _) = http_get(reader.metrics_addr, "/readyz").await?;
        Ok((status == 200).then_some(()))
    })
    .await?;

    // A command must reach every database: it fails while MongoDB is down, then completes.
    let delete = || DeleteMessageRequest {
        session_id: "room".into(),
        message_ids: vec!["m1".into()],
        context: Some(flare_storage_common::proto::common::RequestContext {
            actor: Some(flare_storage_common::proto::common::ActorContext {
                actor_id: "alice".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        tenant: tenant(&tenant_id),
    };
    let refused = client.delete_message(delete()).await.expect_err("MongoDB is down");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let mut server = own_mongo(port, &directory)?;
    eventually(Duration::from_secs(30), "the delete once MongoDB is back", || async {
        Ok(client.clone().delete_message(delete()).await.ok().map(drop))
    })
    .await?;
    let page = client.query_messages(query()).await?.into_inner();
    assert_eq!(found(&page.messages), ["m3", "m2", "m0"]);
    let mut db = database.connect().await?;
    let deleted_in_postgres: bool =
        sqlx::query_scalar("SELECT deleted_at IS NOT NULL FROM messages WHERE message_id = 'm1'")
            .fetch_one(&mut db)
            .await?;
    assert!(deleted_in_postgres, "the delete reached Postgres too");

    writer.stop().await?;
    reader.stop().await?;
    server.kill()?;
    server.wait()?;
    std::fs::remove_dir_all(&directory)?;
    database.drop().await
}
