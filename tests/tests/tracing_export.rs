//! OTLP trace export: a reader process given OTEL_EXPORTER_OTLP_ENDPOINT sends its request
//! spans — with tenant and session, without message content — to a collector.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::QueryMessagesRequest;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::tonic::transport::{Channel, Server};
use flare_storage_common::tonic::{Request, Response, Status};
use flare_storage_e2e::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// A received span: (service name, span name, attributes as text).
type ReceivedSpan = (String, String, Vec<(String, String)>);

/// A collector that keeps every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[flare_storage_common::tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let text = |value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match value
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(text)) => text.clone(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let mut spans = self.spans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|resource| resource.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let attributes = span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect();
                    spans.push((service.clone(), span.name, attributes));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_an_otlp_collector() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let collector_addr = listener.local_addr()?;
    let server = tokio::spawn(
        Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let (grpc_port, metrics_port) = (free_port()?, free_port()?);
    let mut reader = Command::new(binary("flare-storage-reader")?)
        .env("POSTGRES_URL", &database.url)
        .env("STORAGE_READER_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector_addr}"))
        .env("RUST_LOG", "info")
        .env_remove("REDIS_URL")
        .stdout(Stdio::null())
        .spawn()?;
    let client = eventually(Duration::from_secs(30), "the reader to listen", || async move {
        match Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))?.connect().await {
            Ok(channel) => Ok(Some(StorageReaderServiceClient::new(channel))),
            Err(_) => Ok(None),
        }
    })
    .await?;
    let tenant = unique("acme");
    client
        .clone()
        .query_messages(QueryMessagesRequest {
            session_id: "traced-session".into(),
            tenant: Some(TenantContext { tenant_id: tenant.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await?;

    // SIGTERM: the reader flushes its spans on the way out.
    Command::new("kill").arg("-TERM").arg(reader.id().to_string()).status()?;
    let status = eventually(Duration::from_secs(30), "the reader to exit", || {
        let status = reader.try_wait();
        async move { Ok(status?) }
    })
    .await?;
    assert!(status.success(), "reader exited with {status}");

    let spans = collector.spans.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let rpc = spans
        .iter()
        .find(|(_, name, attributes)| name == "rpc" && attributes.contains(&("rpc".into(), "QueryMessages".into())))
        .unwrap_or_else(|| panic!("no QueryMessages span among {spans:?}"));
    assert_eq!(rpc.0, "flare-storage-reader");
    assert!(rpc.2.contains(&("tenant_id".into(), tenant)), "{:?}", rpc.2);
    assert!(rpc.2.contains(&("session_id".into(), "traced-session".into())), "{:?}", rpc.2);
    server.abort();
    database.drop().await?;
    Ok(())
}
