//! The gRPC service: thin glue that turns requests into [`SharedJob`]
//! calls, converts between protobuf and the job's types (nowhere else),
//! streams artifacts in chunks, and maps errors to status codes in one
//! place ([`status`]).

use bytes::Bytes;
use common::artifact::{ArtifactName, ArtifactRef};
use common::blob::S3Settings;
use common::checksum::sha256_hex;
use futures_util::StreamExt;
use proto::pb::{self, coordinator_server::Coordinator};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::job::{self, JobError, Reported, SharedJob, UploadKind};
use crate::limits;

/// What the service tells workers and enforces.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often to heartbeat while running a task, in ms.
    pub heartbeat_ms: u32,
    /// How often a training task uploads a checkpoint, in ms.
    pub checkpoint_ms: u32,
    /// Largest upload (result or checkpoint), in bytes.
    pub max_artifact_bytes: u64,
    /// The bucket (with the job's prefix) that workers read and write
    /// directly; `None`: they move artifacts through the coordinator.
    pub storage: Option<S3Settings>,
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
        JobError::Storage(_) | JobError::State(_) | JobError::Panicked(_) => {
            Status::internal(e.to_string())
        }
        JobError::Regenerating { .. } => Status::data_loss(e.to_string()),
    }
}

/// An artifact reference on the wire.
fn to_wire(a: ArtifactRef) -> pb::ArtifactRef {
    pb::ArtifactRef {
        key: a.stored_key(),
        name: a.name.to_string(),
        sha256: a.sha256,
        size: a.size,
    }
}

fn storage(s: &S3Settings) -> pb::StorageSettings {
    pb::StorageSettings {
        bucket: s.bucket.clone(),
        prefix: s.prefix.clone(),
        endpoint: s.endpoint.clone().unwrap_or_default(),
        region: s.region.clone(),
        allow_http: s.allow_http,
    }
}

fn reported(o: &pb::StoredObject) -> (job::Upload, Reported) {
    let upload = job::Upload {
        worker: o.worker_id.clone(),
        task: o.task_id.clone(),
        attempt: o.attempt,
        seconds: o.seconds,
        summary: serde_json::from_slice(&o.summary_json).unwrap_or(serde_json::Value::Null),
    };
    let reported = Reported {
        key: o.key.clone(),
        sha256: o.sha256.clone(),
        size: o.size,
        epochs_done: o.epochs_done as usize,
    };
    (upload, reported)
}

fn capabilities(c: pb::Capabilities) -> job::Capabilities {
    job::Capabilities {
        device: c.device,
        threads: c.threads,
        memory_bytes: c.memory_bytes,
        hostname: c.hostname,
    }
}

fn progress(p: pb::Progress) -> job::Progress {
    job::Progress {
        phase: p.phase,
        epoch: p.epoch,
        epochs: p.epochs,
        step: p.step,
        loss: p.loss,
        examples_per_second: p.examples_per_second,
    }
}

fn upload(h: pb::UploadHeader) -> job::Upload {
    job::Upload {
        worker: h.worker_id,
        task: h.task_id,
        attempt: h.attempt,
        seconds: h.seconds,
        summary: serde_json::from_slice(&h.summary_json).unwrap_or(serde_json::Value::Null),
    }
}

fn lease(l: job::Lease) -> pb::LeaseResponse {
    use pb::lease_response::Outcome;
    let outcome = match l {
        job::Lease::Task(a) => Outcome::Task(pb::TaskAssignment {
            task_id: a.task_id,
            attempt: a.attempt,
            spec_json: a.spec_json,
            inputs: a.inputs.into_iter().map(to_wire).collect(),
        }),
        job::Lease::Wait { retry_after_ms } => Outcome::Wait(pb::Wait { retry_after_ms }),
        job::Lease::JobOver { succeeded, message } => {
            Outcome::JobOver(pb::JobOver { succeeded, message })
        }
    };
    pb::LeaseResponse {
        outcome: Some(outcome),
    }
}

/// The `Coordinator` gRPC service.
#[derive(Clone, Debug)]
pub struct CoordinatorService {
    shared: SharedJob,
    settings: Settings,
}

impl CoordinatorService {
    /// A service over `shared`.
    pub fn new(shared: SharedJob, settings: Settings) -> Self {
        CoordinatorService { shared, settings }
    }

    /// Takes a worker's report of an object it wrote to the bucket.
    async fn commit_reported(
        &self,
        request: Request<pb::StoredObject>,
        kind: UploadKind,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let object = request.into_inner();
        limits::stored_object(&object, self.settings.max_artifact_bytes)?;
        if self.settings.storage.is_none() {
            return Err(Status::failed_precondition(
                "this job's artifacts are not in a bucket: upload them with UploadResult",
            ));
        }
        let (upload, reported) = reported(&object);
        let stored = self
            .shared
            .commit_reported(kind, &upload, reported)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UploadResponse {
            stored: Some(to_wire(stored)),
        }))
    }

    /// Receives an upload and hands it to the job.
    async fn store_upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
        kind: UploadKind,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let (header, payload) = self.receive_upload(request, kind).await?;
        let stored = self
            .shared
            .accept(kind, &header, payload)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::UploadResponse {
            stored: Some(to_wire(stored)),
        }))
    }

    /// Receives an upload: its header (refused at once when the attempt
    /// is not current or the size is over the limit), then its payload,
    /// whose length and checksum must match the header.
    async fn receive_upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
        kind: UploadKind,
    ) -> Result<(job::Upload, Bytes), Status> {
        let mut stream = request.into_inner();
        let header = match stream.message().await?.and_then(|c| c.part) {
            Some(pb::upload_chunk::Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "an upload must start with its header",
                ))
            }
        };
        limits::upload_header(&header, self.settings.max_artifact_bytes)?;
        let (size, sha256) = (header.size, header.sha256.clone());
        let header = upload(header);
        // Refuse a stale attempt before receiving its payload.
        self.shared.check_upload(&header, kind).map_err(status)?;
        // The announced size is the client's word: grow as bytes arrive.
        let mut payload = Vec::with_capacity((size as usize).min(64 * proto::CHUNK_BYTES));
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(pb::upload_chunk::Part::Data(data)) => {
                    if payload.len() + data.len() > size as usize {
                        return Err(Status::invalid_argument(format!(
                            "more than the announced {size} bytes were sent"
                        )));
                    }
                    payload.extend_from_slice(&data);
                }
                _ => return Err(Status::invalid_argument("a second header in one upload")),
            }
        }
        if payload.len() as u64 != size {
            return Err(Status::data_loss(format!(
                "{} of the announced {size} bytes arrived",
                payload.len(),
            )));
        }
        metrics::counter!("distill_grpc_artifact_bytes_received_total")
            .increment(payload.len() as u64);
        let found = sha256_hex(&payload);
        if found != sha256 {
            return Err(Status::data_loss(format!(
                "checksum mismatch: header says {sha256}, payload has {found}"
            )));
        }
        Ok((header, payload.into()))
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
        let caps = capabilities(caps);
        let worker_id = self.shared.with_now(|job, now| job.register(caps, now));
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            heartbeat_interval_ms: self.settings.heartbeat_ms,
            checkpoint_interval_ms: self.settings.checkpoint_ms,
            job: self.shared.name().to_string(),
            storage: self.settings.storage.as_ref().map(storage),
        }))
    }

    async fn lease_task(
        &self,
        request: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let worker = request.into_inner().worker_id;
        limits::id("worker_id", &worker)?;
        self.shared
            .lease(&worker)
            .await
            .map(|l| Response::new(lease(l)))
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
            .with_now(|job, now| {
                let progress = req.progress.clone().map(progress);
                job.heartbeat(&req.worker_id, &req.task_id, req.attempt, progress, now)
            })
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse { continue_task }))
    }

    async fn upload_result(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.store_upload(request, UploadKind::Result).await
    }

    async fn upload_checkpoint(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.store_upload(request, UploadKind::Checkpoint).await
    }

    async fn commit_result(
        &self,
        request: Request<pb::StoredObject>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.commit_reported(request, UploadKind::Result).await
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::StoredObject>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        self.commit_reported(request, UploadKind::Checkpoint).await
    }

    async fn report_lost_artifact(
        &self,
        request: Request<pb::LostArtifact>,
    ) -> Result<Response<pb::LostArtifactResponse>, Status> {
        let mut req = request.into_inner();
        limits::id("worker_id", &req.worker_id)?;
        limits::id("name", &req.name)?;
        limits::truncate_error(&mut req.problem);
        let name: ArtifactName = req
            .name
            .parse()
            .map_err(|e: common::artifact::NotAnArtifact| Status::not_found(e.to_string()))?;
        let regenerating = self
            .shared
            .reported_lost(&req.worker_id, &name, &req.problem)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::LostArtifactResponse { regenerating }))
    }

    async fn report_failure(
        &self,
        request: Request<pb::FailureReport>,
    ) -> Result<Response<pb::FailureResponse>, Status> {
        let mut report = request.into_inner();
        limits::failure(&mut report)?;
        let failure = job::Failure {
            worker: report.worker_id,
            task: report.task_id,
            attempt: report.attempt,
            error: report.error,
            permanent: report.permanent,
            released: report.released,
        };
        let will_retry = self
            .shared
            .with_now(|job, now| job.fail(&failure, now))
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
        let name: ArtifactName = req
            .name
            .parse()
            .map_err(|e: common::artifact::NotAnArtifact| Status::not_found(e.to_string()))?;
        let (stored, mut data) = self
            .shared
            .download(&req.worker_id, &name)
            .await
            .map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let header = pb::ArtifactChunk {
                part: Some(pb::artifact_chunk::Part::Header(to_wire(stored))),
            };
            if tx.send(Ok(header)).await.is_err() {
                return;
            }
            // Chunks of at most CHUNK_BYTES, whatever size the store reads.
            while let Some(chunk) = data.next().await {
                let msgs: Vec<Result<pb::ArtifactChunk, Status>> = match chunk {
                    Ok(bytes) => {
                        metrics::counter!("distill_grpc_artifact_bytes_sent_total")
                            .increment(bytes.len() as u64);
                        bytes
                            .chunks(proto::CHUNK_BYTES)
                            .map(|c| {
                                Ok(pb::ArtifactChunk {
                                    part: Some(pb::artifact_chunk::Part::Data(c.to_vec())),
                                })
                            })
                            .collect()
                    }
                    Err(e) => vec![Err(status(e))],
                };
                for msg in msgs {
                    let failed = msg.is_err();
                    if tx.send(msg).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
