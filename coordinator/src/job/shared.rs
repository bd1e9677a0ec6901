//! [`SharedJob`]: the job behind its lock, with the blob store, the state
//! database and the task cache it writes outside that lock. The gRPC
//! service, the status page, the main loop and the in-memory harness all
//! drive the job through it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::artifact::{ArtifactName, ArtifactRef, ATTEMPTS};
use common::blob::{self, BlobStore};
use common::transfer::Manifest;

use super::leases::LeaseStep;
use super::recovery::LostActions;
use super::{Job, JobError, Lease, Resumed};
use crate::cache::TaskCache;
use crate::state::{StateDb, StateError, ATTEMPT_BLOCK};

/// The job's clock: time since it started.
#[derive(Clone, Debug)]
enum Clock {
    /// The real one.
    Real(Instant),
    /// Moved by hand (tests).
    Manual(Arc<Mutex<Duration>>),
}

/// An upload's header, its checksum and size already verified.
#[derive(Clone, Debug, Default)]
pub struct Upload {
    /// The worker.
    pub worker: String,
    /// The task.
    pub task: String,
    /// The attempt.
    pub attempt: u64,
    /// Seconds the compute took.
    pub seconds: f64,
    /// The worker's summary (`null` when it sent none or no valid JSON).
    pub summary: serde_json::Value,
}

struct Inner {
    job: Mutex<Job>,
    store: Arc<dyn BlobStore>,
    state: Arc<StateDb>,
    cache: Option<TaskCache>,
    clock: Clock,
    name: String,
    /// One upload per task at a time, so that a stale attempt's and a
    /// current one's writes of the same object never interleave.
    uploads: Vec<tokio::sync::Mutex<()>>,
    /// Fencing ids below this are reserved in the state database.
    attempt_floor: tokio::sync::Mutex<u64>,
}

/// See [`SharedJob::lock_probe`].
#[cfg(test)]
pub(super) struct LockProbe(std::sync::Weak<Inner>);

#[cfg(test)]
impl LockProbe {
    /// True while someone holds the job's lock.
    pub fn is_locked(&self) -> bool {
        self.0.upgrade().is_some_and(|inner| {
            matches!(
                inner.job.try_lock(),
                Err(std::sync::TryLockError::WouldBlock)
            )
        })
    }
}

#[cfg(test)]
impl std::fmt::Debug for LockProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockProbe")
    }
}

/// The job shared between the service, the status page and the main loop.
#[derive(Clone)]
pub struct SharedJob {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedJob")
            .field("name", &self.inner.name)
            .field("store", &self.inner.store)
            .finish_non_exhaustive()
    }
}

impl SharedJob {
    /// Shares `job` (named `name` for people), which stores its artifacts
    /// in `store` and its state in `state`, takes finished tasks' results
    /// from `cache` when it has them; its clock starts at `started`.
    pub fn new(
        job: Job,
        store: Arc<dyn BlobStore>,
        state: Arc<StateDb>,
        cache: Option<TaskCache>,
        started: Instant,
        name: String,
    ) -> Self {
        Self::with_clock(job, store, state, cache, Clock::Real(started), name)
    }

    /// As [`SharedJob::new`] with a clock that moves only by
    /// [`SharedJob::advance`] (for harnesses and simulations).
    pub fn with_manual_clock(
        job: Job,
        store: Arc<dyn BlobStore>,
        state: Arc<StateDb>,
        cache: Option<TaskCache>,
    ) -> Self {
        let clock = Clock::Manual(Arc::new(Mutex::new(Duration::ZERO)));
        Self::with_clock(job, store, state, cache, clock, "test".into())
    }

    fn with_clock(
        job: Job,
        store: Arc<dyn BlobStore>,
        state: Arc<StateDb>,
        cache: Option<TaskCache>,
        clock: Clock,
        name: String,
    ) -> Self {
        let floor = job.scheduler.next_attempt();
        let uploads = (0..job.plan.tasks.len())
            .map(|_| tokio::sync::Mutex::new(()))
            .collect();
        SharedJob {
            inner: Arc::new(Inner {
                job: Mutex::new(job),
                store,
                state,
                cache,
                clock,
                name,
                uploads,
                attempt_floor: tokio::sync::Mutex::new(floor),
            }),
        }
    }

    /// Moves a manual clock on by `by`.
    ///
    /// # Panics
    /// On the real clock.
    pub fn advance(&self, by: Duration) {
        match &self.inner.clock {
            Clock::Manual(now) => *now.lock().unwrap() += by,
            Clock::Real(_) => panic!("the real clock cannot be moved"),
        }
    }

    /// Time since the job started (the scheduler's clock).
    pub fn now(&self) -> Duration {
        match &self.inner.clock {
            Clock::Real(started) => started.elapsed(),
            Clock::Manual(now) => *now.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The job's name, for people.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The blob store holding the job's artifacts.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.inner.store
    }

    /// A snapshot of the job for people and tools, with `report` (the
    /// report's Markdown, once written).
    pub fn status(&self, report: Option<String>) -> crate::status::JobStatus {
        self.with_now(|job, now| crate::status::JobStatus::of(job, self.name(), now, report))
    }

    /// Tells whether the job's lock is held, without keeping the job alive
    /// (the harness checks that no store call happens under it).
    #[cfg(test)]
    pub(super) fn lock_probe(&self) -> LockProbe {
        LockProbe(Arc::downgrade(&self.inner))
    }

    /// Runs `f` on the job under its lock, with the current time.
    pub fn with_now<R>(&self, f: impl FnOnce(&mut Job, Duration) -> R) -> R {
        let now = self.now();
        self.with(|job| f(job, now))
    }

    /// Runs `f` on the job under its lock. `f` must not block: the lock is
    /// taken on async threads.
    pub fn with<R>(&self, f: impl FnOnce(&mut Job) -> R) -> R {
        let mut job = self
            .inner
            .job
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut job)
    }

    /// Runs `f` on the state database on the blocking pool.
    pub(super) async fn state<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateDb) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, JobError> {
        let state = self.inner.state.clone();
        Ok(tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| StateError::Db {
                path: "job state".into(),
                message: format!("a database call panicked: {e}"),
            })??)
    }

    /// The task cache, if the job has one.
    pub(super) fn cache(&self) -> Option<&TaskCache> {
        self.inner.cache.as_ref()
    }

    /// The lock that serialises uploads for task number `task`.
    pub(super) fn upload_lock(&self, task: usize) -> &tokio::sync::Mutex<()> {
        &self.inner.uploads[task]
    }

    /// Takes up the tasks an earlier run of this job committed: each one
    /// whose artifact is present with its recorded checksum is done; the
    /// others are forgotten and run again (logged). Checkpoints of
    /// unfinished tasks are kept the same way.
    pub async fn resume(&self) -> Result<Resumed, JobError> {
        let mut committed = self.state(|s| s.committed()).await?;
        let planned: Vec<String> =
            self.with(|job| job.plan.tasks.iter().map(|t| t.id.clone()).collect());
        let mut resumed = Resumed::default();
        for id in planned {
            let Some(commit) = committed.remove(&id) else {
                continue;
            };
            let key = commit.artifact.stored_key();
            match blob::get_verified(&**self.store(), &key, &commit.artifact.sha256).await {
                Ok(bytes) => {
                    self.with(|job| job.restore(&id, &commit, &bytes))?;
                    resumed.restored.push(id);
                }
                Err(problem) => {
                    tracing::warn!(task = %id, %problem, "a committed result is lost; the task runs again");
                    let forget = id.clone();
                    self.state(move |s| s.forget_task(&forget)).await?;
                    resumed.regenerated.push(id);
                }
            }
        }
        match self.with(|job| job.restored()) {
            Some(manifest) => {
                let stored = self.put_manifest(&manifest).await?;
                self.with(|job| job.record_artifact(stored));
            }
            // A manifest the earlier run left names shards that are gone or
            // will be made again (under other keys, in a bucket).
            None => {
                self.store()
                    .remove(&ArtifactName::TransferManifest.key())
                    .await?
            }
        }
        for (id, checkpoint) in self.state(|s| s.checkpoints()).await? {
            let key = checkpoint.artifact.stored_key();
            let unfinished = self.with(|job| job.is_unfinished(&id));
            let verified =
                blob::get_verified(&**self.store(), &key, &checkpoint.artifact.sha256).await;
            match verified {
                Ok(_) if unfinished => {
                    self.with(|job| job.record_artifact(checkpoint.artifact.clone()));
                    resumed.checkpoints.push(id);
                }
                verified => {
                    if let Err(problem) = verified {
                        tracing::warn!(task = %id, %problem, "a checkpoint is lost; the task starts from the beginning");
                    }
                    self.state(move |s| s.forget_checkpoint(&id)).await?;
                    self.store().remove(&key).await?;
                }
            }
        }
        Ok(resumed)
    }

    /// Stores the transfer set's manifest.
    pub(super) async fn put_manifest(&self, manifest: &Manifest) -> Result<ArtifactRef, JobError> {
        let name = ArtifactName::TransferManifest;
        let key = name.key();
        let bytes =
            manifest
                .to_bytes(std::path::Path::new(&key))
                .map_err(|e| JobError::BadResult {
                    task: "transfer set".into(),
                    reason: e.to_string(),
                })?;
        // Create-only: a manifest already there (its commit lost in a
        // crash, a retry) is taken if it is this one. Another one is stale
        // (written as a shard was being found lost): this coordinator's
        // state is the truth, so it is replaced, and said so.
        let written = match blob::put_once(&**self.store(), &key, bytes.clone()).await {
            Err(stale @ blob::BlobError::Differs { .. }) => {
                tracing::warn!(error = %stale, "replacing a stale transfer manifest");
                self.store().remove(&key).await?;
                blob::put_once(&**self.store(), &key, bytes).await?
            }
            written => written?,
        };
        Ok(ArtifactRef {
            name,
            sha256: written.sha256,
            size: written.size,
            key: None,
        })
    }

    /// Deletes the objects under `attempts/` that no committed artifact
    /// is: outputs of attempts that were refused, lost their lease or died
    /// before their commit. Run at start-up (after [`SharedJob::resume`])
    /// and when the job ends. Returns how many were deleted.
    pub async fn sweep_attempts(&self) -> Result<usize, JobError> {
        let written = self.store().list(ATTEMPTS).await?;
        let committed: std::collections::BTreeSet<String> = self.with(|job| {
            job.artifacts
                .values()
                .map(ArtifactRef::stored_key)
                .collect()
        });
        let mut removed = 0;
        for key in written.iter().filter(|k| !committed.contains(*k)) {
            self.store().remove(key).await?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "deleted the objects of attempts that were never committed"
            );
        }
        Ok(removed)
    }

    /// Handles `worker`'s report that input `name`, read from the bucket,
    /// was missing or corrupt: the coordinator checks the object itself
    /// (its size, then its sha256, streamed) and, when it is lost, makes it
    /// again as [`SharedJob::lost`] does. Returns whether it is lost.
    pub async fn reported_lost(
        &self,
        worker: &str,
        name: &ArtifactName,
        problem: &str,
    ) -> Result<bool, JobError> {
        let stored = self.with_now(|job, now| job.stored_for(worker, name, now))?;
        let key = stored.stored_key();
        let found = match self.store().size(&key).await? {
            None => Some("missing".to_string()),
            Some(size) if size != stored.size => {
                Some(format!("{size} bytes long, {} were stored", stored.size))
            }
            Some(_) => match blob::sha256_of(&**self.store(), &key).await {
                Ok(sha256) if sha256 == stored.sha256 => None,
                Ok(sha256) => Some(format!(
                    "corrupt (sha256 {sha256}, {} was stored)",
                    stored.sha256
                )),
                Err(e) => Some(format!("unreadable ({e})")),
            },
        };
        let Some(found) = found else {
            tracing::warn!(artifact = %name, worker, %problem, "a worker found an input lost that is intact");
            return Ok(false);
        };
        tracing::warn!(artifact = %name, worker, %problem, "a worker found an input lost");
        // Only the object checked: one committed meanwhile is not lost.
        let lost = self.with(|job| {
            (job.artifact_ref(name) == Some(&stored)).then(|| job.artifact_lost(name, &found))
        });
        let Some((lost, actions)) = lost else {
            return Ok(false);
        };
        self.carry_out(actions).await?;
        match lost {
            JobError::Regenerating { .. } => Ok(true),
            other => Err(other),
        }
    }

    /// Answers `worker` asking for work: a task (completed from the task
    /// cache instead when it holds the result), or wait, or the job is
    /// over.
    pub async fn lease(&self, worker: &str) -> Result<Lease, JobError> {
        loop {
            let step = self.with_now(|job, now| job.next_lease(worker, now))?;
            let (task, attempt, cache_key) = match step {
                LeaseStep::Answer(answer) => return Ok(answer),
                LeaseStep::Run {
                    task,
                    attempt,
                    cache_key,
                } => (task, attempt, cache_key),
            };
            // Reserved first: a cached result is committed under the
            // attempt's key too.
            self.reserve_attempt(attempt).await?;
            if self
                .complete_from_cache(worker, task, attempt, &cache_key)
                .await
            {
                continue;
            }
            if let Some(assignment) = self.with(|job| job.assign(worker, task, attempt)) {
                return Ok(Lease::Task(assignment));
            }
        }
    }

    /// Makes sure that the state database reserves fencing id `attempt`
    /// before a worker hears of it, so that a restarted coordinator never
    /// hands it out again.
    async fn reserve_attempt(&self, attempt: u64) -> Result<(), JobError> {
        let mut floor = self.inner.attempt_floor.lock().await;
        if attempt < *floor {
            return Ok(());
        }
        let reserved = attempt + ATTEMPT_BLOCK;
        self.state(move |s| s.raise_attempt_floor(reserved)).await?;
        *floor = reserved;
        Ok(())
    }

    /// Handles stored artifact `name`, found missing or corrupt (see
    /// [`Job::artifact_lost`]); returns the error to give the reader.
    pub async fn lost(&self, name: &ArtifactName, problem: &str) -> JobError {
        let (lost, actions) = self.with(|job| job.artifact_lost(name, problem));
        match self.carry_out(actions).await {
            Ok(()) => lost,
            Err(e) => e,
        }
    }

    async fn carry_out(&self, actions: LostActions) -> Result<(), JobError> {
        if let Some(id) = actions.forget_commit {
            self.state(move |s| s.forget_task(&id)).await?;
        }
        if let Some((id, key)) = actions.drop_checkpoint {
            self.state(move |s| s.forget_checkpoint(&id)).await?;
            self.store().remove(&key).await?;
        }
        if let Some(key) = actions.remove_object {
            self.store().remove(&key).await?;
        }
        if let Some(manifest) = actions.rewrite_manifest {
            let stored = self.put_manifest(&manifest).await?;
            self.with(|job| job.record_artifact(stored));
        }
        if let (Some(cache), Some(key)) = (self.cache(), actions.forget_cached) {
            cache.forget(&key).await;
        }
        Ok(())
    }
}
