//! The running job: the plan, the scheduler, the artifact store, the workers
//! and what their tasks produced. Every method is synchronous and called
//! under one lock by the gRPC service with the current time; this is where a
//! worker's request becomes a scheduler event and a stored file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use common::transfer::{store_encoded_shard, write_manifest, Manifest, ShardEntry, FORMAT_VERSION};
use distill::checkpoint::TrainCheckpoint;
use distill::specialists::ensemble::Clusters;
use distill::task::{
    checkpoint_artifact, shard_artifact, ModelEvaluation, TaskSpec, CHECKPOINT_PREFIX,
    CLUSTERS_ARTIFACT, TRANSFER_MANIFEST_ARTIFACT,
};
use proto::pb;

use crate::cache::TaskCache;
use crate::plan::{Output, Plan};
use crate::scheduler::{FailureOutcome, LeaseDecision, Refusal, Scheduler};
use crate::state::{CommittedTask, StateDb, StateError, StoredCheckpoint, ATTEMPT_BLOCK};
use crate::store::{ArtifactStore, StoredArtifact};

/// Why a worker's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The worker id is not registered.
    #[error("unknown worker {0:?}; register first")]
    UnknownWorker(String),
    /// The task id is not in the plan.
    #[error("unknown task {0:?}")]
    UnknownTask(String),
    /// The attempt is not current (fencing).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The uploaded result is malformed.
    #[error("result of {task} refused: {reason}")]
    BadResult {
        /// The task.
        task: String,
        /// What is wrong.
        reason: String,
    },
    /// No artifact has this name.
    #[error("no artifact called {0:?}")]
    UnknownArtifact(String),
    /// Writing a result failed on the coordinator's side.
    #[error("storing the result failed: {0}")]
    Storage(#[from] common::Error),
    /// The job's state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A stored artifact is missing or corrupt; the task that made it runs
    /// again.
    #[error("artifact {name:?} is {problem}; it is being regenerated, ask again later")]
    Regenerating {
        /// The artifact.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// How leases work in a job.
#[derive(Clone, Copy, Debug)]
pub struct LeasePolicy {
    /// A lease not renewed for this long expires.
    pub timeout: Duration,
    /// Attempts per task before the job fails.
    pub max_attempts: u32,
    /// How long an idle worker waits before asking again, in ms.
    pub poll_ms: u32,
}

/// What [`Job::resume`] found of an earlier run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Tasks whose committed results were verified and taken up.
    pub restored: Vec<String>,
    /// Tasks whose committed results were missing or corrupt; they run again.
    pub regenerated: Vec<String>,
    /// Unfinished tasks with a verified checkpoint to resume from.
    pub checkpoints: Vec<String>,
}

/// What the coordinator knows about a worker.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    /// What it reported at registration.
    pub capabilities: pb::Capabilities,
    /// Time of its last request.
    pub last_seen: Duration,
    /// The task and attempt it runs, if any.
    pub task: Option<(String, u64)>,
    /// Its last reported progress.
    pub progress: Option<pb::Progress>,
}

/// A task's outcome as the report needs it.
#[derive(Clone, Debug, Default)]
pub struct TaskRecord {
    /// The worker's summary JSON.
    pub summary: serde_json::Value,
    /// Seconds the compute took.
    pub seconds: f64,
    /// Whether the result came from the task cache.
    pub cached: bool,
}

/// The job's state.
#[derive(Debug)]
pub struct Job {
    /// The plan.
    pub plan: Plan,
    /// Task states and leases.
    pub scheduler: Scheduler,
    /// The stored files.
    pub store: ArtifactStore,
    /// Registered workers by id.
    pub workers: BTreeMap<String, WorkerInfo>,
    /// Records of finished tasks by id.
    pub records: HashMap<String, TaskRecord>,
    /// The evaluation task's results.
    pub evaluations: Option<Vec<ModelEvaluation>>,
    /// The specialists' classes, once clustered.
    pub clusters: Option<Clusters>,
    /// Workers that were told the job is over.
    pub told_over: BTreeSet<String>,
    /// Training loss over time per task, as `[step, loss]` (see
    /// [`CURVE_POINTS`]).
    pub curves: HashMap<String, Vec<[f64; 2]>>,
    /// When each unfinished task's latest checkpoint was stored.
    pub checkpoint_times: HashMap<String, Duration>,
    transfer_dir: PathBuf,
    shard_entries: Vec<Option<ShardEntry>>,
    dataset_fingerprint: String,
    train_len: usize,
    num_classes: usize,
    poll_ms: u32,
    next_worker: u64,
    cache: Option<TaskCache>,
    state: StateDb,
    /// Fencing ids below this are reserved in the state database.
    attempts_reserved: u64,
}

impl Job {
    /// A job about to start; `store` already holds the dataset and `state`
    /// is the job's database (see [`Job::resume`] to take up an earlier
    /// run's results).
    pub fn new(
        plan: Plan,
        store: ArtifactStore,
        transfer_dir: PathBuf,
        dataset: (&str, usize, usize),
        leases: LeasePolicy,
        state: StateDb,
    ) -> Result<Self, JobError> {
        let mut scheduler = Scheduler::new(
            plan.tasks
                .iter()
                .map(|t| (t.id.clone(), t.deps.clone()))
                .collect(),
            leases.timeout,
            leases.max_attempts,
        );
        let floor = state.attempt_floor()?;
        scheduler.start_attempts_at(floor);
        let (fingerprint, train_len, num_classes) = dataset;
        Ok(Job {
            shard_entries: vec![None; plan.shards],
            plan,
            scheduler,
            store,
            workers: BTreeMap::new(),
            records: HashMap::new(),
            evaluations: None,
            clusters: None,
            told_over: BTreeSet::new(),
            curves: HashMap::new(),
            checkpoint_times: HashMap::new(),
            transfer_dir,
            dataset_fingerprint: fingerprint.to_string(),
            train_len,
            num_classes,
            poll_ms: leases.poll_ms,
            next_worker: 1,
            cache: None,
            state,
            attempts_reserved: floor,
        })
    }

    /// Takes up the tasks an earlier run of this job committed: each one
    /// whose artifact is present with its recorded checksum is done; the
    /// others are forgotten and run again (logged).
    pub fn resume(&mut self) -> Result<Resumed, JobError> {
        let committed = self.state.committed()?;
        let mut resumed = Resumed::default();
        for task in 0..self.plan.tasks.len() {
            let id = self.plan.tasks[task].id.clone();
            let Some(commit) = committed.get(&id) else {
                continue;
            };
            let path = self.store.root().join(&commit.file);
            match read_verified(&path, &commit.sha256) {
                Ok(bytes) => {
                    self.restore(task, commit, path, &bytes)?;
                    resumed.restored.push(id);
                }
                Err(problem) => {
                    tracing::warn!(task = %id, file = %path.display(), %problem, "a committed result is lost; the task runs again");
                    self.state.forget_task(&id)?;
                    resumed.regenerated.push(id);
                }
            }
        }
        self.scheduler.refresh_ready();
        if self.plan.shards > 0 && self.shard_entries.iter().all(Option::is_some) {
            self.finish_transfer_set()?;
        }
        for (id, checkpoint) in self.state.checkpoints()? {
            let path = self.store.root().join(&checkpoint.file);
            let unfinished = self
                .scheduler
                .index_of(&id)
                .is_some_and(|t| self.scheduler.state(t) != &crate::scheduler::TaskState::Done);
            match read_verified(&path, &checkpoint.sha256) {
                Ok(_) if unfinished => {
                    self.store.record(
                        &checkpoint_artifact(&id),
                        path,
                        checkpoint.sha256,
                        checkpoint.size,
                    );
                    resumed.checkpoints.push(id);
                }
                verified => {
                    if let Err(problem) = verified {
                        tracing::warn!(task = %id, file = %path.display(), %problem, "a checkpoint is lost; the task starts from the beginning");
                    }
                    self.state.forget_checkpoint(&id)?;
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(resumed)
    }

    /// Stores a training checkpoint of the current attempt of a training
    /// task (replacing the task's previous one).
    pub fn accept_checkpoint(
        &mut self,
        header: &pb::UploadHeader,
        payload: &[u8],
        now: Duration,
    ) -> Result<StoredArtifact, JobError> {
        self.check_upload(header, now)?;
        let task = self.task_index(&header.task_id)?;
        let planned = &self.plan.tasks[task];
        let bad = |reason: String| JobError::BadResult {
            task: planned.id.clone(),
            reason,
        };
        if !matches!(planned.spec, TaskSpec::Train(_) | TaskSpec::Specialist(_)) {
            return Err(bad("it trains nothing, so it has no checkpoints".into()));
        }
        let checkpoint = TrainCheckpoint::from_bytes(payload, &candle_core::Device::Cpu)
            .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
        let id = planned.id.clone();
        let stored = self.store.put(&checkpoint_artifact(&id), payload)?.clone();
        self.state.save_checkpoint(
            &id,
            &StoredCheckpoint {
                file: self.relative(&stored.path),
                sha256: stored.sha256.clone(),
                size: stored.size,
                epochs_done: checkpoint.epochs_done,
            },
        )?;
        tracing::info!(task = %id, attempt = header.attempt, epochs_done = checkpoint.epochs_done, bytes = payload.len(), "checkpoint stored");
        metrics::counter!("distill_checkpoints_stored_total").increment(1);
        self.checkpoint_times.insert(id, now);
        Ok(stored)
    }

    /// `path` relative to the output folder.
    fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(self.store.root())
            .unwrap_or(path)
            .to_path_buf()
    }

    /// Makes `task` done with its committed result (`bytes`, verified).
    fn restore(
        &mut self,
        task: usize,
        commit: &CommittedTask,
        path: PathBuf,
        bytes: &[u8],
    ) -> Result<(), JobError> {
        let planned = &self.plan.tasks[task];
        let bad = |reason: String| JobError::BadResult {
            task: planned.id.clone(),
            reason,
        };
        match &planned.output {
            Output::Model(_) | Output::Noop(_) => {}
            Output::Shard { index, .. } => {
                let entry = commit
                    .shard
                    .clone()
                    .ok_or_else(|| bad("the commit of a shard has no manifest entry".into()))?;
                self.shard_entries[*index] = Some(entry);
            }
            Output::Clusters => {
                self.clusters = Some(
                    Clusters::from_json(bytes, CLUSTERS_ARTIFACT)
                        .map_err(|e| bad(e.to_string()))?,
                );
            }
            Output::Evaluation => {
                self.evaluations = Some(
                    serde_json::from_slice(bytes)
                        .map_err(|e| bad(format!("not an evaluation list: {e}")))?,
                );
            }
        }
        self.store
            .record(&commit.artifact, path, commit.sha256.clone(), commit.size);
        self.records.insert(
            planned.id.clone(),
            TaskRecord {
                summary: commit.summary.clone(),
                seconds: commit.seconds,
                cached: commit.cached,
            },
        );
        self.scheduler.restore_done(task);
        Ok(())
    }

    /// Handles a stored artifact found missing or corrupt: the task that
    /// made it runs again, and the tasks that need it wait (leases on them
    /// are revoked). Returns the error to give the reader.
    pub fn artifact_lost(&mut self, name: &str, problem: &str) -> JobError {
        let lost = JobError::Regenerating {
            name: name.to_string(),
            problem: problem.to_string(),
        };
        if let Some(task) = name.strip_prefix(CHECKPOINT_PREFIX) {
            tracing::warn!(task, %problem, "a checkpoint is lost; the task starts from the beginning");
            if let Err(e) = self.drop_checkpoint(task) {
                return e;
            }
            return lost;
        }
        if name == TRANSFER_MANIFEST_ARTIFACT {
            tracing::warn!(%problem, "the transfer manifest is lost; writing it again");
            if let Err(e) = self.finish_transfer_set() {
                return e;
            }
            return lost;
        }
        let Some(task) =
            (0..self.plan.tasks.len()).find(|&t| self.plan.tasks[t].output.artifact() == name)
        else {
            tracing::error!(artifact = name, %problem, "a stored artifact no task makes is lost; restart the coordinator to write it again");
            return lost;
        };
        let id = self.plan.tasks[task].id.clone();
        if self.scheduler.state(task) != &crate::scheduler::TaskState::Done {
            return lost;
        }
        tracing::warn!(artifact = name, task = %id, %problem, "a stored artifact is lost; its task runs again");
        if let Err(e) = self.state.forget_task(&id) {
            return e.into();
        }
        self.records.remove(&id);
        if let Output::Shard { index, .. } = self.plan.tasks[task].output {
            self.shard_entries[index] = None;
        }
        for (revoked, worker, attempt) in self.scheduler.reopen(task) {
            tracing::info!(task = %self.scheduler.id(revoked), attempt, %worker, "lease revoked until its input is regenerated");
            if let Some(w) = self.workers.get_mut(&worker) {
                w.task = None;
            }
        }
        lost
    }

    /// Takes finished tasks' results from `cache` when it has them, and
    /// stores new ones there.
    pub fn with_cache(mut self, cache: TaskCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Registers a worker; returns its id.
    pub fn register(&mut self, capabilities: pb::Capabilities, now: Duration) -> String {
        let id = format!("w{}-{}", self.next_worker, capabilities.hostname);
        self.next_worker += 1;
        tracing::info!(worker = %id, device = %capabilities.device, threads = capabilities.threads, "worker registered");
        self.workers.insert(
            id.clone(),
            WorkerInfo {
                capabilities,
                last_seen: now,
                task: None,
                progress: None,
            },
        );
        id
    }

    /// Workers heard from within the lease timeout.
    pub fn workers_alive(&self, now: Duration) -> usize {
        self.workers
            .values()
            .filter(|w| now.saturating_sub(w.last_seen) < self.scheduler.lease_timeout())
            .count()
    }

    fn touch(&mut self, worker: &str, now: Duration) -> Result<&mut WorkerInfo, JobError> {
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| JobError::UnknownWorker(worker.to_string()))?;
        w.last_seen = now;
        Ok(w)
    }

    fn task_index(&self, task: &str) -> Result<usize, JobError> {
        self.scheduler
            .index_of(task)
            .ok_or_else(|| JobError::UnknownTask(task.to_string()))
    }

    /// Answers a worker asking for work.
    pub fn lease(&mut self, worker: &str, now: Duration) -> Result<pb::LeaseResponse, JobError> {
        self.touch(worker, now)?;
        let decision = loop {
            match self.scheduler.lease(worker, now) {
                LeaseDecision::Run { task, attempt }
                    if self.complete_from_cache(worker, task, attempt, now) =>
                {
                    continue
                }
                decision => break decision,
            }
        };
        let outcome = match decision {
            LeaseDecision::Run { task, attempt } => {
                if attempt >= self.attempts_reserved {
                    let reserved = attempt + ATTEMPT_BLOCK;
                    self.state.raise_attempt_floor(reserved)?;
                    self.attempts_reserved = reserved;
                }
                let planned = &self.plan.tasks[task];
                let checkpoint = checkpoint_artifact(&planned.id);
                let resume = self.store.get(&checkpoint).is_some().then_some(checkpoint);
                if resume.is_none() {
                    // Starting from scratch: the last attempt's curve is moot.
                    self.curves.remove(&planned.id);
                }
                let inputs = planned
                    .inputs
                    .iter()
                    .chain(&resume)
                    .map(|name| {
                        let a = self.store.get(name).unwrap_or_else(|| {
                            panic!("input {name} of ready task {} is not stored", planned.id)
                        });
                        pb::ArtifactRef {
                            name: name.clone(),
                            sha256: a.sha256.clone(),
                            size: a.size,
                        }
                    })
                    .collect();
                tracing::info!(task = %planned.id, attempt, worker, what = %planned.spec.describe(), "task started");
                let assignment = pb::TaskAssignment {
                    task_id: planned.id.clone(),
                    attempt,
                    spec_json: serde_json::to_vec(&planned.spec).expect("specs serialise"),
                    inputs,
                };
                let w = self.workers.get_mut(worker).expect("touched");
                w.task = Some((planned.id.clone(), attempt));
                w.progress = None;
                pb::lease_response::Outcome::Task(assignment)
            }
            LeaseDecision::Wait => pb::lease_response::Outcome::Wait(pb::Wait {
                retry_after_ms: self.poll_ms,
            }),
            LeaseDecision::JobOver => {
                self.told_over.insert(worker.to_string());
                pb::lease_response::Outcome::JobOver(pb::JobOver {
                    succeeded: self.scheduler.succeeded(),
                    message: self
                        .scheduler
                        .failure()
                        .unwrap_or_else(|| "job done".into()),
                })
            }
        };
        Ok(pb::LeaseResponse {
            outcome: Some(outcome),
        })
    }

    /// Renews a lease and records progress; `Ok(false)` tells the worker to
    /// stop (its attempt is no longer current).
    pub fn heartbeat(
        &mut self,
        req: &pb::HeartbeatRequest,
        now: Duration,
    ) -> Result<bool, JobError> {
        let worker = self.touch(&req.worker_id, now)?;
        worker.progress = req.progress.clone();
        let task = self.task_index(&req.task_id)?;
        match self.scheduler.heartbeat(task, req.attempt, now) {
            Ok(()) => {
                if let Some(p) = &req.progress {
                    if p.epochs > 0 && p.loss.is_finite() && p.step > 0 {
                        let curve = self.curves.entry(req.task_id.clone()).or_default();
                        add_curve_point(curve, [p.step as f64, p.loss]);
                    }
                }
                Ok(true)
            }
            Err(Refusal::StaleAttempt { .. }) => {
                if self.scheduler.is_over() {
                    self.told_over.insert(req.worker_id.clone());
                }
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Checks, before receiving the payload, that an upload may be accepted.
    pub fn check_upload(
        &mut self,
        header: &pb::UploadHeader,
        now: Duration,
    ) -> Result<(), JobError> {
        self.touch(&header.worker_id, now)?;
        let task = self.task_index(&header.task_id)?;
        self.scheduler.check_current(task, header.attempt)?;
        Ok(())
    }

    /// Stores a verified result of the current attempt, marks its task
    /// done and keeps it in the task cache. The payload's checksum was
    /// verified by the caller.
    pub fn accept_result(
        &mut self,
        header: &pb::UploadHeader,
        payload: &[u8],
        now: Duration,
    ) -> Result<StoredArtifact, JobError> {
        let stored = self.store_result(header, payload, now, false)?;
        if let Some(cache) = &self.cache {
            let task = self.task_index(&header.task_id)?;
            let record = &self.records[&header.task_id];
            if let Err(e) = cache.put(
                &self.cache_key(task),
                payload,
                &record.summary,
                header.seconds,
            ) {
                tracing::warn!(task = %header.task_id, error = %e, "could not keep the result in the task cache");
            }
        }
        Ok(stored)
    }

    /// The task-cache key of `task`: its spec and its inputs' checksums.
    fn cache_key(&self, task: usize) -> String {
        let planned = &self.plan.tasks[task];
        let inputs = planned.inputs.iter().map(|name| {
            let stored = self
                .store
                .get(name)
                .unwrap_or_else(|| panic!("input {name} of task {} is not stored", planned.id));
            (name.as_str(), stored.sha256.as_str())
        });
        TaskCache::key(&planned.spec, inputs)
    }

    /// Completes `task`, just leased to `worker`, with a cached result;
    /// false (the worker runs it) when there is none or it is refused.
    fn complete_from_cache(
        &mut self,
        worker: &str,
        task: usize,
        attempt: u64,
        now: Duration,
    ) -> bool {
        let Some(cache) = &self.cache else {
            return false;
        };
        let Some(hit) = cache.get(&self.cache_key(task)) else {
            return false;
        };
        let id = self.plan.tasks[task].id.clone();
        let header = pb::UploadHeader {
            worker_id: worker.to_string(),
            task_id: id.clone(),
            attempt,
            sha256: common::checksum::sha256_hex(&hit.payload),
            size: hit.payload.len() as u64,
            seconds: hit.seconds,
            summary_json: serde_json::to_vec(&hit.summary).expect("JSON serialises"),
        };
        match self.store_result(&header, &hit.payload, now, true) {
            Ok(_) => {
                tracing::info!(task = %id, "result taken from the task cache");
                true
            }
            Err(e) => {
                tracing::warn!(task = %id, error = %e, "cached result refused; the task runs");
                false
            }
        }
    }

    fn store_result(
        &mut self,
        header: &pb::UploadHeader,
        payload: &[u8],
        now: Duration,
        cached: bool,
    ) -> Result<StoredArtifact, JobError> {
        self.check_upload(header, now)?;
        let task = self.task_index(&header.task_id)?;
        let planned = &self.plan.tasks[task];
        let bad = |reason: String| JobError::BadResult {
            task: planned.id.clone(),
            reason,
        };
        let stored = match &planned.output {
            Output::Model(name) => {
                distill::model_io::from_bytes(
                    payload,
                    std::path::Path::new(name),
                    &candle_core::Device::Cpu,
                )
                .map_err(|e| bad(e.to_string()))?;
                self.store
                    .put(&distill::task::model_artifact(name), payload)?
                    .clone()
            }
            Output::Shard { index, range } => {
                let entry = store_encoded_shard(
                    &self.transfer_dir,
                    *index,
                    range.clone(),
                    &self.plan.transfer_teachers,
                    self.num_classes,
                    payload,
                )
                .map_err(|e| match e {
                    common::Error::Format { reason, .. } => bad(reason),
                    other => JobError::Storage(other),
                })?;
                let path = self.transfer_dir.join(&entry.file);
                let stored = self
                    .store
                    .record(
                        &shard_artifact(*index),
                        path,
                        entry.sha256.clone(),
                        payload.len() as u64,
                    )
                    .clone();
                self.shard_entries[*index] = Some(entry);
                stored
            }
            Output::Clusters => {
                let clusters = Clusters::from_json(payload, CLUSTERS_ARTIFACT)
                    .map_err(|e| bad(e.to_string()))?;
                if clusters.num_classes != self.num_classes
                    || clusters.clusters.len() != self.plan.specialists.len()
                {
                    return Err(bad(format!(
                        "{} clusters over {} classes, the job has {} specialists and {} classes",
                        clusters.clusters.len(),
                        clusters.num_classes,
                        self.plan.specialists.len(),
                        self.num_classes
                    )));
                }
                let stored = self.store.put(CLUSTERS_ARTIFACT, payload)?.clone();
                self.clusters = Some(clusters);
                stored
            }
            Output::Noop(_) => {
                let TaskSpec::Noop(noop) = &planned.spec else {
                    unreachable!("no-op outputs come from no-op tasks")
                };
                if payload != noop.payload().as_slice() {
                    return Err(bad("not this no-op task's index".into()));
                }
                self.store.put(&planned.output.artifact(), payload)?.clone()
            }
            Output::Evaluation => {
                let results: Vec<ModelEvaluation> = serde_json::from_slice(payload)
                    .map_err(|e| bad(format!("not an evaluation list: {e}")))?;
                let stored = self
                    .store
                    .put(crate::plan::EVALUATION_ARTIFACT, payload)?
                    .clone();
                self.evaluations = Some(results);
                stored
            }
        };
        let summary: serde_json::Value =
            serde_json::from_slice(&header.summary_json).unwrap_or(serde_json::Value::Null);
        let shard = match planned.output {
            Output::Shard { index, .. } => self.shard_entries[index].clone(),
            _ => None,
        };
        let commit = CommittedTask {
            artifact: planned.output.artifact(),
            file: self.relative(&stored.path),
            sha256: stored.sha256.clone(),
            size: stored.size,
            seconds: header.seconds,
            summary: summary.clone(),
            cached,
            shard,
        };
        self.state.commit_task(&planned.id, &commit)?;
        self.records.insert(
            planned.id.clone(),
            TaskRecord {
                summary,
                seconds: header.seconds,
                cached,
            },
        );
        let id = planned.id.clone();
        let is_shard = matches!(planned.output, Output::Shard { .. });
        // The manifest goes first: completing the last shard makes the
        // student's task (which reads it) ready.
        if is_shard && self.shard_entries.iter().all(Option::is_some) {
            self.finish_transfer_set()?;
        }
        self.scheduler.complete(task, header.attempt)?;
        self.drop_checkpoint(&id)?;
        if let Some(w) = self.workers.get_mut(&header.worker_id) {
            w.task = None;
        }
        tracing::info!(task = %id, attempt = header.attempt, worker = %header.worker_id, seconds = header.seconds, bytes = payload.len(), "task finished");
        metrics::counter!("distill_tasks_completed_total").increment(1);
        if is_shard {
            metrics::counter!("distill_transfer_bytes_written_total")
                .increment(payload.len() as u64);
        }
        Ok(stored)
    }

    /// Deletes task `id`'s checkpoint, if it has one.
    fn drop_checkpoint(&mut self, id: &str) -> Result<(), JobError> {
        let name = checkpoint_artifact(id);
        self.checkpoint_times.remove(id);
        if self.store.get(&name).is_some() {
            self.store.remove(&name)?;
            self.state.forget_checkpoint(id)?;
        }
        Ok(())
    }

    /// Writes the manifest once every shard is stored, which makes the
    /// transfer set complete and the student's task ready to run.
    fn finish_transfer_set(&mut self) -> Result<(), JobError> {
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            dataset_fingerprint: self.dataset_fingerprint.clone(),
            num_examples: self.train_len,
            num_classes: self.num_classes,
            teachers: self.plan.transfer_teachers.clone(),
            dtype: "F32".into(),
            shards: self.shard_entries.iter().flatten().cloned().collect(),
        };
        let bytes = write_manifest(&self.transfer_dir, &manifest)?;
        let path = self.transfer_dir.join(common::transfer::MANIFEST_FILE);
        self.store.record(
            TRANSFER_MANIFEST_ARTIFACT,
            path,
            common::checksum::sha256_hex(&bytes),
            bytes.len() as u64,
        );
        tracing::info!(dir = %self.transfer_dir.display(), shards = manifest.shards.len(), examples = self.train_len, "transfer set complete");
        Ok(())
    }

    /// Records a failed attempt; returns whether the task will be retried.
    pub fn fail(&mut self, report: &pb::FailureReport, now: Duration) -> Result<bool, JobError> {
        self.touch(&report.worker_id, now)?.task = None;
        let task = self.task_index(&report.task_id)?;
        if report.released {
            self.scheduler.release(task, report.attempt)?;
            tracing::info!(task = %report.task_id, attempt = report.attempt, worker = %report.worker_id, "task given back by a stopping worker");
            return Ok(true);
        }
        let outcome = if report.permanent {
            self.scheduler
                .fail_permanently(task, report.attempt, &report.error)?
        } else {
            self.scheduler.fail(task, report.attempt, &report.error)?
        };
        tracing::warn!(task = %report.task_id, attempt = report.attempt, worker = %report.worker_id, error = %report.error, "task attempt failed");
        metrics::counter!("distill_task_failures_total").increment(1);
        Ok(outcome == FailureOutcome::WillRetry)
    }

    /// Expires overdue leases.
    pub fn tick(&mut self, now: Duration) {
        for e in self.scheduler.expire(now) {
            tracing::warn!(
                task = %self.scheduler.id(e.task),
                attempt = e.attempt,
                worker = %e.worker,
                retry = e.outcome == FailureOutcome::WillRetry,
                "lease expired"
            );
            if let Some(w) = self.workers.get_mut(&e.worker) {
                w.task = None;
            }
        }
    }

    /// The artifact called `name`, for a download.
    pub fn artifact(
        &mut self,
        worker: &str,
        name: &str,
        now: Duration,
    ) -> Result<StoredArtifact, JobError> {
        self.touch(worker, now)?;
        let stored = self
            .store
            .get(name)
            .cloned()
            .ok_or_else(|| JobError::UnknownArtifact(name.to_string()))?;
        match std::fs::metadata(&stored.path) {
            Ok(m) if m.len() == stored.size => Ok(stored),
            Ok(m) => Err(self.artifact_lost(
                name,
                &format!("{} bytes long, {} were stored", m.len(), stored.size),
            )),
            Err(e) => Err(self.artifact_lost(name, &format!("unreadable ({e})"))),
        }
    }

    /// What each worker is doing, on one line: `worker: task epoch e/n
    /// loss l`, comma-separated.
    pub fn running_line(&self) -> String {
        let running: Vec<String> = self
            .workers
            .iter()
            .filter_map(|(id, w)| {
                let (task, _) = w.task.as_ref()?;
                let p = w.progress.as_ref();
                Some(match p {
                    Some(p) if p.epochs > 0 => format!(
                        "{id}: {task} epoch {}/{} loss {:.4}",
                        p.epoch, p.epochs, p.loss
                    ),
                    _ => format!("{id}: {task}"),
                })
            })
            .collect();
        running.join(", ")
    }

    /// A one-line summary for the periodic log.
    pub fn summary_line(&self, now: Duration) -> String {
        let c = self.scheduler.counts();
        format!(
            "tasks done {}/{} (running {}, ready {}, blocked {}, failed {}); workers alive {}; {}",
            c.done,
            self.scheduler.len(),
            c.running,
            c.ready,
            c.blocked,
            c.failed,
            self.workers_alive(now),
            self.running_line()
        )
    }

    /// True if `task` is done.
    #[cfg(test)]
    pub fn is_done(&self, task: &str) -> bool {
        self.scheduler
            .index_of(task)
            .is_some_and(|i| self.scheduler.state(i) == &crate::scheduler::TaskState::Done)
    }
}

/// Most points kept of a task's loss curve: past it, every other point is
/// dropped, so a long run keeps its whole shape at a bounded cost.
pub const CURVE_POINTS: usize = 400;

/// Appends `point` to `curve`, thinning it past [`CURVE_POINTS`].
fn add_curve_point(curve: &mut Vec<[f64; 2]>, point: [f64; 2]) {
    if curve.last().is_some_and(|last| last[0] >= point[0]) {
        return; // the same step again (or an older attempt's)
    }
    curve.push(point);
    if curve.len() > CURVE_POINTS {
        let mut keep = false;
        curve.retain(|_| {
            keep = !keep;
            keep
        });
    }
}

/// The bytes of `path` if their sha256 is `sha256`; else what is wrong.
pub fn read_verified(path: &Path, sha256: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("unreadable ({e})"))?;
    let found = common::checksum::sha256_hex(&bytes);
    if found != sha256 {
        return Err(format!("corrupt (sha256 {found}, {sha256} was stored)"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;
    use common::checksum::sha256_hex;

    const SECOND: Duration = Duration::from_secs(1);

    fn job(dir: &std::path::Path) -> Job {
        job_with(dir, "")
    }

    /// A job with `extra` appended to a minimal config.
    fn job_with(dir: &std::path::Path, extra: &str) -> Job {
        let text = format!(
            "output_dir = \"o\"\ntransfer_shards = 2\n[dataset]\nsource = \"synthetic\"\n\
             [teachers]\nhidden = [4]\n[student]\nhidden = [4]\n{extra}"
        );
        let cfg = ClusterConfig::parse(&text, std::path::Path::new("c.toml"), dir).unwrap();
        let plan = crate::plan::plan(&cfg, 10).unwrap();
        let mut store = ArtifactStore::new(dir);
        store.put("dataset", b"splits").unwrap();
        Job::new(
            plan,
            store,
            dir.join("transfer"),
            ("fp", 10, 3),
            LeasePolicy {
                timeout: 10 * SECOND,
                max_attempts: 2,
                poll_ms: 100,
            },
            StateDb::open(&dir.join("state")).unwrap(),
        )
        .unwrap()
    }

    fn caps() -> pb::Capabilities {
        pb::Capabilities {
            hostname: "h".into(),
            device: "cpu".into(),
            ..Default::default()
        }
    }

    fn leased(job: &mut Job, worker: &str, now: Duration) -> pb::TaskAssignment {
        match job.lease(worker, now).unwrap().outcome {
            Some(pb::lease_response::Outcome::Task(t)) => t,
            other => panic!("expected a task, got {other:?}"),
        }
    }

    fn header(worker: &str, task: &pb::TaskAssignment, payload: &[u8]) -> pb::UploadHeader {
        pb::UploadHeader {
            worker_id: worker.into(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            sha256: sha256_hex(payload),
            size: payload.len() as u64,
            ..Default::default()
        }
    }

    #[test]
    fn unknown_workers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job(dir.path());
        assert!(matches!(
            job.lease("nobody", SECOND),
            Err(JobError::UnknownWorker(_))
        ));
    }

    #[test]
    fn leases_carry_the_spec_and_the_inputs_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job(dir.path());
        let w = job.register(caps(), Duration::ZERO);
        let task = leased(&mut job, &w, SECOND);
        assert_eq!(task.task_id, "teacher-0");
        let spec: distill::task::TaskSpec = serde_json::from_slice(&task.spec_json).unwrap();
        assert_eq!(spec.describe(), "train teacher-0");
        assert_eq!(task.inputs.len(), 1);
        assert_eq!(task.inputs[0].sha256, sha256_hex(b"splits"));
    }

    #[test]
    fn a_malformed_model_is_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job(dir.path());
        let w = job.register(caps(), Duration::ZERO);
        let task = leased(&mut job, &w, SECOND);
        let err = job
            .accept_result(&header(&w, &task, b"garbage"), b"garbage", SECOND)
            .unwrap_err();
        assert!(matches!(err, JobError::BadResult { .. }), "{err}");
        assert!(job.store.get("models/teacher-0").is_none());
        assert!(!dir.path().join("models/teacher-0.safetensors").exists());
        assert!(
            !job.is_done("teacher-0"),
            "the attempt may still deliver a good result"
        );
    }

    #[test]
    fn a_shard_for_the_wrong_rows_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job(dir.path());
        let w = job.register(caps(), Duration::ZERO);
        // Finish teacher-0 and the baseline by hand so inference can start.
        for _ in 0..2 {
            let t = leased(&mut job, &w, SECOND);
            let i = job.scheduler.index_of(&t.task_id).unwrap();
            job.scheduler.complete(i, t.attempt).unwrap();
            let name = distill::task::model_artifact(&t.task_id);
            job.store.put(&name, b"model").unwrap();
        }
        let infer = leased(&mut job, &w, SECOND);
        assert_eq!(infer.task_id, "infer-00000");
        let logits = vec![0.0f32; 5 * 3];
        let wrong =
            common::transfer::encode_shard(3, 5, 3, &["teacher-0".into()], &[&logits]).unwrap();
        let err = job
            .accept_result(&header(&w, &infer, &wrong), &wrong, SECOND)
            .unwrap_err();
        assert!(err.to_string().contains("does not hold 0..5"), "{err}");
        assert!(!dir.path().join("transfer/shard-00000.safetensors").exists());
        let right =
            common::transfer::encode_shard(0, 5, 3, &["teacher-0".into()], &[&logits]).unwrap();
        job.accept_result(&header(&w, &infer, &right), &right, SECOND)
            .unwrap();
        assert!(job.is_done("infer-00000"));
        assert!(
            job.store
                .get(distill::task::TRANSFER_MANIFEST_ARTIFACT)
                .is_none(),
            "one shard of two"
        );
    }

    #[test]
    fn a_result_from_an_expired_attempt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job(dir.path());
        let w1 = job.register(caps(), Duration::ZERO);
        let w2 = job.register(caps(), Duration::ZERO);
        let stale = leased(&mut job, &w1, Duration::ZERO);
        job.tick(20 * SECOND);
        let fresh = leased(&mut job, &w2, 20 * SECOND);
        assert_eq!(fresh.task_id, stale.task_id);
        assert!(matches!(
            job.check_upload(&header(&w1, &stale, b"x"), 21 * SECOND),
            Err(JobError::Refused(_))
        ));
        let hb = pb::HeartbeatRequest {
            worker_id: w1.clone(),
            task_id: stale.task_id.clone(),
            attempt: stale.attempt,
            progress: None,
        };
        assert!(
            !job.heartbeat(&hb, 21 * SECOND).unwrap(),
            "the stale worker is told to stop"
        );
    }

    #[test]
    fn a_cached_result_completes_its_task_in_a_later_job() {
        let cache_dir = tempfile::tempdir().unwrap();
        let cache = || TaskCache::open(cache_dir.path()).unwrap();
        let spec = distill::model::MlpSpec::new(8, vec![4], 3).unwrap();
        let rng = &mut common::seed::rng(1, common::seed::Stream::Init);
        let model = distill::model::Mlp::new_random(spec, rng, &candle_core::Device::Cpu).unwrap();
        let bytes =
            distill::model_io::to_bytes(&model, common::dataset::Normalization::Identity).unwrap();

        let first_dir = tempfile::tempdir().unwrap();
        let mut first = job(first_dir.path()).with_cache(cache());
        let w = first.register(caps(), Duration::ZERO);
        let teacher = leased(&mut first, &w, SECOND);
        assert_eq!(teacher.task_id, "teacher-0");
        first
            .accept_result(&header(&w, &teacher, &bytes), &bytes, SECOND)
            .unwrap();
        assert!(!first.records["teacher-0"].cached);

        let second_dir = tempfile::tempdir().unwrap();
        let mut second = job(second_dir.path()).with_cache(cache());
        let w = second.register(caps(), Duration::ZERO);
        let next = leased(&mut second, &w, SECOND);
        assert_eq!(next.task_id, "baseline", "teacher-0 came from the cache");
        assert!(second.is_done("teacher-0"));
        assert!(second.records["teacher-0"].cached);
        assert_eq!(
            std::fs::read(second_dir.path().join("models/teacher-0.safetensors")).unwrap(),
            bytes
        );
    }

    #[test]
    fn clusters_that_do_not_fit_the_job_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job_with(dir.path(), "[specialists]\ncount = 2\n");
        let w = job.register(caps(), Duration::ZERO);
        for _ in 0..2 {
            let t = leased(&mut job, &w, SECOND);
            let i = job.scheduler.index_of(&t.task_id).unwrap();
            job.scheduler.complete(i, t.attempt).unwrap();
            job.store
                .put(&distill::task::model_artifact(&t.task_id), b"model")
                .unwrap();
        }
        let task = leased(&mut job, &w, SECOND);
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
            let err = job
                .accept_result(&header(&w, &task, bad), bad, SECOND)
                .unwrap_err();
            assert!(matches!(err, JobError::BadResult { .. }), "{err}");
            assert!(err.to_string().contains(why), "{err}");
        }
        assert!(job.store.get(CLUSTERS_ARTIFACT).is_none());
        let good = br#"{"num_classes": 3, "clusters": [[0, 2], [1]]}"#;
        job.accept_result(&header(&w, &task, good), good, SECOND)
            .unwrap();
        assert_eq!(
            job.clusters.as_ref().unwrap().clusters,
            vec![vec![0, 2], vec![1]]
        );
        assert!(dir.path().join("specialists/clusters.json").is_file());
    }

    fn model_bytes() -> Vec<u8> {
        let spec = distill::model::MlpSpec::new(8, vec![4], 3).unwrap();
        let rng = &mut common::seed::rng(1, common::seed::Stream::Init);
        let model = distill::model::Mlp::new_random(spec, rng, &candle_core::Device::Cpu).unwrap();
        distill::model_io::to_bytes(&model, common::dataset::Normalization::Identity).unwrap()
    }

    /// A job over `dir` whose teacher-0 is done with `model_bytes()`;
    /// returns the job and the attempt id it used.
    fn job_with_teacher_done(dir: &std::path::Path) -> (Job, u64) {
        let mut job = job(dir);
        let w = job.register(caps(), Duration::ZERO);
        let teacher = leased(&mut job, &w, SECOND);
        assert_eq!(teacher.task_id, "teacher-0");
        let bytes = model_bytes();
        job.accept_result(&header(&w, &teacher, &bytes), &bytes, SECOND)
            .unwrap();
        (job, teacher.attempt)
    }

    #[test]
    fn a_restarted_job_takes_up_committed_tasks_and_never_reuses_an_attempt_id() {
        let dir = tempfile::tempdir().unwrap();
        let (first, used) = job_with_teacher_done(dir.path());
        drop(first);

        let mut again = job(dir.path());
        assert!(
            !again.is_done("teacher-0"),
            "nothing is taken up before resume"
        );
        let resumed = again.resume().unwrap();
        assert_eq!(resumed.restored, vec!["teacher-0".to_string()]);
        assert!(resumed.regenerated.is_empty());
        assert!(again.is_done("teacher-0"));
        assert!(again.records.contains_key("teacher-0"));
        let w = again.register(caps(), Duration::ZERO);
        let next = leased(&mut again, &w, SECOND);
        assert_eq!(next.task_id, "baseline");
        assert!(next.attempt > used, "{} after {used}", next.attempt);
        assert_eq!(
            again.store.get("models/teacher-0").unwrap().sha256,
            sha256_hex(&model_bytes())
        );
    }

    #[test]
    fn a_corrupt_committed_result_is_regenerated_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        drop(job_with_teacher_done(dir.path()));
        let file = dir.path().join("models/teacher-0.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();

        let mut again = job(dir.path());
        let resumed = again.resume().unwrap();
        assert_eq!(resumed.regenerated, vec!["teacher-0".to_string()]);
        assert!(!again.is_done("teacher-0"));
        let w = again.register(caps(), Duration::ZERO);
        assert_eq!(leased(&mut again, &w, SECOND).task_id, "teacher-0");
        drop(again);
        let third = job(dir.path()).resume().unwrap();
        assert!(third.restored.is_empty(), "the lost commit was forgotten");
    }

    #[test]
    fn an_artifact_lost_while_running_is_regenerated_and_its_readers_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (mut job, _) = job_with_teacher_done(dir.path());
        let w = job.register(caps(), Duration::ZERO);
        let baseline = leased(&mut job, &w, SECOND);
        assert_eq!(baseline.task_id, "baseline");
        let bytes = model_bytes();
        job.accept_result(&header(&w, &baseline, &bytes), &bytes, SECOND)
            .unwrap();
        let infer = leased(&mut job, &w, SECOND);
        assert_eq!(infer.task_id, "infer-00000");
        std::fs::write(dir.path().join("models/teacher-0.safetensors"), b"short").unwrap();
        let err = job.artifact(&w, "models/teacher-0", SECOND).unwrap_err();
        assert!(matches!(err, JobError::Regenerating { .. }), "{err}");
        assert!(err.to_string().contains("bytes long"), "{err}");
        assert!(!job.is_done("teacher-0"));
        let hb = pb::HeartbeatRequest {
            worker_id: w.clone(),
            task_id: infer.task_id.clone(),
            attempt: infer.attempt,
            progress: None,
        };
        assert!(
            !job.heartbeat(&hb, SECOND).unwrap(),
            "the inference that reads the lost model is stopped"
        );
        let again = leased(&mut job, &w, 2 * SECOND);
        assert_eq!(again.task_id, "teacher-0");
        job.accept_result(&header(&w, &again, &bytes), &bytes, 2 * SECOND)
            .unwrap();
        assert_eq!(leased(&mut job, &w, 2 * SECOND).task_id, "infer-00000");
    }

    /// A job over `dir` whose first task failed permanently; returns the
    /// job, the worker and the failed assignment.
    fn job_failed_permanently(dir: &std::path::Path) -> (Job, String, pb::TaskAssignment) {
        let mut job = job(dir);
        let w = job.register(caps(), Duration::ZERO);
        let task = leased(&mut job, &w, SECOND);
        let report = pb::FailureReport {
            worker_id: w.clone(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            error: "the loss diverged".into(),
            permanent: true,
            released: false,
        };
        assert!(!job.fail(&report, SECOND).unwrap(), "not retried");
        (job, w, task)
    }

    #[test]
    fn a_permanent_failure_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (job, _, _) = job_failed_permanently(dir.path());
        assert!(job.scheduler.failure().unwrap().contains("diverged"));
        assert!(job.scheduler.is_over());
    }

    fn checkpoint_bytes() -> Vec<u8> {
        let spec = distill::model::MlpSpec::new(8, vec![4], 3).unwrap();
        let rng = common::seed::rng(1, common::seed::Stream::Shuffle);
        let position = distill::checkpoint::RngPosition::of(&rng);
        let model = distill::model::Mlp::new_random(
            spec.clone(),
            &mut common::seed::rng(1, common::seed::Stream::Init),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let params: Vec<candle_core::Tensor> =
            model.vars().iter().map(|v| v.as_tensor().clone()).collect();
        TrainCheckpoint {
            spec,
            epochs_done: 1,
            step: 3,
            velocity: params.clone(),
            params,
            rngs: distill::checkpoint::RngPositions {
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

    #[test]
    fn a_checkpoint_goes_to_the_next_attempt_survives_a_restart_and_goes_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job(dir.path());
        let w = job.register(caps(), Duration::ZERO);
        let first = leased(&mut job, &w, SECOND);
        assert_eq!(first.task_id, "teacher-0");
        assert!(first
            .inputs
            .iter()
            .all(|i| !i.name.starts_with("checkpoints/")));
        let err = job
            .accept_checkpoint(&header(&w, &first, b"junk"), b"junk", SECOND)
            .unwrap_err();
        assert!(err.to_string().contains("not a checkpoint"), "{err}");
        let bytes = checkpoint_bytes();
        job.accept_checkpoint(&header(&w, &first, &bytes), &bytes, SECOND)
            .unwrap();
        let file = dir.path().join("checkpoints/teacher-0.safetensors");
        assert_eq!(std::fs::read(&file).unwrap(), bytes);

        // The coordinator restarts; the lease is gone, the checkpoint not.
        drop(job);
        let mut job = self::job(dir.path());
        assert_eq!(
            job.resume().unwrap().checkpoints,
            vec!["teacher-0".to_string()]
        );
        let w = job.register(caps(), Duration::ZERO);
        let again = leased(&mut job, &w, SECOND);
        assert_eq!(again.task_id, "teacher-0");
        let input = again
            .inputs
            .iter()
            .find(|i| i.name == "checkpoints/teacher-0")
            .expect("the re-run gets the checkpoint");
        assert_eq!(input.sha256, sha256_hex(&bytes));
        assert!(
            job.accept_checkpoint(&header(&w, &first, &bytes), &bytes, SECOND)
                .is_err(),
            "the old attempt's checkpoints are refused"
        );
        let model = model_bytes();
        job.accept_result(&header(&w, &again, &model), &model, SECOND)
            .unwrap();
        assert!(!file.exists(), "a finished task's checkpoint is deleted");
        assert!(job.state.checkpoints().unwrap().is_empty());

        // Inference trains nothing: it has no checkpoints.
        let baseline = leased(&mut job, &w, SECOND);
        job.accept_result(&header(&w, &baseline, &model), &model, SECOND)
            .unwrap();
        let infer = leased(&mut job, &w, SECOND);
        assert_eq!(infer.task_id, "infer-00000");
        let err = job
            .accept_checkpoint(&header(&w, &infer, &bytes), &bytes, SECOND)
            .unwrap_err();
        assert!(err.to_string().contains("trains nothing"), "{err}");
    }

    #[test]
    fn a_duplicate_upload_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut job, attempt) = job_with_teacher_done(dir.path());
        let file = dir.path().join("models/teacher-0.safetensors");
        let before = std::fs::read(&file).unwrap();
        let other = {
            let spec = distill::model::MlpSpec::new(8, vec![4], 3).unwrap();
            let rng = &mut common::seed::rng(2, common::seed::Stream::Init);
            let model =
                distill::model::Mlp::new_random(spec, rng, &candle_core::Device::Cpu).unwrap();
            distill::model_io::to_bytes(&model, common::dataset::Normalization::Identity).unwrap()
        };
        let w = job.workers.keys().next().unwrap().clone();
        let again = pb::UploadHeader {
            worker_id: w,
            task_id: "teacher-0".into(),
            attempt,
            sha256: sha256_hex(&other),
            size: other.len() as u64,
            ..Default::default()
        };
        let err = job.accept_result(&again, &other, SECOND).unwrap_err();
        assert!(matches!(err, JobError::Refused(_)), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), before);
        assert_eq!(
            job.state.committed().unwrap()["teacher-0"].sha256,
            sha256_hex(&before)
        );
    }

    #[test]
    fn uploads_after_the_job_failed_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut job, w, task) = job_failed_permanently(dir.path());
        let bytes = model_bytes();
        let err = job
            .accept_result(&header(&w, &task, &bytes), &bytes, SECOND)
            .unwrap_err();
        assert!(matches!(err, JobError::Refused(_)), "{err}");
        assert!(!dir.path().join("models/teacher-0.safetensors").exists());
    }

    #[test]
    fn loss_curves_keep_their_shape_within_a_bounded_size() {
        let mut curve = Vec::new();
        for step in 1..=5000u32 {
            add_curve_point(&mut curve, [f64::from(step), 1.0 / f64::from(step)]);
        }
        add_curve_point(&mut curve, [10.0, 9.0]);
        assert!(curve.len() <= CURVE_POINTS && curve.len() > CURVE_POINTS / 2);
        assert_eq!(curve[0], [1.0, 1.0], "the start is kept");
        assert!(
            curve.windows(2).all(|w| w[0][0] < w[1][0]),
            "steps only go up"
        );
        assert!(curve.last().unwrap()[0] > 4900.0, "the end is kept");
    }
}
