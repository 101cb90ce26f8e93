//! Nothing lost, nothing duplicated, while writer processes are killed with SIGKILL at random
//! moments during a stream, while two writers share a group and one of them dies, and while
//! Redis, PostgreSQL or the MongoDB server go away mid-stream. Every stream carries 1% poison
//! records, each of which must end in the dead-letter topic and nowhere else.
//!
//! The defaults keep CI short; the full run of the reliability suite sets
//! `RELIABILITY_MESSAGES=100000 RELIABILITY_KILLS=10` (see docs/RELIABILITY.md).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    Message, MessageContent, StoreMessageRequest, TextContent, message_content,
};
use flare_storage_e2e::*;
use rdkafka::producer::FutureRecord;

const PARTITIONS: i32 = 8;
const SESSIONS: usize = 200;

/// Records above this size are dead-lettered by the writers of these tests.
const MAX_MESSAGE_BYTES: usize = 4_096;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// One record in a hundred is poison.
fn is_poison(index: usize) -> bool {
    index % 100 == 50
}

/// How many of the first `sent` records are valid messages.
fn valid(sent: usize) -> usize {
    (0..sent).filter(|index| !is_poison(*index)).count()
}

/// The record value of poison record `index`, unique per index, of four kinds in turn: bytes
/// that are not protobuf, a message without an id, a payload over the size limit, an id over
/// 64 bytes.
fn poison(index: usize, session: &str, tenant: &str) -> Vec<u8> {
    let request = |id: String, text: String| StoreMessageRequest {
        session_id: session.to_owned(),
        message: Some(Message {
            id,
            sender_id: format!("poison-{index}"),
            content: Some(MessageContent {
                content: Some(message_content::Content::Text(TextContent { text, ..Default::default() })),
            }),
            ..Default::default()
        }),
        tenant: Some(TenantContext { tenant_id: tenant.to_owned(), ..Default::default() }),
        ..Default::default()
    };
    match (index / 100) % 4 {
        // 0xff 0xff 0x7f: a field key whose wire type is 7, which does not exist.
        0 => [&[0xff, 0xff, 0x7f][..], format!("garbage {index}").as_bytes()].concat(),
        1 => request(String::new(), String::new()).encode_to_vec(),
        2 => request(format!("p{index}"), "x".repeat(MAX_MESSAGE_BYTES)).encode_to_vec(),
        _ => request(format!("{index}-{}", "x".repeat(64)), String::new()).encode_to_vec(),
    }
}

struct Stream {
    database: TestDatabase,
    topic: String,
    dlq_topic: String,
    ack_topic: String,
    group: String,
    tenant: String,
    /// The writers' Redis, whose hot windows the reconciliation checks.
    redis: String,
    /// Partitions of each of the stream's topics.
    partitions: i32,
}

impl Stream {
    async fn new() -> anyhow::Result<Self> {
        Self::on(&postgres_url()).await
    }

    /// A stream whose database lives on the Postgres server of `admin_url`.
    async fn on(admin_url: &str) -> anyhow::Result<Self> {
        Self::over(admin_url, PARTITIONS).await
    }

    /// A stream over a topic of `partitions` partitions.
    async fn over(admin_url: &str, partitions: i32) -> anyhow::Result<Self> {
        let stream = Self {
            database: TestDatabase::create_on(admin_url).await?,
            topic: unique("messages"),
            dlq_topic: unique("dlq"),
            ack_topic: unique("acks"),
            group: unique("group"),
            tenant: unique("acme"),
            redis: redis_url(),
            partitions,
        };
        create_topics(&[&stream.topic, &stream.dlq_topic, &stream.ack_topic], partitions).await?;
        // Migrate before the first writer, so a kill during its start cannot race a migration.
        let migrated =
            Command::new(binary("flare-storage")?).arg("migrate").env("POSTGRES_URL", &stream.database.url).output()?;
        anyhow::ensure!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
        Ok(stream)
    }

    fn writer(&self) -> anyhow::Result<Child> {
        Ok(self.writer_command()?.spawn()?)
    }

    /// A writer of this stream's group, on the shared Redis, without MongoDB.
    fn writer_command(&self) -> anyhow::Result<Command> {
        let mut command = Command::new(writer_binary()?);
        command
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
            .env("KAFKA_TOPIC", &self.topic)
            .env("KAFKA_GROUP_ID", &self.group)
            .env("KAFKA_DLQ_TOPIC", &self.dlq_topic)
            .env("KAFKA_ACK_TOPIC", &self.ack_topic)
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("WRITER_MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES.to_string())
            .env("REDIS_URL", &self.redis)
            .env("POSTGRES_URL", &self.database.url)
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "error")
            .env_remove("MONGO_URL")
            .stdout(Stdio::null());
        Ok(command)
    }

    /// Produces `count` records over `SESSIONS` sessions at about `rate` per second: message
    /// `m<index>`, or poison where `is_poison(index)`.
    fn produce(&self, count: usize, rate: usize) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let (topic, tenant) = (self.topic.clone(), self.tenant.clone());
        tokio::spawn(async move {
            let producer = producer()?;
            let started = tokio::time::Instant::now();
            let base = chrono::Utc::now() - chrono::Duration::hours(1);
            let mut pending = Vec::new();
            for index in 0..count {
                let session = format!("s{}", index % SESSIONS);
                if is_poison(index) {
                    let payload = poison(index, &session, &tenant);
                    let record = FutureRecord::to(&topic).key(&session).payload(&payload);
                    pending.push(producer.send_result(record).map_err(|(error, _)| error)?);
                    continue;
                }
                let request = StoreMessageRequest {
                    session_id: session.clone(),
                    message: Some(Message {
                        id: format!("m{index}"),
                        sender_id: "a".into(),
                        receiver_id: "b".into(),
                        timestamp: Some(to_timestamp(base + chrono::Duration::milliseconds(index as i64))),
                        ..Default::default()
                    }),
                    tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
                    ..Default::default()
                };
                let payload = request.encode_to_vec();
                // Enqueue without waiting for each acknowledgement (linger would cap a
                // one-at-a-time producer far below the rate); confirm them in chunks.
                let record = FutureRecord::to(&topic).key(&session).payload(&payload);
                pending.push(producer.send_result(record).map_err(|(error, _)| error)?);
                if pending.len() >= 200 {
                    for delivery in futures::future::join_all(pending.drain(..)).await {
                        delivery?.map_err(|(error, _)| error)?;
                    }
                }
                let due = Duration::from_secs_f64((index + 1) as f64 / rate as f64);
                tokio::time::sleep_until(started + due).await;
            }
            for delivery in futures::future::join_all(pending).await {
                delivery?.map_err(|(error, _)| error)?;
            }
            anyhow::Ok(())
        })
    }

    async fn stored(&self) -> anyhow::Result<i64> {
        let mut db = self.database.connect().await?;
        Ok(sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?)
    }

    /// Waits (a minute at most) for the last ACKs and cache writes to land and the reconciliation to
    /// come out clean; otherwise fails with the last reconciliation's figures.
    async fn reconciled(&self, sent: usize) -> anyhow::Result<String> {
        let clean = eventually(Duration::from_secs(60), "a clean reconciliation", || async {
            Ok(self.reconcile(sent).await.ok())
        })
        .await;
        match clean {
            Ok(report) => Ok(report),
            Err(_) => self.reconcile(sent).await,
        }
    }

    /// Checks the stores against what was sent: every valid message once, seqs 1..n per session
    /// in production order, every message ACKed as persisted, none as a duplicate; every poison
    /// record in the dead-letter topic with a reason, and nothing else there.
    async fn reconcile(&self, sent: usize) -> anyhow::Result<String> {
        let mut db = self.database.connect().await?;
        let rows: Vec<(String, String, Option<i64>)> =
            sqlx::query_as("SELECT session_id, message_id, seq FROM messages").fetch_all(&mut db).await?;
        let ids: HashSet<&str> = rows.iter().map(|(_, id, _)| id.as_str()).collect();
        let lost = (0..sent).filter(|index| !is_poison(*index) && !ids.contains(format!("m{index}").as_str())).count();
        let duplicated = rows.len() - ids.len();
        let mut by_session: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
        for (session, id, seq) in &rows {
            let index: usize = id.trim_start_matches('m').parse()?;
            by_session.entry(session.as_str()).or_default().push((index, seq.unwrap_or(0)));
        }
        let mut gaps = 0;
        for entries in by_session.values_mut() {
            entries.sort_unstable();
            for (position, (_, seq)) in entries.iter().enumerate() {
                if *seq != position as i64 + 1 {
                    gaps += 1;
                }
            }
        }
        let acks = read_topic(&self.ack_topic, self.partitions, usize::MAX, Duration::from_secs(3)).await?;
        let mut acked = HashSet::new();
        let mut duplicate_acks = 0;
        for ack in &acks {
            let json = ack.json()?;
            match json["status"].as_str() {
                Some("persisted") => {
                    acked.insert(json["message_id"].as_str().unwrap_or_default().to_owned());
                }
                _ => duplicate_acks += 1,
            }
        }
        let poisons: HashSet<Vec<u8>> = (0..sent)
            .filter(|index| is_poison(*index))
            .map(|index| poison(index, &format!("s{}", index % SESSIONS), &self.tenant))
            .collect();
        let dead = read_topic(&self.dlq_topic, self.partitions, usize::MAX, Duration::from_secs(3)).await?;
        let dead_letters: HashSet<Vec<u8>> = dead.iter().filter_map(|record| record.payload.clone()).collect();
        let without_reason = dead.iter().filter(|record| record.header("flare-dlq-reason").is_none()).count();
        let not_dead_lettered = poisons.difference(&dead_letters).count();
        let wrongly_dead_lettered = dead_letters.difference(&poisons).count();
        let valid = valid(sent);
        let stored_seqs: HashMap<(&str, &str), i64> =
            rows.iter().map(|(session, id, seq)| ((session.as_str(), id.as_str()), seq.unwrap_or(0))).collect();
        let (cached, cache_faults) = self.check_hot_windows(&stored_seqs).await?;
        let report = format!(
            "sent {sent} ({valid} valid, {} poison), stored {}, lost {lost}, duplicated {duplicated}, \
             seq out of order {gaps}, acked {} of {valid} ({} ack records, {duplicate_acks} as duplicate), \
             dead-lettered {} of {} poison ({} dead-letter records, {without_reason} without reason, \
             {wrongly_dead_lettered} valid ones), hot windows: {cached} entries, {cache_faults} faults",
            poisons.len(),
            ids.len(),
            acked.len(),
            acks.len(),
            poisons.len() - not_dead_lettered,
            poisons.len(),
            dead.len(),
        );
        anyhow::ensure!(lost == 0 && duplicated == 0 && gaps == 0, "{report}");
        anyhow::ensure!(acked.len() == valid && duplicate_acks == 0, "{report}");
        anyhow::ensure!(not_dead_lettered == 0 && wrongly_dead_lettered == 0 && without_reason == 0, "{report}");
        anyhow::ensure!(cache_faults == 0, "{report}");
        Ok(report)
    }

    /// Checks every session's hot window against the stored seqs: each entry is a stored
    /// message with its stored seq and a body, and the entries are the session's newest
    /// messages, a run of consecutive seqs ending at the session's last. Returns the number of
    /// entries and of faults.
    async fn check_hot_windows(&self, stored: &HashMap<(&str, &str), i64>) -> anyhow::Result<(usize, usize)> {
        use flare_storage_common::redis_connection::{RedisConnection, RedisTarget, Timeouts};
        use redis::AsyncCommands as _;
        let timeouts = Timeouts { connect: Duration::from_secs(2), response: Duration::from_secs(5), retries: 2 };
        let mut redis =
            RedisConnection::connect(&RedisTarget::new(&self.redis, false), timeouts, Default::default()).await?;
        let mut last_seq: HashMap<&str, i64> = HashMap::new();
        for ((session, _), seq) in stored {
            let last = last_seq.entry(session).or_default();
            *last = (*last).max(*seq);
        }
        let (mut entries, mut faults) = (0, 0);
        for (session, last) in last_seq {
            let keys = flare_storage_common::keys::SessionKeys::new(&self.tenant, session);
            let window: Vec<(String, f64)> = redis.zrange_withscores(keys.hot_index(), 0, -1).await?;
            let bodies: Vec<String> = redis.hkeys(keys.hot_bodies()).await?;
            let bodies: HashSet<&str> = bodies.iter().map(String::as_str).collect();
            entries += window.len();
            for (position, (id, seq)) in window.iter().enumerate() {
                let expected = last - (window.len() - 1 - position) as i64;
                let right_seq = stored.get(&(session, id.as_str())) == Some(&(*seq as i64));
                if !right_seq || *seq as i64 != expected || !bodies.contains(id.as_str()) {
                    faults += 1;
                }
            }
        }
        Ok((entries, faults))
    }
}

fn kill_9(child: &mut Child) -> anyhow::Result<()> {
    child.kill()?; // SIGKILL
    child.wait()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_killed_at_random_moments_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let (sent, kills) = (setting("RELIABILITY_MESSAGES", 6_000), setting("RELIABILITY_KILLS", 3));
    let stream = Stream::new().await?;
    let producing = stream.produce(sent, setting("RELIABILITY_RATE", 2_000));
    // Deterministic "random" moments: 1.5 to 6 s after each start, so some kills land during
    // a group join, some mid-batch.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for kill in 0..kills {
        let mut writer = stream.writer()?;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let after = Duration::from_millis(1_500 + seed % 4_500);
        tokio::time::sleep(after).await;
        kill_9(&mut writer)?;
        eprintln!("kill {}: after {after:?}, {} stored", kill + 1, stream.stored().await?);
    }
    producing.await??;
    let mut writer = stream.writer()?;
    let budget = Duration::from_secs(60 + (sent / 500) as u64);
    eventually(budget, "every message stored", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    // Let the last ACKs and cache writes land, then stop gracefully.
    let report = stream.reconciled(sent).await?;
    Command::new("kill").arg("-TERM").arg(writer.id().to_string()).status()?;
    writer.wait()?;
    eprintln!("{kills} kills: {report}");
    stream.database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_writer_takes_over_the_partitions_of_a_killed_one() -> anyhow::Result<()> {
    let sent = setting("RELIABILITY_MESSAGES", 6_000) / 2;
    let stream = Stream::new().await?;
    let mut first = stream.writer()?;
    let mut second = stream.writer()?;
    let producing = stream.produce(sent, 1_000);
    // Both have joined and are working when one dies.
    eventually(Duration::from_secs(60), "work under way", || async {
        Ok((stream.stored().await? > (sent / 4) as i64).then_some(()))
    })
    .await?;
    kill_9(&mut first)?;
    producing.await??;
    eventually(Duration::from_secs(120), "every message stored by the survivor", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    let report = stream.reconciled(sent).await?;
    kill_9(&mut second)?;
    eprintln!("takeover: {report}");
    stream.database.drop().await?;
    Ok(())
}

/// Four writers share sixteen partitions; one is killed and another joins while records
/// flow, so the group rebalances twice under load. Nothing is lost or stored twice, each
/// session's seqs follow production order (a session's records are one partition's), and the
/// writer that joined took partitions and stored messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_writers_over_sixteen_partitions_ride_through_a_kill_and_a_join() -> anyhow::Result<()> {
    let sent = setting("RELIABILITY_MESSAGES", 6_000) / 2;
    let stream = Stream::over(&postgres_url(), 16).await?;
    let mut writers = (0..4).map(|_| stream.writer()).collect::<anyhow::Result<Vec<Child>>>()?;
    // Slow enough that records still flow after the join (a join takes Tansu seconds).
    let producing = stream.produce(sent, 150);
    eventually(Duration::from_secs(60), "the four at work", || async {
        Ok((stream.stored().await? > (sent / 5) as i64).then_some(()))
    })
    .await?;
    kill_9(&mut writers[0])?;
    eventually(Duration::from_secs(60), "the three at work", || async {
        Ok((stream.stored().await? > (sent / 2) as i64).then_some(()))
    })
    .await?;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let metrics_addr: std::net::SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    writers.push(stream.writer_command()?.env("METRICS_ADDR", metrics_addr.to_string()).spawn()?);
    let joined = eventually(Duration::from_secs(60), "the joining writer's first partitions", || async {
        let Ok((_, body)) = http_get(metrics_addr, "/metrics").await else { return Ok(None) };
        let assigned = metric_value(&body, "storage_writer_partitions_rebalanced_total{change=\"assigned\"}");
        Ok(assigned.filter(|&assigned| assigned > 0.0).map(|_| body))
    })
    .await;
    producing.await??;
    eventually(Duration::from_secs(120), "every message stored", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    let report = stream.reconciled(sent).await?;
    let (_, body) = http_get(metrics_addr, "/metrics").await?;
    for writer in writers.iter_mut().skip(1) {
        kill_9(writer)?;
    }
    joined?;
    let stored_by_newcomer = metric_value(&body, "storage_writer_messages_processed_total").unwrap_or(0.0)
        + metric_value(&body, "storage_writer_messages_duplicated_total").unwrap_or(0.0);
    assert!(stored_by_newcomer > 0.0, "the writer that joined stored nothing");
    eprintln!("four writers, one killed, one joined (it stored {stored_by_newcomer}): {report}");
    stream.database.drop().await?;
    Ok(())
}

/// A Redis server of this test's own, without persistence, so it can be killed and restarted
/// empty without disturbing other tests.
fn own_redis(port: u16) -> anyhow::Result<Child> {
    Ok(Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let sent = setting("RELIABILITY_MESSAGES", 6_000) / 2;
    let mut stream = Stream::new().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    stream.redis = format!("redis://127.0.0.1:{port}");
    let mut server = own_redis(port)?;
    let mut writer = stream.writer()?;
    let producing = stream.produce(sent, 1_000);
    eventually(Duration::from_secs(60), "work under way", || async {
        Ok((stream.stored().await? > (sent / 4) as i64).then_some(()))
    })
    .await?;

    // Redis dies and comes back empty: no windows, no seq counters, no remembered seqs.
    kill_9(&mut server)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut server = own_redis(port)?;
    let stored_at_restart = stream.stored().await?;

    producing.await??;
    eventually(Duration::from_secs(120), "every message stored", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    let report = stream.reconciled(sent).await?;
    kill_9(&mut writer)?;
    kill_9(&mut server)?;
    eprintln!("redis restarted empty at {stored_at_restart} stored: {report}");
    stream.database.drop().await?;
    Ok(())
}

/// A Redis Cluster master killed with SIGKILL mid-stream: a replica takes over its slots within
/// seconds, the writer rides through, and the stores reconcile, hot windows included. The
/// killed node is started again and rejoins as a replica, leaving the cluster whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_master_killed_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let sent = setting("RELIABILITY_MESSAGES", 6_000) / 2;
    let mut stream = Stream::new().await?;
    stream.redis = redis_cluster_url();
    let mut writer = stream.writer()?;
    let producing = stream.produce(sent, 1_000);
    eventually(Duration::from_secs(60), "work under way", || async {
        Ok((stream.stored().await? > (sent / 4) as i64).then_some(()))
    })
    .await?;

    let key = flare_storage_common::keys::SessionKeys::new(&stream.tenant, "s0").hot_index();
    let master = ClusterNode::master_of(&stream.redis, &key).await?;
    let mut restart = master.kill().await?;
    let stored_at_kill = stream.stored().await?;
    let promoted = eventually(Duration::from_secs(30), "a replica promoted", || async {
        let serving = ClusterNode::master_of(&stream.redis, &key).await.ok();
        Ok(serving.filter(|node| node.port != master.port).map(|node| node.port))
    })
    .await?;
    anyhow::ensure!(restart.status()?.success(), "restarting the killed node failed");

    producing.await??;
    eventually(Duration::from_secs(120), "every message stored", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    let report = stream.reconciled(sent).await?;
    eventually(Duration::from_secs(60), "the killed node back as a replica, the cluster whole", || async {
        let nodes = ClusterNode::list(&stream.redis).await.unwrap_or_default();
        let rejoined = nodes.iter().any(|node| node.port == master.port && node.flags.contains("slave"));
        Ok((rejoined && ClusterNode::whole(&stream.redis).await.unwrap_or(false)).then_some(()))
    })
    .await?;
    kill_9(&mut writer)?;
    eprintln!("master :{} killed at {stored_at_kill} stored, :{promoted} took over: {report}", master.port);
    stream.database.drop().await?;
    Ok(())
}

/// The hash slots of ten of the stream's sessions move to another master while records flow,
/// key batch by key batch (the steps of `redis-cli --cluster reshard`): the writer's calls meet
/// `ASK`, `TRYAGAIN` and then `MOVED`, and the stores reconcile, hot windows included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_slots_moving_mid_stream_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let sent = setting("RELIABILITY_MESSAGES", 6_000) / 2;
    let mut stream = Stream::new().await?;
    stream.redis = redis_cluster_url();
    eventually(Duration::from_secs(60), "a whole cluster", || async {
        Ok(ClusterNode::whole(&stream.redis).await?.then_some(()))
    })
    .await?;
    let mut writer = stream.writer()?;
    let producing = stream.produce(sent, 500);
    eventually(Duration::from_secs(60), "work under way", || async {
        Ok((stream.stored().await? > (sent / 10) as i64).then_some(()))
    })
    .await?;

    let masters: Vec<ClusterNode> =
        ClusterNode::list(&stream.redis).await?.into_iter().filter(|node| node.master).collect();
    let redirections = async || -> anyhow::Result<[u64; 3]> {
        let mut sum = [0; 3];
        for master in &masters {
            for (total, count) in sum.iter_mut().zip(master.redirections().await?) {
                *total += count;
            }
        }
        Ok(sum)
    };
    let before = redirections().await?;
    let mut moved_keys = 0;
    for session in 0..10 {
        let key = flare_storage_common::keys::SessionKeys::new(&stream.tenant, &format!("s{session}")).hot_index();
        let slot = ClusterNode::slot_of(&stream.redis, &key).await?;
        let owner = ClusterNode::master_of(&stream.redis, &key).await?;
        let target = masters
            .iter()
            .find(|master| master.port != owner.port)
            .ok_or_else(|| anyhow::anyhow!("a second master"))?;
        moved_keys += owner.migrate_slot(target, &masters, slot, 2, Duration::from_millis(20)).await?;
        // Replicas learn the new owner by gossip.
        eventually(Duration::from_secs(10), &format!("slot {slot} served by :{}", target.port), || async {
            let now = ClusterNode::master_of(&stream.redis, &key).await.ok();
            Ok(now.filter(|node| node.port == target.port).map(|_| ()))
        })
        .await?;
    }
    let stored_after_moves = stream.stored().await?;
    anyhow::ensure!(stored_after_moves < valid(sent) as i64, "the stream ended before the slots moved");

    producing.await??;
    eventually(Duration::from_secs(120), "every message stored", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    let report = stream.reconciled(sent).await?;
    let after = redirections().await?;
    let [ask, moved, try_again] = [0, 1, 2].map(|kind| after[kind] - before[kind]);
    // The writer was sent elsewhere while the slots moved: the test went through the migration.
    anyhow::ensure!(ask + moved + try_again > 0, "no ASK, MOVED or TRYAGAIN was answered: {report}");
    kill_9(&mut writer)?;
    eprintln!(
        "10 slots moved ({moved_keys} keys) with {stored_after_moves} stored; \
         {ask} ASK, {moved} MOVED, {try_again} TRYAGAIN: {report}"
    );
    stream.database.drop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mongo_server_stopping_mid_stream_loses_nothing() -> anyhow::Result<()> {
    use futures::TryStreamExt as _;

    let sent = setting("RELIABILITY_MESSAGES", 6_000) / 4;
    let stream = Stream::new().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let directory = std::env::temp_dir().join(unique("mongo"));
    std::fs::create_dir_all(&directory)?;
    let mongo_url = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let mut server = own_mongo(port, &directory)?;
    eventually(Duration::from_secs(30), "the Mongo server", || async {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop))
    })
    .await?;
    let mut writer =
        stream.writer_command()?.env("MONGO_URL", &mongo_url).env("MONGO_DATABASE", "reliability").spawn()?;
    let producing = stream.produce(sent, 300);
    eventually(Duration::from_secs(60), "work under way", || async {
        Ok((stream.stored().await? > (sent / 4) as i64).then_some(()))
    })
    .await?;

    kill_9(&mut server)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut server = own_mongo(port, &directory)?;

    producing.await??;
    eventually(Duration::from_secs(120), "every message stored", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    let report = stream.reconciled(sent).await?;
    let client = mongodb::Client::with_uri_str(&mongo_url).await?;
    let collection = client.database("reliability").collection::<mongodb::bson::Document>("messages");
    let documents: Vec<mongodb::bson::Document> = collection.find(mongodb::bson::doc! {}).await?.try_collect().await?;
    let ids: HashSet<&str> = documents.iter().filter_map(|d| d.get_str("message_id").ok()).collect();
    assert_eq!((documents.len(), ids.len()), (valid(sent), valid(sent)), "MongoDB holds every message once");
    kill_9(&mut writer)?;
    kill_9(&mut server)?;
    std::fs::remove_dir_all(&directory)?;
    eprintln!("mongo stopped for 3 s mid-stream: {report}");
    stream.database.drop().await?;
    Ok(())
}

/// A PostgreSQL server of this test's own, from the machine's server binaries
/// (`FLARE_PG_BINDIR`, which `scripts/services.sh env` prints), so it can be stopped and
/// started without disturbing other tests. Removed on drop.
struct OwnPostgres {
    bindir: PathBuf,
    directory: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn create() -> anyhow::Result<Self> {
        let bindir = std::env::var("FLARE_PG_BINDIR").map_err(|_| {
            anyhow::anyhow!("FLARE_PG_BINDIR is not set: run scripts/services.sh up (it prints the server's binaries)")
        })?;
        let server = Self {
            bindir: bindir.into(),
            directory: std::env::temp_dir().join(unique("pg")),
            port: std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port(),
        };
        std::fs::create_dir_all(&server.directory)?;
        if running_as_root()? {
            // The server refuses to run as root; its files belong to the postgres account.
            let owned = Command::new("chown").arg("postgres:").arg(&server.directory).status()?;
            anyhow::ensure!(owned.success(), "chown of {} failed", server.directory.display());
        }
        let data = server.directory.join("data");
        server.run("initdb", &["-A", "trust", "-U", "postgres", "--no-sync", "-D", &data.to_string_lossy()])?;
        server.start()?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=100",
            self.port,
            self.directory.display()
        );
        let data = self.directory.join("data");
        let log = self.directory.join("server.log");
        self.run(
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-l", &log.to_string_lossy(), "-o", &options, "-w", "start"],
        )
    }

    /// Stops the server the hard way: every backend quits at once, open transactions abort and
    /// the next start recovers from the WAL.
    fn stop(&self) -> anyhow::Result<()> {
        let data = self.directory.join("data");
        self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"])
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let path = self.bindir.join(program);
        let mut command = if running_as_root()? {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&path);
            command
        } else {
            Command::new(&path)
        };
        let output = command.args(args).stdin(Stdio::null()).output()?;
        anyhow::ensure!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

fn running_as_root() -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_twelve_seconds_mid_stream_loses_nothing() -> anyhow::Result<()> {
    let sent = setting("RELIABILITY_MESSAGES", 6_000) / 2;
    let postgres = OwnPostgres::create()?;
    let stream = Stream::on(&postgres.url()).await?;
    let mut writer = stream.writer()?;
    // A stream of about 20 s, so records keep arriving while the database is away.
    let producing = stream.produce(sent, sent / 20);
    eventually(Duration::from_secs(60), "work under way", || async {
        Ok((stream.stored().await? > (valid(sent) / 4) as i64).then_some(()))
    })
    .await?;

    let stored_at_stop = stream.stored().await?;
    postgres.stop()?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    postgres.start()?;
    let restarted = tokio::time::Instant::now();
    let stored_at_restart = stream.stored().await?;

    producing.await??;
    eventually(Duration::from_secs(120), "every message stored", || async {
        Ok((stream.stored().await? >= valid(sent) as i64).then_some(()))
    })
    .await?;
    let drained = restarted.elapsed();
    let report = stream.reconciled(sent).await?;
    kill_9(&mut writer)?;
    eprintln!(
        "postgres stopped 12 s at {stored_at_stop} stored ({stored_at_restart} at restart), \
         lag drained {drained:.1?} after restart: {report}"
    );
    stream.database.drop().await?;
    Ok(())
}
