//! Monitoring as code: the alert rules pass `promtool`, the Prometheus Operator's rule is the
//! same rules, and every metric the dashboard and the rules name is one a running writer or
//! reader exports (scraped here, after real traffic).

use std::collections::BTreeSet;
use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    Message, MessageContent, QueryMessagesRequest, StoreMessageRequest, TextContent, message_content,
};
use flare_storage_e2e::*;

fn repository() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(repository().join(path))?)
}

#[test]
fn alert_rules_pass_promtool_and_the_operator_rule_holds_the_same_groups() -> anyhow::Result<()> {
    let rules = repository().join("deploy/prometheus/alerts.yml");
    // Debian's `prometheus` package; scripts/services.sh installs it.
    let checked = std::process::Command::new("promtool").arg("check").arg("rules").arg(&rules).output();
    let checked =
        checked.map_err(|error| anyhow::anyhow!("promtool not found ({error}); run scripts/services.sh up"))?;
    let report = format!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
    assert!(checked.status.success(), "{report}");
    assert!(report.contains("SUCCESS"), "{report}");

    let alerts: serde_norway::Value = serde_norway::from_str(&read("deploy/prometheus/alerts.yml")?)?;
    let operator: serde_norway::Value = serde_norway::from_str(&read("deploy/k8s/monitoring/prometheusrule.yaml")?)?;
    assert_eq!(operator["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(operator["spec"]["groups"], alerts["groups"], "the PrometheusRule must hold alerts.yml's groups");
    let names: Vec<&str> = alerts["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_sequence().into_iter().flatten())
        .filter_map(|rule| rule["alert"].as_str())
        .collect();
    for wanted in ["Lag", "DeadLetters", "StageErrors", "NotReady", "LatencyHigh", "CacheHitRate"] {
        assert!(names.iter().any(|name| name.contains(wanted)), "no alert about {wanted}: {names:?}");
    }
    Ok(())
}

/// Metric names in a dashboard or rules file: `storage_…` and `process_…` words, with a
/// histogram's `_bucket`/`_sum`/`_count` series named by the histogram.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("storage_") || word.starts_with("process_") {
            names.insert(word.to_owned());
        }
    }
    names
}

fn exported(scrape: &str, name: &str) -> bool {
    let family = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name);
    scrape.lines().any(|line| {
        line.strip_prefix("# TYPE ")
            .and_then(|rest| rest.split(' ').next())
            .is_some_and(|exported| exported == name || (exported == family && line.ends_with(" histogram")))
    })
}

fn text_message(tenant: &str, id: &str) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: "s".into(),
        message: Some(Message {
            id: id.into(),
            sender_id: "alice".into(),
            receiver_id: "bob".into(),
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent {
                    text: "周五的会议改到下午三点".into(),
                    mentions: vec![],
                })),
            }),
            timestamp: Some(to_timestamp(chrono::Utc::now())),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.into(), ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_name_is_exported() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let mongo_database = unique("monitoring");
    let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
    create_topics(&[&topic, &dlq_topic], 2).await?;
    let tenant = unique("acme");
    let producer = producer()?;
    for index in 0..5 {
        produce_message(&producer, &topic, &text_message(&tenant, &format!("m{index}"))).await?;
    }
    produce(&producer, &topic, "s", b"not a StoreMessageRequest").await?;

    let mut config = writer_config(&database.url, &topic, &dlq_topic);
    config.mongo = Some(flare_storage_writer::MongoConfig {
        url: mongo_url(),
        database: mongo_database.clone(),
        collection: "messages".into(),
    });
    let writer = RunningWriter::start(config).await?;
    writer.wait_processed(5).await?;
    let reader = RunningReader::start_configured(&database.url, Some(redis_url()), |config| {
        config.mongo = Some(flare_storage_reader::MongoConfig {
            url: mongo_url(),
            database: mongo_database.clone(),
            collection: "messages".into(),
        });
    })
    .await?;
    let mut client = reader.client().await?;
    for _ in 0..2 {
        client
            .query_messages(QueryMessagesRequest {
                session_id: "s".into(),
                tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
                ..Default::default()
            })
            .await?;
    }

    // The lag comes with librdkafka's statistics, every few seconds.
    let scrape = eventually(Duration::from_secs(30), "the writer's consumer lag", || async {
        let (_, body) = http_get(writer.metrics_addr, "/metrics").await?;
        Ok(body.contains("storage_writer_consumer_lag_messages{").then_some(body))
    })
    .await?;
    let (_, reader_scrape) = http_get(reader.metrics_addr, "/metrics").await?;
    let scrape = format!("{scrape}\n{reader_scrape}");

    let dashboard = read("deploy/grafana/flare-storage.json")?;
    let rules = read("deploy/prometheus/alerts.yml")?;
    let named = metric_names(&dashboard).into_iter().chain(metric_names(&rules)).collect::<BTreeSet<_>>();
    assert!(named.len() > 20, "the dashboard and rules name {} metrics", named.len());
    let missing: Vec<&String> = named.iter().filter(|name| !exported(&scrape, name)).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}");

    // What the new figures say after this traffic.
    let lag: f64 = (0..2)
        .filter_map(|partition| {
            metric_value(&scrape, &format!("storage_writer_consumer_lag_messages{{partition=\"{partition}\"}}"))
        })
        .sum();
    assert_eq!(lag, 0.0, "all six records are done and committed");
    assert_eq!(metric_value(&scrape, "storage_writer_end_to_end_latency_seconds_count"), Some(5.0));
    assert_eq!(metric_value(&scrape, "storage_writer_ready"), Some(1.0));
    assert_eq!(metric_value(&scrape, "storage_reader_ready"), Some(1.0));
    assert_eq!(metric_value(&scrape, "storage_writer_pool_max_connections{pool=\"postgres\"}"), Some(4.0));
    assert!(metric_value(&scrape, "storage_writer_pool_max_connections{pool=\"mongodb\"}").is_some());
    assert!(metric_value(&scrape, "storage_reader_pool_connections{pool=\"postgres\",state=\"idle\"}").is_some());
    assert_eq!(metric_value(&scrape, "storage_writer_redis_in_flight_commands"), Some(0.0));
    assert!(metric_value(&scrape, "process_resident_memory_bytes").is_some_and(|bytes| bytes > 1e6));

    writer.stop().await?;
    reader.stop().await?;
    mongodb::Client::with_uri_str(mongo_url()).await?.database(&mongo_database).drop().await?;
    database.drop().await?;
    Ok(())
}
