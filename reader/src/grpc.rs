//! The `flare.storage.v1.StorageReaderService` gRPC surface: validates requests (naming the
//! offending field), calls `lookup`, fills `status` with `ERROR_CODE_OK` on success, and
//! records per-RPC metrics.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use flare_storage_common::message::{check_id, is_unset, storable_time, to_timestamp};
use flare_storage_common::prost_types;
use flare_storage_common::proto::EncodedMessage;
use flare_storage_common::proto::common::{ActorType, ErrorCode, Pagination, RequestContext, RpcStatus, TenantContext};
use flare_storage_common::proto::serving::storage_reader_service_server::StorageReaderService;
use flare_storage_common::proto::serving::{
    GetMessageResponse, QueryMessagesBySeqResponse, QueryMessagesResponse, SearchMessagesResponse,
    StreamExportMessagesResponse,
};
use flare_storage_common::proto::storage::*;
use flare_storage_common::tonic::{self, Code, Request, Response, Status};
use futures::TryStreamExt as _;
use tokio_stream::Stream;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::commands::Commands;
use crate::cursor::Cursor;
use crate::error::Error;
use crate::export::{Exports, State};
use crate::lookup::{Lookup, PageQuery, SeqQuery};
use crate::metrics::Metrics;
use crate::permissions::{self, Actor, privileged};
use crate::search::{CURSOR_SCOPE, SearchQuery};
use crate::sessions::{SessionView, Sessions};
use crate::store::Databases;

pub struct StorageReader {
    pub lookup: Lookup,
    pub commands: Arc<Commands>,
    pub sessions: Arc<Sessions>,
    /// Commands running to their end (see [`StorageReader::to_completion`]); shutdown waits
    /// for them.
    pub commands_running: TaskTracker,
    /// Export jobs of the unary ExportMessages; `None` without an export directory.
    pub exports: Option<Exports>,
    pub metrics: Metrics,
}

/// Most message ids one DeleteMessage may name.
const MAX_IDS_PER_DELETE: usize = 500;
/// Most sessions one GetSessionStates may name.
const MAX_SESSIONS_PER_STATE_REQUEST: usize = 500;
const MAX_ATTRIBUTES: usize = 64;
const MAX_ATTRIBUTE_VALUE_BYTES: usize = 4096;
const MAX_TAGS: usize = 32;

type Reply<T> = Result<Response<T>, Status>;

impl StorageReader {
    /// Runs a command to its end even when its caller goes away (a cancelled RPC drops its
    /// future), and shutdown waits for it: a command stopped between its database write and
    /// its cache write would leave the hot window showing the message as it was — a deleted
    /// message listed, a recalled one with its content. A retry of a command that did complete
    /// changes nothing more.
    fn to_completion<T: Send + 'static>(
        &self,
        command: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> impl Future<Output = Result<T, Error>> {
        let running = self.commands_running.clone();
        // Spawned when first polled: inside the RPC's span and timing.
        async move { running.spawn(command.in_current_span()).await.unwrap_or_else(|_| Err(Error::Interrupted)) }
    }

    /// Runs one RPC body in a span (`rpc`, then `tenant_id` and `session_id` once parsed;
    /// never message content), timing it and counting it by outcome.
    async fn observe<T>(&self, rpc: &'static str, body: impl Future<Output = Result<T, Error>>) -> Reply<T> {
        let started = Instant::now();
        let in_flight = self.metrics.in_flight.with_label_values(&[rpc]);
        in_flight.inc();
        // Counted down however the call ends, a cancelled one included.
        let _in_flight = scopeguard::guard(in_flight, |gauge| gauge.dec());
        let span =
            tracing::info_span!("rpc", rpc, tenant_id = tracing::field::Empty, session_id = tracing::field::Empty);
        let result = body.instrument(span.clone()).await.map_err(Status::from);
        let code = match &result {
            Ok(_) => "OK".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        if let Err(status) = &result
            && matches!(status.code(), Code::Internal | Code::Unavailable)
        {
            span.in_scope(|| tracing::warn!(code, message = status.message(), "rpc failed"));
        }
        self.metrics.queries.with_label_values(&[rpc, &code]).inc();
        self.metrics.query_latency.with_label_values(&[rpc]).observe(started.elapsed().as_secs_f64());
        result.map(Response::new)
    }
}

fn session_state(view: SessionView) -> SessionState {
    SessionState {
        session_id: view.session_id,
        last_seq: view.last_seq,
        last_message_id: view.last_message_id,
        last_sender_id: view.last_sender_id,
        last_message_time: view.last_message_time.map(to_timestamp),
        message_count: view.message_count,
        read_seq: view.read_seq,
        unread_count: view.unread_count,
    }
}

fn ok_status() -> Option<RpcStatus> {
    Some(RpcStatus { code: ErrorCode::Ok as i32, ..Default::default() })
}

/// The tenant a request is scoped to; an absent tenant is the default tenant `""`.
fn tenant_of(tenant: Option<&TenantContext>) -> Result<&str, Error> {
    let tenant_id = tenant.map(|tenant| tenant.tenant_id.as_str()).unwrap_or("");
    require_id("tenant.tenant_id", tenant_id, false)?;
    tracing::Span::current().record("tenant_id", tenant_id);
    Ok(tenant_id)
}

fn require_id(field: &'static str, value: &str, required: bool) -> Result<(), Error> {
    if field == "session_id" {
        tracing::Span::current().record("session_id", value);
    }
    check_id(field, value, required).map_err(|invalid| Error::invalid(field, invalid.to_string()))
}

/// The caller as `context.actor` names it, if it does.
fn context_actor(context: Option<&RequestContext>) -> Option<(&str, bool)> {
    let actor = context?.actor.as_ref()?;
    let kind = ActorType::try_from(actor.r#type).unwrap_or(ActorType::Unspecified);
    (!actor.actor_id.is_empty()).then_some((actor.actor_id.as_str(), privileged(kind)))
}

/// The acting user (SPEC §2.3): the request's own user field `field` when set, else
/// `context.actor.actor_id`. A context actor that is neither that user nor privileged may
/// not act for them.
fn acting_user<'a>(own: &'a str, field: &'static str, context: Option<&'a RequestContext>) -> Result<Actor<'a>, Error> {
    require_id(field, own, false)?;
    let caller = context_actor(context);
    if let Some((caller_id, _)) = caller {
        require_id("context.actor.actor_id", caller_id, true)?;
    }
    match (own.is_empty(), caller) {
        (true, Some((caller_id, privileged))) => Ok(Actor { id: caller_id, privileged }),
        (true, None) => Err(Error::invalid(field, "or context.actor.actor_id is required")),
        (false, Some((caller_id, privileged))) => {
            permissions::may_act_for(Actor { id: caller_id, privileged }, own)?;
            Ok(Actor { id: own, privileged })
        }
        (false, None) => Ok(Actor { id: own, privileged: false }),
    }
}

/// The user whose view a read returns: the request's own user field, else
/// `context.actor.actor_id`, else nobody's (''). Another user's view (what they deleted or
/// cleared) is theirs: a context actor that is neither that user nor privileged may not read it.
fn reading_user<'a>(own: &'a str, context: Option<&'a RequestContext>) -> Result<&'a str, Error> {
    require_id("user_id", own, false)?;
    let caller = context_actor(context);
    if let Some((caller_id, _)) = caller {
        require_id("context.actor.actor_id", caller_id, true)?;
    }
    match caller {
        Some((caller_id, privileged)) if !own.is_empty() => {
            permissions::may_read_view_of(Actor { id: caller_id, privileged }, own)?;
            Ok(own)
        }
        _ if !own.is_empty() => Ok(own),
        Some((caller_id, _)) => Ok(caller_id),
        None => Ok(""),
    }
}

/// A request time; a zero one (what a default-initialised client sends) counts as not given.
fn protobuf_time(field: &'static str, time: Option<&prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>, Error> {
    match time {
        None => Ok(None),
        Some(time) if is_unset(time) => Ok(None),
        Some(time) => {
            storable_time(field, time).map(Some).map_err(|invalid| Error::invalid(field, invalid.to_string()))
        }
    }
}

/// Epoch milliseconds from a request; 0 means not given.
fn millis(field: &'static str, value: i64) -> Result<Option<DateTime<Utc>>, Error> {
    match value {
        0 => Ok(None),
        negative if negative < 0 => Err(Error::invalid(field, "must be epoch milliseconds, not negative")),
        value => {
            DateTime::from_timestamp_millis(value).map(Some).ok_or_else(|| Error::invalid(field, "is out of range"))
        }
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<StreamExportMessagesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl StorageReaderService for StorageReader {
    async fn query_messages(&self, request: Request<QueryMessagesRequest>) -> Reply<QueryMessagesResponse> {
        self.observe("QueryMessages", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            require_id("session_id", &request.session_id, true)?;
            let user = reading_user("", request.context.as_ref())?;
            let pagination = request.pagination.clone().unwrap_or_default();
            let limit = if request.limit != 0 { request.limit } else { pagination.limit };
            let limit = u32::try_from(limit).map_err(|_| Error::invalid("limit", "must not be negative"))?;
            let cursor_text = if request.cursor.is_empty() { pagination.cursor } else { request.cursor.clone() };
            let after = match cursor_text.as_str() {
                "" => None,
                text => Some(
                    Cursor::decode(text, tenant_id, &request.session_id)
                        .map_err(|error| Error::invalid("cursor", error.to_string()))?,
                ),
            };
            let page = self
                .lookup
                .session_page(PageQuery {
                    tenant_id,
                    session_id: &request.session_id,
                    from: millis("start_time", request.start_time)?,
                    to: millis("end_time", request.end_time)?,
                    limit,
                    after,
                    user,
                })
                .await?;
            let next_cursor = page.next_cursor.unwrap_or_default();
            let has_more = !next_cursor.is_empty();
            Ok(QueryMessagesResponse {
                messages: page.messages,
                pagination: Some(Pagination {
                    cursor: next_cursor.clone(),
                    limit: i32::try_from(page.limit).unwrap_or(i32::MAX),
                    has_more,
                    previous_cursor: cursor_text,
                    // Not computed: counting a session on every page is O(session).
                    total_size: 0,
                }),
                next_cursor,
                has_more,
                status: ok_status(),
            })
        })
        .await
    }

    async fn get_message(&self, request: Request<GetMessageRequest>) -> Reply<GetMessageResponse> {
        self.observe("GetMessage", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            require_id("message_id", &request.message_id, true)?;
            let user = reading_user("", request.context.as_ref())?;
            let message = self.lookup.message(tenant_id, &request.message_id, user).await?;
            Ok(GetMessageResponse { message: Some(message), status: ok_status() })
        })
        .await
    }

    async fn search_messages(&self, request: Request<SearchMessagesRequest>) -> Reply<SearchMessagesResponse> {
        self.observe("SearchMessages", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            let user = reading_user("", request.context.as_ref())?;
            let mut query = SearchQuery::parse(tenant_id, user, &request.filters, &request.sort)?;
            let pagination = request.pagination.unwrap_or_default();
            query.limit = u32::try_from(pagination.limit)
                .map_err(|_| Error::invalid("pagination.limit", "must not be negative"))?;
            if !pagination.cursor.is_empty() {
                query.after = Some(
                    Cursor::decode(&pagination.cursor, tenant_id, CURSOR_SCOPE)
                        .map_err(|error| Error::invalid("pagination.cursor", error.to_string()))?,
                );
            }
            let time_range = request.time_range.unwrap_or_default();
            query.from = protobuf_time("time_range.start_time", time_range.start_time.as_ref())?;
            query.to = protobuf_time("time_range.end_time", time_range.end_time.as_ref())?;
            if let (Some(from), Some(to)) = (query.from, query.to)
                && from > to
            {
                return Err(Error::invalid("time_range", "start_time is after end_time"));
            }
            let page = self.lookup.search(query).await?;
            let next_cursor = page.next_cursor.unwrap_or_default();
            Ok(SearchMessagesResponse {
                messages: page.messages,
                pagination: Some(Pagination {
                    has_more: !next_cursor.is_empty(),
                    cursor: next_cursor,
                    limit: i32::try_from(page.limit).unwrap_or(i32::MAX),
                    previous_cursor: pagination.cursor,
                    total_size: 0,
                }),
                status: ok_status(),
            })
        })
        .await
    }

    async fn delete_message(&self, request: Request<DeleteMessageRequest>) -> Reply<DeleteMessageResponse> {
        let commands = self.commands.clone();
        self.observe(
            "DeleteMessage",
            self.to_completion(async move {
                let request = request.into_inner();
                let tenant_id = tenant_of(request.tenant.as_ref())?;
                require_id("session_id", &request.session_id, true)?;
                if request.message_ids.is_empty() || request.message_ids.len() > MAX_IDS_PER_DELETE {
                    return Err(Error::invalid("message_ids", format!("must name 1 to {MAX_IDS_PER_DELETE} messages")));
                }
                for message_id in &request.message_ids {
                    require_id("message_ids", message_id, true)?;
                }
                let actor = acting_user("", "context.actor.actor_id", request.context.as_ref())?;
                let deleted = commands.delete(tenant_id, &request.session_id, &request.message_ids, actor).await?;
                Ok(DeleteMessageResponse { success: true, deleted_count: deleted, status: ok_status() })
            }),
        )
        .await
    }

    async fn recall_message(&self, request: Request<RecallMessageRequest>) -> Reply<RecallMessageResponse> {
        let commands = self.commands.clone();
        self.observe(
            "RecallMessage",
            self.to_completion(async move {
                let request = request.into_inner();
                let tenant_id = tenant_of(request.tenant.as_ref())?;
                require_id("message_id", &request.message_id, true)?;
                let actor = acting_user(&request.operator_id, "operator_id", request.context.as_ref())?;
                let requested = match request.recall_time_limit_seconds {
                    0 => None,
                    seconds => Some(Duration::from_secs(
                        u64::try_from(seconds)
                            .map_err(|_| Error::invalid("recall_time_limit_seconds", "must not be negative"))?,
                    )),
                };
                if request.reason.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                    return Err(Error::invalid("reason", format!("is longer than {MAX_ATTRIBUTE_VALUE_BYTES} bytes")));
                }
                let recalled_at =
                    commands.recall(tenant_id, &request.message_id, actor.id, requested, &request.reason).await?;
                Ok(RecallMessageResponse {
                    success: true,
                    error_message: String::new(),
                    recalled_at: Some(to_timestamp(recalled_at)),
                    status: ok_status(),
                })
            }),
        )
        .await
    }

    async fn delete_message_for_user(
        &self,
        request: Request<DeleteMessageForUserRequest>,
    ) -> Reply<DeleteMessageForUserResponse> {
        let commands = self.commands.clone();
        self.observe(
            "DeleteMessageForUser",
            self.to_completion(async move {
                let request = request.into_inner();
                let tenant_id = tenant_of(request.tenant.as_ref())?;
                require_id("message_id", &request.message_id, true)?;
                let actor = acting_user(&request.user_id, "user_id", request.context.as_ref())?;
                let deleted =
                    commands.delete_for_user(tenant_id, &request.message_id, actor.id, request.permanent).await?;
                Ok(DeleteMessageForUserResponse { success: true, deleted_count: deleted, status: ok_status() })
            }),
        )
        .await
    }

    async fn clear_session(&self, request: Request<ClearSessionRequest>) -> Reply<ClearSessionResponse> {
        let commands = self.commands.clone();
        self.observe(
            "ClearSession",
            self.to_completion(async move {
                let request = request.into_inner();
                let tenant_id = tenant_of(request.tenant.as_ref())?;
                require_id("session_id", &request.session_id, true)?;
                require_id("clear_before_message_id", &request.clear_before_message_id, false)?;
                let actor = acting_user(&request.user_id, "user_id", request.context.as_ref())?;
                let before_time = protobuf_time("clear_before_time", request.clear_before_time.as_ref())?;
                let up_to = Commands::clear_up_to(request.clear_type, &request.clear_before_message_id, before_time)?;
                let (cleared, _watermark) = commands.clear(tenant_id, &request.session_id, actor.id, up_to).await?;
                Ok(ClearSessionResponse {
                    success: true,
                    error_message: String::new(),
                    cleared_count: i32::try_from(cleared).unwrap_or(i32::MAX),
                    cleared_at: Some(to_timestamp(Utc::now())),
                    status: ok_status(),
                })
            }),
        )
        .await
    }

    async fn mark_message_read(&self, request: Request<MarkMessageReadRequest>) -> Reply<MarkMessageReadResponse> {
        let commands = self.commands.clone();
        self.observe(
            "MarkMessageRead",
            self.to_completion(async move {
                let request = request.into_inner();
                let tenant_id = tenant_of(request.tenant.as_ref())?;
                require_id("message_id", &request.message_id, true)?;
                let actor = acting_user(&request.user_id, "user_id", request.context.as_ref())?;
                let (read_at, burned_at) = commands.mark_read(tenant_id, &request.message_id, actor.id).await?;
                Ok(MarkMessageReadResponse {
                    success: true,
                    error_message: String::new(),
                    read_at: Some(to_timestamp(read_at)),
                    burned_at: burned_at.map(to_timestamp),
                    status: ok_status(),
                })
            }),
        )
        .await
    }

    async fn set_message_attributes(
        &self,
        request: Request<SetMessageAttributesRequest>,
    ) -> Reply<SetMessageAttributesResponse> {
        let commands = self.commands.clone();
        self.observe(
            "SetMessageAttributes",
            self.to_completion(async move {
                let request = request.into_inner();
                let tenant_id = tenant_of(request.tenant.as_ref())?;
                require_id("message_id", &request.message_id, true)?;
                let actor = acting_user("", "context.actor.actor_id", request.context.as_ref())?;
                if request.attributes.len() > MAX_ATTRIBUTES {
                    return Err(Error::invalid("attributes", format!("at most {MAX_ATTRIBUTES} entries")));
                }
                for (key, value) in &request.attributes {
                    require_id("attributes", key, true)?;
                    if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                        return Err(Error::invalid(
                            "attributes",
                            format!("value of {key:?} is over {MAX_ATTRIBUTE_VALUE_BYTES} bytes"),
                        ));
                    }
                }
                if request.tags.len() > MAX_TAGS {
                    return Err(Error::invalid("tags", format!("at most {MAX_TAGS} tags")));
                }
                for tag in &request.tags {
                    require_id("tags", tag, true)?;
                }
                commands
                    .set_attributes(tenant_id, &request.message_id, &request.attributes, &request.tags, actor)
                    .await?;
                Ok(SetMessageAttributesResponse { status: ok_status() })
            }),
        )
        .await
    }

    async fn list_message_tags(&self, request: Request<ListMessageTagsRequest>) -> Reply<ListMessageTagsResponse> {
        self.observe("ListMessageTags", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            let tags = self.commands.tags(tenant_id).await?;
            Ok(ListMessageTagsResponse { tags, status: ok_status() })
        })
        .await
    }

    async fn export_messages(&self, request: Request<ExportMessagesRequest>) -> Reply<ExportMessagesResponse> {
        self.observe("ExportMessages", async {
            let request = request.into_inner();
            let query = export_query(&request)?;
            let Some(exports) = &self.exports else {
                return Err(Error::FailedPrecondition(
                    "export jobs need STORAGE_READER_EXPORT_DIR on the reader; StreamExportMessages exports without it"
                        .into(),
                ));
            };
            let export_task_id = exports.start(query, &request.session_id).await?;
            Ok(ExportMessagesResponse { export_task_id, status: ok_status() })
        })
        .await
    }

    async fn get_session_states(&self, request: Request<GetSessionStatesRequest>) -> Reply<GetSessionStatesResponse> {
        self.observe("GetSessionStates", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            let user = reading_user(&request.user_id, request.context.as_ref())?;
            if user.is_empty() {
                return Err(Error::invalid("user_id", "or context.actor.actor_id is required"));
            }
            if request.session_ids.is_empty() || request.session_ids.len() > MAX_SESSIONS_PER_STATE_REQUEST {
                return Err(Error::invalid(
                    "session_ids",
                    format!("give 1 to {MAX_SESSIONS_PER_STATE_REQUEST} sessions"),
                ));
            }
            for session_id in &request.session_ids {
                check_id("session_ids", session_id, true)
                    .map_err(|invalid| Error::invalid("session_ids", invalid.to_string()))?;
            }
            let views = self.sessions.states(tenant_id, user, &request.session_ids).await?;
            Ok(GetSessionStatesResponse { states: views.into_iter().map(session_state).collect(), status: ok_status() })
        })
        .await
    }

    async fn mark_session_read(&self, request: Request<MarkSessionReadRequest>) -> Reply<MarkSessionReadResponse> {
        let sessions = self.sessions.clone();
        self.observe(
            "MarkSessionRead",
            self.to_completion(async move {
                let request = request.into_inner();
                let tenant_id = tenant_of(request.tenant.as_ref())?;
                require_id("session_id", &request.session_id, true)?;
                let actor = acting_user(&request.user_id, "user_id", request.context.as_ref())?;
                if request.read_seq < 0 {
                    return Err(Error::invalid("read_seq", "must not be negative (0 = up to the last seq)"));
                }
                let view = sessions.mark_read(tenant_id, &request.session_id, actor.id, request.read_seq).await?;
                Ok(MarkSessionReadResponse {
                    read_seq: view.read_seq,
                    unread_count: view.unread_count,
                    status: ok_status(),
                })
            }),
        )
        .await
    }

    async fn get_export_task(&self, request: Request<GetExportTaskRequest>) -> Reply<GetExportTaskResponse> {
        self.observe("GetExportTask", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            require_id("export_task_id", &request.export_task_id, true)?;
            let Some(exports) = &self.exports else { return Err(Error::NotFound("export task")) };
            let manifest = exports.manifest(tenant_id, &request.export_task_id).await?;
            Ok(GetExportTaskResponse {
                export_task_id: manifest.task_id,
                state: match manifest.state {
                    State::Running => ExportTaskState::Running,
                    State::Completed => ExportTaskState::Completed,
                    State::Failed => ExportTaskState::Failed,
                } as i32,
                message_count: i64::try_from(manifest.message_count).unwrap_or(i64::MAX),
                location: manifest.location,
                error: manifest.error.unwrap_or_default(),
                started_at: Some(to_timestamp(manifest.started_at)),
                finished_at: manifest.finished_at.map(to_timestamp),
                status: ok_status(),
            })
        })
        .await
    }

    async fn query_messages_by_seq(
        &self,
        request: Request<QueryMessagesBySeqRequest>,
    ) -> Reply<QueryMessagesBySeqResponse> {
        self.observe("QueryMessagesBySeq", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            require_id("session_id", &request.session_id, true)?;
            let user = reading_user(&request.user_id, request.context.as_ref())?;
            if request.after_seq < 0 {
                return Err(Error::invalid("after_seq", "must not be negative"));
            }
            let before = match request.before_seq {
                0 => i64::MAX,
                before if before < 0 => return Err(Error::invalid("before_seq", "must not be negative")),
                before => before,
            };
            let limit = u32::try_from(request.limit).map_err(|_| Error::invalid("limit", "must not be negative"))?;
            let page = self
                .lookup
                .seq_range(SeqQuery {
                    tenant_id,
                    session_id: &request.session_id,
                    after: request.after_seq,
                    before,
                    limit,
                    user,
                })
                .await?;
            let last_seq = page.last_seq.unwrap_or(request.after_seq);
            Ok(QueryMessagesBySeqResponse {
                messages: page.messages,
                next_cursor: if page.has_more { last_seq.to_string() } else { String::new() },
                has_more: page.has_more,
                last_seq,
                status: ok_status(),
            })
        })
        .await
    }

    type StreamExportMessagesStream = ExportStream;

    async fn stream_export_messages(&self, request: Request<ExportMessagesRequest>) -> Reply<ExportStream> {
        self.observe("StreamExportMessages", async {
            let query = export_query(&request.into_inner())?;
            Ok(Box::pin(export_stream(self.lookup.databases.clone(), query)) as ExportStream)
        })
        .await
    }
}

/// What an export request selects: one session of the tenant, oldest first, as the acting
/// user sees it, within the time range and filters.
fn export_query(request: &ExportMessagesRequest) -> Result<SearchQuery, Error> {
    let tenant_id = tenant_of(request.tenant.as_ref())?;
    require_id("session_id", &request.session_id, true)?;
    let user = reading_user("", request.context.as_ref())?;
    let mut query = SearchQuery::parse(tenant_id, user, &request.filters, &[])?;
    query.session_id.include = Some(vec![request.session_id.clone()]);
    query.ascending = true;
    let time_range = request.time_range.unwrap_or_default();
    query.from = protobuf_time("time_range.start_time", time_range.start_time.as_ref())?;
    query.to = protobuf_time("time_range.end_time", time_range.end_time.as_ref())?;
    Ok(query)
}

/// Messages exported per stream item.
const EXPORT_CHUNK: i64 = 200;

/// Streams a whole export in chunks, oldest first, each read when the client takes the last.
fn export_stream(
    databases: Databases,
    query: SearchQuery,
) -> impl Stream<Item = Result<StreamExportMessagesResponse, Status>> + Send {
    crate::export::chunks(databases, query, EXPORT_CHUNK)
        .map_ok(|messages| StreamExportMessagesResponse {
            messages: messages.iter().map(EncodedMessage::from).collect(),
            status: ok_status(),
        })
        .map_err(Status::from)
}
