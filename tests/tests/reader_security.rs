//! The reader's transport security: TLS from certificate files, mutual TLS with a client CA,
//! and bearer-token authentication — with certificates generated for the test.

use std::path::PathBuf;

use flare_storage_common::proto::common::TenantContext;
use flare_storage_common::proto::storage::QueryMessagesRequest;
use flare_storage_common::proto::storage::storage_reader_service_client::StorageReaderServiceClient;
use flare_storage_common::tonic::Code;
use flare_storage_common::tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use flare_storage_e2e::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

struct Pki {
    directory: PathBuf,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

/// A CA, a server certificate for localhost and a client certificate, written as PEM files.
fn pki() -> anyhow::Result<Pki> {
    let directory = std::env::temp_dir().join(unique("pki"));
    std::fs::create_dir_all(&directory)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "flare-storage test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&server_key, &issuer)?;
    let client_key = KeyPair::generate()?;
    let mut client_params = CertificateParams::new(Vec::<String>::new())?;
    client_params.distinguished_name.push(DnType::CommonName, "im-gateway");
    let client_cert = client_params.signed_by(&client_key, &issuer)?;

    std::fs::write(directory.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(directory.join("server.pem"), server_cert.pem())?;
    std::fs::write(directory.join("server.key"), server_key.serialize_pem())?;
    std::fs::write(directory.join("client.pem"), client_cert.pem())?;
    std::fs::write(directory.join("client.key"), client_key.serialize_pem())?;
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        directory,
    })
}

impl Pki {
    /// The reader's TLS settings from these files; with `mutual`, clients need a certificate.
    fn server_tls(&self, mutual: bool) -> flare_storage_reader::TlsConfig {
        flare_storage_reader::TlsConfig {
            cert: self.directory.join("server.pem"),
            key: self.directory.join("server.key"),
            client_ca: mutual.then(|| self.directory.join("ca.pem")),
        }
    }
}

async fn query(channel: Channel, token: Option<&str>) -> Result<(), flare_storage_common::tonic::Status> {
    let mut request = flare_storage_common::tonic::Request::new(QueryMessagesRequest {
        session_id: "s".into(),
        tenant: Some(TenantContext { tenant_id: "t".into(), ..Default::default() }),
        ..Default::default()
    });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
    }
    StorageReaderServiceClient::new(channel).query_messages(request).await.map(drop)
}

async fn tls_channel(reader: &RunningReader, pki: &Pki, with_client_cert: bool) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem)).domain_name("localhost");
    if with_client_cert {
        tls = tls.identity(Identity::from_pem(&pki.client_cert_pem, &pki.client_key_pem));
    }
    Ok(Channel::from_shared(format!("https://localhost:{}", reader.grpc_addr.port()))?.tls_config(tls)?.connect_lazy())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mutual_tls_and_tokens_guard_the_api() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let pki = pki()?;

    // TLS: encrypted clients that trust the CA get in; plain-text ones do not.
    let reader = RunningReader::start_configured(&database.url, None, |config| {
        config.tls = Some(pki.server_tls(false));
    })
    .await?;
    query(tls_channel(&reader, &pki, false).await?, None).await?;
    let plain = Channel::from_shared(format!("http://{}", reader.grpc_addr))?.connect_lazy();
    assert!(query(plain, None).await.is_err(), "plain text must not reach a TLS reader");
    reader.stop().await?;

    // Mutual TLS: a client certificate from the CA is required.
    let reader = RunningReader::start_configured(&database.url, None, |config| {
        config.tls = Some(pki.server_tls(true));
    })
    .await?;
    assert!(query(tls_channel(&reader, &pki, false).await?, None).await.is_err(), "no client certificate");
    query(tls_channel(&reader, &pki, true).await?, None).await?;
    reader.stop().await?;

    // Bearer token: wrong or missing is UNAUTHENTICATED; health stays open for probes.
    let reader = RunningReader::start_configured(&database.url, None, |config| {
        config.auth_token = Some("correct-horse".into());
    })
    .await?;
    let channel = Channel::from_shared(format!("http://{}", reader.grpc_addr))?.connect().await?;
    for token in [None, Some("wrong"), Some("correct-hors"), Some("correct-horse-battery")] {
        let status = query(channel.clone(), token).await.expect_err("rejected");
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }
    query(channel.clone(), Some("correct-horse")).await?;
    assert_eq!(http_get(reader.metrics_addr, "/healthz").await?.0, 200);
    reader.stop().await?;

    std::fs::remove_dir_all(&pki.directory)?;
    database.drop().await?;
    Ok(())
}

/// `flare-storage query` as a gateway would call: TLS against the test CA, a client
/// certificate for mutual TLS and the bearer token — each missing piece refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_command_speaks_mutual_tls_and_the_token() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let pki = pki()?;
    let reader = RunningReader::start_configured(&database.url, None, |config| {
        config.tls = Some(pki.server_tls(true));
        config.auth_token = Some("correct-horse".into());
    })
    .await?;
    let file = |name: &str| pki.directory.join(name).to_string_lossy().into_owned();
    let tenant = unique("acme");
    let query = |flags: Vec<String>, environment: Vec<(&'static str, String)>| {
        let mut command = std::process::Command::new(binary("flare-storage")?);
        command.args(["query", "--session", "s", "--tenant", &tenant]).args(flags).env_clear().envs(environment);
        // The command blocks; the reader keeps serving on the runtime's other worker.
        anyhow::Ok(tokio::task::spawn_blocking(move || command.output()))
    };
    let addr = format!("https://localhost:{}", reader.grpc_addr.port());
    let all = vec![
        format!("--addr={addr}"),
        format!("--ca={}", file("ca.pem")),
        format!("--cert={}", file("client.pem")),
        format!("--key={}", file("client.key")),
        "--token=correct-horse".to_owned(),
    ];
    let output = query(all.clone(), vec![])?.await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("0 message(s) in session s (tenant {tenant})")), "{stdout}");

    // The same settings from the environment, as in a pod.
    let environment = vec![
        ("STORAGE_READER_ADDR", addr.clone()),
        ("STORAGE_READER_CA", file("ca.pem")),
        ("STORAGE_READER_CLIENT_CERT", file("client.pem")),
        ("STORAGE_READER_CLIENT_KEY", file("client.key")),
        ("STORAGE_READER_AUTH_TOKEN", "correct-horse".to_owned()),
    ];
    let output = query(vec![], environment)?.await??;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // Each credential left out is refused.
    // Without a client certificate the server ends the handshake (the client sees its alert,
    // or a connection closed under it, as a transport error); without the CA the client
    // refuses the server's certificate.
    let refusals: [(&[&str], &[&str]); 3] = [
        (&["--token"], &["missing or wrong bearer token"]),
        (&["--cert", "--key"], &["transport error"]),
        (&["--ca"], &["UnknownIssuer"]),
    ];
    for (left_out, expected) in refusals {
        let flags: Vec<String> =
            all.iter().filter(|flag| !left_out.iter().any(|prefix| flag.starts_with(prefix))).cloned().collect();
        let output = query(flags, vec![])?.await??;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "without {left_out:?}: {stderr}");
        assert!(expected.iter().any(|reason| stderr.contains(reason)), "without {left_out:?}: {stderr}");
    }
    // A CA with a plain-text address would go unused: refused before connecting.
    let mut plain = all.clone();
    plain[0] = format!("--addr=http://localhost:{}", reader.grpc_addr.port());
    let output = query(plain, vec![])?.await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("need an https:// --addr"), "{stderr}");
    reader.stop().await?;
    std::fs::remove_dir_all(&pki.directory)?;
    database.drop().await?;
    Ok(())
}
