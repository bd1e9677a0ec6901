//! Model families. Three types say which network a model is, each at the
//! stage where it is known:
//!
//! - [`ModelShape`]: the family and its own choices (an MLP's hidden
//!   widths), as the config and task specs give them, before the data's
//!   sizes are known;
//! - [`Architecture`]: the shape with the data's feature and class counts,
//!   as model files and checkpoints record it;
//! - [`Model`]: a loaded network of some family.
//!
//! [`Mlp`] is the only family today. A new one is a variant of each enum,
//! a module of its own here, and an implementation of
//! [`crate::eval::Logits`] so that evaluation, inference into the transfer
//! set and eq. 5 can use it; the compiler lists every place that must
//! learn about it.

mod mlp;

pub use mlp::{Dense, Dropout, DropoutMasks, Mlp, MlpSpec};

use candle_core::Device;

use serde::{Deserialize, Serialize};

use crate::eval::{Logits, Predictor};
use crate::Result;

/// The name of a model family, as the config's `family` key gives it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// A multilayer perceptron ([`Mlp`]).
    #[default]
    Mlp,
}

/// A family and its own shape choices, before the data's sizes are known.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ModelShape {
    /// An MLP with these hidden-layer widths, input side first.
    Mlp {
        /// Units of each hidden layer.
        hidden: Vec<usize>,
    },
}

impl ModelShape {
    /// The architecture for data with `input_dim` features and
    /// `num_classes` classes, validated.
    pub fn for_data(&self, input_dim: usize, num_classes: usize) -> Result<Architecture> {
        match self {
            ModelShape::Mlp { hidden } => Ok(Architecture::Mlp(MlpSpec::new(
                input_dim,
                hidden.clone(),
                num_classes,
            )?)),
        }
    }
}

/// A model's family and complete shape: what a model file or checkpoint
/// records, and enough to rebuild the network from its tensors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "kebab-case")]
pub enum Architecture {
    /// A multilayer perceptron.
    Mlp(MlpSpec),
}

impl Architecture {
    /// Input features.
    pub fn input_dim(&self) -> usize {
        match self {
            Architecture::Mlp(spec) => spec.input_dim,
        }
    }

    /// The shapes of the parameters, in the order in which the model lists
    /// them (for an MLP, [`Mlp::vars`]).
    pub fn parameter_shapes(&self) -> Vec<Vec<usize>> {
        match self {
            Architecture::Mlp(spec) => spec
                .layer_dims()
                .into_iter()
                .flat_map(|(fan_in, fan_out)| [vec![fan_out, fan_in], vec![fan_out]])
                .collect(),
        }
    }

    /// A short name: for an MLP its layer widths, such as `784-800-800-10`.
    pub fn describe(&self) -> String {
        match self {
            Architecture::Mlp(spec) => spec.describe(),
        }
    }

    /// Checks that a model of this architecture can read `data`: same
    /// feature and class counts. `id` names the model in the message.
    pub fn ensure_fits(
        &self,
        id: &str,
        data: &dyn common::dataset::examples::Examples,
    ) -> Result<()> {
        match self {
            Architecture::Mlp(spec) => spec.ensure_fits(id, data),
        }
    }
}

/// A loaded network of some family.
#[derive(Clone, Debug)]
pub enum Model {
    /// A multilayer perceptron.
    Mlp(Mlp),
}

impl Model {
    /// Its architecture.
    pub fn architecture(&self) -> Architecture {
        match self {
            Model::Mlp(mlp) => Architecture::Mlp(mlp.spec().clone()),
        }
    }

    /// The model ready to give logits on `device` (for an MLP, the fused
    /// CPU path on a CPU).
    pub fn into_logits(self, device: &Device) -> Result<Box<dyn Logits>> {
        match self {
            Model::Mlp(mlp) => Ok(Box::new(Predictor::new(&mlp, device)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_tagged_with_their_family() {
        let arch = ModelShape::Mlp { hidden: vec![4] }.for_data(3, 2).unwrap();
        let json = serde_json::to_string(&arch).unwrap();
        assert_eq!(
            json,
            r#"{"family":"mlp","input_dim":3,"hidden":[4],"num_classes":2}"#
        );
        assert_eq!(serde_json::from_str::<Architecture>(&json).unwrap(), arch);
        assert_eq!(arch.describe(), "3-4-2");
    }

    #[test]
    fn an_unknown_family_or_a_bad_shape_is_refused() {
        let e = serde_json::from_str::<ModelShape>(r#"{"family":"cnn","hidden":[4]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cnn"), "{e}");
        let e = serde_json::from_str::<Architecture>(
            r#"{"family":"mlp","input_dim":3,"hidden":[4],"num_classes":2,"extra":1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("extra"), "{e}");
        let e = ModelShape::Mlp { hidden: vec![] }
            .for_data(3, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden"), "{e}");
    }
}
