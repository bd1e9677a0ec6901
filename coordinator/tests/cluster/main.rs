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
//!
//! This file holds what the tests share (processes, configs, checks); the
//! tests are in one module per concern: `jobs`, `faults`, `requests`,
//! `status`, `security`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::dataset::examples::Examples;
use common::dataset::shard::{DatasetIndex, ShardedSplit, Split};
use common::transfer::TransferSet;
use proto::auth::TOKEN_ENV;

mod faults;
mod jobs;
mod requests;
mod s3;
mod security;
mod status;

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
# Several shards per split, read two at a time, across processes.
shard_examples = 512
shuffle_window_shards = 2
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
    let index_path = out.join("dataset/index.json");
    let index = DatasetIndex::from_json(&std::fs::read(&index_path).unwrap(), &index_path).unwrap();
    assert_eq!(
        index
            .train
            .shards
            .iter()
            .map(|s| s.rows)
            .collect::<Vec<_>>(),
        [512, 512, 176],
        "the training split in shards of 512"
    );
    let files = index
        .train
        .shards
        .iter()
        .map(|s| Some(out.join(&s.key)))
        .collect();
    let train = ShardedSplit::new(&index, Split::Train, files).unwrap();
    assert_eq!(
        train.load_all().unwrap().fingerprint(),
        index.train.fingerprint
    );
    set.check_dataset(&train).unwrap();
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
    assert_eq!(rows, train.len(), "one row per transfer example");
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
