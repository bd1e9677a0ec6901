//! The job as people see it: one [`JobStatus`] snapshot (tasks with their
//! state, dependencies, progress and loss curve; workers and what each is
//! doing; the report once written), served as JSON to the status page and
//! to `coordinator status`, rendered as text by [`JobStatus::summary`], and
//! exported as Prometheus gauges by [`JobStatus::export_metrics`].

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::Job;
pub use crate::scheduler::Counts;
use crate::scheduler::TaskState;

/// Where a running task is, as its worker last said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Such as `training` or `inference`.
    pub phase: String,
    /// Current epoch (1-based; 0 outside training).
    pub epoch: u32,
    /// Epochs in all.
    pub epochs: u32,
    /// Mean training loss of the current epoch so far.
    pub loss: Option<f64>,
    /// Training examples per second.
    pub examples_per_second: f64,
}

/// One task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Its id, such as `teacher-0`.
    pub id: String,
    /// What it does, such as `train teacher-0`.
    pub what: String,
    /// `blocked`, `ready`, `running`, `done` or `failed`.
    pub state: String,
    /// The tasks it needs.
    pub needs: Vec<String>,
    /// Its stage in the graph: 0 for tasks that need nothing, else one more
    /// than the latest stage it needs.
    pub stage: usize,
    /// Attempts so far.
    pub attempts: u32,
    /// The worker running it, or, once done, the worker whose result was
    /// accepted (`None` for a task taken up from an earlier run).
    pub worker: Option<String>,
    /// The fencing id of the attempt running it, or, once done, of the
    /// attempt whose result was accepted.
    pub attempt: Option<u64>,
    /// Its progress while running.
    pub progress: Option<Progress>,
    /// Training loss reported over time, as `[step, loss]` (thinned to at
    /// most [`crate::job::CURVE_POINTS`] points).
    pub loss_curve: Vec<[f64; 2]>,
    /// Seconds its compute took, once done.
    pub seconds: Option<f64>,
    /// Seconds since its latest checkpoint, while it has one.
    pub checkpoint_age_seconds: Option<f64>,
}

/// One worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its id.
    pub id: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Compute threads.
    pub threads: u32,
    /// The task it runs.
    pub task: Option<String>,
    /// Tasks leased to it so far.
    pub tasks_leased: u32,
    /// Seconds since its last request.
    pub seconds_since_seen: f64,
    /// Heard from within the lease timeout.
    pub alive: bool,
}

/// The whole job at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's name (its dataset).
    pub job: String,
    /// `running`, `succeeded` or `failed`.
    pub state: String,
    /// Why it failed.
    pub failure: Option<String>,
    /// Seconds since the coordinator started.
    pub elapsed_seconds: f64,
    /// Task counts.
    pub counts: Counts,
    /// Every task, in plan order.
    pub tasks: Vec<TaskStatus>,
    /// Every worker that registered.
    pub workers: Vec<WorkerStatus>,
    /// The report (Markdown), once the job is done.
    pub report: Option<String>,
}

impl JobStatus {
    /// A snapshot of `job` at `now`.
    pub fn of(job: &Job, name: &str, now: Duration, report: Option<String>) -> Self {
        let s = &job.scheduler;
        let mut stages: Vec<usize> = Vec::with_capacity(job.plan.tasks.len());
        let tasks = job
            .plan
            .tasks
            .iter()
            .enumerate()
            .map(|(i, planned)| {
                let stage = planned
                    .deps
                    .iter()
                    .map(|&d| stages[d] + 1)
                    .max()
                    .unwrap_or(0);
                stages.push(stage);
                let made_by = job
                    .records
                    .get(&planned.id)
                    .and_then(|r| r.made_by.as_ref());
                let (state, worker, attempt) = match s.state(i) {
                    TaskState::Blocked => ("blocked", None, None),
                    TaskState::Ready => ("ready", None, None),
                    TaskState::Leased {
                        worker, attempt, ..
                    } => ("running", Some(worker.clone()), Some(*attempt)),
                    TaskState::Done => (
                        "done",
                        made_by.map(|m| m.worker.clone()),
                        made_by.map(|m| m.attempt),
                    ),
                    TaskState::Failed => ("failed", None, None),
                };
                let progress = (state == "running")
                    .then_some(worker.as_ref())
                    .flatten()
                    .and_then(|w| job.workers.get(w))
                    .and_then(|w| w.progress.as_ref())
                    .map(|p| Progress {
                        phase: p.phase.clone(),
                        epoch: p.epoch,
                        epochs: p.epochs,
                        loss: p.loss.is_finite().then_some(p.loss),
                        examples_per_second: p.examples_per_second,
                    });
                TaskStatus {
                    id: planned.id.clone(),
                    what: planned.spec.describe(),
                    state: state.into(),
                    needs: planned
                        .deps
                        .iter()
                        .map(|&d| job.plan.tasks[d].id.clone())
                        .collect(),
                    stage,
                    attempts: s.attempts(i),
                    worker,
                    attempt,
                    progress,
                    loss_curve: job.curves.get(&planned.id).cloned().unwrap_or_default(),
                    seconds: job.records.get(&planned.id).map(|r| r.seconds),
                    checkpoint_age_seconds: job
                        .checkpoint_times
                        .get(&planned.id)
                        .map(|&at| now.saturating_sub(at).as_secs_f64()),
                }
            })
            .collect();
        let workers = job
            .workers
            .iter()
            .map(|(id, w)| {
                let since = now.saturating_sub(w.last_seen);
                WorkerStatus {
                    id: id.clone(),
                    device: w.capabilities.device.clone(),
                    threads: w.capabilities.threads,
                    task: w.task.as_ref().map(|(t, _)| t.clone()),
                    tasks_leased: w.tasks_leased,
                    seconds_since_seen: since.as_secs_f64(),
                    alive: since < s.lease_timeout(),
                }
            })
            .collect();
        let state = if s.succeeded() {
            "succeeded"
        } else if s.failure().is_some() {
            "failed"
        } else {
            "running"
        };
        JobStatus {
            job: name.to_string(),
            state: state.into(),
            failure: s.failure(),
            elapsed_seconds: now.as_secs_f64(),
            counts: s.counts(),
            tasks,
            workers,
            report,
        }
    }

    /// The snapshot as terminal text: counts, running tasks with their
    /// progress, workers, and the failure if any.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let mut out = format!(
            "job {} ({}), {:.0} s: tasks done {}/{} (running {}, ready {}, blocked {}, failed {})\n",
            self.job,
            self.state,
            self.elapsed_seconds,
            c.done,
            c.total,
            c.running,
            c.ready,
            c.blocked,
            c.failed
        );
        for t in self.tasks.iter().filter(|t| t.state == "running") {
            let _ = write!(
                out,
                "  running {:<18} on {}",
                t.id,
                t.worker.as_deref().unwrap_or("?")
            );
            if let Some(p) = &t.progress {
                let _ = write!(out, ": {}", p.phase);
                if p.epochs > 0 {
                    let _ = write!(out, " epoch {}/{}", p.epoch, p.epochs);
                }
                if let Some(loss) = p.loss {
                    let _ = write!(out, " loss {loss:.4}");
                }
                if p.examples_per_second > 0.0 {
                    let _ = write!(out, " {:.0} examples/s", p.examples_per_second);
                }
            }
            out.push('\n');
        }
        let alive = self.workers.iter().filter(|w| w.alive).count();
        let _ = writeln!(out, "workers: {alive} alive of {}", self.workers.len());
        for w in &self.workers {
            let _ = writeln!(
                out,
                "  {:<24} {:<7} {:>3} threads  {}{}",
                w.id,
                w.device,
                w.threads,
                w.task.as_deref().unwrap_or("idle"),
                if w.alive { "" } else { "  (not heard from)" }
            );
        }
        if let Some(f) = &self.failure {
            let _ = writeln!(out, "failed: {f}");
        }
        out
    }

    /// Sets the Prometheus gauges that describe this snapshot.
    pub fn export_metrics(&self) {
        let c = &self.counts;
        for (state, n) in [
            ("blocked", c.blocked),
            ("ready", c.ready),
            ("running", c.running),
            ("done", c.done),
            ("failed", c.failed),
        ] {
            metrics::gauge!("distill_tasks", "state" => state).set(n as f64);
        }
        metrics::gauge!("distill_workers_alive")
            .set(self.workers.iter().filter(|w| w.alive).count() as f64);
        metrics::gauge!("distill_workers_registered").set(self.workers.len() as f64);
        for t in &self.tasks {
            if let Some(p) = &t.progress {
                metrics::gauge!("distill_task_examples_per_second", "task" => t.id.clone())
                    .set(p.examples_per_second);
                if let Some(loss) = p.loss {
                    metrics::gauge!("distill_task_loss", "task" => t.id.clone()).set(loss);
                }
                metrics::gauge!("distill_task_epoch", "task" => t.id.clone())
                    .set(f64::from(p.epoch));
            }
            if let Some(age) = t.checkpoint_age_seconds {
                metrics::gauge!("distill_checkpoint_age_seconds", "task" => t.id.clone()).set(age);
            }
        }
    }
}
