//! Multilayer perceptrons with ReLU hidden layers, dropout on inputs and
//! hidden layers, and a max-norm constraint on incoming weight vectors.
//!
//! Layer `i` holds `weight` `[out, in]` and `bias` `[out]` (PyTorch's
//! `nn.Linear` layout): `h_{i+1} = relu(h_i W_i^T + b_i)`, without the ReLU
//! on the last layer, whose outputs are the logits.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The scope of the layers in a [`VarBuilder`], and the names of a layer's
/// two tensors in its own scope.
const LAYERS: &str = "layers";
const WEIGHT: &str = "weight";
const BIAS: &str = "bias";

/// The shape of an MLP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpSpec {
    /// Input features.
    pub input_dim: usize,
    /// Units of each hidden layer, input side first (at least one layer).
    pub hidden: Vec<usize>,
    /// Output classes.
    pub num_classes: usize,
}

impl MlpSpec {
    /// A spec, validated.
    pub fn new(input_dim: usize, hidden: Vec<usize>, num_classes: usize) -> Result<Self> {
        let spec = MlpSpec {
            input_dim,
            hidden,
            num_classes,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks that a model of this shape can read `data`: same feature count
    /// and class count. `id` names the model in the message.
    pub fn ensure_fits(
        &self,
        id: &str,
        data: &dyn common::dataset::examples::Examples,
    ) -> Result<()> {
        if self.input_dim == data.dim() && self.num_classes == data.num_classes() {
            return Ok(());
        }
        Err(Error::invalid(
            "model",
            format!(
                "{id} ({}) does not fit {} ({} features, {} classes)",
                self.describe(),
                data.name(),
                data.dim(),
                data.num_classes()
            ),
        ))
    }

    /// Checks that there is at least one hidden layer and no empty layer.
    pub fn validate(&self) -> Result<()> {
        if self.hidden.is_empty() {
            return Err(Error::invalid(
                "hidden layers",
                "the layer list is empty; give at least one hidden layer",
            ));
        }
        if self.input_dim == 0 {
            return Err(Error::invalid("input_dim", "must be at least 1, got 0"));
        }
        if let Some(i) = self.hidden.iter().position(|&h| h == 0) {
            return Err(Error::invalid(
                "hidden layers",
                format!("layer {i} has 0 units"),
            ));
        }
        if self.num_classes < 2 {
            return Err(Error::invalid(
                "num_classes",
                format!("must be at least 2, got {}", self.num_classes),
            ));
        }
        Ok(())
    }

    /// `(in, out)` of every layer, input side first.
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        let mut sizes = vec![self.input_dim];
        sizes.extend(&self.hidden);
        sizes.push(self.num_classes);
        sizes.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// A short name such as `784-800-800-10`.
    pub fn describe(&self) -> String {
        let mut parts = vec![self.input_dim.to_string()];
        parts.extend(self.hidden.iter().map(|h| h.to_string()));
        parts.push(self.num_classes.to_string());
        parts.join("-")
    }
}

/// One fully connected layer.
#[derive(Clone, Debug)]
pub struct Dense {
    /// `[out, in]`.
    pub weight: Var,
    /// `[out]`.
    pub bias: Var,
}

/// Dropout probabilities applied in training.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an input feature.
    pub input: f64,
    /// Probability of dropping a hidden unit.
    pub hidden: f64,
}

/// A multilayer perceptron.
#[derive(Clone, Debug)]
pub struct Mlp {
    spec: MlpSpec,
    layers: Vec<Dense>,
}

impl Mlp {
    /// A network with He-normal weights (std `sqrt(2 / fan_in)`) and zero
    /// biases, drawn from `rng`.
    pub fn new_random<R: Rng>(spec: MlpSpec, rng: &mut R, device: &Device) -> Result<Self> {
        spec.validate()?;
        let layers = spec
            .layer_dims()
            .into_iter()
            .map(|(fan_in, fan_out)| {
                let normal =
                    Normal::new(0.0f32, (2.0 / fan_in as f32).sqrt()).expect("positive std");
                let w: Vec<f32> = (0..fan_in * fan_out).map(|_| normal.sample(rng)).collect();
                Ok(Dense {
                    weight: Var::from_vec(w, (fan_out, fan_in), device)?,
                    bias: Var::zeros(fan_out, candle_core::DType::F32, device)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Mlp { spec, layers })
    }

    /// A network from existing layers, checked against `spec`.
    pub fn from_layers(spec: MlpSpec, layers: Vec<Dense>) -> Result<Self> {
        spec.validate()?;
        let dims = spec.layer_dims();
        if dims.len() != layers.len() {
            return Err(Error::invalid(
                "layers",
                format!("{} given, spec needs {}", layers.len(), dims.len()),
            ));
        }
        for (i, ((fan_in, fan_out), l)) in dims.iter().zip(&layers).enumerate() {
            if l.weight.dims() != [*fan_out, *fan_in] || l.bias.dims() != [*fan_out] {
                return Err(Error::invalid(
                    "layers",
                    format!(
                        "layer {i} has weight {:?} and bias {:?}, expected [{fan_out}, {fan_in}] and [{fan_out}]",
                        l.weight.dims(),
                        l.bias.dims()
                    ),
                ));
            }
        }
        Ok(Mlp { spec, layers })
    }

    /// Reads a network of shape `spec` from `vb`: tensors
    /// `layers.{i}.weight` and `layers.{i}.bias`, each checked for its shape.
    pub fn load(spec: MlpSpec, vb: &VarBuilder<'_>) -> Result<Self> {
        spec.validate()?;
        let layers = vb.pp(LAYERS);
        let layers = spec
            .layer_dims()
            .into_iter()
            .enumerate()
            .map(|(i, (fan_in, fan_out))| {
                let layer = layers.pp(i);
                Ok(Dense {
                    weight: Var::from_tensor(&layer.get((fan_out, fan_in), WEIGHT)?)?,
                    bias: Var::from_tensor(&layer.get(fan_out, BIAS)?)?,
                })
            })
            .collect::<Result<_>>()?;
        Mlp::from_layers(spec, layers)
    }

    /// Every parameter with the name [`Mlp::load`] reads it by, input
    /// side first, weight before bias.
    pub fn named_parameters(&self) -> Vec<(String, &Var)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| {
                [
                    (format!("{LAYERS}.{i}.{WEIGHT}"), &layer.weight),
                    (format!("{LAYERS}.{i}.{BIAS}"), &layer.bias),
                ]
            })
            .collect()
    }

    /// The network's shape.
    pub fn spec(&self) -> &MlpSpec {
        &self.spec
    }

    /// The layers, input side first.
    pub fn layers(&self) -> &[Dense] {
        &self.layers
    }

    /// Every trainable variable (weight then bias of each layer).
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.weight.clone(), l.bias.clone()])
            .collect()
    }

    /// Logits for a `[batch, input_dim]` input, without dropout.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_masks(x, &[])
    }

    /// Logits with dropout: `masks[i]`, when present, multiplies the input
    /// of layer `i` (see [`DropoutMasks`]).
    pub fn forward_with_masks(&self, x: &Tensor, masks: &[Option<Tensor>]) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(Some(mask)) = masks.get(i) {
                h = (h * mask)?;
            }
            h = h
                .matmul(&layer.weight.as_tensor().t()?)?
                .broadcast_add(layer.bias.as_tensor())?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Rescales each unit's incoming weight vector (a row of `weight`) whose
    /// L2 norm exceeds `max_norm` down to that norm.
    pub fn apply_max_norm(&self, max_norm: f64) -> Result<()> {
        for layer in &self.layers {
            let w = layer.weight.as_tensor();
            let norms = w.sqr()?.sum_keepdim(1)?.sqrt()?;
            let scale = (norms.clamp(max_norm, f64::MAX)?.recip()? * max_norm)?;
            layer.weight.set(&w.broadcast_mul(&scale)?)?;
        }
        Ok(())
    }
}

/// Inverted-dropout masks for one batch, on the host: entry `i` multiplies
/// the input of layer `i`; kept units are scaled by `keep = 1 / (1 - p)` so
/// that no rescaling is needed at test time. `None` where the probability
/// is zero. Both training paths use the same masks, drawn in the same order.
#[derive(Clone, Debug, Default)]
pub struct DropoutMasks {
    masks: Vec<Option<Vec<f32>>>,
    keeps: Vec<f32>,
    widths: Vec<usize>,
    rows: usize,
}

impl DropoutMasks {
    /// Draws the masks of a batch of `rows` examples for `spec`.
    pub fn sample<R: Rng>(spec: &MlpSpec, rows: usize, dropout: Dropout, rng: &mut R) -> Self {
        let mut masks = DropoutMasks::default();
        masks.resample(spec, rows, dropout, rng);
        masks
    }

    /// Draws new masks in place, reusing the buffers (a training step
    /// draws hundreds of thousands of values; allocating them anew each
    /// step costs page faults). The random words are drawn in bulk and
    /// turned into mask values in a loop that vectorizes.
    pub fn resample<R: Rng>(&mut self, spec: &MlpSpec, rows: usize, dropout: Dropout, rng: &mut R) {
        let layers = 1 + spec.hidden.len();
        self.widths.clear();
        self.widths.push(spec.input_dim);
        self.widths.extend(&spec.hidden);
        self.masks.resize(layers, None);
        self.keeps.clear();
        self.rows = rows;
        let mut words = Vec::new();
        for (i, &width) in self.widths.iter().enumerate() {
            let p = if i == 0 {
                dropout.input
            } else {
                dropout.hidden
            };
            if p <= 0.0 {
                self.masks[i] = None;
                self.keeps.push(1.0);
                continue;
            }
            let keep = (1.0 / (1.0 - p)) as f32;
            let threshold = (p * 4_294_967_296.0) as u64;
            words.resize(rows * width, 0u32);
            rng.fill(&mut words[..]);
            let mask = self.masks[i].get_or_insert_with(Vec::new);
            mask.resize(rows * width, 0.0);
            for (m, &w) in mask.iter_mut().zip(&words) {
                *m = if u64::from(w) < threshold { 0.0 } else { keep };
            }
            self.keeps.push(keep);
        }
    }

    /// The mask of layer `layer`'s input, if it has one, stored
    /// feature-major (`width x rows`: one row per unit, one column per
    /// example), the layout of the fused trainer's activations.
    pub fn mask(&self, layer: usize) -> Option<&[f32]> {
        self.masks.get(layer).and_then(|m| m.as_deref())
    }

    /// The value of a kept unit in layer `layer`'s mask (1 without one).
    pub fn keep(&self, layer: usize) -> f32 {
        self.keeps.get(layer).copied().unwrap_or(1.0)
    }

    /// The masks as tensors on `device`, for [`Mlp::forward_with_masks`]
    /// (`rows x width` each).
    pub fn to_tensors(&self, device: &Device) -> Result<Vec<Option<Tensor>>> {
        self.masks
            .iter()
            .zip(&self.widths)
            .map(|(mask, &width)| {
                mask.as_ref()
                    .map(|m| {
                        Tensor::from_slice(m, (width, self.rows), device)?
                            .t()?
                            .contiguous()
                    })
                    .transpose()
                    .map_err(Into::into)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::seed::{self, Stream};

    fn small() -> Mlp {
        let spec = MlpSpec::new(3, vec![4], 2).unwrap();
        Mlp::new_random(spec, &mut seed::rng(5, Stream::Init), &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_matches_a_hand_computed_pass() {
        let m = small();
        let x = [0.5f32, -1.0, 2.0];
        let w0 = m.layers[0].weight.as_tensor().to_vec2::<f32>().unwrap();
        let w1 = m.layers[1].weight.as_tensor().to_vec2::<f32>().unwrap();
        let h: Vec<f32> = w0
            .iter()
            .map(|r| r.iter().zip(&x).map(|(a, b)| a * b).sum::<f32>().max(0.0))
            .collect();
        let want: Vec<f32> = w1
            .iter()
            .map(|r| r.iter().zip(&h).map(|(a, b)| a * b).sum())
            .collect();
        let got = m
            .forward(&Tensor::new(&[x], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (g, w) in got[0].iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
    }

    #[test]
    fn same_seed_same_weights() {
        let a = small().layers[0]
            .weight
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap();
        let b = small().layers[0]
            .weight
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn max_norm_caps_rows_and_leaves_short_rows_alone() {
        let dev = Device::Cpu;
        let spec = MlpSpec::new(2, vec![2], 2).unwrap();
        let w = Var::from_vec(vec![3.0f32, 4.0, 0.3, 0.4], (2, 2), &dev).unwrap();
        let layers = vec![
            Dense {
                weight: w.clone(),
                bias: Var::zeros(2, candle_core::DType::F32, &dev).unwrap(),
            },
            Dense {
                weight: Var::from_vec(vec![1.0f32, 0.0, 0.0, 1.0], (2, 2), &dev).unwrap(),
                bias: Var::zeros(2, candle_core::DType::F32, &dev).unwrap(),
            },
        ];
        let m = Mlp::from_layers(spec, layers).unwrap();
        m.apply_max_norm(1.0).unwrap();
        let got = w.as_tensor().to_vec2::<f32>().unwrap();
        assert!((got[0][0] - 0.6).abs() < 1e-6 && (got[0][1] - 0.8).abs() < 1e-6);
        assert_eq!(got[1], vec![0.3, 0.4]);
    }

    #[test]
    fn dropout_masks_drop_the_asked_fraction_and_rescale() {
        let spec = MlpSpec::new(1000, vec![500], 2).unwrap();
        let drop = Dropout {
            input: 0.2,
            hidden: 0.5,
        };
        let masks = DropoutMasks::sample(&spec, 10, drop, &mut seed::rng(1, Stream::Dropout))
            .to_tensors(&Device::Cpu)
            .unwrap();
        for (mask, p) in masks.iter().zip([0.2, 0.5]) {
            let v = mask
                .as_ref()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / v.len() as f64;
            assert!((dropped - p).abs() < 0.02, "dropped {dropped}, wanted {p}");
            let keep = (1.0 / (1.0 - p)) as f32;
            assert!(v.iter().all(|&x| x == 0.0 || x == keep));
        }
        let none = DropoutMasks::sample(
            &spec,
            2,
            Dropout::default(),
            &mut seed::rng(1, Stream::Dropout),
        )
        .to_tensors(&Device::Cpu)
        .unwrap();
        assert!(none.iter().all(Option::is_none));
    }

    #[test]
    fn empty_or_zero_layers_are_rejected() {
        let e = MlpSpec::new(784, vec![], 10).unwrap_err().to_string();
        assert!(e.contains("layer list is empty"), "{e}");
        assert!(MlpSpec::new(784, vec![800, 0], 10)
            .unwrap_err()
            .to_string()
            .contains("layer 1 has 0 units"));
        assert!(MlpSpec::new(0, vec![8], 10).is_err());
        assert!(MlpSpec::new(4, vec![8], 1).is_err());
        assert_eq!(
            MlpSpec::new(784, vec![800, 800], 10).unwrap().describe(),
            "784-800-800-10"
        );
    }
}
