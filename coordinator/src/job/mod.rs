//! The running job. [`Job`] is its state: the plan, the scheduler, the
//! workers, the stored artifacts and what finished tasks produced. Its
//! methods are synchronous, take the current time, do no I/O and are called
//! under one lock; [`SharedJob`] (in `shared.rs`) owns that lock and does
//! every read and write of the blob store and the state database outside
//! it, in the order that keeps a restart safe: the object, then its record
//! in the database, then the state change that others can see.
//!
//! By concept:
//! - `workers.rs`: the worker registry;
//! - `leases.rs`: leases, heartbeats, failures and expiry;
//! - `accept.rs`: checking uploaded outputs and taking them up;
//! - `recovery.rs`: restoring committed tasks, and lost artifacts;
//! - `telemetry.rs`: loss curves and summary lines;
//! - `shared.rs`, `uploads.rs`, `downloads.rs`: the lock and the I/O around it.

mod accept;
mod downloads;
mod leases;
mod recovery;
mod shared;
mod telemetry;
mod uploads;
mod workers;

#[cfg(test)]
mod harness;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::artifact::{ArtifactName, ArtifactRef};
use common::transfer::{Encoding, ManifestBuilder};
use distill::specialists::ensemble::Clusters;
use distill::task::ModelEvaluation;

use crate::plan::Plan;
use crate::scheduler::{Refusal, Scheduler};
use crate::state::StateError;

pub use accept::{Expected, UploadKind, Validated};
pub use leases::{Assignment, Failure, Lease};
pub use recovery::Resumed;
pub use shared::{SharedJob, Upload};
pub use telemetry::CURVE_POINTS;
pub use uploads::Reported;
pub use workers::{Capabilities, Progress, WorkerInfo};

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
    /// Reading or writing the blob store failed on the coordinator's side.
    #[error("storing the result failed: {0}")]
    Storage(#[from] common::blob::BlobError),
    /// The job's state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A step of the coordinator's own panicked.
    #[error("the coordinator failed: {0}")]
    Panicked(String),
    /// A stored artifact is missing or corrupt; the task that made it runs
    /// again.
    #[error("artifact {name} is {problem}; it is being regenerated, ask again later")]
    Regenerating {
        /// The artifact.
        name: ArtifactName,
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

/// What the dataset is, as the job needs it.
#[derive(Clone, Debug)]
pub struct DatasetFacts {
    /// [`common::dataset::Dataset::fingerprint`] of the training split.
    pub fingerprint: String,
    /// Examples in the training split.
    pub train_len: usize,
    /// Number of classes.
    pub num_classes: usize,
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
    /// The worker and attempt whose result was accepted in this run (`None`
    /// for a task taken up from an earlier run's state).
    pub made_by: Option<MadeBy>,
}

/// The worker attempt that made a task's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MadeBy {
    /// The worker's id.
    pub worker: String,
    /// The attempt's fencing id.
    pub attempt: u64,
}

/// The job's state.
#[derive(Debug)]
pub struct Job {
    /// The plan.
    pub plan: Plan,
    /// Task states and leases.
    pub scheduler: Scheduler,
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
    /// The artifacts stored so far.
    artifacts: BTreeMap<ArtifactName, ArtifactRef>,
    /// The transfer set's manifest, as its shards are stored.
    transfer: ManifestBuilder,
    dataset: DatasetFacts,
    poll_ms: u32,
    next_worker: u64,
    /// Ends every worker id of this coordinator process, so that a worker
    /// of an earlier run that kept its id is never taken for a new one.
    instance: u32,
}

impl Job {
    /// A job about to start whose fencing ids start at `first_attempt`
    /// (the state database's floor); `stored_dataset` holds the dataset's
    /// stored shards and index; `instance` tells this coordinator process's worker ids from
    /// an earlier one's (a random number). See [`SharedJob::resume`] to
    /// take up an earlier run.
    pub fn new(
        plan: Plan,
        dataset: DatasetFacts,
        stored_dataset: Vec<ArtifactRef>,
        leases: LeasePolicy,
        first_attempt: u64,
        instance: u32,
    ) -> Self {
        let mut scheduler = Scheduler::new(
            plan.tasks
                .iter()
                .map(|t| (t.id.clone(), t.deps.clone()))
                .collect(),
            leases.timeout,
            leases.max_attempts,
        );
        scheduler.start_attempts_at(first_attempt);
        let mut job = Job {
            transfer: ManifestBuilder::new(
                &dataset.fingerprint,
                dataset.train_len,
                dataset.num_classes,
                plan.transfer_teachers.clone(),
                Encoding::DenseF32,
                plan.shards,
            ),
            plan,
            scheduler,
            workers: BTreeMap::new(),
            records: HashMap::new(),
            evaluations: None,
            clusters: None,
            told_over: BTreeSet::new(),
            curves: HashMap::new(),
            checkpoint_times: HashMap::new(),
            artifacts: BTreeMap::new(),
            dataset,
            poll_ms: leases.poll_ms,
            next_worker: 1,
            instance,
        };
        for artifact in stored_dataset {
            job.record_artifact(artifact);
        }
        job
    }

    /// The stored artifact called `name`, if any.
    pub fn artifact_ref(&self, name: &ArtifactName) -> Option<&ArtifactRef> {
        self.artifacts.get(name)
    }

    /// Each stored model's key, by model name (for the report).
    pub fn model_keys(&self) -> HashMap<String, String> {
        self.artifacts
            .values()
            .filter_map(|a| a.name.model().map(|m| (m.to_string(), a.stored_key())))
            .collect()
    }

    /// Stored artifact `name`, asked for by `worker` (who is alive).
    pub fn stored_for(
        &mut self,
        worker: &str,
        name: &ArtifactName,
        now: Duration,
    ) -> Result<ArtifactRef, JobError> {
        self.touch(worker, now)?;
        self.artifact_ref(name)
            .cloned()
            .ok_or_else(|| JobError::UnknownArtifact(name.to_string()))
    }

    /// Records a stored artifact (replacing an earlier one of its name).
    fn record_artifact(&mut self, stored: ArtifactRef) {
        self.artifacts.insert(stored.name.clone(), stored);
    }

    fn forget_artifact(&mut self, name: &ArtifactName) -> Option<ArtifactRef> {
        self.artifacts.remove(name)
    }

    fn task_index(&self, task: &str) -> Result<usize, JobError> {
        self.scheduler
            .index_of(task)
            .ok_or_else(|| JobError::UnknownTask(task.to_string()))
    }

    /// True if task `id` is done.
    pub fn is_done(&self, id: &str) -> bool {
        self.scheduler
            .index_of(id)
            .is_some_and(|i| self.scheduler.state(i) == &crate::scheduler::TaskState::Done)
    }
}
