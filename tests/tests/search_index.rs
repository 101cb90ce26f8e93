//! The search index against the truth, over both databases: every answer to random substring
//! queries over a few thousand mixed-script messages is compared with a brute-force scan of the
//! same messages (every hit a true match, every true match found, in order, across pages);
//! the normal form's equalities; nothing gone is ever found, even while the index still holds
//! it; the indexer killed inside a batch catches up with nothing lost and nothing twice.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flare_storage_common::message::{searchable_content, to_timestamp};
use flare_storage_common::proto::common::{
    ActorContext, FilterExpression, FilterOperator, Pagination, RequestContext, SortDirection, SortExpression,
    TenantContext, TimeRange,
};
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::proto::storage::*;
use flare_storage_common::text_search::{ORDER_TERMS_VERSION, Terms, index_entry, normalize};
use flare_storage_common::tonic::Code;
use flare_storage_common::tonic::transport::Channel;
use flare_storage_e2e::*;
use mongodb::bson::{Document, doc};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

const PARTITIONS: i32 = 2;
/// Pages of one search the scan tests follow: a common text has thousands of matches.
const PAGES_FOLLOWED: usize = 8;

/// A writer and a reader (no Redis: every search goes to the database) on one store, with this
/// test's own topic, PostgreSQL database and MongoDB database.
struct Deployment {
    store: Store,
    database: TestDatabase,
    mongo_database: String,
    topic: String,
    /// None once stopped ([`Deployment::stop_writer`]).
    writer: Option<RunningWriter>,
    reader: RunningReader,
    stored: usize,
}

impl Deployment {
    async fn start(store: Store) -> anyhow::Result<Self> {
        let database = TestDatabase::create().await?;
        let mongo_database = unique("search");
        let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
        create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
        let mut writer = writer_config(&database.url, &topic, &dlq_topic);
        writer.batch_max_messages = 500;
        store.configure_writer(&mut writer, &mongo_database);
        let reader = RunningReader::start_configured(&database.url, None, |config| {
            store.configure_reader(config, &mongo_database);
        })
        .await?;
        Ok(Self {
            store,
            database,
            mongo_database,
            topic,
            writer: Some(RunningWriter::start(writer).await?),
            reader,
            stored: 0,
        })
    }

    /// Stores `requests` through Kafka and waits until they are stored and indexed.
    async fn store(&mut self, requests: &[StoreMessageRequest]) -> anyhow::Result<()> {
        let producer = producer()?;
        for chunk in requests.chunks(1_000) {
            futures::future::try_join_all(chunk.iter().map(|request| produce_message(&producer, &self.topic, request)))
                .await?;
        }
        self.stored += requests.len();
        let writer = self.writer.as_ref().ok_or_else(|| anyhow::anyhow!("the writer was stopped"))?;
        writer.wait_processed(self.stored).await
    }

    /// Stops the writer, and with it its search indexer, and waits until it has.
    async fn stop_writer(&mut self) -> anyhow::Result<()> {
        match self.writer.take() {
            Some(writer) => writer.stop().await,
            None => Ok(()),
        }
    }

    async fn mongo(&self) -> anyhow::Result<mongodb::Collection<Document>> {
        Ok(mongodb::Client::with_uri_str(mongo_url()).await?.database(&self.mongo_database).collection("messages"))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_writer().await?;
        self.reader.stop().await?;
        if self.store == Store::Mongo {
            mongodb::Client::with_uri_str(mongo_url()).await?.database(&self.mongo_database).drop().await?;
        }
        self.database.drop().await
    }
}

fn tenant(id: &str) -> Option<TenantContext> {
    Some(TenantContext { tenant_id: id.into(), ..Default::default() })
}

fn as_user(id: &str) -> Option<RequestContext> {
    Some(RequestContext {
        actor: Some(ActorContext { actor_id: id.into(), ..Default::default() }),
        ..Default::default()
    })
}

fn contains(text: &str) -> FilterExpression {
    FilterExpression { field: "content".into(), op: FilterOperator::Contains as i32, values: vec![text.into()] }
}

fn eq(field: &str, value: &str) -> FilterExpression {
    FilterExpression { field: field.into(), op: FilterOperator::Eq as i32, values: vec![value.into()] }
}

fn request(
    tenant_id: &str,
    session: &str,
    id: &str,
    sender: &str,
    content: message_content::Content,
    at: DateTime<Utc>,
) -> StoreMessageRequest {
    StoreMessageRequest {
        session_id: session.into(),
        message: Some(Message {
            id: id.into(),
            sender_id: sender.into(),
            receiver_id: if sender == "alice" { "bob".into() } else { "alice".into() },
            message_type: MessageType::Text as i32,
            content: Some(MessageContent { content: Some(content) }),
            timestamp: Some(to_timestamp(at)),
            ..Default::default()
        }),
        tenant: tenant(tenant_id),
        ..Default::default()
    }
}

fn text(text: &str) -> message_content::Content {
    message_content::Content::Text(TextContent { text: text.into(), mentions: vec![] })
}

/// Every page of a search, following its cursors: the messages in the order received.
async fn search_all(
    client: &mut StorageReaderServiceClient<Channel>,
    search: SearchMessagesRequest,
    page_size: i32,
) -> Result<Vec<Message>, flare_storage_common::tonic::Status> {
    let (found, complete) = search_pages(client, search, page_size, 1_000).await?;
    assert!(complete, "a search did not end in 1,000 pages");
    Ok(found)
}

/// The first `pages` pages of a search, following its cursors, and whether they were all.
async fn search_pages(
    client: &mut StorageReaderServiceClient<Channel>,
    mut search: SearchMessagesRequest,
    page_size: i32,
    pages: usize,
) -> Result<(Vec<Message>, bool), flare_storage_common::tonic::Status> {
    let mut found = Vec::new();
    let mut cursor = String::new();
    for _ in 0..pages {
        search.pagination = Some(Pagination { cursor: cursor.clone(), limit: page_size, ..Default::default() });
        let page = client.search_messages(search.clone()).await?.into_inner();
        assert!(
            page.messages.len() <= page_size as usize,
            "a page of {} for a limit of {page_size}",
            page.messages.len()
        );
        found.extend(page.messages);
        let pagination = page.pagination.unwrap_or_default();
        if !pagination.has_more {
            return Ok((found, true));
        }
        cursor = pagination.cursor;
    }
    Ok((found, false))
}

/// Pieces of mixed-script IM text: Chinese (a small alphabet, so substrings recur), Japanese,
/// Korean, Latin words in several cases and Unicode forms, Greek, digits, punctuation, emoji.
const HAN: &str = "的一是不了人我在有他这中大来上个们到说国和地也子时会议钱明天开下午三点";
const KANA: &str = "あいうえおかきくけこアイウエオカタナｶﾀﾅ";
const HANGUL: &str = "한국어안녕하세요회의";
const WORDS: [&str; 16] = [
    "hello",
    "Hello",
    "HELLO",
    "world",
    "café",
    "cafe\u{301}",
    "Straße",
    "STRASSE",
    "ＦＬＡＲＥ",
    "flare",
    "naïve",
    "ﬁle",
    "file",
    "ΣΊΣΥΦΟΣ",
    "meeting",
    "deploy",
];
const MARKS: [&str; 9] = ["😀", "！", "，", "。", "-", "_", "%", "?", "👍🏽"];

fn piece() -> impl Strategy<Value = String> {
    let chars = |set: &str| proptest::sample::select(set.chars().collect::<Vec<_>>());
    prop_oneof![
        4 => proptest::collection::vec(chars(HAN), 1..7).prop_map(|run| run.into_iter().collect::<String>()),
        1 => proptest::collection::vec(chars(KANA), 1..5).prop_map(|run| run.into_iter().collect::<String>()),
        1 => proptest::collection::vec(chars(HANGUL), 1..5).prop_map(|run| run.into_iter().collect::<String>()),
        3 => proptest::sample::select(WORDS.to_vec()).prop_map(str::to_owned),
        1 => "[0-9]{1,4}",
        1 => proptest::sample::select(MARKS.to_vec()).prop_map(str::to_owned),
    ]
}

fn message_text() -> impl Strategy<Value = String> {
    let separator = proptest::sample::select(vec!["", " ", " ", "，", ", "]);
    proptest::collection::vec((piece(), separator), 1..10)
        .prop_map(|pieces| pieces.into_iter().map(|(piece, separator)| piece + separator).collect())
}

/// A stored message as the oracle sees it.
#[derive(Debug, Clone)]
struct Known {
    id: String,
    session: String,
    sender: String,
    at: DateTime<Utc>,
    /// The searchable text in normal form; `None` for content nothing searches.
    normal: Option<String>,
}

/// `count` messages of `tenant_id`: text, with every tenth JSON and every twenty-third binary,
/// 80% in session s0 and 10% in each of s1 and s2; three share each second, so ties are broken
/// by id.
fn corpus(tenant_id: &str, id_prefix: &str, texts: &[String]) -> (Vec<StoreMessageRequest>, Vec<Known>) {
    // Whole milliseconds, which every store keeps exactly.
    let base = DateTime::from_timestamp_millis((Utc::now() - chrono::Duration::hours(3)).timestamp_millis())
        .unwrap_or_default();
    let mut requests = Vec::new();
    let mut known = Vec::new();
    for (index, body) in texts.iter().enumerate() {
        let content = match index {
            index if index % 23 == 5 => message_content::Content::Binary(body.clone().into_bytes()),
            index if index % 10 == 3 => {
                message_content::Content::Json(serde_json::json!({ "text": body, "n": index }).to_string())
            }
            _ => text(body),
        };
        let id = format!("{id_prefix}{index:05}");
        // One session holds most of the tenant's messages, as a busy group would.
        let session = match index % 10 {
            0..=7 => "s0".to_owned(),
            other => format!("s{}", other - 7),
        };
        let sender = if index % 3 == 0 { "alice" } else { "bob" };
        let at = base + chrono::Duration::milliseconds((index / 3) as i64 * 1_000);
        let wire = MessageContent { content: Some(content.clone()) };
        known.push(Known {
            id: id.clone(),
            session: session.clone(),
            sender: sender.into(),
            at,
            normal: searchable_content(&wire).map(normalize),
        });
        requests.push(request(tenant_id, &session, &id, sender, content, at));
    }
    (requests, known)
}

/// One random search: one or two substrings, maybe a filter, a direction and a page size.
#[derive(Debug, Clone)]
struct Case {
    texts: Vec<String>,
    filter: Filter,
    ascending: bool,
    page_size: i32,
}

#[derive(Debug, Clone)]
enum Filter {
    None,
    Session(String),
    Sender(String),
    /// Inclusive bounds, as `time_range` is.
    Time(DateTime<Utc>, DateTime<Utc>),
}

/// One or two substrings of one stored text (at character boundaries, 1–8 characters each),
/// upper-cased or made full-width at times, or a fresh piece that may match nothing.
fn query_texts(texts: Arc<Vec<String>>) -> impl Strategy<Value = Vec<String>> {
    let piece_of = (any::<prop::sample::Index>(), 1usize..9, 0u8..4);
    let drawn = (0..texts.len(), proptest::collection::vec(piece_of, 1..3)).prop_map(move |(message, pieces)| {
        let characters: Vec<char> = texts[message].chars().collect();
        pieces
            .into_iter()
            .map(|(start, length, variant)| {
                let start = start.index(characters.len());
                let end = (start + length).min(characters.len());
                let piece: String = characters[start..end].iter().collect();
                match variant {
                    0 => piece.to_uppercase(),
                    1 => piece.chars().map(full_width).collect(),
                    _ => piece,
                }
            })
            .collect()
    });
    prop_oneof![4 => drawn, 1 => piece().prop_map(|piece| vec![piece])]
}

/// The full-width form of printable ASCII, which NFKC maps back.
fn full_width(character: char) -> char {
    match character {
        '!'..='~' => char::from_u32(character as u32 + 0xFEE0).unwrap_or(character),
        other => other,
    }
}

fn case(texts: Arc<Vec<String>>, known: Arc<Vec<Known>>) -> impl Strategy<Value = Case> {
    let count = known.len();
    let filter = prop_oneof![
        5 => Just(Filter::None),
        1 => (0..3).prop_map(|session| Filter::Session(format!("s{session}"))),
        1 => proptest::sample::select(vec!["alice", "bob"]).prop_map(|sender| Filter::Sender(sender.into())),
        // Bounds on stored times, so inclusiveness is tried every time.
        1 => (0..count, 0..count).prop_map(move |(a, b)| Filter::Time(known[a.min(b)].at, known[a.max(b)].at)),
    ];
    (query_texts(texts), filter, any::<bool>(), proptest::sample::select(vec![7, 20, 50]))
        .prop_map(|(texts, filter, ascending, page_size)| Case { texts, filter, ascending, page_size })
}

/// What a brute-force scan of `known` answers to `case`, in order.
fn truth(known: &[Known], case: &Case) -> Vec<String> {
    let wanted: Vec<String> = case.texts.iter().map(|text| normalize(text)).collect();
    let mut hits: Vec<&Known> = known
        .iter()
        .filter(|message| {
            let Some(normal) = &message.normal else { return false };
            let filtered = match &case.filter {
                Filter::None => true,
                Filter::Session(session) => &message.session == session,
                Filter::Sender(sender) => &message.sender == sender,
                Filter::Time(from, to) => (*from..=*to).contains(&message.at),
            };
            filtered && wanted.iter().all(|text| normal.contains(text.as_str()))
        })
        .collect();
    hits.sort_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));
    if !case.ascending {
        hits.reverse();
    }
    hits.into_iter().map(|message| message.id.clone()).collect()
}

fn search_request(tenant_id: &str, case: &Case) -> SearchMessagesRequest {
    let mut filters: Vec<FilterExpression> = case.texts.iter().map(|text| contains(text)).collect();
    let mut time_range = None;
    match &case.filter {
        Filter::None => {}
        Filter::Session(session) => filters.push(eq("session_id", session)),
        Filter::Sender(sender) => filters.push(eq("sender_id", sender)),
        Filter::Time(from, to) => {
            time_range = Some(TimeRange { start_time: Some(to_timestamp(*from)), end_time: Some(to_timestamp(*to)) })
        }
    }
    let direction = if case.ascending { SortDirection::Asc } else { SortDirection::Desc };
    SearchMessagesRequest {
        tenant: tenant(tenant_id),
        filters,
        sort: vec![SortExpression { field: "timestamp".into(), direction: direction as i32 }],
        time_range,
        ..Default::default()
    }
}

/// Stores `messages` texts in one tenant (and the first tenth again in another), then checks
/// `cases` random searches against the scan.
async fn search_matches_the_scan(store: Store, messages: usize, cases: u32) -> anyhow::Result<()> {
    let mut deployment = Deployment::start(store).await?;
    let mut runner = TestRunner::deterministic();
    let texts: Vec<String> = proptest::collection::vec(message_text(), messages)
        .new_tree(&mut runner)
        .map_err(|error| anyhow::anyhow!("{error}"))?
        .current();
    let (acme, globex) = (unique("acme"), unique("globex"));
    let (mut requests, known) = corpus(&acme, "a", &texts);
    // The other tenant holds the same texts under other ids: none may ever be found.
    requests.extend(corpus(&globex, "g", &texts[..messages / 10]).0);
    let started = std::time::Instant::now();
    deployment.store(&requests).await?;
    eprintln!("{store:?}: {} messages stored and indexed in {:?}", requests.len(), started.elapsed());

    let client = deployment.reader.client().await?;
    let (texts, known) = (Arc::new(texts), Arc::new(known));
    let started = std::time::Instant::now();
    let (with_hits, paged) = run_cases(&client, &acme, &texts, &known, cases)
        .await
        .map_err(|failure| anyhow::anyhow!("{store:?}: {failure}"))?;
    eprintln!("{store:?}: {cases} searches in {:?}: {with_hits} with hits, {paged} over a page", started.elapsed());
    assert!(with_hits >= cases / 2 && paged >= cases / 8, "{with_hits} cases with hits, {paged} over a page");

    if store == Store::Postgres {
        // Entries written before order terms existed (terms_version 1, as after an upgrade)
        // are still found: their tenant is looked up without order terms. Marked as having
        // them, the same entries are missed by searches of three or more CJK characters.
        let mut db = deployment.database.connect().await?;
        let rewrite = async |db: &mut sqlx::PgConnection, version: i16| {
            sqlx::query(
                r#"UPDATE message_search SET terms_version = $2,
                       terms = ARRAY(SELECT t FROM unnest(terms) t WHERE t NOT LIKE E'\x1f%')
                   WHERE tenant_id = $1"#,
            )
            .bind(&acme)
            .bind(version)
            .execute(db)
            .await
        };
        rewrite(&mut db, 1).await?;
        run_cases(&client, &acme, &texts, &known, cases / 2)
            .await
            .map_err(|failure| anyhow::anyhow!("entries without order terms: {failure}"))?;
        rewrite(&mut db, ORDER_TERMS_VERSION).await?;
        let missed = run_cases(&client, &acme, &texts, &known, cases / 2).await;
        assert!(missed.is_err(), "entries said to have order terms that lack them are missed");
    }
    deployment.stop().await
}

/// Runs `cases` random searches of `tenant_id` against the scan of `known`; returns how many
/// had a hit and how many more hits than a page, or the first disagreement.
async fn run_cases(
    client: &StorageReaderServiceClient<Channel>,
    tenant_id: &str,
    texts: &Arc<Vec<String>>,
    known: &Arc<Vec<Known>>,
    cases: u32,
) -> Result<(u32, u32), String> {
    let handle = tokio::runtime::Handle::current();
    // Cases with a hit, and with more hits than one page: the generator must make both common.
    let (with_hits, paged) = (AtomicU32::new(0), AtomicU32::new(0));
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() },
        proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let outcome = runner.run(&case(Arc::clone(texts), Arc::clone(known)), |case| {
        let mut client = client.clone();
        let request = search_request(tenant_id, &case);
        let answer = tokio::task::block_in_place(|| {
            handle.block_on(search_pages(&mut client, request, case.page_size, PAGES_FOLLOWED))
        });
        if case.texts.iter().any(|text| normalize(text).is_empty()) {
            let code = answer.err().map(|status| status.code());
            prop_assert_eq!(code, Some(Code::InvalidArgument), "a text with an empty normal form");
            return Ok(());
        }
        let (found, complete) = answer.map_err(|status| TestCaseError::fail(format!("search failed: {status:?}")))?;
        let found: Vec<String> = found.into_iter().map(|message| message.id).collect();
        let mut truth = truth(known, &case);
        with_hits.fetch_add(u32::from(!truth.is_empty()), Ordering::Relaxed);
        paged.fetch_add(u32::from(truth.len() > case.page_size as usize), Ordering::Relaxed);
        // A search with more pages than followed is compared on the pages read: full ones.
        if !complete {
            prop_assert!(truth.len() > found.len(), "has_more, with {} matches all returned", truth.len());
            truth.truncate(PAGES_FOLLOWED * case.page_size as usize);
        }
        prop_assert_eq!(found, truth);
        Ok(())
    });
    outcome.map_err(|failure| failure.to_string())?;
    Ok((with_hits.into_inner(), paged.into_inner()))
}

/// Over 22,000 messages: more than PostgreSQL checks one by one (the newest 16,000 entries of
/// the tenant or a session), so rare texts are answered from the term index, tenant-wide and
/// in the large session s0 (17,600 messages), and in smaller sessions by the first step alone;
/// rare texts of three or more CJK characters mostly by their matches alone (`search_few`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_search_matches_a_brute_force_scan() -> anyhow::Result<()> {
    search_matches_the_scan(Store::Postgres, 22_000, 256).await
}

/// Fewer messages and cases: the MongoDB stand-in answers each search in tens of milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_search_matches_a_brute_force_scan() -> anyhow::Result<()> {
    search_matches_the_scan(Store::Mongo, 400, 64).await
}

/// Texts that are equal in the normal form (NFKC + case folding) find each other; texts that
/// differ in it (an accent) do not.
async fn normal_forms_find_each_other(store: Store) -> anyhow::Result<()> {
    let mut deployment = Deployment::start(store).await?;
    let acme = unique("acme");
    // 24 KB as sent; U+FDFA is 18 characters (33 bytes) in NFKC, so 264 KB in normal form.
    let long = format!("{} long message", "\u{fdfa}".repeat(8_000));
    let stored = [
        ("n0", "café au lait"),              // é precomposed (U+00E9)
        ("n1", "cafe\u{301} noir"),          // e + combining acute
        ("n2", "ＦＬＡＲＥ ｓｔｏｒａｇｅ"), // full-width Latin
        ("n3", "Straße"),                    // ß folds to ss
        ("n4", "ΣΊΣΥΦΟΣ"),                   // final sigma folds to σ
        ("n5", "ｶﾀｶﾅで書く"),                // half-width katakana
        ("n6", "한국어 회의"),               // precomposed Hangul
        ("n7", "the ﬁle is ready"),          // ligature ﬁ
        ("n8", "plain cafe"),                // no accent
        ("n9", &long),                       // over the limit in normal form only
    ];
    let base = Utc::now() - chrono::Duration::minutes(30);
    let requests: Vec<StoreMessageRequest> = stored
        .iter()
        .enumerate()
        .map(|(order, (id, body))| {
            request(&acme, "room", id, "alice", text(body), base + chrono::Duration::seconds(order as i64))
        })
        .collect();
    deployment.store(&requests).await?;

    let mut client = deployment.reader.client().await?;
    let expectations: [(&str, &[&str]); 18] = [
        ("café", &["n0", "n1"]),
        ("cafe\u{301}", &["n0", "n1"]),
        ("CAFÉ", &["n0", "n1"]),
        ("ＣＡＦＥ\u{301}", &["n0", "n1"]),
        ("cafe", &["n8"]),
        ("flare storage", &["n2"]),
        ("Flare", &["n2"]),
        ("STRASSE", &["n3"]),
        ("strasse", &["n3"]),
        ("σίσυφος", &["n4"]),
        ("カタカナ", &["n5"]),
        ("カ", &["n5"]),
        ("書", &["n5"]),
        ("\u{1112}\u{1161}\u{11AB}", &["n6"]), // 한 as conjoining jamo
        ("회의", &["n6"]),
        ("file", &["n7"]),
        ("FILE IS", &["n7"]),
        ("long message", &[]), // text_search::MAX_SEARCHABLE_BYTES, in both databases
    ];
    for (query, expected) in expectations {
        let found = search_all(
            &mut client,
            SearchMessagesRequest { tenant: tenant(&acme), filters: vec![contains(query)], ..Default::default() },
            20,
        )
        .await?;
        let mut ids: Vec<String> = found.into_iter().map(|message| message.id).collect();
        ids.sort();
        assert_eq!(ids, expected, "{store:?}: {query:?}");
    }
    deployment.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_normal_forms_find_each_other() -> anyhow::Result<()> {
    normal_forms_find_each_other(Store::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_normal_forms_find_each_other() -> anyhow::Result<()> {
    normal_forms_find_each_other(Store::Mongo).await
}

/// Deleted, recalled and burned messages are found by nobody, hidden and cleared ones not by
/// the user they are gone for — and still not after their search entries are put back, as an
/// indexer racing a command could leave them. Recalled and deleted text leaves the index.
async fn nothing_gone_is_found(store: Store) -> anyhow::Result<()> {
    let mut deployment = Deployment::start(store).await?;
    let acme = unique("acme");
    let now = Utc::now() - chrono::Duration::seconds(30);
    let message = |session: &str, id: &str, sender: &str, order: i64| {
        request(&acme, session, id, sender, text(&format!("钱会议 {id}")), now + chrono::Duration::milliseconds(order))
    };
    let mut burning = message("chat", "burned", "alice", 5);
    if let Some(message) = burning.message.as_mut() {
        message.is_burn_after_read = true;
        message.burn_after_seconds = 1;
    }
    deployment
        .store(&[
            message("old", "cleared", "alice", 0),
            message("chat", "deleted", "alice", 1),
            message("chat", "recalled", "alice", 2),
            message("chat", "hidden", "alice", 3),
            message("chat", "kept", "bob", 4),
            burning,
        ])
        .await?;
    let mut client = deployment.reader.client().await?;
    client
        .delete_message(DeleteMessageRequest {
            session_id: "chat".into(),
            message_ids: vec!["deleted".into()],
            context: as_user("alice"),
            tenant: tenant(&acme),
        })
        .await?;
    client
        .recall_message(RecallMessageRequest {
            message_id: "recalled".into(),
            operator_id: "alice".into(),
            tenant: tenant(&acme),
            ..Default::default()
        })
        .await?;
    client
        .delete_message_for_user(DeleteMessageForUserRequest {
            message_id: "hidden".into(),
            user_id: "bob".into(),
            tenant: tenant(&acme),
            ..Default::default()
        })
        .await?;
    client
        .clear_session(ClearSessionRequest {
            session_id: "old".into(),
            user_id: "bob".into(),
            clear_type: ClearType::ClearAll as i32,
            tenant: tenant(&acme),
            ..Default::default()
        })
        .await?;
    client
        .mark_message_read(MarkMessageReadRequest {
            message_id: "burned".into(),
            user_id: "bob".into(),
            tenant: tenant(&acme),
            ..Default::default()
        })
        .await?;
    // The burn takes effect one second after the read.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let found = async |client: &mut StorageReaderServiceClient<Channel>, user: &str, query: &str| {
        let search = SearchMessagesRequest {
            tenant: tenant(&acme),
            context: as_user(user),
            filters: vec![contains(query)],
            ..Default::default()
        };
        let mut ids: Vec<String> =
            search_all(client, search, 20).await?.into_iter().map(|message| message.id).collect::<Vec<_>>();
        ids.sort();
        anyhow::Ok(ids)
    };
    let check = async |client: &mut StorageReaderServiceClient<Channel>, when: &str| {
        for query in ["钱", "会议", "钱会议", "会议 "] {
            assert_eq!(
                found(client, "alice", query).await?,
                ["cleared", "hidden", "kept"],
                "{store:?} {when}: alice, {query:?}"
            );
            assert_eq!(found(client, "bob", query).await?, ["kept"], "{store:?} {when}: bob, {query:?}");
        }
        assert_eq!(found(client, "alice", "recalled").await?, Vec::<String>::new(), "{store:?} {when}");
        assert_eq!(found(client, "alice", "deleted").await?, Vec::<String>::new(), "{store:?} {when}");
        assert_eq!(found(client, "bob", "hidden").await?, Vec::<String>::new(), "{store:?} {when}");
        anyhow::Ok(())
    };
    check(&mut client, "after the commands").await?;

    // Recalled and deleted text has left the index; then every gone message gets its entry
    // back, as an indexer that read it just before the command could have written it.
    let gone = ["deleted", "recalled", "burned", "hidden", "cleared"];
    let entry = |id: &str, order| index_entry(&format!("钱会议 {id}"), order).expect("a short text has an entry");
    match store {
        Store::Postgres => {
            let mut db = deployment.database.connect().await?;
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM message_search WHERE message_id IN ('deleted', 'recalled')")
                    .fetch_one(&mut db)
                    .await?;
            assert_eq!(left, 0, "recalled and deleted text leaves message_search");
            for id in gone {
                let (normal, terms) = entry(id, Terms::Ordered);
                sqlx::query(
                    r#"INSERT INTO message_search (tenant_id, message_id, session_id, "timestamp", terms, normal_text, terms_version)
                       SELECT tenant_id, message_id, session_id, "timestamp", $3, $4, $5 FROM messages
                       WHERE tenant_id = $1 AND message_id = $2
                       ON CONFLICT DO NOTHING"#,
                )
                .bind(&acme)
                .bind(id)
                .bind(terms)
                .bind(normal)
                .bind(ORDER_TERMS_VERSION)
                .execute(&mut db)
                .await?;
            }
            let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM message_search WHERE tenant_id = $1")
                .bind(&acme)
                .fetch_one(&mut db)
                .await?;
            assert_eq!(entries, 6, "every message has a search entry again");
        }
        Store::Mongo => {
            let documents = deployment.mongo().await?;
            let recalled = documents
                .find_one(doc! { "message_id": "recalled" })
                .await?
                .ok_or_else(|| anyhow::anyhow!("no recalled document"))?;
            assert!(recalled.get_array("search_terms").map(|terms| terms.is_empty()).unwrap_or(true));
            assert!(recalled.get_str("search_text").is_err(), "recalled text leaves the document's search text");
            for id in gone {
                let (normal, terms) = entry(id, Terms::Plain);
                let updated = documents
                    .update_one(
                        doc! { "tenant_id": &acme, "message_id": id },
                        doc! { "$set": { "search_text": normal, "search_terms": terms } },
                    )
                    .await?;
                assert_eq!(updated.matched_count, 1, "{id} is still stored");
            }
        }
    }
    check(&mut client, "with every entry back").await?;
    deployment.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_finds_nothing_gone() -> anyhow::Result<()> {
    nothing_gone_is_found(Store::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_finds_nothing_gone() -> anyhow::Result<()> {
    nothing_gone_is_found(Store::Mongo).await
}

/// A text of three CJK characters with more matches than a search reads at random before it
/// checks the newest entries in time order (FEW_MATCHES in the reader, 200): every match is
/// still found, page by page, newest first, and no text holding its pairs in another order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_common_text_of_three_cjk_characters_is_found_page_by_page() -> anyhow::Result<()> {
    let mut deployment = Deployment::start(Store::Postgres).await?;
    let acme = unique("acme");
    let base = Utc::now() - chrono::Duration::minutes(30);
    let requests: Vec<StoreMessageRequest> = (0..900)
        .map(|index| {
            // Two in three hold the text; the others both its pairs, not in its order.
            let body = if index % 3 == 2 { format!("议室会议 {index}") } else { format!("开会议室 {index}") };
            request(
                &acme,
                "room",
                &format!("m{index:04}"),
                "alice",
                text(&body),
                base + chrono::Duration::seconds(index),
            )
        })
        .collect();
    deployment.store(&requests).await?;
    let mut client = deployment.reader.client().await?;
    let found = search_all(
        &mut client,
        SearchMessagesRequest { tenant: tenant(&acme), filters: vec![contains("会议室")], ..Default::default() },
        50,
    )
    .await?;
    let found: Vec<String> = found.into_iter().map(|message| message.id).collect();
    let expected: Vec<String> =
        (0..900).rev().filter(|index| index % 3 != 2).map(|index| format!("m{index:04}")).collect();
    assert_eq!(found.len(), 600);
    assert_eq!(found, expected);
    deployment.stop().await
}

/// An indexer of the version before order terms, still running during an upgrade, cannot
/// write an entry without them: its statement (as it was) fails and its batch stays queued.
/// Entries already there keep version 1 and are indexed by tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexer_of_the_earlier_version_writes_no_entry_without_order_terms() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    migrate_before(&database.url, "20261201000004").await?;
    let mut db = database.connect().await?;
    let earlier_insert = r#"INSERT INTO message_search (tenant_id, message_id, session_id, "timestamp", terms, normal_text)
        VALUES ($1, 'm1', 's', now(), ARRAY['会', '会议'], '会议')"#;
    sqlx::query(earlier_insert).bind("acme").execute(&mut db).await?;
    flare_storage_common::schema::migrate(&sqlx::PgPool::connect(&database.url).await?).await?;

    let refused = sqlx::query(earlier_insert).bind("globex").execute(&mut db).await;
    let code =
        refused.err().and_then(|error| error.as_database_error().and_then(|error| error.code()).map(String::from));
    assert_eq!(code.as_deref(), Some("23502"), "not null: terms_version");
    let without: Vec<(String, i16)> =
        sqlx::query_as("SELECT tenant_id, terms_version FROM message_search WHERE terms_version < 2")
            .fetch_all(&mut db)
            .await?;
    assert_eq!(without, [("acme".to_owned(), 1)]);
    database.drop().await
}

/// The writer process aborted inside the indexer's first batch (search rows written, not yet
/// committed): the batch goes back to the queue, and the next writer indexes every message
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_indexer_killed_mid_batch_catches_up() -> anyhow::Result<()> {
    const MESSAGES: usize = 2_500;
    let database = TestDatabase::create().await?;
    let (topic, dlq_topic, group) = (unique("messages"), unique("dlq"), unique("group"));
    create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
    let migrated = Command::new(binary("flare-storage")?).arg("migrate").env("POSTGRES_URL", &database.url).output()?;
    anyhow::ensure!(migrated.status.success(), "{}", String::from_utf8_lossy(&migrated.stderr));
    let acme = unique("acme");
    let base = Utc::now() - chrono::Duration::minutes(30);
    let producer = producer()?;
    let requests: Vec<StoreMessageRequest> = (0..MESSAGES)
        .map(|index| {
            // Every message carries one word no other has.
            let body = format!("会议 {} 钱", unique_word(index));
            let at = base + chrono::Duration::milliseconds(index as i64);
            request(&acme, &format!("s{}", index % 7), &format!("m{index:05}"), "alice", text(&body), at)
        })
        .collect();
    futures::future::try_join_all(requests.iter().map(|request| produce_message(&producer, &topic, request))).await?;
    let writer = |crash: bool| -> anyhow::Result<std::process::Child> {
        let mut command = writer_process(&topic, &dlq_topic, &group, &database.url, crash.then_some("search_index"))?;
        Ok(command.stderr(Stdio::null()).spawn()?)
    };
    let pool = sqlx::PgPool::connect(&database.url).await?;
    let count = async |sql: &str| -> anyhow::Result<i64> { Ok(sqlx::query_scalar(sql).fetch_one(&pool).await?) };

    let mut crashing = writer(true)?;
    let status = tokio::task::spawn_blocking(move || crashing.wait()).await??;
    assert!(!status.success(), "the writer aborted in the indexer: {status:?}");
    assert!(count("SELECT count(*) FROM messages").await? > 0, "messages were stored before the crash");
    assert_eq!(count("SELECT count(*) FROM message_search").await?, 0, "the aborted batch left no entry");
    assert!(count("SELECT count(*) FROM search_index_queue").await? > 0, "the aborted batch is back in the queue");

    let mut recovered = writer(false)?;
    let caught_up = eventually(Duration::from_secs(120), "every message stored and indexed", || async {
        let stored = count("SELECT count(*) FROM messages").await?;
        let queued = count("SELECT count(*) FROM search_index_queue").await?;
        Ok((stored == MESSAGES as i64 && queued == 0).then_some(()))
    })
    .await;
    Command::new("kill").arg("-TERM").arg(recovered.id().to_string()).status()?;
    tokio::task::spawn_blocking(move || recovered.wait()).await??;
    caught_up?;
    assert_eq!(count("SELECT count(*) FROM message_search").await?, MESSAGES as i64, "every message indexed");
    assert_eq!(count("SELECT count(DISTINCT message_id) FROM message_search").await?, MESSAGES as i64, "once");

    // Each message is found by its own word, and only it.
    let reader = RunningReader::start(&database.url).await?;
    let mut client = reader.client().await?;
    for index in (0..MESSAGES).step_by(97) {
        let search = SearchMessagesRequest {
            tenant: tenant(&acme),
            filters: vec![contains(&unique_word(index))],
            ..Default::default()
        };
        let ids: Vec<String> =
            search_all(&mut client, search, 20).await?.into_iter().map(|message| message.id).collect();
        assert_eq!(ids, [format!("m{index:05}")]);
    }
    let all = SearchMessagesRequest { tenant: tenant(&acme), filters: vec![contains("会议")], ..Default::default() };
    assert_eq!(search_all(&mut client, all, 200).await?.len(), MESSAGES);
    reader.stop().await?;
    pool.close().await;
    database.drop().await
}

/// The history queued by the search index's migration (`backfill`) waits while new messages
/// are queued: a batch takes new messages first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_messages_are_indexed_before_the_backfill() -> anyhow::Result<()> {
    let mut deployment = Deployment::start(Store::Postgres).await?;
    let acme = unique("acme");
    let at = Utc::now() - chrono::Duration::minutes(5);
    let requests: Vec<StoreMessageRequest> = (0..6)
        .map(|index| {
            let id = format!("m{index}");
            request(&acme, "room", &id, "alice", text(&format!("会议 {id}")), at + chrono::Duration::seconds(index))
        })
        .collect();
    deployment.store(&requests).await?;
    let url = deployment.database.url.clone();
    // No indexer runs from here on but the one called below.
    deployment.stop_writer().await?;
    let pool = sqlx::PgPool::connect(&url).await?;
    // m0–m3 stored before the search index (queued first, as the migration does); m4 and m5 new.
    sqlx::query("DELETE FROM message_search").execute(&pool).await?;
    sqlx::query(
        r#"INSERT INTO search_index_queue (tenant_id, message_id, "timestamp", backfill)
           SELECT tenant_id, message_id, "timestamp", message_id < 'm4' FROM messages ORDER BY message_id"#,
    )
    .execute(&pool)
    .await?;
    let metrics = flare_storage_writer::metrics::Metrics::new()?;
    let indexed = async || -> anyhow::Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT message_id FROM message_search ORDER BY message_id").fetch_all(&pool).await?)
    };
    assert_eq!(flare_storage_writer::search_index::index_batch(&pool, 3, &metrics, false).await?, 3);
    assert_eq!(indexed().await?, ["m0", "m4", "m5"], "both new messages, then the oldest of the backfill");
    assert_eq!(flare_storage_writer::search_index::index_batch(&pool, 10, &metrics, false).await?, 3);
    assert_eq!(indexed().await?, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(flare_storage_writer::search_index::index_batch(&pool, 10, &metrics, false).await?, 0);
    pool.close().await;
    deployment.stop().await
}

/// A word of letters only, different for every index and in no other: "q", the index in base
/// 16 with the digits a–p, then "zz".
fn unique_word(mut index: usize) -> String {
    let mut word = String::from("q");
    loop {
        word.push((b'a' + (index % 16) as u8) as char);
        index /= 16;
        if index == 0 {
            return word + "zz";
        }
    }
}

/// Documents stored by writers older than the search fields (they carried `text`) are found
/// once `flare-storage reindex-mongo` has run; a recalled one stays unfound, and one an older
/// reader recalled (leaving its search fields) loses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_documents_of_older_writers_are_reindexed() -> anyhow::Result<()> {
    let mut deployment = Deployment::start(Store::Mongo).await?;
    let acme = unique("acme");
    let at = Utc::now() - chrono::Duration::minutes(5);
    let json = message_content::Content::Json(r#"{"title":"季度会议纪要"}"#.into());
    deployment
        .store(&[
            request(&acme, "room", "text", "alice", text("明天的会议改到三点"), at),
            request(&acme, "room", "json", "alice", json, at + chrono::Duration::seconds(1)),
            request(&acme, "room", "recalled", "alice", text("会议取消了"), at + chrono::Duration::seconds(2)),
            request(&acme, "room", "recalled-later", "alice", text("会议推迟"), at + chrono::Duration::seconds(3)),
        ])
        .await?;
    let documents = deployment.mongo().await?;
    documents
        .update_many(
            doc! { "tenant_id": &acme, "message_id": { "$ne": "recalled-later" } },
            doc! { "$unset": { "search_text": "", "search_terms": "" }, "$set": { "text": "as older writers kept it" } },
        )
        .await?;
    // Recalled by an older reader: only the flag changes.
    documents
        .update_many(
            doc! { "tenant_id": &acme, "message_id": { "$in": ["recalled", "recalled-later"] } },
            doc! { "$set": { "is_recalled": true } },
        )
        .await?;
    let mut client = deployment.reader.client().await?;
    let search =
        || SearchMessagesRequest { tenant: tenant(&acme), filters: vec![contains("会议")], ..Default::default() };
    let before = search_all(&mut client, search(), 20).await?;
    assert!(before.is_empty(), "documents without search fields are not found, nor recalled ones: {before:?}");

    let reindex = || {
        Command::new(binary("flare-storage")?)
            .arg("reindex-mongo")
            .arg("--batch")
            .arg("2")
            .env("MONGO_URL", mongo_url())
            .env("MONGO_DATABASE", &deployment.mongo_database)
            .env("MONGO_COLLECTION", "messages")
            .output()
            .map_err(anyhow::Error::from)
    };
    let first = reindex()?;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), "search fields written on 4 documents");
    let mut ids: Vec<String> =
        search_all(&mut client, search(), 20).await?.into_iter().map(|message| message.id).collect();
    ids.sort();
    assert_eq!(ids, ["json", "text"]);
    let leftovers = documents.count_documents(doc! { "tenant_id": &acme, "text": { "$exists": true } }).await?;
    assert_eq!(leftovers, 0, "the older field is gone");
    let recalled_later = documents
        .find_one(doc! { "tenant_id": &acme, "message_id": "recalled-later" })
        .await?
        .ok_or_else(|| anyhow::anyhow!("no recalled-later document"))?;
    assert!(recalled_later.get_array("search_terms").is_ok_and(Vec::is_empty), "{recalled_later:?}");
    assert!(recalled_later.get_str("search_text").is_err(), "the recalled text left the document");
    let again = reindex()?;
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "search fields written on 0 documents");
    deployment.stop().await
}
