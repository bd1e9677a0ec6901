//! One optimisation step: jitter, dropout masks, the loss (fused on CPU or
//! through candle's autograd) and the update, with the running loss.

use candle_core::{Device, Tensor};
use common::dataset::Dataset;
use common::seed::ChaCha8Rng;

use super::Targets;
use crate::augment::jitter_images;
use crate::fused::kernels::LossTargets;
use crate::fused::FusedTrainer;
use crate::hparams::TrainConfig;
use crate::loss::{distillation_loss, hard_cross_entropy};
use crate::model::{Dropout, DropoutMasks, Mlp};
use crate::optim::SgdMomentum;
use crate::schedule::LrSchedule;
use crate::Result;

/// One mini-batch on the host.
pub(super) struct Batch {
    inputs: Vec<f32>,
    labels: Vec<u32>,
    soft: Option<Vec<f32>>,
}

/// What computes the steps, with its optimizer state.
pub(super) enum Engine {
    Fused(Box<FusedTrainer>),
    Autograd(SgdMomentum),
}

impl Engine {
    /// The momentum buffers, in the order of the model's variables.
    pub(super) fn velocity(&self) -> Result<Vec<Tensor>> {
        match self {
            Engine::Fused(trainer) => trainer.velocity(),
            Engine::Autograd(optimizer) => Ok(optimizer.velocity().to_vec()),
        }
    }

    /// Replaces the momentum buffers (from a checkpoint).
    pub(super) fn set_velocity(&mut self, velocity: &[Tensor], device: &Device) -> Result<()> {
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

/// The running mean of an epoch's training loss. The autograd path leaves
/// its losses on the device and reads their sum every [`LOSS_READ_STEPS`]
/// steps, so that a GPU never waits for the host between steps.
#[derive(Debug, Default)]
pub(super) struct LossMeter {
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
    pub(super) fn reset(&mut self) {
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
    pub(super) fn read(&mut self) -> Result<()> {
        if let Some(sum) = self.unread.take() {
            self.sum += f64::from(sum.to_scalar::<f32>()?) - self.unread_offset;
            self.steps += self.unread_steps;
            self.unread_steps = 0;
            self.unread_offset = 0.0;
        }
        Ok(())
    }

    /// The mean of the losses read so far (0 before the first).
    pub(super) fn mean(&self) -> f64 {
        self.sum / self.steps.max(1) as f64
    }
}

/// The state that one optimisation step needs.
pub(super) struct Stepper<'a> {
    pub(super) model: &'a Mlp,
    pub(super) engine: Engine,
    pub(super) schedule: LrSchedule,
    pub(super) cfg: &'a TrainConfig,
    pub(super) targets: Targets<'a>,
    pub(super) device: &'a Device,
    pub(super) dropout_rng: ChaCha8Rng,
    pub(super) jitter_rng: ChaCha8Rng,
    /// This step's dropout masks (buffers reused from step to step).
    pub(super) masks: DropoutMasks,
    pub(super) image_shape: Option<(usize, usize)>,
    pub(super) step: usize,
    pub(super) loss: LossMeter,
    pub(super) lr: f64,
}

impl Stepper<'_> {
    pub(super) fn run(&mut self, mut batch: Batch) -> Result<()> {
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
    pub(super) fn write_back(&self) -> Result<()> {
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
pub(super) fn gather(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_of_uniform_and_one_hot_rows() {
        let rows = [0.25f32, 0.25, 0.25, 0.25, 1.0, 0.0, 0.0, 0.0];
        assert!((mean_entropy(&rows, 4) - 4f64.ln() / 2.0).abs() < 1e-7);
    }
}
