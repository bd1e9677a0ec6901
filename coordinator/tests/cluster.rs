//! Multi-process tests: a real `coordinator` and real `worker` processes on
//! loopback ports run small jobs to completion, also when a worker is killed
//! mid-task. They run one at a time (a lock below), with `--threads 1`
//! workers and a lease timeout of 15 heartbeats, so a busy 2-core machine
//! does not look like a dead worker.
//!
//! The `worker` binary is found beside the coordinator's (`cargo test
//! --workspace` builds both; `cargo test -p coordinator` alone does not).
//! Both are given the cluster token through the environment, as a user
//! would; `unauthenticated_calls_are_refused_but_health_answers` checks
//! what happens without it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::dataset::bundle::decode_splits;
use common::transfer::TransferSet;
use proto::auth::TOKEN_ENV;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The cluster token of these tests.
const TOKEN: &str = "cluster-test-token-0123456789";

fn coordinator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coordinator"))
}

fn worker_bin() -> PathBuf {
    let path = coordinator_bin().with_file_name(format!("worker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run these tests with `cargo test --workspace` (or `cargo build -p worker` first)",
        path.display()
    );
    path
}

/// A small job: 6 classes in confusable groups of 3, 1200 training examples.
fn write_config(dir: &Path, teacher_epochs: usize) -> PathBuf {
    let text = format!(
        r#"
output_dir = "out"
status_listen = "127.0.0.1:0"
seed = 3
transfer_shards = 4
lease_timeout_secs = 3.0
heartbeat_interval_ms = 200
summary_interval_secs = 1.0
max_attempts = 3

[dataset]
source = "synthetic"
validation_size = 300
[dataset.synthetic]
num_classes = 6
group_size = 3
dim = 16
train_size = 1500
test_size = 600
noise = 1.5
seed = 5

[teachers]
count = 2
hidden = [64]
[teachers.train]
epochs = {teacher_epochs}
batch_size = 32
learning_rate = 0.05

[student]
hidden = [16]
[student.train]
epochs = 10
batch_size = 32
[student.distill]
temperature = 4.0
"#
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A coordinator listening on a loopback port; its log lines (and those of
/// its local workers) arrive on `logs`.
struct Coordinator {
    child: Child,
    url: String,
    /// The status page's URL (ends with `/`).
    status_url: String,
    stdout: BufReader<ChildStdout>,
    logs: Receiver<String>,
}

impl Coordinator {
    /// A coordinator on a free port, without local workers.
    fn start(config: &Path) -> Self {
        Coordinator::start_with(config, &["--listen", "127.0.0.1:0"])
    }

    /// An HTTP GET of `path` on the status server; returns the status code
    /// and the body.
    fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let base = self.status_url.trim_start_matches("http://");
        let host = base.trim_end_matches('/');
        // The server may listen on 0.0.0.0: connect over loopback.
        let port = host.rsplit(':').next().unwrap();
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (code, body)
    }

    /// The job's status from `/api/status` (with the test token).
    fn api_status(&self) -> serde_json::Value {
        let (code, body) = self.http_get(&format!("/api/status?token={TOKEN}"));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Polls `/api/status` until `ready` holds; returns that status.
    fn wait_for_status(
        &self,
        limit: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let status = self.api_status();
            if ready(&status) {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "the job did not reach the state within {limit:?}: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A coordinator started with `args` after `--config`.
    fn start_with(config: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(coordinator_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .env(TOKEN_ENV, TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, logs) = channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[coordinator] {line}");
                let _ = tx.send(line);
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("coordinator listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        let status_url = line
            .trim()
            .strip_prefix("status page on ")
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .to_string();
        Coordinator {
            child,
            url,
            status_url,
            stdout,
            logs,
        }
    }

    /// Waits for the coordinator to exit; returns its success and stdout.
    fn wait(self, limit: Duration) -> (bool, String) {
        let (ok, stdout, _) = self.wait_with_logs(limit);
        (ok, stdout)
    }

    /// For a coordinator started with `--linger`: waits for the job to end,
    /// takes the coordinator's final `/api/status`, then ends the linger
    /// with SIGTERM; returns that status, its success, stdout and log lines.
    fn finish_lingering(self, limit: Duration) -> (serde_json::Value, bool, String, Vec<String>) {
        let status = self.wait_for_status(limit, |s| s["state"] != "running");
        signal("-TERM", &[self.child.id().to_string()]);
        let (ok, stdout, logs) = self.wait_with_logs(Duration::from_secs(30));
        (status, ok, stdout, logs)
    }

    /// Waits for the coordinator to exit; returns its success, stdout and
    /// the log lines not yet taken from `logs`.
    fn wait_with_logs(mut self, limit: Duration) -> (bool, String, Vec<String>) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut rest = String::new();
                std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
                // The log thread ends at the pipe's end.
                let mut logs = Vec::new();
                while let Ok(line) = self.logs.recv_timeout(Duration::from_secs(5)) {
                    logs.push(line);
                }
                return (status.success(), rest, logs);
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the coordinator did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The ids of the tasks of `status` (from `/api/status`) that `keep`
/// accepts.
fn tasks_where(
    status: &serde_json::Value,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Vec<String> {
    status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| keep(t))
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// Sends `signal` (such as `-STOP`) to the processes `pids`.
fn signal(signal: &str, pids: &[String]) {
    let sent = Command::new("kill")
        .arg(signal)
        .args(pids)
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} {pids:?}");
}

/// A free loopback address, for a coordinator that must come back on the
/// address its workers know.
fn free_loopback_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Starts worker number `i` (scratch folder `scratch/w<i>`), sending its
/// log lines to `lines` as `(i, line)`.
fn spawn_worker(
    i: usize,
    url: &str,
    scratch: &Path,
    extra: &[&std::ffi::OsStr],
    lines: std::sync::mpsc::Sender<(usize, String)>,
) -> Child {
    let mut child = Command::new(worker_bin())
        .args([
            "--coordinator",
            url,
            "--cpu",
            "--threads",
            "1",
            "--give-up-after",
            "20",
        ])
        .arg("--scratch")
        .arg(scratch.join(format!("w{i}")))
        .args(extra)
        .env(TOKEN_ENV, TOKEN)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("[worker {i}] {line}");
            let _ = lines.send((i, line));
        }
    });
    child
}

/// Worker processes whose log lines arrive on one channel as `(index, line)`.
struct Workers {
    children: Vec<Child>,
    lines: Receiver<(usize, String)>,
    /// For the log lines of workers added later.
    sender: Option<std::sync::mpsc::Sender<(usize, String)>>,
    /// The coordinator's id of each child, when started by
    /// [`Workers::add_registered`].
    ids: Vec<String>,
}

impl Workers {
    fn start(count: usize, url: &str, scratch: &Path) -> Self {
        Workers::start_with(count, url, scratch, &[])
    }

    /// Workers with `extra` arguments.
    fn start_with(count: usize, url: &str, scratch: &Path, extra: &[&std::ffi::OsStr]) -> Self {
        let (tx, lines) = channel();
        let children = (0..count)
            .map(|i| spawn_worker(i, url, scratch, extra, tx.clone()))
            .collect();
        Workers {
            children,
            lines,
            sender: Some(tx),
            ids: Vec::new(),
        }
    }

    /// Workers started one at a time, each once the one before is
    /// registered, so that `ids[i]` is the coordinator's id of child `i`.
    fn start_registered(count: usize, coordinator: &Coordinator, scratch: &Path) -> Self {
        let mut workers = Workers::start(0, &coordinator.url, scratch);
        for _ in 0..count {
            workers.add_registered(coordinator, scratch);
        }
        workers
    }

    /// Starts one more worker and waits for the coordinator to list it;
    /// returns its index.
    fn add_registered(&mut self, coordinator: &Coordinator, scratch: &Path) -> usize {
        let i = self.children.len();
        let lines = self.sender.clone().expect("workers still running");
        self.children
            .push(spawn_worker(i, &coordinator.url, scratch, &[], lines));
        let status = coordinator.wait_for_status(Duration::from_secs(60), |s| {
            s["workers"].as_array().unwrap().len() == i + 1
        });
        let id = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap().to_string())
            .find(|id| !self.ids.contains(id))
            .unwrap();
        self.ids.push(id);
        i
    }

    /// Child `i`'s process id, for `kill`.
    fn pid(&self, i: usize) -> String {
        self.children[i].id().to_string()
    }

    /// Every log line of the workers, once all of them have exited.
    fn all_lines(&mut self) -> Vec<(usize, String)> {
        for c in &mut self.children {
            c.wait().unwrap();
        }
        // Each reader thread ends at its pipe's end, and with the last one
        // the channel.
        self.sender = None;
        self.lines.iter().collect()
    }

    fn wait_all(&mut self, limit: Duration) -> Vec<bool> {
        let started = Instant::now();
        self.children
            .iter_mut()
            .map(|c| loop {
                if let Some(status) = c.try_wait().unwrap() {
                    return status.success();
                }
                assert!(
                    started.elapsed() < limit,
                    "a worker did not exit after the job"
                );
                std::thread::sleep(Duration::from_millis(50));
            })
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_report(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

/// Checks the report's shape and the transfer set against the dataset.
fn check_outputs(out: &Path) -> serde_json::Value {
    let report = read_report(out);
    assert_eq!(report["dataset"], "synthetic");
    assert_eq!(report["test_examples"], 600);
    assert!(report["wall_seconds"].as_f64().unwrap() > 0.0);
    let models = report["models"].as_array().unwrap();
    let roles: Vec<&str> = models.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        ["teacher", "teacher", "student", "baseline", "ensemble"]
    );
    assert_eq!(models.iter().filter(|m| m["primary"] == true).count(), 1);
    for m in models {
        let acc = m["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert_eq!(m["per_class_errors"].as_array().unwrap().len(), 6);
        assert!(m["params"].as_u64().unwrap() > 0);
        assert!(m["train_seconds"].as_f64().is_some());
    }
    let student = &models[2];
    assert_eq!(student["name"], "student");
    assert_eq!(
        student["teachers"],
        serde_json::json!(["teacher-0", "teacher-1"])
    );
    assert_eq!(student["temperature"], 4.0);
    // Six classes in groups of three: chance is 1/6, and a model that only
    // found the right group would score 1/3. The baseline of this shape
    // scores about 0.8 here; 0.6 is far above both and far below it.
    assert!(
        student["test_accuracy"].as_f64().unwrap() > 0.6,
        "{student}"
    );
    assert!(models[3]["teachers"].as_array().unwrap().is_empty());

    let set = TransferSet::open(&out.join("transfer")).unwrap();
    let splits = decode_splits(
        &std::fs::read(out.join("dataset.safetensors")).unwrap(),
        Path::new("dataset"),
    )
    .unwrap();
    set.check_dataset(&splits.train).unwrap();
    assert_eq!(set.num_shards(), 4);
    let mut rows = 0;
    for shard in set.shards() {
        let shard = shard.unwrap(); // verifies the sha256 and tensor shapes
        assert_eq!(shard.num_teachers(), 2, "one logits tensor per teacher");
        for k in 0..shard.num_teachers() {
            assert_eq!(shard.logits(k).len(), shard.rows() * 6);
        }
        rows += shard.rows();
    }
    assert_eq!(rows, splits.train.len(), "one row per transfer example");
    assert_eq!(report["transfer_set"]["examples"], rows);
    assert_eq!(report["transfer_set"]["shards"], 4);
    for name in ["teacher-0", "teacher-1", "student", "baseline"] {
        assert!(
            out.join(format!("models/{name}.safetensors")).is_file(),
            "{name}"
        );
    }
    assert!(out.join("report.md").is_file());
    report
}

#[test]
fn coordinator_and_two_workers_run_a_job_to_completion() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let coordinator =
        Coordinator::start_with(&config, &["--listen", "127.0.0.1:0", "--linger", "120"]);
    // The first worker is held (SIGSTOP) from its first lease until the
    // second has one too, so that both run tasks however fast each starts.
    // Its lease may expire meanwhile: the task then moves on.
    let mut workers = Workers::start(0, &coordinator.url, dir.path());
    for i in 0..2 {
        workers.add_registered(&coordinator, dir.path());
        let id = workers.ids[i].clone();
        coordinator.wait_for_status(Duration::from_secs(60), |s| tasks_leased(s, &id) >= 1);
        if i == 0 {
            signal("-STOP", &[workers.pid(0)]);
        }
    }
    signal("-CONT", &[workers.pid(0)]);
    assert_eq!(
        workers.wait_all(Duration::from_secs(240)),
        vec![true, true],
        "workers exit 0 when told the job is over"
    );
    let (status, ok, stdout, _) = coordinator.finish_lingering(Duration::from_secs(30));
    assert!(
        ok && status["state"] == "succeeded",
        "coordinator failed:\n{stdout}"
    );
    assert!(stdout.contains("report: "), "{stdout}");
    for id in &workers.ids {
        assert!(tasks_leased(&status, id) >= 1, "{id} ran tasks: {status}");
    }
    let made_by: std::collections::BTreeSet<&str> = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["worker"].as_str().expect("a done task names its worker"))
        .collect();
    eprintln!("results made by {made_by:?}");
    check_outputs(&dir.path().join("out"));
}

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

/// How many tasks worker `id` of `status` (from `/api/status`) leased.
fn tasks_leased(status: &serde_json::Value, id: &str) -> u64 {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id)
        .map_or(0, |w| w["tasks_leased"].as_u64().unwrap())
}

/// Task `id` of `status` (from `/api/status`).
fn task_in<'a>(status: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("no task {id} in {status}"))
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

/// Sends a battery of malformed and hostile requests to a running
/// coordinator; returns each one's name and the status code it got.
async fn send_bad_requests(url: &str, out: &Path) -> Vec<(&'static str, tonic::Code)> {
    use proto::pb;
    let token = proto::auth::Token::new(TOKEN, "test").unwrap();
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        proto::auth::AttachToken::new(Some(&token)),
    );
    let mut got = Vec::new();
    fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
        r.map_or_else(|s| s.code(), |_| tonic::Code::Ok)
    }
    let caps = pb::Capabilities {
        device: "cpu".into(),
        threads: 1,
        memory_bytes: 0,
        hostname: "prober".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let register = |caps: Option<pb::Capabilities>| pb::RegisterRequest { capabilities: caps };
    got.push((
        "register without capabilities",
        code(client.register(register(None)).await),
    ));
    let mut long_host = caps.clone();
    long_host.hostname = "h".repeat(1000);
    got.push((
        "register with a 1000-byte host name",
        code(client.register(register(Some(long_host))).await),
    ));
    let mut no_threads = caps.clone();
    no_threads.threads = 0;
    got.push((
        "register with 0 threads",
        code(client.register(register(Some(no_threads))).await),
    ));
    let mut old = caps.clone();
    old.version = "0.0.0".into();
    got.push((
        "register with another version",
        code(client.register(register(Some(old))).await),
    ));
    let worker = client
        .register(register(Some(caps)))
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let lease = |w: &str| pb::LeaseRequest {
        worker_id: w.into(),
    };
    got.push((
        "lease as an unknown worker",
        code(client.lease_task(lease("w999-nobody")).await),
    ));
    got.push((
        "lease with a 10 kB worker id",
        code(client.lease_task(lease(&"w".repeat(10_000))).await),
    ));
    let task = match client
        .lease_task(lease(&worker))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(pb::lease_response::Outcome::Task(t)) => t,
        other => panic!("expected a task, got {other:?}"),
    };
    let heartbeat = |task_id: &str, epoch: u32| pb::HeartbeatRequest {
        worker_id: worker.clone(),
        task_id: task_id.into(),
        attempt: task.attempt,
        progress: Some(pb::Progress {
            epoch,
            epochs: 5,
            ..Default::default()
        }),
    };
    got.push((
        "heartbeat for an unknown task",
        code(client.heartbeat(heartbeat("nope", 1)).await),
    ));
    got.push((
        "heartbeat with epoch 9 of 5",
        code(client.heartbeat(heartbeat(&task.task_id, 9)).await),
    ));
    let header = |attempt: u64, payload: &[u8], size: u64| pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Header(pb::UploadHeader {
            worker_id: worker.clone(),
            task_id: task.task_id.clone(),
            attempt,
            sha256: common::checksum::sha256_hex(payload),
            size,
            seconds: 1.0,
            summary_json: Vec::new(),
        })),
    };
    let data = |bytes: &[u8]| pb::UploadChunk {
        part: Some(pb::upload_chunk::Part::Data(bytes.to_vec())),
    };
    let garbage = b"not a model at all".to_vec();
    let n = garbage.len() as u64;
    let uploads: Vec<(&'static str, Vec<pb::UploadChunk>)> = vec![
        ("upload without a header", vec![data(&garbage)]),
        (
            "upload for a stale attempt",
            vec![header(task.attempt + 1000, &garbage, n), data(&garbage)],
        ),
        (
            "upload over the size limit",
            vec![header(task.attempt, &garbage, 1 << 50)],
        ),
        (
            "upload with a wrong checksum",
            vec![header(task.attempt, b"other", n), data(&garbage)],
        ),
        (
            "upload of fewer bytes than announced",
            vec![header(task.attempt, &garbage, n + 5), data(&garbage)],
        ),
        (
            "upload of a garbage model",
            vec![header(task.attempt, &garbage, n), data(&garbage)],
        ),
        (
            "upload of a 3 MiB message",
            vec![
                header(task.attempt, &garbage, 3 << 20),
                data(&vec![0u8; 3 << 20]),
            ],
        ),
    ];
    for (name, messages) in uploads {
        got.push((
            name,
            code(client.upload_result(tokio_stream::iter(messages)).await),
        ));
    }
    let checkpoint = vec![header(task.attempt, &garbage, n), data(&garbage)];
    got.push((
        "checkpoint of garbage",
        code(
            client
                .upload_checkpoint(tokio_stream::iter(checkpoint))
                .await,
        ),
    ));
    let download = |name: &str| pb::DownloadRequest {
        worker_id: worker.clone(),
        name: name.into(),
    };
    got.push((
        "download of ../../etc/passwd",
        code(client.download_artifact(download("../../etc/passwd")).await),
    ));
    let failure = |task_id: &str, released: bool| pb::FailureReport {
        worker_id: worker.clone(),
        task_id: task_id.into(),
        attempt: task.attempt,
        error: "x".repeat(100_000),
        permanent: false,
        released,
    };
    got.push((
        "failure of an unknown task",
        code(client.report_failure(failure("nope", false)).await),
    ));
    assert!(
        !out.join("models")
            .join(format!("{}.safetensors", task.task_id))
            .exists(),
        "nothing was stored"
    );
    // Give the task back so that the probe costs it no attempt.
    client
        .report_failure(failure(&task.task_id, true))
        .await
        .unwrap();
    got
}

/// Malformed and hostile requests are each refused with a fitting status
/// and store nothing; the coordinator stays up and the job then runs to
/// completion with real workers.
#[test]
fn bad_requests_are_refused_and_the_job_still_completes() {
    use tonic::Code;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let coordinator = Coordinator::start(&config);
    let out = dir.path().join("out");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = runtime.block_on(send_bad_requests(&coordinator.url, &out));
    let expected = [
        ("register without capabilities", Code::InvalidArgument),
        ("register with a 1000-byte host name", Code::InvalidArgument),
        ("register with 0 threads", Code::InvalidArgument),
        ("register with another version", Code::FailedPrecondition),
        ("lease as an unknown worker", Code::Aborted),
        ("lease with a 10 kB worker id", Code::InvalidArgument),
        ("heartbeat for an unknown task", Code::NotFound),
        ("heartbeat with epoch 9 of 5", Code::InvalidArgument),
        ("upload without a header", Code::InvalidArgument),
        ("upload for a stale attempt", Code::FailedPrecondition),
        ("upload over the size limit", Code::InvalidArgument),
        ("upload with a wrong checksum", Code::DataLoss),
        ("upload of fewer bytes than announced", Code::DataLoss),
        ("upload of a garbage model", Code::InvalidArgument),
        ("upload of a 3 MiB message", Code::OutOfRange),
        ("checkpoint of garbage", Code::InvalidArgument),
        ("download of ../../etc/passwd", Code::NotFound),
        ("failure of an unknown task", Code::NotFound),
    ];
    for ((name, code), (want_name, want)) in got.iter().zip(&expected) {
        assert_eq!(name, want_name);
        assert_eq!(code, want, "{name}");
    }
    assert_eq!(got.len(), expected.len());
    let mut workers = Workers::start(2, &coordinator.url, dir.path());
    let (ok, stdout, logs) = coordinator.wait_with_logs(Duration::from_secs(240));
    assert!(ok, "{stdout}");
    assert!(
        !logs.iter().any(|l| l.contains("task attempt failed")),
        "the probe cost no task an attempt"
    );
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
    check_outputs(&out);
}

/// The services a gRPC server lists through reflection (as grpcurl asks).
async fn reflected_services(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    match answers
        .message()
        .await
        .unwrap()
        .and_then(|a| a.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    }
}

/// The value of metric `name` (with its labels, as printed) in a
/// Prometheus text exposition; 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Headless Chromium, which the README's test command installs; its absence
/// is a failure, never a skip.
fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
        .expect("Chromium is not installed: run the README's test command (`bash scripts/test.sh`), which installs Debian's `chromium`")
}

/// Runs headless Chromium on `url` with `what` (`--dump-dom` or
/// `--screenshot=FILE`); returns its stdout.
fn browse(url: &str, what: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--window-size=1280,900",
            // Lets the page's script fetch and render the job's status.
            "--virtual-time-budget=4000",
            what,
            url,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// During a running job: the status page, loaded in headless Chromium,
/// shows the tasks and the workers (a screenshot is kept); it needs the
/// token off loopback; the metrics endpoint's task counters move; and
/// `coordinator status` prints the same summary in a terminal.
#[test]
fn the_status_page_metrics_and_status_command_show_the_running_job() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // Long teachers, and a lease that outlasts the pause below.
    let config = write_config(dir.path(), 5000);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("lease_timeout_secs = 3.0", "lease_timeout_secs = 600.0");
    std::fs::write(&config, text).unwrap();
    // Off loopback, so that the page needs the token.
    let coordinator = Coordinator::start_with(
        &config,
        &[
            "--listen",
            "127.0.0.1:0",
            "--status-listen",
            "0.0.0.0:0",
            "--linger",
            "30",
        ],
    );
    // One worker also serves its metrics and the gRPC health service.
    let (worker_metrics, worker_health) = (free_loopback_address(), free_loopback_address());
    let mut workers = Workers::start_with(
        1,
        &coordinator.url,
        dir.path(),
        &[
            "--metrics-listen".as_ref(),
            worker_metrics.as_ref(),
            "--health-listen".as_ref(),
            worker_health.as_ref(),
        ],
    );
    let mut other = Workers::start(1, &coordinator.url, &dir.path().join("other"));
    // Both workers run a task (the teachers lease first); then both are
    // paused, so that nothing moves while the page is read, however fast
    // or slow this machine is.
    let running =
        coordinator.wait_for_status(Duration::from_secs(120), |s| s["counts"]["running"] == 2);
    let paused = [&workers, &other].map(|w| w.children[0].id().to_string());
    signal("-STOP", &paused);
    let frozen = coordinator.api_status();
    assert_eq!(frozen["counts"]["running"], 2, "{running}");
    let (code, _) = coordinator.http_get("/api/status");
    assert_eq!(code, 401, "no token, no status");
    let (code, before) = coordinator.http_get(&format!("/metrics?token={TOKEN}"));
    assert_eq!(code, 200);
    assert!(
        metric(&before, "distill_tasks{state=\"running\"}") >= 1.0,
        "{before}"
    );
    assert_eq!(
        metric(&before, "distill_tasks{state=\"done\"}"),
        frozen["counts"]["done"].as_f64().unwrap(),
        "{before}"
    );
    assert!(metric(&before, "distill_workers_alive") >= 1.0, "{before}");

    let page = format!(
        "{}?token={TOKEN}",
        coordinator.status_url.replace("0.0.0.0", "127.0.0.1")
    );
    let dom = browse(&page, "--dump-dom");
    for task in [
        "teacher-0",
        "teacher-1",
        "baseline",
        "infer-00000",
        "student",
        "evaluate",
    ] {
        assert!(
            dom.contains(&format!("data-task=\"{task}\"")),
            "{task} is not on the page:\n{dom}"
        );
    }
    assert!(
        dom.contains("data-worker=\"w1-") && dom.contains("data-worker=\"w2-"),
        "{dom}"
    );
    assert!(
        dom.contains("class=\"task running\""),
        "a running task is shown as running"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    browse(&page, &format!("--screenshot={}", shot.display()));
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );
    eprintln!("status page screenshot: {}", shot.display());

    let addr = coordinator.url.trim_start_matches("http://");
    let status = Command::new(coordinator_bin())
        .args(["status", "--addr", addr])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        printed.contains("tasks done") && printed.contains("running teacher-"),
        "{printed}"
    );
    assert!(printed.contains("workers: 2 alive of 2"), "{printed}");
    // The workers' own servers answer only while they run.
    signal("-CONT", &paused);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let services = runtime.block_on(reflected_services(&coordinator.url));
    for service in ["distill.cluster.v1.Coordinator", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == service), "{services:?}");
    }
    let health = runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{worker_health}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    });
    assert_eq!(
        health,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Its epoch gauge is set at the end of its first epoch.
    loop {
        let (_, line) = workers
            .lines
            .recv_timeout(Duration::from_secs(120))
            .expect("a teacher trains");
        if line.contains("epoch done") {
            break;
        }
    }
    let worker_text = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&worker_metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {worker_metrics}\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        worker_text.contains("distill_worker_epoch"),
        "{worker_text}"
    );

    coordinator.wait_for_status(Duration::from_secs(120), |s| {
        s["counts"]["done"].as_u64() >= Some(1)
    });
    let (_, after) = coordinator.http_get(&format!("/metrics?token={TOKEN}"));
    assert!(
        metric(&after, "distill_tasks{state=\"done\"}") >= 1.0,
        "{after}"
    );
    assert!(
        metric(&after, "distill_tasks_completed_total") >= 1.0,
        "{after}"
    );

    // After the job, --linger keeps the page and the report up.
    coordinator.wait_for_status(Duration::from_secs(240), |s| s["report"].is_string());
    let (code, report) = coordinator.http_get(&format!("/report.md?token={TOKEN}"));
    assert_eq!(code, 200);
    assert!(report.contains("student"), "{report}");
    let (_, done) = coordinator.http_get(&format!("/api/status?token={TOKEN}"));
    let done: serde_json::Value = serde_json::from_str(&done).unwrap();
    assert_eq!(done["state"], "succeeded");
    assert!(done["report"].as_str().unwrap().contains("student"));
    let pid = coordinator.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (ok, stdout) = coordinator.wait(Duration::from_secs(30));
    assert!(
        ok,
        "SIGTERM while lingering ends a finished job well: {stdout}"
    );
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true]);
    assert_eq!(other.wait_all(Duration::from_secs(20)), vec![true]);
}

#[test]
fn a_bad_config_fails_at_once_naming_the_key() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("transfer_shards = 4", "transfer_shards = 0");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("transfer_shards") && err.contains("cluster.toml"),
        "{err}"
    );
}

/// A generalist + specialists job: 12 classes in 4 planted groups of 3, one
/// specialist per group, both students, through two worker processes.
#[test]
fn a_generalist_and_specialists_job_runs_to_completion() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("num_classes = 6", "num_classes = 12")
        .replace("count = 2", "count = 1")
        + "\n[specialists]\ncount = 4\n[specialists.train]\nepochs = 3\nbatch_size = 32\n";
    std::fs::write(&config, text).unwrap();
    let coordinator =
        Coordinator::start_with(&config, &["--listen", "127.0.0.1:0", "--linger", "120"]);
    let mut workers = Workers::start(2, &coordinator.url, dir.path());
    let (status, ok, stdout, _) = coordinator.finish_lingering(Duration::from_secs(300));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert!(stdout.contains("## Specialists"), "{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
    let specialists_ran = tasks_where(&status, |t| {
        t["id"].as_str().unwrap().starts_with("specialist-") && t["attempts"] != 0
    });
    assert_eq!(specialists_ran.len(), 4, "{status}");

    let out = dir.path().join("out");
    let report = read_report(&out);
    let models = report["models"].as_array().unwrap();
    let role_of = |name: &str| {
        models
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in the report"))["role"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(role_of("teacher-0"), "teacher");
    assert_eq!(role_of("combined"), "combined");
    assert_eq!(role_of("student-combined"), "student");
    for m in 0..4 {
        let name = format!("specialist-{m:02}");
        assert_eq!(role_of(&name), "specialist");
        assert!(out.join(format!("models/{name}.safetensors")).is_file());
    }
    let sp = &report["specialists"];
    let clusters: Vec<Vec<usize>> = serde_json::from_value(sp["clusters"].clone()).unwrap();
    let mut covered: Vec<usize> = clusters.iter().flatten().copied().collect();
    covered.sort();
    assert_eq!(covered, (0..12).collect::<Vec<_>>(), "a partition");
    // Table 4: with a partition every class is covered once.
    let groups = sp["by_coverage"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["specialists_covering"], 1);
    assert_eq!(groups[0]["test_examples"], 600);
    assert_eq!(sp["comparison"].as_array().unwrap().len(), 4);
    // The combination is a real classifier on 12 classes (chance: 1/12).
    assert!(sp["combined_test_accuracy"].as_f64().unwrap() > 0.5, "{sp}");

    // The transfer set holds the generalist's logits and ln q.
    let set = TransferSet::open(&out.join("transfer")).unwrap();
    assert_eq!(set.manifest().teachers, ["teacher-0", "combined"]);
    for shard in set.shards() {
        let shard = shard.unwrap();
        for row in shard.logits(1).chunks(12) {
            let total: f64 = row.iter().map(|&z| f64::from(z).exp()).sum();
            assert!((total - 1.0).abs() < 1e-4, "ln q sums to 1: {total}");
        }
    }
}

/// Without the token (or with a wrong one) the coordinator answers
/// UNAUTHENTICATED; the health service answers anyway; a worker with the
/// wrong token gives up at once instead of retrying.
#[test]
fn unauthenticated_calls_are_refused_but_health_answers() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    let coordinator = Coordinator::start(&config);
    let url = coordinator.url.clone();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use proto::pb::coordinator_client::CoordinatorClient;
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let register = || proto::pb::RegisterRequest {
            capabilities: Some(Default::default()),
        };
        let err = CoordinatorClient::new(channel.clone())
            .register(register())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let wrong = proto::auth::Token::new("not-the-cluster-token", "test").unwrap();
        let err = CoordinatorClient::with_interceptor(
            channel.clone(),
            proto::auth::AttachToken::new(Some(&wrong)),
        )
        .register(register())
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        let health = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            health.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    });
    let started = Instant::now();
    let out = Command::new(worker_bin())
        .args(["--coordinator", &url, "--cpu", "--give-up-after", "60"])
        .arg("--scratch")
        .arg(dir.path().join("intruder"))
        .env(TOKEN_ENV, "not-the-cluster-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the cluster token"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "no retrying");
    assert!(!err.contains(TOKEN) && !err.contains("not-the-cluster-token"));
    // The real workers still finish the job.
    let mut workers = Workers::start(2, &url, dir.path());
    let (ok, stdout) = coordinator.wait(Duration::from_secs(240));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
}

#[test]
fn without_a_token_the_coordinator_refuses_to_start() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    let out = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove(TOKEN_ENV)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no cluster token") && err.contains(TOKEN_ENV),
        "{err}"
    );
    // Saying so in the config switches authentication off.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("authentication = \"off\"\n{text}")).unwrap();
    let mut open = Command::new(coordinator_bin())
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env_remove(TOKEN_ENV)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(open.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("coordinator listening on "), "{line}");
    open.kill().unwrap();
    open.wait().unwrap();
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, both
/// signed by it, written as `ca.pem`, `server.{pem,key}`, `client.{pem,key}`.
/// Returns the CA's path.
fn write_test_pki(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    for (name, sans) in [
        ("server", vec!["localhost".to_string(), "127.0.0.1".into()]),
        ("client", vec!["worker".into()]),
    ] {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    let path = dir.join("ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

/// The small job's config with `[tls]` (plus `extra` keys in that table).
fn tls_config(dir: &Path, extra: &str) -> PathBuf {
    let config = write_config(dir, 10);
    let text = std::fs::read_to_string(&config).unwrap();
    let tls = format!("[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\n{extra}\n[dataset]");
    std::fs::write(&config, text.replacen("[dataset]", &tls, 1)).unwrap();
    config
}

/// With mutual TLS, a worker without a client certificate signed by the
/// CA cannot join; workers with one run the job.
#[test]
fn with_mutual_tls_only_workers_with_a_client_certificate_join() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_test_pki(dir.path());
    let config = tls_config(dir.path(), "client_ca = \"ca.pem\"\n");
    let coordinator = Coordinator::start(&config);
    let out = Command::new(worker_bin())
        .args([
            "--coordinator",
            &coordinator.url,
            "--cpu",
            "--give-up-after",
            "2",
        ])
        .arg("--tls-ca")
        .arg(&ca_path)
        .arg("--scratch")
        .arg(dir.path().join("no-cert"))
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a worker without a client certificate joined"
    );
    let cert = dir.path().join("client.pem");
    let key = dir.path().join("client.key");
    let mut workers = Workers::start_with(
        2,
        &coordinator.url,
        dir.path(),
        &[
            "--tls-ca".as_ref(),
            ca_path.as_os_str(),
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
    );
    let (ok, stdout) = coordinator.wait(Duration::from_secs(240));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
}

/// With `[tls]` the coordinator serves only TLS: a plaintext client cannot
/// talk to it, and workers that trust its CA run the job to completion.
#[test]
fn with_tls_plaintext_is_refused_and_workers_trusting_the_ca_finish() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let ca_path = write_test_pki(dir.path());
    let config = tls_config(dir.path(), "");
    let coordinator = Coordinator::start(&config);
    assert!(
        coordinator.url.starts_with("https://"),
        "{}",
        coordinator.url
    );
    let plain_url = coordinator.url.replacen("https://", "http://", 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(plain_url.clone())?
                .connect()
                .await?;
            proto::pb::coordinator_client::CoordinatorClient::new(channel)
                .register(proto::pb::RegisterRequest::default())
                .await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        }
        .await;
        assert!(result.is_err(), "a plaintext client got through");
    });
    // A worker without the CA is told what is missing.
    let out = Command::new(worker_bin())
        .args(["--coordinator", &coordinator.url, "--cpu"])
        .env(TOKEN_ENV, TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));
    let mut workers = Workers::start_with(
        2,
        &coordinator.url,
        dir.path(),
        &["--tls-ca".as_ref(), ca_path.as_os_str()],
    );
    let (ok, stdout) = coordinator.wait(Duration::from_secs(240));
    assert!(ok, "coordinator failed:\n{stdout}");
    assert_eq!(workers.wait_all(Duration::from_secs(20)), vec![true, true]);
    check_outputs(&dir.path().join("out"));
}
