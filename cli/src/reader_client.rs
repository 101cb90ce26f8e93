//! How `query` and `export` reach the reader: plain or TLS (server CA, client certificate for
//! mutual TLS) and the bearer token, as any gateway would.

use anyhow::Context as _;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::settings::parse;
use flare_storage_common::tonic::metadata::AsciiMetadataValue;
use flare_storage_common::tonic::service::Interceptor;
use flare_storage_common::tonic::service::interceptor::InterceptedService;
use flare_storage_common::tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use flare_storage_common::tonic::{Request, Status};

/// The reader's address and credentials.
#[derive(clap::Args, Clone)]
pub struct ReaderArgs {
    /// The reader's gRPC address; `https://` speaks TLS.
    #[arg(long, env = "STORAGE_READER_ADDR", default_value = "http://127.0.0.1:50051", value_parser = parse::grpc_url)]
    pub addr: String,
    /// PEM CA that signed the reader's certificate (the system's roots when unset).
    #[arg(long, env = "STORAGE_READER_CA", value_parser = parse::text)]
    pub ca: Option<String>,
    /// PEM client certificate, for a reader that requires mutual TLS (with --key).
    #[arg(long, env = "STORAGE_READER_CLIENT_CERT", requires = "key", value_parser = parse::text)]
    pub cert: Option<String>,
    /// PEM key of the client certificate.
    #[arg(long, env = "STORAGE_READER_CLIENT_KEY", requires = "cert", value_parser = parse::text)]
    pub key: Option<String>,
    /// Bearer token, for a reader started with STORAGE_READER_AUTH_TOKEN.
    #[arg(long, env = "STORAGE_READER_AUTH_TOKEN", hide_env_values = true, value_parser = parse::text)]
    pub token: Option<String>,
}

pub type ReaderClient = StorageReaderServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.clone());
        }
        Ok(request)
    }
}

impl ReaderArgs {
    pub async fn connect(&self) -> anyhow::Result<ReaderClient> {
        let mut endpoint = Channel::from_shared(self.addr.clone())?;
        let https = self.addr.starts_with("https://");
        // A CA or a client certificate with a plain-text address would be silently unused.
        anyhow::ensure!(
            https || (self.ca.is_none() && self.cert.is_none()),
            "--ca, --cert and --key need an https:// --addr (got {})",
            self.addr
        );
        if https {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &self.ca {
                let pem = std::fs::read(ca).with_context(|| format!("cannot read the CA file {ca}"))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                let cert_pem = std::fs::read(cert).with_context(|| format!("cannot read the certificate {cert}"))?;
                let key_pem = std::fs::read(key).with_context(|| format!("cannot read the key {key}"))?;
                tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
            }
            endpoint = endpoint.tls_config(tls).context("TLS settings")?;
        }
        let channel = endpoint.connect().await.with_context(|| format!("cannot reach the reader at {}", self.addr))?;
        let token = match &self.token {
            Some(token) => Some(format!("Bearer {token}").parse().context("the token must be printable ASCII")?),
            None => None,
        };
        Ok(StorageReaderServiceClient::with_interceptor(channel, Bearer(token)))
    }
}
