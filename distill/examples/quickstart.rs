//! The whole pipeline on the built-in synthetic dataset, in about a minute
//! and with no files to download: a baseline on hard labels, a teacher with
//! dropout, its logits in an on-disk transfer set, and a student distilled
//! from them. Prints the table and where the report is.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Parser;
use common::dataset::synthetic::SyntheticSpec;
use common::dataset::Splits;
use distill::experiment::{self, ExperimentConfig, ModelPlan};
use distill::hparams::{DistillConfig, TrainConfig};
use distill::model::MlpSpec;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Distill a teacher into a student on built-in synthetic data")]
struct Args {
    /// Epochs per model.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Distillation temperature.
    #[arg(long, default_value_t = 4.0)]
    temperature: f64,
    /// Seed of every random choice (data included).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output folder for models, the transfer set and report.json.
    #[arg(long, default_value = "target/quickstart")]
    out: PathBuf,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let data = SyntheticSpec {
        seed: args.seed,
        ..SyntheticSpec::default()
    };
    let (train_full, test) = data.generate()?;
    let splits = Splits::new(&train_full, test, 1000, args.seed)?;
    let (dim, classes) = (data.dim, data.num_classes);
    let base = TrainConfig {
        epochs: args.epochs,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let small = MlpSpec::new(dim, vec![32], classes)?;
    let cfg = ExperimentConfig {
        baseline: ModelPlan {
            spec: small.clone(),
            train: base.clone(),
        },
        teacher: ModelPlan {
            spec: MlpSpec::new(dim, vec![256, 256], classes)?,
            train: TrainConfig {
                input_dropout: 0.1,
                hidden_dropout: 0.3,
                max_norm: Some(4.0),
                seed: args.seed + 1,
                ..base.clone()
            },
        },
        student: ModelPlan {
            spec: small,
            train: TrainConfig {
                seed: args.seed + 2,
                ..base.clone()
            },
        },
        distill: DistillConfig {
            temperature: args.temperature,
            ..DistillConfig::default()
        },
        rows_per_shard: 1000,
        out: args.out.clone(),
        resume: false,
    };
    println!(
        "synthetic data: {} classes in confusable groups of {}, {} features; {} training, {} validation, {} test examples",
        classes,
        data.group_size,
        dim,
        splits.train.len(),
        splits.validation.len(),
        splits.test.len()
    );
    let outcomes = experiment::run(&cfg, &splits, &Device::Cpu, |_, _| {})?;
    print!("{}", experiment::format_table(&outcomes, None));
    let path = args.out.join("report.json");
    let report = serde_json::json!({ "dataset": "synthetic", "data": data, "config": cfg, "models": outcomes });
    common::atomic_file::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    println!("report: {}", path.display());
    Ok(())
}
