//! The training loop: mini-batch SGD with momentum on hard labels or on the
//! soft targets of a transfer set, with dropout, jitter, max-norm and a
//! warm-up + cosine learning-rate schedule, validating after every epoch.
//!
//! Every random choice comes from streams derived from `TrainConfig::seed`
//! (shuffling, dropout masks, jitter), so the same seed and thread count give
//! bit-identical weights on CPU. A transfer set is read one shard at a time
//! (shards in random order, rows shuffled within a shard), so it may be
//! larger than memory.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::dataset::Dataset;
use common::seed::{self, ChaCha8Rng, Stream};

use crate::checkpoint::{RngPosition, RngPositions, TrainCheckpoint};
use common::transfer::{Shard, TransferSet};
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

use crate::augment::jitter_images;
use crate::eval::evaluate;
use crate::fused::kernels::LossTargets;
use crate::fused::{FusedTrainer, OptimizerSettings};
use crate::hparams::{DistillConfig, EpochSelection, TrainConfig};
use crate::loss::{distillation_loss, hard_cross_entropy};
use crate::model::{Dropout, DropoutMasks, Mlp};
use crate::optim::SgdMomentum;
use crate::schedule::LrSchedule;
use crate::{Error, Result};

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

/// One mini-batch on the host.
struct Batch {
    inputs: Vec<f32>,
    labels: Vec<u32>,
    soft: Option<Vec<f32>>,
}

/// Trains `model` on `train` towards `targets`, validating on `validation`
/// after each epoch; `on_epoch` sees each epoch's statistics. On return the
/// model holds the weights chosen by `cfg.select`.
pub fn train(
    model: &Mlp,
    train: &Dataset,
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
    train: &Dataset,
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
    train: &Dataset,
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
    let steps_per_epoch = match targets {
        Targets::Labels => train.len().div_ceil(cfg.batch_size),
        Targets::Enriched { own, rest, .. } => {
            (own.len() + own.len().min(rest.len())).div_ceil(cfg.batch_size)
        }
        Targets::Transfer { set, .. } => set
            .manifest()
            .shards
            .iter()
            .map(|s| {
                let kept = (s.start..s.start + s.rows)
                    .filter(|&i| targets.keeps(i))
                    .count();
                kept.div_ceil(cfg.batch_size)
            })
            .sum(),
    };
    let schedule = LrSchedule::new(
        cfg.learning_rate,
        cfg.warmup_epochs * steps_per_epoch,
        cfg.epochs * steps_per_epoch,
        cfg.final_lr_fraction,
    )?;
    let mut step = Stepper {
        model,
        engine: match path {
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
        },
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
    let mut shuffle_rng = seed::rng(cfg.seed, Stream::Shuffle);
    let mut report = TrainReport {
        epochs: Vec::with_capacity(cfg.epochs),
        selected_epoch: cfg.epochs,
    };
    let mut best: Option<(usize, Vec<Tensor>)> = None;
    let mut first_epoch = 1;
    if let Some(checkpoint) = resume {
        step.engine.set_velocity(&checkpoint.velocity, device)?;
        shuffle_rng = checkpoint.rngs.shuffle.restore()?;
        step.dropout_rng = checkpoint.rngs.dropout.restore()?;
        step.jitter_rng = checkpoint.rngs.jitter.restore()?;
        step.step = checkpoint.step;
        report.epochs = checkpoint.history;
        best = match checkpoint.best {
            Some((epoch, saved)) => Some((
                epoch,
                saved
                    .iter()
                    .map(|t| t.to_device(device))
                    .collect::<candle_core::Result<_>>()?,
            )),
            None => None,
        };
        first_epoch = checkpoint.epochs_done + 1;
        tracing::info!(
            epochs_done = checkpoint.epochs_done,
            "resuming training from a checkpoint"
        );
    }
    for epoch in first_epoch..=cfg.epochs {
        let started = Instant::now();
        let mut examples_seen = 0usize;
        step.loss.reset();
        let mut shard_wait = Duration::ZERO;
        let mut after_step = |step: &Stepper<'_>, rows: usize| {
            examples_seen += rows;
            observer.on_step(&StepProgress {
                epoch,
                epochs: cfg.epochs,
                step: step.step,
                mean_loss: step.loss.mean(),
                examples_per_second: examples_seen as f64
                    / started.elapsed().as_secs_f64().max(1e-9),
            })
        };
        match targets {
            Targets::Labels => {
                let mut order: Vec<usize> = (0..train.len()).collect();
                order.shuffle(&mut shuffle_rng);
                for chunk in order.chunks(cfg.batch_size) {
                    step.run(gather(train, train.labels(), chunk, None))?;
                    after_step(&step, chunk.len())?;
                }
            }
            Targets::Enriched {
                labels, own, rest, ..
            } => {
                let drawn = own.len().min(rest.len());
                let mut order: Vec<usize> = own.to_vec();
                order.extend(rest.choose_multiple(&mut shuffle_rng, drawn).copied());
                order.shuffle(&mut shuffle_rng);
                for chunk in order.chunks(cfg.batch_size) {
                    step.run(gather(train, labels, chunk, None))?;
                    after_step(&step, chunk.len())?;
                }
            }
            Targets::Transfer { set, distill, .. } => {
                let mut shard_order: Vec<usize> = (0..set.num_shards()).collect();
                shard_order.shuffle(&mut shuffle_rng);
                shard_wait =
                    for_each_prefetched_shard(set, distill, &shard_order, |shard, soft| {
                        let mut rows: Vec<usize> = (0..shard.rows())
                            .filter(|&r| targets.keeps(shard.start() + r))
                            .collect();
                        rows.shuffle(&mut shuffle_rng);
                        for chunk in rows.chunks(cfg.batch_size) {
                            let indices: Vec<usize> =
                                chunk.iter().map(|r| shard.start() + r).collect();
                            step.run(gather(
                                train,
                                train.labels(),
                                &indices,
                                Some((soft, chunk, shard.num_classes())),
                            ))?;
                            after_step(&step, chunk.len())?;
                        }
                        Ok(())
                    })?;
            }
        }
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
        report.epochs.push(stats);
        if cfg.select == EpochSelection::BestValidation
            && best
                .as_ref()
                .is_none_or(|(e, _)| validation_errors <= report.epochs[e - 1].validation_errors)
        {
            let snapshot = model
                .vars()
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?;
            best = Some((epoch, snapshot));
        }
        if epoch < cfg.epochs && observer.checkpoint_due(epoch) {
            observer.on_checkpoint(TrainCheckpoint {
                spec: model.spec().clone(),
                epochs_done: epoch,
                step: step.step,
                params: model
                    .vars()
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?,
                velocity: step.engine.velocity()?,
                rngs: RngPositions {
                    shuffle: RngPosition::of(&shuffle_rng),
                    dropout: RngPosition::of(&step.dropout_rng),
                    jitter: RngPosition::of(&step.jitter_rng),
                },
                history: report.epochs.clone(),
                best: best.clone(),
            })?;
        }
    }
    if let Some((epoch, snapshot)) = best {
        for (var, saved) in model.vars().iter().zip(&snapshot) {
            var.set(saved)?;
        }
        report.selected_epoch = epoch;
    }
    Ok(report)
}

/// What computes the steps, with its optimizer state.
enum Engine {
    Fused(Box<FusedTrainer>),
    Autograd(SgdMomentum),
}

impl Engine {
    /// The momentum buffers, in the order of the model's variables.
    fn velocity(&self) -> Result<Vec<Tensor>> {
        match self {
            Engine::Fused(trainer) => trainer.velocity(),
            Engine::Autograd(optimizer) => Ok(optimizer.velocity().to_vec()),
        }
    }

    /// Replaces the momentum buffers (from a checkpoint).
    fn set_velocity(&mut self, velocity: &[Tensor], device: &Device) -> Result<()> {
        match self {
            Engine::Fused(trainer) => trainer.set_velocity(velocity),
            Engine::Autograd(optimizer) => optimizer.set_velocity(
                velocity
                    .iter()
                    .map(|t| t.to_device(device))
                    .collect::<candle_core::Result<_>>()?,
            ),
        }
    }
}

/// Checks that `checkpoint` can continue training `model` under `cfg`.
fn check_resumable(model: &Mlp, checkpoint: &TrainCheckpoint, cfg: &TrainConfig) -> Result<()> {
    if &checkpoint.spec != model.spec() {
        return Err(Error::invalid(
            "checkpoint",
            format!(
                "it is of a {:?} model, this run trains {:?}",
                checkpoint.spec,
                model.spec()
            ),
        ));
    }
    if checkpoint.epochs_done >= cfg.epochs {
        return Err(Error::invalid(
            "checkpoint",
            format!(
                "it is after epoch {}, this run has {} epochs",
                checkpoint.epochs_done, cfg.epochs
            ),
        ));
    }
    Ok(())
}

/// Calls `f` with each shard of `order` and its soft targets, reading and
/// decoding the next shard on another thread while `f` trains on the
/// current one. At most two shards are in memory at once, however large the
/// transfer set. Returns the time spent waiting for shards.
fn for_each_prefetched_shard(
    set: &TransferSet,
    distill: &DistillConfig,
    order: &[usize],
    mut f: impl FnMut(&Shard, &[f32]) -> Result<()>,
) -> Result<Duration> {
    let members = teacher_indices(set, distill)?;
    let (send, receive) = std::sync::mpsc::sync_channel::<Result<(Shard, Vec<f32>)>>(0);
    std::thread::scope(|scope| {
        let members = &members;
        scope.spawn(move || {
            for &s in order {
                let loaded = set.read_shard(s).map_err(Error::from).and_then(|shard| {
                    let soft =
                        shard.soft_targets_of(members, distill.temperature, distill.combine)?;
                    Ok((shard, soft))
                });
                let failed = loaded.is_err();
                if send.send(loaded).is_err() || failed {
                    // Training stopped early, or this shard is bad: the
                    // receiving side has the error.
                    return;
                }
            }
        });
        // Dropping the receiver on an early return unblocks the reader.
        let mut waited = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let Ok(loaded) = receive.recv() else { break };
            waited += asked.elapsed();
            let (shard, soft) = loaded?;
            f(&shard, &soft)?;
        }
        Ok(waited)
    })
}

/// Positions in `set`'s teacher list of the teachers `distill` learns
/// from: [`DistillConfig::teachers`], or all of them when it is empty.
fn teacher_indices(set: &TransferSet, distill: &DistillConfig) -> Result<Vec<usize>> {
    let stored = &set.manifest().teachers;
    if distill.teachers.is_empty() {
        return Ok((0..stored.len()).collect());
    }
    distill
        .teachers
        .iter()
        .map(|name| {
            stored.iter().position(|t| t == name).ok_or_else(|| {
                Error::invalid(
                    "distill.teachers",
                    format!("{name} is not in the transfer set (it holds {stored:?})"),
                )
            })
        })
        .collect()
}

/// The running mean of an epoch's training loss. The autograd path leaves
/// its losses on the device and reads their sum every [`LOSS_READ_STEPS`]
/// steps, so that a GPU never waits for the host between steps.
#[derive(Debug, Default)]
struct LossMeter {
    sum: f64,
    steps: usize,
    /// Sum of the losses not read yet, on the device.
    unread: Option<Tensor>,
    unread_steps: usize,
    /// What to subtract from the unread sum (see [`EpochStats::mean_loss`]).
    unread_offset: f64,
}

/// Steps between two reads of the losses kept on the device.
const LOSS_READ_STEPS: usize = 50;

impl LossMeter {
    fn reset(&mut self) {
        *self = LossMeter::default();
    }

    /// Counts a loss computed on the host.
    fn add(&mut self, loss: f64) {
        self.sum += loss;
        self.steps += 1;
    }

    /// Counts a loss that is still on the device, less `offset`.
    fn add_on_device(&mut self, loss: &Tensor, offset: f64) -> Result<()> {
        let loss = loss.detach();
        self.unread = Some(match self.unread.take() {
            Some(sum) => (sum + loss)?,
            None => loss,
        });
        self.unread_steps += 1;
        self.unread_offset += offset;
        if self.unread_steps >= LOSS_READ_STEPS {
            self.read()?;
        }
        Ok(())
    }

    /// Brings the losses kept on the device into the mean.
    fn read(&mut self) -> Result<()> {
        if let Some(sum) = self.unread.take() {
            self.sum += f64::from(sum.to_scalar::<f32>()?) - self.unread_offset;
            self.steps += self.unread_steps;
            self.unread_steps = 0;
            self.unread_offset = 0.0;
        }
        Ok(())
    }

    /// The mean of the losses read so far (0 before the first).
    fn mean(&self) -> f64 {
        self.sum / self.steps.max(1) as f64
    }
}

/// The state that one optimisation step needs.
struct Stepper<'a> {
    model: &'a Mlp,
    engine: Engine,
    schedule: LrSchedule,
    cfg: &'a TrainConfig,
    targets: Targets<'a>,
    device: &'a Device,
    dropout_rng: ChaCha8Rng,
    jitter_rng: ChaCha8Rng,
    /// This step's dropout masks (buffers reused from step to step).
    masks: DropoutMasks,
    image_shape: Option<(usize, usize)>,
    step: usize,
    loss: LossMeter,
    lr: f64,
}

impl Stepper<'_> {
    fn run(&mut self, mut batch: Batch) -> Result<()> {
        let spec = self.model.spec();
        let rows = batch.labels.len();
        if let (Some((h, w)), true) = (self.image_shape, self.cfg.jitter_pixels > 0) {
            jitter_images(
                &mut batch.inputs,
                h,
                w,
                self.cfg.jitter_pixels,
                &mut self.jitter_rng,
            );
        }
        let dropout = Dropout {
            input: self.cfg.input_dropout,
            hidden: self.cfg.hidden_dropout,
        };
        let masks = &mut self.masks;
        masks.resample(spec, rows, dropout, &mut self.dropout_rng);
        self.lr = self.schedule.lr(self.step);
        let entropy = match (self.targets, &batch.soft) {
            (Targets::Transfer { distill, .. }, Some(soft)) => {
                distill.temperature * distill.temperature * mean_entropy(soft, spec.num_classes)
            }
            _ => 0.0,
        };
        match &mut self.engine {
            Engine::Fused(trainer) => {
                let targets = match (self.targets, &batch.soft) {
                    (Targets::Transfer { distill, .. }, Some(soft)) => LossTargets::Distill {
                        soft,
                        temperature: distill.temperature as f32,
                        hard_weight: distill.hard_weight as f32,
                        labels: &batch.labels,
                    },
                    _ => LossTargets::Labels(&batch.labels),
                };
                let loss = trainer.step(&batch.inputs, rows, masks, targets, self.lr);
                self.loss.add(loss - entropy);
            }
            Engine::Autograd(optimizer) => {
                let loss = autograd_loss(self.model, &batch, masks, self.targets, self.device)?;
                optimizer.step(&loss.backward()?, self.lr)?;
                if let Some(c) = self.cfg.max_norm {
                    self.model.apply_max_norm(c)?;
                }
                self.loss.add_on_device(&loss, entropy)?;
            }
        }
        self.step += 1;
        Ok(())
    }

    /// Brings the model's variables up to date with the engine's parameters.
    fn write_back(&self) -> Result<()> {
        match &self.engine {
            Engine::Fused(trainer) => trainer.write_back(self.model),
            Engine::Autograd(_) => Ok(()),
        }
    }
}

/// The batch's loss as a candle graph, ready for `backward`.
fn autograd_loss(
    model: &Mlp,
    batch: &Batch,
    masks: &DropoutMasks,
    targets: Targets<'_>,
    device: &Device,
) -> Result<Tensor> {
    let spec = model.spec();
    let rows = batch.labels.len();
    let x = Tensor::from_slice(&batch.inputs, (rows, spec.input_dim), device)?;
    let labels = Tensor::from_slice(&batch.labels, rows, device)?;
    let logits = model.forward_with_masks(&x, &masks.to_tensors(device)?)?;
    match (targets, &batch.soft) {
        (Targets::Transfer { distill, .. }, Some(soft)) => {
            let soft = Tensor::from_slice(soft, (rows, spec.num_classes), device)?;
            distillation_loss(
                &logits,
                &soft,
                &labels,
                distill.temperature,
                distill.hard_weight,
            )
        }
        _ => hard_cross_entropy(&logits, &labels),
    }
}

/// Mean entropy (nats) of the rows of `targets` (`rows x classes`).
fn mean_entropy(targets: &[f32], classes: usize) -> f64 {
    let rows = targets.len() / classes;
    let total: f64 = targets
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -f64::from(p) * f64::from(p).ln())
        .sum();
    total / rows.max(1) as f64
}

/// The host-side batch of the examples at `indices`, with the soft-target
/// rows `soft.1` of the shard's targets `soft.0` when distilling.
fn gather(
    data: &Dataset,
    labels: &[u32],
    indices: &[usize],
    soft: Option<(&[f32], &[usize], usize)>,
) -> Batch {
    let mut inputs = Vec::with_capacity(indices.len() * data.dim());
    for &i in indices {
        inputs.extend_from_slice(data.example(i));
    }
    Batch {
        inputs,
        labels: indices.iter().map(|&i| labels[i]).collect(),
        soft: soft.map(|(targets, rows, classes)| {
            rows.iter()
                .flat_map(|&r| &targets[r * classes..(r + 1) * classes])
                .copied()
                .collect()
        }),
    }
}

fn check_compatible(
    model: &Mlp,
    train: &Dataset,
    validation: &Dataset,
    targets: Targets<'_>,
    cfg: &TrainConfig,
) -> Result<()> {
    let spec = model.spec();
    let train_classes = match targets {
        Targets::Enriched { classes, .. } => classes,
        _ => train.num_classes(),
    };
    for (data, classes) in [
        (train, train_classes),
        (validation, validation.num_classes()),
    ] {
        if data.dim() != spec.input_dim || classes != spec.num_classes {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "{} has {} features and {} classes, the model {} expects {} and {}",
                    data.name(),
                    data.dim(),
                    classes,
                    spec.describe(),
                    spec.input_dim,
                    spec.num_classes
                ),
            ));
        }
    }
    if train.is_empty() || validation.is_empty() {
        return Err(Error::invalid(
            "dataset",
            "training and validation sets must not be empty",
        ));
    }
    if cfg.jitter_pixels > 0 && train.image_shape().is_none() {
        return Err(Error::invalid(
            "jitter_pixels",
            format!(
                "{} is not an image dataset; set jitter_pixels = 0",
                train.name()
            ),
        ));
    }
    if let Targets::Enriched {
        labels,
        classes,
        own,
        rest,
    } = targets
    {
        if labels.len() != train.len() || labels.iter().any(|&l| l as usize >= classes) {
            return Err(Error::invalid(
                "specialist labels",
                format!(
                    "need one label below {classes} for each of the {} training examples",
                    train.len()
                ),
            ));
        }
        if own.is_empty() || own.iter().chain(rest).any(|&i| i >= train.len()) {
            return Err(Error::invalid(
                "specialist examples",
                format!(
                    "need at least one example of its own classes, all below {}",
                    train.len()
                ),
            ));
        }
    }
    if let Targets::Transfer { set, distill, keep } = targets {
        distill.validate()?;
        set.check_dataset(train)?;
        teacher_indices(set, distill)?;
        if keep.is_some_and(|k| k.len() != train.len()) {
            return Err(Error::invalid(
                "example subset",
                format!(
                    "selects from {} examples, the training split has {}",
                    keep.map_or(0, <[bool]>::len),
                    train.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MlpSpec;
    use common::dataset::synthetic::SyntheticSpec;

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
                Mlp::new_random(spec.clone(), &mut seed::rng(1, Stream::Init), &Device::Cpu)
                    .unwrap();
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
                    crate::model_io::to_bytes(&model, common::dataset::Normalization::Identity)
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
            spec,
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
        assert!(err.to_string().contains("model"), "{err}");
        let err = check_resumable(&model, &checkpoint(model.spec().clone(), 3), &cfg).unwrap_err();
        assert!(err.to_string().contains("after epoch 3"), "{err}");
    }

    #[test]
    fn entropy_of_uniform_and_one_hot_rows() {
        let rows = [0.25f32, 0.25, 0.25, 0.25, 1.0, 0.0, 0.0, 0.0];
        assert!((mean_entropy(&rows, 4) - 4f64.ln() / 2.0).abs() < 1e-7);
    }
}
