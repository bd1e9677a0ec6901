//! Running one leased task: fetch its inputs (cache first), run it on a
//! compute thread off the async runtime, heartbeat with progress meanwhile,
//! stop if the lease is lost, and upload the result or report the failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use common::artifact::{attempt_key, ArtifactName, ArtifactRef};
use common::blob::{self, BlobError, BlobStore, PutMode, S3Store};
use common::dataset::shard::{DatasetIndex, ShardedSplit, Split};
use distill::checkpoint::TrainCheckpoint;
use distill::specialists::ensemble::Clusters;
use distill::task::{TaskData, TaskInputs, TaskOutput, TaskSpec};
use distill::train::{EpochStats, StepProgress, TrainObserver};
use proto::pb;

use crate::cache::ArtifactCache;
use crate::client::{self, Client, UploadKind, UploadMeta};
use crate::shutdown::Shutdown;

/// What stays loaded between tasks.
pub struct WorkerState {
    /// The worker's id at the coordinator.
    pub worker_id: String,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// How often a training task uploads a checkpoint.
    pub checkpoint_interval: Duration,
    /// Downloaded artifacts.
    pub cache: ArtifactCache,
    /// The job's bucket, when the coordinator says to read and write it
    /// directly.
    pub store: Option<Arc<S3Store>>,
    /// Scratch folder (transfer sets are assembled here).
    pub scratch: PathBuf,
    /// The compute device.
    pub device: Device,
    /// Whether the worker is stopping.
    pub shutdown: Shutdown,
}

/// Feeds progress to the heartbeat loop, stops training when told to,
/// hands training the checkpoint to resume from and sends its new ones to
/// the uploader.
struct Observer {
    progress: Arc<Mutex<pb::Progress>>,
    cancel: Arc<AtomicBool>,
    phase: &'static str,
    resume: Option<TrainCheckpoint>,
    checkpoints: CheckpointSink,
    shutdown: Shutdown,
}

/// Where a task's checkpoints go, and when.
struct CheckpointSink {
    interval: Duration,
    last: Instant,
    uploads: tokio::sync::mpsc::Sender<(usize, Vec<u8>)>,
}

impl Observer {
    fn check(&self) -> distill::Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(distill::Error::Cancelled(
                "the coordinator revoked this attempt's lease".into(),
            ));
        }
        if self.shutdown.must_abandon() {
            return Err(distill::Error::Cancelled(
                "the worker is stopping and its grace period is over".into(),
            ));
        }
        Ok(())
    }
}

impl TrainObserver for Observer {
    fn on_step(&mut self, p: &StepProgress) -> distill::Result<()> {
        {
            let mut progress = self.progress.lock().expect("progress lock");
            *progress = pb::Progress {
                phase: self.phase.into(),
                epoch: p.epoch as u32,
                epochs: p.epochs as u32,
                step: p.step as u64,
                loss: p.mean_loss,
                examples_per_second: p.examples_per_second,
            };
        }
        self.check()
    }

    fn on_epoch(&mut self, _: &EpochStats) -> distill::Result<()> {
        self.check()
    }

    fn take_checkpoint(&mut self) -> Option<TrainCheckpoint> {
        self.resume.take()
    }

    fn checkpoint_due(&mut self, _epochs_done: usize) -> bool {
        self.shutdown.stopping() || self.checkpoints.last.elapsed() >= self.checkpoints.interval
    }

    fn on_checkpoint(&mut self, checkpoint: TrainCheckpoint) -> distill::Result<()> {
        let bytes = (checkpoint.epochs_done, checkpoint.to_bytes()?);
        if self.shutdown.stopping() {
            // The last one before stopping: wait for room, then stop.
            let _ = self.checkpoints.uploads.blocking_send(bytes);
            return Err(distill::Error::Cancelled(format!(
                "the worker is stopping; checkpoint after epoch {} handed over",
                checkpoint.epochs_done
            )));
        }
        // The previous checkpoint still uploading: skip this one rather than
        // make training wait.
        if self.checkpoints.uploads.try_send(bytes).is_ok() {
            self.checkpoints.last = Instant::now();
        }
        Ok(())
    }
}

/// Runs `assignment` to the end: uploads its result or reports its failure.
/// Returns an error only when the coordinator cannot be reached.
pub async fn run_task(
    client: &mut Client,
    state: &mut WorkerState,
    assignment: pb::TaskAssignment,
) -> anyhow::Result<()> {
    let task_id = assignment.task_id.clone();
    let attempt = assignment.attempt;
    tracing::info!(task = %task_id, attempt, "task started");
    let started = Instant::now();
    let cancel = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new(pb::Progress {
        phase: "fetching inputs".into(),
        ..Default::default()
    }));
    let heartbeats = tokio::spawn(heartbeat_loop(
        client.clone(),
        pb::HeartbeatRequest {
            worker_id: state.worker_id.clone(),
            task_id: task_id.clone(),
            attempt,
            progress: None,
        },
        state.heartbeat,
        progress.clone(),
        cancel.clone(),
    ));
    let (checkpoints, uploads) = tokio::sync::mpsc::channel::<(usize, Vec<u8>)>(1);
    let uploader = tokio::spawn(upload_checkpoints(
        client.clone(),
        state.store.clone(),
        UploadMeta {
            worker_id: state.worker_id.clone(),
            task_id: task_id.clone(),
            attempt,
            seconds: 0.0,
            summary_json: Vec::new(),
        },
        uploads,
    ));
    let sink = CheckpointSink {
        interval: state.checkpoint_interval,
        last: Instant::now(),
        uploads: checkpoints,
    };
    let result = execute(client, state, &assignment, progress, cancel.clone(), sink).await;
    if result.is_ok() {
        // The result makes any checkpoint moot.
        uploader.abort();
    } else if tokio::time::timeout(Duration::from_secs(30), uploader)
        .await
        .is_err()
    {
        tracing::warn!(task = %task_id, "gave up uploading the last checkpoint");
    }
    if result.is_err() {
        heartbeats.abort();
    }
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(output) => {
            let meta = UploadMeta {
                worker_id: state.worker_id.clone(),
                task_id: task_id.clone(),
                attempt,
                seconds,
                summary_json: serde_json::to_vec(&output.summary).expect("summary serialises"),
            };
            let sent = match (&state.store, output_of(&assignment)) {
                (Some(store), Some(name)) => {
                    let key = attempt_key(&name, attempt, None);
                    send_to_bucket(
                        client,
                        store,
                        UploadKind::Result,
                        meta,
                        key,
                        output.payload,
                        0,
                    )
                    .await
                }
                _ => {
                    let size = output.payload.len() as u64;
                    let sent =
                        client::upload(client, UploadKind::Result, meta, output.payload).await;
                    if sent.is_ok() {
                        metrics::counter!("distill_worker_bytes_uploaded_total").increment(size);
                    }
                    sent.map(drop).map_err(Unsent::Refused)
                }
            };
            // Heartbeats kept the lease while the result was on its way (a
            // bucket that is slow or restarting must not expire it).
            heartbeats.abort();
            match sent {
                Ok(()) => {
                    tracing::info!(task = %task_id, attempt, seconds, "task finished");
                    metrics::counter!("distill_worker_tasks_completed_total").increment(1);
                }
                Err(Unsent::Store(e)) => {
                    report_failure(
                        client,
                        state,
                        &task_id,
                        attempt,
                        format!("writing the result to the bucket failed: {e}"),
                        false,
                    )
                    .await?
                }
                Err(Unsent::Refused(s))
                    if matches!(
                        s.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::Aborted
                    ) =>
                {
                    // The attempt is stale, or the coordinator restarted and
                    // forgot it: the task runs again under a new lease.
                    tracing::warn!(task = %task_id, attempt, "result refused: {}", s.message())
                }
                Err(Unsent::Refused(s)) if crate::is_transient(&s) => {
                    // The coordinator will expire the lease and re-run the task.
                    tracing::warn!(task = %task_id, attempt, "upload failed, the coordinator is unreachable: {}", s.message())
                }
                Err(Unsent::Refused(s)) => {
                    report_failure(
                        client,
                        state,
                        &task_id,
                        attempt,
                        format!("upload refused: {}", s.message()),
                        false,
                    )
                    .await?
                }
            }
        }
        Err(e) if cancel.load(Ordering::Relaxed) => {
            tracing::warn!(task = %task_id, attempt, "task abandoned: {e:#}");
        }
        Err(e) if state.shutdown.stopping() => {
            tracing::warn!(task = %task_id, attempt, "giving the task back: {e:#}");
            release(client, state, &task_id, attempt).await?
        }
        Err(e) => {
            let permanent = is_permanent(&e);
            report_failure(
                client,
                state,
                &task_id,
                attempt,
                format!("{e:#}"),
                permanent,
            )
            .await?
        }
    }
    Ok(())
}

/// Why a result or checkpoint did not reach the coordinator.
enum Unsent {
    /// Writing it to the bucket failed (after the S3 client's retries).
    Store(BlobError),
    /// The coordinator refused it or could not be reached.
    Refused(tonic::Status),
}

/// The artifact `assignment`'s task makes (`None` if its spec does not
/// parse, which running it reports).
fn output_of(assignment: &pb::TaskAssignment) -> Option<ArtifactName> {
    serde_json::from_slice::<TaskSpec>(&assignment.spec_json)
        .ok()
        .map(|spec| spec.output())
}

/// Writes `payload` to the bucket under `key` (hashed while it streams,
/// in parts when large), then offers it to the coordinator for commit.
async fn send_to_bucket(
    client: &mut Client,
    store: &S3Store,
    kind: UploadKind,
    meta: UploadMeta,
    key: String,
    payload: Vec<u8>,
    epochs_done: usize,
) -> Result<(), Unsent> {
    let written = blob::put_bytes(store, &key, payload, PutMode::Overwrite)
        .await
        .map_err(Unsent::Store)?;
    metrics::counter!("distill_worker_bucket_bytes_written_total").increment(written.size);
    client::commit(client, kind, meta, key, &written, epochs_done)
        .await
        .map(drop)
        .map_err(Unsent::Refused)
}

/// Gives a task back to the coordinator because the worker is stopping.
async fn release(
    client: &mut Client,
    state: &WorkerState,
    task: &str,
    attempt: u64,
) -> anyhow::Result<()> {
    let report = pb::FailureReport {
        worker_id: state.worker_id.clone(),
        task_id: task.into(),
        attempt,
        error: "the worker is stopping".into(),
        permanent: false,
        released: true,
    };
    if let Err(s) = client.report_failure(report).await {
        // The lease will expire instead.
        tracing::warn!(
            task,
            attempt,
            "could not give the task back: {}",
            s.message()
        );
    }
    Ok(())
}

/// Whether another attempt would fail the same way: a diverging training
/// run is a deterministic function of its spec and inputs.
fn is_permanent(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<distill::Error>(),
            Some(distill::Error::Diverged { .. })
        )
    })
}

async fn report_failure(
    client: &mut Client,
    state: &WorkerState,
    task: &str,
    attempt: u64,
    error: String,
    permanent: bool,
) -> anyhow::Result<()> {
    tracing::error!(task, attempt, %error, permanent, "task failed");
    metrics::counter!("distill_worker_tasks_failed_total").increment(1);
    let report = pb::FailureReport {
        worker_id: state.worker_id.clone(),
        task_id: task.into(),
        attempt,
        error,
        permanent,
        released: false,
    };
    match client.report_failure(report).await {
        Ok(_) => Ok(()),
        // A stale attempt, or a coordinator that restarted: nothing to report.
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::FailedPrecondition | tonic::Code::Aborted
            ) =>
        {
            Ok(())
        }
        // The lease will expire (or the coordinator restarted and forgot
        // it): the task runs again either way, and the lease loop
        // reconnects.
        Err(s) if crate::is_transient(&s) => {
            tracing::warn!(
                task,
                attempt,
                "could not report the failure, the coordinator is unreachable: {}",
                s.message()
            );
            Ok(())
        }
        Err(s) => Err(s).context("reporting a failure"),
    }
}

/// Uploads the checkpoints that training sends, one at a time, until
/// training ends (the channel closes).
async fn upload_checkpoints(
    mut client: Client,
    store: Option<Arc<S3Store>>,
    meta: UploadMeta,
    mut uploads: tokio::sync::mpsc::Receiver<(usize, Vec<u8>)>,
) {
    while let Some((epochs_done, bytes)) = uploads.recv().await {
        let size = bytes.len();
        let sent = match &store {
            Some(store) => {
                let name = ArtifactName::Checkpoint(meta.task_id.clone());
                let key = attempt_key(&name, meta.attempt, Some(epochs_done));
                send_to_bucket(
                    &mut client,
                    store,
                    UploadKind::Checkpoint,
                    meta.clone(),
                    key,
                    bytes,
                    epochs_done,
                )
                .await
            }
            None => {
                let sent =
                    client::upload(&mut client, UploadKind::Checkpoint, meta.clone(), bytes).await;
                if sent.is_ok() {
                    metrics::counter!("distill_worker_bytes_uploaded_total").increment(size as u64);
                }
                sent.map(drop).map_err(Unsent::Refused)
            }
        };
        match sent {
            Ok(()) => {
                tracing::info!(task = %meta.task_id, bytes = size, epochs_done, "checkpoint uploaded");
                metrics::counter!("distill_worker_checkpoints_uploaded_total").increment(1);
            }
            Err(Unsent::Store(e)) => {
                tracing::warn!(task = %meta.task_id, "checkpoint upload failed: {e}")
            }
            Err(Unsent::Refused(s)) => {
                tracing::warn!(task = %meta.task_id, "checkpoint upload failed: {}", s.message())
            }
        }
    }
}

async fn heartbeat_loop(
    mut client: Client,
    mut req: pb::HeartbeatRequest,
    period: Duration,
    progress: Arc<Mutex<pb::Progress>>,
    cancel: Arc<AtomicBool>,
) {
    let mut interval = tokio::time::interval(period);
    loop {
        interval.tick().await;
        let now = progress.lock().expect("progress lock").clone();
        metrics::gauge!("distill_worker_examples_per_second").set(now.examples_per_second);
        metrics::gauge!("distill_worker_epoch").set(f64::from(now.epoch));
        if now.loss.is_finite() && now.epochs > 0 {
            metrics::gauge!("distill_worker_loss").set(now.loss);
        }
        req.progress = Some(now);
        match client.heartbeat(req.clone()).await {
            Ok(r) if !r.get_ref().continue_task => {
                tracing::warn!(task = %req.task_id, attempt = req.attempt, "the coordinator revoked the lease; stopping");
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::Aborted => {
                tracing::warn!(task = %req.task_id, attempt = req.attempt, "the coordinator restarted and forgot this attempt; stopping");
                cancel.store(true, Ordering::Relaxed);
                return;
            }
            Err(s) => tracing::warn!(task = %req.task_id, "heartbeat failed: {}", s.message()),
        }
    }
}

async fn fetch(
    client: &mut Client,
    state: &WorkerState,
    artifact: &ArtifactRef,
) -> anyhow::Result<Vec<u8>> {
    if let Some(bytes) = state.cache.read_verified(artifact).await {
        return Ok(bytes);
    }
    let bytes = match (&state.store, &artifact.key) {
        (Some(store), Some(key)) => read_from_bucket(client, state, store, key, artifact).await?,
        _ => {
            let bytes = client::download(client, &state.worker_id, artifact).await?;
            metrics::counter!("distill_worker_bytes_downloaded_total")
                .increment(bytes.len() as u64);
            bytes
        }
    };
    state.cache.store(artifact, &bytes).await?;
    tracing::info!(artifact = %artifact.name, bytes = bytes.len(), "downloaded");
    Ok(bytes)
}

/// Reads input `artifact` from the bucket under `key`, verifying its
/// sha256. One that is missing or does not match is reported to the
/// coordinator, which checks it and regenerates it; the task then fails
/// (it is given again once its input is back).
async fn read_from_bucket(
    client: &mut Client,
    state: &WorkerState,
    store: &S3Store,
    key: &str,
    artifact: &ArtifactRef,
) -> anyhow::Result<Vec<u8>> {
    let problem = match blob::get_verified(store, key, &artifact.sha256).await {
        Ok(bytes) if bytes.len() as u64 == artifact.size => {
            metrics::counter!("distill_worker_bucket_bytes_read_total")
                .increment(bytes.len() as u64);
            return Ok(bytes);
        }
        Ok(bytes) => format!("{} bytes long, {} were stored", bytes.len(), artifact.size),
        Err(e @ (BlobError::NotFound { .. } | BlobError::Corrupt { .. })) => e.to_string(),
        Err(e) => {
            return Err(e).with_context(|| format!("reading {} from the bucket", artifact.name))
        }
    };
    let location = store.location(key);
    tracing::warn!(artifact = %artifact.name, %location, %problem, "an input read from the bucket is lost; telling the coordinator");
    let answer = client
        .report_lost_artifact(pb::LostArtifact {
            worker_id: state.worker_id.clone(),
            name: artifact.name.to_string(),
            problem: problem.clone(),
        })
        .await;
    match answer {
        Ok(r) if r.get_ref().regenerating => anyhow::bail!(
            "input {} ({location}) is lost: {problem}; the coordinator is making it again",
            artifact.name
        ),
        Ok(_) => anyhow::bail!(
            "input {} ({location}) read as lost ({problem}), but the coordinator finds it intact",
            artifact.name
        ),
        Err(s) => anyhow::bail!(
            "input {} ({location}) is lost: {problem}; telling the coordinator failed: {}",
            artifact.name,
            s.message()
        ),
    }
}

async fn execute(
    client: &mut Client,
    state: &mut WorkerState,
    assignment: &pb::TaskAssignment,
    progress: Arc<Mutex<pb::Progress>>,
    cancel: Arc<AtomicBool>,
    checkpoints: CheckpointSink,
) -> anyhow::Result<TaskOutput> {
    let spec: TaskSpec = serde_json::from_slice(&assignment.spec_json)
        .context("the task spec is not valid (coordinator and worker versions differ?)")?;
    if let TaskSpec::Noop(noop) = &spec {
        return Ok(TaskOutput {
            payload: noop.payload(),
            summary: serde_json::Value::Null,
        });
    }
    let mut models = HashMap::new();
    let mut transfer_files = Vec::new();
    let mut index = None;
    let mut shard_files: Vec<(Split, usize, PathBuf)> = Vec::new();
    let mut clusters = None;
    let mut resume = None;
    let inputs = assignment
        .inputs
        .iter()
        .map(client::artifact_ref)
        .collect::<anyhow::Result<Vec<_>>>()?;
    for input in &inputs {
        match &input.name {
            ArtifactName::Checkpoint(_) => {
                let bytes = fetch(client, state, input).await?;
                let checkpoint = TrainCheckpoint::from_bytes(&bytes, &state.device)?;
                tracing::info!(
                    epochs_done = checkpoint.epochs_done,
                    "resuming from the latest checkpoint"
                );
                resume = Some(checkpoint);
            }
            ArtifactName::Dataset => {
                let bytes = fetch(client, state, input).await?;
                index = Some(DatasetIndex::from_json(
                    &bytes,
                    &state.cache.path(&input.sha256)?,
                )?);
            }
            ArtifactName::DatasetShard(split, i) => {
                // Shards wait in the cache; training reads them one by one.
                drop(fetch(client, state, input).await?);
                shard_files.push((*split, *i, state.cache.path(&input.sha256)?));
            }
            ArtifactName::Model(model) => {
                models.insert(model.clone(), fetch(client, state, input).await?);
            }
            ArtifactName::Clusters => {
                let bytes = fetch(client, state, input).await?;
                clusters = Some(Clusters::from_json(&bytes, &input.name.to_string())?);
            }
            ArtifactName::Shard(_) | ArtifactName::TransferManifest => {
                fetch(client, state, input).await?;
                transfer_files.push(input.clone());
            }
            other => anyhow::bail!("{other} is not an input of any task"),
        }
    }
    let index = index.context("the task lists no dataset index")?;
    let [train, validation, test] = Split::ALL.map(|split| {
        let mut files = vec![None; index.split(split).shards.len()];
        for (s, i, path) in &shard_files {
            if *s == split {
                if let Some(slot) = files.get_mut(*i) {
                    *slot = Some(path.clone());
                }
            }
        }
        ShardedSplit::new(&index, split, files)
    });
    let (train, validation, test) = (train?, validation?, test?);
    let transfer_dir = if transfer_files.is_empty() {
        None
    } else {
        Some(assemble_transfer_set(state, &transfer_files)?)
    };
    let device = state.device.clone();
    // With the bucket the coordinator does not read the result: check it
    // here, as the coordinator would.
    let check_with_classes = state.store.is_some().then_some(index.num_classes);
    let phase = match &spec {
        TaskSpec::Train(_) => "training",
        TaskSpec::Infer(_) => "inference",
        TaskSpec::Evaluate(_) => "evaluation",
        TaskSpec::Cluster(_) => "clustering",
        TaskSpec::Specialist(_) => "training",
        TaskSpec::Noop(_) => "no-op",
    };
    let mut observer = Observer {
        progress,
        cancel,
        phase,
        resume,
        checkpoints,
        shutdown: state.shutdown.clone(),
    };
    // Compute runs on its own thread; the runtime keeps heartbeating.
    let span = tracing::Span::current();
    let output = tokio::task::spawn_blocking(move || {
        let _in_span = span.enter();
        let inputs = TaskInputs {
            data: TaskData {
                train: &train,
                validation: &validation,
                test: &test,
            },
            models,
            transfer_dir,
            clusters,
        };
        let output = spec.execute(&inputs, &device, &mut observer)?;
        if let Some(classes) = check_with_classes {
            spec.check_output(&output.payload, classes)
                .map_err(|reason| anyhow::anyhow!("the result fails its check: {reason}"))?;
        }
        anyhow::Ok(output)
    })
    .await
    .context("the compute thread panicked")??;
    Ok(output)
}

/// Lays the cached transfer-set files out as a folder (hard links, or
/// copies across file systems) named after the manifest's checksum.
fn assemble_transfer_set(state: &WorkerState, files: &[ArtifactRef]) -> anyhow::Result<PathBuf> {
    let manifest = files
        .iter()
        .find(|f| f.name == ArtifactName::TransferManifest)
        .context("the transfer set's manifest is not among the inputs")?;
    let dir = state
        .scratch
        .join(format!("transfer-{}", &manifest.sha256[..16]));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for f in files {
        let name = match f.name {
            ArtifactName::Shard(index) => common::transfer::shard_file_name(index),
            _ => common::transfer::MANIFEST_FILE.to_string(),
        };
        let target = dir.join(name);
        let source = state.cache.path(&f.sha256)?;
        let _ = std::fs::remove_file(&target);
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).with_context(|| {
                format!("cannot copy {} to {}", source.display(), target.display())
            })?;
        }
    }
    Ok(dir)
}
