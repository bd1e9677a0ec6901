//! `worker --coordinator http://HOST:PORT --gpu 0` (or `--cpu`): does the
//! compute of a distillation job and exits when the coordinator says the job
//! is over.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use common::logging::LogFormat;
use distill::device::DeviceChoice;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Worker of a distillation job: leases tasks from the coordinator, runs them
/// on the CPU or a CUDA GPU, and streams the results back.
#[derive(Debug, Parser)]
#[command(version, group(ArgGroup::new("device").required(true).args(["gpu", "cpu"])))]
struct Args {
    /// The coordinator's URL.
    #[arg(long)]
    coordinator: String,
    /// Run on this CUDA GPU (needs a build with `--features cuda`).
    #[arg(long)]
    gpu: Option<usize>,
    /// Run on the CPU.
    #[arg(long)]
    cpu: bool,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Scratch folder for downloaded artifacts (default: a folder under the system temp dir).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Give up after this many seconds without reaching the coordinator.
    #[arg(long, default_value_t = 300.0)]
    give_up_after: f64,
    /// After SIGTERM, seconds the running task may take to reach its next
    /// checkpoint (training) or its end before it is abandoned.
    #[arg(long, default_value_t = 25.0)]
    stop_grace: f64,
    /// Serve the standard gRPC health service on this address (for
    /// Kubernetes probes), such as 0.0.0.0:9090.
    #[arg(long)]
    health_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics on this address (`/metrics`), such as
    /// 0.0.0.0:9100.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// File holding the cluster token (default: the DISTILL_CLUSTER_TOKEN
    /// environment variable; none if neither is set).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed an https:// coordinator's certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// This worker's certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(long, requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// The key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The token and TLS files of `args`, read.
fn credentials(args: &Args) -> Result<worker::client::Credentials, String> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let tls = match &args.tls_ca {
        Some(ca) => Some(worker::client::ClientTls {
            ca: read("--tls-ca", ca)?,
            identity: match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => {
                    Some((read("--tls-cert", cert)?, read("--tls-key", key)?))
                }
                _ => None,
            },
        }),
        None => None,
    };
    Ok(worker::client::Credentials {
        token: proto::auth::Token::from_file_or_env(args.token_file.as_deref())?,
        tls,
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::logging::init(args.log_format);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // candle's CPU kernels size their thread pool from this variable; set it
    // before any thread exists.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let credentials = match credentials(&args) {
        Ok(credentials) => credentials,
        Err(e) => {
            eprintln!("worker: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let opts = worker::Options {
        credentials,
        coordinator: args.coordinator,
        device: args.gpu.map_or(DeviceChoice::Cpu, DeviceChoice::Gpu),
        threads,
        scratch: args
            .scratch
            .unwrap_or_else(|| std::env::temp_dir().join("distill-worker")),
        give_up_after: Duration::from_secs_f64(args.give_up_after.max(0.0)),
        stop_grace: Duration::from_secs_f64(args.stop_grace.max(0.0)),
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(worker::run(opts)) {
        Ok(worker::Exit::JobSucceeded | worker::Exit::JobFailed) => std::process::ExitCode::SUCCESS,
        // 128 + SIGTERM, as if the signal had ended the process: a stopped
        // worker did not finish its part.
        Ok(worker::Exit::Stopped) => std::process::ExitCode::from(143),
        Err(e) => {
            eprintln!("worker: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
