//! The first slice end to end: records produced to Kafka are stored by the writer in
//! Postgres exactly once, and the reader serves them back over gRPC, scoped by tenant.

use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::{ErrorCode, Pagination, TenantContext};
use flare_storage_common::proto::storage::{
    GetMessageRequest, Message, MessageContent, MessageType, QueryMessagesRequest, StoreMessageRequest, TextContent,
    message_content,
};
use flare_storage_common::tonic::Code;
use flare_storage_e2e::*;

const PARTITIONS: i32 = 4;

fn text_message(tenant: &str, session: &str, id: &str, sender: &str, text: &str, second: i64) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: session.into(),
        message: Some(Message {
            id: id.into(),
            sender_id: sender.into(),
            receiver_id: "bob".into(),
            message_type: MessageType::Text as i32,
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent { text: text.into(), mentions: vec![] })),
            }),
            // Recent enough for the reader's default seven-day range.
            timestamp: Some(to_timestamp(base_time() + chrono::Duration::seconds(second))),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    }
}

/// One hour before the test run started, the same for every message of the run.
fn base_time() -> chrono::DateTime<chrono::Utc> {
    static BASE: std::sync::OnceLock<chrono::DateTime<chrono::Utc>> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| chrono::Utc::now() - chrono::Duration::hours(1))
}

fn text_of(message: &Message) -> &str {
    match message.content.as_ref().and_then(|content| content.content.as_ref()) {
        Some(message_content::Content::Text(text)) => &text.text,
        _ => "",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_from_kafka_to_grpc_exactly_once() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let topic = unique("messages");
    let dlq_topic = unique("dlq");
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    // Tenants of their own keep this test's Redis keys apart from every other test's.
    let (acme, globex) = (unique("acme"), unique("globex"));
    let (acme, globex) = (acme.as_str(), globex.as_str());

    let conversation = [
        ("alice", "你好，这是一条测试消息"),
        ("bob", "Hi Alice, got it"),
        ("alice", "周末一起去爬山吗？"),
        ("bob", "Sure, Saturday morning works"),
        ("alice", "好的，不见不散"),
    ];
    let producer = producer()?;
    for (index, (sender, text)) in conversation.iter().enumerate() {
        let request = text_message(acme, "s-chat", &format!("m{index}"), sender, text, index as i64);
        produce_message(&producer, &topic, &request).await?;
    }
    // Another tenant uses the same session id and message id: it must stay separate.
    produce_message(&producer, &topic, &text_message(globex, "s-chat", "m0", "eve", "other tenant", 0)).await?;
    // A resend of an already produced message, and a record that is not a protobuf at all.
    produce_message(&producer, &topic, &text_message(acme, "s-chat", "m1", "bob", "Hi Alice, got it", 1)).await?;
    produce(&producer, &topic, "s-chat", b"\xff\xffnot a protobuf").await?;

    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    let reader = RunningReader::start(&database.url).await?;
    let mut client = reader.client().await?;

    // All five acme messages come back, newest first.
    let messages = eventually(Duration::from_secs(60), "the conversation to be readable", || {
        let mut client = client.clone();
        async move {
            let response = client.query_messages(query(acme, "s-chat", 20, "")).await?.into_inner();
            Ok((response.messages.len() == conversation.len()).then_some(response))
        }
    })
    .await?;
    let texts: Vec<&str> = messages.messages.iter().map(text_of).collect();
    let expected: Vec<&str> = conversation.iter().rev().map(|(_, text)| *text).collect();
    assert_eq!(texts, expected);
    assert!(!messages.has_more);
    assert_eq!(messages.status.map(|status| status.code), Some(ErrorCode::Ok as i32));
    for message in &messages.messages {
        assert_eq!(message.tenant.as_ref().map(|tenant| tenant.tenant_id.as_str()), Some(acme));
        assert!(message.timeline.as_ref().and_then(|timeline| timeline.persisted_time).is_some());
    }

    // Paging by cursor: 2 + 2 + 1, in order, without repeats.
    let mut paged = Vec::new();
    let mut cursor = String::new();
    for expected_len in [2, 2, 1] {
        let page = client.query_messages(query(acme, "s-chat", 2, &cursor)).await?.into_inner();
        assert_eq!(page.messages.len(), expected_len);
        assert_eq!(page.has_more, expected_len == 2);
        assert_eq!(page.pagination.as_ref().map(|p| p.has_more), Some(page.has_more));
        paged.extend(page.messages.iter().map(|message| message.id.clone()));
        cursor = page.next_cursor;
    }
    assert_eq!(paged, ["m4", "m3", "m2", "m1", "m0"]);
    // The cursor may also travel in the pagination field.
    let first = client.query_messages(query(acme, "s-chat", 3, "")).await?.into_inner();
    let mut via_pagination = query(acme, "s-chat", 0, "");
    via_pagination.pagination = Some(Pagination { cursor: first.next_cursor.clone(), limit: 3, ..Default::default() });
    let second = client.query_messages(via_pagination).await?.into_inner();
    assert_eq!(second.messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m1", "m0"]);

    // Tenants are separate.
    let other = client.query_messages(query(globex, "s-chat", 20, "")).await?.into_inner();
    assert_eq!(other.messages.iter().map(text_of).collect::<Vec<_>>(), ["other tenant"]);
    let get = |tenant: &str, id: &str| GetMessageRequest {
        message_id: id.into(),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    };
    let found = client.get_message(get(acme, "m2")).await?.into_inner();
    assert_eq!(found.message.as_ref().map(text_of), Some("周末一起去爬山吗？"));
    assert_eq!(found.status.map(|status| status.code), Some(ErrorCode::Ok as i32));
    let missing = client.get_message(get(acme, "m-does-not-exist")).await.expect_err("unknown id");
    assert_eq!(missing.code(), Code::NotFound);
    let wrong_tenant = client.get_message(get("initech", "m2")).await.expect_err("other tenant");
    assert_eq!(wrong_tenant.code(), Code::NotFound);

    // Bad input names the field.
    let error = client.query_messages(query(acme, "", 20, "")).await.expect_err("no session");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("session_id"), "{}", error.message());
    let error = client.query_messages(query(acme, "s-chat", 20, "garbage!")).await.expect_err("bad cursor");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("cursor"), "{}", error.message());
    let foreign_cursor = client.query_messages(query(globex, "s-chat", 20, &first.next_cursor)).await;
    assert_eq!(foreign_cursor.expect_err("cursor of another tenant").code(), Code::InvalidArgument);
    let error = client.query_messages(query(acme, "s-chat", -5, "")).await.expect_err("negative limit");
    assert!(error.message().contains("limit"), "{}", error.message());
    let error = client.get_message(get(acme, &"x".repeat(65))).await.expect_err("long id");
    assert_eq!(error.code(), Code::InvalidArgument);

    // Stored exactly once: 5 acme + 1 globex rows although m1 was produced twice.
    let mut db = database.connect().await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?;
    assert_eq!(rows, 6);

    // The writer's metrics saw 6 new, 1 duplicate, 1 dead-lettered.
    let metrics = eventually(Duration::from_secs(10), "writer metrics", || async {
        let (_, body) = http_get(writer.metrics_addr, "/metrics").await?;
        let done = metric_value(&body, "storage_writer_messages_processed_total") == Some(6.0)
            && metric_value(&body, "storage_writer_messages_duplicated_total") == Some(1.0);
        Ok(done.then_some(body))
    })
    .await?;
    assert!(metrics.contains("storage_writer_dead_lettered_total{reason=\"undecodable\"} 1"), "{metrics}");
    assert_eq!(http_get(writer.metrics_addr, "/readyz").await?.0, 200);
    assert_eq!(http_get(reader.metrics_addr, "/healthz").await?.0, 200);
    let (_, reader_metrics) = http_get(reader.metrics_addr, "/metrics").await?;
    assert!(
        reader_metrics.contains("storage_reader_queries_total{code=\"OK\",rpc=\"QueryMessages\"}"),
        "{reader_metrics}"
    );

    // The garbage record is in the dead-letter topic, unchanged, with its reason and origin.
    let dead_letters = read_topic(&dlq_topic, PARTITIONS, 1, Duration::from_secs(30)).await?;
    let dead_letter = dead_letters.first().expect("one dead letter");
    assert_eq!(dead_letter.payload.as_deref(), Some(&b"\xff\xffnot a protobuf"[..]));
    assert!(dead_letter.header("flare-dlq-reason").is_some_and(|reason| reason.contains("not a StoreMessageRequest")));
    assert_eq!(dead_letter.header("flare-dlq-source-topic"), Some(topic.as_str()));

    writer.stop().await?;
    reader.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_records_are_not_stored_twice() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let topic = unique("messages");
    let dlq_topic = unique("dlq");
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let acme = unique("acme");
    let acme = acme.as_str();
    let producer = producer()?;
    for index in 0..20 {
        let session = format!("s{}", index % 3);
        produce_message(&producer, &topic, &text_message(acme, &session, &format!("m{index}"), "a", "hello", index))
            .await?;
    }

    let count_rows = || async {
        let mut db = database.connect().await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?;
        anyhow::Ok(rows)
    };
    let first = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    eventually(Duration::from_secs(60), "20 stored rows", || async { Ok((count_rows().await? == 20).then_some(())) })
        .await?;
    first.stop().await?;

    // A writer in a new consumer group reads the whole topic again: every record is a
    // redelivery of completed work, none is stored a second time or called a duplicate.
    let second = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    eventually(Duration::from_secs(60), "all 20 records seen as redeliveries", || async {
        let (_, body) = http_get(second.metrics_addr, "/metrics").await?;
        Ok((metric_value(&body, "storage_writer_messages_redelivered_total") == Some(20.0)).then_some(()))
    })
    .await?;
    let (_, body) = http_get(second.metrics_addr, "/metrics").await?;
    assert_eq!(metric_value(&body, "storage_writer_messages_processed_total"), Some(0.0));
    assert_eq!(metric_value(&body, "storage_writer_messages_duplicated_total"), Some(0.0));
    assert_eq!(count_rows().await?, 20);
    second.stop().await?;
    database.drop().await?;
    Ok(())
}

/// One gRPC call over a bare HTTP/2 connection (the h2 crate, not tonic), as any other
/// gRPC client makes it: the request message framed, the response messages unframed; an error
/// naming the status unless it is OK.
async fn raw_grpc_call(addr: std::net::SocketAddr, path: &str, message: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let (response, mut send) = client.send_request(request, false)?;
    let mut frame = vec![0u8];
    frame.extend(u32::try_from(message.len())?.to_be_bytes());
    frame.extend_from_slice(message);
    send.send_data(bytes::Bytes::from(frame), true)?;
    let response = response.await?;
    anyhow::ensure!(response.status() == 200, "HTTP {}", response.status());
    let status = |headers: &http::HeaderMap| headers.get("grpc-status").map(|value| value.as_bytes().to_vec());
    // A call refused at once (UNIMPLEMENTED) answers with its status in the headers alone.
    if let Some(code) = status(response.headers()) {
        anyhow::ensure!(code == b"0", "grpc-status {}", String::from_utf8_lossy(&code));
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        data.extend_from_slice(&chunk);
    }
    if let Some(trailers) = body.trailers().await? {
        let code = status(&trailers).unwrap_or_default();
        anyhow::ensure!(code == b"0", "grpc-status {}", String::from_utf8_lossy(&code));
    }
    let mut messages = Vec::new();
    let mut rest = data.as_slice();
    while rest.len() >= 5 {
        let length = u32::from_be_bytes(rest[1..5].try_into()?) as usize;
        anyhow::ensure!(rest.len() >= 5 + length, "a truncated message");
        messages.push(rest[5..5 + length].to_vec());
        rest = &rest[5 + length..];
    }
    Ok(messages)
}

/// Server reflection answers clients of both protocol versions (older grpcurl, grpcui, Postman
/// and Evans speak only v1alpha), asked here by a client that is not tonic, and lists every
/// service the reader serves, health included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_v1_and_v1alpha_clients_with_every_service() -> anyhow::Result<()> {
    use prost::Message as _;

    let database = TestDatabase::create().await?;
    let reader = RunningReader::start(&database.url).await?;
    // ServerReflectionRequest { list_services: "" } (field 7), the same in both versions.
    let list_services = [0x3a, 0x00];
    for version in ["v1", "v1alpha"] {
        let path = format!("/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo");
        let answers = raw_grpc_call(reader.grpc_addr, &path, &list_services).await?;
        let answer = answers.first().ok_or_else(|| anyhow::anyhow!("{version}: no answer"))?;
        let response = tonic_reflection::pb::v1::ServerReflectionResponse::decode(answer.as_slice())?;
        let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            response.message_response
        else {
            anyhow::bail!("{version}: unexpected {response:?}")
        };
        let services: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
        for served in ["flare.storage.v1.StorageReaderService", "grpc.health.v1.Health"] {
            assert!(services.iter().any(|name| name == served), "{version} does not list {served}: {services:?}");
        }
    }
    // A health check from the same client: SERVING (1) once PostgreSQL answers.
    eventually(Duration::from_secs(10), "health SERVING", || async {
        let answers = raw_grpc_call(reader.grpc_addr, "/grpc.health.v1.Health/Check", &[]).await?;
        Ok((answers.first().map(Vec::as_slice) == Some(&[0x08, 0x01][..])).then_some(()))
    })
    .await?;
    reader.stop().await?;
    database.drop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_serves_health_and_reflection() -> anyhow::Result<()> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let database = TestDatabase::create().await?;
    let reader = RunningReader::start(&database.url).await?;
    let channel = flare_storage_common::tonic::transport::Channel::from_shared(format!("http://{}", reader.grpc_addr))?
        .connect()
        .await?;

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await?.into_inner();
    let response = responses.message().await?.and_then(|response| response.message_response);
    let Some(MessageResponse::ListServicesResponse(list)) = response else { anyhow::bail!("unexpected {response:?}") };
    let services: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    assert!(services.contains(&"flare.storage.v1.StorageReaderService".to_owned()), "{services:?}");

    let symbol = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("flare.storage.v1.QueryMessagesRequest".into())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([symbol])).await?.into_inner();
    let response = responses.message().await?.and_then(|response| response.message_response);
    assert!(matches!(response, Some(MessageResponse::FileDescriptorResponse(_))), "{response:?}");

    // /readyz and gRPC health follow Postgres.
    eventually(Duration::from_secs(10), "ready", || async {
        Ok((http_get(reader.metrics_addr, "/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    reader.stop().await?;
    database.drop().await?;
    Ok(())
}
