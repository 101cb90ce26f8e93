//! The benchmark's traffic, deterministic for a seed: 70% one-to-one sessions and 30% groups
//! of 5–200 members, sessions drawn Zipf (s = 1) over a fixed population, text of 20–500 bytes
//! of which about 40% is Chinese.

use flare_storage_common::message::to_timestamp;
use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::{
    Message, MessageContent, MessageType, StoreMessageRequest, TextContent, message_content,
};

const CHINESE: [&str; 8] = [
    "你好，今天的会议改到下午三点",
    "收到，我马上看一下",
    "这是一条测试消息",
    "周末一起去爬山吗？",
    "好的，不见不散",
    "谢谢！辛苦了",
    "文件已经发到群里了，请查收",
    "明天早上九点在公司门口集合",
];

const ENGLISH: [&str; 8] = [
    "Hi, are we still on for the review?",
    "Sure, I'll bring the latency numbers.",
    "Can you send me the deck before noon?",
    "The deploy went out, all green.",
    "Lunch at the usual place?",
    "Thanks, that fixed it.",
    "Running ten minutes late, sorry!",
    "Let's move the sync to Thursday.",
];

/// xorshift64*: small, fast and reproducible.
pub struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Workload {
    pub tenant: String,
    pub sessions: usize,
    /// Cumulative Zipf weights of session ranks 0..sessions.
    cumulative: Vec<f64>,
    random: Random,
    run: String,
    sequence: u64,
}

/// One generated record: its Kafka key (the session) and value.
pub struct Record {
    pub message_id: String,
    pub session_id: String,
    pub payload: Vec<u8>,
}

impl Workload {
    pub fn new(tenant: &str, sessions: usize, seed: u64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=sessions.max(1))
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect();
        Self {
            tenant: tenant.to_owned(),
            sessions: sessions.max(1),
            cumulative,
            random: Random::new(seed),
            run: format!("{seed:x}"),
            sequence: 0,
        }
    }

    /// The session of Zipf rank `rank`: a tenth of each ten ranks are groups, three of ten.
    pub fn session_id(rank: usize) -> String {
        if rank % 10 < 7 { format!("dm-{rank}") } else { format!("group-{rank}") }
    }

    /// The members of a session: two for a one-to-one session, 5–200 for a group.
    fn members(rank: usize) -> Vec<String> {
        if rank % 10 < 7 {
            return vec![format!("user-{}", 2 * rank), format!("user-{}", 2 * rank + 1)];
        }
        let size = 5 + (rank as u64 * 2_654_435_761 % 196) as usize;
        (0..size).map(|member| format!("user-{}", (rank * 37 + member * 101) % 100_000)).collect()
    }

    fn draw_rank(&mut self) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let target = self.random.unit() * total;
        self.cumulative.partition_point(|weight| *weight < target).min(self.sessions - 1)
    }

    /// Text of 20–500 bytes, Chinese about 40% of the time, cut on a character boundary.
    fn text(&mut self) -> String {
        let length = 20 + self.random.below(478) as usize;
        let phrases: &[&str] = if self.random.below(10) < 4 { &CHINESE } else { &ENGLISH };
        let mut text = String::with_capacity(length + 64);
        while text.len() < length {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(phrases[self.random.below(phrases.len() as u64) as usize]);
        }
        // Forward to a character boundary: at most three bytes past `length` (≤ 500).
        let mut end = length.min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        text.truncate(end);
        text
    }

    pub fn next_record(&mut self) -> Record {
        let rank = self.draw_rank();
        let session_id = Self::session_id(rank);
        let members = Self::members(rank);
        let sender = members[self.random.below(members.len() as u64) as usize].clone();
        let receivers: Vec<String> = members.iter().filter(|member| **member != sender).cloned().collect();
        let message_id = format!("b{}-{}", self.run, self.sequence);
        self.sequence += 1;
        let direct = members.len() == 2;
        let request = StoreMessageRequest {
            session_id: session_id.clone(),
            message: Some(Message {
                id: message_id.clone(),
                sender_id: sender,
                receiver_id: if direct { receivers[0].clone() } else { String::new() },
                receiver_ids: if direct { Vec::new() } else { receivers },
                session_type: if direct { "single".into() } else { "group".into() },
                message_type: MessageType::Text as i32,
                content: Some(MessageContent {
                    content: Some(message_content::Content::Text(TextContent { text: self.text(), mentions: vec![] })),
                }),
                timestamp: Some(to_timestamp(chrono::Utc::now())),
                ..Default::default()
            }),
            tenant: Some(TenantContext { tenant_id: self.tenant.clone(), ..Default::default() }),
            ..Default::default()
        };
        Record { message_id, session_id, payload: request.encode_to_vec() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_has_the_promised_shape() {
        let mut workload = Workload::new("t", 10_000, 7);
        let records: Vec<Record> = (0..20_000).map(|_| workload.next_record()).collect();
        let direct = records.iter().filter(|record| record.session_id.starts_with("dm-")).count();
        // Zipf favours low ranks, whose mix is 7 of 10 direct; allow for the skew.
        assert!((0.6..0.8).contains(&(direct as f64 / records.len() as f64)), "{direct}");
        let hottest = records.iter().filter(|record| record.session_id == "dm-0").count();
        assert!(hottest > records.len() / 20, "rank 0 is the hottest session: {hottest}");
        for record in &records {
            let request = StoreMessageRequest::decode(record.payload.as_slice()).expect("decodes");
            let message = request.message.expect("message");
            let Some(message_content::Content::Text(text)) = message.content.and_then(|content| content.content) else {
                panic!("text content");
            };
            assert!((20..=500).contains(&text.text.len()), "{}", text.text.len());
        }
        let mut again = Workload::new("t", 10_000, 7);
        assert_eq!(again.next_record().session_id, records[0].session_id, "deterministic");
    }
}
