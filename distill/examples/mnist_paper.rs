//! The MNIST experiment of Hinton, Vinyals & Dean (2015), section 3, in one
//! process: a 784-800-800-10 net on hard labels, a 784-1200-1200-10 teacher
//! with dropout, max-norm and +-2-pixel jitter, and the 800-800 net distilled
//! from the teacher's soft targets at T = 20 through an on-disk transfer set.
//! Prints the test errors of the three in a table and writes `report.json`.
//!
//! ```text
//! cargo run --release --example mnist_paper -- --epochs 100
//! ```
//!
//! Every choice during training (which epoch's weights to keep) is made on a
//! validation split held out from the 60,000 training images; the test set
//! only reports. With `--resume`, models already saved in `--out` are
//! loaded instead of trained again.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use common::dataset::{idx, Splits};
use distill::device::DeviceChoice;
use distill::experiment::{self, ExperimentConfig, ModelPlan};
use distill::hparams::{DistillConfig, TrainConfig};
use distill::model::MlpSpec;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Reproduce the MNIST experiment of the distillation paper (section 3)")]
struct Args {
    /// Epochs per model (unless overridden per model below).
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    /// Epochs of the hard-label 800-800 baseline.
    #[arg(long)]
    baseline_epochs: Option<usize>,
    /// Epochs of the 1200-1200 teacher.
    #[arg(long)]
    teacher_epochs: Option<usize>,
    /// Epochs of the distilled 800-800 student.
    #[arg(long)]
    student_epochs: Option<usize>,
    /// Training images held out for validation.
    #[arg(long, default_value_t = 5000)]
    validation_size: usize,
    /// Use only the first N training images (quick trials).
    #[arg(long)]
    train_limit: Option<usize>,
    /// Peak learning rate of the distilled student.
    #[arg(long, default_value_t = 0.05)]
    student_learning_rate: f64,
    /// Distillation temperature.
    #[arg(long, default_value_t = 20.0)]
    temperature: f64,
    /// Weight of the hard-label cross-entropy in the student's loss.
    #[arg(long, default_value_t = 0.1)]
    hard_weight: f64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder with the MNIST IDX files (default: $DATASETS_DIR/mnist).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output folder for models, the transfer set and report.json.
    #[arg(long, default_value = "target/mnist_paper")]
    out: PathBuf,
    /// Load models already saved in --out instead of training them again.
    #[arg(long)]
    resume: bool,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Train on this CUDA GPU instead of the CPU (needs `--features distill/cuda`).
    #[arg(long)]
    gpu: Option<usize>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if let Some(t) = args.threads {
        // candle's CPU kernels read this when they size their thread pool.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| common::paths::datasets_dir().join("mnist"));
    let (train_full, test) = idx::load_mnist_folder(&data_dir, "mnist").with_context(|| {
        format!(
            "loading MNIST from {} (set DATASETS_DIR or --data-dir)",
            data_dir.display()
        )
    })?;
    let train_full = match args.train_limit {
        Some(n) => train_full.slice(0..n.min(train_full.len()))?,
        None => train_full,
    };
    let splits = Splits::new(&train_full, test, args.validation_size, args.seed)?;
    println!(
        "MNIST: {} training, {} validation, {} test images; output in {}",
        splits.train.len(),
        splits.validation.len(),
        splits.test.len(),
        args.out.display()
    );

    let common_cfg = TrainConfig {
        batch_size: 128,
        momentum: 0.9,
        nesterov: true,
        warmup_epochs: 1,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let small = MlpSpec::new(784, vec![800, 800], 10)?;
    let cfg = ExperimentConfig {
        baseline: ModelPlan {
            spec: small.clone(),
            train: TrainConfig {
                epochs: args.baseline_epochs.unwrap_or(args.epochs),
                learning_rate: 0.05,
                ..common_cfg.clone()
            },
        },
        teacher: ModelPlan {
            spec: MlpSpec::new(784, vec![1200, 1200], 10)?,
            train: TrainConfig {
                epochs: args.teacher_epochs.unwrap_or(args.epochs),
                learning_rate: 0.1,
                input_dropout: 0.2,
                hidden_dropout: 0.5,
                max_norm: Some(4.0),
                jitter_pixels: 2,
                seed: args.seed + 1,
                ..common_cfg.clone()
            },
        },
        student: ModelPlan {
            spec: small,
            train: TrainConfig {
                epochs: args.student_epochs.unwrap_or(args.epochs),
                learning_rate: args.student_learning_rate,
                seed: args.seed + 2,
                ..common_cfg.clone()
            },
        },
        distill: DistillConfig {
            temperature: args.temperature,
            hard_weight: args.hard_weight,
            ..DistillConfig::default()
        },
        rows_per_shard: 10_000,
        out: args.out.clone(),
        resume: args.resume,
    };
    let device = distill::device::select(args.gpu.map_or(DeviceChoice::Cpu, DeviceChoice::Gpu))?;
    let outcomes = experiment::run(&cfg, &splits, &device, |role, e| {
        println!(
            "  {role} epoch {:3}: loss {:.4}  validation errors {:4}  {:.1} s ({:.0} examples/s)",
            e.epoch, e.mean_loss, e.validation_errors, e.seconds, e.examples_per_second
        );
    })?;
    println!();
    print!(
        "{}",
        experiment::format_table(&outcomes, Some(["146", "67", "74"]))
    );
    println!(
        "(student distilled at T = {}, hard-label weight {})",
        cfg.distill.temperature, cfg.distill.hard_weight
    );
    let report = serde_json::json!({
        "dataset": "mnist",
        "train_examples": splits.train.len(),
        "validation_examples": splits.validation.len(),
        "test_examples": splits.test.len(),
        "config": cfg,
        "models": outcomes,
    });
    let path = args.out.join("report.json");
    common::atomic_file::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("report: {}", path.display());
    Ok(())
}
