//! The `flare.storage.v1.StorageReaderService` gRPC surface: validates requests (naming the
//! offending field), calls `lookup`, fills `status` with `ERROR_CODE_OK` on success, and
//! records per-RPC metrics.

use std::pin::Pin;
use std::time::Instant;

use chrono::{DateTime, Utc};
use flare_storage_common::message::check_id;
use flare_storage_common::proto::common::{ErrorCode, Pagination, RpcStatus, TenantContext};
use flare_storage_common::proto::storage::storage_reader_service_server::StorageReaderService;
use flare_storage_common::proto::storage::*;
use flare_storage_common::tonic::{self, Request, Response, Status};
use tokio_stream::Stream;

use crate::cursor::Cursor;
use crate::error::Error;
use crate::lookup::{Lookup, PageQuery, SeqQuery};
use crate::metrics::Metrics;

pub struct StorageReader {
    pub lookup: Lookup,
    pub metrics: Metrics,
}

type Reply<T> = Result<Response<T>, Status>;

impl StorageReader {
    /// Runs one RPC body, timing it and counting it by outcome.
    async fn observe<T>(&self, rpc: &'static str, body: impl Future<Output = Result<T, Error>>) -> Reply<T> {
        let started = Instant::now();
        let result = body.await.map_err(Status::from);
        let code = match &result {
            Ok(_) => "OK".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.metrics.queries.with_label_values(&[rpc, &code]).inc();
        self.metrics.query_latency.with_label_values(&[rpc]).observe(started.elapsed().as_secs_f64());
        result.map(Response::new)
    }
}

fn ok_status() -> Option<RpcStatus> {
    Some(RpcStatus { code: ErrorCode::Ok as i32, ..Default::default() })
}

/// The tenant a request is scoped to; an absent tenant is the default tenant `""`.
fn tenant_of(tenant: Option<&TenantContext>) -> Result<&str, Error> {
    let tenant_id = tenant.map(|tenant| tenant.tenant_id.as_str()).unwrap_or("");
    require_id("tenant.tenant_id", tenant_id, false)?;
    Ok(tenant_id)
}

fn require_id(field: &'static str, value: &str, required: bool) -> Result<(), Error> {
    check_id(field, value, required).map_err(|invalid| Error::invalid(field, invalid.to_string()))
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
            let pagination = request.pagination.unwrap_or_default();
            let limit = if request.limit != 0 { request.limit } else { pagination.limit };
            let limit = u32::try_from(limit).map_err(|_| Error::invalid("limit", "must not be negative"))?;
            let cursor_text = if request.cursor.is_empty() { pagination.cursor } else { request.cursor };
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
            let message = self.lookup.message(tenant_id, &request.message_id).await?;
            Ok(GetMessageResponse { message: Some(message), status: ok_status() })
        })
        .await
    }

    async fn search_messages(&self, _: Request<SearchMessagesRequest>) -> Reply<SearchMessagesResponse> {
        self.observe("SearchMessages", async { Err(Error::NotImplemented("SearchMessages")) }).await
    }

    async fn delete_message(&self, _: Request<DeleteMessageRequest>) -> Reply<DeleteMessageResponse> {
        self.observe("DeleteMessage", async { Err(Error::NotImplemented("DeleteMessage")) }).await
    }

    async fn recall_message(&self, _: Request<RecallMessageRequest>) -> Reply<RecallMessageResponse> {
        self.observe("RecallMessage", async { Err(Error::NotImplemented("RecallMessage")) }).await
    }

    async fn delete_message_for_user(
        &self,
        _: Request<DeleteMessageForUserRequest>,
    ) -> Reply<DeleteMessageForUserResponse> {
        self.observe("DeleteMessageForUser", async { Err(Error::NotImplemented("DeleteMessageForUser")) }).await
    }

    async fn clear_session(&self, _: Request<ClearSessionRequest>) -> Reply<ClearSessionResponse> {
        self.observe("ClearSession", async { Err(Error::NotImplemented("ClearSession")) }).await
    }

    async fn mark_message_read(&self, _: Request<MarkMessageReadRequest>) -> Reply<MarkMessageReadResponse> {
        self.observe("MarkMessageRead", async { Err(Error::NotImplemented("MarkMessageRead")) }).await
    }

    async fn set_message_attributes(
        &self,
        _: Request<SetMessageAttributesRequest>,
    ) -> Reply<SetMessageAttributesResponse> {
        self.observe("SetMessageAttributes", async { Err(Error::NotImplemented("SetMessageAttributes")) }).await
    }

    async fn list_message_tags(&self, _: Request<ListMessageTagsRequest>) -> Reply<ListMessageTagsResponse> {
        self.observe("ListMessageTags", async { Err(Error::NotImplemented("ListMessageTags")) }).await
    }

    async fn export_messages(&self, _: Request<ExportMessagesRequest>) -> Reply<ExportMessagesResponse> {
        self.observe("ExportMessages", async { Err(Error::NotImplemented("ExportMessages")) }).await
    }

    async fn query_messages_by_seq(
        &self,
        request: Request<QueryMessagesBySeqRequest>,
    ) -> Reply<QueryMessagesBySeqResponse> {
        self.observe("QueryMessagesBySeq", async {
            let request = request.into_inner();
            let tenant_id = tenant_of(request.tenant.as_ref())?;
            require_id("session_id", &request.session_id, true)?;
            require_id("user_id", &request.user_id, false)?;
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
                })
                .await?;
            let last_seq = page.messages.last().map_or(request.after_seq, |message| message.seq);
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

    async fn stream_export_messages(&self, _: Request<ExportMessagesRequest>) -> Reply<ExportStream> {
        self.observe("StreamExportMessages", async { Err(Error::NotImplemented("StreamExportMessages")) }).await
    }
}
