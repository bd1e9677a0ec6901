//! Uploads: a worker's result or checkpoint (or a result from the task
//! cache) checked, stored, committed and taken up, in that order, with the
//! job's lock held only for the checks and the state changes. Through the
//! coordinator the payload arrives here and is stored at its name's key;
//! with S3 the worker wrote it under its attempt's key and reports it
//! ([`SharedJob::commit_reported`]), and only its size is checked here.

use bytes::Bytes;
use common::artifact::{attempt_key, ArtifactRef};
use common::blob::{self, PutMode};

use distill::task::Checked;

use super::accept::{Expected, UploadKind, Validated};
use super::shared::{SharedJob, Upload};
use super::{JobError, MadeBy, TaskRecord};
use crate::cache::CachedEntry;
use crate::state::{CommittedTask, StoredCheckpoint};

/// Runs `work` (`what`, for the error if it panics) in a task of its own,
/// so that a caller that goes away cannot stop it halfway.
async fn detached<T: Send + 'static>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, JobError>> + Send + 'static,
) -> Result<T, JobError> {
    tokio::spawn(work)
        .await
        .map_err(|e| JobError::Panicked(format!("{what}: {e}")))?
}

/// An object a worker wrote to the bucket, as it reports it.
#[derive(Clone, Debug)]
pub struct Reported {
    /// Its key under the job's prefix.
    pub key: String,
    /// sha256 of its bytes, as the worker computed it while writing.
    pub sha256: String,
    /// Its length.
    pub size: u64,
    /// For a checkpoint: the epochs it holds.
    pub epochs_done: usize,
}

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
        detached("storing the upload", async move {
            shared.store_upload(kind, &upload, payload, false).await
        })
        .await
    }

    async fn store_upload(
        &self,
        kind: UploadKind,
        upload: &Upload,
        payload: Bytes,
        cached: bool,
    ) -> Result<ArtifactRef, JobError> {
        let (_one_at_a_time, expected) = self.begin(upload, kind).await?;
        let validated = self.validate(&expected, payload.clone()).await?;
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
            key: None,
        };
        self.take(&expected, upload, validated, stored.clone(), cached)
            .await?;
        if !cached && kind == UploadKind::Result {
            self.keep_in_cache(&expected, upload, &payload).await;
        }
        Ok(stored)
    }

    /// Commits `reported`, an object a worker (or the task cache) wrote to
    /// the bucket for the current attempt: its key must be the attempt's,
    /// its size the stored object's; its content is read only when the job
    /// must decode it (clusters, evaluation), otherwise its readers verify
    /// its sha256.
    ///
    /// Like [`SharedJob::accept`], the work runs in a task of its own.
    pub async fn commit_reported(
        &self,
        kind: UploadKind,
        upload: &Upload,
        reported: Reported,
    ) -> Result<ArtifactRef, JobError> {
        let (shared, upload) = (self.clone(), upload.clone());
        detached("committing the result", async move {
            shared.take_reported(kind, &upload, reported, false).await
        })
        .await
    }

    async fn take_reported(
        &self,
        kind: UploadKind,
        upload: &Upload,
        reported: Reported,
        cached: bool,
    ) -> Result<ArtifactRef, JobError> {
        let (_one_at_a_time, expected) = self.begin(upload, kind).await?;
        let bad = |reason: String| JobError::BadResult {
            task: upload.task.clone(),
            reason,
        };
        let epochs = (kind == UploadKind::Checkpoint).then_some(reported.epochs_done);
        let key = attempt_key(&expected.artifact(), expected.attempt, epochs);
        if reported.key != key {
            return Err(bad(format!(
                "it was written to {:?}; attempt {} writes {key:?}",
                reported.key, expected.attempt
            )));
        }
        match self.store().size(&key).await? {
            Some(size) if size == reported.size => {}
            Some(size) => {
                return Err(bad(format!(
                    "{} holds {size} bytes, {} were reported",
                    self.store().location(&key),
                    reported.size
                )))
            }
            None => {
                return Err(bad(format!(
                    "{} does not exist",
                    self.store().location(&key)
                )))
            }
        }
        let validated = match expected.validate_unread(&reported) {
            Some(validated) => validated,
            None => {
                let bytes = blob::get_verified(&**self.store(), &key, &reported.sha256)
                    .await
                    .map_err(|e| bad(e.to_string()))?;
                self.validate(&expected, bytes.into()).await?
            }
        };
        let stored = ArtifactRef {
            name: expected.artifact(),
            sha256: reported.sha256,
            size: reported.size,
            key: Some(key),
        };
        self.take(&expected, upload, validated, stored.clone(), cached)
            .await?;
        if !cached && kind == UploadKind::Result {
            self.keep_copy_in_cache(&expected, upload, &stored).await;
        }
        Ok(stored)
    }

    /// Takes the task's upload lock (held until the output is taken up),
    /// then checks that `upload`'s attempt may deliver `kind`.
    async fn begin(
        &self,
        upload: &Upload,
        kind: UploadKind,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Expected), JobError> {
        let task = self.with(|job| {
            job.scheduler
                .index_of(&upload.task)
                .ok_or_else(|| JobError::UnknownTask(upload.task.clone()))
        })?;
        let one_at_a_time = self.upload_lock(task).lock().await;
        let expected = self.with_now(|job, now| {
            job.begin_upload(&upload.worker, &upload.task, upload.attempt, kind, now)
        })?;
        Ok((one_at_a_time, expected))
    }

    /// Decodes `payload` as `expected`'s output, on the blocking pool.
    async fn validate(&self, expected: &Expected, payload: Bytes) -> Result<Validated, JobError> {
        let checking = expected.clone();
        tokio::task::spawn_blocking(move || checking.validate(&payload))
            .await
            .map_err(|e| JobError::BadResult {
                task: expected.task_id.clone(),
                reason: format!("checking it panicked: {e}"),
            })?
    }

    /// Commits and takes up a stored output.
    async fn take(
        &self,
        expected: &Expected,
        upload: &Upload,
        validated: Validated,
        stored: ArtifactRef,
        cached: bool,
    ) -> Result<(), JobError> {
        match validated {
            Validated::Checkpoint { epochs_done } => {
                self.take_checkpoint(expected, stored, epochs_done).await
            }
            validated => {
                self.take_result(expected, upload, validated, stored, cached)
                    .await
            }
        }
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
        match taken {
            Err(refused) => {
                // The attempt expired meanwhile: its checkpoint is nobody's.
                let id = expected.task_id.clone();
                self.state(move |s| s.forget_checkpoint(&id)).await?;
                self.store().remove(&stored.stored_key()).await?;
                Err(refused)
            }
            Ok(replaced) => {
                if let Some(replaced) = replaced {
                    self.store().remove(&replaced.stored_key()).await?;
                }
                Ok(())
            }
        }
    }

    async fn take_result(
        &self,
        expected: &Expected,
        upload: &Upload,
        mut validated: Validated,
        stored: ArtifactRef,
        cached: bool,
    ) -> Result<(), JobError> {
        if let Validated::Result(Checked::Shard(entry)) = &mut validated {
            // The manifest names the object readers find the shard in.
            entry.key.clone_from(&stored.key);
        }
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
            self.store().remove(&checkpoint.stored_key()).await?;
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

    async fn keep_copy_in_cache(&self, expected: &Expected, upload: &Upload, stored: &ArtifactRef) {
        let Some(cache) = self.cache() else {
            return;
        };
        let key = self.with(|job| job.cache_key(expected.task));
        let entry = CachedEntry {
            sha256: stored.sha256.clone(),
            size: stored.size,
            summary: upload.summary.clone(),
            seconds: upload.seconds,
        };
        if let Err(e) = cache
            .keep(&key, &**self.store(), &stored.stored_key(), &entry)
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
        let (id, output) = self.with(|job| {
            let planned = &job.plan.tasks[task];
            (planned.id.clone(), planned.output.clone())
        });
        let taken = if self.store().as_s3().is_some() {
            // In a bucket the result is copied on the server, never read here.
            let Some(hit) = cache.find(key).await else {
                return false;
            };
            let to = attempt_key(&output, attempt, None);
            if let Err(e) = cache.copy_result(key, &**self.store(), &to).await {
                tracing::warn!(task = %id, error = %e, "could not copy the cached result; the task runs");
                return false;
            }
            let upload = Upload {
                worker: worker.to_string(),
                task: id,
                attempt,
                seconds: hit.seconds,
                summary: hit.summary,
            };
            let reported = Reported {
                key: to,
                sha256: hit.sha256,
                size: hit.size,
                epochs_done: 0,
            };
            let taken = self
                .take_reported(UploadKind::Result, &upload, reported, true)
                .await;
            (upload, taken)
        } else {
            let Some(hit) = cache.get(key).await else {
                return false;
            };
            let upload = Upload {
                worker: worker.to_string(),
                task: id,
                attempt,
                seconds: hit.seconds,
                summary: hit.summary,
            };
            let taken = self
                .store_upload(UploadKind::Result, &upload, hit.payload, true)
                .await;
            (upload, taken)
        };
        let (upload, taken) = taken;
        match taken {
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
