//! Uploads: a worker's result or checkpoint (or a result from the task
//! cache) checked, stored, committed and taken up, in that order, with the
//! job's lock held only for the checks and the state changes.

use bytes::Bytes;
use common::artifact::ArtifactRef;
use common::blob::{self, PutMode};

use distill::task::Checked;

use super::accept::{Expected, UploadKind, Validated};
use super::shared::{SharedJob, Upload};
use super::{JobError, MadeBy, TaskRecord};
use crate::state::{CommittedTask, StoredCheckpoint};

impl SharedJob {
    /// Checks, before its payload is received, that `upload` may be
    /// accepted.
    pub fn check_upload(&self, upload: &Upload, kind: UploadKind) -> Result<(), JobError> {
        self.with_now(|job, now| {
            job.begin_upload(&upload.worker, &upload.task, upload.attempt, kind, now)
        })
        .map(drop)
    }

    /// Stores a verified payload (its checksum and size were checked by the
    /// caller) of the current attempt: a result makes its task done and is
    /// kept in the task cache; a checkpoint replaces the task's previous
    /// one.
    ///
    /// The work runs in a task of its own: a caller that goes away (a
    /// worker killed mid-request drops its RPC) cannot stop it between
    /// storing the object and recording it.
    pub async fn accept(
        &self,
        kind: UploadKind,
        upload: &Upload,
        payload: Bytes,
    ) -> Result<ArtifactRef, JobError> {
        let (shared, upload) = (self.clone(), upload.clone());
        tokio::spawn(async move { shared.store_upload(kind, &upload, payload, false).await })
            .await
            .map_err(|e| JobError::Panicked(format!("storing the upload: {e}")))?
    }

    async fn store_upload(
        &self,
        kind: UploadKind,
        upload: &Upload,
        payload: Bytes,
        cached: bool,
    ) -> Result<ArtifactRef, JobError> {
        let task = self.with(|job| {
            job.scheduler
                .index_of(&upload.task)
                .ok_or_else(|| JobError::UnknownTask(upload.task.clone()))
        })?;
        let _one_at_a_time = self.upload_lock(task).lock().await;
        let expected = self.with_now(|job, now| {
            job.begin_upload(&upload.worker, &upload.task, upload.attempt, kind, now)
        })?;
        let validated = {
            let (expected, payload) = (expected.clone(), payload.clone());
            tokio::task::spawn_blocking(move || expected.validate(&payload))
                .await
                .map_err(|e| JobError::BadResult {
                    task: upload.task.clone(),
                    reason: format!("checking it panicked: {e}"),
                })??
        };
        let name = expected.artifact();
        let written = blob::put_bytes(
            &**self.store(),
            &name.key(),
            payload.clone(),
            PutMode::Overwrite,
        )
        .await?;
        let stored = ArtifactRef {
            name,
            sha256: written.sha256,
            size: written.size,
        };
        match validated {
            Validated::Checkpoint { epochs_done } => {
                self.take_checkpoint(&expected, stored.clone(), epochs_done)
                    .await?;
            }
            validated => {
                self.take_result(&expected, upload, validated, stored.clone(), cached)
                    .await?;
                if !cached {
                    self.keep_in_cache(&expected, upload, &payload).await;
                }
            }
        }
        Ok(stored)
    }

    async fn take_checkpoint(
        &self,
        expected: &Expected,
        stored: ArtifactRef,
        epochs_done: usize,
    ) -> Result<(), JobError> {
        let id = expected.task_id.clone();
        let record = StoredCheckpoint {
            artifact: stored.clone(),
            epochs_done,
        };
        self.state(move |s| s.save_checkpoint(&id, &record)).await?;
        let taken = self
            .with_now(|job, now| job.take_checkpoint(expected, stored.clone(), epochs_done, now));
        if let Err(refused) = taken {
            // The attempt expired meanwhile: its checkpoint is nobody's.
            let id = expected.task_id.clone();
            self.state(move |s| s.forget_checkpoint(&id)).await?;
            self.store().remove(&stored.name.key()).await?;
            return Err(refused);
        }
        Ok(())
    }

    async fn take_result(
        &self,
        expected: &Expected,
        upload: &Upload,
        validated: Validated,
        stored: ArtifactRef,
        cached: bool,
    ) -> Result<(), JobError> {
        let summary = upload.summary.clone();
        let commit = CommittedTask {
            artifact: stored.clone(),
            seconds: upload.seconds,
            summary: summary.clone(),
            cached,
            shard: match &validated {
                Validated::Result(Checked::Shard(entry)) => Some(entry.clone()),
                _ => None,
            },
        };
        let id = expected.task_id.clone();
        self.state(move |s| s.commit_task(&id, &commit)).await?;
        let record = TaskRecord {
            summary,
            seconds: upload.seconds,
            cached,
            made_by: Some(MadeBy {
                worker: upload.worker.clone(),
                attempt: expected.attempt,
            }),
        };
        let manifest = self.with(|job| job.take_result(expected, validated, stored, record))?;
        // The manifest goes first: completing the last shard makes the
        // student's task (which reads it) ready.
        let manifest = match manifest {
            Some(manifest) => Some(self.put_manifest(&manifest).await?),
            None => None,
        };
        let checkpoint =
            self.with(|job| job.complete_result(expected, &upload.worker, manifest))?;
        if let Some(checkpoint) = checkpoint {
            let id = expected.task_id.clone();
            self.store().remove(&checkpoint.name.key()).await?;
            self.state(move |s| s.forget_checkpoint(&id)).await?;
        }
        Ok(())
    }

    async fn keep_in_cache(&self, expected: &Expected, upload: &Upload, payload: &Bytes) {
        let Some(cache) = self.cache() else {
            return;
        };
        let key = self.with(|job| job.cache_key(expected.task));
        if let Err(e) = cache
            .put(&key, payload.clone(), &upload.summary, upload.seconds)
            .await
        {
            tracing::warn!(task = %upload.task, error = %e, "could not keep the result in the task cache");
        }
    }

    /// Completes `task`, just leased to `worker` as `attempt`, with the
    /// task cache's result under `key`; false (the worker runs it) when
    /// there is none or it is refused.
    pub(super) async fn complete_from_cache(
        &self,
        worker: &str,
        task: usize,
        attempt: u64,
        key: &str,
    ) -> bool {
        let Some(cache) = self.cache() else {
            return false;
        };
        let Some(hit) = cache.get(key).await else {
            return false;
        };
        let upload = Upload {
            worker: worker.to_string(),
            task: self.with(|job| job.plan.tasks[task].id.clone()),
            attempt,
            seconds: hit.seconds,
            summary: hit.summary,
        };
        match self
            .store_upload(UploadKind::Result, &upload, hit.payload, true)
            .await
        {
            Ok(_) => {
                tracing::info!(task = %upload.task, "result taken from the task cache");
                true
            }
            Err(e) => {
                tracing::warn!(task = %upload.task, error = %e, "cached result refused; the task runs");
                false
            }
        }
    }
}
