//! PostgreSQL's `messages` partitioned by month (migrations/20261201000001_partitioned_messages.sql)
//! against the real server: a message of any storable time gets a partition and is found by id
//! in its own partition; an id stays one message whatever time a resend carries; retention drops
//! whole expired months and trims the partly expired one; a plain table that already holds rows
//! is partitioned online by `flare-storage partition-messages`, resumably, while a writer
//! stores and nothing is lost or duplicated. The search side table, `message_search`, is
//! partitioned alike (migrations/20261201000003_partitioned_search.sql): each entry in its
//! message's month, dropped with it, moved with it.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use flare_storage_common::message::{EARLIEST_STORABLE, LATEST_STORABLE, to_timestamp};
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    GetMessageRequest, Message, MessageContent, StoreMessageRequest, TextContent, message_content,
};
use flare_storage_e2e::*;
use sqlx::{Connection as _, PgConnection};

fn request(tenant: &str, id: &str, time: DateTime<Utc>) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: "s".into(),
        message: Some(Message {
            id: id.into(),
            sender_id: "a".into(),
            timestamp: Some(to_timestamp(time)),
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent {
                    text: format!("message {id} 你好"),
                    mentions: vec![],
                })),
            }),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    }
}

fn utc(year: i32, month: u32, day: u32, hour: u32, minute: u32, second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(year, month, day, hour, minute, second).single().expect("a valid test time")
}

/// The partition holding each message id.
async fn partitions_of(db: &mut PgConnection) -> anyhow::Result<BTreeMap<String, String>> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT message_id, tableoid::regclass::text FROM messages").fetch_all(db).await?;
    Ok(rows.into_iter().collect())
}

/// The partition holding each message id's search entry.
async fn search_partitions_of(db: &mut PgConnection) -> anyhow::Result<BTreeMap<String, String>> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT message_id, tableoid::regclass::text FROM message_search").fetch_all(db).await?;
    Ok(rows.into_iter().collect())
}

/// The partitions of `messages`, by name.
async fn partition_names(db: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    partitions_named(db, "messages").await
}

/// The partitions of `table`, by name.
async fn partitions_named(db: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = $1::regclass ORDER BY 1")
        .bind(table)
        .fetch_all(db)
        .await?)
}

async fn relkind(db: &mut PgConnection) -> anyhow::Result<String> {
    relkind_of(db, "messages").await
}

async fn relkind_of(db: &mut PgConnection, table: &str) -> anyhow::Result<String> {
    let kind: i8 =
        sqlx::query_scalar("SELECT relkind FROM pg_class WHERE oid = $1::regclass").bind(table).fetch_one(db).await?;
    Ok(char::from(u8::try_from(kind)?).to_string())
}

/// Waits until `message_search` holds `count` entries.
async fn wait_for_entries(database: &TestDatabase, count: i64) -> anyhow::Result<()> {
    eventually(Duration::from_secs(60), "every message indexed", || async {
        let mut db = database.connect().await?;
        let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM message_search").fetch_one(&mut db).await?;
        Ok((entries == count).then_some(()))
    })
    .await
}

async fn get_message(reader: &RunningReader, tenant: &str, id: &str) -> anyhow::Result<Option<Message>> {
    let mut client = reader.client().await?;
    let request = GetMessageRequest {
        message_id: id.into(),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    };
    match client.get_message(request).await {
        Ok(response) => Ok(response.into_inner().message),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(status.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_every_storable_time_get_a_partition_and_are_found_by_id() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    // Up to the latest storable instant (262142 AD).
    config.max_future = Duration::from_secs(8_300_000_000_000);

    // Edges of the storable range, of eras, of the epoch and of months.
    let micro = chrono::Duration::microseconds(1);
    let times = [
        ("earliest", EARLIEST_STORABLE, "messages_4714_11_bc"),
        ("bc-december", EARLIEST_STORABLE + chrono::Duration::days(10), "messages_4714_12_bc"),
        ("last-of-1-bc", utc(1, 1, 1, 0, 0, 0) - micro, "messages_0001_12_bc"),
        ("first-of-1-ad", utc(1, 1, 1, 0, 0, 0), "messages_0001_01"),
        ("before-epoch", utc(1970, 1, 1, 0, 0, 0) - micro, "messages_1969_12"),
        ("after-epoch", utc(1970, 1, 1, 0, 0, 0) + micro, "messages_1970_01"),
        ("end-of-february", utc(2028, 3, 1, 0, 0, 0) - micro, "messages_2028_02"),
        ("start-of-march", utc(2028, 3, 1, 0, 0, 0), "messages_2028_03"),
        ("year-9999", utc(9999, 12, 31, 23, 59, 59), "messages_9999_12"),
        ("year-10000", utc(10000, 1, 1, 0, 0, 0), "messages_10000_01"),
        ("latest", LATEST_STORABLE - chrono::Duration::nanoseconds(999), "messages_262142_12"),
    ];
    let producer = producer()?;
    for (id, time, _) in &times {
        produce_message(&producer, &topic, &request(&tenant, id, *time)).await?;
    }
    // A resend of an id with another time is the same message.
    produce_message(&producer, &topic, &request(&tenant, "start-of-march", utc(2030, 6, 1, 0, 0, 0))).await?;
    let writer = RunningWriter::start(config.clone()).await?;
    writer.wait_processed(times.len()).await?;
    eventually(Duration::from_secs(30), "the resend taken for a duplicate", || async {
        let (_, body) = http_get(writer.metrics_addr, "/metrics").await?;
        Ok((metric_value(&body, "storage_writer_messages_duplicated_total") == Some(1.0)).then_some(()))
    })
    .await?;

    let mut db = database.connect().await?;
    assert_eq!(relkind(&mut db).await?, "p", "a new database gets the partitioned layout");
    let partitions = partitions_of(&mut db).await?;
    let expected: BTreeMap<String, String> =
        times.iter().map(|(id, _, partition)| (id.to_string(), partition.to_string())).collect();
    assert_eq!(partitions, expected, "each message in its month's partition");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?;
    assert_eq!(rows, times.len() as i64, "each once, the resend with another time included");
    let ids: i64 = sqlx::query_scalar("SELECT count(*) FROM message_ids").fetch_one(&mut db).await?;
    assert_eq!(ids, times.len() as i64);
    // Each search entry in its message's month, in the search table's partition of it.
    assert_eq!(relkind_of(&mut db, "message_search").await?, "p");
    wait_for_entries(&database, times.len() as i64).await?;
    let entries = search_partitions_of(&mut db).await?;
    let expected: BTreeMap<String, String> =
        expected.into_iter().map(|(id, partition)| (id, partition.replacen("messages", "message_search", 1))).collect();
    assert_eq!(entries, expected, "each entry in its month's partition");
    // The writer made the months ahead at start.
    let names = partition_names(&mut db).await?;
    let this_month = format!("messages_{}", Utc::now().format("%Y_%m"));
    assert!(names.contains(&this_month), "{names:?}");
    assert!(names.len() >= times.len() + 3, "{names:?}");
    writer.stop().await?;

    // The search indexer meets a month without its partition (as in a table partitioned after
    // its messages were stored): it makes the partition and indexes the message.
    sqlx::query("DROP TABLE message_search_2028_03").execute(&mut db).await?;
    sqlx::query(
        r#"INSERT INTO search_index_queue (tenant_id, message_id, "timestamp")
           SELECT tenant_id, message_id, "timestamp" FROM messages WHERE message_id = 'start-of-march'"#,
    )
    .execute(&mut db)
    .await?;
    let writer = RunningWriter::start(config).await?;
    wait_for_entries(&database, times.len() as i64).await?;
    writer.stop().await?;
    let entries = search_partitions_of(&mut db).await?;
    assert_eq!(entries.get("start-of-march").map(String::as_str), Some("message_search_2028_03"));

    // Without Redis, GetMessage is one PostgreSQL lookup.
    let reader = RunningReader::start_with(&database.url, None).await?;
    for (id, time, _) in &times {
        let message = get_message(&reader, &tenant, id).await?.unwrap_or_else(|| panic!("{id} is found by id"));
        let stored = message.timestamp.as_ref().map(|t| (t.seconds, t.nanos / 1000));
        let sent = to_timestamp(*time);
        assert_eq!(stored, Some((sent.seconds, sent.nanos / 1000)), "{id}");
    }
    assert!(get_message(&reader, &unique("other"), "latest").await?.is_none(), "tenants stay apart");

    // GetMessage reads the one partition holding the message, whatever the number of months:
    // over 200 calls the scans counted on that partition grow by 200 or more and the others'
    // hardly move (the reader's burn wipe scans each partition every 10 s). A backend reports
    // its counts within PostgreSQL's idle interval (10 s).
    const CALLS: i64 = 200;
    let scans = || async {
        let mut db = database.connect().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT relname::text, seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname LIKE 'messages_%'",
        )
        .fetch_all(&mut db)
        .await?;
        anyhow::Ok(rows.into_iter().collect::<BTreeMap<_, _>>())
    };
    let before = scans().await?;
    for _ in 0..CALLS {
        assert!(get_message(&reader, &tenant, "start-of-march").await?.is_some());
    }
    let target = "messages_2028_03";
    let after = eventually(Duration::from_secs(20), "GetMessage's scans counted", || async {
        let now = scans().await?;
        Ok((now[target] - before[target] >= CALLS).then_some(now))
    })
    .await?;
    let others: BTreeMap<&String, i64> = after
        .iter()
        .filter(|(name, _)| name.as_str() != target)
        .map(|(name, count)| (name, count - before.get(name).copied().unwrap_or(0)))
        .collect();
    assert!(others.len() >= times.len(), "{others:?}");
    assert!(others.values().all(|delta| *delta < CALLS / 10), "only the message's partition is read: {others:?}");

    reader.stop().await?;
    database.drop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_counter_gone_back_collides_and_is_reseeded_across_months() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let producer = producer()?;
    // Five messages in five months: seqs 1..=5, each in another partition.
    let now = Utc::now();
    for index in 0..5_i64 {
        let time = now - chrono::Duration::days(31 * (5 - index));
        produce_message(&producer, &topic, &request(&tenant, &format!("first-{index}"), time)).await?;
    }
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    writer.wait_processed(5).await?;

    // Redis as an old snapshot had it: the counter at 2, the assignments forgotten.
    let keys = flare_storage_common::keys::SessionKeys::new(&tenant, "s");
    let mut redis = redis_connection().await?;
    redis::pipe()
        .cmd("SET")
        .arg(keys.seq_counter())
        .arg(2)
        .cmd("DEL")
        .arg(keys.seq_assigned())
        .query_async::<()>(&mut redis)
        .await?;
    // Seqs 3, 4 and 5 would be handed out again, this time in this month's partition.
    for index in 0..3 {
        produce_message(&producer, &topic, &request(&tenant, &format!("then-{index}"), now)).await?;
    }
    writer.wait_processed(8).await?;
    writer.stop().await?;

    let mut db = database.connect().await?;
    let seqs: Vec<(String, i64)> =
        sqlx::query_as("SELECT message_id, seq FROM messages ORDER BY seq").fetch_all(&mut db).await?;
    let expected: Vec<(String, i64)> = (0..5)
        .map(|index| format!("first-{index}"))
        .chain((0..3).map(|index| format!("then-{index}")))
        .zip(1..)
        .collect();
    assert_eq!(seqs, expected, "the collision is refused and the counter raised past the stored seqs");
    database.drop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_expired_months_and_trims_the_partly_expired_one() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let now = Utc::now();
    let ages = [("d400", 400), ("d100", 100), ("d40", 40), ("d31", 31), ("d29", 29), ("d0", 0)];
    let producer = producer()?;
    for (id, days) in ages {
        produce_message(&producer, &topic, &request(&tenant, id, now - chrono::Duration::days(days))).await?;
    }
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    let writer = RunningWriter::start(config.clone()).await?;
    writer.wait_processed(ages.len()).await?;
    wait_for_entries(&database, ages.len() as i64).await?;
    writer.stop().await?;
    let mut db = database.connect().await?;
    let month = |days: i64| format!("messages_{}", (now - chrono::Duration::days(days)).format("%Y_%m"));
    let names = partition_names(&mut db).await?;
    for days in [400, 100, 40] {
        assert!(names.contains(&month(days)), "{} in {names:?}", month(days));
    }

    config.retention = Some(Duration::from_secs(30 * 86_400));
    config.retention_interval = Duration::from_secs(1);
    let writer = RunningWriter::start(config).await?;
    eventually(Duration::from_secs(60), "expired messages and their ids removed", || async {
        let mut db = database.connect().await?;
        let mut messages: Vec<String> =
            sqlx::query_scalar("SELECT message_id FROM messages").fetch_all(&mut db).await?;
        messages.sort();
        let mut ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM message_ids").fetch_all(&mut db).await?;
        ids.sort();
        let mut entries: Vec<String> =
            sqlx::query_scalar("SELECT message_id FROM message_search").fetch_all(&mut db).await?;
        entries.sort();
        Ok((messages == ["d0", "d29"] && ids == messages && entries == messages).then_some(()))
    })
    .await?;
    writer.stop().await?;

    // Whole months before the cutoff are gone as partitions; the month the cutoff falls in
    // stays, trimmed by rows; the coming months are there ahead of their messages.
    let cutoff = now - chrono::Duration::days(30);
    let bounds: Vec<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT partition::text, upper_bound FROM flare_message_partitions()")
            .fetch_all(&mut db)
            .await?;
    let expired: Vec<&String> = bounds.iter().filter(|(_, upper)| *upper <= cutoff).map(|(name, _)| name).collect();
    assert!(expired.is_empty(), "partitions wholly before the cutoff remain: {expired:?}");
    let names = partition_names(&mut db).await?;
    for days in [400, 100] {
        assert!(!names.contains(&month(days)), "{} dropped, in {names:?}", month(days));
    }
    assert!(names.contains(&month(30)), "the partly expired month stays: {names:?}");
    let ahead = format!("messages_{}", (now + chrono::Months::new(2)).format("%Y_%m"));
    assert!(names.contains(&ahead), "{ahead} made ahead: {names:?}");
    // The search table's months alike.
    let search_names = partitions_named(&mut db, "message_search").await?;
    let searched = |name: &String| name.replacen("messages", "message_search", 1);
    for days in [400, 100] {
        assert!(!search_names.contains(&searched(&month(days))), "{search_names:?}");
    }
    assert!(
        search_names.contains(&searched(&month(30))) && search_names.contains(&searched(&ahead)),
        "{search_names:?}"
    );
    database.drop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_table_with_rows_is_partitioned_online_and_resumably() -> anyhow::Result<()> {
    use flare_storage_common::prost::Message as _;

    let database = TestDatabase::create().await?;
    migrate_before(&database.url, "20261201000001").await?;
    let tenant = unique("acme");
    let mut db = database.connect().await?;
    // 300 messages stored by an earlier version over the last three months.
    let now = Utc::now();
    for index in 0..300_i64 {
        let time = now - chrono::Duration::hours(7 * index + 1);
        let message = Message {
            id: format!("old-{index}"),
            session_id: "s".into(),
            seq: 300 - index,
            sender_id: "a".into(),
            timestamp: Some(to_timestamp(time)),
            ..Default::default()
        };
        sqlx::query(
            r#"INSERT INTO messages (tenant_id, message_id, session_id, seq, sender_id, "timestamp", payload)
               VALUES ($1, $2, 's', $3, 'a', $4, $5)"#,
        )
        .bind(&tenant)
        .bind(&message.id)
        .bind(message.seq)
        .bind(time)
        .bind(message.encode_to_vec())
        .execute(&mut db)
        .await?;
    }
    flare_storage_common::schema::migrate(&sqlx::PgPool::connect(&database.url).await?).await?;
    assert_eq!(relkind(&mut db).await?, "r", "a table with rows stays as it is until the operator moves it");
    let ids: i64 = sqlx::query_scalar("SELECT count(*) FROM message_ids").fetch_one(&mut db).await?;
    assert_eq!(ids, 300, "the migration records every stored id");

    // An earlier run was interrupted: its index build left an invalid index, its constraint
    // is added but not validated.
    sqlx::query("CREATE INDEX messages_seq_lookup ON messages (tenant_id, session_id, seq)").execute(&mut db).await?;
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'messages_seq_lookup'::regclass")
        .execute(&mut db)
        .await?;
    sqlx::query(r#"CREATE UNIQUE INDEX message_search_key ON message_search (tenant_id, message_id, "timestamp")"#)
        .execute(&mut db)
        .await?;
    sqlx::query("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'message_search_key'::regclass")
        .execute(&mut db)
        .await?;
    assert_eq!(relkind_of(&mut db, "message_search").await?, "r", "the search table stays with its table");
    let month_after = |days: i64| {
        let url = database.url.clone();
        async move {
            let mut db = PgConnection::connect(&url).await?;
            let boundary: DateTime<Utc> = sqlx::query_scalar(
                "SELECT (date_trunc('month', (now() + make_interval(days => $1)) AT TIME ZONE 'UTC') + INTERVAL '1 month') AT TIME ZONE 'UTC'",
            )
            .bind(i32::try_from(days)?)
            .fetch_one(&mut db)
            .await?;
            anyhow::Ok(boundary)
        }
    };
    let add_constraint = |boundary: DateTime<Utc>| {
        format!(
            r#"ALTER TABLE messages ADD CONSTRAINT messages_before_partitioning CHECK ("timestamp" < '{}') NOT VALID"#,
            boundary.to_rfc3339()
        )
    };
    let interrupted = month_after(40).await?;
    sqlx::query(&add_constraint(interrupted)).execute(&mut db).await?;

    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.max_future = Duration::from_secs(400 * 86_400);
    let writer = RunningWriter::start(config).await?;
    // A message dated past that boundary: the writer removes the constraint rather than
    // refuse the message, and stores it.
    let early = interrupted + chrono::Duration::days(3);
    produce_message(&producer()?, &topic, &request(&tenant, "early-past-boundary", early)).await?;
    writer.wait_processed(1).await?;
    let constraints: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'messages'::regclass AND conname = 'messages_before_partitioning'",
    )
    .fetch_one(&mut db)
    .await?;
    assert_eq!(constraints, 0, "the writer gave way");

    let cli = |url: String, margin: &'static str| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary("flare-storage")?)
                .args(["partition-messages", "--postgres-url", &url, "--margin-days", margin])
                .output()
                .map_err(anyhow::Error::from)
        })
    };
    // That message is past the default boundary: the move stops and says what to do.
    let refused = cli(database.url.clone(), "31").await??;
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && said.contains("--margin-days"), "{said}");
    assert_eq!(relkind(&mut db).await?, "r");

    // Another interrupted run left a boundary further than the next run asks: it is kept.
    let boundary = month_after(160).await?;
    sqlx::query(&add_constraint(boundary)).execute(&mut db).await?;
    // A writer stores a stream while the table is partitioned under it.
    let stream = {
        let (producer, topic, tenant) = (producer()?, topic.clone(), tenant.clone());
        tokio::spawn(async move {
            for index in 0..200 {
                let time = Utc::now() - chrono::Duration::days(index % 3 * 20);
                produce_message(&producer, &topic, &request(&tenant, &format!("new-{index}"), time)).await?;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let output = cli(database.url.clone(), "150").await??;
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{printed}{}", String::from_utf8_lossy(&output.stderr));
    assert!(printed.contains(&format!("before {boundary}")), "the earlier run's boundary is kept: {printed}");
    stream.await??;
    writer.wait_processed(201).await?;
    wait_for_entries(&database, 201).await?;

    assert_eq!(relkind(&mut db).await?, "p");
    let names = partition_names(&mut db).await?;
    let first_month = format!("messages_{}", boundary.format("%Y_%m"));
    assert!(names.contains(&"messages_unpartitioned".to_owned()) && names.contains(&first_month), "{names:?}");
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM messages").fetch_one(&mut db).await?;
    assert_eq!((rows, distinct), (501, 501), "nothing lost, nothing twice");
    let ids: i64 = sqlx::query_scalar("SELECT count(*) FROM message_ids").fetch_one(&mut db).await?;
    assert_eq!(ids, 501);

    // After the move: an old time goes to the old table, a time past the boundary to its month.
    let writer_after = {
        let producer = producer()?;
        produce_message(&producer, &topic, &request(&tenant, "late-old", now - chrono::Duration::days(50))).await?;
        produce_message(&producer, &topic, &request(&tenant, "past-boundary", boundary + chrono::Duration::days(3)))
            .await?;
        writer.wait_processed(203).await?;
        partitions_of(&mut db).await?
    };
    assert_eq!(writer_after.get("late-old").map(String::as_str), Some("messages_unpartitioned"));
    assert_eq!(writer_after.get("past-boundary"), Some(&first_month));
    assert_eq!(writer_after.get("early-past-boundary").map(String::as_str), Some("messages_unpartitioned"));
    // The search table moved with it, its old table attached with the indexes it had (its
    // new key built beforehand, nothing built under the swap's lock).
    assert_eq!(relkind_of(&mut db, "message_search").await?, "p");
    wait_for_entries(&database, 203).await?;
    let entries = search_partitions_of(&mut db).await?;
    let first_search_month = first_month.replacen("messages", "message_search", 1);
    assert_eq!(entries.get("late-old").map(String::as_str), Some("message_search_unpartitioned"));
    assert_eq!(entries.get("early-past-boundary").map(String::as_str), Some("message_search_unpartitioned"));
    assert_eq!(entries.get("past-boundary"), Some(&first_search_month));
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'message_search_unpartitioned' ORDER BY 1",
    )
    .fetch_all(&mut db)
    .await?;
    assert_eq!(indexes.len(), 7, "the old indexes and the key, no other: {indexes:?}");
    writer.stop().await?;

    let reader = RunningReader::start_with(&database.url, None).await?;
    for id in ["old-0", "old-299", "new-0", "new-199", "late-old", "past-boundary", "early-past-boundary"] {
        assert!(get_message(&reader, &tenant, id).await?.is_some(), "{id} is found by id");
    }
    reader.stop().await?;

    // Run again: nothing to do.
    let again = cli(database.url.clone(), "31").await??;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already partitioned"));

    // Retention drops the old table whole once its boundary has passed.
    let store = flare_storage_writer::store::postgres::PostgresStore::connect(&database.url, 2)?;
    assert!(store.drop_partitions_before(boundary).await? >= 2);
    drop(store);
    let names = partition_names(&mut db).await?;
    assert!(!names.contains(&"messages_unpartitioned".to_owned()) && names.contains(&first_month), "{names:?}");
    let names = partitions_named(&mut db, "message_search").await?;
    assert!(
        !names.contains(&"message_search_unpartitioned".to_owned()) && names.contains(&first_search_month),
        "{names:?}"
    );
    database.drop().await
}
