//! `flare-storage produce`: realistic sample traffic for trying a deployment — one-to-one
//! sessions and groups, Chinese and English text of varied length — at a chosen rate.
//! Deterministic for a given `--seed`, so a run can be repeated.

use std::time::{Duration, Instant};

use flare_storage_common::message::to_timestamp;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    Message, MessageContent, MessageType, StoreMessageRequest, TextContent, message_content,
};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::progress::Progress;

pub struct Traffic {
    pub topic: String,
    pub tenant: String,
    /// One-to-one sessions.
    pub direct_sessions: u32,
    /// Group sessions (5 to 50 members each).
    pub group_sessions: u32,
    pub messages: u64,
    /// Messages per second; 0 = as fast as the broker takes them.
    pub rate: u64,
    pub seed: u64,
}

const PHRASES: [&str; 10] = [
    "你好，今天的会议改到下午三点",
    "收到，我马上看一下",
    "这是一条测试消息",
    "周末一起去爬山吗？",
    "Hi, are we still on for the review?",
    "Sure — I'll bring the latency numbers",
    "Can you send me the deck before noon?",
    "好的，不见不散",
    "The deploy went out, all green",
    "谢谢！",
];

/// xorshift64*: small, fast, and reproducible for sample data.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

async fn await_deliveries(pending: &mut Vec<DeliveryFuture>) -> anyhow::Result<()> {
    for delivery in futures::future::join_all(pending.drain(..)).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((error, _))) => return Err(error.into()),
            Err(_) => anyhow::bail!("the producer stopped before delivering"),
        }
    }
    Ok(())
}

pub async fn run(kafka: &str, traffic: Traffic) -> anyhow::Result<()> {
    anyhow::ensure!(traffic.direct_sessions + traffic.group_sessions > 0, "give at least one session");
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka).set("acks", "all").set("linger.ms", "5").create()?;
    let mut random = Random(traffic.seed.max(1));
    let run_id = chrono::Utc::now().timestamp_millis();
    let sessions = traffic.direct_sessions + traffic.group_sessions;
    let started = Instant::now();
    let mut progress = Progress::new("messages produced", Some(traffic.messages));
    let mut pending = Vec::new();
    for sequence in 0..traffic.messages {
        let session_index = random.below(u64::from(sessions)) as u32;
        let (session_id, members) = if session_index < traffic.direct_sessions {
            (
                format!("dm-{session_index}"),
                vec![format!("user-{}", 2 * session_index), format!("user-{}", 2 * session_index + 1)],
            )
        } else {
            let group = session_index - traffic.direct_sessions;
            let size = 5 + (u64::from(group) * 7919 % 46) as u32;
            (
                format!("group-{group}"),
                (0..size).map(|member| format!("user-{}", (group * 13 + member) % 10_000)).collect(),
            )
        };
        let sender = members[random.below(members.len() as u64) as usize].clone();
        let receivers: Vec<String> = members.iter().filter(|member| **member != sender).cloned().collect();
        let phrase = PHRASES[random.below(PHRASES.len() as u64) as usize];
        let repeat = 1 + random.below(4) as usize;
        let request = StoreMessageRequest {
            session_id: session_id.clone(),
            message: Some(Message {
                id: format!("sample-{run_id}-{sequence}"),
                sender_id: sender,
                receiver_id: if receivers.len() == 1 { receivers[0].clone() } else { String::new() },
                receiver_ids: receivers,
                session_type: if session_index < traffic.direct_sessions { "single".into() } else { "group".into() },
                message_type: MessageType::Text as i32,
                content: Some(MessageContent {
                    content: Some(message_content::Content::Text(TextContent {
                        text: vec![phrase; repeat].join(" "),
                        mentions: vec![],
                    })),
                }),
                timestamp: Some(to_timestamp(chrono::Utc::now())),
                ..Default::default()
            }),
            tenant: Some(TenantContext { tenant_id: traffic.tenant.clone(), ..Default::default() }),
            ..Default::default()
        };
        let payload = request.encode_to_vec();
        // Enqueue without waiting; wait for the broker's acknowledgements a thousand at a time
        // (or sooner when the local queue is full).
        loop {
            let record = FutureRecord::to(&traffic.topic).key(&session_id).payload(&payload);
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    let delivered = pending.len() as u64;
                    await_deliveries(&mut pending).await?;
                    progress.inc(delivered);
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
        if pending.len() >= 1000 {
            let delivered = pending.len() as u64;
            await_deliveries(&mut pending).await?;
            progress.inc(delivered);
        }
        if traffic.rate > 0 {
            // Keep to the rate: sleep until this message's slot.
            let due = Duration::from_secs_f64((sequence + 1) as f64 / traffic.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    let delivered = pending.len() as u64;
    await_deliveries(&mut pending).await?;
    progress.inc(delivered);
    progress.finish();
    eprintln!("to {} across {sessions} sessions (tenant {})", traffic.topic, traffic.tenant);
    Ok(())
}
