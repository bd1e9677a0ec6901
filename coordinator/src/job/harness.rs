//! An in-memory harness for the job's fault logic, in the spirit of
//! raft-rs's test harness: fake workers drive the real [`SharedJob`] over a
//! [`MemoryStore`] (checked never to be called under the job's lock) and a
//! state database in a temporary folder, on a clock moved by hand. What
//! needs real processes (SIGKILL, SIGSTOP, SIGTERM, TLS, the browser) is in
//! `tests/cluster.rs`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::artifact::{ArtifactName, ArtifactRef};
use common::blob::{self, BlobError, BlobStore, ByteStream, MemoryStore, PutMode, Written};
use common::checksum::sha256_hex;
use common::dataset::shard::{DatasetLayout, Split};
use futures_util::StreamExt;

use super::{
    Assignment, Capabilities, DatasetFacts, Failure, Job, JobError, Lease, LeasePolicy, SharedJob,
    Upload, UploadKind,
};
use crate::cache::TaskCache;
use crate::config::ClusterConfig;
use crate::state::StateDb;

const SECOND: Duration = Duration::from_secs(1);

/// A memory store that fails the test if it is called while the job's
/// lock is held.
#[derive(Debug, Default)]
struct LockCheckedStore {
    objects: Arc<MemoryStore>,
    job: OnceLock<super::shared::LockProbe>,
}

impl LockCheckedStore {
    fn check(&self, what: &str, key: &str) {
        if let Some(job) = self.job.get() {
            assert!(!job.is_locked(), "{what} {key} under the job's lock");
        }
    }

    /// The same objects, for a restarted coordinator.
    fn reopened(&self) -> Arc<Self> {
        Arc::new(LockCheckedStore {
            objects: self.objects.clone(),
            job: OnceLock::new(),
        })
    }
}

#[common::blob::async_trait]
impl BlobStore for LockCheckedStore {
    fn describe(&self) -> String {
        self.objects.describe()
    }
    async fn put(&self, key: &str, data: ByteStream, mode: PutMode) -> Result<Written, BlobError> {
        self.check("put", key);
        self.objects.put(key, data, mode).await
    }
    async fn get(&self, key: &str) -> Result<ByteStream, BlobError> {
        self.check("get", key);
        self.objects.get(key).await
    }
    async fn size(&self, key: &str) -> Result<Option<u64>, BlobError> {
        self.check("size", key);
        self.objects.size(key).await
    }
    async fn remove(&self, key: &str) -> Result<(), BlobError> {
        self.check("remove", key);
        self.objects.remove(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        self.check("list", prefix);
        self.objects.list(prefix).await
    }
}

/// A job of 10 examples and 3 classes (teachers, baseline, 2 inference
/// shards, student, evaluation) with fake workers.
struct Harness {
    shared: SharedJob,
    store: Arc<LockCheckedStore>,
    state_dir: tempfile::TempDir,
    extra: String,
    cache: Option<TaskCache>,
    /// This coordinator's instance number; a restart counts up.
    instance: u32,
}

impl Harness {
    fn new() -> Self {
        Self::with("")
    }

    /// A job with `extra` appended to a minimal config.
    fn with(extra: &str) -> Self {
        Self::start(
            Arc::new(LockCheckedStore::default()),
            tempfile::tempdir().unwrap(),
            extra.to_string(),
            None,
            1,
        )
    }

    /// 10 training examples in shards of 4, 4 validation and 4 test examples.
    fn harness_layout() -> DatasetLayout {
        DatasetLayout::new([10, 4, 4], 4).unwrap()
    }

    fn start(
        store: Arc<LockCheckedStore>,
        state_dir: tempfile::TempDir,
        extra: String,
        cache: Option<TaskCache>,
        instance: u32,
    ) -> Self {
        let text = format!(
            "output_dir = \"o\"\ntransfer_shards = 2\n[dataset]\nsource = \"synthetic\"\n\
             [teachers]\nhidden = [4]\n[student]\nhidden = [4]\n{extra}"
        );
        let cfg = ClusterConfig::parse(&text, "c.toml".as_ref(), state_dir.path()).unwrap();
        let plan = crate::plan::plan(&cfg, &Self::harness_layout()).unwrap();
        let state = StateDb::open(&state_dir.path().join("state")).unwrap();
        let mut dataset = Vec::new();
        let layout = Self::harness_layout();
        let mut names: Vec<ArtifactName> = Split::ALL
            .iter()
            .flat_map(|&split| {
                layout
                    .all(split)
                    .map(move |i| ArtifactName::DatasetShard(split, i))
            })
            .collect();
        names.push(ArtifactName::Dataset);
        for name in names {
            let bytes = match name {
                ArtifactName::Dataset => b"splits".to_vec(),
                _ => name.to_string().into_bytes(),
            };
            let written = futures_executor(blob::put_bytes(
                &*store,
                &name.key(),
                bytes,
                PutMode::Overwrite,
            ))
            .unwrap();
            dataset.push(ArtifactRef {
                name,
                sha256: written.sha256,
                size: written.size,
                key: None,
            });
        }
        let job = Job::new(
            plan,
            DatasetFacts {
                fingerprint: "fp".into(),
                train_len: 10,
                num_classes: 3,
            },
            dataset,
            LeasePolicy {
                timeout: 10 * SECOND,
                max_attempts: 2,
                poll_ms: 100,
            },
            state.attempt_floor().unwrap(),
            instance,
        );
        let shared =
            SharedJob::with_manual_clock(job, store.clone(), Arc::new(state), cache.clone());
        let _ = store.job.set(shared.lock_probe());
        Harness {
            shared,
            store,
            state_dir,
            extra,
            cache,
            instance,
        }
    }

    /// The coordinator restarts on the same store and state.
    async fn restart(self) -> (Self, super::Resumed) {
        let Harness {
            shared,
            store,
            state_dir,
            extra,
            cache,
            instance,
        } = self;
        drop(shared);
        let again = Self::start(store.reopened(), state_dir, extra, cache, instance + 1);
        let resumed = again.shared.resume().await.unwrap();
        (again, resumed)
    }

    fn with_cache(mut self, cache: TaskCache) -> Self {
        let Harness {
            shared,
            store,
            state_dir,
            extra,
            instance,
            ..
        } = self;
        drop(shared);
        self = Self::start(store.reopened(), state_dir, extra, Some(cache), instance);
        self
    }

    fn register(&self) -> String {
        let caps = Capabilities {
            hostname: "h".into(),
            device: "cpu".into(),
            ..Default::default()
        };
        self.shared.with_now(|job, now| job.register(caps, now))
    }

    async fn lease(&self, worker: &str) -> Assignment {
        match self.shared.lease(worker).await.unwrap() {
            Lease::Task(t) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    async fn upload(
        &self,
        worker: &str,
        task: &Assignment,
        payload: &[u8],
    ) -> Result<ArtifactRef, JobError> {
        self.send(UploadKind::Result, worker, task, payload).await
    }

    async fn send(
        &self,
        kind: UploadKind,
        worker: &str,
        task: &Assignment,
        payload: &[u8],
    ) -> Result<ArtifactRef, JobError> {
        let upload = upload_header(worker, task);
        self.shared.check_upload(&upload, kind)?;
        self.shared
            .accept(kind, &upload, Bytes::copy_from_slice(payload))
            .await
    }

    async fn heartbeat(&self, worker: &str, task: &Assignment) -> bool {
        self.shared
            .with_now(|job, now| job.heartbeat(worker, &task.task_id, task.attempt, None, now))
            .unwrap()
    }

    async fn download(&self, worker: &str, name: &ArtifactName) -> Result<Vec<u8>, JobError> {
        let (_, mut data) = self.shared.download(worker, name).await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = data.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        Ok(bytes)
    }

    async fn object(&self, name: &ArtifactName) -> Option<Vec<u8>> {
        blob::get_bytes(&*self.store.objects, &name.key())
            .await
            .ok()
    }

    fn is_done(&self, task: &str) -> bool {
        self.shared.with(|job| job.is_done(task))
    }
}

/// Runs a future that needs no runtime services to completion.
fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
    futures_util::FutureExt::now_or_never(f).expect("the memory store does not wait")
}

fn model_bytes(seed: u64) -> Vec<u8> {
    let spec = distill::model::MlpSpec::new(8, vec![4], 3).unwrap();
    let rng = &mut common::seed::rng(seed, common::seed::Stream::Init);
    let model = distill::model::Mlp::new_random(spec, rng, &candle_core::Device::Cpu).unwrap();
    distill::model_io::mlp_to_bytes(&model, common::dataset::Normalization::Identity).unwrap()
}

fn checkpoint_bytes() -> Vec<u8> {
    use distill::checkpoint::{RngPosition, RngPositions, TrainCheckpoint};
    let spec = distill::model::MlpSpec::new(8, vec![4], 3).unwrap();
    let position = RngPosition::of(&common::seed::rng(1, common::seed::Stream::Shuffle));
    let model = distill::model::Mlp::new_random(
        spec.clone(),
        &mut common::seed::rng(1, common::seed::Stream::Init),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let params: Vec<candle_core::Tensor> =
        model.vars().iter().map(|v| v.as_tensor().clone()).collect();
    TrainCheckpoint {
        architecture: distill::model::Architecture::Mlp(spec),
        epochs_done: 1,
        step: 3,
        velocity: params.clone(),
        params,
        rngs: RngPositions {
            shuffle: position.clone(),
            dropout: position.clone(),
            jitter: position,
        },
        history: vec![distill::train::EpochStats {
            epoch: 1,
            mean_loss: 1.0,
            validation_errors: 2,
            learning_rate: 0.1,
            seconds: 0.5,
            examples_per_second: 10.0,
            shard_wait_seconds: 0.0,
        }],
        best: None,
    }
    .to_bytes()
    .unwrap()
}

/// The header of an upload by `worker` for its lease `task`.
fn upload_header(worker: &str, task: &Assignment) -> Upload {
    Upload {
        worker: worker.into(),
        task: task.task_id.clone(),
        attempt: task.attempt,
        seconds: 1.0,
        summary: serde_json::json!({}),
    }
}

fn shard_bytes(start: usize) -> Vec<u8> {
    use common::transfer::{encode_shard, Encoding, ShardLogits};
    let logits = vec![0.0f32; 5 * 3];
    let teachers = ["teacher-0".to_string()];
    let views = [logits.as_slice()];
    let block = ShardLogits::new(start, 3, &teachers, &views).unwrap();
    encode_shard(Encoding::DenseF32, &block).unwrap()
}

/// A harness whose teacher-0 is done; returns it and the attempt used.
async fn teacher_done() -> (Harness, u64) {
    let h = Harness::new();
    let w = h.register();
    let teacher = h.lease(&w).await;
    assert_eq!(teacher.task_id, "teacher-0");
    h.upload(&w, &teacher, &model_bytes(1)).await.unwrap();
    (h, teacher.attempt)
}

/// A harness in which the teachers and the baseline are done, and `w`
/// holds the lease of the first inference shard.
async fn inferring() -> (Harness, String, Assignment) {
    let (h, _) = teacher_done().await;
    let w = h.register();
    let baseline = h.lease(&w).await;
    assert_eq!(baseline.task_id, "baseline");
    h.upload(&w, &baseline, &model_bytes(2)).await.unwrap();
    let infer = h.lease(&w).await;
    assert_eq!(infer.task_id, "infer-00000");
    (h, w, infer)
}

#[tokio::test]
async fn unknown_workers_are_refused() {
    let h = Harness::new();
    assert!(matches!(
        h.shared.lease("nobody").await,
        Err(JobError::UnknownWorker(_))
    ));
}

#[tokio::test]
async fn leases_carry_the_spec_and_the_inputs_checksums() {
    let h = Harness::new();
    let w = h.register();
    let task = h.lease(&w).await;
    assert_eq!(task.task_id, "teacher-0");
    let spec: distill::task::TaskSpec = serde_json::from_slice(&task.spec_json).unwrap();
    assert_eq!(spec.describe(), "train teacher-0");
    assert_eq!(task.inputs[0].name, ArtifactName::Dataset);
    assert_eq!(task.inputs[0].sha256, sha256_hex(b"splits"));
    let names: Vec<String> = task.inputs[1..]
        .iter()
        .map(|i| i.name.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "dataset/train/shard-00000.safetensors",
            "dataset/train/shard-00001.safetensors",
            "dataset/train/shard-00002.safetensors",
            "dataset/validation/shard-00000.safetensors",
        ],
        "a teacher reads the training and validation shards, not the test split's"
    );
    let shard = &task.inputs[2];
    assert_eq!(shard.sha256, sha256_hex(shard.name.to_string().as_bytes()));
}

#[tokio::test]
async fn a_malformed_model_is_refused_and_nothing_is_stored() {
    let h = Harness::new();
    let w = h.register();
    let task = h.lease(&w).await;
    let err = h.upload(&w, &task, b"garbage").await.unwrap_err();
    assert!(matches!(err, JobError::BadResult { .. }), "{err}");
    let model = ArtifactName::Model("teacher-0".into());
    assert!(h.object(&model).await.is_none());
    assert!(h.shared.with(|job| job.artifact_ref(&model).is_none()));
    assert!(
        !h.is_done("teacher-0"),
        "the attempt may still deliver a good result"
    );
}

#[tokio::test]
async fn a_shard_for_the_wrong_rows_is_refused_and_the_last_one_completes_the_set() {
    let (h, w, infer) = inferring().await;
    let err = h.upload(&w, &infer, &shard_bytes(3)).await.unwrap_err();
    assert!(err.to_string().contains("does not hold 0..5"), "{err}");
    assert!(h.object(&ArtifactName::Shard(0)).await.is_none());
    h.upload(&w, &infer, &shard_bytes(0)).await.unwrap();
    assert!(h.is_done("infer-00000"));
    assert!(
        h.object(&ArtifactName::TransferManifest).await.is_none(),
        "one shard of two"
    );
    let second = h.lease(&w).await;
    assert_eq!(second.task_id, "infer-00001");
    h.upload(&w, &second, &shard_bytes(5)).await.unwrap();
    let manifest = h
        .object(&ArtifactName::TransferManifest)
        .await
        .expect("the set is complete");
    let manifest: common::transfer::Manifest = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(manifest.shards.len(), 2);
    assert_eq!(manifest.shards[1].sha256, sha256_hex(&shard_bytes(5)));
    let student = h.lease(&w).await;
    assert_eq!(student.task_id, "student");
    assert!(student
        .inputs
        .iter()
        .any(|i| i.name == ArtifactName::TransferManifest));
}

#[tokio::test]
async fn a_result_from_an_expired_attempt_is_refused() {
    let h = Harness::new();
    let w1 = h.register();
    let w2 = h.register();
    let stale = h.lease(&w1).await;
    h.shared.advance(20 * SECOND);
    h.shared.with_now(|job, now| job.tick(now));
    let fresh = h.lease(&w2).await;
    assert_eq!(fresh.task_id, stale.task_id);
    assert!(fresh.attempt > stale.attempt);
    let err = h.upload(&w1, &stale, &model_bytes(1)).await.unwrap_err();
    assert!(matches!(err, JobError::Refused(_)), "{err}");
    assert!(
        !h.heartbeat(&w1, &stale).await,
        "the stale worker is told to stop"
    );
    assert!(h.heartbeat(&w2, &fresh).await);
    h.upload(&w2, &fresh, &model_bytes(1)).await.unwrap();
    let status = h.shared.status(None);
    let task = status.tasks.iter().find(|t| t.id == fresh.task_id).unwrap();
    assert_eq!(task.state, "done");
    assert_eq!(
        (task.worker.as_deref(), task.attempt),
        (Some(w2.as_str()), Some(fresh.attempt)),
        "the status names the attempt whose result was accepted"
    );
    let leased = |w: &str| {
        status
            .workers
            .iter()
            .find(|s| s.id == w)
            .unwrap()
            .tasks_leased
    };
    assert_eq!((leased(&w1), leased(&w2)), (1, 1));
}

#[tokio::test]
async fn a_cached_result_completes_its_task_in_a_later_job() {
    let cache = TaskCache::in_store(Arc::new(MemoryStore::default()));
    let first = Harness::new().with_cache(cache.clone());
    let w = first.register();
    let teacher = first.lease(&w).await;
    assert_eq!(teacher.task_id, "teacher-0");
    first.upload(&w, &teacher, &model_bytes(1)).await.unwrap();
    assert!(!first.shared.with(|job| job.records["teacher-0"].cached));

    let second = Harness::new().with_cache(cache);
    let w = second.register();
    let next = second.lease(&w).await;
    assert_eq!(next.task_id, "baseline", "teacher-0 came from the cache");
    assert!(second.is_done("teacher-0"));
    assert!(second.shared.with(|job| job.records["teacher-0"].cached));
    assert_eq!(
        second
            .object(&ArtifactName::Model("teacher-0".into()))
            .await
            .unwrap(),
        model_bytes(1)
    );
}

#[tokio::test]
async fn clusters_that_do_not_fit_the_job_are_refused() {
    let h = Harness::with("[specialists]\ncount = 2\n");
    let w = h.register();
    for seed in 0..2 {
        let t = h.lease(&w).await;
        h.upload(&w, &t, &model_bytes(seed)).await.unwrap();
    }
    let task = h.lease(&w).await;
    assert_eq!(task.task_id, "clusters");
    for (bad, why) in [
        (&b"not json"[..], "not a clusters file"),
        (
            br#"{"num_classes": 3, "clusters": [[0], [1], [2]]}"#,
            "3 clusters",
        ),
        (
            br#"{"num_classes": 3, "clusters": [[0], [5]]}"#,
            "class 5 does not exist",
        ),
        (
            br#"{"num_classes": 4, "clusters": [[0], [1]]}"#,
            "over 4 classes",
        ),
    ] {
        let err = h.upload(&w, &task, bad).await.unwrap_err();
        assert!(matches!(err, JobError::BadResult { .. }), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    assert!(h.object(&ArtifactName::Clusters).await.is_none());
    let good = br#"{"num_classes": 3, "clusters": [[0, 2], [1]]}"#;
    h.upload(&w, &task, good).await.unwrap();
    assert_eq!(
        h.shared.with(|job| job.clusters.clone()).unwrap().clusters,
        vec![vec![0, 2], vec![1]]
    );
    assert!(h.object(&ArtifactName::Clusters).await.is_some());
}

#[tokio::test]
async fn a_restarted_job_takes_up_committed_tasks_and_never_reuses_an_attempt_id() {
    let (h, used) = teacher_done().await;
    let (again, resumed) = h.restart().await;
    assert_eq!(resumed.restored, ["teacher-0"]);
    assert!(resumed.regenerated.is_empty());
    assert!(again.is_done("teacher-0"));
    assert!(again
        .shared
        .with(|job| job.records.contains_key("teacher-0")));
    let w = again.register();
    let next = again.lease(&w).await;
    assert_eq!(next.task_id, "baseline");
    assert!(next.attempt > used, "{} after {used}", next.attempt);
}

#[tokio::test]
async fn after_a_restart_a_worker_of_the_earlier_run_registers_again_under_a_new_id() {
    let (h, _) = teacher_done().await;
    let old = h
        .shared
        .with(|job| job.workers.keys().next().unwrap().clone());
    let (again, _) = h.restart().await;
    assert!(matches!(
        again.shared.lease(&old).await,
        Err(JobError::UnknownWorker(_))
    ));
    let first_new = again.register();
    assert_ne!(
        first_new, old,
        "a new worker never gets an id of the earlier run"
    );
    assert!(matches!(
        again.shared.lease(&old).await,
        Err(JobError::UnknownWorker(_))
    ));
}

#[tokio::test]
async fn a_corrupt_committed_result_is_regenerated_on_restart() {
    let (h, _) = teacher_done().await;
    let model = ArtifactName::Model("teacher-0".into());
    let mut bytes = h.object(&model).await.unwrap();
    bytes[100] ^= 0xff;
    blob::put_bytes(&*h.store.objects, &model.key(), bytes, PutMode::Overwrite)
        .await
        .unwrap();
    let (again, resumed) = h.restart().await;
    assert_eq!(resumed.regenerated, ["teacher-0"]);
    assert!(!again.is_done("teacher-0"));
    let w = again.register();
    assert_eq!(again.lease(&w).await.task_id, "teacher-0");
    let (_, third) = again.restart().await;
    assert!(third.restored.is_empty(), "the lost commit was forgotten");
}

#[tokio::test]
async fn an_artifact_lost_while_running_is_regenerated_and_its_readers_wait() {
    let (h, w, infer) = inferring().await;
    let model = ArtifactName::Model("teacher-0".into());
    blob::put_bytes(
        &*h.store.objects,
        &model.key(),
        b"short".to_vec(),
        PutMode::Overwrite,
    )
    .await
    .unwrap();
    let err = h.download(&w, &model).await.unwrap_err();
    assert!(matches!(err, JobError::Regenerating { .. }), "{err}");
    assert!(err.to_string().contains("bytes long"), "{err}");
    assert!(!h.is_done("teacher-0"));
    assert!(
        !h.heartbeat(&w, &infer).await,
        "the inference that reads the lost model is stopped"
    );
    let again = h.lease(&w).await;
    assert_eq!(again.task_id, "teacher-0");
    h.upload(&w, &again, &model_bytes(1)).await.unwrap();
    assert_eq!(h.lease(&w).await.task_id, "infer-00000");
    assert_eq!(h.download(&w, &model).await.unwrap(), model_bytes(1));
}

#[tokio::test]
async fn an_object_changed_under_the_same_size_ends_its_download_and_is_regenerated() {
    let (h, w, _) = teacher_done_and_registered().await;
    let model = ArtifactName::Model("teacher-0".into());
    let mut bytes = h.object(&model).await.unwrap();
    bytes[7] ^= 1;
    blob::put_bytes(&*h.store.objects, &model.key(), bytes, PutMode::Overwrite)
        .await
        .unwrap();
    let err = h.download(&w, &model).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(!h.is_done("teacher-0"));
    assert!(h.state_dir.path().exists());
    let (_, resumed) = h.restart().await;
    assert!(resumed.restored.is_empty(), "its commit was forgotten");
}

async fn teacher_done_and_registered() -> (Harness, String, u64) {
    let (h, attempt) = teacher_done().await;
    let w = h.register();
    (h, w, attempt)
}

/// A harness whose first task failed permanently.
async fn failed_permanently() -> (Harness, String, Assignment) {
    let h = Harness::new();
    let w = h.register();
    let task = h.lease(&w).await;
    let report = Failure {
        worker: w.clone(),
        task: task.task_id.clone(),
        attempt: task.attempt,
        error: "the loss diverged".into(),
        permanent: true,
        released: false,
    };
    assert!(
        !h.shared
            .with_now(|job, now| job.fail(&report, now))
            .unwrap(),
        "not retried"
    );
    (h, w, task)
}

#[tokio::test]
async fn a_permanent_failure_is_not_retried_and_later_uploads_are_refused() {
    let (h, w, task) = failed_permanently().await;
    assert!(h
        .shared
        .with(|job| job.scheduler.failure())
        .unwrap()
        .contains("diverged"));
    assert!(matches!(
        h.shared.lease(&w).await.unwrap(),
        Lease::JobOver {
            succeeded: false,
            ..
        }
    ));
    let err = h.upload(&w, &task, &model_bytes(1)).await.unwrap_err();
    assert!(matches!(err, JobError::Refused(_)), "{err}");
    assert!(h
        .object(&ArtifactName::Model("teacher-0".into()))
        .await
        .is_none());
}

#[tokio::test]
async fn a_checkpoint_goes_to_the_next_attempt_survives_a_restart_and_goes_at_the_end() {
    let h = Harness::new();
    let w = h.register();
    let first = h.lease(&w).await;
    assert_eq!(first.task_id, "teacher-0");
    let checkpoint = ArtifactName::Checkpoint("teacher-0".into());
    assert!(first.inputs.iter().all(|i| i.name != checkpoint));
    let err = h
        .send(UploadKind::Checkpoint, &w, &first, b"junk")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a checkpoint"), "{err}");
    let bytes = checkpoint_bytes();
    h.send(UploadKind::Checkpoint, &w, &first, &bytes)
        .await
        .unwrap();
    assert_eq!(h.object(&checkpoint).await.unwrap(), bytes);

    // The coordinator restarts; the lease is gone, the checkpoint not.
    let (h, resumed) = h.restart().await;
    assert_eq!(resumed.checkpoints, ["teacher-0"]);
    let w = h.register();
    let again = h.lease(&w).await;
    assert_eq!(again.task_id, "teacher-0");
    let input = again
        .inputs
        .iter()
        .find(|i| i.name == checkpoint)
        .expect("the re-run gets the checkpoint");
    assert_eq!(input.sha256, sha256_hex(&bytes));
    assert!(
        h.send(UploadKind::Checkpoint, &w, &first, &bytes)
            .await
            .is_err(),
        "the old attempt's checkpoints are refused"
    );
    h.upload(&w, &again, &model_bytes(1)).await.unwrap();
    assert!(
        h.object(&checkpoint).await.is_none(),
        "a finished task's checkpoint is deleted"
    );
    let (h, resumed) = h.restart().await;
    assert!(resumed.checkpoints.is_empty());

    // Inference trains nothing: it has no checkpoints.
    let w = h.register();
    let baseline = h.lease(&w).await;
    h.upload(&w, &baseline, &model_bytes(2)).await.unwrap();
    let infer = h.lease(&w).await;
    assert_eq!(infer.task_id, "infer-00000");
    let err = h
        .send(UploadKind::Checkpoint, &w, &infer, &bytes)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("trains nothing"), "{err}");
}

#[tokio::test]
async fn an_upload_whose_caller_goes_away_is_still_stored_and_recorded() {
    let h = Harness::new();
    let w = h.register();
    let task = h.lease(&w).await;
    let upload = upload_header(&w, &task);
    // The RPC is polled once and dropped at its first wait, as when the
    // worker is killed mid-request.
    let dropped = futures_util::FutureExt::now_or_never(h.shared.accept(
        UploadKind::Checkpoint,
        &upload,
        checkpoint_bytes().into(),
    ));
    assert!(dropped.is_none(), "the caller went away before the end");
    let checkpoint = ArtifactName::Checkpoint("teacher-0".into());
    for _ in 0..1000 {
        if h.shared.with(|job| job.artifact_ref(&checkpoint).is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recorded = h.shared.with(|job| job.artifact_ref(&checkpoint).cloned());
    let recorded = recorded.expect("the checkpoint was taken up all the same");
    assert_eq!(recorded.sha256, sha256_hex(&checkpoint_bytes()));
    assert_eq!(h.object(&checkpoint).await.unwrap(), checkpoint_bytes());
    let (_, resumed) = h.restart().await;
    assert_eq!(
        resumed.checkpoints,
        ["teacher-0"],
        "and recorded in the state"
    );
}

#[tokio::test]
async fn a_duplicate_upload_is_refused_and_changes_nothing() {
    let (h, attempt) = teacher_done().await;
    let w = h
        .shared
        .with(|job| job.workers.keys().next().unwrap().clone());
    let model = ArtifactName::Model("teacher-0".into());
    let before = h.object(&model).await.unwrap();
    let again = Assignment {
        task_id: "teacher-0".into(),
        attempt,
        spec_json: Vec::new(),
        inputs: Vec::new(),
    };
    let err = h.upload(&w, &again, &model_bytes(2)).await.unwrap_err();
    assert!(matches!(err, JobError::Refused(_)), "{err}");
    assert_eq!(h.object(&model).await.unwrap(), before);
    let (_, resumed) = h.restart().await;
    assert_eq!(
        resumed.restored,
        ["teacher-0"],
        "the commit is the first upload's"
    );
}

#[tokio::test]
async fn a_checkpoint_of_an_attempt_that_expired_while_it_was_stored_is_dropped() {
    let h = Harness::new();
    let w1 = h.register();
    let w2 = h.register();
    let first = h.lease(&w1).await;
    let upload = upload_header(&w1, &first);
    // The header is accepted; then the lease expires and the task goes to
    // another worker before the payload is in.
    h.shared
        .check_upload(&upload, UploadKind::Checkpoint)
        .unwrap();
    h.shared.advance(20 * SECOND);
    h.shared.with_now(|job, now| job.tick(now));
    let second = h.lease(&w2).await;
    let err = h
        .shared
        .accept(UploadKind::Checkpoint, &upload, checkpoint_bytes().into())
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::Refused(_)), "{err}");
    assert!(second
        .inputs
        .iter()
        .all(|i| !matches!(i.name, ArtifactName::Checkpoint(_))));
    assert!(h
        .object(&ArtifactName::Checkpoint("teacher-0".into()))
        .await
        .is_none());
    let (_, resumed) = h.restart().await;
    assert!(resumed.checkpoints.is_empty());
}

/// The key `task`'s attempt writes its result under in a bucket.
fn attempt_key_of(task: &Assignment) -> String {
    let spec: distill::task::TaskSpec = serde_json::from_slice(&task.spec_json).unwrap();
    common::artifact::attempt_key(&spec.output(), task.attempt, None)
}

impl Harness {
    /// What a worker does with S3: writes `payload` under its attempt's
    /// key, then reports it.
    async fn report(
        &self,
        worker: &str,
        task: &Assignment,
        payload: &[u8],
    ) -> Result<ArtifactRef, JobError> {
        let key = attempt_key_of(task);
        let written = blob::put_bytes(
            &*self.store.objects,
            &key,
            payload.to_vec(),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
        let reported = super::Reported {
            key,
            sha256: written.sha256,
            size: written.size,
            epochs_done: 0,
        };
        self.shared
            .commit_reported(UploadKind::Result, &upload_header(worker, task), reported)
            .await
    }
}

#[tokio::test]
async fn a_result_written_to_the_bucket_is_committed_by_its_report_and_read_by_its_key() {
    let h = Harness::new();
    let w = h.register();
    let teacher = h.lease(&w).await;
    let stored = h.report(&w, &teacher, &model_bytes(1)).await.unwrap();
    let key = format!("attempts/models/teacher-0.safetensors/{}", teacher.attempt);
    assert_eq!(stored.key.as_deref(), Some(key.as_str()));
    assert!(h.is_done("teacher-0"));
    assert!(
        h.object(&ArtifactName::Model("teacher-0".into()))
            .await
            .is_none(),
        "nothing is written at the name's key"
    );
    let baseline = h.lease(&w).await;
    h.report(&w, &baseline, &model_bytes(2)).await.unwrap();
    let infer = h.lease(&w).await;
    let model = infer
        .inputs
        .iter()
        .find(|i| i.name == ArtifactName::Model("teacher-0".into()))
        .unwrap();
    assert_eq!(
        model.stored_key(),
        key,
        "readers are given the committed key"
    );
    let (again, resumed) = h.restart().await;
    assert!(resumed.restored.contains(&"teacher-0".to_string()));
    assert_eq!(again.shared.sweep_attempts().await.unwrap(), 0);
}

#[tokio::test]
async fn a_report_of_another_key_size_or_attempt_is_refused_and_swept_later() {
    let h = Harness::new();
    let w1 = h.register();
    let stale = h.lease(&w1).await;
    let key = attempt_key_of(&stale);
    let bytes = model_bytes(1);
    let put = |key: String| {
        let store = h.store.objects.clone();
        let bytes = bytes.clone();
        async move {
            blob::put_bytes(&*store, &key, bytes, PutMode::Overwrite)
                .await
                .unwrap()
        }
    };
    let written = put(key.clone()).await;
    let report = |key: &str, size: u64| super::Reported {
        key: key.to_string(),
        sha256: written.sha256.clone(),
        size,
        epochs_done: 0,
    };
    let header = upload_header(&w1, &stale);
    let commit = |reported| {
        h.shared
            .commit_reported(UploadKind::Result, &header, reported)
    };
    let other = "attempts/models/teacher-1.safetensors/1";
    put(other.to_string()).await;
    let err = commit(report(other, written.size)).await.unwrap_err();
    assert!(err.to_string().contains("writes"), "{err}");
    let err = commit(report(&key, written.size + 1)).await.unwrap_err();
    assert!(err.to_string().contains("were reported"), "{err}");
    h.store.objects.remove(&key).await.unwrap();
    let err = commit(report(&key, written.size)).await.unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    put(key.clone()).await;
    // The lease expires; the stale attempt's report is refused.
    h.shared.advance(20 * SECOND);
    h.shared.with_now(|job, now| job.tick(now));
    let w2 = h.register();
    let fresh = h.lease(&w2).await;
    assert_eq!(fresh.task_id, stale.task_id);
    let err = commit(report(&key, written.size)).await.unwrap_err();
    assert!(matches!(err, JobError::Refused(_)), "{err}");
    h.report(&w2, &fresh, &model_bytes(1)).await.unwrap();
    // What no commit names goes: the stale attempt and the stray object.
    assert_eq!(h.shared.sweep_attempts().await.unwrap(), 2);
    let left = h.store.objects.list("attempts/").await.unwrap();
    assert_eq!(left, [attempt_key_of(&fresh)]);
}

#[tokio::test]
async fn an_input_a_worker_finds_lost_in_the_bucket_is_checked_and_regenerated() {
    let h = Harness::new();
    let w = h.register();
    let teacher = h.lease(&w).await;
    let stored = h.report(&w, &teacher, &model_bytes(1)).await.unwrap();
    let model = ArtifactName::Model("teacher-0".into());
    let intact = h.shared.reported_lost(&w, &model, "a flaky read").await;
    assert!(!intact.unwrap(), "an intact object is not regenerated");
    assert!(h.is_done("teacher-0"));
    let mut bytes = model_bytes(1);
    bytes[9] ^= 1;
    blob::put_bytes(
        &*h.store.objects,
        &stored.stored_key(),
        bytes,
        PutMode::Overwrite,
    )
    .await
    .unwrap();
    assert!(h.shared.reported_lost(&w, &model, "sha256").await.unwrap());
    assert!(!h.is_done("teacher-0"));
    let again = h.lease(&w).await;
    assert_eq!(again.task_id, "teacher-0");
    assert!(again.attempt > teacher.attempt);
    let regenerated = h.report(&w, &again, &model_bytes(1)).await.unwrap();
    assert_ne!(regenerated.stored_key(), stored.stored_key());
    assert_eq!(
        h.shared.sweep_attempts().await.unwrap(),
        1,
        "the corrupt object goes"
    );
}

#[tokio::test]
async fn shards_in_the_bucket_are_listed_by_key_and_a_lost_one_rewrites_the_manifest() {
    let h = Harness::new();
    let w = h.register();
    for _ in 0..2 {
        let task = h.lease(&w).await;
        h.report(&w, &task, &model_bytes(1)).await.unwrap();
    }
    let mut shards = Vec::new();
    for start in [0, 5] {
        let task = h.lease(&w).await;
        assert!(task.task_id.starts_with("infer-"), "{}", task.task_id);
        shards.push(h.report(&w, &task, &shard_bytes(start)).await.unwrap());
    }
    let manifest = |h: &Harness| {
        let h = h.store.objects.clone();
        async move {
            let bytes = blob::get_bytes(&*h, &ArtifactName::TransferManifest.key()).await;
            bytes.map(|b| serde_json::from_slice::<common::transfer::Manifest>(&b).unwrap())
        }
    };
    let listed = manifest(&h).await.unwrap();
    let keys: Vec<_> = listed.shards.iter().map(|s| s.key.clone()).collect();
    let committed: Vec<_> = shards.iter().map(|s| s.key.clone()).collect();
    assert_eq!(keys, committed);
    // A lost shard takes the manifest with it until it is made again.
    let shard = ArtifactName::Shard(1);
    h.store
        .objects
        .remove(&shards[1].stored_key())
        .await
        .unwrap();
    assert!(h.shared.reported_lost(&w, &shard, "missing").await.unwrap());
    assert!(manifest(&h).await.is_err(), "the manifest is gone");
    let task = loop {
        let task = h.lease(&w).await;
        if task.task_id == "infer-00001" {
            break task;
        }
    };
    let again = h.report(&w, &task, &shard_bytes(5)).await.unwrap();
    let listed = manifest(&h).await.unwrap();
    assert_eq!(listed.shards[1].key, again.key);
}
