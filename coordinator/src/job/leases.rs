//! Leases: handing tasks to workers, renewing them on heartbeats, taking
//! failures and expiring leases that were not renewed.

use std::time::Duration;

use common::artifact::{ArtifactName, ArtifactRef};

use super::{Job, JobError, Progress};
use crate::cache::TaskCache;
use crate::scheduler::{FailureOutcome, LeaseDecision, Refusal};

/// A task handed to a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    /// The task's id.
    pub task_id: String,
    /// The attempt's fencing id.
    pub attempt: u64,
    /// The task's spec as JSON.
    pub spec_json: Vec<u8>,
    /// What it reads: its inputs, and the checkpoint it resumes from.
    pub inputs: Vec<ArtifactRef>,
}

/// The answer to a worker asking for work.
#[derive(Clone, Debug, PartialEq)]
pub enum Lease {
    /// Run this.
    Task(Assignment),
    /// Nothing is ready; ask again in this many ms.
    Wait {
        /// The delay.
        retry_after_ms: u32,
    },
    /// The job is over.
    JobOver {
        /// Whether every task is done.
        succeeded: bool,
        /// `job done`, or why it failed.
        message: String,
    },
}

/// A worker's word that its attempt did not finish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The worker.
    pub worker: String,
    /// The task.
    pub task: String,
    /// The attempt.
    pub attempt: u64,
    /// What went wrong.
    pub error: String,
    /// Retrying cannot help (the run diverged).
    pub permanent: bool,
    /// The worker stopped and gives the task back (no attempt is used).
    pub released: bool,
}

/// The next step of answering a lease request.
#[derive(Clone, Debug)]
pub(super) enum LeaseStep {
    /// The scheduler leased `task` to the worker; its result may be in the
    /// task cache under `cache_key`.
    Run {
        /// The task.
        task: usize,
        /// The attempt.
        attempt: u64,
        /// Its task-cache key.
        cache_key: String,
    },
    /// The answer.
    Answer(Lease),
}

impl Job {
    /// Asks the scheduler for work for `worker`.
    pub(super) fn next_lease(
        &mut self,
        worker: &str,
        now: Duration,
    ) -> Result<LeaseStep, JobError> {
        self.touch(worker, now)?;
        Ok(match self.scheduler.lease(worker, now) {
            LeaseDecision::Run { task, attempt } => LeaseStep::Run {
                task,
                attempt,
                cache_key: self.cache_key(task),
            },
            LeaseDecision::Wait => LeaseStep::Answer(Lease::Wait {
                retry_after_ms: self.poll_ms,
            }),
            LeaseDecision::JobOver => {
                self.told_over.insert(worker.to_string());
                LeaseStep::Answer(Lease::JobOver {
                    succeeded: self.scheduler.succeeded(),
                    message: self
                        .scheduler
                        .failure()
                        .unwrap_or_else(|| "job done".into()),
                })
            }
        })
    }

    /// The assignment of `task`, leased to `worker` as `attempt`; `None` if
    /// that attempt is no longer current (it expired meanwhile).
    pub(super) fn assign(&mut self, worker: &str, task: usize, attempt: u64) -> Option<Assignment> {
        self.scheduler.check_current(task, attempt).ok()?;
        let planned = &self.plan.tasks[task];
        let checkpoint = ArtifactName::Checkpoint(planned.id.clone());
        let resume = self.artifacts.get(&checkpoint).cloned();
        if resume.is_none() {
            // Starting from scratch: the last attempt's curve is moot.
            self.curves.remove(&planned.id);
        }
        let inputs = planned
            .inputs
            .iter()
            .map(|name| self.input(task, name).clone())
            .chain(resume)
            .collect();
        tracing::info!(task = %planned.id, attempt, worker, what = %planned.spec.describe(), "task started");
        let assignment = Assignment {
            task_id: planned.id.clone(),
            attempt,
            spec_json: serde_json::to_vec(&planned.spec).expect("specs serialise"),
            inputs,
        };
        if let Some(w) = self.workers.get_mut(worker) {
            w.task = Some((planned.id.clone(), attempt));
            w.progress = None;
            w.tasks_leased += 1;
        }
        Some(assignment)
    }

    /// Input `name` of ready task `task`: a ready task's inputs are stored.
    fn input(&self, task: usize, name: &ArtifactName) -> &ArtifactRef {
        self.artifacts.get(name).unwrap_or_else(|| {
            panic!(
                "input {name} of ready task {} is not stored",
                self.plan.tasks[task].id
            )
        })
    }

    /// The task-cache key of `task`: its spec and its inputs' checksums.
    pub(super) fn cache_key(&self, task: usize) -> String {
        let planned = &self.plan.tasks[task];
        TaskCache::key(
            &planned.spec,
            planned.inputs.iter().map(|name| self.input(task, name)),
        )
    }

    /// Renews a lease and records progress; `Ok(false)` tells the worker to
    /// stop (its attempt is no longer current).
    pub fn heartbeat(
        &mut self,
        worker: &str,
        task_id: &str,
        attempt: u64,
        progress: Option<Progress>,
        now: Duration,
    ) -> Result<bool, JobError> {
        self.touch(worker, now)?.progress = progress.clone();
        let task = self.task_index(task_id)?;
        match self.scheduler.heartbeat(task, attempt, now) {
            Ok(()) => {
                if let Some(p) = progress {
                    if p.epochs > 0 && p.loss.is_finite() && p.step > 0 {
                        self.add_curve_point(task_id, [p.step as f64, p.loss]);
                    }
                }
                Ok(true)
            }
            Err(Refusal::StaleAttempt { .. }) => {
                if self.scheduler.is_over() {
                    self.told_over.insert(worker.to_string());
                }
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records a failed attempt; returns whether the task will be retried.
    pub fn fail(&mut self, report: &Failure, now: Duration) -> Result<bool, JobError> {
        self.touch(&report.worker, now)?.task = None;
        let task = self.task_index(&report.task)?;
        if report.released {
            self.scheduler.release(task, report.attempt)?;
            tracing::info!(task = %report.task, attempt = report.attempt, worker = %report.worker, "task given back by a stopping worker");
            return Ok(true);
        }
        let outcome = if report.permanent {
            self.scheduler
                .fail_permanently(task, report.attempt, &report.error)?
        } else {
            self.scheduler.fail(task, report.attempt, &report.error)?
        };
        tracing::warn!(task = %report.task, attempt = report.attempt, worker = %report.worker, error = %report.error, "task attempt failed");
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
            self.worker_idle(&e.worker);
        }
    }
}
