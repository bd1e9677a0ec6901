//! Training a student from a transfer set streams it: the process's peak
//! memory does not grow with the transfer set, which is read one shard at a
//! time (plus the one prefetched).
#![cfg(target_os = "linux")]

use candle_core::Device;
use common::dataset::{Dataset, Normalization};
use common::seed::{self, Stream};
use common::transfer::{Encoding, ManifestBuilder, TransferSet, TransferSetWriter};
use distill::hparams::{DistillConfig, EpochSelection, TrainConfig};
use distill::model::{Mlp, MlpSpec};
use distill::train::{train, Targets};
use rand::Rng;

const DIM: usize = 8;
const CLASSES: usize = 50;
const TEACHERS: usize = 16;
const ROWS_PER_SHARD: usize = 1000;

/// The process's peak resident memory so far, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Trains one epoch from a transfer set of `examples` examples with random
/// logits from 16 teachers (the set is `examples` x 3.2 KB on disk, the
/// dataset only `examples` x 36 bytes).
fn train_from_transfer_set(examples: usize) {
    let mut rng = seed::rng(examples as u64, Stream::Synthetic);
    let features = (0..examples * DIM).map(|_| rng.random::<f32>()).collect();
    let labels = (0..examples)
        .map(|_| rng.random_range(0..CLASSES as u32))
        .collect();
    let data = Dataset::new(
        "stream",
        features,
        labels,
        DIM,
        CLASSES,
        None,
        Normalization::Identity,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ids = (0..TEACHERS).map(|t| format!("t{t}")).collect();
    let manifest = ManifestBuilder::new(
        &data.fingerprint(),
        examples,
        CLASSES,
        ids,
        Encoding::DenseF32,
        0,
    );
    let mut writer = TransferSetWriter::create(dir.path(), manifest).unwrap();
    for start in (0..examples).step_by(ROWS_PER_SHARD) {
        let rows = ROWS_PER_SHARD.min(examples - start);
        let logits: Vec<Vec<f32>> = (0..TEACHERS)
            .map(|_| {
                (0..rows * CLASSES)
                    .map(|_| rng.random::<f32>() * 4.0)
                    .collect()
            })
            .collect();
        let views: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
        writer.write_shard(&views).unwrap();
    }
    writer.finish().unwrap();
    let set = TransferSet::open(dir.path()).unwrap();
    // Wide enough that training a shard takes longer than reading the next.
    let spec = MlpSpec::new(DIM, vec![512, 512], CLASSES).unwrap();
    let model = Mlp::new_random(spec, &mut seed::rng(1, Stream::Init), &Device::Cpu).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        warmup_epochs: 0,
        select: EpochSelection::Last,
        ..TrainConfig::default()
    };
    let distill = DistillConfig::default();
    let targets = Targets::Transfer {
        set: &set,
        distill: &distill,
        keep: None,
    };
    let validation = data.slice(0..100).unwrap();
    train(
        &model,
        &data,
        &validation,
        targets,
        &cfg,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
}

#[test]
fn peak_memory_stays_flat_as_the_transfer_set_grows() {
    train_from_transfer_set(8_000);
    let small = peak_rss();
    // Four times the examples: 77 MB more transfer set on disk, 0.9 MB more
    // dataset in memory. Loading the set whole would add the 77 MB.
    train_from_transfer_set(32_000);
    let large = peak_rss();
    let growth = large.saturating_sub(small);
    assert!(
        growth < 16 << 20,
        "peak memory grew by {} MB (from {} MB) for a transfer set 4x larger",
        growth >> 20,
        small >> 20
    );
}
