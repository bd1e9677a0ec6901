//! The worker registry: who registered, when each was last heard from, and
//! what each is running.

use std::time::Duration;

use super::{Job, JobError};

/// What a worker reported at registration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Compute threads.
    pub threads: u32,
    /// Memory of its machine, in bytes.
    pub memory_bytes: u64,
    /// Its machine's name.
    pub hostname: String,
}

/// A worker's latest word on the task it runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// What it is doing (`fetching inputs`, `training`, ...).
    pub phase: String,
    /// The current epoch (from 1), 0 outside training.
    pub epoch: u32,
    /// Epochs of the whole run, 0 outside training.
    pub epochs: u32,
    /// Optimiser steps so far.
    pub step: u64,
    /// The latest training loss.
    pub loss: f64,
    /// Training throughput.
    pub examples_per_second: f64,
}

/// What the coordinator knows about a worker.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    /// What it reported at registration.
    pub capabilities: Capabilities,
    /// Time of its last request.
    pub last_seen: Duration,
    /// The task and attempt it runs, if any.
    pub task: Option<(String, u64)>,
    /// Its last reported progress.
    pub progress: Option<Progress>,
    /// Tasks leased to it so far.
    pub tasks_leased: u32,
}

impl Job {
    /// Registers a worker; returns its id, `w<n>-<host>-<instance>`.
    pub fn register(&mut self, capabilities: Capabilities, now: Duration) -> String {
        let id = format!(
            "w{}-{}-{:08x}",
            self.next_worker, capabilities.hostname, self.instance
        );
        self.next_worker += 1;
        tracing::info!(worker = %id, device = %capabilities.device, threads = capabilities.threads, "worker registered");
        self.workers.insert(
            id.clone(),
            WorkerInfo {
                capabilities,
                last_seen: now,
                task: None,
                progress: None,
                tasks_leased: 0,
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

    /// Workers heard from within `grace` that were not yet told the job is
    /// over.
    pub fn workers_not_told(&self, now: Duration, grace: Duration) -> usize {
        self.workers
            .iter()
            .filter(|(id, w)| {
                !self.told_over.contains(*id) && now.saturating_sub(w.last_seen) < grace
            })
            .count()
    }

    /// Notes that `worker` was heard from at `now`.
    pub(super) fn touch(
        &mut self,
        worker: &str,
        now: Duration,
    ) -> Result<&mut WorkerInfo, JobError> {
        let w = self
            .workers
            .get_mut(worker)
            .ok_or_else(|| JobError::UnknownWorker(worker.to_string()))?;
        w.last_seen = now;
        Ok(w)
    }

    /// Notes that `worker` runs nothing any more.
    pub(super) fn worker_idle(&mut self, worker: &str) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.task = None;
        }
    }
}
