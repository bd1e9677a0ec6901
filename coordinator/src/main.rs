//! `coordinator --config cluster.toml`: runs a distillation job to the end
//! and exits 0, or exits 1 with a message saying why it could not.
//! `coordinator status --addr HOST:PORT` prints a running job's summary.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use common::logging::LogFormat;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Coordinator of a distillation job: shards the data, hands teacher
/// training, teacher inference and student distillation to workers over
/// gRPC, collects the transfer set and writes the report.
#[derive(Debug, Parser)]
#[command(version, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The job's configuration (see the README's config reference).
    #[arg(long, required = true)]
    config: Option<PathBuf>,
    /// Listen address, overriding the config's `listen` (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Status page address, overriding the config's `status_listen`.
    #[arg(long)]
    status_listen: Option<String>,
    /// Start this many worker processes on this machine (loopback).
    #[arg(long, default_value_t = 0)]
    local_workers: usize,
    /// Compute threads per local worker (default: the cores divided among them).
    #[arg(long)]
    local_worker_threads: Option<usize>,
    /// Run the local workers on these GPUs (comma-separated, shared
    /// round-robin; needs a worker built with `--features cuda`) instead
    /// of the CPU.
    #[arg(long, value_delimiter = ',')]
    local_worker_gpus: Vec<usize>,
    /// Log format: `text` or `json`.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// File holding the cluster token (default: the DISTILL_CLUSTER_TOKEN
    /// environment variable; with --local-workers and neither, one is made).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Start the job over: forget the state of an earlier run in the output
    /// folder (its models, transfer set and report are deleted).
    #[arg(long)]
    fresh: bool,
    /// After the job ends, keep serving the status page and the report for
    /// this many seconds.
    #[arg(long, default_value_t = 0.0)]
    linger: f64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the summary of the job a coordinator is running: task counts,
    /// running tasks with their progress, workers.
    Status {
        /// The coordinator's gRPC address, HOST:PORT.
        #[arg(long)]
        addr: String,
        /// File holding the cluster token (default: DISTILL_CLUSTER_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The CA (PEM) to trust when the coordinator serves TLS.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Print the full status as JSON instead.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // Blocking work (storing results under the job's one lock, file reads
    // for downloads) needs few threads: with tokio's default of 512, each
    // of hundreds of workers' concurrent uploads held a thread and its
    // allocator heap (the load test's peak memory doubled).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coordinator: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(Command::Status {
        addr,
        token_file,
        tls_ca,
        json,
    }) = args.command
    {
        let shown = runtime.block_on(coordinator::status_client::fetch(
            &addr,
            token_file.as_deref(),
            tls_ca.as_deref(),
        ));
        return match shown {
            Ok(status) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("a status serialises")
                );
                std::process::ExitCode::SUCCESS
            }
            Ok(status) => {
                print!("{}", status.summary());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("coordinator status: error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    common::logging::init(args.log_format);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opts = coordinator::Options {
        config: args
            .config
            .expect("clap requires --config without a subcommand"),
        listen: args.listen,
        status_listen: args.status_listen,
        local_workers: args.local_workers,
        log_format: args.log_format,
        token_file: args.token_file,
        fresh: args.fresh,
        linger: Duration::from_secs_f64(args.linger.max(0.0)),
        local_worker_gpus: args.local_worker_gpus,
        local_worker_threads: args
            .local_worker_threads
            .unwrap_or_else(|| (cores / args.local_workers.max(1)).max(1)),
    };
    // `block_on` runs on the main thread, which local workers' PDEATHSIG
    // relies on (see `local_workers`).
    match runtime.block_on(coordinator::run(opts)) {
        Ok(outcome) => {
            println!("{}", outcome.summary);
            println!("report: {}", outcome.report);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coordinator: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
