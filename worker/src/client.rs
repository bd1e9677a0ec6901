//! The worker's side of the gRPC API: connecting with backoff, and moving
//! large payloads in chunks with a checksum.

use std::time::{Duration, Instant};

use anyhow::Context;
use common::artifact::ArtifactRef;
use common::blob::{S3Settings, Written};
use common::checksum::sha256_hex;
use proto::auth::{AttachToken, Token};
use proto::pb::{self, coordinator_client::CoordinatorClient};
use proto::CHUNK_BYTES;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A connected client; every call carries the cluster token.
pub type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

/// Retries `attempt` with exponential backoff (0.2 s doubling to 5 s) until
/// it succeeds or `give_up_after` has passed since the first try. A refusal
/// for lack of the right token is final: retrying cannot fix it.
pub async fn with_backoff<T, F, Fut>(
    what: &str,
    give_up_after: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e)
                if e.downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::Unauthenticated) =>
            {
                return Err(e.context(format!("{what}: the coordinator refused the cluster token")))
            }
            // A refusal (bad capabilities, another version): retrying cannot help.
            Err(e)
                if e.downcast_ref::<tonic::Status>()
                    .is_some_and(|s| !crate::is_transient(s)) =>
            {
                return Err(e.context(format!("{what}: refused by the coordinator")))
            }
            Err(e) if started.elapsed() + delay > give_up_after => {
                return Err(e.context(format!(
                    "{what}: giving up after {:.0} s without reaching the coordinator",
                    started.elapsed().as_secs_f64()
                )))
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// How the worker reaches the coordinator: its token and TLS settings.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The cluster token (none when the coordinator has authentication off).
    pub token: Option<Token>,
    /// TLS: the CA certificate (PEM) to trust for the coordinator's
    /// certificate, and optionally this worker's certificate and key (PEM)
    /// for mutual TLS. Needed for an `https://` coordinator.
    pub tls: Option<ClientTls>,
}

/// A worker's TLS settings, already read from their files.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate.
    pub ca: Vec<u8>,
    /// This worker's certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Checks, before any connection is tried, that `url` is a URL and that
/// TLS settings are given exactly when it is `https://` (no retry can fix
/// either).
pub fn check_url(url: &str, credentials: &Credentials) -> anyhow::Result<()> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("--coordinator {url:?} is not a URL like http://HOST:PORT"))?;
    match (url.starts_with("https://"), &credentials.tls) {
        (true, None) => anyhow::bail!(
            "{url} is TLS: give the CA that signed its certificate with --tls-ca FILE"
        ),
        (false, Some(_)) => anyhow::bail!(
            "--tls-ca is given but {url} is not https://; use the https URL the coordinator prints"
        ),
        _ => Ok(()),
    }
}

/// Connects to the coordinator at `url` with `credentials` (see
/// [`check_url`]).
pub async fn connect(url: &str, credentials: &Credentials) -> anyhow::Result<Client> {
    check_url(url, credentials)?;
    let mut endpoint = Channel::from_shared(url.to_string())
        .with_context(|| format!("--coordinator {url:?} is not a URL like http://HOST:PORT"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = &credentials.tls {
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to the coordinator at {url}"))?;
    Ok(CoordinatorClient::with_interceptor(
        channel,
        AttachToken::new(credentials.token.as_ref()),
    ))
}

/// The artifact a task names on the wire.
pub fn artifact_ref(wire: &pb::ArtifactRef) -> anyhow::Result<ArtifactRef> {
    Ok(ArtifactRef {
        name: wire.name.parse().context(
            "the coordinator named an input this worker does not know (versions differ?)",
        )?,
        sha256: wire.sha256.clone(),
        size: wire.size,
        key: (!wire.key.is_empty()).then(|| wire.key.clone()),
    })
}

/// The bucket settings the coordinator gave at registration.
pub fn storage(wire: &pb::StorageSettings) -> S3Settings {
    S3Settings {
        bucket: wire.bucket.clone(),
        prefix: wire.prefix.clone(),
        endpoint: (!wire.endpoint.is_empty()).then(|| wire.endpoint.clone()),
        region: wire.region.clone(),
        allow_http: wire.allow_http,
    }
}

/// Offers an object this worker wrote to the bucket (`key`, as `written`)
/// for commit as its result or checkpoint (of `epochs_done` epochs).
pub async fn commit(
    client: &mut Client,
    kind: UploadKind,
    meta: UploadMeta,
    key: String,
    written: &Written,
    epochs_done: usize,
) -> Result<pb::UploadResponse, tonic::Status> {
    let object = pb::StoredObject {
        worker_id: meta.worker_id,
        task_id: meta.task_id,
        attempt: meta.attempt,
        key,
        sha256: written.sha256.clone(),
        size: written.size,
        seconds: meta.seconds,
        summary_json: meta.summary_json,
        epochs_done: epochs_done as u32,
    };
    let response = match kind {
        UploadKind::Result => client.commit_result(object).await?,
        UploadKind::Checkpoint => client.commit_checkpoint(object).await?,
    };
    Ok(response.into_inner())
}

/// Downloads artifact `name` and checks it against `expected`.
pub async fn download(
    client: &mut Client,
    worker_id: &str,
    expected: &ArtifactRef,
) -> anyhow::Result<Vec<u8>> {
    let mut stream = client
        .download_artifact(pb::DownloadRequest {
            worker_id: worker_id.into(),
            name: expected.name.to_string(),
        })
        .await
        .with_context(|| format!("downloading {}", expected.name))?
        .into_inner();
    let header = match stream.message().await?.and_then(|c| c.part) {
        Some(pb::artifact_chunk::Part::Header(h)) => h,
        _ => anyhow::bail!("download of {} did not start with a header", expected.name),
    };
    anyhow::ensure!(
        header.sha256 == expected.sha256,
        "the coordinator now holds a different {} (sha256 {}, the task expects {})",
        expected.name,
        header.sha256,
        expected.sha256
    );
    let mut bytes = Vec::with_capacity(header.size as usize);
    while let Some(chunk) = stream.message().await? {
        match chunk.part {
            Some(pb::artifact_chunk::Part::Data(d)) => bytes.extend_from_slice(&d),
            _ => anyhow::bail!("download of {}: unexpected second header", expected.name),
        }
    }
    Ok(bytes)
}

/// What a worker uploads besides the payload.
#[derive(Clone, Debug)]
pub struct UploadMeta {
    /// The worker.
    pub worker_id: String,
    /// The task.
    pub task_id: String,
    /// The attempt (fencing id).
    pub attempt: u64,
    /// Compute seconds.
    pub seconds: f64,
    /// Summary JSON.
    pub summary_json: Vec<u8>,
}

/// What an upload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadKind {
    /// A task's result.
    Result,
    /// A training checkpoint of the running attempt.
    Checkpoint,
}

/// Uploads a result or a checkpoint: a header with the checksum, then
/// chunks.
pub async fn upload(
    client: &mut Client,
    kind: UploadKind,
    meta: UploadMeta,
    payload: Vec<u8>,
) -> Result<pb::UploadResponse, tonic::Status> {
    let header = pb::UploadHeader {
        worker_id: meta.worker_id,
        task_id: meta.task_id,
        attempt: meta.attempt,
        sha256: sha256_hex(&payload),
        size: payload.len() as u64,
        seconds: meta.seconds,
        summary_json: meta.summary_json,
    };
    let mut messages = vec![pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Header(header)),
    }];
    messages.extend(payload.chunks(CHUNK_BYTES).map(|c| pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Data(c.to_vec())),
    }));
    let messages = tokio_stream::iter(messages);
    let response = match kind {
        UploadKind::Result => client.upload_result(messages).await?,
        UploadKind::Checkpoint => client.upload_checkpoint(messages).await?,
    };
    Ok(response.into_inner())
}
