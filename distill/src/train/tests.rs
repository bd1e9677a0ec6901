use super::*;
use crate::model::MlpSpec;
use common::dataset::shard::{ShardedSplit, Split};
use common::dataset::synthetic::SyntheticSpec;

/// A run that keeps quiet.
struct Silent;
impl TrainObserver for Silent {}

/// Trains a fresh [32] MLP on `train` for 3 epochs; returns its weights.
fn weights_after_training(train: &dyn Examples, validation: &Dataset, window: usize) -> Vec<f32> {
    let spec = MlpSpec::new(train.dim(), vec![32], train.num_classes()).unwrap();
    let model = Mlp::new_random(spec, &mut seed::rng(1, Stream::Init), &Device::Cpu).unwrap();
    let cfg = TrainConfig {
        epochs: 3,
        batch_size: 32,
        shuffle_window_shards: window,
        ..TrainConfig::default()
    };
    train_observed(
        &model,
        train,
        validation,
        Targets::Labels,
        &cfg,
        &Device::Cpu,
        &mut Silent,
    )
    .unwrap();
    model
        .vars()
        .iter()
        .flat_map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// A split of one shard read from a file trains exactly as the same
/// examples in memory: a full shuffle, bit for bit.
#[test]
fn one_shard_on_disk_trains_bit_for_bit_as_in_memory() {
    let (train_set, validation) = SyntheticSpec {
        train_size: 600,
        test_size: 200,
        ..SyntheticSpec::default()
    }
    .generate()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let one = ShardedSplit::write(&train_set, Split::Train, 1000, dir.path()).unwrap();
    assert_eq!(one.shard_ranges().len(), 1);
    let in_memory = weights_after_training(&train_set, &validation, 4);
    assert_eq!(weights_after_training(&one, &validation, 4), in_memory);
    let dir = tempfile::tempdir().unwrap();
    let many = ShardedSplit::write(&train_set, Split::Train, 100, dir.path()).unwrap();
    let windowed = weights_after_training(&many, &validation, 2);
    assert_eq!(
        weights_after_training(&many, &validation, 2),
        windowed,
        "reproducible"
    );
    assert_ne!(
        windowed, in_memory,
        "windows of 2 of 6 shards are not a full shuffle"
    );
}

/// Every epoch visits each shard once, in an order that changes from
/// epoch to epoch, and plans one partial batch per window.
#[test]
fn epochs_visit_every_shard_once_in_windows() {
    let (train_set, _) = SyntheticSpec {
        train_size: 1000,
        test_size: 10,
        ..SyntheticSpec::default()
    }
    .generate()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let split = ShardedSplit::write(&train_set, Split::Train, 150, dir.path()).unwrap();
    let cfg = TrainConfig {
        batch_size: 64,
        shuffle_window_shards: 3,
        ..TrainConfig::default()
    };
    let plan = EpochPlan::new(&split, Targets::Labels, &cfg);
    let mut orders = Vec::new();
    for epoch in 1..=3 {
        let windows = plan.windows(epoch);
        assert_eq!(windows.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
        let mut all: Vec<usize> = windows.concat();
        orders.push(all.clone());
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        let expected: usize = windows
            .iter()
            .map(|w| {
                w.iter()
                    .map(|&s| plan.ranges[s].len())
                    .sum::<usize>()
                    .div_ceil(64)
            })
            .sum();
        assert_eq!(plan.steps(epoch), expected);
    }
    assert!(
        orders[0] != orders[1] || orders[1] != orders[2],
        "{orders:?}"
    );
    let labels: Vec<u32> = train_set.labels().to_vec();
    let window = plan.windows(1)[0].clone();
    let local = plan.window_labels(&window, &labels);
    let expected: Vec<u32> = window
        .iter()
        .flat_map(|&s| labels[plan.ranges[s].clone()].to_vec())
        .collect();
    assert_eq!(&*local, expected.as_slice());
}

/// A learning rate far too large blows the weights up; training stops
/// with an error that says so instead of returning NaN weights.
#[test]
fn a_diverging_run_fails_with_a_clear_error() {
    let data = SyntheticSpec {
        train_size: 500,
        test_size: 100,
        ..SyntheticSpec::default()
    };
    let (train_set, validation) = data.generate().unwrap();
    let spec = MlpSpec::new(train_set.dim(), vec![32], train_set.num_classes()).unwrap();
    for path in [StepPath::Fused, StepPath::Autograd] {
        let model =
            Mlp::new_random(spec.clone(), &mut seed::rng(1, Stream::Init), &Device::Cpu).unwrap();
        let cfg = TrainConfig {
            epochs: 3,
            learning_rate: 1e6,
            warmup_epochs: 0,
            ..TrainConfig::default()
        };
        struct Quiet;
        impl TrainObserver for Quiet {}
        let err = train_on_path(
            &model,
            &train_set,
            &validation,
            Targets::Labels,
            &cfg,
            &Device::Cpu,
            &mut Quiet,
            path,
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::Diverged { epoch: 1, .. }),
            "{path:?}: {err}"
        );
        assert!(err.to_string().contains("lower the learning rate"), "{err}");
    }
}

/// The fused path and the autograd path, trained for a few epochs from
/// the same seed on the same data with dropout and max-norm, end within
/// a couple of test errors of each other (they differ by float rounding
/// only, which grows over thousands of updates).
#[test]
fn fused_and_autograd_training_end_within_a_couple_of_test_errors() {
    let data = SyntheticSpec {
        train_size: 2000,
        test_size: 2000,
        ..SyntheticSpec::default()
    };
    let (train_set, test) = data.generate().unwrap();
    let spec = MlpSpec::new(train_set.dim(), vec![64, 64], train_set.num_classes()).unwrap();
    let cfg = TrainConfig {
        epochs: 4,
        warmup_epochs: 1,
        input_dropout: 0.1,
        hidden_dropout: 0.3,
        max_norm: Some(3.0),
        select: EpochSelection::Last,
        ..TrainConfig::default()
    };
    let device = Device::Cpu;
    let errors = [StepPath::Fused, StepPath::Autograd].map(|path| {
        let model = Mlp::new_random(
            spec.clone(),
            &mut seed::rng(cfg.seed, Stream::Init),
            &device,
        )
        .unwrap();
        let mut observer = EpochCallback(|_: &EpochStats| {});
        let report = train_on_path(
            &model,
            &train_set,
            &test,
            Targets::Labels,
            &cfg,
            &device,
            &mut observer,
            path,
        )
        .unwrap();
        (
            evaluate(&model, &test, &device).unwrap().errors,
            report.epochs[0].mean_loss,
        )
    });
    // The autograd path reads its losses from the device in batches;
    // the epoch's mean must come out the same.
    let (loss_fused, loss_autograd) = (errors[0].1, errors[1].1);
    assert!(
        (loss_fused - loss_autograd).abs() <= 1e-4 * loss_autograd,
        "first epoch's mean loss: fused {loss_fused} vs autograd {loss_autograd}"
    );
    let errors = errors.map(|(e, _)| e);
    assert!(
        errors[0].abs_diff(errors[1]) <= 2,
        "fused {} vs autograd {} test errors",
        errors[0],
        errors[1]
    );
    // And both learnt: 12 classes, chance would make about 1830 errors.
    assert!(errors[0] < 1000, "{errors:?}");
}

/// Makes a checkpoint after every epoch (through its bytes, as a worker
/// would), stops the run after `stop_after` epochs, and resumes from
/// `resume` when given one.
struct Checkpointing {
    resume: Option<TrainCheckpoint>,
    stop_after: Option<usize>,
    last: Option<TrainCheckpoint>,
}

impl TrainObserver for Checkpointing {
    fn take_checkpoint(&mut self) -> Option<TrainCheckpoint> {
        self.resume.take()
    }
    fn checkpoint_due(&mut self, _: usize) -> bool {
        true
    }
    fn on_checkpoint(&mut self, checkpoint: TrainCheckpoint) -> Result<()> {
        let bytes = checkpoint.to_bytes()?;
        let done = checkpoint.epochs_done;
        self.last = Some(TrainCheckpoint::from_bytes(&bytes, &Device::Cpu)?);
        if self.stop_after == Some(done) {
            return Err(Error::Cancelled(format!("stopped after epoch {done}")));
        }
        Ok(())
    }
}

/// A run stopped after epoch 2 and resumed from its checkpoint ends with
/// the same bits as an uninterrupted run, on both step paths, with
/// dropout, momentum, a warm-up schedule and the best epoch kept.
#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    let data = SyntheticSpec {
        train_size: 600,
        test_size: 200,
        ..SyntheticSpec::default()
    };
    let (train_set, validation) = data.generate().unwrap();
    let spec = MlpSpec::new(train_set.dim(), vec![32, 16], train_set.num_classes()).unwrap();
    let cfg = TrainConfig {
        epochs: 5,
        batch_size: 50,
        warmup_epochs: 1,
        input_dropout: 0.1,
        hidden_dropout: 0.3,
        max_norm: Some(3.0),
        select: EpochSelection::BestValidation,
        ..TrainConfig::default()
    };
    let device = Device::Cpu;
    for path in [StepPath::Fused, StepPath::Autograd] {
        let run = |observer: &mut Checkpointing, init_seed: u64| {
            let model = Mlp::new_random(
                spec.clone(),
                &mut seed::rng(init_seed, Stream::Init),
                &device,
            )
            .unwrap();
            let result = train_on_path(
                &model,
                &train_set,
                &validation,
                Targets::Labels,
                &cfg,
                &device,
                observer,
                path,
            );
            let bytes =
                crate::model_io::mlp_to_bytes(&model, common::dataset::Normalization::Identity)
                    .unwrap();
            (result, bytes)
        };
        let mut whole = Checkpointing {
            resume: None,
            stop_after: None,
            last: None,
        };
        let (report, expected) = run(&mut whole, 1);
        let report = report.unwrap();

        let mut first = Checkpointing {
            resume: None,
            stop_after: Some(2),
            last: None,
        };
        let (stopped, _) = run(&mut first, 1);
        assert!(matches!(stopped, Err(Error::Cancelled(_))), "{path:?}");
        let checkpoint = first.last.take().unwrap();
        assert_eq!(checkpoint.epochs_done, 2);
        // Another initialisation: the checkpoint's weights must win.
        let mut second = Checkpointing {
            resume: Some(checkpoint),
            stop_after: None,
            last: None,
        };
        let (resumed, got) = run(&mut second, 99);
        let resumed = resumed.unwrap();
        assert!(got == expected, "{path:?}: the resumed model differs");
        assert_eq!(resumed.selected_epoch, report.selected_epoch);
        let losses = |r: &TrainReport| -> Vec<u64> {
            r.epochs.iter().map(|e| e.mean_loss.to_bits()).collect()
        };
        assert_eq!(losses(&resumed), losses(&report), "{path:?}");
    }
}

#[test]
fn a_checkpoint_of_another_model_or_past_the_end_is_refused() {
    let spec = MlpSpec::new(4, vec![8], 3).unwrap();
    let model = Mlp::new_random(spec, &mut seed::rng(1, Stream::Init), &Device::Cpu).unwrap();
    let other = MlpSpec::new(4, vec![9], 3).unwrap();
    let rng = seed::rng(1, Stream::Shuffle);
    let checkpoint = |spec: MlpSpec, epochs_done: usize| TrainCheckpoint {
        architecture: crate::model::Architecture::Mlp(spec),
        epochs_done,
        step: 0,
        params: Vec::new(),
        velocity: Vec::new(),
        rngs: RngPositions {
            shuffle: RngPosition::of(&rng),
            dropout: RngPosition::of(&rng),
            jitter: RngPosition::of(&rng),
        },
        history: Vec::new(),
        best: None,
    };
    let cfg = TrainConfig {
        epochs: 3,
        ..TrainConfig::default()
    };
    let err = check_resumable(&model, &checkpoint(other, 1), &cfg).unwrap_err();
    assert!(err.to_string().contains("4-9-3"), "{err}");
    let err = check_resumable(&model, &checkpoint(model.spec().clone(), 3), &cfg).unwrap_err();
    assert!(err.to_string().contains("after epoch 3"), "{err}");
}
