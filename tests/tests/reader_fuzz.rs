//! Wild but well-formed requests to every RPC: the reader answers each with a deliberate
//! status (OK, INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED or FAILED_PRECONDITION) — never
//! INTERNAL, UNKNOWN or a dropped connection —
//! and still serves correct answers afterwards. `FUZZ_REQUESTS` sets the count (default 2,000).

use std::collections::HashMap;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::prost_types::Timestamp;
use flare_storage_common::proto::common::{
    ActorContext, FilterExpression, Pagination, RequestContext, SortExpression, TenantContext, TimeRange,
};
use flare_storage_common::proto::storage::*;
use flare_storage_common::tonic::Code;
use flare_storage_e2e::*;
use tokio_stream::StreamExt as _;

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }

    fn string(&mut self, known: &[&str]) -> String {
        match self.next() % 12 {
            0 => String::new(),
            1 => "x".repeat(64),
            2 => "y".repeat(65),
            3 => "z".repeat(10_000),
            4 => "bad\u{0}id\n".into(),
            5 => "'; DROP TABLE messages; --".into(),
            6 => "消息%_\\".into(),
            7 => "🙂".repeat(20),
            _ => (*self.pick(known)).to_owned(),
        }
    }

    fn int(&mut self) -> i64 {
        *self.pick(&[0, 1, -1, 7, 200, 201, 10_000, i64::MAX, i64::MIN, i64::from(i32::MAX), 1_700_000_000_000])
    }

    fn int32(&mut self) -> i32 {
        *self.pick(&[0, 1, -1, 2, 20, 201, i32::MAX, i32::MIN, 99])
    }

    fn timestamp(&mut self) -> Option<Timestamp> {
        match self.next() % 5 {
            0 => None,
            1 => Some(Timestamp { seconds: i64::MAX, nanos: 0 }),
            2 => Some(Timestamp { seconds: 0, nanos: -1 }),
            3 => Some(Timestamp { seconds: -62_135_596_800, nanos: 0 }),
            _ => Some(to_timestamp(chrono::Utc::now())),
        }
    }
}

const IDS: [&str; 4] = ["m0", "m1", "m2", "nope"];
const USERS: [&str; 3] = ["alice", "bob", "carol"];
const FIELDS: [&str; 10] =
    ["content", "session_id", "sender_id", "message_type", "business_type", "tags", "seq", "colour", "", "timestamp"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wild_requests_get_deliberate_answers() -> anyhow::Result<()> {
    let requests: usize = std::env::var("FUZZ_REQUESTS").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000);
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let producer = producer()?;
    for index in 0..3 {
        let request = StoreMessageRequest {
            session_id: "s".into(),
            message: Some(Message {
                id: format!("m{index}"),
                sender_id: USERS[index % 2].into(),
                receiver_id: USERS[(index + 1) % 2].into(),
                content: Some(MessageContent {
                    content: Some(message_content::Content::Text(TextContent {
                        text: format!("hello {index}"),
                        mentions: vec![],
                    })),
                }),
                timestamp: Some(to_timestamp(chrono::Utc::now() - chrono::Duration::seconds(10 - index as i64))),
                is_burn_after_read: index == 2,
                burn_after_seconds: 3600,
                ..Default::default()
            }),
            tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
            ..Default::default()
        };
        produce_message(&producer, &topic, &request).await?;
    }
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    writer.wait_processed(3).await?;
    writer.stop().await?;

    let exports = std::env::temp_dir().join(unique("exports"));
    let export_dir = exports.clone();
    let reader = RunningReader::start_configured(&database.url, Some(redis_url()), |config| {
        config.export_dir = Some(export_dir)
    })
    .await?;
    let mut task_ids = vec![String::new(), "nope".to_owned(), "../../etc/passwd".to_owned(), "x".repeat(80)];
    let mut client = reader.client().await?;
    let tenants = [tenant.as_str(), "", "other"];
    let mut random = Random(0x5eed_1234_abcd_ef01);
    let mut codes: HashMap<Code, usize> = HashMap::new();
    for round in 0..requests {
        let tenant_context = Some(TenantContext { tenant_id: random.string(&tenants), ..Default::default() });
        let context = match random.next() % 3 {
            0 => None,
            1 => Some(RequestContext {
                actor: Some(ActorContext {
                    actor_id: random.string(&USERS),
                    r#type: random.int32(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            _ => Some(RequestContext::default()),
        };
        let filters: Vec<FilterExpression> = (0..random.next() % 4)
            .map(|_| FilterExpression {
                field: (*random.pick(&FIELDS)).to_owned(),
                op: random.int32().rem_euclid(12),
                values: (0..random.next() % 3).map(|_| random.string(&["s", "alice", "hello", "5", "TEXT"])).collect(),
            })
            .collect();
        let session = random.string(&["s", "s", "other"]);
        let message_id = random.string(&IDS);
        let user = random.string(&USERS);
        let result: Result<(), flare_storage_common::tonic::Status> = match round % 15 {
            0 => client
                .query_messages(QueryMessagesRequest {
                    session_id: session,
                    start_time: random.int(),
                    end_time: random.int(),
                    limit: random.int32(),
                    cursor: random.string(&["", "AAAA", "MTpmZmZmOjE6bQ"]),
                    context,
                    tenant: tenant_context,
                    pagination: Some(Pagination {
                        limit: random.int32(),
                        cursor: random.string(&[""]),
                        ..Default::default()
                    }),
                })
                .await
                .map(drop),
            1 => client
                .query_messages_by_seq(QueryMessagesBySeqRequest {
                    session_id: session,
                    after_seq: random.int(),
                    before_seq: random.int(),
                    limit: random.int32(),
                    user_id: user,
                    context,
                    tenant: tenant_context,
                })
                .await
                .map(drop),
            2 => client.get_message(GetMessageRequest { context, tenant: tenant_context, message_id }).await.map(drop),
            3 => client
                .search_messages(SearchMessagesRequest {
                    context,
                    tenant: tenant_context,
                    filters,
                    sort: vec![SortExpression {
                        field: random.string(&["timestamp", "time"]),
                        direction: random.int32(),
                    }],
                    pagination: Some(Pagination {
                        limit: random.int32(),
                        cursor: random.string(&[""]),
                        ..Default::default()
                    }),
                    time_range: Some(TimeRange { start_time: random.timestamp(), end_time: random.timestamp() }),
                })
                .await
                .map(drop),
            4 => client
                .delete_message(DeleteMessageRequest {
                    session_id: session,
                    message_ids: (0..random.next() % 3).map(|_| random.string(&IDS)).collect(),
                    context,
                    tenant: tenant_context,
                })
                .await
                .map(drop),
            5 => client
                .recall_message(RecallMessageRequest {
                    message_id,
                    operator_id: user,
                    reason: random.string(&["typo"]),
                    recall_time_limit_seconds: random.int32(),
                    context,
                    tenant: tenant_context,
                })
                .await
                .map(drop),
            6 => client
                .delete_message_for_user(DeleteMessageForUserRequest {
                    message_id,
                    user_id: user,
                    permanent: random.next().is_multiple_of(2),
                    context,
                    tenant: tenant_context,
                })
                .await
                .map(drop),
            7 => client
                .clear_session(ClearSessionRequest {
                    session_id: session,
                    user_id: user,
                    clear_type: random.int32(),
                    clear_before_message_id: random.string(&IDS),
                    clear_before_time: random.timestamp(),
                    context,
                    tenant: tenant_context,
                })
                .await
                .map(drop),
            8 => client
                .mark_message_read(MarkMessageReadRequest {
                    message_id,
                    user_id: user,
                    context,
                    tenant: tenant_context,
                })
                .await
                .map(drop),
            9 => client
                .set_message_attributes(SetMessageAttributesRequest {
                    context,
                    tenant: tenant_context,
                    message_id,
                    attributes: HashMap::from([(random.string(&["k"]), random.string(&["v"]))]),
                    tags: (0..random.next() % 3).map(|_| random.string(&["t"])).collect(),
                })
                .await
                .map(drop),
            10 => client.list_message_tags(ListMessageTagsRequest { context, tenant: tenant_context }).await.map(drop),
            11 => client
                .export_messages(ExportMessagesRequest {
                    context,
                    tenant: tenant_context,
                    session_id: session,
                    time_range: None,
                    filters,
                })
                .await
                .map(|response| task_ids.push(response.into_inner().export_task_id)),
            12 => {
                let export_task_id = task_ids[random.next() as usize % task_ids.len()].clone();
                client
                    .get_export_task(GetExportTaskRequest { context, tenant: tenant_context, export_task_id })
                    .await
                    .map(drop)
            }
            _ => match client
                .stream_export_messages(ExportMessagesRequest {
                    context,
                    tenant: tenant_context,
                    session_id: session,
                    time_range: Some(TimeRange { start_time: random.timestamp(), end_time: random.timestamp() }),
                    filters,
                })
                .await
            {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    let mut outcome = Ok(());
                    while let Some(item) = stream.next().await {
                        if let Err(status) = item {
                            outcome = Err(status);
                            break;
                        }
                    }
                    outcome
                }
                Err(status) => Err(status),
            },
        };
        let code = result.err().map_or(Code::Ok, |status| {
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition
                ),
                "round {round} (rpc {}): {status:?}",
                round % 15
            );
            status.code()
        });
        *codes.entry(code).or_default() += 1;
    }
    eprintln!("{requests} requests: {codes:?}");
    assert!(codes.get(&Code::Ok).copied().unwrap_or(0) > requests / 20, "some requests must be valid: {codes:?}");
    assert!(codes.get(&Code::InvalidArgument).copied().unwrap_or(0) > requests / 20, "{codes:?}");

    // Still healthy and still right.
    assert_eq!(http_get(reader.metrics_addr, "/healthz").await?.0, 200);
    let page = client
        .query_messages(QueryMessagesRequest {
            session_id: "s".into(),
            limit: 10,
            tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(page.messages.len() <= 3);
    let (_, body) = http_get(reader.metrics_addr, "/metrics").await?;
    assert!(!body.contains("code=\"Internal\""), "no INTERNAL answers");
    reader.stop().await?;
    // A job a fuzzed request started may still be writing; the directory is temporary.
    let _ = std::fs::remove_dir_all(&exports);
    database.drop().await?;
    Ok(())
}
