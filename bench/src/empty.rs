//! `flare-storage-bench empty-server`: the StorageReaderService with every call answered at
//! once with an empty response — the most this machine's gRPC stack can serve, the reader
//! benchmark's yardstick. Run as its own process, like the reader.

use std::net::SocketAddr;
use std::pin::Pin;

use flare_storage_common::proto::storage::storage_reader_service_server::{
    StorageReaderService, StorageReaderServiceServer,
};
use flare_storage_common::proto::storage::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct EmptyReader;

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl StorageReaderService for EmptyReader {
    async fn query_messages(&self, _: Request<QueryMessagesRequest>) -> Reply<QueryMessagesResponse> {
        Ok(Response::new(QueryMessagesResponse::default()))
    }

    async fn search_messages(&self, _: Request<SearchMessagesRequest>) -> Reply<SearchMessagesResponse> {
        Ok(Response::new(SearchMessagesResponse::default()))
    }

    async fn get_message(&self, _: Request<GetMessageRequest>) -> Reply<GetMessageResponse> {
        Ok(Response::new(GetMessageResponse::default()))
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
        Ok(Response::new(QueryMessagesBySeqResponse::default()))
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

pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(StorageReaderServiceServer::new(EmptyReader))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
