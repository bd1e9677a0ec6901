//! Taking up what an earlier run committed, and what to do when a stored
//! artifact turns out missing or corrupt: the task that made it runs again
//! and the tasks that read it wait.

use common::artifact::ArtifactName;
use common::transfer::Manifest;
use distill::specialists::ensemble::Clusters;

use super::{Job, JobError, TaskRecord};
use crate::scheduler::TaskState;
use crate::state::CommittedTask;

/// What [`super::SharedJob::resume`] found of an earlier run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Tasks whose committed results were verified and taken up.
    pub restored: Vec<String>,
    /// Tasks whose committed results were missing or corrupt; they run again.
    pub regenerated: Vec<String>,
    /// Unfinished tasks with a verified checkpoint to resume from.
    pub checkpoints: Vec<String>,
}

/// What must be done in the store and the database after an artifact was
/// found lost (see [`Job::artifact_lost`]).
#[derive(Clone, Debug, Default)]
pub struct LostActions {
    /// Forget this task's commit: it runs again.
    pub forget_commit: Option<String>,
    /// Forget this task's checkpoint record and delete its object (key).
    pub drop_checkpoint: Option<(String, String)>,
    /// Delete this object first: the lost one (so that it can be written
    /// again create-only), or the transfer manifest when a shard is lost.
    pub remove_object: Option<String>,
    /// Store the transfer set's manifest again.
    pub rewrite_manifest: Option<Manifest>,
    /// Delete the task cache's entry under this key: the lost result came
    /// from it.
    pub forget_cached: Option<String>,
}

impl Job {
    /// Makes task `id` done with its committed result, whose bytes were
    /// read and verified.
    pub fn restore(
        &mut self,
        id: &str,
        commit: &CommittedTask,
        bytes: &[u8],
    ) -> Result<(), JobError> {
        let task = self.task_index(id)?;
        let planned = &self.plan.tasks[task];
        let bad = |reason: String| JobError::BadResult {
            task: planned.id.clone(),
            reason,
        };
        if commit.artifact.name != planned.output {
            return Err(bad(format!(
                "the commit is of {}, the task makes {}",
                commit.artifact.name, planned.output
            )));
        }
        match &planned.output {
            ArtifactName::Shard(index) => {
                let entry = commit
                    .shard
                    .clone()
                    .ok_or_else(|| bad("the commit of a shard has no manifest entry".into()))?;
                self.transfer.stored(*index, entry);
            }
            ArtifactName::Clusters => {
                self.clusters = Some(
                    Clusters::from_json(bytes, &ArtifactName::Clusters.to_string())
                        .map_err(|e| bad(e.to_string()))?,
                );
            }
            ArtifactName::Evaluation => {
                self.evaluations = Some(
                    serde_json::from_slice(bytes)
                        .map_err(|e| bad(format!("not an evaluation list: {e}")))?,
                );
            }
            _ => {}
        }
        let id = planned.id.clone();
        self.record_artifact(commit.artifact.clone());
        self.records.insert(
            id,
            TaskRecord {
                summary: commit.summary.clone(),
                seconds: commit.seconds,
                cached: commit.cached,
                made_by: None,
            },
        );
        self.scheduler.restore_done(task);
        Ok(())
    }

    /// After [`Job::restore`] of every commit: makes tasks whose inputs are
    /// all done ready, and returns the transfer set's manifest to store
    /// again when every shard was restored.
    pub fn restored(&mut self) -> Option<Manifest> {
        self.scheduler.refresh_ready();
        self.transfer.complete()
    }

    /// True if task `id` exists and is not done: a checkpoint of it is
    /// worth keeping.
    pub fn is_unfinished(&self, id: &str) -> bool {
        self.scheduler
            .index_of(id)
            .is_some_and(|t| self.scheduler.state(t) != &TaskState::Done)
    }

    /// Handles stored artifact `name`, found missing or corrupt: the task
    /// that made it runs again, and the tasks that need it wait (leases on
    /// them are revoked). Returns the error to give the reader and what is
    /// left to do in the store and the database.
    pub fn artifact_lost(&mut self, name: &ArtifactName, problem: &str) -> (JobError, LostActions) {
        let lost = JobError::Regenerating {
            name: name.clone(),
            problem: problem.to_string(),
        };
        let mut actions = LostActions::default();
        match name {
            ArtifactName::Checkpoint(task) => {
                tracing::warn!(task, %problem, "a checkpoint is lost; the task starts from the beginning");
                let key = self
                    .forget_artifact(name)
                    .map_or_else(|| name.key(), |stored| stored.stored_key());
                self.checkpoint_times.remove(task);
                actions.drop_checkpoint = Some((task.clone(), key));
                return (lost, actions);
            }
            ArtifactName::TransferManifest => {
                tracing::warn!(%problem, "the transfer manifest is lost; writing it again");
                actions.remove_object = Some(name.key());
                actions.rewrite_manifest = self.transfer.complete();
                return (lost, actions);
            }
            _ => {}
        }
        let Some(task) = (0..self.plan.tasks.len()).find(|&t| &self.plan.tasks[t].output == name)
        else {
            tracing::error!(artifact = %name, %problem, "a stored artifact no task makes is lost; restart the coordinator to write it again");
            return (lost, actions);
        };
        let id = self.plan.tasks[task].id.clone();
        if self.scheduler.state(task) != &TaskState::Done {
            return (lost, actions);
        }
        tracing::warn!(artifact = %name, task = %id, %problem, "a stored artifact is lost; its task runs again");
        if self.records.remove(&id).is_some_and(|r| r.cached) {
            actions.forget_cached = Some(self.cache_key(task));
        }
        if let ArtifactName::Shard(index) = self.plan.tasks[task].output {
            self.transfer.lost(index);
            // The manifest will name the shard's new object: it is written
            // again (create-only) once every shard is there.
            if let Some(manifest) = self.forget_artifact(&ArtifactName::TransferManifest) {
                actions.remove_object = Some(manifest.stored_key());
            }
        }
        for (revoked, worker, attempt) in self.scheduler.reopen(task) {
            tracing::info!(task = %self.scheduler.id(revoked), attempt, %worker, "lease revoked until its input is regenerated");
            self.worker_idle(&worker);
        }
        actions.forget_commit = Some(id);
        (lost, actions)
    }
}
