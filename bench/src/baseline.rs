//! The reader benchmark's yardsticks, each run as its own process like the reader:
//! `flare-storage-bench empty-server` answers every call at once with an empty response — the
//! most this machine's gRPC stack can serve — and `canned-server` answers QueryMessages,
//! GetMessage and QueryMessagesBySeq with the very responses the reader gave (captured by the
//! benchmark), through the reader's own served types: what the same bytes cost to send.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;

use flare_storage_common::prost::Message as _;
use flare_storage_common::proto::serving::storage_reader_service_server::{
    StorageReaderService, StorageReaderServiceServer,
};
use flare_storage_common::proto::serving::{
    GetMessageResponse, QueryMessagesBySeqResponse, QueryMessagesResponse, SearchMessagesResponse,
    StreamExportMessagesResponse,
};
use flare_storage_common::proto::storage::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Responses answered to every call of their RPC (empty by default).
#[derive(Default)]
pub struct Canned {
    pub page: QueryMessagesResponse,
    pub message: GetMessageResponse,
    pub by_seq: QueryMessagesBySeqResponse,
}

impl Canned {
    /// Writes the three responses, length-delimited, for `canned-server --responses`.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        self.page.encode_length_delimited(&mut bytes)?;
        self.message.encode_length_delimited(&mut bytes)?;
        self.by_seq.encode_length_delimited(&mut bytes)?;
        Ok(std::fs::write(path, bytes)?)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)?;
        let mut buf = bytes.as_slice();
        Ok(Self {
            page: QueryMessagesResponse::decode_length_delimited(&mut buf)?,
            message: GetMessageResponse::decode_length_delimited(&mut buf)?,
            by_seq: QueryMessagesBySeqResponse::decode_length_delimited(&mut buf)?,
        })
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl StorageReaderService for Canned {
    async fn query_messages(&self, _: Request<QueryMessagesRequest>) -> Reply<QueryMessagesResponse> {
        Ok(Response::new(self.page.clone()))
    }

    async fn search_messages(&self, _: Request<SearchMessagesRequest>) -> Reply<SearchMessagesResponse> {
        Ok(Response::new(SearchMessagesResponse::default()))
    }

    async fn get_message(&self, _: Request<GetMessageRequest>) -> Reply<GetMessageResponse> {
        Ok(Response::new(self.message.clone()))
    }

    async fn delete_message(&self, _: Request<DeleteMessageRequest>) -> Reply<DeleteMessageResponse> {
        Ok(Response::new(DeleteMessageResponse::default()))
    }

    async fn recall_message(&self, _: Request<RecallMessageRequest>) -> Reply<RecallMessageResponse> {
        Ok(Response::new(RecallMessageResponse::default()))
    }

    async fn delete_message_for_user(
        &self,
        _: Request<DeleteMessageForUserRequest>,
    ) -> Reply<DeleteMessageForUserResponse> {
        Ok(Response::new(DeleteMessageForUserResponse::default()))
    }

    async fn clear_session(&self, _: Request<ClearSessionRequest>) -> Reply<ClearSessionResponse> {
        Ok(Response::new(ClearSessionResponse::default()))
    }

    async fn mark_message_read(&self, _: Request<MarkMessageReadRequest>) -> Reply<MarkMessageReadResponse> {
        Ok(Response::new(MarkMessageReadResponse::default()))
    }

    async fn set_message_attributes(
        &self,
        _: Request<SetMessageAttributesRequest>,
    ) -> Reply<SetMessageAttributesResponse> {
        Ok(Response::new(SetMessageAttributesResponse::default()))
    }

    async fn list_message_tags(&self, _: Request<ListMessageTagsRequest>) -> Reply<ListMessageTagsResponse> {
        Ok(Response::new(ListMessageTagsResponse::default()))
    }

    async fn export_messages(&self, _: Request<ExportMessagesRequest>) -> Reply<ExportMessagesResponse> {
        Ok(Response::new(ExportMessagesResponse::default()))
    }

    async fn query_messages_by_seq(&self, _: Request<QueryMessagesBySeqRequest>) -> Reply<QueryMessagesBySeqResponse> {
        Ok(Response::new(self.by_seq.clone()))
    }

    type StreamExportMessagesStream =
        Pin<Box<dyn Stream<Item = Result<StreamExportMessagesResponse, Status>> + Send + 'static>>;

    async fn stream_export_messages(
        &self,
        _: Request<ExportMessagesRequest>,
    ) -> Reply<Self::StreamExportMessagesStream> {
        Ok(Response::new(Box::pin(tokio_stream::empty())))
    }

    async fn get_export_task(&self, _: Request<GetExportTaskRequest>) -> Reply<GetExportTaskResponse> {
        Ok(Response::new(GetExportTaskResponse::default()))
    }

    async fn get_session_states(&self, _: Request<GetSessionStatesRequest>) -> Reply<GetSessionStatesResponse> {
        Ok(Response::new(GetSessionStatesResponse::default()))
    }

    async fn mark_session_read(&self, _: Request<MarkSessionReadRequest>) -> Reply<MarkSessionReadResponse> {
        Ok(Response::new(MarkSessionReadResponse::default()))
    }
}

pub async fn serve(addr: SocketAddr, canned: Canned) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(StorageReaderServiceServer::new(canned))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
