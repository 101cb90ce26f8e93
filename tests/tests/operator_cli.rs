//! The `flare-storage` operator command against the real services: migrations, JSON Lines
//! export, and replaying dead letters after a fix.

use std::process::Command;
use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    Message, MessageContent, StoreMessageRequest, TextContent, message_content,
};
use flare_storage_e2e::*;

fn message(tenant: &str, id: &str, text: &str, order: i64) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: "s".into(),
        message: Some(Message {
            id: id.into(),
            sender_id: "alice".into(),
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent { text: text.into(), mentions: vec![] })),
            }),
            timestamp: Some(to_timestamp(
                chrono::Utc::now() - chrono::Duration::minutes(5) + chrono::Duration::milliseconds(order),
            )),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    }
}

fn cli() -> anyhow::Result<Command> {
    let mut command = Command::new(binary("flare-storage")?);
    command.env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap());
    Ok(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_and_export_a_session_as_json_lines() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let migrated = cli()?.arg("migrate").env("POSTGRES_URL", &database.url).output()?;
    assert!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    let mut db = database.connect().await?;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('messages', 'message_hidden', 'session_clears')",
    )
    .fetch_one(&mut db)
    .await?;
    assert_eq!(tables, 3);

    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let producer = producer()?;
    for index in 0..30 {
        produce_message(&producer, &topic, &message(&tenant, &format!("m{index:02}"), &format!("行 {index}"), index))
            .await?;
    }
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    eventually(Duration::from_secs(60), "30 stored", || async {
        Ok((writer.processed().await? == 30.0).then_some(()))
    })
    .await?;
    let reader = RunningReader::start(&database.url).await?;

    let out = std::env::temp_dir().join(format!("{}.jsonl", unique("export")));
    let addr = format!("http://{}", reader.grpc_addr);
    let output = tokio::task::spawn_blocking({
        let (tenant, out) = (tenant.clone(), out.clone());
        move || {
            cli()?
                .args(["export", "--session", "s", "--tenant", &tenant, "--addr", &addr, "--out"])
                .arg(&out)
                .output()
                .map_err(anyhow::Error::from)
        }
    })
    .await??;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(progress.contains("30 messages exported in"), "{progress}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    std::fs::remove_file(&out)?;
    assert_eq!(lines.len(), 30);
    for (index, line) in lines.iter().enumerate() {
        assert_eq!(line["id"], format!("m{index:02}"));
        assert_eq!(line["seq"], index as i64 + 1);
        assert_eq!(line["content"]["text"], format!("行 {index}"));
        assert_eq!(line["tenant_id"], tenant.as_str());
    }

    writer.stop().await?;
    reader.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_replayed_after_a_fix() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let producer = producer()?;
    produce_message(&producer, &topic, &message(&tenant, "small", "hi", 0)).await?;
    produce_message(&producer, &topic, &message(&tenant, "large", &"x".repeat(4096), 1)).await?;

    // A limit too low for the large message: it is dead-lettered.
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.max_message_bytes = 1024;
    let group = config.kafka_group_id.clone();
    let writer = RunningWriter::start(config).await?;
    eventually(Duration::from_secs(60), "one stored, one dead-lettered", || async {
        let (_, body) = http_get(writer.metrics_addr, "/metrics").await?;
        let dead = metric_value(&body, "storage_writer_dead_lettered_total{reason=\"too_large\"}") == Some(1.0);
        Ok((dead && writer.processed().await? == 1.0).then_some(()))
    })
    .await?;
    writer.stop().await?;

    // The fix: a higher limit. Then the dead letters go back to the topic.
    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.kafka_group_id = group;
    let writer = RunningWriter::start(config).await?;
    let replay_group = unique("replay");
    let replay = |group: String| {
        let (dlq_topic, topic) = (dlq_topic.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            cli()?
                .args(["replay-dlq", "--from", &dlq_topic, "--to", &topic, "--group", &group])
                .output()
                .map_err(anyhow::Error::from)
        })
    };
    let output = replay(replay_group.clone()).await??;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(progress.contains("1 / 1 records replayed in"), "{progress}");
    eventually(Duration::from_secs(60), "the large message stored", || async {
        let mut db = database.connect().await?;
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages WHERE message_id = 'large'").fetch_one(&mut db).await?;
        Ok((stored == 1).then_some(()))
    })
    .await?;
    // The same group does not send it twice.
    let again = replay(replay_group).await??;
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(stdout.contains("nothing to replay"), "{stdout}");

    writer.stop().await?;
    database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_traffic_mixes_direct_and_group_sessions() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 4).await?;
    let tenant = unique("acme");
    let output = tokio::task::spawn_blocking({
        let (topic, tenant) = (topic.clone(), tenant.clone());
        move || {
            cli()?
                .args(["produce", "--topic", &topic, "--tenant", &tenant, "--messages", "300", "--rate", "0"])
                .args(["--direct", "20", "--groups", "5"])
                .output()
                .map_err(anyhow::Error::from)
        }
    })
    .await??;
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{progress}");
    assert!(progress.contains("300 / 300 messages produced in"), "{progress}");
    let writer = RunningWriter::start(writer_config(&database.url, &topic, &dlq_topic)).await?;
    writer.wait_processed(300).await?;
    let mut db = database.connect().await?;
    let (sessions, groups, chinese, max_receivers): (i64, i64, i64, i32) = sqlx::query_as(
        r#"SELECT count(DISTINCT m.session_id), count(DISTINCT m.session_id) FILTER (WHERE session_type = 'group'),
                  count(*) FILTER (WHERE s.normal_text ~ '[一-龥]'), max(cardinality(receiver_ids))
           FROM messages m LEFT JOIN message_search s USING (tenant_id, message_id) WHERE m.tenant_id = $1"#,
    )
    .bind(&tenant)
    .fetch_one(&mut db)
    .await?;
    assert!(sessions > 10 && groups >= 1, "{sessions} sessions, {groups} groups");
    assert!(chinese > 0 && chinese < 300, "a mix of Chinese and English: {chinese} of 300 with Chinese");
    assert!(max_receivers >= 4, "groups have at least five members");
    writer.stop().await?;
    database.drop().await?;
    Ok(())
}
