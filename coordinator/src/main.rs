//! `coordinator --config cluster.toml`: runs a distillation job to the end
//! and exits 0, or exits 1 with a message saying why it could not.

use std::path::PathBuf;

use clap::Parser;
use common::logging::LogFormat;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Coordinator of a distillation job: shards the data, hands teacher
/// training, teacher inference and student distillation to workers over
/// gRPC, collects the transfer set and writes the report.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The job's configuration (see the README's config reference).
    #[arg(long)]
    config: PathBuf,
    /// Listen address, overriding the config's `listen` (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// Start this many worker processes on this machine (loopback).
    #[arg(long, default_value_t = 0)]
    local_workers: usize,
    /// Compute threads per local worker (default: the cores divided among them).
    #[arg(long)]
    local_worker_threads: Option<usize>,
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    common::logging::init(args.log_format);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opts = coordinator::Options {
        config: args.config,
        listen: args.listen,
        local_workers: args.local_workers,
        log_format: args.log_format,
        token_file: args.token_file,
        fresh: args.fresh,
        local_worker_threads: args
            .local_worker_threads
            .unwrap_or_else(|| (cores / args.local_workers.max(1)).max(1)),
    };
    match coordinator::run(opts).await {
        Ok(outcome) => {
            println!("{}", outcome.summary);
            println!("report: {}", outcome.report.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coordinator: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
