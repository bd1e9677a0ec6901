//! Training throughput on this machine, batch 128: the 784-1200-1200-10 net
//! with dropout (0.2 input, 0.5 hidden), max-norm and ±2-pixel jitter, the
//! 784-800-800-10 net on hard labels, and the 800-800 distillation step at
//! T = 20; teacher inference (alone, and into a transfer set on disk); plus, measured in the same run,
//! the matrix-multiply rate of candle on each step's own GEMM shapes
//! (median of 7 repeats) and on 2048³, as references.
//!
//! ```text
//! cargo bench -p distill --bench train_throughput [-- --steps 200]
//! ```
//!
//! Prints one JSON object. Synthetic random inputs are used: the cost of a
//! step does not depend on pixel values.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use common::dataset::{Dataset, Normalization};
use common::seed::{self, Stream};
use common::transfer::TransferSet;
use distill::eval::{Logits, Predictor};
use distill::hparams::{DistillConfig, EpochSelection, TrainConfig};
use distill::model::{Mlp, MlpSpec};
use distill::teacher::write_transfer_set;
use distill::train::{train, EpochStats, Targets};
use rand::Rng;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 128;
const INFER_BATCH: usize = 1024;

fn main() -> anyhow::Result<()> {
    let steps: usize = std::env::args()
        .skip_while(|a| a != "--steps")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(150);
    let device = Device::Cpu;
    let data = random_mnist_like(steps * BATCH)?;
    let validation = random_mnist_like(BATCH)?;
    let gflops = matmul_gflops(&device)?;

    let teacher_cfg = TrainConfig {
        epochs: 1,
        warmup_epochs: 0,
        input_dropout: 0.2,
        hidden_dropout: 0.5,
        max_norm: Some(4.0),
        jitter_pixels: 2,
        select: EpochSelection::Last,
        ..TrainConfig::default()
    };
    let plain_cfg = TrainConfig {
        input_dropout: 0.0,
        hidden_dropout: 0.0,
        max_norm: None,
        jitter_pixels: 0,
        ..teacher_cfg.clone()
    };
    let large = MlpSpec::new(784, vec![1200, 1200], 10)?;
    let small = MlpSpec::new(784, vec![800, 800], 10)?;
    let teacher = one_epoch(
        &large,
        &data,
        &validation,
        Targets::Labels,
        &teacher_cfg,
        &device,
    )?
    .examples_per_second;
    let student_hard = one_epoch(
        &small,
        &data,
        &validation,
        Targets::Labels,
        &plain_cfg,
        &device,
    )?
    .examples_per_second;

    let dir = tempfile::tempdir()?;
    let t = Mlp::new_random(large.clone(), &mut seed::rng(9, Stream::Init), &device)?;
    // Teacher inference alone (the work PyTorch's figure times), after one
    // warm-up pass over a slice; then the same into a transfer set on disk,
    // shards written on another thread.
    let predictor = Predictor::new(&t, &device)?;
    predictor.logits_of(&data, 0..INFER_BATCH.min(data.len()))?;
    let started = Instant::now();
    let logits = predictor.logits(&data)?;
    let inference = data.len() as f64 / started.elapsed().as_secs_f64();
    drop(logits);
    let started = Instant::now();
    write_transfer_set(&[("t", &t)], &data, dir.path(), 2_000, &device)?;
    let into_transfer_set = data.len() as f64 / started.elapsed().as_secs_f64();
    let set = TransferSet::open(dir.path())?;
    let distill_cfg = DistillConfig::default();
    let targets = Targets::Transfer {
        set: &set,
        distill: &distill_cfg,
        keep: None,
    };
    let distill_epoch = one_epoch(&small, &data, &validation, targets, &plain_cfg, &device)?;
    let distill_step = distill_epoch.examples_per_second;

    let gemm = serde_json::json!({
        "teacher_train": step_gemm_rate(&large, BATCH, true, &device)?,
        "student_train": step_gemm_rate(&small, BATCH, true, &device)?,
        "distill_step": step_gemm_rate(&small, BATCH, true, &device)?,
        "teacher_infer": step_gemm_rate(&large, INFER_BATCH, false, &device)?,
    });
    let report = serde_json::json!({
        "batch": BATCH,
        "steps": steps,
        "threads": candle_core::utils::get_num_threads(),
        "matmul_gflops_2048": gflops,
        "step_gemm": gemm,
        // The distillation step reads its transfer set from disk, the next
        // shard on another thread: how long training waited for shards.
        "distill_shard_wait": {
            "seconds": distill_epoch.shard_wait_seconds,
            "epoch_seconds": distill_epoch.seconds,
            "shards": set.num_shards(),
        },
        "examples_per_second": {
            "teacher_1200_1200_dropout": teacher,
            "mlp_800_800_hard": student_hard,
            "distill_800_800_T20": distill_step,
            "teacher_inference_1200_1200": inference,
            "teacher_inference_into_transfer_set_1200_1200": into_transfer_set,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn random_mnist_like(n: usize) -> anyhow::Result<Dataset> {
    let mut rng = seed::rng(3, Stream::Synthetic);
    let features = (0..n * 784).map(|_| rng.random::<f32>()).collect();
    let labels = (0..n).map(|_| rng.random_range(0..10u32)).collect();
    Ok(Dataset::new(
        "bench",
        features,
        labels,
        784,
        10,
        Some((28, 28)),
        Normalization::DivideBy255,
    )?)
}

/// Trains a fresh `spec` for the one epoch of `cfg` and returns its stats.
fn one_epoch(
    spec: &MlpSpec,
    data: &Dataset,
    validation: &Dataset,
    targets: Targets<'_>,
    cfg: &TrainConfig,
    device: &Device,
) -> anyhow::Result<EpochStats> {
    let model = Mlp::new_random(spec.clone(), &mut seed::rng(1, Stream::Init), device)?;
    let report = train(&model, data, validation, targets, cfg, device, |_| {})?;
    Ok(report.epochs[0].clone())
}

/// The GEMMs of one step of `spec` at `batch` rows as (m, k, n): the
/// forward pass, and when `backward`, each layer's weight gradient and
/// every layer's input gradient but the first's.
fn step_gemm_shapes(spec: &MlpSpec, batch: usize, backward: bool) -> Vec<(usize, usize, usize)> {
    let mut shapes = Vec::new();
    for (layer, (input, output)) in spec.layer_dims().into_iter().enumerate() {
        shapes.push((batch, input, output));
        if backward {
            shapes.push((input, batch, output));
            if layer > 0 {
                shapes.push((batch, output, input));
            }
        }
    }
    shapes
}

/// candle's rate on one step's GEMMs: FLOPs per example, and GFLOP/s as the
/// median (and all) of 7 repeats of at least 0.2 s each.
fn step_gemm_rate(
    spec: &MlpSpec,
    batch: usize,
    backward: bool,
    device: &Device,
) -> anyhow::Result<serde_json::Value> {
    let shapes = step_gemm_shapes(spec, batch, backward);
    let operands = shapes
        .iter()
        .map(|&(m, k, n)| {
            Ok((
                Tensor::randn(0f32, 1.0, (m, k), device)?,
                Tensor::randn(0f32, 1.0, (k, n), device)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let flops: f64 = shapes
        .iter()
        .map(|&(m, k, n)| 2.0 * (m * k * n) as f64)
        .sum();
    let run_once = || -> anyhow::Result<()> {
        for (a, b) in &operands {
            a.matmul(b)?;
        }
        Ok(())
    };
    run_once()?;
    let mut rates = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        let mut reps = 0;
        while started.elapsed().as_secs_f64() < 0.2 {
            run_once()?;
            reps += 1;
        }
        rates.push(flops * reps as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "flops_per_example": flops / batch as f64,
        "gemm_gflops_median": sorted[sorted.len() / 2],
        "gemm_gflops_repeats": rates,
    }))
}

fn matmul_gflops(device: &Device) -> anyhow::Result<f64> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    a.matmul(&b)?.sum_all()?.to_dtype(DType::F32)?;
    let reps = 5;
    let started = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
    }
    Ok(2.0 * (n as f64).powi(3) * reps as f64 / started.elapsed().as_secs_f64() / 1e9)
}
