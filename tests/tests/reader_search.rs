//! SearchMessages and StreamExportMessages against the real services: Chinese substrings of
//! any length, literal wildcards, SQL as data, filters, sort and paging, tenants, per-user and
//! recalled messages; a streamed export of a whole session in chunks, and an export job
//! writing it to a JSON Lines file.

use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::{
    ActorContext, ErrorCode, FilterExpression, FilterOperator, Pagination, RequestContext, SortDirection,
    SortExpression, TenantContext, TimeRange,
};
use flare_storage_common::proto::storage::*;
use flare_storage_common::tonic::Code;
use flare_storage_e2e::*;
use tokio_stream::StreamExt as _;

const PARTITIONS: i32 = 4;

fn tenant(id: &str) -> Option<TenantContext> {
    Some(TenantContext { tenant_id: id.into(), ..Default::default() })
}

fn contains(text: &str) -> FilterExpression {
    FilterExpression { field: "content".into(), op: FilterOperator::Contains as i32, values: vec![text.into()] }
}

fn filter(field: &str, op: FilterOperator, values: &[&str]) -> FilterExpression {
    FilterExpression { field: field.into(), op: op as i32, values: values.iter().map(|v| (*v).to_owned()).collect() }
}

fn chat(tenant_id: &str, session: &str, id: &str, sender: &str, text: &str, order: i64) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: session.into(),
        message: Some(Message {
            id: id.into(),
            sender_id: sender.into(),
            receiver_id: if sender == "alice" { "bob".into() } else { "alice".into() },
            message_type: MessageType::Text as i32,
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent { text: text.into(), mentions: vec![] })),
            }),
            timestamp: Some(to_timestamp(
                chrono::Utc::now() - chrono::Duration::minutes(10) + chrono::Duration::milliseconds(order),
            )),
            ..Default::default()
        }),
        tenant: tenant(tenant_id),
        ..Default::default()
    }
}

async fn store(database: &TestDatabase, requests: &[StoreMessageRequest]) -> anyhow::Result<()> {
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let producer = producer()?;
    for request in requests {
        produce_message(&producer, &topic, request).await?;
    }
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    writer.wait_processed(requests.len()).await?;
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_substrings_in_any_language_and_only_what_it_should() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (acme, globex) = (unique("acme"), unique("globex"));
    let corpus = [
        ("s1", "m1", "alice", "这是一条测试消息"),
        ("s1", "m2", "bob", "Hello World, this is English"),
        ("s1", "m3", "alice", "消息"),
        ("s1", "m4", "bob", "50% off_sale today"),
        ("s1", "m5", "alice", "another 测试 line"),
        ("s2", "m6", "bob", "测试消息 in the second session"),
        ("s1", "m7", "alice", "to be recalled 消息"),
    ];
    let mut requests: Vec<StoreMessageRequest> = corpus
        .iter()
        .enumerate()
        .map(|(order, (session, id, sender, text))| chat(&acme, session, id, sender, text, order as i64))
        .collect();
    requests.push(chat(&globex, "s1", "g1", "eve", "这是一条测试消息", 0));
    store(&database, &requests).await?;

    let reader = RunningReader::start(&database.url).await?;
    let mut client = reader.client().await?;
    let search = |tenant_id: &str, filters: Vec<FilterExpression>| SearchMessagesRequest {
        tenant: tenant(tenant_id),
        filters,
        ..Default::default()
    };
    let search_client = client.clone();
    let found = async |request: SearchMessagesRequest| -> anyhow::Result<Vec<String>> {
        let response = search_client.clone().search_messages(request).await?.into_inner();
        let mut ids: Vec<String> = response.messages.iter().map(|m| m.id.clone()).collect();
        ids.sort();
        Ok(ids)
    };

    assert_eq!(found(search(&acme, vec![contains("消息")])).await?, ["m1", "m3", "m6", "m7"]);
    assert_eq!(found(search(&acme, vec![contains("息")])).await?, ["m1", "m3", "m6", "m7"]);
    assert_eq!(found(search(&acme, vec![contains("测试消息")])).await?, ["m1", "m6"]);
    assert_eq!(found(search(&acme, vec![contains("world")])).await?, ["m2"]);
    assert_eq!(found(search(&acme, vec![contains("WORLD")])).await?, ["m2"]);
    assert_eq!(found(search(&acme, vec![contains("%")])).await?, ["m4"]);
    assert_eq!(found(search(&acme, vec![contains("f_s")])).await?, ["m4"]);
    assert!(found(search(&acme, vec![contains("_x")])).await?.is_empty());
    assert!(found(search(&acme, vec![contains("'; DROP TABLE messages; --")])).await?.is_empty());
    assert_eq!(found(search(&globex, vec![contains("消息")])).await?, ["g1"]);
    assert_eq!(
        found(search(&acme, vec![contains("消息"), filter("session_id", FilterOperator::Eq, &["s1"])])).await?,
        ["m1", "m3", "m7"]
    );
    assert_eq!(
        found(search(&acme, vec![contains("测试"), filter("sender_id", FilterOperator::Ne, &["alice"])])).await?,
        ["m6"]
    );
    assert_eq!(
        found(search(
            &acme,
            vec![filter("seq", FilterOperator::Gt, &["4"]), filter("session_id", FilterOperator::In, &["s1"])]
        ))
        .await?,
        ["m5", "m7"]
    );
    assert_eq!(found(search(&acme, vec![filter("message_type", FilterOperator::Eq, &["TEXT"])])).await?.len(), 7);

    // Gone messages are not found: recalled for everyone, hidden for one user.
    client
        .recall_message(RecallMessageRequest {
            message_id: "m7".into(),
            operator_id: "alice".into(),
            recall_time_limit_seconds: 0,
            tenant: tenant(&acme),
            ..Default::default()
        })
        .await
        .expect_err("ten minutes old: too late to recall");
    client
        .delete_message(DeleteMessageRequest {
            session_id: "s1".into(),
            message_ids: vec!["m7".into()],
            context: Some(RequestContext {
                actor: Some(ActorContext { actor_id: "alice".into(), ..Default::default() }),
                ..Default::default()
            }),
            tenant: tenant(&acme),
        })
        .await?;
    client
        .delete_message_for_user(DeleteMessageForUserRequest {
            message_id: "m3".into(),
            user_id: "bob".into(),
            tenant: tenant(&acme),
            ..Default::default()
        })
        .await?;
    let as_bob = |filters| SearchMessagesRequest {
        context: Some(RequestContext {
            actor: Some(ActorContext { actor_id: "bob".into(), ..Default::default() }),
            ..Default::default()
        }),
        ..search(&acme, filters)
    };
    assert_eq!(found(as_bob(vec![contains("消息")])).await?, ["m1", "m6"]);
    assert_eq!(found(search(&acme, vec![contains("消息")])).await?, ["m1", "m3", "m6"]);

    // Sorted and paged: every match once, in order, across pages.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let mut request = search(&acme, vec![filter("session_id", FilterOperator::Eq, &["s1"])]);
        request.sort = vec![SortExpression { field: "timestamp".into(), direction: SortDirection::Asc as i32 }];
        request.pagination = Some(Pagination { cursor: cursor.clone(), limit: 2, ..Default::default() });
        let page = client.search_messages(request).await?.into_inner();
        seen.extend(page.messages.iter().map(|m| m.id.clone()));
        let pagination = page.pagination.expect("pagination");
        if !pagination.has_more {
            break;
        }
        cursor = pagination.cursor;
    }
    assert_eq!(seen, ["m1", "m2", "m3", "m4", "m5"]);

    // Bad input names the field.
    for (request, field) in [
        (search(&acme, vec![filter("colour", FilterOperator::Eq, &["red"])]), "colour"),
        (search(&acme, vec![filter("content", FilterOperator::Eq, &["x"])]), "FILTER_OPERATOR_EQ"),
        (search(&acme, vec![filter("seq", FilterOperator::Gt, &["NaN"])]), "seq"),
        (
            SearchMessagesRequest {
                sort: vec![SortExpression { field: "length".into(), direction: 0 }],
                ..search(&acme, vec![])
            },
            "sort.field",
        ),
        (
            SearchMessagesRequest {
                pagination: Some(Pagination { cursor: "not-a-cursor".into(), ..Default::default() }),
                ..search(&acme, vec![])
            },
            "pagination.cursor",
        ),
    ] {
        let error = client.search_messages(request).await.expect_err(field);
        assert_eq!(error.code(), Code::InvalidArgument, "{field}");
        assert!(error.message().contains(field), "{field}: {}", error.message());
    }
    let mut db = database.connect().await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?;
    assert_eq!(rows, 8, "the table survived the SQL in the search text");

    reader.stop().await?;
    database.drop().await?;
    Ok(())
}

/// Session "big" of 450 messages m000..m449 (alice even, bob odd, in order) and one message in
/// another session that no export of "big" may contain.
async fn store_big_session(database: &TestDatabase, tenant_id: &str) -> anyhow::Result<()> {
    let mut requests: Vec<StoreMessageRequest> = (0..450)
        .map(|index| {
            let sender = if index % 2 == 0 { "alice" } else { "bob" };
            chat(tenant_id, "big", &format!("m{index:03}"), sender, &format!("line {index} 消息"), index)
        })
        .collect();
    requests.push(chat(tenant_id, "other", "x1", "alice", "not exported", 0));
    store(database, &requests).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_exported_as_a_stream_of_chunks() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let acme = unique("acme");
    store_big_session(&database, &acme).await?;

    let reader = RunningReader::start(&database.url).await?;
    let mut client = reader.client().await?;
    let export = |filters| ExportMessagesRequest {
        tenant: tenant(&acme),
        session_id: "big".into(),
        filters,
        ..Default::default()
    };
    let mut stream = client.stream_export_messages(export(vec![])).await?.into_inner();
    let mut chunks = Vec::new();
    let mut ids = Vec::new();
    while let Some(item) = stream.next().await {
        let item = item?;
        chunks.push(item.messages.len());
        ids.extend(item.messages.into_iter().map(|m| m.id));
    }
    assert_eq!(chunks, [200, 200, 50]);
    let expected: Vec<String> = (0..450).map(|index| format!("m{index:03}")).collect();
    assert_eq!(ids, expected, "oldest first, each once");

    let mut filtered = client
        .stream_export_messages(export(vec![filter("sender_id", FilterOperator::Eq, &["bob"])]))
        .await?
        .into_inner();
    let mut count = 0;
    while let Some(item) = filtered.next().await {
        count += item?.messages.iter().filter(|m| m.sender_id == "bob").count();
    }
    assert_eq!(count, 225);
    let mut ranged = ExportMessagesRequest {
        time_range: Some(TimeRange {
            start_time: None,
            end_time: Some(to_timestamp(chrono::Utc::now() - chrono::Duration::hours(2))),
        }),
        ..export(vec![])
    };
    let mut empty = client.stream_export_messages(ranged.clone()).await?.into_inner();
    assert!(empty.next().await.is_none(), "nothing that old");
    ranged.session_id.clear();
    assert_eq!(client.stream_export_messages(ranged).await.expect_err("no session").code(), Code::InvalidArgument);
    let unary = client.export_messages(export(vec![])).await.expect_err("no export directory");
    assert_eq!(unary.code(), Code::FailedPrecondition);
    assert!(unary.message().contains("STORAGE_READER_EXPORT_DIR"), "{unary:?}");

    reader.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_job_writes_the_session_as_json_lines() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let acme = unique("acme");
    store_big_session(&database, &acme).await?;
    let directory = std::env::temp_dir().join(unique("exports"));
    let export_dir = directory.clone();
    let reader = RunningReader::start_configured(&database.url, Some(redis_url()), |config| {
        config.export_dir = Some(export_dir)
    })
    .await?;
    let mut client = reader.client().await?;
    // Deleted before the export: it must not be in the file.
    client
        .delete_message(DeleteMessageRequest {
            session_id: "big".into(),
            message_ids: vec!["m001".into()],
            context: Some(RequestContext {
                actor: Some(ActorContext { actor_id: "bob".into(), ..Default::default() }),
                ..Default::default()
            }),
            tenant: tenant(&acme),
        })
        .await?;

    let started = client
        .export_messages(ExportMessagesRequest {
            tenant: tenant(&acme),
            session_id: "big".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(started.status.map(|status| status.code), Some(ErrorCode::Ok as i32));
    let task = |tenant_id: &str, export_task_id: &str| GetExportTaskRequest {
        tenant: tenant(tenant_id),
        export_task_id: export_task_id.into(),
        ..Default::default()
    };
    let done = eventually(Duration::from_secs(30), "the export job", || async {
        let state = client.clone().get_export_task(task(&acme, &started.export_task_id)).await?.into_inner();
        Ok((state.state != ExportTaskState::Running as i32).then_some(state))
    })
    .await?;
    assert_eq!(done.state, ExportTaskState::Completed as i32, "{done:?}");
    assert_eq!(done.message_count, 449);
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    let file = std::fs::read_to_string(directory.join(&done.location))?;
    let ids: Vec<String> = file
        .lines()
        .map(|line| Ok(serde_json::from_str::<serde_json::Value>(line)?["id"].as_str().unwrap_or_default().to_owned()))
        .collect::<anyhow::Result<_>>()?;
    let expected: Vec<String> = (0..450).filter(|index| *index != 1).map(|index| format!("m{index:03}")).collect();
    assert_eq!(ids, expected, "oldest first, each once, the deleted one left out");
    let first: serde_json::Value = serde_json::from_str(file.lines().next().unwrap_or_default())?;
    assert_eq!(first["content"]["text"], "line 0 消息");
    let leftovers: Vec<_> = std::fs::read_dir(directory.join(done.location.split('/').next().unwrap_or_default()))?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "no partial file remains");

    // Another tenant does not see the task; ids are checked before any file is touched.
    let other = client.get_export_task(task(&unique("globex"), &started.export_task_id)).await.expect_err("other");
    assert_eq!(other.code(), Code::NotFound);
    let traversal = client.get_export_task(task(&acme, "../../etc/passwd")).await.expect_err("not a task id");
    assert_eq!(traversal.code(), Code::InvalidArgument);
    let unknown = client.get_export_task(task(&acme, &"0".repeat(32))).await.expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);

    reader.stop().await?;
    std::fs::remove_dir_all(&directory)?;
    database.drop().await?;
    Ok(())
}
