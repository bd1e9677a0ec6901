//! Runs one variant and seed as a real job: writes its `cluster.toml`,
//! starts the `coordinator` binary with local `worker` processes, and reads
//! back `report.json`. A job whose report exists for the same config is not
//! run again, and all jobs share one task cache, so a stopped benchmark
//! resumes where it stopped and a teacher is trained once for all of them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::experiment::{apply_edits, Experiment, Variant};

/// Where things go, and where the jobs' workers run.
#[derive(Clone, Debug)]
pub struct Paths {
    /// Folder of the `coordinator` and `worker` binaries.
    pub bin_dir: PathBuf,
    /// Jobs' folders and the task cache (`target/bench` by default).
    pub work_dir: PathBuf,
    /// GPUs for the jobs' local workers (none: the CPU).
    pub gpus: Vec<usize>,
}

impl Paths {
    /// The shared task cache.
    pub fn cache_dir(&self) -> PathBuf {
        self.work_dir.join("cache")
    }
}

/// A finished job.
#[derive(Clone, Debug)]
pub struct JobResult {
    /// The variant's label.
    pub variant: String,
    /// The job's seed.
    pub seed: u64,
    /// Its `report.json`.
    pub report: serde_json::Value,
    /// Whether it ran now (false: its report was already there).
    pub ran: bool,
}

impl JobResult {
    /// The report's entry for model `name`.
    pub fn model(&self, name: &str) -> anyhow::Result<&serde_json::Value> {
        self.report["models"]
            .as_array()
            .and_then(|models| models.iter().find(|m| m["name"] == name))
            .with_context(|| {
                format!(
                    "{} seed {}: no model {name} in the report",
                    self.variant, self.seed
                )
            })
    }

    /// Test errors of model `name`.
    pub fn test_errors(&self, name: &str) -> anyhow::Result<f64> {
        self.model(name)?["test_errors"]
            .as_f64()
            .context("test_errors is not a number")
    }
}

/// The coordinator's arguments that put its local workers on `gpus`.
fn gpu_args(gpus: &[usize]) -> Vec<String> {
    if gpus.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = gpus.iter().map(usize::to_string).collect();
    vec!["--local-worker-gpus".into(), list.join(",")]
}

/// Runs (or finds) the job of `variant` with `seed`.
pub fn run_job(
    exp: &Experiment,
    variant: &Variant,
    seed: u64,
    paths: &Paths,
) -> anyhow::Result<JobResult> {
    let dir = paths
        .work_dir
        .join(&exp.name)
        .join(&variant.label)
        .join(format!("seed-{seed}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cache = absolute(&paths.cache_dir())?;
    let mut cfg = apply_edits(&exp.cluster, &variant.edits)?;
    cfg.insert("output_dir".into(), "output".into());
    cfg.insert("seed".into(), toml::Value::Integer(seed as i64));
    cfg.insert(
        "cache_dir".into(),
        cache.to_string_lossy().into_owned().into(),
    );
    let text = toml::to_string(&cfg)?;
    let config = dir.join("cluster.toml");
    let report = dir.join("output").join("report.json");
    if std::fs::read_to_string(&config).ok().as_deref() == Some(text.as_str()) && report.exists() {
        return Ok(JobResult {
            variant: variant.label.clone(),
            seed,
            report: read_json(&report)?,
            ran: false,
        });
    }
    let _ = std::fs::remove_file(&report);
    std::fs::write(&config, &text)?;
    let log_path = dir.join("job.log");
    let log = std::fs::File::create(&log_path)?;
    let started = Instant::now();
    let status = Command::new(paths.bin_dir.join("coordinator"))
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0"])
        // The config changed (or the last run did not finish): start over;
        // the task cache keeps what still applies.
        .arg("--fresh")
        .args(["--local-workers", &exp.local_workers.to_string()])
        .args(["--local-worker-threads", &exp.worker_threads.to_string()])
        .args(gpu_args(&paths.gpus))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| {
            format!(
                "cannot start {} (build it with `cargo build --release --bin coordinator --bin worker`)",
                paths.bin_dir.join("coordinator").display()
            )
        })?;
    if !status.success() {
        bail!(
            "{} seed {seed} failed ({status}) after {:.0} s; see {}",
            variant.label,
            started.elapsed().as_secs_f64(),
            log_path.display()
        );
    }
    Ok(JobResult {
        variant: variant.label.clone(),
        seed,
        report: read_json(&report)?,
        ran: true,
    })
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path)?;
    Ok(path.canonicalize()?)
}
