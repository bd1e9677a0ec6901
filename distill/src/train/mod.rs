//! The training loop: mini-batch SGD with momentum on hard labels or on the
//! soft targets of a transfer set, with dropout, jitter, max-norm and a
//! warm-up + cosine learning-rate schedule, validating after every epoch.
//!
//! Every random choice comes from streams derived from `TrainConfig::seed`
//! (shuffling, dropout masks, jitter), so the same seed and thread count give
//! bit-identical weights on CPU. A transfer set is read one shard at a time
//! (shards in random order, rows shuffled within a shard), so it may be
//! larger than memory.

mod checks;
mod shards;
mod stepper;

use std::borrow::Cow;
use std::ops::Range;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::dataset::examples::Examples;
use common::dataset::Dataset;
use common::seed::{self, ChaCha8Rng, Stream};
use common::transfer::TransferSet;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{RngPosition, RngPositions, TrainCheckpoint};
use crate::eval::evaluate;
use crate::fused::{FusedTrainer, OptimizerSettings};
use crate::hparams::{DistillConfig, EpochSelection, TrainConfig};
use crate::model::{Architecture, DropoutMasks, Mlp};
use crate::optim::SgdMomentum;
use crate::schedule::LrSchedule;
use crate::{Error, Result};
use checks::{check_compatible, check_resumable};
use shards::for_each_prefetched_shard;
use stepper::{gather, Engine, LossMeter, Stepper};

/// What the model learns to predict.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// The training set's labels.
    Labels,
    /// The soft targets of a transfer set made for the training set.
    Transfer {
        /// The transfer set (its dataset fingerprint must match).
        set: &'a TransferSet,
        /// Temperature, hard-label weight, ensemble combination.
        distill: &'a DistillConfig,
        /// `keep[i]`: whether training example `i` is learnt from (all when
        /// `None`); see [`crate::subset::ExampleSubset::mask`].
        keep: Option<&'a [bool]>,
    },
    /// A specialist's enriched stream (paper, section 5): every epoch, all
    /// of `own` plus as many examples drawn afresh from `rest` (fewer when
    /// `rest` is smaller), shuffled, learnt with `labels` instead of the
    /// training set's own.
    Enriched {
        /// The label of every training example (`classes` of them).
        labels: &'a [u32],
        /// Number of classes of `labels` (the model's outputs).
        classes: usize,
        /// Examples of the specialist's own classes.
        own: &'a [usize],
        /// Every other example (its dustbin class).
        rest: &'a [usize],
    },
}

impl Targets<'_> {
    /// Whether training example `i` is learnt from.
    fn keeps(&self, i: usize) -> bool {
        match self {
            Targets::Transfer {
                keep: Some(keep), ..
            } => keep[i],
            _ => true,
        }
    }
}

/// What happened in one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches. When distilling, the
    /// soft term is reported as T^2 * KL(targets || student), i.e. without
    /// the targets' constant entropy, so that it falls to 0 as the student
    /// matches the teachers (the gradients are the same).
    pub mean_loss: f64,
    /// Errors on the validation split after the epoch.
    pub validation_errors: usize,
    /// Learning rate of the epoch's last step.
    pub learning_rate: f64,
    /// Wall-clock seconds of the epoch's training steps (without validation).
    pub seconds: f64,
    /// Training examples per second.
    pub examples_per_second: f64,
    /// Seconds of [`EpochStats::seconds`] spent waiting for the transfer
    /// set's next shard (read and decoded on another thread while training
    /// runs; 0 when training on labels). The first shard of an epoch is
    /// always waited for.
    #[serde(default)]
    pub shard_wait_seconds: f64,
}

/// The history of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// One entry per epoch.
    pub epochs: Vec<EpochStats>,
    /// The epoch whose weights the model holds at the end (1-based).
    pub selected_epoch: usize,
}

impl TrainReport {
    /// Mean seconds per epoch of training steps.
    pub fn seconds_per_epoch(&self) -> f64 {
        self.epochs.iter().map(|e| e.seconds).sum::<f64>() / self.epochs.len().max(1) as f64
    }
}

/// Where a training run is, after one optimisation step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepProgress {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Epochs configured.
    pub epochs: usize,
    /// Steps done since the start of training.
    pub step: usize,
    /// Mean loss of the current epoch's steps so far (reported as in
    /// [`EpochStats::mean_loss`]).
    pub mean_loss: f64,
    /// Examples per second in the current epoch so far.
    pub examples_per_second: f64,
}

/// Watches a training run. Returning an error from either method stops
/// training after the current step and makes [`train_observed`] return it
/// (this is how a worker abandons a task whose lease it lost).
pub trait TrainObserver {
    /// Called after every optimisation step.
    fn on_step(&mut self, _progress: &StepProgress) -> Result<()> {
        Ok(())
    }
    /// Called after every epoch's validation.
    fn on_epoch(&mut self, _stats: &EpochStats) -> Result<()> {
        Ok(())
    }
    /// Called once before training: a checkpoint of this same run (same
    /// model, data and config) to go on from instead of starting afresh.
    fn take_checkpoint(&mut self) -> Option<TrainCheckpoint> {
        None
    }
    /// Called after every epoch but the last: whether to make a checkpoint
    /// of the run as it stands (handed to [`TrainObserver::on_checkpoint`]).
    fn checkpoint_due(&mut self, _epochs_done: usize) -> bool {
        false
    }
    /// Receives the checkpoint asked for by [`TrainObserver::checkpoint_due`].
    fn on_checkpoint(&mut self, _checkpoint: TrainCheckpoint) -> Result<()> {
        Ok(())
    }
}

/// A [`TrainObserver`] that hands each epoch's statistics to a closure.
struct EpochCallback<F>(F);

impl<F: FnMut(&EpochStats)> TrainObserver for EpochCallback<F> {
    fn on_epoch(&mut self, stats: &EpochStats) -> Result<()> {
        (self.0)(stats);
        Ok(())
    }
}

/// Trains `model` on `train` towards `targets`, validating on `validation`
/// after each epoch; `on_epoch` sees each epoch's statistics. On return the
/// model holds the weights chosen by `cfg.select`.
pub fn train(
    model: &Mlp,
    train: &dyn Examples,
    validation: &Dataset,
    targets: Targets<'_>,
    cfg: &TrainConfig,
    device: &Device,
    on_epoch: impl FnMut(&EpochStats),
) -> Result<TrainReport> {
    let mut observer = EpochCallback(on_epoch);
    train_observed(
        model,
        train,
        validation,
        targets,
        cfg,
        device,
        &mut observer,
    )
}

/// [`train`] with an observer that sees every step and every epoch and may
/// stop the run.
pub fn train_observed(
    model: &Mlp,
    train: &dyn Examples,
    validation: &Dataset,
    targets: Targets<'_>,
    cfg: &TrainConfig,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TrainReport> {
    let path = StepPath::for_device(device);
    train_on_path(
        model, train, validation, targets, cfg, device, observer, path,
    )
}

/// How an optimisation step is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StepPath {
    /// [`FusedTrainer`]: hand-written backpropagation on CPU.
    Fused,
    /// candle's autograd and tensor operations, on any device.
    Autograd,
}

impl StepPath {
    /// The fast path for `device`: fused on CPU, autograd elsewhere.
    pub(crate) fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            StepPath::Fused
        } else {
            StepPath::Autograd
        }
    }
}

/// [`train_observed`] with the step computed by `path`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_on_path(
    model: &Mlp,
    train: &dyn Examples,
    validation: &Dataset,
    targets: Targets<'_>,
    cfg: &TrainConfig,
    device: &Device,
    observer: &mut dyn TrainObserver,
    path: StepPath,
) -> Result<TrainReport> {
    cfg.validate()?;
    check_compatible(model, train, validation, targets, cfg)?;
    let resume = observer.take_checkpoint();
    if let Some(checkpoint) = &resume {
        check_resumable(model, checkpoint, cfg)?;
        for (var, saved) in model.vars().iter().zip(&checkpoint.params) {
            var.set(&saved.to_device(device)?)?;
        }
    }
    let plan = EpochPlan::new(train, targets, cfg);
    let epoch_steps: Vec<usize> = (1..=cfg.epochs).map(|e| plan.steps(e)).collect();
    let schedule = LrSchedule::new(
        cfg.learning_rate,
        epoch_steps[..cfg.warmup_epochs].iter().sum(),
        epoch_steps.iter().sum(),
        cfg.final_lr_fraction,
    )?;
    let mut step = Stepper {
        model,
        engine: engine(model, cfg, path)?,
        schedule,
        cfg,
        targets,
        device,
        dropout_rng: seed::rng(cfg.seed, Stream::Dropout),
        jitter_rng: seed::rng(cfg.seed, Stream::Jitter),
        masks: DropoutMasks::default(),
        image_shape: train.image_shape(),
        step: 0,
        loss: LossMeter::default(),
        lr: 0.0,
    };
    let mut run = match resume {
        Some(checkpoint) => Run::resumed(checkpoint, &mut step, device)?,
        None => Run::fresh(cfg),
    };
    for epoch in run.first_epoch..=cfg.epochs {
        let started = Instant::now();
        step.loss.reset();
        let (examples_seen, shard_wait) = run_epoch(
            epoch,
            &mut step,
            &plan,
            &mut run.shuffle_rng,
            observer,
            started,
        )?;
        step.loss.read()?;
        if !step.loss.mean().is_finite() {
            return Err(Error::Diverged {
                epoch,
                loss: step.loss.mean(),
            });
        }
        let seconds = started.elapsed().as_secs_f64();
        step.write_back()?;
        let validation_errors = evaluate(model, validation, device)?.errors;
        let stats = EpochStats {
            epoch,
            mean_loss: step.loss.mean(),
            validation_errors,
            learning_rate: step.lr,
            seconds,
            examples_per_second: examples_seen as f64 / seconds,
            shard_wait_seconds: shard_wait.as_secs_f64(),
        };
        tracing::info!(
            epoch,
            loss = stats.mean_loss,
            validation_errors,
            seconds,
            "epoch done"
        );
        observer.on_epoch(&stats)?;
        run.report.epochs.push(stats);
        if cfg.select == EpochSelection::BestValidation {
            run.keep_if_best(epoch, model)?;
        }
        if epoch < cfg.epochs && observer.checkpoint_due(epoch) {
            observer.on_checkpoint(run.checkpoint(epoch, &step)?)?;
        }
    }
    let mut report = run.report;
    if let Some((epoch, snapshot)) = run.best {
        for (var, saved) in model.vars().iter().zip(&snapshot) {
            var.set(saved)?;
        }
        report.selected_epoch = epoch;
    }
    Ok(report)
}

/// How an epoch goes through the training split: its shards in an order
/// drawn afresh each epoch (from the seed and the epoch alone, so a resumed
/// run draws the same), [`TrainConfig::shuffle_window_shards`] at a time,
/// the examples of a window shuffled together. A split of one shard (any
/// dataset in memory) is shuffled whole, as if there were no shards.
struct EpochPlan<'a> {
    train: &'a dyn Examples,
    targets: Targets<'a>,
    cfg: &'a TrainConfig,
    ranges: Vec<Range<usize>>,
    /// For a specialist: its own examples and the others, by shard.
    enriched: Option<(ByShard, ByShard)>,
}

impl<'a> EpochPlan<'a> {
    fn new(train: &'a dyn Examples, targets: Targets<'a>, cfg: &'a TrainConfig) -> Self {
        let ranges = train.shard_ranges();
        let enriched = match targets {
            Targets::Enriched { own, rest, .. } => {
                Some((by_shard(own, &ranges), by_shard(rest, &ranges)))
            }
            _ => None,
        };
        EpochPlan {
            train,
            targets,
            cfg,
            ranges,
            enriched,
        }
    }

    /// The windows of `epoch`: groups of shard indices.
    fn windows(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.ranges.len()).collect();
        let epoch_seed = self.cfg.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        order.shuffle(&mut seed::rng(epoch_seed, Stream::ShardOrder));
        order
            .chunks(self.cfg.shuffle_window_shards)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Optimisation steps in `epoch` (each window ends with its own partial
    /// batch; a transfer set's shards are the windows when distilling).
    fn steps(&self, epoch: usize) -> usize {
        let batch = self.cfg.batch_size;
        match (self.targets, &self.enriched) {
            (Targets::Transfer { set, .. }, _) => set
                .manifest()
                .shards
                .iter()
                .map(|s| {
                    let kept = (s.start..s.start + s.rows)
                        .filter(|&i| self.targets.keeps(i))
                        .count();
                    kept.div_ceil(batch)
                })
                .sum(),
            (_, Some((own, rest))) => self
                .windows(epoch)
                .iter()
                .map(|w| {
                    let own: usize = w.iter().map(|&s| own[s].len()).sum();
                    let rest: usize = w.iter().map(|&s| rest[s].len()).sum();
                    (own + own.min(rest)).div_ceil(batch)
                })
                .sum(),
            _ => self
                .windows(epoch)
                .iter()
                .map(|w| {
                    w.iter()
                        .map(|&s| self.ranges[s].len())
                        .sum::<usize>()
                        .div_ceil(batch)
                })
                .sum(),
        }
    }

    /// `indices` (of the split) that fall in `window`'s shards, as indices
    /// into the window's examples (its shards one after the other).
    fn local(&self, window: &[usize], by_shard: &[Vec<usize>]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut base = 0;
        for &s in window {
            let start = self.ranges[s].start;
            out.extend(by_shard[s].iter().map(|&i| base + i - start));
            base += self.ranges[s].len();
        }
        out
    }

    /// `labels` (one per example of the split) of `window`'s examples.
    fn window_labels<'l>(&self, window: &[usize], labels: &'l [u32]) -> Cow<'l, [u32]> {
        match window {
            [only] if self.ranges[*only] == (0..labels.len()) => Cow::Borrowed(labels),
            _ => Cow::Owned(
                window
                    .iter()
                    .flat_map(|&s| labels[self.ranges[s].clone()].iter().copied())
                    .collect(),
            ),
        }
    }
}

/// Example indices of a split, one list per shard.
type ByShard = Vec<Vec<usize>>;

/// `indices` (ascending or not) grouped by the shard of `ranges` holding
/// each, keeping their order.
fn by_shard(indices: &[usize], ranges: &[Range<usize>]) -> ByShard {
    let mut out = vec![Vec::new(); ranges.len()];
    for &i in indices {
        let s = ranges.partition_point(|r| r.end <= i);
        if let Some(bucket) = out.get_mut(s) {
            bucket.push(i);
        }
    }
    out
}

/// What computes the steps on `path`, with a fresh optimizer.
fn engine(model: &Mlp, cfg: &TrainConfig, path: StepPath) -> Result<Engine> {
    Ok(match path {
        StepPath::Fused => Engine::Fused(Box::new(FusedTrainer::new(
            model,
            cfg.batch_size,
            OptimizerSettings {
                momentum: cfg.momentum,
                weight_decay: cfg.weight_decay,
                nesterov: cfg.nesterov,
                max_norm: cfg.max_norm,
            },
        )?)),
        StepPath::Autograd => Engine::Autograd(SgdMomentum::new(
            model.vars(),
            cfg.momentum,
            cfg.weight_decay,
            cfg.nesterov,
        )?),
    })
}

/// One epoch's steps, in the order its targets say, each reported to
/// `observer`; returns the examples seen and the time spent waiting for
/// transfer-set shards.
fn run_epoch(
    epoch: usize,
    step: &mut Stepper<'_>,
    plan: &EpochPlan<'_>,
    shuffle_rng: &mut ChaCha8Rng,
    observer: &mut dyn TrainObserver,
    started: Instant,
) -> Result<(usize, Duration)> {
    let (cfg, targets, train) = (step.cfg, step.targets, plan.train);
    let mut examples_seen = 0usize;
    let mut shard_wait = Duration::ZERO;
    let mut after_step = |step: &Stepper<'_>, rows: usize| {
        examples_seen += rows;
        observer.on_step(&StepProgress {
            epoch,
            epochs: cfg.epochs,
            step: step.step,
            mean_loss: step.loss.mean(),
            examples_per_second: examples_seen as f64 / started.elapsed().as_secs_f64().max(1e-9),
        })
    };
    match targets {
        Targets::Labels => {
            for window in plan.windows(epoch) {
                let data = train.load_shards(&window)?;
                let mut order: Vec<usize> = (0..data.len()).collect();
                order.shuffle(shuffle_rng);
                for chunk in order.chunks(cfg.batch_size) {
                    step.run(gather(&data, data.labels(), chunk, None))?;
                    after_step(step, chunk.len())?;
                }
            }
        }
        Targets::Enriched { labels, .. } => {
            let (own, rest) = plan.enriched.as_ref().expect("planned for a specialist");
            for window in plan.windows(epoch) {
                let own = plan.local(&window, own);
                let rest = plan.local(&window, rest);
                let drawn = own.len().min(rest.len());
                let mut order = own;
                order.extend(rest.choose_multiple(shuffle_rng, drawn).copied());
                order.shuffle(shuffle_rng);
                let data = train.load_shards(&window)?;
                let labels = plan.window_labels(&window, labels);
                for chunk in order.chunks(cfg.batch_size) {
                    step.run(gather(&data, &labels, chunk, None))?;
                    after_step(step, chunk.len())?;
                }
            }
        }
        Targets::Transfer { set, distill, .. } => {
            let mut shard_order: Vec<usize> = (0..set.num_shards()).collect();
            shard_order.shuffle(shuffle_rng);
            shard_wait = for_each_prefetched_shard(set, distill, &shard_order, |shard, soft| {
                let (data, offset) =
                    train.load_range(shard.start()..shard.start() + shard.rows())?;
                let mut rows: Vec<usize> = (0..shard.rows())
                    .filter(|&r| targets.keeps(shard.start() + r))
                    .collect();
                rows.shuffle(shuffle_rng);
                for chunk in rows.chunks(cfg.batch_size) {
                    let indices: Vec<usize> =
                        chunk.iter().map(|r| shard.start() + r - offset).collect();
                    step.run(gather(
                        &data,
                        data.labels(),
                        &indices,
                        Some((soft, chunk, shard.num_classes())),
                    ))?;
                    after_step(step, chunk.len())?;
                }
                Ok(())
            })?;
        }
    }
    Ok((examples_seen, shard_wait))
}

/// A run's state besides the step: the shuffling stream, the history, the
/// best weights so far and where it starts.
struct Run {
    shuffle_rng: ChaCha8Rng,
    report: TrainReport,
    best: Option<(usize, Vec<Tensor>)>,
    first_epoch: usize,
}

impl Run {
    /// A run from the first epoch.
    fn fresh(cfg: &TrainConfig) -> Self {
        Run {
            shuffle_rng: seed::rng(cfg.seed, Stream::Shuffle),
            report: TrainReport {
                epochs: Vec::with_capacity(cfg.epochs),
                selected_epoch: cfg.epochs,
            },
            best: None,
            first_epoch: 1,
        }
    }

    /// The run `checkpoint` was made of, going on after its last epoch
    /// (`step` takes up its optimizer and random streams).
    fn resumed(
        checkpoint: TrainCheckpoint,
        step: &mut Stepper<'_>,
        device: &Device,
    ) -> Result<Self> {
        step.engine.set_velocity(&checkpoint.velocity, device)?;
        step.dropout_rng = checkpoint.rngs.dropout.restore()?;
        step.jitter_rng = checkpoint.rngs.jitter.restore()?;
        step.step = checkpoint.step;
        let best = match checkpoint.best {
            Some((epoch, saved)) => Some((
                epoch,
                saved
                    .iter()
                    .map(|t| t.to_device(device))
                    .collect::<candle_core::Result<_>>()?,
            )),
            None => None,
        };
        tracing::info!(
            epochs_done = checkpoint.epochs_done,
            "resuming training from a checkpoint"
        );
        Ok(Run {
            shuffle_rng: checkpoint.rngs.shuffle.restore()?,
            report: TrainReport {
                epochs: checkpoint.history,
                selected_epoch: step.cfg.epochs,
            },
            best,
            first_epoch: checkpoint.epochs_done + 1,
        })
    }

    /// Keeps `model`'s weights as the best if `epoch` (just pushed to the
    /// history) has no more validation errors than the best so far.
    fn keep_if_best(&mut self, epoch: usize, model: &Mlp) -> Result<()> {
        let errors = |e: usize| self.report.epochs[e - 1].validation_errors;
        if self
            .best
            .as_ref()
            .is_none_or(|(b, _)| errors(epoch) <= errors(*b))
        {
            let snapshot = model
                .vars()
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            self.best = Some((epoch, snapshot));
        }
        Ok(())
    }

    /// A checkpoint of the run after `epoch`.
    fn checkpoint(&self, epoch: usize, step: &Stepper<'_>) -> Result<TrainCheckpoint> {
        Ok(TrainCheckpoint {
            architecture: Architecture::Mlp(step.model.spec().clone()),
            epochs_done: epoch,
            step: step.step,
            params: step
                .model
                .vars()
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            velocity: step.engine.velocity()?,
            rngs: RngPositions {
                shuffle: RngPosition::of(&self.shuffle_rng),
                dropout: RngPosition::of(&step.dropout_rng),
                jitter: RngPosition::of(&step.jitter_rng),
            },
            history: self.report.epochs.clone(),
            best: self.best.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
