//! The benchmark's traffic, deterministic for a seed: 70% one-to-one sessions and 30% groups
//! of 5–200 members, sessions drawn Zipf (s = 1) over a fixed population — optionally with a
//! 5,000-member group taking a share of all messages — and text of 20–500 bytes of which
//! about 40% is Chinese.
//!
//! Text is natural by default: Chinese drawn Zipf (s = 1) over 3,000 CJK characters, other
//! text drawn Zipf over a 2,000-word vocabulary of pronounceable words (shorter words more
//! frequent, as in natural language), with punctuation. A text index costs what it costs on
//! that spread of characters and words; sixteen repeated phrases ([`TextMode::Phrases`], kept
//! to compare with earlier runs) make a trigram index look about three times cheaper.

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

/// How message text is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TextMode {
    /// Zipf over 3,000 CJK characters and a 2,000-word vocabulary.
    Natural,
    /// Sixteen fixed phrases (the benchmark's text before natural text).
    Phrases,
}

/// The id and members of the large group (`Workload::with_big_group`).
pub const BIG_GROUP: &str = "group-big";
pub const BIG_GROUP_MEMBERS: usize = 5_000;

pub struct Workload {
    pub tenant: String,
    /// Cumulative Zipf weights of session ranks 0..sessions.
    cumulative: Vec<f64>,
    random: Random,
    run: String,
    sequence: u64,
    text: TextMode,
    vocabulary: Vocabulary,
    /// Share of messages sent to the 5,000-member group.
    big_group_share: f64,
}

/// What natural text is drawn from: characters and words with cumulative Zipf weights.
struct Vocabulary {
    characters: Vec<char>,
    character_weights: Vec<f64>,
    words: Vec<String>,
    word_weights: Vec<f64>,
}

impl Vocabulary {
    fn new(random: &mut Random) -> Self {
        // 3,000 distinct characters of the CJK Unified Ideographs block (U+4E00–U+9FA5),
        // picked and ranked by a seeded shuffle.
        let mut block: Vec<char> = (0x4E00..=0x9FA5).filter_map(char::from_u32).collect();
        for index in (1..block.len()).rev() {
            block.swap(index, random.below(index as u64 + 1) as usize);
        }
        block.truncate(3_000);
        // 2,000 distinct pronounceable words; frequent ranks get fewer syllables.
        const ONSETS: [&str; 24] = [
            "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "ch", "sh",
            "th", "st", "tr",
        ];
        const VOWELS: [&str; 9] = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "oo"];
        const CODAS: [&str; 9] = ["", "", "n", "r", "s", "t", "l", "nd", "ng"];
        let mut words = Vec::with_capacity(2_000);
        let mut seen = std::collections::HashSet::new();
        while words.len() < 2_000 {
            let syllables = 1 + (words.len() / 400).min(2) + random.below(2) as usize;
            let mut word = String::new();
            for _ in 0..syllables {
                word.push_str(ONSETS[random.below(ONSETS.len() as u64) as usize]);
                word.push_str(VOWELS[random.below(VOWELS.len() as u64) as usize]);
                word.push_str(CODAS[random.below(CODAS.len() as u64) as usize]);
            }
            if seen.insert(word.clone()) {
                words.push(word);
            }
        }
        Self { character_weights: zipf(block.len()), characters: block, word_weights: zipf(words.len()), words }
    }

    fn character(&self, random: &mut Random) -> char {
        self.characters[draw(&self.character_weights, random)]
    }

    fn word(&self, random: &mut Random) -> &str {
        &self.words[draw(&self.word_weights, random)]
    }
}

/// Cumulative Zipf (s = 1) weights of ranks 0..count.
pub fn zipf(count: usize) -> Vec<f64> {
    let mut total = 0.0;
    (1..=count.max(1))
        .map(|rank| {
            total += 1.0 / rank as f64;
            total
        })
        .collect()
}

/// A rank drawn by cumulative weights.
pub fn draw(cumulative: &[f64], random: &mut Random) -> usize {
    let total = cumulative.last().copied().unwrap_or(1.0);
    let target = random.unit() * total;
    cumulative.partition_point(|weight| *weight < target).min(cumulative.len().saturating_sub(1))
}

/// One generated record: its Kafka key (the session) and value.
pub struct Record {
    pub message_id: String,
    pub session_id: String,
    pub payload: Vec<u8>,
}

impl Workload {
    pub fn new(tenant: &str, sessions: usize, seed: u64) -> Self {
        let mut random = Random::new(seed);
        // The vocabulary is the same for every seed: runs differ in traffic, not in language.
        let vocabulary = Vocabulary::new(&mut Random::new(0x5eed));
        random.next();
        Self {
            tenant: tenant.to_owned(),
            cumulative: zipf(sessions),
            random,
            run: format!("{seed:x}"),
            sequence: 0,
            text: TextMode::Natural,
            vocabulary,
            big_group_share: 0.0,
        }
    }

    pub fn with_text(mut self, text: TextMode) -> Self {
        self.text = text;
        self
    }

    /// Sends `share` of all messages to one group of [`BIG_GROUP_MEMBERS`] members. Its
    /// messages name no receivers, as large groups' messages do (membership is kept apart).
    pub fn with_big_group(mut self, share: f64) -> Self {
        self.big_group_share = share.clamp(0.0, 1.0);
        self
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
        draw(&self.cumulative, &mut self.random)
    }

    /// Text of 20–500 bytes, Chinese about 40% of the time, cut on a character boundary.
    fn text(&mut self) -> String {
        let length = 20 + self.random.below(478) as usize;
        let chinese = self.random.below(10) < 4;
        let mut text = match self.text {
            TextMode::Phrases => self.phrases(length, chinese),
            TextMode::Natural if chinese => self.chinese(length),
            TextMode::Natural => self.words(length),
        };
        // Back to a character boundary at most 500 bytes long.
        let mut end = text.len().min(500);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text
    }

    /// Chinese of about `length` bytes: characters drawn Zipf-wise, a comma every few, a full
    /// stop or question mark at the end of each clause run.
    fn chinese(&mut self, length: usize) -> String {
        let mut text = String::with_capacity(length + 8);
        let mut clause = 0;
        while text.len() + 3 < length {
            text.push(self.vocabulary.character(&mut self.random));
            clause += 1;
            if clause > 4 && self.random.below(8) == 0 {
                text.push(if self.random.below(4) == 0 { '。' } else { '，' });
                clause = 0;
            }
        }
        text.push(if self.random.below(5) == 0 { '？' } else { '。' });
        text
    }

    /// Words of about `length` bytes, drawn Zipf-wise, in capitalised sentences.
    fn words(&mut self, length: usize) -> String {
        let mut text = String::with_capacity(length + 16);
        let mut sentence_start = true;
        while text.len() < length {
            if !text.is_empty() {
                text.push(' ');
            }
            let word = self.vocabulary.word(&mut self.random);
            if sentence_start {
                let mut characters = word.chars();
                if let Some(first) = characters.next() {
                    text.extend(first.to_uppercase());
                    text.push_str(characters.as_str());
                }
            } else {
                text.push_str(word);
            }
            sentence_start = self.random.below(9) == 0;
            if sentence_start {
                text.push(['.', '.', '?', '!'][self.random.below(4) as usize]);
            }
        }
        text
    }

    /// The sixteen fixed phrases, repeated up to `length` bytes.
    fn phrases(&mut self, length: usize, chinese: bool) -> String {
        let phrases: &[&str] = if chinese { &CHINESE } else { &ENGLISH };
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
        let big = self.big_group_share > 0.0 && self.random.unit() < self.big_group_share;
        let rank = self.draw_rank();
        let (session_id, members, sender) = if big {
            let sender = format!("user-{}", self.random.below(BIG_GROUP_MEMBERS as u64));
            (BIG_GROUP.to_owned(), Vec::new(), sender)
        } else {
            let members = Self::members(rank);
            let sender = members[self.random.below(members.len() as u64) as usize].clone();
            (Self::session_id(rank), members, sender)
        };
        let receivers: Vec<String> = members.iter().filter(|member| **member != sender).cloned().collect();
        let message_id = format!("b{}-{}", self.run, self.sequence);
        self.sequence += 1;
        let direct = members.len() == 2;
        let request = StoreMessageRequest {
            session_id: session_id.clone(),
            message: Some(Message {
                id: message_id.clone(),
                sender_id: sender,
                receiver_id: if direct { receivers.first().cloned().unwrap_or_default() } else { String::new() },
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

    fn texts_of(workload: &mut Workload, count: usize) -> Vec<String> {
        (0..count)
            .map(|_| {
                let record = workload.next_record();
                let request = StoreMessageRequest::decode(record.payload.as_slice()).expect("decodes");
                match request.message.and_then(|message| message.content).and_then(|content| content.content) {
                    Some(message_content::Content::Text(text)) => text.text,
                    _ => String::new(),
                }
            })
            .collect()
    }

    #[test]
    fn natural_text_spreads_over_thousands_of_characters_and_words() {
        let texts = texts_of(&mut Workload::new("t", 1_000, 3), 5_000);
        let characters: std::collections::HashSet<char> =
            texts.iter().flat_map(|text| text.chars()).filter(|c| ('\u{4E00}'..='\u{9FA5}').contains(c)).collect();
        let words: std::collections::HashSet<String> = texts
            .iter()
            .flat_map(|text| text.split(' ').map(|word| word.trim_matches(['.', '?', '!']).to_lowercase()))
            .filter(|word| word.is_ascii() && !word.is_empty())
            .collect();
        assert!(characters.len() > 2_000, "{} distinct CJK characters", characters.len());
        assert!(words.len() > 1_500, "{} distinct words", words.len());
        let phrases = texts_of(&mut Workload::new("t", 1_000, 3).with_text(TextMode::Phrases), 5_000);
        let phrase_characters: std::collections::HashSet<char> = phrases.iter().flat_map(|text| text.chars()).collect();
        assert!(phrase_characters.len() < 200, "the phrases use {} characters", phrase_characters.len());
    }

    #[test]
    fn the_big_group_takes_its_share() {
        let mut workload = Workload::new("t", 1_000, 5).with_big_group(0.1);
        let records: Vec<Record> = (0..10_000).map(|_| workload.next_record()).collect();
        let big = records.iter().filter(|record| record.session_id == BIG_GROUP).count();
        assert!((800..1_200).contains(&big), "{big} of 10000");
    }
}
