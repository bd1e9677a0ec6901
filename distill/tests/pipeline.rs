//! End to end on the built-in synthetic dataset: train a teacher, write its
//! logits to a transfer set on disk, distill a student from it, evaluate.

use candle_core::Device;
use common::dataset::synthetic::SyntheticSpec;
use common::dataset::Splits;
use common::seed::{self, Stream};
use common::transfer::TransferSet;
use distill::eval::evaluate;
use distill::hparams::{DistillConfig, TrainConfig};
use distill::model::{Mlp, MlpSpec};
use distill::model_io;
use distill::teacher::write_transfer_set;
use distill::train::{train, Targets};

fn splits() -> Splits {
    let spec = SyntheticSpec {
        train_size: 3000,
        test_size: 2000,
        ..SyntheticSpec::default()
    };
    let (train_full, test) = spec.generate().unwrap();
    Splits::new(&train_full, test, 500, 1).unwrap()
}

fn fit(spec: &MlpSpec, s: &Splits, targets: Targets<'_>, cfg: &TrainConfig) -> Mlp {
    let dev = Device::Cpu;
    let model =
        Mlp::new_random(spec.clone(), &mut seed::rng(cfg.seed, Stream::Init), &dev).unwrap();
    train(&model, &s.train, &s.validation, targets, cfg, &dev, |_| {}).unwrap();
    model
}

#[test]
fn distilled_student_learns_from_the_teacher_through_a_transfer_set() {
    let dev = Device::Cpu;
    let s = splits();
    let teacher_cfg = TrainConfig {
        epochs: 15,
        learning_rate: 0.05,
        input_dropout: 0.1,
        hidden_dropout: 0.3,
        max_norm: Some(4.0),
        ..TrainConfig::default()
    };
    let teacher = fit(
        &MlpSpec::new(32, vec![128, 128], 12).unwrap(),
        &s,
        Targets::Labels,
        &teacher_cfg,
    );
    let teacher_eval = evaluate(&teacher, &s.test, &dev).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let manifest =
        write_transfer_set(&[("teacher", &teacher)], &s.train, dir.path(), 700, &dev).unwrap();
    assert_eq!(manifest.shards.len(), s.train.len().div_ceil(700));
    let set = TransferSet::open(dir.path()).unwrap();

    let student_spec = MlpSpec::new(32, vec![24], 12).unwrap();
    let student_cfg = TrainConfig {
        epochs: 15,
        seed: 2,
        ..TrainConfig::default()
    };
    let distill = DistillConfig {
        temperature: 4.0,
        ..DistillConfig::default()
    };
    let student = fit(
        &student_spec,
        &s,
        Targets::Transfer {
            set: &set,
            distill: &distill,
            keep: None,
        },
        &student_cfg,
    );
    let student_eval = evaluate(&student, &s.test, &dev).unwrap();
    let chance = 1.0 / 12.0;
    println!(
        "teacher accuracy {:.3}, distilled student {:.3}",
        teacher_eval.accuracy(),
        student_eval.accuracy()
    );
    assert!(
        teacher_eval.accuracy() > 0.6,
        "teacher {:.3}",
        teacher_eval.accuracy()
    );
    assert!(
        student_eval.accuracy() > 5.0 * chance,
        "student {:.3}",
        student_eval.accuracy()
    );
    assert!(
        student_eval.accuracy() > teacher_eval.accuracy() - 0.1,
        "student {:.3} far below teacher {:.3}",
        student_eval.accuracy(),
        teacher_eval.accuracy()
    );
}

#[test]
fn same_seed_gives_bit_identical_weights_and_another_seed_does_not() {
    let s = splits();
    let spec = MlpSpec::new(32, vec![32], 12).unwrap();
    let cfg = TrainConfig {
        epochs: 2,
        input_dropout: 0.2,
        hidden_dropout: 0.5,
        max_norm: Some(3.0),
        ..TrainConfig::default()
    };
    let bytes = |cfg: &TrainConfig| {
        let m = fit(&spec, &s, Targets::Labels, cfg);
        model_io::mlp_to_bytes(&m, s.train.normalization()).unwrap()
    };
    let a = bytes(&cfg);
    assert_eq!(a, bytes(&cfg));
    assert_ne!(
        a,
        bytes(&TrainConfig {
            seed: 2,
            ..cfg.clone()
        })
    );
}

#[test]
fn transfer_set_for_other_data_is_refused() {
    let dev = Device::Cpu;
    let s = splits();
    let spec = MlpSpec::new(32, vec![8], 12).unwrap();
    let teacher = Mlp::new_random(spec.clone(), &mut seed::rng(1, Stream::Init), &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_transfer_set(&[("t", &teacher)], &s.validation, dir.path(), 100, &dev).unwrap();
    let set = TransferSet::open(dir.path()).unwrap();
    let distill = DistillConfig::default();
    let err = train(
        &teacher,
        &s.train,
        &s.validation,
        Targets::Transfer {
            set: &set,
            distill: &distill,
            keep: None,
        },
        &TrainConfig::default(),
        &dev,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("made for a dataset with fingerprint"), "{err}");
}

#[test]
fn bad_hyperparameters_stop_training_before_it_starts() {
    let dev = Device::Cpu;
    let s = splits();
    let model = Mlp::new_random(
        MlpSpec::new(32, vec![8], 12).unwrap(),
        &mut seed::rng(1, Stream::Init),
        &dev,
    )
    .unwrap();
    let run = |cfg: TrainConfig| {
        train(
            &model,
            &s.train,
            &s.validation,
            Targets::Labels,
            &cfg,
            &dev,
            |_| {},
        )
    };
    let e = run(TrainConfig {
        batch_size: 0,
        ..TrainConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("batch_size"), "{e}");
    let e = run(TrainConfig {
        jitter_pixels: 2,
        ..TrainConfig::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("not an image dataset"), "{e}");
    let wrong = Mlp::new_random(
        MlpSpec::new(10, vec![8], 12).unwrap(),
        &mut seed::rng(1, Stream::Init),
        &dev,
    )
    .unwrap();
    let e = train(
        &wrong,
        &s.train,
        &s.validation,
        Targets::Labels,
        &TrainConfig::default(),
        &dev,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("32 features"), "{e}");
}
