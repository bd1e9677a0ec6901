//! Real MNIST, small slices: the IDX files load, a small net learns them,
//! and a teacher's transfer set distills into a student. Needs the datasets
//! folder (`DATASETS_DIR`, default `../shared/datasets`); without it the
//! test says so and passes, except under CI (`CI` set), where it fails.

use std::path::PathBuf;

use candle_core::Device;
use common::dataset::{idx, Splits};
use common::seed::{self, Stream};
use common::transfer::TransferSet;
use distill::eval::evaluate;
use distill::hparams::{DistillConfig, TrainConfig};
use distill::model::{Mlp, MlpSpec, Model};
use distill::model_io;
use distill::teacher::write_transfer_set;
use distill::train::{train, Targets};

fn mnist_dir() -> Option<PathBuf> {
    let dir = common::paths::datasets_dir().join("mnist");
    if dir.join("train-images-idx3-ubyte.gz").is_file() {
        return Some(dir);
    }
    let msg = format!("MNIST not found in {} (set DATASETS_DIR)", dir.display());
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

#[test]
fn small_nets_learn_mnist_and_distill_through_a_transfer_set() {
    let Some(dir) = mnist_dir() else { return };
    let dev = Device::Cpu;
    let (train_full, test) = idx::load_mnist_folder(&dir, "mnist").unwrap();
    assert_eq!(
        (train_full.len(), test.len(), train_full.dim()),
        (60_000, 10_000, 784)
    );
    assert_eq!(
        train_full.class_counts()[1],
        6742,
        "the known count of 1s in MNIST's training set"
    );
    let s = Splits::new(
        &train_full.slice(0..4000).unwrap(),
        test.slice(0..2000).unwrap(),
        500,
        1,
    )
    .unwrap();

    let teacher_cfg = TrainConfig {
        epochs: 4,
        learning_rate: 0.05,
        input_dropout: 0.1,
        hidden_dropout: 0.3,
        jitter_pixels: 1,
        max_norm: Some(4.0),
        ..TrainConfig::default()
    };
    let spec = MlpSpec::new(784, vec![128], 10).unwrap();
    let teacher = Mlp::new_random(spec.clone(), &mut seed::rng(1, Stream::Init), &dev).unwrap();
    let report = train(
        &teacher,
        &s.train,
        &s.validation,
        Targets::Labels,
        &teacher_cfg,
        &dev,
        |_| {},
    )
    .unwrap();
    assert_eq!(report.epochs.len(), 4);
    let teacher_eval = evaluate(&teacher, &s.test, &dev).unwrap();
    assert!(
        teacher_eval.accuracy() > 0.85,
        "teacher accuracy {}",
        teacher_eval.accuracy()
    );

    let out = tempfile::tempdir().unwrap();
    let model_path = out.path().join("teacher.safetensors");
    model_io::save(
        &Model::Mlp(teacher.clone()),
        s.train.normalization(),
        &model_path,
    )
    .unwrap();
    let Model::Mlp(loaded) = model_io::load(&model_path, &dev).unwrap().model;
    assert_eq!(evaluate(&loaded, &s.test, &dev).unwrap(), teacher_eval);

    let transfer_dir = out.path().join("transfer");
    write_transfer_set(
        &[("teacher", &teacher)],
        &s.train,
        &transfer_dir,
        1000,
        &dev,
    )
    .unwrap();
    let set = TransferSet::open(&transfer_dir).unwrap();
    let student = Mlp::new_random(
        MlpSpec::new(784, vec![32], 10).unwrap(),
        &mut seed::rng(2, Stream::Init),
        &dev,
    )
    .unwrap();
    let distill = DistillConfig {
        temperature: 4.0,
        ..DistillConfig::default()
    };
    let student_cfg = TrainConfig {
        epochs: 4,
        ..TrainConfig::default()
    };
    train(
        &student,
        &s.train,
        &s.validation,
        Targets::Transfer {
            set: &set,
            distill: &distill,
            keep: None,
        },
        &student_cfg,
        &dev,
        |_| {},
    )
    .unwrap();
    let student_eval = evaluate(&student, &s.test, &dev).unwrap();
    assert!(
        student_eval.accuracy() > 0.8,
        "student accuracy {}",
        student_eval.accuracy()
    );
}
