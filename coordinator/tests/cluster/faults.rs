//! Faults: killed and stalled workers, a killed coordinator, a corrupt
//! shard and a changed config, SIGTERM and resuming from a checkpoint.

use super::*;

/// The files whose bytes must not depend on faults: the models, the
/// transfer set's shards and its manifest.
fn result_files(out: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    ["models", "transfer"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(out.join(dir)).unwrap())
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.strip_prefix(out).unwrap().display().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// What to do to a worker, and when.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGKILL it once it has uploaded a checkpoint of a teacher.
    KillMidTeacher,
    /// SIGKILL it as it starts a transfer-set inference task.
    KillMidInference,
    /// SIGSTOP it mid-teacher until its lease has expired and the
    /// coordinator moved the task on, then SIGCONT it.
    StallPastLease,
}

impl Fault {
    /// Whether a worker's log `line` is the moment to strike it. Teachers
    /// take a fraction of a second here, too short to catch by polling the
    /// coordinator: the worker is frozen (SIGSTOP) at the event instead,
    /// and the coordinator then says what it holds.
    fn moment(self, line: &str) -> bool {
        match self {
            Fault::KillMidTeacher | Fault::StallPastLease => {
                line.contains("checkpoint uploaded") && line.contains("task=teacher-")
            }
            Fault::KillMidInference => {
                line.contains("task started") && line.contains("task=infer-")
            }
        }
    }

    /// The task struck and its attempt's fencing id, as `status` (taken
    /// with the worker `victim` frozen) shows them: the task it runs or,
    /// for a quick inference task it already finished, the last one it
    /// made.
    fn target(self, status: &serde_json::Value, victim: &str) -> (String, u64) {
        let tasks = status["tasks"].as_array().unwrap();
        let running = tasks
            .iter()
            .find(|t| t["state"] == "running" && t["worker"] == victim);
        let made = || {
            tasks
                .iter()
                .filter(|t| t["state"] == "done" && t["worker"] == victim)
                .filter(|t| t["id"].as_str().unwrap().starts_with("infer-"))
                .max_by_key(|t| t["attempt"].as_u64())
        };
        let task = match self {
            Fault::KillMidTeacher | Fault::StallPastLease => running
                .filter(|t| t["id"].as_str().unwrap().starts_with("teacher-"))
                .filter(|t| !t["checkpoint_age_seconds"].is_null()),
            Fault::KillMidInference => running.or_else(made),
        };
        let task =
            task.unwrap_or_else(|| panic!("{self:?}: nothing to strike on {victim}: {status}"));
        (
            task["id"].as_str().unwrap().to_string(),
            task["attempt"].as_u64().unwrap(),
        )
    }
}

/// Runs the fault-test job in a fresh folder with two separate workers,
/// doing `fault` to one of them; returns the output folder (kept in `dir`).
/// The moment to strike and the outcome come from the coordinator's
/// `/api/status` (it lingers after the job to answer).
fn run_with_fault(dir: &Path, fault: Option<Fault>) -> PathBuf {
    let config = write_config(dir, 300);
    // A checkpoint after every epoch: a re-run resumes where the kill hit.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "max_attempts = 3",
            "max_attempts = 3\ncheckpoint_interval_secs = 0.0",
        ),
    )
    .unwrap();
    let coordinator =
        Coordinator::start_with(&config, &["--listen", "127.0.0.1:0", "--linger", "300"]);
    let mut workers = Workers::start_registered(2, &coordinator, dir);
    let struck = fault.map(|fault| {
        let victim = loop {
            let (i, line) = workers
                .lines
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("{fault:?} found no moment to strike"));
            if fault.moment(&line) {
                break i;
            }
        };
        signal("-STOP", &[workers.pid(victim)]);
        let (task, attempt) = fault.target(&coordinator.api_status(), &workers.ids[victim]);
        match fault {
            Fault::KillMidTeacher | Fault::KillMidInference => {
                signal("-KILL", &[workers.pid(victim)]);
                workers.children[victim].wait().unwrap();
            }
            Fault::StallPastLease => {
                coordinator.wait_for_status(Duration::from_secs(60), |s| {
                    task_in(s, &task)["attempt"].as_u64() != Some(attempt)
                });
                signal("-CONT", &[workers.pid(victim)]);
            }
        }
        (fault, task, victim, attempt)
    });
    coordinator.wait_for_status(Duration::from_secs(240), |s| s["state"] != "running");
    let lines = workers.all_lines();
    let (status, ok, stdout, _) = coordinator.finish_lingering(Duration::from_secs(30));
    assert!(
        ok && status["state"] == "succeeded",
        "coordinator failed after {fault:?}:\n{stdout}"
    );
    for (i, child) in workers.children.iter_mut().enumerate() {
        let exit = child.wait().unwrap();
        let killed = struck.as_ref().is_some_and(|(f, _, victim, _)| {
            *victim == i && matches!(f, Fault::KillMidTeacher | Fault::KillMidInference)
        });
        assert!(exit.success() || killed, "worker {i} failed: {exit}");
    }
    if let Some((fault, task, victim, attempt)) = struck {
        let accepted = task_in(&status, &task)["attempt"].as_u64() == Some(attempt);
        match fault {
            // A teacher takes hundreds of epochs: the kill lands mid-task,
            // and the next attempt resumes from the victim's checkpoint.
            Fault::KillMidTeacher => {
                assert!(!accepted, "{task} attempt {attempt} finished: {status}");
                let resumed = lines.iter().any(|(i, l)| {
                    *i != victim && l.contains("resuming training from a checkpoint")
                });
                assert!(resumed, "{task} resumed from a checkpoint");
            }
            // Inference takes milliseconds: the kill may land after the
            // upload; either way the outputs must not change.
            Fault::KillMidInference => eprintln!(
                "{task} attempt {attempt} {} before the kill",
                if accepted {
                    "finished"
                } else {
                    "did not finish"
                }
            ),
            Fault::StallPastLease => {
                assert!(
                    !accepted,
                    "the late result of {task} attempt {attempt} was accepted: {status}"
                );
                let victim_saw = lines.iter().any(|(i, l)| {
                    *i == victim
                        && (l.contains("revoked the lease") || l.contains("result refused"))
                });
                assert!(
                    victim_saw,
                    "the stalled worker learns that its lease is gone"
                );
            }
        }
    }
    let out = dir.join("out");
    check_outputs(&out);
    out
}

/// SIGKILL a worker mid-teacher and mid-inference, and SIGSTOP one past its
/// lease: each job finishes, the stalled worker's late result is refused,
/// and the models and the transfer set are byte-identical to those of an
/// uninterrupted run with the same seed and thread count.
#[test]
fn killed_or_stalled_workers_leave_the_outputs_byte_identical() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = result_files(&run_with_fault(reference_dir.path(), None));
    assert_eq!(
        reference.len(),
        4 + 5,
        "4 models, 4 shards and the manifest"
    );
    for fault in [
        Fault::KillMidTeacher,
        Fault::KillMidInference,
        Fault::StallPastLease,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let files = result_files(&run_with_fault(dir.path(), Some(fault)));
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>()
        );
        for (name, bytes) in &files {
            assert!(bytes == &reference[name], "{name} differs after {fault:?}");
        }
    }
}

/// SIGKILL the coordinator mid-job and start it again on the same address:
/// the separately started workers rejoin on their own, the job finishes,
/// and no task whose result was committed before the kill runs again.
#[test]
fn a_coordinator_killed_mid_job_resumes_without_redoing_committed_tasks() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let listen = free_loopback_address();
    let mut first = Coordinator::start_with(&config, &["--listen", &listen]);
    let mut workers = Workers::start(2, &first.url, dir.path());
    let before = first.wait_for_status(Duration::from_secs(120), |s| {
        s["counts"]["done"].as_u64().unwrap() >= 3
    });
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let committed = tasks_where(&before, |t| t["state"] == "done");

    // Lingering after the job, the coordinator still answers a worker that
    // reconnects late (its backoff may outlast the rest of the job).
    let second = Coordinator::start_with(&config, &["--listen", &listen, "--linger", "120"]);
    assert_eq!(
        workers.wait_all(Duration::from_secs(60)),
        vec![true, true],
        "the workers were told the job is over"
    );
    let after = second.wait_for_status(Duration::from_secs(30), |s| s["state"] == "succeeded");
    assert_eq!(
        after["workers"].as_array().unwrap().len(),
        2,
        "both workers rejoined: {after}"
    );
    // Tasks taken up from the state were not attempted in this run.
    let restored = tasks_where(&after, |t| t["attempts"] == 0);
    for task in &committed {
        assert!(
            restored.contains(task),
            "{task} was committed before the kill and ran again: {after}"
        );
    }
    assert!(
        restored.len() < after["tasks"].as_array().unwrap().len(),
        "the rest of the job ran"
    );
    signal("-TERM", &[second.child.id().to_string()]);
    let (ok, stdout) = second.wait(Duration::from_secs(30));
    assert!(ok, "the restarted coordinator failed:\n{stdout}");
    check_outputs(&dir.path().join("out"));
}

/// A finished job started again checks its files: a corrupted shard is
/// found, logged and made again (byte-identical), and nothing else runs. A
/// changed config is then refused, naming the key, and `--fresh` starts
/// the job over.
#[test]
fn a_corrupt_shard_is_regenerated_and_a_changed_config_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let local = [
        "--listen",
        "127.0.0.1:0",
        "--local-workers",
        "2",
        "--local-worker-threads",
        "1",
    ];
    // Lingering after the job, so that its status tells which tasks ran.
    let run = |extra: &[&str]| {
        let args: Vec<&str> = local
            .iter()
            .chain(&["--linger", "120"])
            .chain(extra)
            .copied()
            .collect();
        let (status, ok, stdout, logs) =
            Coordinator::start_with(&config, &args).finish_lingering(Duration::from_secs(240));
        let ran = tasks_where(&status, |t| t["attempts"] != 0);
        (ok, stdout, logs, ran)
    };
    let (ok, stdout, _, all_tasks) = run(&[]);
    assert!(ok, "{stdout}");
    let out = dir.path().join("out");
    let shard = out.join("transfer/shard-00001.safetensors");
    let good = std::fs::read(&shard).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x55;
    std::fs::write(&shard, &bad).unwrap();

    let (ok, stdout, logs, ran) = run(&[]);
    assert!(ok, "{stdout}");
    assert!(
        logs.iter()
            .any(|l| l.contains("a committed result is lost") && l.contains("infer-00001")),
        "the corruption is logged"
    );
    assert_eq!(ran, ["infer-00001"]);
    assert_eq!(std::fs::read(&shard).unwrap(), good, "made again, the same");
    check_outputs(&out);

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("seed = 3", "seed = 4")).unwrap();
    let out_of_changed = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .args(local)
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(!out_of_changed.status.success());
    let err = String::from_utf8_lossy(&out_of_changed.stderr);
    assert!(
        err.contains("seed (3 → 4)") && err.contains("--fresh"),
        "{err}"
    );
    assert_eq!(std::fs::read(&shard).unwrap(), good, "nothing was touched");

    let (ok, stdout, _, ran) = run(&["--fresh"]);
    assert!(ok, "{stdout}");
    assert_eq!(ran, all_tasks, "--fresh runs every task");
    check_outputs(&out);
}

/// SIGTERM (what Kubernetes sends) stops a worker at its next epoch end:
/// it uploads a checkpoint, gives its task back without using up an
/// attempt, and exits 143. SIGTERM stops the coordinator too, saying how to
/// resume; started again, it hands the task with its checkpoint to a new
/// worker, which resumes from it.
#[test]
fn sigterm_stops_a_worker_and_the_coordinator_and_the_job_resumes_from_the_checkpoint() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1000);
    let signal = |pid: u32| {
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
    };
    let listen = free_loopback_address();
    let first = Coordinator::start_with(&config, &["--listen", &listen]);
    let mut worker = Workers::start(1, &first.url, dir.path());
    loop {
        let (_, line) = worker
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("the worker trains a teacher");
        if line.contains("epoch done") {
            break;
        }
    }
    let stopped_at = Instant::now();
    signal(worker.children[0].id());
    let status = worker.children[0].wait().unwrap();
    assert_eq!(status.code(), Some(143), "a stopped worker exits 143");
    assert!(stopped_at.elapsed() < Duration::from_secs(10));
    // The task is back, ready for another worker, with its checkpoint.
    let back = first.wait_for_status(Duration::from_secs(10), |s| {
        !tasks_where(s, |t| {
            t["state"] == "ready" && !t["checkpoint_age_seconds"].is_null()
        })
        .is_empty()
    });
    let task = tasks_where(&back, |t| {
        t["state"] == "ready" && !t["checkpoint_age_seconds"].is_null()
    })
    .remove(0);
    assert!(task.starts_with("teacher-"), "{back}");

    signal(first.child.id());
    let (ok, _, logs) = first.wait_with_logs(Duration::from_secs(20));
    assert!(
        !ok,
        "a coordinator stopped before the job's end exits non-zero"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("SIGTERM") && l.contains("same config to resume")),
        "it says how to resume"
    );
    assert!(
        !logs.iter().any(|l| l.contains("task attempt failed")),
        "giving a task back is not a failure"
    );

    let second = Coordinator::start_with(&config, &["--listen", &listen]);
    let mut fresh = Workers::start(1, &second.url, &dir.path().join("fresh"));
    let (ok, stdout, logs) = second.wait_with_logs(Duration::from_secs(240));
    assert!(ok, "{stdout}");
    assert!(logs
        .iter()
        .any(|l| l.contains("resuming the job") && l.contains("checkpoints=1")));
    assert_eq!(fresh.wait_all(Duration::from_secs(20)), vec![true]);
    let resumed = fresh
        .lines
        .try_iter()
        .any(|(_, l)| l.contains("resuming training from a checkpoint"));
    assert!(resumed, "the new worker resumed {task} from the checkpoint");
    check_outputs(&dir.path().join("out"));
}
