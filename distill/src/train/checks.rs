//! What must hold before training starts: the data fits the model and the
//! targets, and a checkpoint continues this very run.

use common::dataset::examples::Examples;
use common::dataset::Dataset;

use super::shards::teacher_indices;
use super::Targets;
use crate::checkpoint::TrainCheckpoint;
use crate::hparams::TrainConfig;
use crate::model::{Architecture, Mlp};
use crate::{Error, Result};

/// Checks that `checkpoint` can continue training `model` under `cfg`.
pub(super) fn check_resumable(
    model: &Mlp,
    checkpoint: &TrainCheckpoint,
    cfg: &TrainConfig,
) -> Result<()> {
    let trains = Architecture::Mlp(model.spec().clone());
    if checkpoint.architecture != trains {
        return Err(Error::invalid(
            "checkpoint",
            format!(
                "it is of a {} model, this run trains {}",
                checkpoint.architecture.describe(),
                trains.describe()
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

/// Checks that `model`, the splits, the targets and `cfg` fit together.
pub(super) fn check_compatible(
    model: &Mlp,
    train: &dyn Examples,
    validation: &Dataset,
    targets: Targets<'_>,
    cfg: &TrainConfig,
) -> Result<()> {
    let spec = model.spec();
    let train_classes = match targets {
        Targets::Enriched { classes, .. } => classes,
        _ => train.num_classes(),
    };
    let validation_examples: &dyn Examples = validation;
    for (data, classes) in [
        (train, train_classes),
        (validation_examples, validation.num_classes()),
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
