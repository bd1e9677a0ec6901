//! `experiments FILE...`: runs the paper's experiments through the real
//! coordinator and workers and writes their tables and plots into
//! `bench/results/` (see `bench/README.md`). Run it from the repository
//! root through `bench/run.sh`, which builds the binaries first.
//!
//! Seeds are the outer loop, so the first seed of every variant finishes
//! before the second starts, and the results are rewritten after every job:
//! a run stopped part-way leaves results for the jobs it finished, and the
//! next run skips those jobs (and every task already in the task cache).

mod analysis;
mod experiment;
mod plot;
mod results;
mod runner;
mod stamp;
mod stats;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use crate::experiment::Experiment;
use crate::results::{JobSummary, Results};
use crate::runner::{run_job, JobResult, Paths};
use crate::stamp::Stamp;

/// Runs benchmark experiments through the cluster.
#[derive(Debug, Parser)]
struct Args {
    /// Experiment files (`bench/experiments/*.toml`).
    #[arg(required = true)]
    experiments: Vec<PathBuf>,
    /// Jobs' folders and the shared task cache.
    #[arg(long, default_value = "target/bench")]
    work_dir: PathBuf,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    results_dir: PathBuf,
    /// README whose results blocks are updated.
    #[arg(long, default_value = "bench/README.md")]
    readme: PathBuf,
    /// Leave the README alone (smoke runs).
    #[arg(long)]
    no_readme: bool,
    /// Folder of the `coordinator` and `worker` binaries (default: this
    /// program's folder).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Run every job's local workers on these GPUs (comma-separated; needs
    /// a worker built with `--features cuda`) instead of the CPU.
    #[arg(long, value_delimiter = ',')]
    gpus: Vec<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program has no folder")?
            .to_path_buf(),
    };
    let paths = Paths {
        bin_dir,
        work_dir: args.work_dir.clone(),
        gpus: args.gpus.clone(),
    };
    // Read once, before any result is written: writing results modifies
    // tracked files, which must not make the commit look dirty.
    let stamp = Stamp::now(Path::new("."));
    for file in &args.experiments {
        run_experiment(file, &paths, &args, &stamp)?;
    }
    Ok(())
}

fn run_experiment(file: &Path, paths: &Paths, args: &Args, stamp: &Stamp) -> anyhow::Result<()> {
    let exp = Experiment::load(file)?;
    let variants = exp.variants();
    let total = variants.len() * exp.seeds.len();
    println!("{}: {} jobs ({})", exp.name, total, exp.budget);
    let mut jobs: Vec<(JobResult, f64)> = Vec::new();
    let mut n = 0;
    for &seed in &exp.seeds {
        for variant in &variants {
            n += 1;
            let started = Instant::now();
            let job = run_job(&exp, variant, seed, paths)?;
            let seconds = job.report["wall_seconds"].as_f64().unwrap_or(0.0);
            println!(
                "[{n}/{total}] {} seed {seed}: {} in {:.0} s",
                variant.label,
                if job.ran { "ran" } else { "already done" },
                started.elapsed().as_secs_f64()
            );
            jobs.push((job, seconds));
            write_results(&exp, file, &jobs, args, stamp, n == total)?;
        }
    }
    println!(
        "{}: results in {}",
        exp.name,
        args.results_dir.join(format!("{}.md", exp.name)).display()
    );
    Ok(())
}

fn write_results(
    exp: &Experiment,
    file: &Path,
    jobs: &[(JobResult, f64)],
    args: &Args,
    stamp: &Stamp,
    all_done: bool,
) -> anyhow::Result<()> {
    let finished: Vec<JobResult> = jobs.iter().map(|(j, _)| j.clone()).collect();
    std::fs::create_dir_all(&args.results_dir)?;
    let analysis = match analysis::analyse(exp, &finished, &args.results_dir) {
        Ok(a) => a,
        Err(e) if all_done => return Err(e.context(format!("{}: analysis failed", exp.name))),
        // Too few jobs yet for this experiment's tables.
        Err(e) => {
            eprintln!("(no results yet: {e:#})");
            return Ok(());
        }
    };
    let summaries = jobs
        .iter()
        .map(|(j, seconds)| JobSummary {
            variant: j.variant.clone(),
            seed: j.seed,
            wall_seconds: *seconds,
            cached_models: j.report["models"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["cached"] == true)
                .filter_map(|m| m["name"].as_str().map(String::from))
                .collect(),
        })
        .collect();
    let results = Results {
        name: exp.name.clone(),
        title: exp.title.clone(),
        command: format!("bench/run.sh {}", file.display()),
        budget: exp.budget.clone(),
        stamp: Stamp {
            date: Stamp::now_date(),
            ..stamp.clone()
        },
        tables: analysis.tables,
        notes: analysis.notes,
        plots: analysis.plots,
        jobs: summaries,
        data: analysis.data,
    };
    let readme = (!args.no_readme).then_some(args.readme.as_path());
    results.write(&args.results_dir, readme)
}
