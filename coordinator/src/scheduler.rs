//! The job's task graph as a pure state machine: which tasks may run, who
//! holds which lease, and what happens when a lease expires, a result comes
//! in or an attempt fails. No I/O, no clock of its own (times are passed in
//! as [`Duration`]s since the job started), no networking: the gRPC service
//! feeds it events and applies what it returns.
//!
//! Invariants: a task is leased to at most one attempt at a time; every
//! lease gets a fresh attempt id (a fencing token) that is never reused; only
//! the current attempt of a leased task may heartbeat, complete or fail it;
//! a task becomes ready only when all its dependencies are done; a task that
//! used up `max_attempts` attempts (failures or expired leases) fails the job.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A task's position in the plan.
pub type TaskIndex = usize;

/// Where a task is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Some dependency is not done yet.
    Blocked,
    /// May be leased.
    Ready,
    /// Held by a worker's attempt until `expires_at` unless renewed.
    Leased {
        /// The worker holding it.
        worker: String,
        /// The attempt's fencing id.
        attempt: u64,
        /// When the lease runs out.
        expires_at: Duration,
    },
    /// Its result is stored.
    Done,
    /// It used up its attempts.
    Failed,
}

#[derive(Clone, Debug)]
struct Task {
    id: String,
    deps: Vec<TaskIndex>,
    state: TaskState,
    attempts: u32,
    errors: Vec<String>,
}

/// What a worker asking for work gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Run this task under this attempt id.
    Run {
        /// The task.
        task: TaskIndex,
        /// Its fencing id.
        attempt: u64,
    },
    /// Nothing is ready; ask again later.
    Wait,
    /// The job is over (succeeded or failed).
    JobOver,
}

/// Why an event about an attempt was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No task has this index.
    #[error("there is no task number {0}")]
    UnknownTask(TaskIndex),
    /// The attempt is not the task's current lease (it expired, or the task
    /// was re-leased, completed or failed since).
    #[error(
        "attempt {attempt} of task {task} is not current (the lease expired or the task moved on)"
    )]
    StaleAttempt {
        /// The task's id.
        task: String,
        /// The refused attempt.
        attempt: u64,
    },
}

/// What became of a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureOutcome {
    /// The task is ready again for another attempt.
    WillRetry,
    /// The task used up its attempts; the job has failed.
    JobFailed,
}

/// An expired lease, as [`Scheduler::expire`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The task.
    pub task: TaskIndex,
    /// The worker that held it.
    pub worker: String,
    /// The attempt that expired.
    pub attempt: u64,
    /// Whether the task will be tried again.
    pub outcome: FailureOutcome,
}

/// Task counts by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Waiting for dependencies.
    pub blocked: usize,
    /// Ready to lease.
    pub ready: usize,
    /// Leased to a worker.
    pub running: usize,
    /// Finished.
    pub done: usize,
    /// Used up their attempts.
    pub failed: usize,
    /// All tasks.
    pub total: usize,
}

/// The state machine.
#[derive(Clone, Debug)]
pub struct Scheduler {
    tasks: Vec<Task>,
    lease_timeout: Duration,
    max_attempts: u32,
    next_attempt: u64,
    // Indexes kept in step with the tasks' states (every change goes
    // through `set_state`), so that no event costs a scan of the plan.
    index: HashMap<String, TaskIndex>,
    dependants: Vec<Vec<TaskIndex>>,
    ready: BTreeSet<TaskIndex>,
    counts: Counts,
}

impl Scheduler {
    /// A scheduler for tasks given as `(id, dependencies)`, in an order where
    /// every dependency comes before its dependants. Panics on a forward or
    /// self dependency (a bug in the planner, not a user error).
    pub fn new(
        tasks: Vec<(String, Vec<TaskIndex>)>,
        lease_timeout: Duration,
        max_attempts: u32,
    ) -> Self {
        assert!(max_attempts >= 1, "max_attempts must be at least 1");
        let tasks: Vec<Task> = tasks
            .into_iter()
            .enumerate()
            .map(|(i, (id, deps))| {
                assert!(
                    deps.iter().all(|&d| d < i),
                    "task {id} depends on a later task"
                );
                Task {
                    id,
                    deps,
                    state: TaskState::Blocked,
                    attempts: 0,
                    errors: Vec::new(),
                }
            })
            .collect();
        let mut dependants = vec![Vec::new(); tasks.len()];
        for (i, t) in tasks.iter().enumerate() {
            for &d in &t.deps {
                dependants[d].push(i);
            }
        }
        let index = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        let mut scheduler = Scheduler {
            counts: Counts {
                blocked: tasks.len(),
                total: tasks.len(),
                ..Counts::default()
            },
            tasks,
            lease_timeout,
            max_attempts,
            next_attempt: 1,
            index,
            dependants,
            ready: BTreeSet::new(),
        };
        scheduler.refresh_ready();
        scheduler
    }

    /// Moves `task` to `state`, keeping the counts and the ready set.
    fn set_state(&mut self, task: TaskIndex, state: TaskState) {
        fn slot<'c>(c: &'c mut Counts, s: &TaskState) -> &'c mut usize {
            match s {
                TaskState::Blocked => &mut c.blocked,
                TaskState::Ready => &mut c.ready,
                TaskState::Leased { .. } => &mut c.running,
                TaskState::Done => &mut c.done,
                TaskState::Failed => &mut c.failed,
            }
        }
        let old = std::mem::replace(&mut self.tasks[task].state, state);
        *slot(&mut self.counts, &old) -= 1;
        *slot(&mut self.counts, &self.tasks[task].state) += 1;
        if self.tasks[task].state == TaskState::Ready {
            self.ready.insert(task);
        } else {
            self.ready.remove(&task);
        }
    }

    /// How long a lease lasts without a heartbeat.
    pub fn lease_timeout(&self) -> Duration {
        self.lease_timeout
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// True when the plan has no tasks.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The id of task `task`.
    pub fn id(&self, task: TaskIndex) -> &str {
        &self.tasks[task].id
    }

    /// The index of the task called `id`.
    pub fn index_of(&self, id: &str) -> Option<TaskIndex> {
        self.index.get(id).copied()
    }

    /// The state of task `task`.
    pub fn state(&self, task: TaskIndex) -> &TaskState {
        &self.tasks[task].state
    }

    /// Attempts made at task `task` so far.
    pub fn attempts(&self, task: TaskIndex) -> u32 {
        self.tasks[task].attempts
    }

    /// Task counts by state.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// True once every task is done.
    pub fn succeeded(&self) -> bool {
        self.counts.done == self.tasks.len()
    }

    /// The error messages of the first failed task, if the job failed.
    pub fn failure(&self) -> Option<String> {
        if self.counts.failed == 0 {
            return None;
        }
        self.tasks
            .iter()
            .find(|t| t.state == TaskState::Failed)
            .map(|t| {
                format!(
                    "task {} failed {} times: {}",
                    t.id,
                    t.attempts,
                    t.errors.join("; ")
                )
            })
    }

    /// True once the job has succeeded or failed.
    pub fn is_over(&self) -> bool {
        self.succeeded() || self.counts.failed > 0
    }

    /// Leases the first ready task (plan order) to `worker` at `now`.
    pub fn lease(&mut self, worker: &str, now: Duration) -> LeaseDecision {
        if self.is_over() {
            return LeaseDecision::JobOver;
        }
        let Some(&i) = self.ready.first() else {
            return LeaseDecision::Wait;
        };
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        self.tasks[i].attempts += 1;
        self.set_state(
            i,
            TaskState::Leased {
                worker: worker.to_string(),
                attempt,
                expires_at: now + self.lease_timeout,
            },
        );
        LeaseDecision::Run { task: i, attempt }
    }

    /// Checks that `attempt` is the current lease of `task`.
    pub fn check_current(&self, task: TaskIndex, attempt: u64) -> Result<(), Refusal> {
        let t = self.tasks.get(task).ok_or(Refusal::UnknownTask(task))?;
        match t.state {
            TaskState::Leased { attempt: a, .. } if a == attempt => Ok(()),
            _ => Err(Refusal::StaleAttempt {
                task: t.id.clone(),
                attempt,
            }),
        }
    }

    /// Renews the lease of `attempt` on `task` until `now + lease_timeout`.
    pub fn heartbeat(
        &mut self,
        task: TaskIndex,
        attempt: u64,
        now: Duration,
    ) -> Result<(), Refusal> {
        self.check_current(task, attempt)?;
        if let TaskState::Leased { expires_at, .. } = &mut self.tasks[task].state {
            *expires_at = now + self.lease_timeout;
        }
        Ok(())
    }

    /// Records that `attempt` delivered `task`'s result; returns the tasks
    /// that became ready.
    pub fn complete(&mut self, task: TaskIndex, attempt: u64) -> Result<Vec<TaskIndex>, Refusal> {
        self.check_current(task, attempt)?;
        self.set_state(task, TaskState::Done);
        let mut ready = Vec::new();
        for i in self.dependants[task].clone() {
            if self.unblocked(i) {
                self.set_state(i, TaskState::Ready);
                ready.push(i);
            }
        }
        Ok(ready)
    }

    /// True when `task` is blocked and all its dependencies are done.
    fn unblocked(&self, task: TaskIndex) -> bool {
        self.tasks[task].state == TaskState::Blocked
            && self.tasks[task]
                .deps
                .iter()
                .all(|&d| self.tasks[d].state == TaskState::Done)
    }

    /// Records that `attempt` of `task` failed with `error`.
    pub fn fail(
        &mut self,
        task: TaskIndex,
        attempt: u64,
        error: &str,
    ) -> Result<FailureOutcome, Refusal> {
        self.check_current(task, attempt)?;
        Ok(self.give_up_attempt(task, error.to_string()))
    }

    /// Takes `task` back from `attempt`, whose worker is stopping: the task
    /// is ready again and the attempt does not count against it.
    pub fn release(&mut self, task: TaskIndex, attempt: u64) -> Result<(), Refusal> {
        self.check_current(task, attempt)?;
        let t = &mut self.tasks[task];
        t.attempts = t.attempts.saturating_sub(1);
        self.set_state(task, TaskState::Ready);
        Ok(())
    }

    /// Records that `attempt` of `task` failed with an error that another
    /// attempt would repeat (such as a diverging training run): the task
    /// fails, and with it the job, without further attempts.
    pub fn fail_permanently(
        &mut self,
        task: TaskIndex,
        attempt: u64,
        error: &str,
    ) -> Result<FailureOutcome, Refusal> {
        self.check_current(task, attempt)?;
        self.tasks[task].errors.push(format!(
            "{error} (not retried: another attempt would fail the same way)"
        ));
        self.set_state(task, TaskState::Failed);
        Ok(FailureOutcome::JobFailed)
    }

    /// Expires every lease whose time ran out by `now`.
    pub fn expire(&mut self, now: Duration) -> Vec<Expired> {
        let mut expired = Vec::new();
        for i in 0..self.tasks.len() {
            if let TaskState::Leased {
                worker,
                attempt,
                expires_at,
            } = &self.tasks[i].state
            {
                if *expires_at <= now {
                    let (worker, attempt) = (worker.clone(), *attempt);
                    let outcome = self.give_up_attempt(
                        i,
                        format!(
                            "lease of attempt {attempt} on worker {worker} expired (no heartbeat)"
                        ),
                    );
                    expired.push(Expired {
                        task: i,
                        worker,
                        attempt,
                        outcome,
                    });
                }
            }
        }
        expired
    }

    /// Releases every lease `worker` holds (it said it is going away), as if
    /// they had expired now.
    pub fn release_worker(&mut self, worker: &str) -> Vec<Expired> {
        let mut released = Vec::new();
        for i in 0..self.tasks.len() {
            if let TaskState::Leased {
                worker: w, attempt, ..
            } = &self.tasks[i].state
            {
                if w == worker {
                    let attempt = *attempt;
                    let outcome = self.give_up_attempt(
                        i,
                        format!("worker {worker} left during attempt {attempt}"),
                    );
                    released.push(Expired {
                        task: i,
                        worker: worker.to_string(),
                        attempt,
                        outcome,
                    });
                }
            }
        }
        released
    }

    /// The fencing id the next lease gets.
    pub fn next_attempt(&self) -> u64 {
        self.next_attempt
    }

    /// Makes fencing ids start at `floor` (above every id a previous run of
    /// the job could have handed out).
    pub fn start_attempts_at(&mut self, floor: u64) {
        self.next_attempt = self.next_attempt.max(floor);
    }

    /// Marks `task` done without a lease: its result was committed by an
    /// earlier run of the job. Call [`Scheduler::refresh_ready`] after the
    /// last one.
    pub fn restore_done(&mut self, task: TaskIndex) {
        self.set_state(task, TaskState::Done);
    }

    /// Makes every blocked task whose dependencies are all done ready.
    pub fn refresh_ready(&mut self) {
        for i in 0..self.tasks.len() {
            if self.unblocked(i) {
                self.set_state(i, TaskState::Ready);
            }
        }
    }

    /// Runs a done `task` again (its result was lost): it becomes ready
    /// with a fresh attempt budget, and every task not done that needs it,
    /// directly or not, goes back to blocked. Returns the leases revoked
    /// that way; those attempts are not counted against their tasks.
    pub fn reopen(&mut self, task: TaskIndex) -> Vec<(TaskIndex, String, u64)> {
        let t = &mut self.tasks[task];
        if t.state != TaskState::Done {
            return Vec::new();
        }
        t.attempts = 0;
        t.errors.clear();
        self.set_state(task, TaskState::Blocked);
        let mut revoked = Vec::new();
        for i in task + 1..self.tasks.len() {
            let waits = self.tasks[i]
                .deps
                .iter()
                .any(|&d| self.tasks[d].state != TaskState::Done);
            if !waits {
                continue;
            }
            match self.tasks[i].state.clone() {
                TaskState::Leased {
                    worker, attempt, ..
                } => {
                    let t = &mut self.tasks[i];
                    t.attempts = t.attempts.saturating_sub(1);
                    self.set_state(i, TaskState::Blocked);
                    revoked.push((i, worker, attempt));
                }
                TaskState::Ready => self.set_state(i, TaskState::Blocked),
                TaskState::Blocked | TaskState::Done | TaskState::Failed => {}
            }
        }
        self.refresh_ready();
        revoked
    }

    fn give_up_attempt(&mut self, task: TaskIndex, error: String) -> FailureOutcome {
        let t = &mut self.tasks[task];
        t.errors.push(error);
        if t.attempts >= self.max_attempts {
            self.set_state(task, TaskState::Failed);
            FailureOutcome::JobFailed
        } else {
            self.set_state(task, TaskState::Ready);
            FailureOutcome::WillRetry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// a, b -> c -> d
    fn diamond(max_attempts: u32) -> Scheduler {
        Scheduler::new(
            vec![
                ("a".into(), vec![]),
                ("b".into(), vec![]),
                ("c".into(), vec![0, 1]),
                ("d".into(), vec![2]),
            ],
            TIMEOUT,
            max_attempts,
        )
    }

    fn run(s: &mut Scheduler, worker: &str, now: Duration) -> (TaskIndex, u64) {
        match s.lease(worker, now) {
            LeaseDecision::Run { task, attempt } => (task, attempt),
            other => panic!("expected a task, got {other:?}"),
        }
    }

    #[test]
    fn tasks_without_dependencies_start_ready_others_blocked() {
        let s = diamond(3);
        assert_eq!(s.state(0), &TaskState::Ready);
        assert_eq!(s.state(2), &TaskState::Blocked);
        assert_eq!(
            s.counts(),
            Counts {
                blocked: 2,
                ready: 2,
                total: 4,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn leases_ready_tasks_in_plan_order_then_waits() {
        let mut s = diamond(3);
        let (t0, a0) = run(&mut s, "w1", secs(0));
        let (t1, a1) = run(&mut s, "w2", secs(0));
        assert_eq!((t0, t1), (0, 1));
        assert_ne!(a0, a1, "every lease gets its own attempt id");
        assert_eq!(s.lease("w3", secs(0)), LeaseDecision::Wait);
        assert_eq!(
            s.state(0),
            &TaskState::Leased {
                worker: "w1".into(),
                attempt: a0,
                expires_at: TIMEOUT
            }
        );
    }

    #[test]
    fn completing_all_dependencies_unblocks_dependants() {
        let mut s = diamond(3);
        let (_, a0) = run(&mut s, "w", secs(0));
        let (_, a1) = run(&mut s, "w", secs(0));
        assert_eq!(s.complete(0, a0), Ok(vec![]));
        assert_eq!(s.state(2), &TaskState::Blocked);
        assert_eq!(s.complete(1, a1), Ok(vec![2]));
        let (t, a) = run(&mut s, "w", secs(1));
        assert_eq!(t, 2);
        assert_eq!(s.complete(2, a), Ok(vec![3]));
        let (_, a) = run(&mut s, "w", secs(2));
        s.complete(3, a).unwrap();
        assert!(s.succeeded() && s.is_over());
        assert_eq!(s.lease("w", secs(3)), LeaseDecision::JobOver);
    }

    #[test]
    fn heartbeats_extend_the_lease() {
        let mut s = diamond(3);
        let (t, a) = run(&mut s, "w", secs(0));
        s.heartbeat(t, a, secs(8)).unwrap();
        assert!(s.expire(secs(12)).is_empty(), "renewed until 18 s");
        assert_eq!(s.expire(secs(18)).len(), 1);
    }

    #[test]
    fn an_expired_lease_goes_back_to_ready_and_its_attempt_is_refused() {
        let mut s = diamond(3);
        let (t, stale) = run(&mut s, "w1", secs(0));
        assert!(s.expire(secs(9)).is_empty());
        let expired = s.expire(secs(10));
        assert_eq!(
            expired,
            vec![Expired {
                task: t,
                worker: "w1".into(),
                attempt: stale,
                outcome: FailureOutcome::WillRetry
            }]
        );
        assert_eq!(s.state(t), &TaskState::Ready);
        let (t2, fresh) = run(&mut s, "w2", secs(10));
        assert_eq!(t2, t);
        let refused = Refusal::StaleAttempt {
            task: "a".into(),
            attempt: stale,
        };
        assert_eq!(s.heartbeat(t, stale, secs(11)), Err(refused.clone()));
        assert_eq!(s.complete(t, stale), Err(refused.clone()));
        assert_eq!(s.fail(t, stale, "late"), Err(refused));
        assert_eq!(s.complete(t, fresh), Ok(vec![]));
    }

    #[test]
    fn a_result_after_expiry_but_before_re_lease_is_refused() {
        let mut s = diamond(3);
        let (t, a) = run(&mut s, "w1", secs(0));
        s.expire(secs(10));
        assert!(matches!(
            s.complete(t, a),
            Err(Refusal::StaleAttempt { .. })
        ));
        assert_eq!(s.state(t), &TaskState::Ready);
    }

    #[test]
    fn failures_retry_until_max_attempts_then_fail_the_job_with_all_errors() {
        let mut s = diamond(2);
        let (t, a) = run(&mut s, "w1", secs(0));
        assert_eq!(s.fail(t, a, "out of memory"), Ok(FailureOutcome::WillRetry));
        let (t2, a2) = run(&mut s, "w2", secs(1));
        assert_eq!(t2, t);
        assert_eq!(s.attempts(t), 2);
        assert_eq!(s.fail(t, a2, "disk full"), Ok(FailureOutcome::JobFailed));
        assert_eq!(s.state(t), &TaskState::Failed);
        let msg = s.failure().unwrap();
        assert!(
            msg.contains("task a failed 2 times")
                && msg.contains("out of memory")
                && msg.contains("disk full"),
            "{msg}"
        );
        assert!(s.is_over() && !s.succeeded());
        assert_eq!(s.lease("w3", secs(2)), LeaseDecision::JobOver);
    }

    #[test]
    fn expiries_count_as_attempts() {
        let mut s = diamond(1);
        run(&mut s, "w1", secs(0));
        let expired = s.expire(secs(10));
        assert_eq!(expired[0].outcome, FailureOutcome::JobFailed);
        assert!(s.failure().unwrap().contains("expired"));
    }

    #[test]
    fn releasing_a_worker_frees_only_its_leases() {
        let mut s = diamond(3);
        let (t0, _) = run(&mut s, "w1", secs(0));
        let (t1, a1) = run(&mut s, "w2", secs(0));
        let released = s.release_worker("w1");
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].task, t0);
        assert_eq!(s.state(t0), &TaskState::Ready);
        assert!(s.check_current(t1, a1).is_ok());
    }

    #[test]
    fn unknown_tasks_and_done_tasks_refuse_events() {
        let mut s = diamond(3);
        assert_eq!(s.heartbeat(9, 1, secs(0)), Err(Refusal::UnknownTask(9)));
        let (t, a) = run(&mut s, "w", secs(0));
        s.complete(t, a).unwrap();
        assert!(s.complete(t, a).is_err(), "a second result is refused");
        assert!(
            s.expire(secs(100)).iter().all(|e| e.task != t),
            "done tasks never expire"
        );
        assert_eq!(s.index_of("c"), Some(2));
        assert_eq!(s.id(3), "d");
    }

    #[test]
    fn restored_tasks_are_done_and_their_dependants_ready() {
        let mut s = diamond(3);
        s.restore_done(0);
        s.restore_done(1);
        s.refresh_ready();
        assert_eq!(s.state(2), &TaskState::Ready);
        assert_eq!(s.state(3), &TaskState::Blocked);
        s.start_attempts_at(5000);
        let (t, a) = run(&mut s, "w", secs(0));
        assert_eq!((t, a), (2, 5000));
        s.start_attempts_at(10);
        assert_eq!(s.next_attempt(), 5001, "the floor never goes down");
    }

    #[test]
    fn reopening_a_done_task_blocks_and_revokes_what_needs_it() {
        let mut s = diamond(3);
        let (a, aa) = run(&mut s, "w1", secs(0));
        let (b, ab) = run(&mut s, "w2", secs(0));
        s.complete(a, aa).unwrap();
        s.complete(b, ab).unwrap();
        let (c, ac) = run(&mut s, "w1", secs(1));
        assert_eq!(c, 2);
        let revoked = s.reopen(a);
        assert_eq!(revoked, vec![(2, "w1".to_string(), ac)]);
        assert_eq!(s.state(a), &TaskState::Ready);
        assert_eq!(s.state(c), &TaskState::Blocked);
        assert_eq!(s.attempts(c), 0, "a revoked lease is not held against c");
        assert!(
            s.check_current(c, ac).is_err(),
            "c's old attempt is fenced off"
        );
        assert_eq!(s.state(b), &TaskState::Done, "b does not need a");
        assert!(s.reopen(c).is_empty(), "only done tasks reopen");
        let (again, attempt) = run(&mut s, "w2", secs(2));
        assert_eq!(again, a);
        s.complete(a, attempt).unwrap();
        assert_eq!(s.state(c), &TaskState::Ready);
    }

    #[test]
    fn a_permanent_failure_fails_the_job_at_once() {
        let mut s = diamond(3);
        let (t, a) = run(&mut s, "w", secs(0));
        assert_eq!(
            s.fail_permanently(t, a, "diverged"),
            Ok(FailureOutcome::JobFailed)
        );
        assert_eq!(s.attempts(t), 1);
        let failure = s.failure().unwrap();
        assert!(
            failure.contains("diverged") && failure.contains("not retried"),
            "{failure}"
        );
        assert!(s.is_over());
    }

    #[test]
    fn a_released_task_is_ready_again_and_its_attempt_not_counted() {
        let mut s = diamond(1);
        let (t, a) = run(&mut s, "w", secs(0));
        s.release(t, a).unwrap();
        assert_eq!(s.state(t), &TaskState::Ready);
        assert_eq!(s.attempts(t), 0);
        assert!(s.release(t, a).is_err(), "only the current attempt");
        let (again, _) = run(&mut s, "w2", secs(1));
        assert_eq!(again, t, "with max_attempts 1 it may still run");
    }

    /// The kept counts and ready set agree with a scan of the tasks after
    /// every event of a long pseudo-random run over a wider graph.
    #[test]
    fn counts_and_ready_set_stay_in_step_with_the_states() {
        let tasks: Vec<(String, Vec<TaskIndex>)> = (0..40)
            .map(|i| {
                let deps = match i {
                    0..=9 => vec![],
                    _ => vec![i % 10, (i * 7) % i],
                };
                (format!("t{i}"), deps)
            })
            .collect();
        let mut s = Scheduler::new(tasks, TIMEOUT, 1000);
        let mut state = 12345u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut held: Vec<(TaskIndex, u64)> = Vec::new();
        for step in 0..3000u64 {
            let now = secs(step);
            match next(6) {
                0 | 1 => {
                    if let LeaseDecision::Run { task, attempt } = s.lease("w", now) {
                        held.push((task, attempt));
                    }
                }
                2 | 3 if !held.is_empty() => {
                    let (t, a) = held.swap_remove(next(held.len() as u64) as usize);
                    let _ = s.complete(t, a);
                }
                4 if !held.is_empty() => {
                    let (t, a) = held.swap_remove(next(held.len() as u64) as usize);
                    let _ = s.fail(t, a, "x");
                }
                5 => {
                    let t = next(40) as usize;
                    if s.state(t) == &TaskState::Done && next(10) == 0 {
                        s.reopen(t);
                    }
                    s.expire(now);
                }
                _ => {}
            }
            let mut recount = Counts {
                total: s.len(),
                ..Counts::default()
            };
            let mut ready = Vec::new();
            for i in 0..s.len() {
                match s.state(i) {
                    TaskState::Blocked => recount.blocked += 1,
                    TaskState::Ready => {
                        recount.ready += 1;
                        ready.push(i);
                    }
                    TaskState::Leased { .. } => recount.running += 1,
                    TaskState::Done => recount.done += 1,
                    TaskState::Failed => recount.failed += 1,
                }
            }
            assert_eq!(s.counts(), recount, "step {step}");
            assert_eq!(
                s.ready.iter().copied().collect::<Vec<_>>(),
                ready,
                "step {step}"
            );
        }
    }
}
