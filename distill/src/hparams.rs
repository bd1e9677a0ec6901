//! Hyperparameters of training and distillation, with validation that names
//! the offending field. Both parse from TOML/JSON with unknown keys refused.

use common::transfer::EnsembleCombine;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which epoch's weights a training run keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochSelection {
    /// The weights after the last epoch.
    Last,
    /// The weights after the epoch with the fewest validation errors
    /// (early stopping chosen on the validation split, never on the test set).
    #[default]
    BestValidation,
}

/// How to train one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// Peak learning rate (reached after warm-up).
    pub learning_rate: f64,
    /// Epochs of linear learning-rate warm-up.
    pub warmup_epochs: usize,
    /// The learning rate at the end, as a fraction of the peak (cosine decay).
    pub final_lr_fraction: f64,
    /// Momentum coefficient in [0, 1).
    pub momentum: f64,
    /// Use Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay on weight matrices.
    pub weight_decay: f64,
    /// Probability of dropping an input feature, in [0, 1).
    pub input_dropout: f64,
    /// Probability of dropping a hidden unit, in [0, 1).
    pub hidden_dropout: f64,
    /// Maximum L2 norm of each unit's incoming weight vector, if any.
    pub max_norm: Option<f64>,
    /// Random translation of images by up to this many pixels (0: none).
    pub jitter_pixels: usize,
    /// Which epoch's weights to keep.
    pub select: EpochSelection,
    /// Seed of every random choice of the run.
    pub seed: u64,
    /// Training shards shuffled together: each epoch visits the shards in
    /// a random order, this many at a time, and shuffles the examples of
    /// those shards together (a dataset in memory is one shard, so this is
    /// a full shuffle). A cluster job sets it from
    /// `dataset.shuffle_window_shards`.
    pub shuffle_window_shards: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            learning_rate: 0.05,
            warmup_epochs: 1,
            final_lr_fraction: 0.0,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 0.0,
            input_dropout: 0.0,
            hidden_dropout: 0.0,
            max_norm: None,
            jitter_pixels: 0,
            select: EpochSelection::BestValidation,
            seed: 1,
            shuffle_window_shards: 4,
        }
    }
}

impl TrainConfig {
    /// Checks every field; the error names the field and the valid range.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::invalid("epochs", "must be at least 1, got 0"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1, got 0"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::invalid(
                "learning_rate",
                format!("must be a finite number > 0, got {}", self.learning_rate),
            ));
        }
        if self.shuffle_window_shards == 0 {
            return Err(Error::invalid(
                "shuffle_window_shards",
                "must be at least 1, got 0",
            ));
        }
        if self.warmup_epochs > self.epochs {
            return Err(Error::invalid(
                "warmup_epochs",
                format!("{} exceeds epochs ({})", self.warmup_epochs, self.epochs),
            ));
        }
        if !(0.0..=1.0).contains(&self.final_lr_fraction) {
            return Err(Error::invalid(
                "final_lr_fraction",
                format!("must be in [0, 1], got {}", self.final_lr_fraction),
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::invalid(
                "momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid(
                "weight_decay",
                format!("must be a finite number >= 0, got {}", self.weight_decay),
            ));
        }
        for (name, p) in [
            ("input_dropout", self.input_dropout),
            ("hidden_dropout", self.hidden_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::invalid(
                    name,
                    format!("must be a probability in [0, 1), got {p}"),
                ));
            }
        }
        if let Some(c) = self.max_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::invalid(
                    "max_norm",
                    format!("must be a finite number > 0, got {c}"),
                ));
            }
        }
        Ok(())
    }
}

/// How a student learns from soft targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Temperature T of the soft targets and of the student's softmax.
    pub temperature: f64,
    /// Weight of the ordinary cross-entropy with the true labels (the soft
    /// term has weight T^2).
    pub hard_weight: f64,
    /// How the ensemble members' distributions are combined.
    pub combine: EnsembleCombine,
    /// Learn from these of the transfer set's teachers only (all when
    /// empty), such as the generalist alone when the set also holds the
    /// generalist+specialists combination.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub teachers: Vec<String>,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            temperature: 20.0,
            hard_weight: 0.1,
            combine: EnsembleCombine::Arithmetic,
            teachers: Vec::new(),
        }
    }
}

impl DistillConfig {
    /// Checks every field; the error names the field and the valid range.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("must be a finite number > 0, got {}", self.temperature),
            ));
        }
        if !(self.hard_weight.is_finite() && self.hard_weight >= 0.0) {
            return Err(Error::invalid(
                "hard_weight",
                format!("must be a finite number >= 0, got {}", self.hard_weight),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid_field(cfg: TrainConfig) -> String {
        match cfg.validate().unwrap_err() {
            Error::Common(common::Error::Invalid { name, .. }) => name,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        TrainConfig::default().validate().unwrap();
        DistillConfig::default().validate().unwrap();
    }

    #[test]
    fn each_bad_training_field_is_named() {
        let d = TrainConfig::default;
        assert_eq!(
            invalid_field(TrainConfig {
                batch_size: 0,
                ..d()
            }),
            "batch_size"
        );
        assert_eq!(invalid_field(TrainConfig { epochs: 0, ..d() }), "epochs");
        assert_eq!(
            invalid_field(TrainConfig {
                learning_rate: -0.1,
                ..d()
            }),
            "learning_rate"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                learning_rate: f64::NAN,
                ..d()
            }),
            "learning_rate"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                momentum: 1.0,
                ..d()
            }),
            "momentum"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                hidden_dropout: 1.0,
                ..d()
            }),
            "hidden_dropout"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                input_dropout: -0.2,
                ..d()
            }),
            "input_dropout"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                max_norm: Some(0.0),
                ..d()
            }),
            "max_norm"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                warmup_epochs: 11,
                ..d()
            }),
            "warmup_epochs"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                weight_decay: -1.0,
                ..d()
            }),
            "weight_decay"
        );
        assert_eq!(
            invalid_field(TrainConfig {
                final_lr_fraction: 2.0,
                ..d()
            }),
            "final_lr_fraction"
        );
    }

    #[test]
    fn negative_or_zero_temperature_and_negative_hard_weight_are_rejected() {
        for t in [-1.0, 0.0, f64::INFINITY] {
            let e = DistillConfig {
                temperature: t,
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("temperature"), "{e}");
        }
        let e = DistillConfig {
            hard_weight: -0.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("hard_weight"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = serde_json::from_str::<TrainConfig>(r#"{"epochs": 3, "learnin_rate": 0.1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("learnin_rate"), "{e}");
        let cfg: TrainConfig = serde_json::from_str(r#"{"epochs": 3}"#).unwrap();
        assert_eq!(cfg.epochs, 3);
    }
}
