//! `load-test`: a few hundred simulated workers against one real
//! coordinator process, on loopback. Each worker is a lightweight client
//! in this process (its own connection): it registers, then leases no-op
//! tasks, heartbeats once per task and uploads the result, until the
//! coordinator says the job is over. Checks that every task was done
//! exactly once, and reports tasks per second and the coordinator's CPU
//! time and peak memory (from `wait4`).
//!
//! `cargo build --release -p coordinator -p bench && target/release/load-test`

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use proto::pb;

/// Runs the load test.
#[derive(Debug, Parser)]
struct Args {
    /// Simulated workers.
    #[arg(long, default_value_t = 300)]
    workers: usize,
    /// No-op tasks in the job.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// The coordinator binary (default: beside this program).
    #[arg(long)]
    coordinator: Option<PathBuf>,
    /// Write the figures here as JSON (and print them either way).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The cluster token of the test (the coordinator gets it by environment).
const TOKEN: &str = "load-test-token-0123456789abcdef";

type Client = pb::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        proto::auth::AttachToken,
    >,
>;

/// Task completions by task id (counted by the simulated workers).
type Completions = Arc<Mutex<HashMap<String, usize>>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let coordinator = match &args.coordinator {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .with_file_name(format!("coordinator{}", std::env::consts::EXE_SUFFIX)),
    };
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "output_dir = \"out\"\nstatus_listen = \"127.0.0.1:0\"\nheartbeat_interval_ms = 1000\nlease_timeout_secs = 60\n\
             summary_interval_secs = 5\n[load_test]\ntasks = {}\n[dataset]\nsource = \"synthetic\"\n\
             validation_size = 100\n[dataset.synthetic]\ntrain_size = 600\ntest_size = 100\n\
             [teachers]\nhidden = [8]\n[student]\nhidden = [8]\n",
            args.tasks
        ),
    )?;
    // A std child: reaped by `wait4` below, never by tokio.
    let mut child = std::process::Command::new(&coordinator)
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0"])
        .env(proto::auth::TOKEN_ENV, TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", coordinator.display()))?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("no stdout")?);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first)?;
    let url = first
        .trim()
        .strip_prefix("coordinator listening on ")
        .with_context(|| format!("unexpected first line {first:?}"))?
        .to_string();
    let pid = child.id() as libc::pid_t;

    let completions: Completions = Arc::default();
    let started = Instant::now();
    let workers: Vec<_> = (0..args.workers)
        .map(|i| tokio::spawn(simulate(url.clone(), i, completions.clone())))
        .collect();
    let mut rpcs = 0u64;
    for w in workers {
        rpcs += w.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Reap the coordinator with its resource usage.
    let (status, usage) = tokio::task::spawn_blocking(move || wait_with_usage(pid)).await??;
    anyhow::ensure!(status == 0, "the coordinator exited with status {status}");

    let completions = completions.lock().expect("lock");
    let done: usize = completions.values().sum();
    let twice: Vec<_> = completions.iter().filter(|(_, &n)| n > 1).collect();
    anyhow::ensure!(twice.is_empty(), "tasks done more than once: {twice:?}");
    anyhow::ensure!(
        completions.len() == args.tasks && done == args.tasks,
        "{} distinct tasks done, {} completions, of {}",
        completions.len(),
        done,
        args.tasks
    );
    let own = rusage(libc::RUSAGE_SELF);
    let figures = serde_json::json!({
        "workers": args.workers,
        "tasks": args.tasks,
        "every_task_done_exactly_once": true,
        "seconds": seconds,
        "tasks_per_second": args.tasks as f64 / seconds,
        "rpcs": rpcs,
        "rpcs_per_second": rpcs as f64 / seconds,
        "coordinator_cpu_seconds": usage.cpu_seconds,
        "coordinator_cpu_percent_of_one_core": 100.0 * usage.cpu_seconds / seconds,
        "coordinator_peak_rss_mib": usage.max_rss_kib as f64 / 1024.0,
        "simulator_cpu_seconds": own.cpu_seconds,
        "machine_cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    let text = serde_json::to_string_pretty(&figures)?;
    println!("{text}");
    if let Some(out) = &args.out {
        std::fs::write(out, text + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// One simulated worker: returns the number of RPCs it made.
async fn simulate(url: String, index: usize, completions: Completions) -> anyhow::Result<u64> {
    let token = proto::auth::Token::new(TOKEN, "load test").map_err(anyhow::Error::msg)?;
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await
        .context("connecting")?;
    let mut client: Client = pb::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        proto::auth::AttachToken::new(Some(&token)),
    );
    let worker_id = client
        .register(pb::RegisterRequest {
            capabilities: Some(pb::Capabilities {
                device: "cpu".into(),
                threads: 1,
                memory_bytes: 0,
                hostname: format!("sim-{index}"),
                version: env!("CARGO_PKG_VERSION").into(),
            }),
        })
        .await?
        .into_inner()
        .worker_id;
    let mut rpcs = 1;
    loop {
        rpcs += 1;
        let lease = client
            .lease_task(pb::LeaseRequest {
                worker_id: worker_id.clone(),
            })
            .await?
            .into_inner();
        match lease.outcome {
            Some(pb::lease_response::Outcome::Task(task)) => {
                let spec: distill::task::TaskSpec = serde_json::from_slice(&task.spec_json)?;
                let distill::task::TaskSpec::Noop(noop) = spec else {
                    anyhow::bail!("{} is not a no-op task", task.task_id);
                };
                client
                    .heartbeat(pb::HeartbeatRequest {
                        worker_id: worker_id.clone(),
                        task_id: task.task_id.clone(),
                        attempt: task.attempt,
                        progress: None,
                    })
                    .await?;
                let payload = noop.payload();
                let header = pb::UploadHeader {
                    worker_id: worker_id.clone(),
                    task_id: task.task_id.clone(),
                    attempt: task.attempt,
                    sha256: common::checksum::sha256_hex(&payload),
                    size: payload.len() as u64,
                    seconds: 0.0,
                    summary_json: Vec::new(),
                };
                let messages = [
                    pb::UploadChunk {
                        part: Some(pb::upload_chunk::Part::Header(header)),
                    },
                    pb::UploadChunk {
                        part: Some(pb::upload_chunk::Part::Data(payload)),
                    },
                ];
                client.upload_result(tokio_stream::iter(messages)).await?;
                rpcs += 2;
                *completions
                    .lock()
                    .expect("lock")
                    .entry(task.task_id)
                    .or_default() += 1;
            }
            Some(pb::lease_response::Outcome::Wait(w)) => {
                tokio::time::sleep(Duration::from_millis(u64::from(w.retry_after_ms))).await;
            }
            Some(pb::lease_response::Outcome::JobOver(over)) => {
                anyhow::ensure!(over.succeeded, "the job failed: {}", over.message);
                return Ok(rpcs);
            }
            None => anyhow::bail!("an empty lease response"),
        }
    }
}

/// CPU time and peak memory of a process.
struct Usage {
    cpu_seconds: f64,
    max_rss_kib: i64,
}

fn to_usage(r: &libc::rusage) -> Usage {
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        cpu_seconds: secs(r.ru_utime) + secs(r.ru_stime),
        max_rss_kib: r.ru_maxrss,
    }
}

/// Waits for child `pid` to exit; returns its exit status and usage.
fn wait_with_usage(pid: libc::pid_t) -> anyhow::Result<(i32, Usage)> {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for writes for the call's duration.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    anyhow::ensure!(rc == pid, "wait4: {}", std::io::Error::last_os_error());
    Ok((libc::WEXITSTATUS(status), to_usage(&usage)))
}

fn rusage(who: libc::c_int) -> Usage {
    // SAFETY: zeroed rusage is valid; getrusage fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for writes.
    unsafe { libc::getrusage(who, &mut usage) };
    to_usage(&usage)
}
