//! Accepting a worker's upload: [`Job::begin_upload`] checks under the lock
//! that the attempt may upload and says what the payload must be
//! ([`Expected`]); [`Expected::validate`] decodes it outside the lock; once
//! it is stored and committed, [`Job::take_result`] / [`Job::take_checkpoint`]
//! make it part of the job.

use std::time::Duration;

use common::artifact::{ArtifactName, ArtifactRef};
use common::transfer::Manifest;
use distill::checkpoint::TrainCheckpoint;
use distill::task::{Checked, TaskSpec};

use super::{Job, JobError, TaskRecord};

/// What is uploaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadKind {
    /// The task's result.
    Result,
    /// A training checkpoint of the running attempt.
    Checkpoint,
}

/// What an upload must be, with everything needed to check it outside the
/// job's lock.
#[derive(Clone, Debug)]
pub struct Expected {
    /// The task (index into the plan).
    pub task: usize,
    /// Its id.
    pub task_id: String,
    /// The uploading attempt.
    pub attempt: u64,
    /// Result or checkpoint.
    pub kind: UploadKind,
    spec: TaskSpec,
    num_classes: usize,
}

/// A payload that passed [`Expected::validate`], decoded as far as the job
/// needs it.
#[derive(Clone, Debug)]
pub enum Validated {
    /// The task's result, checked by its kind.
    Result(Checked),
    /// A training checkpoint after this many epochs.
    Checkpoint {
        /// Epochs done.
        epochs_done: usize,
    },
}

impl Expected {
    /// The artifact the payload is stored as.
    pub fn artifact(&self) -> ArtifactName {
        match self.kind {
            UploadKind::Result => self.spec.output(),
            UploadKind::Checkpoint => ArtifactName::Checkpoint(self.task_id.clone()),
        }
    }

    /// What a reported object is, when that can be told without reading
    /// it (see [`TaskSpec::checked_unread`]); `None`: read and
    /// [`Expected::validate`] it.
    pub fn validate_unread(&self, reported: &super::uploads::Reported) -> Option<Validated> {
        match self.kind {
            UploadKind::Checkpoint => Some(Validated::Checkpoint {
                epochs_done: reported.epochs_done,
            }),
            UploadKind::Result => self
                .spec
                .checked_unread(&reported.sha256)
                .map(Validated::Result),
        }
    }

    /// Decodes `payload` and checks that it is what the task makes.
    pub fn validate(&self, payload: &[u8]) -> Result<Validated, JobError> {
        let bad = |reason: String| JobError::BadResult {
            task: self.task_id.clone(),
            reason,
        };
        if self.kind == UploadKind::Checkpoint {
            let checkpoint = TrainCheckpoint::from_bytes(payload, &candle_core::Device::Cpu)
                .map_err(|e| bad(format!("not a checkpoint: {e}")))?;
            return Ok(Validated::Checkpoint {
                epochs_done: checkpoint.epochs_done,
            });
        }
        let checked = self
            .spec
            .check_output(payload, self.num_classes)
            .map_err(|reason| match &self.spec {
                TaskSpec::Train(t) => bad(format!("{}: {reason}", t.model)),
                TaskSpec::Specialist(t) => bad(format!("{}: {reason}", t.model)),
                _ => bad(reason),
            })?;
        Ok(Validated::Result(checked))
    }
}

impl Job {
    /// Checks, before the payload is received and again before it is
    /// stored, that `worker`'s `attempt` at `task_id` may upload `kind`;
    /// returns what the payload must be.
    pub fn begin_upload(
        &mut self,
        worker: &str,
        task_id: &str,
        attempt: u64,
        kind: UploadKind,
        now: Duration,
    ) -> Result<Expected, JobError> {
        self.touch(worker, now)?;
        let task = self.task_index(task_id)?;
        self.scheduler.check_current(task, attempt)?;
        let planned = &self.plan.tasks[task];
        if kind == UploadKind::Checkpoint && !planned.spec.trains() {
            return Err(JobError::BadResult {
                task: planned.id.clone(),
                reason: "it trains nothing, so it has no checkpoints".into(),
            });
        }
        Ok(Expected {
            task,
            task_id: planned.id.clone(),
            attempt,
            kind,
            spec: planned.spec.clone(),
            num_classes: self.dataset.num_classes,
        })
    }

    /// Takes up a stored and committed result of `expected`'s attempt
    /// (still current); returns the transfer set's manifest when this was
    /// its last shard, to be stored before [`Job::complete_result`].
    pub fn take_result(
        &mut self,
        expected: &Expected,
        validated: Validated,
        stored: ArtifactRef,
        record: TaskRecord,
    ) -> Result<Option<Manifest>, JobError> {
        self.scheduler
            .check_current(expected.task, expected.attempt)?;
        let mut manifest = None;
        match validated {
            Validated::Result(Checked::Model | Checked::Noop) | Validated::Checkpoint { .. } => {}
            Validated::Result(Checked::Shard(entry)) => {
                let index = stored.name.shard().expect("a shard's artifact");
                self.transfer.stored(index, entry);
                manifest = self.transfer.complete();
            }
            Validated::Result(Checked::Clusters(clusters)) => self.clusters = Some(clusters),
            Validated::Result(Checked::Evaluation(results)) => self.evaluations = Some(results),
        }
        self.record_artifact(stored);
        self.records.insert(expected.task_id.clone(), record);
        Ok(manifest)
    }

    /// Marks `expected`'s task done (after its manifest, if it completed
    /// the transfer set, was stored as `manifest`). Returns the task's
    /// checkpoint, which is to be deleted.
    pub fn complete_result(
        &mut self,
        expected: &Expected,
        worker: &str,
        manifest: Option<ArtifactRef>,
    ) -> Result<Option<ArtifactRef>, JobError> {
        if let Some(manifest) = manifest {
            tracing::info!(
                shards = self.plan.shards,
                examples = self.dataset.train_len,
                "transfer set complete"
            );
            self.record_artifact(manifest);
        }
        self.scheduler.complete(expected.task, expected.attempt)?;
        self.worker_idle(worker);
        self.checkpoint_times.remove(&expected.task_id);
        let record = &self.records[&expected.task_id];
        let size = self
            .artifacts
            .get(&expected.artifact())
            .map_or(0, |a| a.size);
        tracing::info!(task = %expected.task_id, attempt = expected.attempt, worker, seconds = record.seconds, bytes = size, "task finished");
        metrics::counter!("distill_tasks_completed_total").increment(1);
        if matches!(expected.spec, TaskSpec::Infer(_)) {
            metrics::counter!("distill_transfer_bytes_written_total").increment(size);
        }
        Ok(self.forget_artifact(&ArtifactName::Checkpoint(expected.task_id.clone())))
    }

    /// Takes up a stored and committed checkpoint of `expected`'s attempt,
    /// if it is still current. Returns the checkpoint it replaces when that
    /// is another object, which is to be deleted.
    pub fn take_checkpoint(
        &mut self,
        expected: &Expected,
        stored: ArtifactRef,
        epochs_done: usize,
        now: Duration,
    ) -> Result<Option<ArtifactRef>, JobError> {
        self.scheduler
            .check_current(expected.task, expected.attempt)?;
        tracing::info!(task = %expected.task_id, attempt = expected.attempt, epochs_done, bytes = stored.size, "checkpoint stored");
        metrics::counter!("distill_checkpoints_stored_total").increment(1);
        let key = stored.stored_key();
        let replaced = self.forget_artifact(&stored.name);
        self.record_artifact(stored);
        self.checkpoint_times.insert(expected.task_id.clone(), now);
        Ok(replaced.filter(|old| old.stored_key() != key))
    }
}
