//! The gRPC service: thin glue that turns requests into [`Job`] calls under
//! one lock, streams artifacts in chunks, and maps errors to status codes in
//! one place ([`status`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::checksum::sha256_hex;
use proto::pb::{self, coordinator_server::Coordinator};
use proto::CHUNK_BYTES;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::job::{Job, JobError};
use crate::limits;

/// The job shared between the service and the coordinator's main loop.
#[derive(Clone, Debug)]
pub struct SharedJob {
    job: Arc<Mutex<Job>>,
    started: Instant,
    settings: Settings,
    job_name: String,
}

/// What the service tells workers and enforces.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How often to heartbeat while running a task, in ms.
    pub heartbeat_ms: u32,
    /// How often a training task uploads a checkpoint, in ms.
    pub checkpoint_ms: u32,
    /// Largest upload (result or checkpoint), in bytes.
    pub max_artifact_bytes: u64,
}

impl SharedJob {
    /// Shares `job`, whose clock started at `started`.
    pub fn new(job: Job, started: Instant, settings: Settings, job_name: String) -> Self {
        SharedJob {
            job: Arc::new(Mutex::new(job)),
            started,
            settings,
            job_name,
        }
    }

    /// Time since the job started (the scheduler's clock).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// A snapshot of the job for people and tools, with `report` (the
    /// report's Markdown, once written).
    pub fn status(&self, report: Option<String>) -> crate::status::JobStatus {
        self.with_now(|job, now| crate::status::JobStatus::of(job, &self.job_name, now, report))
    }

    /// Runs `f` on the job under its lock, with the current time.
    pub fn with_now<R>(&self, f: impl FnOnce(&mut Job, Duration) -> R) -> R {
        let now = self.now();
        self.with(|job| f(job, now))
    }

    /// Runs `f` on the job under its lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut Job) -> R) -> R {
        let mut job = self
            .job
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut job)
    }
}

/// Maps a job error to a gRPC status: the one place that decides codes.
pub fn status(e: JobError) -> Status {
    match &e {
        // Not UNAUTHENTICATED (a wrong token): the worker should register
        // again, as it must after the coordinator restarted.
        JobError::UnknownWorker(_) => Status::aborted(e.to_string()),
        JobError::UnknownTask(_) | JobError::UnknownArtifact(_) => Status::not_found(e.to_string()),
        JobError::Refused(_) => Status::failed_precondition(e.to_string()),
        JobError::BadResult { .. } => Status::invalid_argument(e.to_string()),
        JobError::Storage(_) | JobError::State(_) => Status::internal(e.to_string()),
        JobError::Regenerating { .. } => Status::data_loss(e.to_string()),
    }
}

/// The answer to an upload: where the payload was stored.
fn stored_ref(stored: crate::store::StoredArtifact) -> pb::UploadResponse {
    pb::UploadResponse {
        stored: Some(pb::ArtifactRef {
            name: stored.path.display().to_string(),
            sha256: stored.sha256,
            size: stored.size,
        }),
    }
}

/// The `Coordinator` gRPC service.
#[derive(Clone, Debug)]
pub struct CoordinatorService {
    shared: SharedJob,
}

impl CoordinatorService {
    /// A service over `shared`.
    pub fn new(shared: SharedJob) -> Self {
        CoordinatorService { shared }
    }

    /// Receives an upload and hands it to `accept` (off the async runtime:
    /// it writes files); `what` names it in errors.
    async fn store_upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
        what: &'static str,
        accept: fn(
            &mut Job,
            &pb::UploadHeader,
            &[u8],
            Duration,
        ) -> Result<crate::store::StoredArtifact, JobError>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let (header, payload) = self.receive_upload(request).await?;
        let shared = self.shared.clone();
        let stored = tokio::task::spawn_blocking(move || {
            shared.with_now(|job, now| accept(job, &header, &payload, now))
        })
        .await
        .map_err(|e| Status::internal(format!("storing the {what} panicked: {e}")))?
        .map_err(status)?;
        Ok(Response::new(stored_ref(stored)))
    }

    /// Receives an upload: its header (refused at once when the attempt
    /// is not current or the size is over the limit), then its payload,
    /// whose length and checksum must match the header.
    async fn receive_upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<(pb::UploadHeader, Vec<u8>), Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await?.and_then(|c| c.part) {
            Some(pb::upload_chunk::Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "an upload must start with its header",
                ))
            }
        };
        limits::upload_header(&header, self.shared.settings.max_artifact_bytes)?;
        // Refuse a stale attempt before receiving its payload.
        self.shared
            .with_now(|job, now| job.check_upload(&header, now))
            .map_err(status)?;
        // The announced size is the client's word: grow as bytes arrive.
        let mut payload = Vec::with_capacity((header.size as usize).min(64 * proto::CHUNK_BYTES));
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(pb::upload_chunk::Part::Data(data)) => {
                    if payload.len() + data.len() > header.size as usize {
                        return Err(Status::invalid_argument(format!(
                            "more than the announced {} bytes were sent",
                            header.size
                        )));
                    }
                    payload.extend_from_slice(&data);
                }
                _ => return Err(Status::invalid_argument("a second header in one upload")),
            }
        }
        if payload.len() as u64 != header.size {
            return Err(Status::data_loss(format!(
                "{} of the announced {} bytes arrived",
                payload.len(),
                header.size
            )));
        }
        let found = sha256_hex(&payload);
        if found != header.sha256 {
            return Err(Status::data_loss(format!(
                "checksum mismatch: header says {}, payload has {found}",
                header.sha256
            )));
        }
        Ok((header, payload))
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caps = request
            .into_inner()
            .capabilities
            .ok_or_else(|| Status::invalid_argument("capabilities are missing"))?;
        limits::capabilities(&caps)?;
        let ours = env!("CARGO_PKG_VERSION");
        if caps.version != ours {
            return Err(Status::failed_precondition(format!(
                "worker version {:?} does not match the coordinator's {ours:?}",
                caps.version
            )));
        }
        let worker_id = self.shared.with_now(|job, now| job.register(caps, now));
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            heartbeat_interval_ms: self.shared.settings.heartbeat_ms,
            checkpoint_interval_ms: self.shared.settings.checkpoint_ms,
            job: self.shared.job_name.clone(),
        }))
    }

    async fn lease_task(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let worker = request.into_inner().worker_id;
        limits::id("worker_id", &worker)?;
        self.shared
            .with_now(|job, now| job.lease(&worker, now))
            .map(Response::new)
            .map_err(status)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        limits::heartbeat(&req)?;
        let continue_task = self
            .shared
            .with_now(|job, now| job.heartbeat(&req, now))
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse { continue_task }))
    }

    async fn upload_result(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.store_upload(request, "result", Job::accept_result)
            .await
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.store_upload(request, "checkpoint", Job::accept_checkpoint)
            .await
    }

    async fn report_failure(
        &self,
        request: Request<pb::FailureReport>,
    ) -> Result<Response<pb::FailureResponse>, Status> {
        let mut report = request.into_inner();
        limits::failure(&mut report)?;
        let will_retry = self
            .shared
            .with_now(|job, now| job.fail(&report, now))
            .map_err(status)?;
        Ok(Response::new(pb::FailureResponse { will_retry }))
    }

    async fn get_status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let snapshot = self.shared.status(None);
        Ok(Response::new(pb::StatusResponse {
            status_json: serde_json::to_vec(&snapshot).expect("a status serialises"),
        }))
    }

    type DownloadArtifactStream = ReceiverStream<Result<pb::ArtifactChunk, Status>>;

    async fn download_artifact(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let req = request.into_inner();
        limits::id("worker_id", &req.worker_id)?;
        limits::id("name", &req.name)?;
        let artifact = self
            .shared
            .with_now(|job, now| job.artifact(&req.worker_id, &req.name, now))
            .map_err(status)?;
        let mut file = match tokio::fs::File::open(&artifact.path).await {
            Ok(f) => f,
            Err(e) => {
                let problem = format!("unreadable ({e})");
                let lost = self
                    .shared
                    .with(|job| job.artifact_lost(&req.name, &problem));
                return Err(status(lost));
            }
        };
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let name = req.name.clone();
        let header = pb::ArtifactRef {
            name: req.name,
            sha256: artifact.sha256.clone(),
            size: artifact.size,
        };
        tokio::spawn(async move {
            let header = pb::ArtifactChunk {
                part: Some(pb::artifact_chunk::Part::Header(header)),
            };
            if tx.send(Ok(header)).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; CHUNK_BYTES];
            // Every read is verified: a file that changed on disk since it
            // was stored ends the stream with DATA_LOSS and is regenerated.
            let mut hasher = Sha256::new();
            loop {
                let msg = match file.read(&mut buf).await {
                    Ok(0) => {
                        let found = hex::encode(hasher.finalize());
                        if found != artifact.sha256 {
                            let problem =
                                format!("corrupt (sha256 {found}, {} was stored)", artifact.sha256);
                            let lost = shared.with(|job| job.artifact_lost(&name, &problem));
                            let _ = tx.send(Err(status(lost))).await;
                        }
                        return;
                    }
                    Ok(n) => {
                        hasher.update(&buf[..n]);
                        Ok(pb::ArtifactChunk {
                            part: Some(pb::artifact_chunk::Part::Data(buf[..n].to_vec())),
                        })
                    }
                    Err(e) => Err(Status::internal(format!(
                        "reading {}: {e}",
                        artifact.path.display()
                    ))),
                };
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
