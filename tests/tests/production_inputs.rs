//! Inputs seen in production that other message stores stumbled on, each kind with every
//! example of it we know: values no store can hold (U+0000 in names, timestamps outside the
//! stores' range or far ahead, records and documents over a hard size limit), values the
//! stores hold only with care (U+0000 in free text, the earliest storable time), a refusal
//! that validation did not foresee, a message id resent in another session, a sender's fast
//! clock and a default-initialised zero timestamp. None may stall the writer, lose or
//! duplicate a message, or show one that is not stored.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::keys::SessionKeys;
use flare_storage_common::message::{EARLIEST_STORABLE, to_timestamp};
use flare_storage_common::prost::Message as _;
use flare_storage_common::prost_types::Timestamp;
use flare_storage_common::proto::common::{FilterExpression, FilterOperator, TenantContext, TimeRange};
use flare_storage_common::proto::storage::*;
use flare_storage_e2e::*;
use redis::AsyncCommands as _;

const PARTITIONS: i32 = 4;

fn tenant_context(id: &str) -> Option<TenantContext> {
    Some(TenantContext { tenant_id: id.into(), ..Default::default() })
}

fn text(text: &str) -> Option<MessageContent> {
    Some(MessageContent {
        content: Some(message_content::Content::Text(TextContent { text: text.into(), mentions: vec![] })),
    })
}

/// A text message from alice to bob.
fn text_message(tenant: &str, session: &str, id: &str, body: &str, time: DateTime<Utc>) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: session.into(),
        message: Some(Message {
            id: id.into(),
            sender_id: "alice".into(),
            receiver_ids: vec!["bob".into()],
            message_type: MessageType::Text as i32,
            content: text(body),
            timestamp: Some(to_timestamp(time)),
            ..Default::default()
        }),
        tenant: tenant_context(tenant),
        ..Default::default()
    }
}

fn message_of(request: &mut StoreMessageRequest) -> &mut Message {
    request.message.get_or_insert_with(Default::default)
}

fn mongo_config(database: &str) -> flare_storage_writer::MongoConfig {
    flare_storage_writer::MongoConfig { url: mongo_url(), database: database.into(), collection: "messages".into() }
}

fn reader_mongo_config(database: &str) -> flare_storage_reader::MongoConfig {
    flare_storage_reader::MongoConfig { url: mongo_url(), database: database.into(), collection: "messages".into() }
}

/// Produces `sent` and stores it through a writer into PostgreSQL and MongoDB; returns the
/// writer once every record is processed.
async fn store_in_both(
    database: &TestDatabase,
    topic: &str,
    dlq_topic: &str,
    mongo_database: &str,
    sent: &[StoreMessageRequest],
) -> anyhow::Result<RunningWriter> {
    let producer = producer()?;
    for request in sent {
        produce_message(&producer, topic, request).await?;
    }
    let mut config = writer_config(&database.url, topic, dlq_topic);
    config.mongo = Some(mongo_config(mongo_database));
    let writer = RunningWriter::start(config).await?;
    writer.wait_processed(sent.len()).await?;
    Ok(writer)
}

async fn stored_ids(database: &TestDatabase, tenant: &str) -> anyhow::Result<HashSet<String>> {
    let mut db = database.connect().await?;
    let ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM messages WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_all(&mut db)
        .await?;
    Ok(ids.into_iter().collect())
}

async fn mongo_ids(database: &str, tenant: &str) -> anyhow::Result<HashSet<String>> {
    use futures::TryStreamExt as _;
    let client = mongodb::Client::with_uri_str(mongo_url()).await?;
    let collection = client.database(database).collection::<mongodb::bson::Document>("messages");
    let documents: Vec<mongodb::bson::Document> =
        collection.find(mongodb::bson::doc! { "tenant_id": tenant }).await?.try_collect().await?;
    Ok(documents.iter().filter_map(|document| document.get_str("message_id").ok().map(str::to_owned)).collect())
}

/// Every ACK event of a topic, by message id (the last one of each).
async fn acks_by_id(topic: &str, expected: usize) -> anyhow::Result<HashMap<String, serde_json::Value>> {
    let records = read_topic(topic, PARTITIONS, expected, Duration::from_secs(60)).await?;
    let mut acks = HashMap::new();
    for record in records {
        let json = record.json()?;
        acks.insert(json["message_id"].as_str().unwrap_or_default().to_owned(), json);
    }
    Ok(acks)
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    Ok(metric_value(&http_get(addr, "/metrics").await?.1, name).unwrap_or(0.0))
}

/// Failed attempts of every pipeline stage together: a refusal is not a failure.
async fn stage_errors(addr: std::net::SocketAddr) -> anyhow::Result<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    Ok(body
        .lines()
        .filter(|line| line.starts_with("storage_writer_stage_errors_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// A writer started and ready, with its readiness watched from then on.
async fn ready_writer(config: flare_storage_writer::Config) -> anyhow::Result<(RunningWriter, ReadinessWatch)> {
    let writer = RunningWriter::start(config).await?;
    let readiness = ReadinessWatch::start(writer.metrics_addr).await?;
    Ok((writer, readiness))
}

/// Asserts the writer stayed ready and no stage failed since `ready_writer`.
async fn assert_never_stalled(writer: &RunningWriter, readiness: ReadinessWatch) -> anyhow::Result<()> {
    let (answers, not_ready) = readiness.finish().await?;
    assert!(answers > 0 && not_ready == 0, "/readyz was not 200 {not_ready} times of {answers}");
    assert_eq!(stage_errors(writer.metrics_addr).await?, 0.0, "no stage failed");
    Ok(())
}

/// A record that no configured store can hold, the reason it must be dead-lettered with, and
/// the session of the good message sent right after it.
struct Unstorable {
    session: String,
    key: String,
    value: Vec<u8>,
    reason: String,
}

/// Kind 1, validation: every value no store can hold is dead-lettered up front, naming the
/// field and the limit, and never holds up a good message of its session or any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_no_store_can_hold_are_dead_lettered_and_hold_up_nothing() -> anyhow::Result<()> {
    const MAX_RECORD: usize = 12 * 1024 * 1024;
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic, ack_topic) = (unique("messages"), unique("dlq"), unique("acks"));
    create_topics(&[&topic, &dlq_topic, &ack_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let mongo_database = unique("flare");
    let now = Utc::now();
    let earliest = EARLIEST_STORABLE.timestamp();

    let mut cases: Vec<Unstorable> = Vec::new();
    let mut case = |name: &str, reason: &str, edit: &dyn Fn(&mut StoreMessageRequest)| {
        let mut request = text_message(&tenant, name, &format!("bad-{name}"), "never stored", now);
        edit(&mut request);
        cases.push(Unstorable {
            session: name.to_owned(),
            key: request.session_id.clone(),
            value: request.encode_to_vec(),
            reason: reason.to_owned(),
        });
    };
    case("nul-id", "field message.id contains control characters", &|r| message_of(r).id = "bad\0id".into());
    case("nul-session", "field session_id contains control characters", &|r| {
        r.session_id = "nul\0session".into();
        message_of(r).session_id = "nul\0session".into();
    });
    case("nul-tenant", "field tenant.tenant_id contains control characters", &|r| r.tenant = tenant_context("acme\0"));
    case("nul-sender", "field message.sender_id contains control characters", &|r| {
        message_of(r).sender_id = "ali\0ce".into()
    });
    case("nul-receiver", "field message.receiver_id contains control characters", &|r| {
        message_of(r).receiver_id = "\0".into()
    });
    case("nul-receivers", "field message.receiver_ids[2] contains control characters", &|r| {
        message_of(r).receiver_ids = vec!["bob".into(), "carol".into(), "d\0ve".into()]
    });
    case("nul-tag", "field message.tags[1] contains control characters", &|r| {
        message_of(r).tags = vec!["ok".into(), "spam\0".into()]
    });
    case("nul-extra-key", "field message.extra key \"k\\0\" contains control characters", &|r| {
        message_of(r).extra.insert("k\0".into(), "v".into());
    });
    case("nul-attribute-key", "field message.attributes key \"\\0\" contains control characters", &|r| {
        message_of(r).attributes.insert("\0".into(), "v".into());
    });
    case("nul-request-tag-key", "field tags key \"a\\0b\" contains control characters", &|r| {
        r.tags.insert("a\0b".into(), "v".into());
    });
    case("year-7537-bc", "field message.timestamp is before 4714-11-24T00:00:00Z BC", &|r| {
        message_of(r).timestamp = Some(Timestamp { seconds: -300_000_000_000, nanos: 0 })
    });
    case("just-before-postgres", "field message.timestamp is before 4714-11-24T00:00:00Z BC", &|r| {
        message_of(r).timestamp = Some(Timestamp { seconds: earliest - 1, nanos: 999_999_999 })
    });
    case("past-the-latest", "field message.timestamp is after +262142-12-31", &|r| {
        message_of(r).timestamp = Some(Timestamp { seconds: i64::MAX, nanos: 0 })
    });
    case("two-days-ahead", "ahead of the record's time; at most 86400 s are accepted", &|r| {
        message_of(r).timestamp = Some(to_timestamp(now + chrono::Duration::days(2)))
    });
    case("negative-nanos", "field message.timestamp is not a valid timestamp", &|r| {
        message_of(r).timestamp = Some(Timestamp { seconds: 1_700_000_000, nanos: -1 })
    });
    case("recalled-too-early", "field message.recalled_at is before 4714-11-24T00:00:00Z BC", &|r| {
        message_of(r).recalled_at = Some(Timestamp { seconds: earliest - 1, nanos: 0 })
    });
    // A 9 MiB extra value: a record within the writer's limit, a MongoDB document (the payload
    // and the extra field both hold it) over MongoDB's 16 MiB.
    case("mongo-document", "exceeds MongoDB's limit of 16777216 bytes", &|r| {
        message_of(r).extra.insert("blob".into(), "字".repeat(3 * 1024 * 1024));
    });
    let oversized = Unstorable {
        session: "oversized".into(),
        key: "oversized".into(),
        value: vec![7; MAX_RECORD + 1024 * 1024],
        reason: format!("exceeds the limit of {MAX_RECORD} bytes"),
    };
    cases.push(oversized);

    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.kafka_ack_topic = Some(ack_topic.clone());
    config.max_message_bytes = MAX_RECORD;
    config.mongo = Some(mongo_config(&mongo_database));
    let (writer, readiness) = ready_writer(config).await?;

    let producer = producer_for_large_records(16 * 1024 * 1024)?;
    let mut good = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        produce(&producer, &topic, &case.key, &case.value).await?;
        let id = format!("after-{}", case.session);
        let time = now - chrono::Duration::seconds(60) + chrono::Duration::milliseconds(index as i64);
        produce_message(&producer, &topic, &text_message(&tenant, &case.session, &id, "after the bad one", time))
            .await?;
        good.push(id);
        // Bystanders in sessions of their own, spread over the partitions.
        let bystander = format!("bystander-{index}");
        produce_message(
            &producer,
            &topic,
            &text_message(&tenant, &format!("room-{}", index % 8), &bystander, "你好", time),
        )
        .await?;
        good.push(bystander);
    }

    writer.wait_processed(good.len()).await?;

    let expected: HashSet<String> = good.iter().cloned().collect();
    assert_eq!(stored_ids(&database, &tenant).await?, expected, "every good message in PostgreSQL, no bad one");
    assert_eq!(mongo_ids(&mongo_database, &tenant).await?, expected, "and in MongoDB");
    let acks = acks_by_id(&ack_topic, good.len()).await?;
    for id in &good {
        assert_eq!(acks.get(id).and_then(|ack| ack["status"].as_str()), Some("persisted"), "ACK of {id}");
    }

    let dead = read_topic(&dlq_topic, PARTITIONS, cases.len(), Duration::from_secs(60)).await?;
    assert_eq!(dead.len(), cases.len(), "one dead letter per unstorable record");
    for case in &cases {
        let letter = dead
            .iter()
            .find(|letter| match letter.header("flare-dlq-value-omitted-bytes") {
                Some(size) => size == case.value.len().to_string(),
                None => letter.payload.as_deref() == Some(case.value.as_slice()),
            })
            .unwrap_or_else(|| panic!("no dead letter for {}", case.session));
        let reason = letter.header("flare-dlq-reason").unwrap_or_default();
        assert!(reason.contains(&case.reason), "{}: {reason:?} should name {:?}", case.session, case.reason);
    }
    let omitted = dead.iter().find(|letter| letter.header("flare-dlq-value-omitted-bytes").is_some());
    let omitted = omitted.expect("the record too large for the dead-letter topic is dead-lettered without its value");
    assert!(omitted.payload.is_none() && omitted.header("flare-dlq-source-offset").is_some());

    assert_never_stalled(&writer, readiness).await?;
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

/// Kind 1, storing: free text with U+0000 is kept intact in both databases (U+0000 left out of
/// the search copy only), through the writer and through the reader's commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_stores_can_hold_are_kept_intact() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let mongo_database = unique("flare");
    let now = Utc::now();
    let session = "intact";

    let mut sent: Vec<StoreMessageRequest> = Vec::new();
    sent.push(text_message(&tenant, session, "nul-text", "before\0after", now - chrono::Duration::seconds(3)));
    let mut json = text_message(&tenant, session, "nul-json", "", now - chrono::Duration::seconds(2));
    message_of(&mut json).content =
        Some(MessageContent { content: Some(message_content::Content::Json("{\"k\":\"v\0w\"}".into())) });
    sent.push(json);
    let mut fields = text_message(&tenant, session, "nul-fields", "fields", now - chrono::Duration::seconds(1));
    {
        let message = message_of(&mut fields);
        message.extra.insert("k".into(), "v\0".into());
        message.attributes.insert("a".into(), "\0x".into());
        // Looks like the escaped form PostgreSQL's JSON columns use: must come back as sent.
        message.attributes.insert("lookalike".into(), "\u{FFFE}b64:aGk=".into());
        message.business_type = "biz\0".into();
        message.status = "st\0".into();
        message.sender_type = "user\0".into();
        message.session_type = "group\0".into();
    }
    fields.tags.insert("t".into(), "x\0y".into());
    sent.push(fields);
    let long_ago = DateTime::from_timestamp(-2_208_988_800, 0).unwrap_or_default(); // 1900-01-01
    let mut old = text_message(&tenant, session, "1900", "long ago", long_ago);
    message_of(&mut old).recalled_at = Some(to_timestamp(long_ago));
    sent.push(old);

    let writer = store_in_both(&database, &topic, &dlq_topic, &mongo_database, &sent).await?;

    let reader_mongo = reader_mongo_config(&mongo_database);
    let postgres_reader = RunningReader::start(&database.url).await?;
    let mongo_only = reader_mongo.clone();
    let mongo_reader = RunningReader::start_configured(&database.url, None, move |config| {
        config.postgres_url = None;
        config.mongo = Some(mongo_only);
    })
    .await?;
    let both = reader_mongo.clone();
    let command_reader =
        RunningReader::start_configured(&database.url, Some(redis_url()), move |config| config.mongo = Some(both))
            .await?;

    let get = |id: &str| GetMessageRequest { message_id: id.into(), context: None, tenant: tenant_context(&tenant) };
    // Both databases keep the persisted time in microseconds: the same answer from either.
    for request in &sent {
        let id = &request.message.as_ref().expect("message").id;
        let mut times = Vec::new();
        for reader in [&postgres_reader, &mongo_reader] {
            let stored = reader.client().await?.get_message(get(id)).await?.into_inner().message.unwrap_or_default();
            times.push(stored.timeline.and_then(|timeline| timeline.persisted_time));
        }
        assert!(times[0].is_some() && times[0] == times[1], "{id}: {times:?}");
    }
    for reader in [&postgres_reader, &mongo_reader] {
        let mut client = reader.client().await?;
        for request in &sent {
            let original = request.message.as_ref().expect("message");
            let stored = client.get_message(get(&original.id)).await?.into_inner().message.unwrap_or_default();
            let mut attributes = original.attributes.clone();
            attributes.extend(request.tags.clone());
            assert_eq!(stored.content, original.content, "{}", original.id);
            assert_eq!(stored.extra, original.extra, "{}", original.id);
            assert_eq!(stored.attributes, attributes, "{}", original.id);
            assert_eq!(
                (&stored.business_type, &stored.status, &stored.sender_type, &stored.session_type),
                (&original.business_type, &original.status, &original.sender_type, &original.session_type),
                "{}",
                original.id
            );
            assert_eq!(stored.timestamp, original.timestamp, "{}", original.id);
            assert_eq!(stored.recalled_at, original.recalled_at, "{}", original.id);
        }
        // The search copy leaves U+0000 out; the text around it is found.
        let search = SearchMessagesRequest {
            tenant: tenant_context(&tenant),
            filters: vec![FilterExpression {
                field: "content".into(),
                op: FilterOperator::Contains as i32,
                values: vec!["before".into()],
            }],
            ..Default::default()
        };
        let found = client.search_messages(search).await?.into_inner().messages;
        assert_eq!(found.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["nul-text"]);
    }

    // The reader's commands store U+0000 in values as given, in both databases.
    let mut commands = command_reader.client().await?;
    commands
        .set_message_attributes(SetMessageAttributesRequest {
            tenant: tenant_context(&tenant),
            message_id: "nul-fields".into(),
            attributes: HashMap::from([("note".into(), "a\0b".into())]),
            context: Some(flare_storage_common::proto::common::RequestContext {
                actor: Some(flare_storage_common::proto::common::ActorContext {
                    actor_id: "alice".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    commands
        .recall_message(RecallMessageRequest {
            message_id: "nul-text".into(),
            operator_id: "alice".into(),
            reason: "typo\0".into(),
            tenant: tenant_context(&tenant),
            ..Default::default()
        })
        .await?;
    for reader in [&postgres_reader, &mongo_reader] {
        let mut client = reader.client().await?;
        let fields = client.get_message(get("nul-fields")).await?.into_inner().message.unwrap_or_default();
        assert_eq!(fields.attributes.get("note").map(String::as_str), Some("a\0b"));
        assert_eq!(fields.attributes.get("a").map(String::as_str), Some("\0x"));
        let recalled = client.get_message(get("nul-text")).await?.into_inner().message.unwrap_or_default();
        assert!(recalled.is_recalled && recalled.content.is_none());
        let recall = recalled.operations.iter().find(|operation| operation.operation_type == "recall");
        assert_eq!(recall.and_then(|operation| operation.metadata.get("reason")).map(String::as_str), Some("typo\0"));
    }

    for reader in [postgres_reader, mongo_reader, command_reader] {
        reader.stop().await?;
    }
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

/// Fields only the store writes — read receipts, operations, seq, the persisted time — and
/// the content of a message sent already recalled, set by a producer: every path of every
/// reader (the hot window, PostgreSQL, MongoDB) shows the message the same way, byte for byte,
/// and none shows the recalled content or receipts nobody gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_the_store_owns_read_alike_whoever_answers() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let (tenant, mongo_database, session) = (unique("acme"), unique("flare"), "owned");
    let now = Utc::now();
    let sent_at = |seconds: i64| now - chrono::Duration::seconds(seconds);
    let mut recalled = text_message(&tenant, session, "sent-recalled", "secret", sent_at(4));
    message_of(&mut recalled).is_recalled = true;
    message_of(&mut recalled).recalled_at = Some(Timestamp { seconds: sent_at(3).timestamp(), nanos: 123_456_789 });
    let mut receipts = text_message(&tenant, session, "sent-receipts", "read?", sent_at(2));
    message_of(&mut receipts).read_by =
        vec![MessageReadRecord { user_id: "bob".into(), read_at: Some(to_timestamp(sent_at(1))), burned_at: None }];
    message_of(&mut receipts).operations =
        vec![MessageOperation { operation_type: "recall".into(), operator_id: "mallory".into(), ..Default::default() }];
    let mut numbered = text_message(&tenant, session, "sent-seq", "numbered", sent_at(1));
    message_of(&mut numbered).seq = 42;
    message_of(&mut numbered).timeline =
        Some(MessageTimeline { persisted_time: Some(to_timestamp(sent_at(3600))), ..Default::default() });
    let sent = [recalled, receipts, numbered];

    let writer = store_in_both(&database, &topic, &dlq_topic, &mongo_database, &sent).await?;

    let mongo = reader_mongo_config(&mongo_database);
    let cached = RunningReader::start(&database.url).await?;
    let postgres_only = RunningReader::start_with(&database.url, None).await?;
    let mongo_only = RunningReader::start_configured(&database.url, None, move |config| {
        config.postgres_url = None;
        config.mongo = Some(mongo);
    })
    .await?;

    let mut answers: Vec<Vec<Message>> = Vec::new();
    for reader in [&cached, &postgres_only, &mongo_only] {
        let mut client = reader.client().await?;
        let page = client
            .query_messages(QueryMessagesRequest {
                session_id: session.into(),
                limit: 10,
                tenant: tenant_context(&tenant),
                ..Default::default()
            })
            .await?
            .into_inner()
            .messages;
        let mut by_seq = client
            .query_messages_by_seq(QueryMessagesBySeqRequest {
                session_id: session.into(),
                limit: 10,
                tenant: tenant_context(&tenant),
                ..Default::default()
            })
            .await?
            .into_inner()
            .messages;
        by_seq.reverse();
        assert_eq!(page, by_seq, "QueryMessages and QueryMessagesBySeq differ");
        let mut by_id = Vec::new();
        // Twice: the second read by id comes from the window where there is one.
        for _ in 0..2 {
            by_id.clear();
            for message in &page {
                let request = GetMessageRequest {
                    message_id: message.id.clone(),
                    context: None,
                    tenant: tenant_context(&tenant),
                };
                by_id.push(client.get_message(request).await?.into_inner().message.unwrap_or_default());
            }
        }
        assert_eq!(page, by_id, "QueryMessages and GetMessage differ");
        answers.push(page);
    }
    assert_eq!(answers[0], answers[1], "the hot window and PostgreSQL differ");
    assert_eq!(answers[1], answers[2], "PostgreSQL and MongoDB differ");
    let ids: Vec<&str> = answers[0].iter().map(|message| message.id.as_str()).collect();
    assert_eq!(ids, ["sent-seq", "sent-receipts", "sent-recalled"]);
    let [numbered, receipts, recalled] = &answers[0][..] else { unreachable!("three messages") };
    assert!(recalled.is_recalled && recalled.content.is_none(), "recalled content is never shown");
    assert_eq!(recalled.recalled_at.as_ref().map(|time| time.nanos), Some(123_456_000));
    assert!(receipts.read_by.is_empty() && receipts.operations.is_empty(), "{receipts:?}");
    assert_eq!(numbered.seq, 3);
    let persisted = numbered.timeline.as_ref().and_then(|timeline| timeline.persisted_time.as_ref());
    assert!(persisted.is_some_and(|time| time.seconds > sent_at(60).timestamp()), "{persisted:?}");

    for reader in [cached, postgres_only, mongo_only] {
        reader.stop().await?;
    }
    writer.stop().await?;
    mongodb::Client::with_uri_str(mongo_url()).await?.database(&mongo_database).drop().await?;
    database.drop().await
}

/// Kind 1, the safety net: a refusal validation did not foresee (here a PostgreSQL trigger
/// raising a data exception for some rows) costs only the refused records, dead-lettered with
/// the database's own message; the rest of their batch is stored, ACKed and committed, and
/// the writer never reports itself unready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_nothing_foresaw_costs_only_the_refused_records() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let pool = sqlx::PgPool::connect(&database.url).await?;
    flare_storage_common::schema::migrate(&pool).await?;
    sqlx::raw_sql(
        r#"CREATE FUNCTION refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
               IF NEW.business_type = 'refuse-me' THEN
                   RAISE EXCEPTION 'business_type refuse-me is not accepted here' USING ERRCODE = '22023';
               END IF;
               RETURN NEW;
           END $$;
           CREATE TRIGGER refuse_marked BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse_marked();"#,
    )
    .execute(&pool)
    .await?;
    pool.close().await;

    let (topic, dlq_topic, ack_topic) = (unique("messages"), unique("dlq"), unique("acks"));
    create_topics(&[&topic, &dlq_topic, &ack_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let now = Utc::now() - chrono::Duration::minutes(1);
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.kafka_ack_topic = Some(ack_topic.clone());
    let (writer, readiness) = ready_writer(config).await?;
    let producer = producer()?;
    let mut good = HashSet::new();
    let refused = ["refused-1", "refused-2"];
    // All on one partition: the refused ones arrive in batches with good ones.
    for index in 0..40 {
        let session = format!("s{}", index % 3);
        let (id, business_type) = match index {
            7 => (refused[0].to_owned(), "refuse-me"),
            30 => (refused[1].to_owned(), "refuse-me"),
            _ => (format!("m{index}"), "chat"),
        };
        let mut request = text_message(&tenant, &session, &id, "hello", now + chrono::Duration::milliseconds(index));
        message_of(&mut request).business_type = business_type.into();
        produce_to(&producer, &topic, 0, &session, &request.encode_to_vec()).await?;
        if business_type == "chat" {
            good.insert(id);
        }
    }
    // PostgreSQL's first instant is storable.
    let earliest = text_message(&tenant, "s0", "earliest", "the first instant", EARLIEST_STORABLE);
    produce_to(&producer, &topic, 0, "s0", &earliest.encode_to_vec()).await?;
    good.insert("earliest".to_owned());
    writer.wait_processed(good.len()).await?;

    assert_eq!(stored_ids(&database, &tenant).await?, good);
    let mut db = database.connect().await?;
    let first: DateTime<Utc> = sqlx::query_scalar(r#"SELECT "timestamp" FROM messages WHERE message_id = 'earliest'"#)
        .fetch_one(&mut db)
        .await?;
    assert_eq!(first, EARLIEST_STORABLE);
    let acks = acks_by_id(&ack_topic, good.len()).await?;
    assert_eq!(acks.keys().cloned().collect::<HashSet<_>>(), good, "ACKs for exactly the stored messages");
    let dead = read_topic(&dlq_topic, PARTITIONS, refused.len(), Duration::from_secs(30)).await?;
    assert_eq!(dead.len(), refused.len());
    for letter in &dead {
        let request = StoreMessageRequest::decode(letter.payload.as_deref().unwrap_or_default())?;
        assert!(refused.contains(&request.message.unwrap_or_default().id.as_str()));
        let reason = letter.header("flare-dlq-reason").unwrap_or_default();
        assert!(
            reason.contains("refused by PostgreSQL: business_type refuse-me is not accepted here (SQLSTATE 22023)"),
            "{reason}"
        );
    }
    // Seqs of each session count its stored messages; a refused one may leave a gap.
    let seqs: Vec<(String, i64)> =
        sqlx::query_as("SELECT session_id, seq FROM messages ORDER BY session_id, seq").fetch_all(&mut db).await?;
    let mut per_session: HashMap<String, Vec<i64>> = HashMap::new();
    for (session, seq) in seqs {
        per_session.entry(session).or_default().push(seq);
    }
    for (session, seqs) in &per_session {
        let unique: HashSet<&i64> = seqs.iter().collect();
        assert_eq!(unique.len(), seqs.len(), "{session}: seqs unique");
    }
    assert_never_stalled(&writer, readiness).await?;
    assert_eq!(metric(writer.metrics_addr, "storage_writer_dead_lettered_total{reason=\"refused\"}").await?, 2.0);
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

/// Kind 1, the safety net in MongoDB: a document the server refuses for good is dead-lettered
/// with the server's reason and taken out of PostgreSQL again, so no database shows it; the
/// rest of its batch is stored in both. The MongoDB-protocol server used in tests refuses
/// dates before year 1 (code 2, BadValue) where MongoDB itself stores them: that refusal
/// stands in for whatever validation did not foresee.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_mongodb_is_taken_back_from_postgresql() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic, ack_topic) = (unique("messages"), unique("dlq"), unique("acks"));
    create_topics(&[&topic, &dlq_topic, &ack_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let mongo_database = unique("flare");
    let now = Utc::now() - chrono::Duration::minutes(1);
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.kafka_ack_topic = Some(ack_topic.clone());
    config.mongo = Some(mongo_config(&mongo_database));
    let (writer, readiness) = ready_writer(config).await?;
    let producer = producer()?;
    let mut good = HashSet::new();
    for index in 0..12 {
        let (id, time) = match index {
            5 => ("first-instant".to_owned(), EARLIEST_STORABLE),
            _ => (format!("m{index}"), now + chrono::Duration::milliseconds(index)),
        };
        let request = text_message(&tenant, "s", &id, "hello", time);
        produce_to(&producer, &topic, 0, "s", &request.encode_to_vec()).await?;
        if index != 5 {
            good.insert(id);
        }
    }
    writer.wait_processed(good.len()).await?;

    let dead = read_topic(&dlq_topic, PARTITIONS, 1, Duration::from_secs(30)).await?;
    let reason = dead.first().and_then(|letter| letter.header("flare-dlq-reason")).unwrap_or_default();
    assert!(reason.starts_with("refused by MongoDB:") && reason.contains("(code 2)"), "{reason}");
    assert_eq!(stored_ids(&database, &tenant).await?, good, "taken back from PostgreSQL");
    assert_eq!(mongo_ids(&mongo_database, &tenant).await?, good);
    let acks = acks_by_id(&ack_topic, good.len()).await?;
    assert_eq!(acks.keys().cloned().collect::<HashSet<_>>(), good);
    assert_never_stalled(&writer, readiness).await?;
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

/// Kind 2: a message id is unique within a tenant. A record reusing a stored id in another
/// session is a duplicate of the stored message, whichever way it comes — in the same batch,
/// in a later one, after Redis lost its data — and touches
/// nothing of the session it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_id_reused_in_another_session_is_a_duplicate() -> anyhow::Result<()> {
    id_reuse(Store::Postgres).await
}

/// Kind 2 with MongoDB as the only database: it says which ids are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_id_reused_in_another_session_is_a_duplicate_in_mongodb() -> anyhow::Result<()> {
    id_reuse(Store::Mongo).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Mongo,
}

/// (message id, session, seq) of every stored message of a tenant, by session and seq.
async fn stored_rows(
    store: Store,
    database: &TestDatabase,
    mongo_database: &str,
    tenant: &str,
) -> anyhow::Result<Vec<(String, String, i64)>> {
    let mut rows: Vec<(String, String, i64)> = match store {
        Store::Postgres => {
            let mut db = database.connect().await?;
            sqlx::query_as("SELECT message_id, session_id, seq FROM messages WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_all(&mut db)
                .await?
        }
        Store::Mongo => {
            use futures::TryStreamExt as _;
            let client = mongodb::Client::with_uri_str(mongo_url()).await?;
            let collection = client.database(mongo_database).collection::<mongodb::bson::Document>("messages");
            let documents: Vec<mongodb::bson::Document> =
                collection.find(mongodb::bson::doc! { "tenant_id": tenant }).await?.try_collect().await?;
            documents
                .iter()
                .map(|d| {
                    let text = |field: &str| d.get_str(field).unwrap_or_default().to_owned();
                    (text("message_id"), text("session_id"), d.get_i64("seq").unwrap_or_default())
                })
                .collect()
        }
    };
    rows.sort_by(|a, b| (&a.1, a.2).cmp(&(&b.1, b.2)));
    Ok(rows)
}

async fn id_reuse(store: Store) -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mongo_database = unique("flare");
    let (topic, dlq_topic, ack_topic) = (unique("messages"), unique("dlq"), unique("acks"));
    create_topics(&[&topic, &dlq_topic, &ack_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let base = Utc::now() - chrono::Duration::minutes(10);
    let at = |second: i64| base + chrono::Duration::seconds(second);
    let producer = producer()?;
    let send = |session: &str, id: &str, body: &str, second: i64| {
        let request = text_message(&tenant, session, id, body, at(second));
        let producer = producer.clone();
        let topic = topic.clone();
        async move { produce_to(&producer, &topic, 0, &request.session_id, &request.encode_to_vec()).await }
    };

    // In one batch: x1 in s1, then x1 again in s3 and a message of s3.
    send("s1", "x1", "alpha", 1).await?;
    send("s3", "x1", "beta", 2).await?;
    send("s3", "s3-first", "hi", 3).await?;
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.kafka_ack_topic = Some(ack_topic.clone());
    if store == Store::Mongo {
        config.postgres_url = None;
        config.mongo = Some(mongo_config(&mongo_database));
    }
    let writer = RunningWriter::start(config).await?;
    writer.wait_processed(2).await?;

    // In a later batch.
    send("s2", "x1", "beta", 4).await?;
    send("s2", "s2-first", "hi", 5).await?;
    writer.wait_processed(3).await?;
    let mut redis = redis_connection().await?;
    for session in ["s2", "s3"] {
        let state: HashMap<String, String> = redis.hgetall(SessionKeys::new(&tenant, session).state()).await?;
        assert_eq!(state.get("last_message_id"), Some(&format!("{session}-first")), "{session}: {state:?}");
        assert_eq!(state.get("message_count").map(String::as_str), Some("1"), "{session}: {state:?}");
    }

    // In another session, then in its own (another record: a second sending, not a redelivery).
    send("s4", "x1", "beta", 6).await?;
    let duplicated = "storage_writer_messages_duplicated_total";
    eventually(Duration::from_secs(30), "three duplicates", || async {
        Ok((metric(writer.metrics_addr, duplicated).await? == 3.0).then_some(()))
    })
    .await?;
    send("s1", "x1", "alpha again", 7).await?;
    send("s1", "s1-second", "next", 8).await?;
    writer.wait_processed(4).await?;

    // After Redis lost every key of the tenant.
    let pattern = format!("fs:{{{}:{tenant}:*", tenant.len());
    let keys: Vec<String> = redis.keys(&pattern).await?;
    anyhow::ensure!(!keys.is_empty(), "the tenant's keys are in Redis");
    let _: () = redis.del(keys).await?;
    send("s5", "x1", "beta", 9).await?;
    send("s5", "s5-first", "hi", 10).await?;
    writer.wait_processed(5).await?;
    // And in its own session again: another record, a duplicate with nothing in Redis to say so.
    send("s1", "x1", "alpha once more", 11).await?;
    eventually(Duration::from_secs(30), "six duplicates", || async {
        Ok((metric(writer.metrics_addr, duplicated).await? == 6.0).then_some(()))
    })
    .await?;

    let rows = stored_rows(store, &database, &mongo_database, &tenant).await?;
    let rows: Vec<(&str, &str, i64)> =
        rows.iter().map(|(id, session, seq)| (id.as_str(), session.as_str(), *seq)).collect();
    assert_eq!(
        rows,
        [("x1", "s1", 1), ("s1-second", "s1", 2), ("s2-first", "s2", 1), ("s3-first", "s3", 1), ("s5-first", "s5", 1),],
        "x1 stored once; the sessions it was resent to keep contiguous seqs"
    );

    // ACKs: every resend in another session is a duplicate carrying the stored session and seq.
    let records = read_topic(&ack_topic, PARTITIONS, 11, Duration::from_secs(30)).await?;
    let x1: Vec<serde_json::Value> =
        records.iter().filter_map(|record| record.json().ok()).filter(|ack| ack["message_id"] == "x1").collect();
    assert_eq!(x1.len(), 7, "{x1:?}");
    for ack in &x1 {
        assert_eq!((ack["session_id"].as_str(), ack["seq"].as_i64()), (Some("s1"), Some(1)), "{ack}");
    }
    let statuses: Vec<(&str, bool)> = x1
        .iter()
        .map(|ack| (ack["status"].as_str().unwrap_or_default(), ack["deduplicated"].as_bool().unwrap_or_default()))
        .collect();
    let duplicate = ("duplicate", true);
    assert_eq!(
        statuses,
        [("persisted", false), duplicate, duplicate, duplicate, duplicate, duplicate, duplicate],
        "stored, then resent to s3, s2, s4, its own s1, s5 and s1 again"
    );

    // Nothing of the other sessions shows x1: not their pages (cached or not), not their state.
    let tenant_of = || tenant_context(&tenant);
    let reader_mongo = reader_mongo_config(&mongo_database);
    for redis_url in [Some(redis_url()), None] {
        let mongo = reader_mongo.clone();
        let reader = RunningReader::start_configured(&database.url, redis_url, move |config| {
            if store == Store::Mongo {
                config.postgres_url = None;
                config.mongo = Some(mongo);
            }
        })
        .await?;
        let mut client = reader.client().await?;
        for session in ["s2", "s3", "s5"] {
            let page = client
                .query_messages(QueryMessagesRequest {
                    session_id: session.into(),
                    tenant: tenant_of(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let listed: Vec<(&str, i64)> = page.messages.iter().map(|m| (m.id.as_str(), m.seq)).collect();
            assert_eq!(listed, [(format!("{session}-first").as_str(), 1)], "{session}");
        }
        let x1 = client
            .get_message(GetMessageRequest { message_id: "x1".into(), context: None, tenant: tenant_of() })
            .await?
            .into_inner()
            .message
            .unwrap_or_default();
        assert_eq!((x1.session_id.as_str(), x1.seq, x1.content), ("s1", 1, text("alpha")));
        reader.stop().await?;
    }
    let last: Option<String> = redis.hget(SessionKeys::new(&tenant, "s5").state(), "last_message_id").await?;
    assert_eq!(last.as_deref(), Some("s5-first"));
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

/// Kinds 3 and 4: a message dated ahead by its sender's fast clock (within the writer's
/// limit) is listed and found by reads without an end time, from the cache and from the
/// database; an explicit range is honoured as given; its recall window is not stretched. A
/// zero timestamp, what a default-initialised client sends, takes the record's time instead
/// of 1970, and a zero end time in a request counts as none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_clocks_and_zero_timestamps_leave_no_message_out_of_default_reads() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let tenant = unique("acme");
    let now = Utc::now();
    let producer = producer()?;
    let session = "clocks";
    let sent = [
        text_message(&tenant, session, "before", "one", now - chrono::Duration::seconds(2)),
        text_message(&tenant, session, "fast-clock", "two, from the future", now + chrono::Duration::seconds(180)),
        text_message(&tenant, session, "after", "three", now - chrono::Duration::seconds(1)),
    ];
    let mut zero = text_message(&tenant, session, "zero-time", "four, default-initialised", now);
    message_of(&mut zero).timestamp = Some(Timestamp { seconds: 0, nanos: 0 });
    for request in sent.iter().chain([&zero]) {
        produce_message(&producer, &topic, request).await?;
    }
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    writer.wait_processed(4).await?;

    let mut db = database.connect().await?;
    let zero_time: DateTime<Utc> =
        sqlx::query_scalar(r#"SELECT "timestamp" FROM messages WHERE message_id = 'zero-time'"#)
            .fetch_one(&mut db)
            .await?;
    assert!((zero_time - now).num_seconds().abs() < 60, "the record's time, not 1970: {zero_time}");

    for redis_url in [Some(redis_url()), None] {
        let reader = RunningReader::start_with(&database.url, redis_url).await?;
        let mut client = reader.client().await?;
        let query = |end_time: i64| QueryMessagesRequest {
            session_id: session.into(),
            end_time,
            tenant: tenant_context(&tenant),
            ..Default::default()
        };
        let ids = |messages: &[Message]| messages.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        let page = client.query_messages(query(0)).await?.into_inner();
        assert_eq!(ids(&page.messages), ["fast-clock", "zero-time", "after", "before"]);
        let bounded = client.query_messages(query(now.timestamp_millis())).await?.into_inner();
        assert_eq!(ids(&bounded.messages), ["after", "before"], "an explicit end is honoured");

        let search = |time_range: Option<TimeRange>| SearchMessagesRequest {
            tenant: tenant_context(&tenant),
            filters: vec![FilterExpression {
                field: "content".into(),
                op: FilterOperator::Contains as i32,
                values: vec!["future".into()],
            }],
            time_range,
            ..Default::default()
        };
        let found = client.search_messages(search(None)).await?.into_inner();
        assert_eq!(ids(&found.messages), ["fast-clock"]);
        let until_now = TimeRange { start_time: None, end_time: Some(to_timestamp(now)) };
        assert!(client.search_messages(search(Some(until_now))).await?.into_inner().messages.is_empty());
        let zero_end = TimeRange { start_time: None, end_time: Some(Timestamp::default()) };
        let found = client.search_messages(search(Some(zero_end))).await?.into_inner();
        assert_eq!(ids(&found.messages), ["fast-clock"], "a zero end time counts as none");
        reader.stop().await?;
    }

    // The recall window counts from when the message was stored when its clock ran ahead.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reader = RunningReader::start(&database.url).await?;
    let recall = RecallMessageRequest {
        message_id: "fast-clock".into(),
        operator_id: "alice".into(),
        recall_time_limit_seconds: 1,
        tenant: tenant_context(&tenant),
        ..Default::default()
    };
    let refused = reader.client().await?.recall_message(recall).await.expect_err("the window has passed");
    assert_eq!(refused.code(), flare_storage_common::tonic::Code::FailedPrecondition, "{refused:?}");
    reader.stop().await?;
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}
