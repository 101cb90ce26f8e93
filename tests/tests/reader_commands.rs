//! The reader's commands against the real services, each checked through a reader that uses
//! the Redis hot window and one that reads the database only: what is gone for someone never
//! comes back for them, from either; who may do what; bad input names its field. Every test
//! runs twice: with Postgres as the only database, and with MongoDB as the only database.

use std::collections::HashMap;
use std::time::Duration;

use flare_storage_common::message::to_timestamp;
use flare_storage_common::proto::common::{
    ActorContext, ActorType, FilterExpression, FilterOperator, RequestContext, TenantContext,
};
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::proto::storage::*;
use flare_storage_common::tonic::transport::Channel;
use flare_storage_common::tonic::{Code, Request};
use flare_storage_e2e::*;

const PARTITIONS: i32 = 4;

type Client = StorageReaderServiceClient<Channel>;

/// `storage_reader_cache_lookups_total` of `reader` for `result` (`hit` or `miss`).
async fn cache_lookups(reader: &RunningReader, result: &str) -> anyhow::Result<f64> {
    let (_, body) = http_get(reader.metrics_addr, "/metrics").await?;
    Ok(metric_value(&body, &format!("storage_reader_cache_lookups_total{{result=\"{result}\"}}")).unwrap_or(0.0))
}

fn tenant(id: &str) -> Option<TenantContext> {
    Some(TenantContext { tenant_id: id.into(), ..Default::default() })
}

fn as_user(id: &str) -> Option<RequestContext> {
    actor(id, ActorType::User)
}

fn actor(id: &str, kind: ActorType) -> Option<RequestContext> {
    Some(RequestContext {
        actor: Some(ActorContext { actor_id: id.into(), r#type: kind as i32, ..Default::default() }),
        ..Default::default()
    })
}

fn text(message: &Message) -> Option<&str> {
    match message.content.as_ref()?.content.as_ref()? {
        message_content::Content::Text(text) => Some(&text.text),
        _ => None,
    }
}

/// Runs the test body `$name(store)` once per store, as `$name::postgres` and `$name::mongo`.
macro_rules! on_each_store {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() -> anyhow::Result<()> {
                super::$name(super::Store::Postgres).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mongo() -> anyhow::Result<()> {
                super::$name(super::Store::Mongo).await
            }
        }
    };
}

/// A one-to-one conversation between alice (even) and bob (odd), sent `seconds_ago` back.
struct Conversation {
    tenant: String,
    session: String,
    store: Store,
    database: TestDatabase,
    /// The MongoDB database of this test (used with `Store::Mongo`).
    mongo_database: String,
    topic: String,
    cached: RunningReader,
    uncached: RunningReader,
    writer: RunningWriter,
}

impl Conversation {
    async fn start(store: Store, messages: usize) -> anyhow::Result<Self> {
        let database = TestDatabase::create().await?;
        let mongo_database = unique("flare");
        let (topic, dlq_topic) = (unique("messages"), unique("dlq"));
        create_topics(&[&topic, &dlq_topic], PARTITIONS).await?;
        let mut writer = writer_config(&database.url, &topic, &dlq_topic);
        store.configure_writer(&mut writer, &mongo_database);
        let reader = |redis: Option<String>| {
            let mongo_database = mongo_database.clone();
            RunningReader::start_configured(&database.url, redis, move |config| {
                store.configure_reader(config, &mongo_database);
            })
        };
        let conversation = Self {
            tenant: unique("acme"),
            session: "chat".into(),
            store,
            writer: RunningWriter::start(writer).await?,
            cached: reader(Some(redis_url())).await?,
            uncached: reader(None).await?,
            database,
            mongo_database,
            topic,
        };
        for index in 0..messages {
            conversation.send(index, false).await?;
        }
        conversation.wait_stored(messages).await?;
        Ok(conversation)
    }

    fn sender(index: usize) -> &'static str {
        if index.is_multiple_of(2) { "alice" } else { "bob" }
    }

    async fn send(&self, index: usize, burn: bool) -> anyhow::Result<()> {
        produce_message(&producer()?, &self.topic, &self.message(index, burn)).await
    }

    /// Message `m<index>` of the conversation, sent just now.
    fn message(&self, index: usize, burn: bool) -> StoreMessageRequest {
        let sender = Self::sender(index);
        let receiver = if sender == "alice" { "bob" } else { "alice" };
        StoreMessageRequest {
            session_id: self.session.clone(),
            message: Some(Message {
                id: format!("m{index}"),
                sender_id: sender.into(),
                receiver_id: receiver.into(),
                content: Some(MessageContent {
                    content: Some(message_content::Content::Text(TextContent {
                        text: format!("text {index}"),
                        mentions: vec![],
                    })),
                }),
                // Recent (recallable) and one millisecond apart, in order.
                timestamp: Some(to_timestamp(
                    chrono::Utc::now() - chrono::Duration::seconds(20) + chrono::Duration::milliseconds(index as i64),
                )),
                is_burn_after_read: burn,
                burn_after_seconds: if burn { 1 } else { 0 },
                ..Default::default()
            }),
            tenant: tenant(&self.tenant),
            ..Default::default()
        }
    }

    async fn wait_stored(&self, count: usize) -> anyhow::Result<()> {
        self.writer.wait_processed(count).await
    }

    async fn clients(&self) -> anyhow::Result<[Client; 2]> {
        Ok([self.cached.client().await?, self.uncached.client().await?])
    }

    /// The ids `user` sees in the session, newest first, from both readers (which must agree).
    async fn visible_to(&self, user: &str) -> anyhow::Result<Vec<String>> {
        let mut answers = Vec::new();
        for mut client in self.clients().await? {
            let page = client
                .query_messages(QueryMessagesRequest {
                    session_id: self.session.clone(),
                    limit: 50,
                    context: as_user(user),
                    tenant: tenant(&self.tenant),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let by_seq = client
                .query_messages_by_seq(QueryMessagesBySeqRequest {
                    session_id: self.session.clone(),
                    user_id: user.into(),
                    limit: 50,
                    tenant: tenant(&self.tenant),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let ids: Vec<String> = page.messages.iter().map(|m| m.id.clone()).collect();
            let mut seq_ids: Vec<String> = by_seq.messages.iter().map(|m| m.id.clone()).collect();
            seq_ids.reverse();
            anyhow::ensure!(ids == seq_ids, "QueryMessages {ids:?} and QueryMessagesBySeq {seq_ids:?} differ");
            answers.push(ids);
        }
        anyhow::ensure!(answers[0] == answers[1], "cache {:?} and database {:?} differ", answers[0], answers[1]);
        Ok(answers.swap_remove(0))
    }

    /// Every small QueryMessagesBySeq page of the session (limits 1–3 from each seq) is the
    /// same from both readers, `has_more` and `last_seq` included.
    async fn seq_pages_agree(&self, user: &str) -> anyhow::Result<()> {
        let [mut cached, mut uncached] = self.clients().await?;
        for limit in 1..=3 {
            for after in 0..=6 {
                let request = || QueryMessagesBySeqRequest {
                    session_id: self.session.clone(),
                    user_id: user.into(),
                    after_seq: after,
                    limit,
                    tenant: tenant(&self.tenant),
                    ..Default::default()
                };
                let a = cached.query_messages_by_seq(request()).await?.into_inner();
                let b = uncached.query_messages_by_seq(request()).await?.into_inner();
                let seqs = |page: &QueryMessagesBySeqResponse| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
                anyhow::ensure!(
                    (seqs(&a), a.has_more, a.last_seq) == (seqs(&b), b.has_more, b.last_seq),
                    "{user} after {after} limit {limit}: cache {:?} {} {}, database {:?} {} {}",
                    seqs(&a),
                    a.has_more,
                    a.last_seq,
                    seqs(&b),
                    b.has_more,
                    b.last_seq
                );
            }
        }
        Ok(())
    }

    /// The message as `user` gets it from both readers (which must agree on its fields).
    async fn get(&self, user: &str, id: &str) -> anyhow::Result<Result<Message, Code>> {
        let mut answers = Vec::new();
        for mut client in self.clients().await? {
            let answer = client
                .get_message(GetMessageRequest {
                    message_id: id.into(),
                    context: as_user(user),
                    tenant: tenant(&self.tenant),
                })
                .await;
            answers.push(
                answer
                    .map(|response| response.into_inner().message.unwrap_or_default())
                    .map_err(|status| status.code()),
            );
        }
        Ok(answers.swap_remove(0))
    }

    /// `user`'s state of the session from both readers (which must agree).
    async fn state(&self, user: &str) -> anyhow::Result<SessionState> {
        let mut answers = Vec::new();
        for mut client in self.clients().await? {
            let response = client
                .get_session_states(GetSessionStatesRequest {
                    context: as_user(user),
                    tenant: tenant(&self.tenant),
                    session_ids: vec![self.session.clone()],
                    ..Default::default()
                })
                .await?
                .into_inner();
            anyhow::ensure!(response.states.len() == 1, "one state per session asked for: {response:?}");
            answers.extend(response.states);
        }
        anyhow::ensure!(answers[0] == answers[1], "cache {:?} and database {:?} differ", answers[0], answers[1]);
        Ok(answers.swap_remove(0))
    }

    /// (read seq, unread count) of `user`.
    async fn unread(&self, user: &str) -> anyhow::Result<(i64, i64)> {
        let state = self.state(user).await?;
        Ok((state.read_seq, state.unread_count))
    }

    /// Forgets everything Redis holds for the conversation's tenant, as a restart without
    /// persistence would.
    async fn lose_redis(&self) -> anyhow::Result<()> {
        use redis::AsyncCommands as _;
        let mut redis = redis_connection().await?;
        let keys: Vec<String> = redis.keys(format!("fs:{{{}:{}:*", self.tenant.len(), self.tenant)).await?;
        if !keys.is_empty() {
            let _: () = redis.del(keys).await?;
        }
        Ok(())
    }

    /// Window reads the caching reader answered from Redis.
    async fn cache_hits(&self) -> anyhow::Result<f64> {
        cache_lookups(&self.cached, "hit").await
    }

    /// Another caching reader of the conversation's store.
    async fn replica(&self) -> anyhow::Result<RunningReader> {
        let (store, mongo_database) = (self.store, self.mongo_database.clone());
        RunningReader::start_configured(&self.database.url, Some(redis_url()), move |config| {
            store.configure_reader(config, &mongo_database);
        })
        .await
    }

    /// Whether the stored document or row of a message still has its content fields, and its
    /// stored payload.
    async fn stored_content(&self, id: &str) -> anyhow::Result<(bool, Message)> {
        let (has_content, payload): (bool, Vec<u8>) = match self.store {
            Store::Postgres => {
                let mut db = self.database.connect().await?;
                sqlx::query_as(
                    r#"SELECT content IS NOT NULL OR EXISTS (SELECT 1 FROM message_search s WHERE s.message_id = $1),
                              payload FROM messages WHERE message_id = $1"#,
                )
                .bind(id)
                .fetch_one(&mut db)
                .await?
            }
            Store::Mongo => {
                use mongodb::bson::{Bson, doc};
                let client = mongodb::Client::with_uri_str(mongo_url()).await?;
                let messages = client.database(&self.mongo_database).collection::<mongodb::bson::Document>("messages");
                let document = messages
                    .find_one(doc! { "message_id": id })
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("{id} not in MongoDB"))?;
                let payload = match document.get("payload") {
                    Some(Bson::Binary(binary)) => binary.bytes.clone(),
                    _ => Vec::new(),
                };
                let has_terms = matches!(document.get("search_terms"), Some(Bson::Array(terms)) if !terms.is_empty());
                (has_terms || !matches!(document.get("search_text"), None | Some(Bson::Null)), payload)
            }
        };
        Ok((has_content, <Message as prost::Message>::decode(payload.as_slice())?))
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.writer.stop().await?;
        self.cached.stop().await?;
        self.uncached.stop().await?;
        if self.store == Store::Mongo {
            mongodb::Client::with_uri_str(mongo_url()).await?.database(&self.mongo_database).drop().await?;
        }
        self.database.drop().await
    }
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|id| (*id).to_owned()).collect()
}

on_each_store!(deleted_and_recalled_messages_are_gone_for_everyone);
async fn deleted_and_recalled_messages_are_gone_for_everyone(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 6).await?;
    let [mut client, _] = chat.clients().await?;
    assert_eq!(chat.visible_to("alice").await?, ids(&["m5", "m4", "m3", "m2", "m1", "m0"]));

    let delete = |ids: &[&str], context| DeleteMessageRequest {
        session_id: chat.session.clone(),
        message_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
        context,
        tenant: tenant(&chat.tenant),
    };
    // Only the sender, or a service, deletes for everyone.
    let denied = client.delete_message(delete(&["m3"], as_user("alice"))).await.expect_err("not alice's");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let deleted = client.delete_message(delete(&["m1"], as_user("bob"))).await?.into_inner();
    assert_eq!((deleted.success, deleted.deleted_count), (true, 1));
    assert_eq!(deleted.status.map(|s| s.code), Some(flare_storage_common::proto::common::ErrorCode::Ok as i32));
    let by_service = client.delete_message(delete(&["m3", "m1"], actor("moderation", ActorType::Service))).await?;
    assert_eq!(by_service.into_inner().deleted_count, 1, "m1 was already deleted");
    // One id not stored fails the whole request before anything is deleted (m5 stays below).
    let partly_unknown = client.delete_message(delete(&["m5", "nope"], as_user("bob"))).await.expect_err("unknown");
    assert_eq!(partly_unknown.code(), Code::NotFound);
    // The session must match, and other tenants cannot touch it.
    let mut wrong_session = delete(&["m0"], as_user("alice"));
    wrong_session.session_id = "another".into();
    assert_eq!(client.delete_message(wrong_session).await.expect_err("session").code(), Code::NotFound);
    let mut other_tenant = delete(&["m0"], as_user("alice"));
    other_tenant.tenant = tenant(&unique("globex"));
    assert_eq!(client.delete_message(other_tenant).await.expect_err("tenant").code(), Code::NotFound);
    let no_actor = client.delete_message(delete(&["m0"], None)).await.expect_err("no actor");
    assert_eq!(no_actor.code(), Code::InvalidArgument);
    assert!(no_actor.message().contains("context.actor.actor_id"), "{}", no_actor.message());

    let hits = chat.cache_hits().await?;
    for user in ["alice", "bob"] {
        assert_eq!(chat.visible_to(user).await?, ids(&["m5", "m4", "m2", "m0"]));
        assert_eq!(chat.get(user, "m1").await?.err(), Some(Code::NotFound));
    }
    assert!(chat.cache_hits().await? >= hits + 4.0, "the window answered, with the deletes laid over it");

    // Recall: only the sender, within the window; idempotent.
    let recall = |operator: &str, limit: i32| RecallMessageRequest {
        message_id: "m4".into(),
        operator_id: operator.into(),
        reason: "typo".into(),
        recall_time_limit_seconds: limit,
        tenant: tenant(&chat.tenant),
        ..Default::default()
    };
    assert_eq!(client.recall_message(recall("bob", 0)).await.expect_err("bob").code(), Code::PermissionDenied);
    let too_late = client.recall_message(recall("alice", 5)).await.expect_err("20 s old, 5 s allowed");
    assert_eq!(too_late.code(), Code::FailedPrecondition);
    let recalled = client.recall_message(recall("alice", 0)).await?.into_inner();
    assert!(recalled.success);
    let again = client.recall_message(recall("alice", 0)).await?.into_inner();
    assert_eq!(again.recalled_at, recalled.recalled_at);
    let message = chat.get("bob", "m4").await?.map_err(|code| anyhow::anyhow!("{code:?}"))?;
    assert!(message.is_recalled);
    assert_eq!(text(&message), None);
    assert!(message.operations.iter().any(|op| op.operation_type == "recall" && op.operator_id == "alice"));
    for mut reader in chat.clients().await? {
        let page = reader
            .query_messages(QueryMessagesRequest {
                session_id: chat.session.clone(),
                limit: 10,
                tenant: tenant(&chat.tenant),
                ..Default::default()
            })
            .await?
            .into_inner();
        let m4 = page.messages.iter().find(|m| m.id == "m4").expect("recalled messages stay listed");
        assert!(m4.is_recalled && m4.content.is_none() && m4.recalled_at.is_some());
        assert_eq!(page.messages.iter().find(|m| m.id == "m2").and_then(text), Some("text 2"));
    }
    // A message older than the configured limit (120 s) cannot be recalled.
    let mut old = RecallMessageRequest { message_id: "m0".into(), operator_id: "alice".into(), ..recall("alice", 0) };
    old.recall_time_limit_seconds = 300;
    assert!(client.recall_message(old).await.is_ok(), "20 s old is within min(300, 120)");
    chat.stop().await
}

on_each_store!(per_user_deletes_and_clears_hide_only_for_that_user);
async fn per_user_deletes_and_clears_hide_only_for_that_user(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 6).await?;
    let [mut client, _] = chat.clients().await?;

    let hide = |user: &str, id: &str, context| DeleteMessageForUserRequest {
        message_id: id.into(),
        user_id: user.into(),
        permanent: false,
        context,
        tenant: tenant(&chat.tenant),
    };
    let hidden = client.delete_message_for_user(hide("bob", "m2", None)).await?.into_inner();
    assert_eq!((hidden.success, hidden.deleted_count), (true, 1));
    assert_eq!(client.delete_message_for_user(hide("bob", "m2", None)).await?.into_inner().deleted_count, 0);
    let impersonation =
        client.delete_message_for_user(hide("bob", "m0", as_user("alice"))).await.expect_err("alice for bob");
    assert_eq!(impersonation.code(), Code::PermissionDenied);
    let stranger = client.delete_message_for_user(hide("carol", "m0", None)).await.expect_err("carol");
    assert_eq!(stranger.code(), Code::NotFound);

    let hits = chat.cache_hits().await?;
    assert_eq!(chat.visible_to("bob").await?, ids(&["m5", "m4", "m3", "m1", "m0"]));
    assert_eq!(chat.visible_to("alice").await?, ids(&["m5", "m4", "m3", "m2", "m1", "m0"]));
    assert!(chat.cache_hits().await? >= hits + 4.0, "per-user views are filtered in the window");
    assert_eq!(chat.get("bob", "m2").await?.err(), Some(Code::NotFound));
    assert!(chat.get("alice", "m2").await?.is_ok());
    // Small seq pages step over the hidden message in the window exactly as the database does.
    let hits = chat.cache_hits().await?;
    chat.seq_pages_agree("bob").await?;
    assert!(chat.cache_hits().await? >= hits + 10.0, "seq pages around a hidden message came from the window");

    // Alice clears everything before m3; bob is unaffected.
    let clear = |user: &str, kind: ClearType, before_id: &str| ClearSessionRequest {
        session_id: chat.session.clone(),
        user_id: user.into(),
        clear_type: kind as i32,
        clear_before_message_id: before_id.into(),
        tenant: tenant(&chat.tenant),
        ..Default::default()
    };
    let cleared = client.clear_session(clear("alice", ClearType::ClearBeforeMessage, "m3")).await?.into_inner();
    assert_eq!((cleared.success, cleared.cleared_count), (true, 3));
    assert_eq!(chat.visible_to("alice").await?, ids(&["m5", "m4", "m3"]));
    assert_eq!(chat.visible_to("bob").await?, ids(&["m5", "m4", "m3", "m1", "m0"]));
    assert_eq!(chat.get("alice", "m0").await?.err(), Some(Code::NotFound));
    chat.seq_pages_agree("alice").await?;

    // Bob clears all; what arrives afterwards is visible again.
    client.clear_session(clear("bob", ClearType::ClearAll, "")).await?;
    assert!(chat.visible_to("bob").await?.is_empty());
    tokio::time::sleep(Duration::from_millis(5)).await;
    chat.send(6, false).await?;
    chat.wait_stored(7).await?;
    // m6 carries a timestamp near "now - 20 s", before bob's clear: it stays cleared for him.
    assert!(chat.visible_to("bob").await?.is_empty());
    assert_eq!(chat.visible_to("alice").await?, ids(&["m6", "m5", "m4", "m3"]));

    let missing_time = client
        .clear_session(clear("bob", ClearType::ClearBeforeTime, ""))
        .await
        .expect_err("CLEAR_BEFORE_TIME without a time");
    assert_eq!(missing_time.code(), Code::InvalidArgument);
    assert!(missing_time.message().contains("clear_before_time"), "{}", missing_time.message());
    let bad_type = ClearSessionRequest { clear_type: 7, ..clear("bob", ClearType::ClearAll, "") };
    assert!(client.clear_session(bad_type).await.expect_err("unknown type").message().contains("clear_type"));
    chat.stop().await
}

on_each_store!(read_receipts_and_burn_after_read);
async fn read_receipts_and_burn_after_read(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 2).await?;
    chat.send(2, true).await?; // alice -> bob, burns 1 s after bob reads it
    chat.wait_stored(3).await?;
    let [mut client, _] = chat.clients().await?;
    let read = |user: &str, id: &str| MarkMessageReadRequest {
        message_id: id.into(),
        user_id: user.into(),
        tenant: tenant(&chat.tenant),
        ..Default::default()
    };

    let first = client.mark_message_read(read("bob", "m0")).await?.into_inner();
    assert!(first.success && first.read_at.is_some() && first.burned_at.is_none());
    let second = client.mark_message_read(read("bob", "m0")).await?.into_inner();
    assert_eq!(second.read_at, first.read_at, "the first read time stays");
    let own = client.mark_message_read(read("alice", "m0")).await.expect_err("own message");
    assert_eq!(own.code(), Code::FailedPrecondition);
    let message = chat.get("alice", "m0").await?.map_err(|code| anyhow::anyhow!("{code:?}"))?;
    assert_eq!(message.read_by.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>(), ["bob"]);

    assert_eq!(chat.get("bob", "m2").await?.ok().as_ref().and_then(text), Some("text 2"));
    let burn = client.mark_message_read(read("bob", "m2")).await?.into_inner();
    let burned_at = burn.burned_at.expect("burn-after-read sets burned_at");
    let read_at = burn.read_at.expect("read_at");
    assert_eq!(burned_at.seconds - read_at.seconds, 1);
    eventually(Duration::from_secs(10), "burned content to be gone everywhere", || async {
        let gone_for = |message: Result<Message, Code>| message.is_ok_and(|m| m.content.is_none());
        let mut gone = gone_for(chat.get("alice", "m2").await?) && gone_for(chat.get("bob", "m2").await?);
        for mut reader in chat.clients().await? {
            let page = reader
                .query_messages(QueryMessagesRequest {
                    session_id: chat.session.clone(),
                    limit: 10,
                    tenant: tenant(&chat.tenant),
                    ..Default::default()
                })
                .await?
                .into_inner();
            gone &= page.messages.iter().find(|m| m.id == "m2").is_some_and(|m| m.content.is_none());
            gone &= page.messages.iter().find(|m| m.id == "m1").is_some_and(|m| m.content.is_some());
        }
        Ok(gone.then_some(()))
    })
    .await?;
    // The background wipe then removes the content from the database itself.
    eventually(Duration::from_secs(40), "burned content wiped from the database", || async {
        let (has_content, stored) = chat.stored_content("m2").await?;
        Ok((!has_content && stored.content.is_none()).then_some(()))
    })
    .await?;
    let (untouched, stored) = chat.stored_content("m0").await?;
    assert!(untouched && stored.content.is_some(), "only burned messages are wiped");
    chat.stop().await
}

on_each_store!(attributes_and_tags_are_set_by_the_sender_and_listed_per_tenant);
async fn attributes_and_tags_are_set_by_the_sender_and_listed_per_tenant(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 3).await?;
    let [mut client, _] = chat.clients().await?;
    // Warm the window so the change has a cached copy to replace.
    chat.visible_to("alice").await?;
    let set = |user: &str, id: &str, tags: &[&str]| {
        Request::new(SetMessageAttributesRequest {
            context: as_user(user),
            tenant: tenant(&chat.tenant),
            message_id: id.into(),
            attributes: HashMap::from([("pinned".to_owned(), "true".to_owned())]),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        })
    };
    client.set_message_attributes(set("alice", "m0", &["work", "important"])).await?;
    client.set_message_attributes(set("alice", "m2", &["later"])).await?;
    assert_eq!(
        client.set_message_attributes(set("bob", "m0", &[])).await.expect_err("bob").code(),
        Code::PermissionDenied
    );

    for mut reader in chat.clients().await? {
        let page = reader
            .query_messages(QueryMessagesRequest {
                session_id: chat.session.clone(),
                limit: 10,
                tenant: tenant(&chat.tenant),
                ..Default::default()
            })
            .await?
            .into_inner();
        let m0 = page.messages.iter().find(|m| m.id == "m0").expect("m0");
        assert_eq!(m0.attributes.get("pinned").map(String::as_str), Some("true"));
        assert_eq!(m0.tags, ["work", "important"]);
    }
    let tags = client
        .list_message_tags(ListMessageTagsRequest { context: None, tenant: tenant(&chat.tenant) })
        .await?
        .into_inner();
    assert_eq!(tags.tags, ["important", "later", "work"]);
    let other =
        client.list_message_tags(ListMessageTagsRequest { context: None, tenant: tenant(&unique("globex")) }).await?;
    assert!(other.into_inner().tags.is_empty());
    chat.stop().await
}

/// What a command can change about a message, as a reader returns it: attributes, tags, who
/// read it, recalled, content present, operations.
type Fields = (Vec<(String, String)>, Vec<String>, Vec<String>, bool, bool, Vec<String>);

fn fields(message: &Message) -> Fields {
    let mut attributes: Vec<(String, String)> =
        message.attributes.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
    attributes.sort();
    (
        attributes,
        message.tags.clone(),
        message.read_by.iter().map(|record| record.user_id.clone()).collect(),
        message.is_recalled,
        message.content.is_some(),
        message.operations.iter().map(|operation| operation.operation_type.clone()).collect(),
    )
}

/// Message `id` as every read path of `client` returns it to `user`: QueryMessagesBySeq (alone
/// with `by_seq_only`), GetMessage, QueryMessages, SearchMessages (its own text; a recalled
/// message is not found, so `None` there) and StreamExportMessages.
async fn through_every_path(
    client: &mut Client,
    chat: &Conversation,
    user: &str,
    id: &str,
    by_seq_only: bool,
) -> anyhow::Result<Vec<(&'static str, Option<Fields>)>> {
    let find = |messages: &[Message]| messages.iter().find(|message| message.id == id).map(fields);
    let by_seq = client
        .query_messages_by_seq(QueryMessagesBySeqRequest {
            session_id: chat.session.clone(),
            user_id: user.into(),
            limit: 50,
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    if by_seq_only {
        return Ok(vec![("QueryMessagesBySeq", find(&by_seq.messages))]);
    }
    let got = client
        .get_message(GetMessageRequest { message_id: id.into(), context: as_user(user), tenant: tenant(&chat.tenant) })
        .await?
        .into_inner()
        .message
        .as_ref()
        .map(fields);
    let page = client
        .query_messages(QueryMessagesRequest {
            session_id: chat.session.clone(),
            limit: 50,
            context: as_user(user),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    let index = id.trim_start_matches('m');
    let search = client
        .search_messages(SearchMessagesRequest {
            context: as_user(user),
            tenant: tenant(&chat.tenant),
            filters: vec![FilterExpression {
                field: "content".into(),
                op: FilterOperator::Contains as i32,
                values: vec![format!("text {index}")],
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut export = client
        .stream_export_messages(ExportMessagesRequest {
            session_id: chat.session.clone(),
            context: as_user(user),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut exported = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut export).await {
        exported.extend(chunk?.messages);
    }
    Ok(vec![
        ("GetMessage", got),
        ("QueryMessages", find(&page.messages)),
        ("QueryMessagesBySeq", find(&by_seq.messages)),
        ("SearchMessages", find(&search.messages)),
        ("StreamExportMessages", find(&exported)),
    ])
}

on_each_store!(every_read_path_shows_what_a_command_changed);
/// Each command that changes a message's fields is seen the same way, right after its reply,
/// through every read path of every reader: the one that ran it, another caching replica with
/// a warm window, and one without Redis.
async fn every_read_path_shows_what_a_command_changed(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 6).await?;
    let replica = chat.replica().await?;
    let mut commander = chat.cached.client().await?;
    let mut readers = vec![chat.cached.client().await?, replica.client().await?, chat.uncached.client().await?];
    let warm = async |readers: &mut Vec<Client>| -> anyhow::Result<()> {
        for reader in readers.iter_mut() {
            for id in ["m1", "m2", "m3"] {
                through_every_path(reader, &chat, "alice", id, false).await?;
            }
        }
        Ok(())
    };
    warm(&mut readers).await?;

    let pinned = vec![("pinned".to_owned(), "1".to_owned())];
    // After each command, every reader's QueryMessagesBySeq first (a time page refills a
    // window its command left unknown), then every path.
    let mut check = async |id: &str, want: Fields| -> anyhow::Result<()> {
        for (round, reader) in readers.iter_mut().enumerate() {
            let by_seq = through_every_path(reader, &chat, "alice", id, true).await?;
            assert_eq!(by_seq, [("QueryMessagesBySeq", Some(want.clone()))], "{id}, reader {round} ({store:?})");
        }
        for (round, reader) in readers.iter_mut().enumerate() {
            for (path, seen) in through_every_path(reader, &chat, "alice", id, false).await? {
                // A recalled message is not found by search.
                let want = (path != "SearchMessages" || !want.3).then(|| want.clone());
                assert_eq!(seen, want, "{id} through {path} of reader {round} ({store:?})");
            }
        }
        Ok(())
    };
    // m1 (bob's): attributes and tags set by bob.
    commander
        .set_message_attributes(SetMessageAttributesRequest {
            context: as_user("bob"),
            tenant: tenant(&chat.tenant),
            message_id: "m1".into(),
            attributes: HashMap::from([("pinned".to_owned(), "1".to_owned())]),
            tags: vec!["starred".into()],
        })
        .await?;
    check("m1", (pinned, vec!["starred".into()], vec![], false, true, vec!["set_attributes".into()])).await?;
    // m2 (alice's): read by bob.
    commander
        .mark_message_read(MarkMessageReadRequest {
            message_id: "m2".into(),
            user_id: "bob".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    check("m2", (vec![], vec![], vec!["bob".into()], false, true, vec![])).await?;
    // m3 (bob's): recalled by bob.
    commander
        .recall_message(RecallMessageRequest {
            message_id: "m3".into(),
            operator_id: "bob".into(),
            reason: "typo".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    check("m3", (vec![], vec![], vec![], true, false, vec!["recall".into()])).await?;
    // Commands on one message racing through two replicas, each retried while it answers
    // ABORTED (MongoDB's attribute merge lost every race; a client retries that): the windows
    // end as the database.
    let other = replica.client().await?;
    let racing = (0..16).map(|k| {
        let mut client = if k % 2 == 0 { commander.clone() } else { other.clone() };
        let request = SetMessageAttributesRequest {
            context: as_user("bob"),
            tenant: tenant(&chat.tenant),
            message_id: "m5".into(),
            attributes: HashMap::from([(format!("k{k}"), k.to_string())]),
            tags: vec![format!("t{k}")],
        };
        async move {
            loop {
                match client.set_message_attributes(request.clone()).await {
                    Err(status) if status.code() == Code::Aborted => continue,
                    answer => return answer,
                }
            }
        }
    });
    futures::future::try_join_all(racing).await?;
    let mut truth = chat.uncached.client().await?;
    let stored = truth
        .get_message(GetMessageRequest {
            message_id: "m5".into(),
            context: as_user("alice"),
            tenant: tenant(&chat.tenant),
        })
        .await?
        .into_inner()
        .message
        .ok_or_else(|| anyhow::anyhow!("m5 missing"))?;
    assert_eq!(stored.attributes.len(), 16, "every racing command merged its attribute");
    check("m5", fields(&stored)).await?;
    // The session's ticket counter, taken by every command that changes a message, expires.
    let tickets = flare_storage_common::keys::SessionKeys::new(&chat.tenant, &chat.session).tickets();
    let ttl: i64 = redis::cmd("TTL").arg(&tickets).query_async(&mut redis_connection().await?).await?;
    assert!(ttl > 0, "{tickets} has TTL {ttl}");
    replica.stop().await?;
    chat.stop().await
}

on_each_store!(three_replicas_never_contradict_a_command_after_its_reply);
/// Three caching replicas behind one gateway: a sequence of commands of every kind (a fixed
/// pseudo-random draw over messages, users and replicas) goes to one replica while the others
/// keep serving the session. After each reply, every replica answers pages, pages by seq and
/// GetMessage exactly as a reader without Redis does, for both members — nothing gone shown,
/// nothing stale.
async fn three_replicas_never_contradict_a_command_after_its_reply(store: Store) -> anyhow::Result<()> {
    const MESSAGES: usize = 10;
    let chat = Conversation::start(store, MESSAGES).await?;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let replica = chat.replica().await?;
        replicas.push(replica);
    }
    let mut clients = vec![chat.cached.client().await?];
    for replica in &replicas {
        clients.push(replica.client().await?);
    }
    let mut truth = chat.uncached.client().await?;
    // Warm every replica's window and learned sessions.
    for client in clients.iter_mut() {
        for user in ["alice", "bob"] {
            let _warm = answers(client, &chat, user, "m0").await?;
        }
    }
    let mut draw = 0x2545_f491_u64;
    let mut next = |bound: usize| {
        draw = draw.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (draw >> 33) as usize % bound
    };
    for step in 0..24 {
        let index = next(MESSAGES);
        let id = format!("m{index}");
        let sender = Conversation::sender(index);
        let other = if sender == "alice" { "bob" } else { "alice" };
        let commander = next(clients.len());
        let client = &mut clients[commander];
        let kind = next(6);
        let answer = match kind {
            0 => client
                .delete_message(DeleteMessageRequest {
                    session_id: chat.session.clone(),
                    message_ids: vec![id.clone()],
                    context: as_user(sender),
                    tenant: tenant(&chat.tenant),
                })
                .await
                .map(drop),
            1 => client
                .recall_message(RecallMessageRequest {
                    message_id: id.clone(),
                    operator_id: sender.into(),
                    tenant: tenant(&chat.tenant),
                    ..Default::default()
                })
                .await
                .map(drop),
            2 => client
                .delete_message_for_user(DeleteMessageForUserRequest {
                    message_id: id.clone(),
                    user_id: other.into(),
                    permanent: false,
                    context: as_user(other),
                    tenant: tenant(&chat.tenant),
                })
                .await
                .map(drop),
            3 => client
                .clear_session(ClearSessionRequest {
                    session_id: chat.session.clone(),
                    user_id: other.into(),
                    clear_type: ClearType::ClearBeforeMessage as i32,
                    clear_before_message_id: id.clone(),
                    tenant: tenant(&chat.tenant),
                    ..Default::default()
                })
                .await
                .map(drop),
            4 => client
                .set_message_attributes(SetMessageAttributesRequest {
                    context: as_user(sender),
                    tenant: tenant(&chat.tenant),
                    message_id: id.clone(),
                    attributes: HashMap::from([(format!("step{step}"), step.to_string())]),
                    tags: vec![format!("t{step}")],
                })
                .await
                .map(drop),
            _ => client
                .mark_message_read(MarkMessageReadRequest {
                    message_id: id.clone(),
                    user_id: other.into(),
                    tenant: tenant(&chat.tenant),
                    ..Default::default()
                })
                .await
                .map(drop),
        };
        // A command may be refused (a gone message, an attribute race); what follows must
        // agree either way.
        let what = format!("step {step}: command {kind} on {id} through replica {commander} ({answer:?}, {store:?})");
        for user in ["alice", "bob"] {
            let want = answers(&mut truth, &chat, user, &id).await?;
            for (replica, client) in clients.iter_mut().enumerate() {
                let seen = answers(client, &chat, user, &id).await?;
                assert_eq!(seen, want, "{what}: replica {replica} for {user}");
            }
        }
    }
    for replica in replicas {
        replica.stop().await?;
    }
    chat.stop().await
}

/// What `user` gets from `client`: the session's page and page by seq, and message `id`
/// (or the status code refusing it).
async fn answers(
    client: &mut Client,
    chat: &Conversation,
    user: &str,
    id: &str,
) -> anyhow::Result<(Vec<Message>, Vec<Message>, Result<Option<Message>, Code>)> {
    let page = client
        .query_messages(QueryMessagesRequest {
            session_id: chat.session.clone(),
            limit: 50,
            context: as_user(user),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner()
        .messages;
    let by_seq = client
        .query_messages_by_seq(QueryMessagesBySeqRequest {
            session_id: chat.session.clone(),
            user_id: user.into(),
            limit: 50,
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner()
        .messages;
    let one = client
        .get_message(GetMessageRequest { message_id: id.into(), context: as_user(user), tenant: tenant(&chat.tenant) })
        .await
        .map(|reply| reply.into_inner().message)
        .map_err(|status| status.code());
    Ok((page, by_seq, one))
}

on_each_store!(no_key_of_a_session_lives_forever);
/// Every Redis key the writer and the reader keep for a session expires — windows and
/// remembered seqs after their lifetimes, the state and read seqs a week after their last use (a session that
/// went quiet has them rebuilt from the databases) — except the seq counter, which must never
/// hand out a seq twice.
async fn no_key_of_a_session_lives_forever(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 4).await?;
    let mut client = chat.cached.client().await?;
    for user in ["alice", "bob"] {
        chat.visible_to(user).await?;
    }
    client
        .mark_session_read(MarkSessionReadRequest {
            session_id: chat.session.clone(),
            user_id: "bob".into(),
            read_seq: 2,
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    client
        .delete_message_for_user(DeleteMessageForUserRequest {
            message_id: "m1".into(),
            user_id: "alice".into(),
            permanent: false,
            context: as_user("alice"),
            tenant: tenant(&chat.tenant),
        })
        .await?;
    client
        .set_message_attributes(SetMessageAttributesRequest {
            context: as_user("alice"),
            tenant: tenant(&chat.tenant),
            message_id: "m2".into(),
            attributes: HashMap::from([("pinned".to_owned(), "1".to_owned())]),
            tags: vec![],
        })
        .await?;
    client
        .get_message(GetMessageRequest {
            message_id: "m3".into(),
            context: as_user("bob"),
            tenant: tenant(&chat.tenant),
        })
        .await?;
    // Redis lost the state and read seqs: the reader rebuilds and puts them back.
    let keys = flare_storage_common::keys::SessionKeys::new(&chat.tenant, &chat.session);
    let mut redis = redis_connection().await?;
    let _: () = redis::cmd("DEL").arg(keys.state()).arg(keys.reads()).query_async(&mut redis).await?;
    for user in ["alice", "bob"] {
        chat.state(user).await?;
    }

    let tag = keys.state().trim_end_matches(":state").to_owned();
    let names: Vec<String> = redis::cmd("KEYS").arg(format!("{tag}*")).query_async(&mut redis).await?;
    for wanted in [keys.state(), keys.reads(), keys.seq_counter(), keys.hot_index(), keys.tickets()] {
        assert!(names.contains(&wanted), "{wanted} among {names:?} ({store:?})");
    }
    for name in names.iter().filter(|name| **name != keys.seq_counter()) {
        let ttl: i64 = redis::cmd("TTL").arg(name).query_async(&mut redis).await?;
        assert!(ttl > 0, "{name} has TTL {ttl} ({store:?})");
    }
    // The seq counter alone is kept: seqs must never repeat (see `SessionKeys::seq_counter`).
    let ttl: i64 = redis::cmd("TTL").arg(keys.seq_counter()).query_async(&mut redis).await?;
    assert_eq!(ttl, -1, "{store:?}");
    let week = flare_storage_common::keys::SESSION_STATE_TTL_SECONDS as i64;
    for name in [keys.state(), keys.reads()] {
        let ttl: i64 = redis::cmd("TTL").arg(&name).query_async(&mut redis).await?;
        assert!(ttl > week - 60 && ttl <= week, "{name}: {ttl} s ({store:?})");
    }
    chat.stop().await
}

on_each_store!(a_page_tells_get_message_where_its_messages_are);
/// A client reads a page, then opens a message of it: the page taught the replica each listed
/// message's session, so the read by id comes from the window at once.
async fn a_page_tells_get_message_where_its_messages_are(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 6).await?;
    let replica = chat.replica().await?;
    let lookups = async |result: &str| cache_lookups(&replica, result).await;
    let mut client = replica.client().await?;
    let page = client
        .query_messages(QueryMessagesRequest {
            session_id: chat.session.clone(),
            context: as_user("alice"),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(page.messages.len(), 6);
    let (hits, misses) = (lookups("hit").await?, lookups("miss").await?);
    for message in &page.messages {
        let read = client
            .get_message(GetMessageRequest {
                message_id: message.id.clone(),
                context: as_user("alice"),
                tenant: tenant(&chat.tenant),
            })
            .await?
            .into_inner();
        assert_eq!(read.message.as_ref(), Some(message), "{} ({store:?})", message.id);
    }
    assert_eq!(lookups("hit").await? - hits, 6.0, "every read by id came from the window ({store:?})");
    assert_eq!(lookups("miss").await?, misses, "{store:?}");
    replica.stop().await?;
    chat.stop().await
}

on_each_store!(get_message_is_answered_from_the_window_and_never_shows_what_is_gone);
/// GetMessage is answered from the session's hot window once a replica knows the message's
/// session, and agrees with the database (message for message, byte for byte) after commands
/// sent to another replica: deleted, hidden and cleared messages are not found for whom they
/// are gone, recalled ones lose their content, attributes show at once.
async fn get_message_is_answered_from_the_window_and_never_shows_what_is_gone(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 6).await?;
    let replica = chat.replica().await?;
    let hits = async || cache_lookups(&replica, "hit").await;
    let (mut replica_client, mut database_client) = (replica.client().await?, chat.uncached.client().await?);
    let everyone = ["m0", "m1", "m2", "m3", "m4", "m5"];
    // Each answer of the replica, and whether it is the database's exactly.
    let mut compare = async |user: &str, id: &str| -> anyhow::Result<Result<Message, Code>> {
        let request =
            || GetMessageRequest { message_id: id.into(), context: as_user(user), tenant: tenant(&chat.tenant) };
        let cached = replica_client.get_message(request()).await;
        let stored = database_client.get_message(request()).await;
        let cached = cached.map(|reply| reply.into_inner().message.unwrap_or_default()).map_err(|status| status.code());
        let stored = stored.map(|reply| reply.into_inner().message.unwrap_or_default()).map_err(|status| status.code());
        assert_eq!(cached, stored, "{id} for {user} ({store:?})");
        Ok(cached)
    };
    // First reads learn each message's session from the database; the next come from Redis.
    for id in everyone {
        compare("alice", id).await?.map_err(|code| anyhow::anyhow!("{id}: {code:?}"))?;
    }
    let before = hits().await?;
    for id in everyone {
        compare("alice", id).await?.map_err(|code| anyhow::anyhow!("{id}: {code:?}"))?;
    }
    assert_eq!(hits().await? - before, 6.0, "every read by id came from the window ({store:?})");

    let mut commander = chat.cached.client().await?;
    commander
        .delete_message(DeleteMessageRequest {
            session_id: chat.session.clone(),
            message_ids: vec!["m1".into()],
            context: as_user("bob"),
            tenant: tenant(&chat.tenant),
        })
        .await?;
    commander
        .delete_message_for_user(DeleteMessageForUserRequest {
            message_id: "m2".into(),
            user_id: "bob".into(),
            permanent: false,
            context: as_user("bob"),
            tenant: tenant(&chat.tenant),
        })
        .await?;
    commander
        .recall_message(RecallMessageRequest {
            message_id: "m4".into(),
            operator_id: "alice".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    commander
        .set_message_attributes(SetMessageAttributesRequest {
            context: as_user("bob"),
            tenant: tenant(&chat.tenant),
            message_id: "m5".into(),
            attributes: HashMap::from([("pinned".to_owned(), "1".to_owned())]),
            tags: vec!["starred".into()],
        })
        .await?;
    commander
        .clear_session(ClearSessionRequest {
            session_id: chat.session.clone(),
            user_id: "alice".into(),
            clear_type: ClearType::ClearBeforeMessage as i32,
            clear_before_message_id: "m3".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;

    let before = hits().await?;
    for user in ["alice", "bob"] {
        for id in everyone {
            let answer = compare(user, id).await?;
            let gone = id == "m1" || (user == "bob" && id == "m2") || (user == "alice" && ["m0", "m2"].contains(&id));
            assert_eq!(answer.as_ref().err(), gone.then_some(&Code::NotFound), "{id} for {user} ({store:?})");
            if let Ok(message) = answer {
                assert_eq!(message.is_recalled, id == "m4");
                assert_eq!(text(&message).is_some(), id != "m4", "{id}: recalled content is never shown");
                assert_eq!(message.tags, if id == "m5" { vec!["starred".to_owned()] } else { vec![] });
            }
        }
    }
    // Bob's m0, m3, m4, m5 and alice's m3, m4, m5 are in the window as each sees them.
    assert!(hits().await? - before >= 7.0, "visible messages came from the window ({store:?})");
    replica.stop().await?;
    chat.stop().await
}

/// A command whose caller goes away while it waits on the database (here a row lock another
/// transaction holds) still finishes: once the lock is gone, the database and the hot window
/// both hold its change, and every reader shows it — no window keeps the message as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_caller_goes_away_still_reaches_the_window() -> anyhow::Result<()> {
    let chat = Conversation::start(Store::Postgres, 4).await?;
    let before = chat.visible_to("alice").await?;
    assert_eq!(before, ids(&["m3", "m2", "m1", "m0"]), "the window is warm");

    let mut lock = chat.database.connect().await?;
    sqlx::query("BEGIN").execute(&mut lock).await?;
    sqlx::query("SELECT 1 FROM messages WHERE message_id = 'm1' FOR UPDATE").execute(&mut lock).await?;
    let mut client = chat.cached.client().await?;
    let request = SetMessageAttributesRequest {
        context: as_user("bob"),
        tenant: tenant(&chat.tenant),
        message_id: "m1".into(),
        attributes: HashMap::from([("pinned".to_owned(), "1".to_owned())]),
        tags: vec!["starred".into()],
    };
    let in_flight = async || -> anyhow::Result<Option<f64>> {
        let (_, body) = http_get(chat.cached.metrics_addr, "/metrics").await?;
        Ok(metric_value(&body, "storage_reader_in_flight_calls{rpc=\"SetMessageAttributes\"}"))
    };
    let mut call = Box::pin(client.set_message_attributes(request));
    let waiting = tokio::time::timeout(Duration::from_millis(500), &mut call).await;
    assert!(waiting.is_err(), "the command waits for the row lock");
    assert_eq!(in_flight().await?, Some(1.0), "the waiting call is in flight");
    drop(call);
    eventually(Duration::from_secs(5), "no call in flight once the caller gave up", || async {
        Ok((in_flight().await? == Some(0.0)).then_some(()))
    })
    .await?;
    sqlx::query("COMMIT").execute(&mut lock).await?;

    let want = (
        vec![("pinned".to_owned(), "1".to_owned())],
        vec!["starred".to_owned()],
        vec![],
        false,
        true,
        vec!["set_attributes".to_owned()],
    );
    eventually(Duration::from_secs(10), "the abandoned command's change on every reader", || {
        let chat = &chat;
        let want = want.clone();
        async move {
            let mut seen = Vec::new();
            for mut reader in chat.clients().await? {
                let by_seq = reader
                    .query_messages_by_seq(QueryMessagesBySeqRequest {
                        session_id: chat.session.clone(),
                        user_id: "alice".into(),
                        limit: 10,
                        tenant: tenant(&chat.tenant),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                seen.push(by_seq.messages.iter().find(|message| message.id == "m1").map(fields));
            }
            Ok(seen.iter().all(|fields| fields.as_ref() == Some(&want)).then_some(()))
        }
    })
    .await?;
    chat.stop().await
}

/// A reader shutting down waits for a command still running (here on a row lock) whose caller
/// has gone, instead of leaving it cut between its database write and its cache write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_running_command() -> anyhow::Result<()> {
    let chat = Conversation::start(Store::Postgres, 3).await?;
    let replica = RunningReader::start(&chat.database.url).await?;
    let mut lock = chat.database.connect().await?;
    sqlx::query("BEGIN").execute(&mut lock).await?;
    sqlx::query("SELECT 1 FROM messages WHERE message_id = 'm1' FOR UPDATE").execute(&mut lock).await?;
    let request = SetMessageAttributesRequest {
        context: as_user("bob"),
        tenant: tenant(&chat.tenant),
        message_id: "m1".into(),
        attributes: HashMap::from([("pinned".to_owned(), "1".to_owned())]),
        tags: vec![],
    };
    // The caller gives up: the server no longer waits for the call, only for the command.
    let mut client = replica.client().await?;
    let gave_up = tokio::time::timeout(Duration::from_millis(500), client.set_message_attributes(request)).await;
    assert!(gave_up.is_err(), "the command waits for the row lock");
    let mut stopping = tokio::spawn(replica.stop());
    let early = tokio::time::timeout(Duration::from_secs(1), &mut stopping).await;
    assert!(early.is_err(), "the reader stopped while a command was still running");
    sqlx::query("COMMIT").execute(&mut lock).await?;
    stopping.await??;
    // The command finished: its change is in the database and in the window.
    for mut reader in chat.clients().await? {
        let by_seq = reader
            .query_messages_by_seq(QueryMessagesBySeqRequest {
                session_id: chat.session.clone(),
                limit: 10,
                tenant: tenant(&chat.tenant),
                ..Default::default()
            })
            .await?
            .into_inner();
        let m1 = by_seq.messages.iter().find(|message| message.id == "m1").expect("m1 listed");
        assert_eq!(m1.attributes.get("pinned").map(String::as_str), Some("1"));
    }
    chat.stop().await
}

on_each_store!(unread_counts_are_exact_and_read_positions_only_move_forward);
/// Session state without per-member counters: unread counts derived from read seqs leave out
/// what is deleted, recalled, burned, hidden or cleared for the user and what the user sent;
/// read positions move forward only — by the user's own messages, MarkMessageRead and
/// MarkSessionRead — and everything is rebuilt from the databases when Redis loses it.
async fn unread_counts_are_exact_and_read_positions_only_move_forward(store: Store) -> anyhow::Result<()> {
    let chat = Conversation::start(store, 0).await?;
    let [mut client, _] = chat.clients().await?;
    // alice sends bob four messages (m0, m2, m4, m6: seqs 1-4).
    for index in [0, 2, 4, 6] {
        chat.send(index, false).await?;
    }
    chat.wait_stored(4).await?;
    let state = chat.state("bob").await?;
    assert_eq!((state.last_seq, state.message_count, state.last_message_id.as_str()), (4, 4, "m6"));
    assert_eq!(state.last_sender_id, "alice");
    assert_eq!(chat.unread("bob").await?, (0, 4));
    assert_eq!(chat.unread("alice").await?, (4, 0), "her own messages are read");

    // Deleted for everyone, recalled, and hidden for bob: none of them count for bob.
    client
        .delete_message(DeleteMessageRequest {
            session_id: chat.session.clone(),
            message_ids: vec!["m0".into()],
            context: as_user("alice"),
            tenant: tenant(&chat.tenant),
        })
        .await?;
    client
        .recall_message(RecallMessageRequest {
            message_id: "m2".into(),
            operator_id: "alice".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    assert_eq!(chat.unread("bob").await?, (0, 2), "three messages to bob, one deleted, one recalled");
    client
        .delete_message_for_user(DeleteMessageForUserRequest {
            message_id: "m4".into(),
            user_id: "bob".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    assert_eq!(chat.unread("bob").await?, (0, 1));

    // Reading a message moves bob's read seq to it; MarkSessionRead never moves it back.
    client
        .mark_message_read(MarkMessageReadRequest {
            message_id: "m6".into(),
            user_id: "bob".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    assert_eq!(chat.unread("bob").await?, (4, 0));
    let back = client
        .mark_session_read(MarkSessionReadRequest {
            session_id: chat.session.clone(),
            user_id: "bob".into(),
            read_seq: 2,
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!((back.read_seq, back.unread_count), (4, 0), "never backwards");

    // A burn-after-read message sent to the whole session (no receivers named): once bob's
    // read burns it, carol, who never read it, has nothing unread either.
    let mut burning = chat.message(8, true);
    if let Some(message) = burning.message.as_mut() {
        message.receiver_id.clear();
    }
    produce_message(&producer()?, &chat.topic, &burning).await?;
    chat.wait_stored(5).await?;
    assert_eq!(chat.unread("carol").await?, (0, 3), "m4, m6 and m8: carol hid nothing");
    client
        .mark_message_read(MarkMessageReadRequest {
            message_id: "m8".into(),
            user_id: "bob".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    eventually(Duration::from_secs(10), "m8 burned for carol", || async {
        Ok((chat.unread("carol").await? == (0, 2)).then_some(()))
    })
    .await?;

    // bob's own message moves his read seq; alice has it unread. A clear covers it for her.
    chat.send(9, false).await?;
    chat.wait_stored(6).await?;
    assert_eq!(chat.unread("bob").await?, (6, 0));
    assert_eq!(chat.unread("alice").await?, (5, 1), "m8 was hers; m9 is new");
    client
        .clear_session(ClearSessionRequest {
            session_id: chat.session.clone(),
            user_id: "alice".into(),
            clear_type: ClearType::ClearAll as i32,
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?;
    assert_eq!(chat.unread("alice").await?, (5, 0), "cleared is not unread");

    // MarkSessionRead with 0 reads up to the last seq.
    let read = client
        .mark_session_read(MarkSessionReadRequest {
            session_id: chat.session.clone(),
            user_id: "carol".into(),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!((read.read_seq, read.unread_count), (6, 0));

    // Redis loses everything, and an old message (m4, seq 3) is sent again meanwhile: the
    // writer takes it for what it is (stored before) and leaves the state to be rebuilt, so
    // the answers are the same, from the databases.
    let duplicates = || async {
        let (_, body) = http_get(chat.writer.metrics_addr, "/metrics").await?;
        anyhow::Ok(metric_value(&body, "storage_writer_messages_duplicated_total").unwrap_or(0.0))
    };
    let before = duplicates().await?;
    chat.lose_redis().await?;
    chat.send(4, false).await?;
    // Another record with m4's id: a second sending, ACKed as a duplicate.
    eventually(Duration::from_secs(30), "the resend of m4 handled", || async {
        Ok((duplicates().await? > before).then_some(()))
    })
    .await?;
    assert_eq!(chat.unread("alice").await?, (5, 0));
    assert_eq!(chat.unread("bob").await?, (6, 0));
    assert_eq!(chat.unread("carol").await?, (6, 0));
    assert_eq!(chat.unread("dave").await?, (0, 3), "m4, m6, m9 for someone new to the session");
    let state = chat.state("dave").await?;
    assert_eq!((state.last_seq, state.last_message_id.as_str(), state.last_sender_id.as_str()), (6, "m9", "bob"));

    // Sessions asked for twice are answered twice; a session nobody wrote to is all zeros.
    let twice = client
        .get_session_states(GetSessionStatesRequest {
            user_id: "dave".into(),
            session_ids: vec![chat.session.clone(), "nobody-wrote-here".into(), chat.session.clone()],
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(twice.states.len(), 3);
    assert_eq!(twice.states[0], twice.states[2]);
    assert_eq!((twice.states[0].last_seq, twice.states[0].unread_count), (6, 3));
    assert_eq!(twice.states[1].last_seq, 0);

    // Bad requests name their field.
    let unknown = client
        .get_session_states(GetSessionStatesRequest {
            user_id: "alice".into(),
            session_ids: vec!["nobody-wrote-here".into()],
            tenant: tenant(&chat.tenant),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(unknown.states, [SessionState { session_id: "nobody-wrote-here".into(), ..Default::default() }]);
    let too_many = GetSessionStatesRequest {
        user_id: "alice".into(),
        session_ids: (0..501).map(|index| format!("s{index}")).collect(),
        tenant: tenant(&chat.tenant),
        ..Default::default()
    };
    let error = client.get_session_states(too_many).await.expect_err("501 sessions");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("session_ids"), "{}", error.message());
    let nobody = GetSessionStatesRequest {
        session_ids: vec![chat.session.clone()],
        tenant: tenant(&chat.tenant),
        ..Default::default()
    };
    let error = client.get_session_states(nobody).await.expect_err("no user");
    assert!(error.message().contains("user_id"), "{}", error.message());
    let negative = MarkSessionReadRequest {
        session_id: chat.session.clone(),
        user_id: "bob".into(),
        read_seq: -1,
        tenant: tenant(&chat.tenant),
        ..Default::default()
    };
    let error = client.mark_session_read(negative).await.expect_err("negative read seq");
    assert!(error.message().contains("read_seq"), "{}", error.message());
    let (_, body) = http_get(chat.cached.metrics_addr, "/metrics").await?;
    let from_window = metric_value(&body, "storage_reader_unread_counts_total{source=\"cache\"}").unwrap_or(0.0);
    assert!(from_window > 0.0, "the hot window answered unread counts too");
    chat.stop().await
}

on_each_store!(isolation_matrix_every_rpc_against_other_tenant_other_user_and_non_sender);
/// The isolation matrix: every RPC tried by another tenant, by a user acting for or reading as
/// another user, and by a receiver on the sender's message. Each attempt is refused or finds
/// nothing, and afterwards every message, view, tag and attribute is as it was.
async fn isolation_matrix_every_rpc_against_other_tenant_other_user_and_non_sender(store: Store) -> anyhow::Result<()> {
    use flare_storage_common::tonic::Status;
    use futures::StreamExt as _;

    let chat = Conversation::start(store, 4).await?;
    let [mut client, _] = chat.clients().await?;
    let own = || tenant(&chat.tenant);
    let intruder = unique("globex");
    let other = || tenant(&intruder);
    // State that must not leak or change: alice tagged m0; bob hid m1 for himself.
    client
        .set_message_attributes(SetMessageAttributesRequest {
            context: as_user("alice"),
            tenant: own(),
            message_id: "m0".into(),
            attributes: HashMap::from([("pinned".to_owned(), "yes".to_owned())]),
            tags: vec!["secret-tag".into()],
        })
        .await?;
    client
        .delete_message_for_user(DeleteMessageForUserRequest {
            message_id: "m1".into(),
            user_id: "bob".into(),
            tenant: own(),
            ..Default::default()
        })
        .await?;

    let code = |result: Result<(), Status>| result.err().map(|status| status.code());
    let mut refused = Vec::new();
    let mut expect = |what: &str, outcome: Option<Code>, wanted: Code| {
        refused.push(format!("{what}: {outcome:?}"));
        assert_eq!(outcome, Some(wanted), "{what}");
    };

    // Other tenant: commands find nothing, reads return nothing.
    expect(
        "other tenant GetMessage",
        code(
            client
                .get_message(GetMessageRequest { message_id: "m0".into(), context: as_user("alice"), tenant: other() })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );
    expect(
        "other tenant DeleteMessage",
        code(
            client
                .delete_message(DeleteMessageRequest {
                    session_id: chat.session.clone(),
                    message_ids: vec!["m0".into()],
                    context: actor("admin", ActorType::TenantAdmin),
                    tenant: other(),
                })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );
    expect(
        "other tenant RecallMessage",
        code(
            client
                .recall_message(RecallMessageRequest {
                    message_id: "m0".into(),
                    operator_id: "alice".into(),
                    tenant: other(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );
    expect(
        "other tenant DeleteMessageForUser",
        code(
            client
                .delete_message_for_user(DeleteMessageForUserRequest {
                    message_id: "m0".into(),
                    user_id: "alice".into(),
                    tenant: other(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );
    expect(
        "other tenant MarkMessageRead",
        code(
            client
                .mark_message_read(MarkMessageReadRequest {
                    message_id: "m0".into(),
                    user_id: "bob".into(),
                    tenant: other(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );
    expect(
        "other tenant SetMessageAttributes",
        code(
            client
                .set_message_attributes(SetMessageAttributesRequest {
                    context: actor("admin", ActorType::TenantAdmin),
                    tenant: other(),
                    message_id: "m0".into(),
                    attributes: HashMap::from([("x".to_owned(), "y".to_owned())]),
                    tags: vec!["stolen".into()],
                })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );
    let cleared = client
        .clear_session(ClearSessionRequest {
            session_id: chat.session.clone(),
            user_id: "alice".into(),
            clear_type: ClearType::ClearAll as i32,
            tenant: other(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(cleared.cleared_count, 0, "a clear in another tenant covers nothing here");
    let page = client
        .query_messages(QueryMessagesRequest {
            session_id: chat.session.clone(),
            limit: 10,
            context: as_user("alice"),
            tenant: other(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(page.messages.is_empty(), "QueryMessages in another tenant");
    let by_seq = client
        .query_messages_by_seq(QueryMessagesBySeqRequest {
            session_id: chat.session.clone(),
            user_id: "alice".into(),
            limit: 10,
            tenant: other(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(by_seq.messages.is_empty(), "QueryMessagesBySeq in another tenant");
    let search = client
        .search_messages(SearchMessagesRequest {
            tenant: other(),
            filters: vec![FilterExpression {
                field: "content".into(),
                op: FilterOperator::Contains as i32,
                values: vec!["text".into()],
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(search.messages.is_empty(), "SearchMessages in another tenant");
    let tags = client.list_message_tags(ListMessageTagsRequest { context: None, tenant: other() }).await?.into_inner();
    assert!(tags.tags.is_empty(), "ListMessageTags in another tenant");
    let mut export = client
        .stream_export_messages(ExportMessagesRequest {
            session_id: chat.session.clone(),
            tenant: other(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut exported = 0;
    while let Some(chunk) = export.next().await {
        exported += chunk?.messages.len();
    }
    assert_eq!(exported, 0, "StreamExportMessages in another tenant");
    let states = client
        .get_session_states(GetSessionStatesRequest {
            context: as_user("bob"),
            tenant: other(),
            session_ids: vec![chat.session.clone()],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        states.states.iter().map(|state| state.last_seq).collect::<Vec<_>>(),
        [0],
        "GetSessionStates in another tenant"
    );
    let marked = client
        .mark_session_read(MarkSessionReadRequest {
            session_id: chat.session.clone(),
            user_id: "alice".into(),
            tenant: other(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(marked.read_seq, 0, "MarkSessionRead in another tenant");

    // Other user: mallory may neither act for alice or bob nor read their views.
    expect(
        "other user DeleteMessageForUser",
        code(
            client
                .delete_message_for_user(DeleteMessageForUserRequest {
                    message_id: "m0".into(),
                    user_id: "alice".into(),
                    context: as_user("mallory"),
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "other user ClearSession",
        code(
            client
                .clear_session(ClearSessionRequest {
                    session_id: chat.session.clone(),
                    user_id: "alice".into(),
                    clear_type: ClearType::ClearAll as i32,
                    context: as_user("mallory"),
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "other user MarkMessageRead",
        code(
            client
                .mark_message_read(MarkMessageReadRequest {
                    message_id: "m0".into(),
                    user_id: "bob".into(),
                    context: as_user("mallory"),
                    tenant: own(),
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "other user QueryMessagesBySeq as bob",
        code(
            client
                .query_messages_by_seq(QueryMessagesBySeqRequest {
                    session_id: chat.session.clone(),
                    user_id: "bob".into(),
                    context: as_user("mallory"),
                    limit: 10,
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "other user GetSessionStates as bob",
        code(
            client
                .get_session_states(GetSessionStatesRequest {
                    user_id: "bob".into(),
                    context: as_user("mallory"),
                    tenant: own(),
                    session_ids: vec![chat.session.clone()],
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "other user MarkSessionRead for alice",
        code(
            client
                .mark_session_read(MarkSessionReadRequest {
                    session_id: chat.session.clone(),
                    user_id: "alice".into(),
                    context: as_user("mallory"),
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "outsider DeleteMessageForUser on a message not theirs",
        code(
            client
                .delete_message_for_user(DeleteMessageForUserRequest {
                    message_id: "m0".into(),
                    user_id: "mallory".into(),
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );
    expect(
        "outsider MarkMessageRead on a message not theirs",
        code(
            client
                .mark_message_read(MarkMessageReadRequest {
                    message_id: "m0".into(),
                    user_id: "mallory".into(),
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::NotFound,
    );

    // Non-sender: bob, the receiver of alice's m0, may not change it for everyone.
    expect(
        "non-sender DeleteMessage",
        code(
            client
                .delete_message(DeleteMessageRequest {
                    session_id: chat.session.clone(),
                    message_ids: vec!["m0".into()],
                    context: as_user("bob"),
                    tenant: own(),
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "non-sender RecallMessage",
        code(
            client
                .recall_message(RecallMessageRequest {
                    message_id: "m0".into(),
                    operator_id: "bob".into(),
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "non-sender SetMessageAttributes",
        code(
            client
                .set_message_attributes(SetMessageAttributesRequest {
                    context: as_user("bob"),
                    tenant: own(),
                    message_id: "m0".into(),
                    attributes: HashMap::from([("pinned".to_owned(), "no".to_owned())]),
                    tags: vec!["bobs".into()],
                })
                .await
                .map(drop),
        ),
        Code::PermissionDenied,
    );
    expect(
        "sender MarkMessageRead on their own message",
        code(
            client
                .mark_message_read(MarkMessageReadRequest {
                    message_id: "m0".into(),
                    user_id: "alice".into(),
                    tenant: own(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Code::FailedPrecondition,
    );

    // Nothing changed: bob's hide is his alone, m0 is as alice left it, and the tags are hers.
    assert_eq!(chat.visible_to("alice").await?, ids(&["m3", "m2", "m1", "m0"]));
    assert_eq!(chat.visible_to("bob").await?, ids(&["m3", "m2", "m0"]));
    assert_eq!(chat.visible_to("mallory").await?, ids(&["m3", "m2", "m1", "m0"]));
    let m0 = chat.get("alice", "m0").await?.map_err(|code| anyhow::anyhow!("{code:?}"))?;
    assert!(!m0.is_recalled && m0.read_by.is_empty());
    assert_eq!(m0.tags, ["secret-tag"]);
    assert_eq!(m0.attributes, HashMap::from([("pinned".to_owned(), "yes".to_owned())]));
    assert_eq!(text(&m0), Some("text 0"));
    let tags = client.list_message_tags(ListMessageTagsRequest { context: None, tenant: own() }).await?.into_inner();
    assert_eq!(tags.tags, ["secret-tag"]);
    assert_eq!(chat.unread("alice").await?, (3, 1), "alice has bob's m3 unread still");
    assert_eq!(chat.unread("bob").await?, (4, 0));
    eprintln!("refused as expected:\n  {}", refused.join("\n  "));
    chat.stop().await
}

/// With `REDIS_WAIT_REPLICAS=1` a command answers only once a replica holds its cache writes,
/// so a failover cannot lose what its reply stands for. On a Redis without replicas the command
/// answers UNAVAILABLE (its database change is made; it is repeated once Redis can answer),
/// while the same command without the setting succeeds there; on the cluster it answers OK and
/// the page shows what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_waits_for_a_replica_when_asked() -> anyhow::Result<()> {
    let chat = Conversation::start(Store::Postgres, 4).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut alone = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let alone_url = format!("redis://127.0.0.1:{port}");
    let reader = |redis: String, wait_replicas: usize| {
        RunningReader::start_configured(&chat.database.url, Some(redis), move |config| {
            config.redis_wait_replicas = wait_replicas;
        })
    };
    let delete = |id: &str, sender: &str| DeleteMessageRequest {
        session_id: chat.session.clone(),
        message_ids: vec![id.into()],
        context: as_user(sender),
        tenant: tenant(&chat.tenant),
    };
    async fn page(reader: &RunningReader, chat: &Conversation) -> anyhow::Result<Vec<String>> {
        let request = QueryMessagesRequest {
            session_id: chat.session.clone(),
            context: as_user("alice"),
            tenant: tenant(&chat.tenant),
            ..Default::default()
        };
        let page = reader.client().await?.query_messages(request).await?.into_inner();
        Ok(page.messages.iter().map(|message| message.id.clone()).collect())
    }

    let mut redis = eventually(Duration::from_secs(10), "the lone Redis answers", || async {
        Ok(redis::Client::open(alone_url.as_str())?.get_multiplexed_async_connection().await.ok())
    })
    .await?;
    // Both readers use the lone Redis: a page fills its window first.
    let waiting = reader(alone_url.clone(), 1).await?;
    let control = reader(alone_url.clone(), 0).await?;
    eventually(Duration::from_secs(20), "the window filled in the lone Redis", || {
        let (waiting, chat, mut redis) = (&waiting, &chat, redis.clone());
        async move {
            let shown = page(waiting, chat).await?;
            let keys: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await?;
            Ok((shown.len() == 4 && keys > 0).then_some(()))
        }
    })
    .await?;
    let refused = waiting.client().await?.delete_message(delete("m0", "alice")).await.expect_err("no replica");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let done = control.client().await?.delete_message(delete("m2", "alice")).await?.into_inner();
    assert_eq!(done.deleted_count, 1, "without the setting the same Redis answers");
    waiting.stop().await?;
    control.stop().await?;
    let _: () = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async(&mut redis)
        .await
        .or_else(|_| Ok::<(), redis::RedisError>(()))?;
    alone.wait()?;

    // On the cluster, whose masters have a replica each, the command answers.
    // A whole cluster whose masters each have their replica in sync (after a failover the
    // rejoined node may still be syncing, and WAIT would count no replica).
    eventually(Duration::from_secs(60), "a whole cluster, every replica online", || async {
        let seeds = redis_cluster_url();
        if !ClusterNode::whole(&seeds).await? {
            return Ok(None);
        }
        let masters: Vec<ClusterNode> =
            ClusterNode::list(&seeds).await?.into_iter().filter(|node| node.master).collect();
        for master in &masters {
            let url = format!("redis://127.0.0.1:{}", master.port);
            let mut connection = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
            let info: String = redis::cmd("INFO").arg("replication").query_async(&mut connection).await?;
            if !info.contains("state=online") {
                return Ok(None);
            }
        }
        Ok((!masters.is_empty()).then_some(()))
    })
    .await?;
    let clustered = reader(redis_cluster_url(), 1).await?;
    let done = clustered.client().await?.delete_message(delete("m1", "bob")).await?.into_inner();
    assert_eq!(done.deleted_count, 1);
    assert_eq!(page(&clustered, &chat).await?, ["m3"], "m0 (deleted in the database), m1 and m2 are gone");
    clustered.stop().await?;
    Ok(())
}
