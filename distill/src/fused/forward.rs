//! Inference on CPU: the model's weights transposed once into the layout
//! the matrix kernels read fastest (`[fan_in, fan_out]`, row-major), then
//! batches pushed through preallocated buffers with the bias and ReLU fused
//! into one pass.

use rayon::prelude::*;

use super::gemm::{matmul, MatRef};
use super::kernels::bias_relu_mask;
use crate::model::Mlp;
use crate::Result;

/// Rows per batch: large enough that packing the weights for the matrix
/// kernels is amortised, small enough that activations stay in cache.
const BATCH: usize = 256;

struct Layer {
    fan_in: usize,
    fan_out: usize,
    /// `[fan_in, fan_out]`, row-major.
    weight_t: Vec<f32>,
    bias: Vec<f32>,
}

/// A model's forward pass on CPU.
pub struct CpuForward {
    layers: Vec<Layer>,
    threads: usize,
}

impl CpuForward {
    /// Copies `model`'s parameters into inference layout.
    pub fn new(model: &Mlp) -> Result<Self> {
        let layers = model
            .layers()
            .iter()
            .map(|dense| {
                let (fan_out, fan_in) = dense.weight.dims2()?;
                Ok(Layer {
                    fan_in,
                    fan_out,
                    weight_t: dense
                        .weight
                        .as_tensor()
                        .t()?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    bias: dense.bias.as_tensor().to_vec1::<f32>()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(CpuForward {
            layers,
            threads: candle_core::utils::get_num_threads(),
        })
    }

    /// The logits of the row-major examples in `features` (`rows x
    /// input_dim`), row-major `rows x num_classes`.
    pub fn logits(&self, features: &[f32]) -> Vec<f32> {
        let input_dim = self.layers[0].fan_in;
        let classes = self.layers.last().map_or(0, |l| l.fan_out);
        let rows = features.len() / input_dim;
        let mut out = vec![0f32; rows * classes];
        if self.threads > 1 && rows >= BATCH * self.threads {
            // Whole batches on each thread, each product on one thread: at
            // these sizes that beats splitting every product over the
            // threads, whose synchronisation costs more than packing the
            // weights once per thread.
            features
                .par_chunks(BATCH * input_dim)
                .zip(out.par_chunks_mut(BATCH * classes))
                .for_each_init(
                    || self.buffers(BATCH),
                    |(a, b), (batch, logits)| self.forward_batch(batch, logits, a, b, 1),
                );
        } else {
            let (mut a, mut b) = self.buffers(BATCH.min(rows));
            let batches = features
                .chunks(BATCH * input_dim)
                .zip(out.chunks_mut(BATCH * classes));
            for (batch, logits) in batches {
                self.forward_batch(batch, logits, &mut a, &mut b, self.threads);
            }
        }
        out
    }

    /// Two activation buffers for batches of up to `rows` examples.
    fn buffers(&self, rows: usize) -> (Vec<f32>, Vec<f32>) {
        let widest = self.layers.iter().map(|l| l.fan_out).max().unwrap_or(0);
        (vec![0f32; rows * widest], vec![0f32; rows * widest])
    }

    /// One batch through every layer, ping-ponging between `a` and `b`.
    fn forward_batch(
        &self,
        batch: &[f32],
        logits: &mut [f32],
        a: &mut Vec<f32>,
        b: &mut Vec<f32>,
        threads: usize,
    ) {
        let n = batch.len() / self.layers[0].fan_in;
        let last = self.layers.len() - 1;
        let mut input_is_batch = true;
        for (i, layer) in self.layers.iter().enumerate() {
            let input: &[f32] = if input_is_batch {
                batch
            } else {
                &a[..n * layer.fan_in]
            };
            let dst = if i == last {
                &mut logits[..]
            } else {
                &mut b[..n * layer.fan_out]
            };
            let lhs = MatRef::new(input, n, layer.fan_in);
            let rhs = MatRef::new(&layer.weight_t, layer.fan_in, layer.fan_out);
            matmul(dst, lhs, rhs, threads);
            bias_relu_mask(dst, &layer.bias, i < last, None);
            if i < last {
                std::mem::swap(a, b);
                input_is_batch = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MlpSpec;
    use candle_core::{Device, Tensor};
    use common::seed::{self, Stream};
    use rand::Rng;

    #[test]
    fn matches_the_candle_forward_pass() {
        let spec = MlpSpec::new(50, vec![40, 30], 7).unwrap();
        let model = Mlp::new_random(spec, &mut seed::rng(4, Stream::Init), &Device::Cpu).unwrap();
        let mut rng = seed::rng(5, Stream::Synthetic);
        // Fewer rows than a batch (one batch, products split over threads),
        // and more than a batch per thread, not a multiple of it (whole
        // batches on each thread).
        for rows in [37, BATCH * 4 + 37] {
            check_rows(&model, rows, &mut rng);
        }
    }

    fn check_rows(model: &Mlp, rows: usize, rng: &mut impl Rng) {
        let x: Vec<f32> = (0..rows * 50).map(|_| rng.random::<f32>() - 0.5).collect();
        let want = model
            .forward(&Tensor::from_slice(&x, (rows, 50), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = CpuForward::new(model).unwrap().logits(&x);
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * scale, "{g} vs {w}");
        }
    }
}
