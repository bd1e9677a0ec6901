//! Fused element-wise kernels of the training step, on row-major slices:
//! each makes one pass over its data (where the plain path makes one pass
//! and one new tensor per operation) and splits rows over the rayon pool.

use rayon::prelude::*;

/// Below this many values a kernel runs on the calling thread: handing
/// work to the pool costs more than it saves.
const PARALLEL_MIN: usize = 1 << 14;

/// Runs `f` compiled for the widest vector instructions this CPU has
/// (AVX-512 or AVX2 where present; the build itself targets plain x86-64).
#[inline(always)]
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Runs `f(first_row, rows)` on consecutive blocks of `width`-wide rows of
/// `data`, in parallel when the slice is large enough.
fn for_row_blocks(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let rows = data.len() / width.max(1);
    if data.len() < PARALLEL_MIN || rayon::current_num_threads() == 1 {
        vectorized(|| f(0, data));
        return;
    }
    let block = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
    data.par_chunks_mut(block * width)
        .enumerate()
        .for_each(|(i, chunk)| vectorized(|| f(i * block, chunk)));
}

/// `z = relu(z + bias) * mask` on each row of `z` (`bias.len()` wide), with
/// the ReLU only when `relu` and the (dropout) mask only when given.
pub fn bias_relu_mask(z: &mut [f32], bias: &[f32], relu: bool, mask: Option<&[f32]>) {
    let width = bias.len();
    for_row_blocks(z, width, |first, block| {
        for (r, row) in block.chunks_exact_mut(width).enumerate() {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
            if relu {
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            if let Some(mask) = mask {
                let m = &mask[(first + r) * width..(first + r + 1) * width];
                row.iter_mut().zip(m).for_each(|(v, m)| *v *= m);
            }
        }
    });
}

/// Feature-major `z` (`bias.len()` rows of `batch` values, one row per
/// unit): `z = relu(z + bias[unit]) * mask`, with the ReLU only when `relu`
/// and the (dropout) mask, laid out like `z`, only when given.
pub fn bias_relu_mask_by_unit(
    z: &mut [f32],
    batch: usize,
    bias: &[f32],
    relu: bool,
    mask: Option<&[f32]>,
) {
    assert_eq!(z.len(), batch * bias.len());
    for_row_blocks(z, batch, |first, block| {
        for (u, row) in block.chunks_exact_mut(batch).enumerate() {
            let b = bias[first + u];
            row.iter_mut().for_each(|v| *v += b);
            if relu {
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            if let Some(mask) = mask {
                let m = &mask[(first + u) * batch..(first + u + 1) * batch];
                row.iter_mut().zip(m).for_each(|(v, m)| *v *= m);
            }
        }
    });
}

/// `out[r] = Σ_c values[r, c]` for the `width`-wide rows of `values`.
pub fn row_sums(values: &[f32], width: usize, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(values.chunks_exact(width)) {
        *o = row.iter().sum();
    }
}

/// Writes the transpose of the row-major `rows x cols` matrix `src`,
/// multiplied element-wise by `mask` (laid out like the result) when given,
/// into `dst` (`cols x rows`).
pub fn transpose_masked(
    src: &[f32],
    rows: usize,
    cols: usize,
    mask: Option<&[f32]>,
    dst: &mut [f32],
) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    let dst = &mut dst[..rows * cols];
    for_row_blocks(dst, rows, |first, block| {
        for (c, out) in block.chunks_exact_mut(rows).enumerate() {
            let c = first + c;
            for (r, o) in out.iter_mut().enumerate() {
                *o = src[r * cols + c];
            }
            if let Some(mask) = mask {
                let m = &mask[c * rows..(c + 1) * rows];
                out.iter_mut().zip(m).for_each(|(o, m)| *o *= m);
            }
        }
    });
}

/// Back through `activation = relu(z) * mask`, where every kept unit's mask
/// value is `keep` and dropped ones are 0: the gradient `grad` (with respect
/// to `activation`) becomes the gradient with respect to `z`, in place.
pub fn relu_mask_backward(grad: &mut [f32], activation: &[f32], keep: f32) {
    assert_eq!(grad.len(), activation.len());
    for_row_blocks(grad, 1, |first, block| {
        let a = &activation[first..first + block.len()];
        block
            .iter_mut()
            .zip(a)
            .for_each(|(g, &a)| *g = if a > 0.0 { *g * keep } else { 0.0 });
    });
}

/// One SGD-with-momentum update (PyTorch's rule, see [`crate::optim`]).
#[derive(Clone, Copy, Debug)]
pub struct SgdUpdate {
    /// Learning rate of this step.
    pub lr: f32,
    /// Momentum factor.
    pub momentum: f32,
    /// L2 penalty added to the gradient (0 for biases).
    pub weight_decay: f32,
    /// Nesterov's variant.
    pub nesterov: bool,
    /// Largest L2 norm of a row after the update (rows above are scaled
    /// down to it); `None` for no constraint.
    pub max_norm: Option<f32>,
}

/// Applies `update` to the `width`-wide rows of `weights` with gradient
/// `grad` and momentum buffer `velocity`, then the max-norm constraint to
/// each updated row while it is still in cache.
pub fn sgd_rows(
    weights: &mut [f32],
    velocity: &mut [f32],
    grad: &[f32],
    width: usize,
    update: SgdUpdate,
) {
    assert!(weights.len() == velocity.len() && weights.len() == grad.len());
    let update_block = |w: &mut [f32], v: &mut [f32], g: &[f32]| {
        for ((w, v), g) in w
            .chunks_exact_mut(width)
            .zip(v.chunks_exact_mut(width))
            .zip(g.chunks_exact(width))
        {
            update_row(w, v, g, update);
        }
    };
    if weights.len() < PARALLEL_MIN || rayon::current_num_threads() == 1 {
        vectorized(|| update_block(weights, velocity, grad));
        return;
    }
    let rows_per_task = (PARALLEL_MIN / width.max(1)).max(1);
    weights
        .par_chunks_mut(rows_per_task * width)
        .zip(velocity.par_chunks_mut(rows_per_task * width))
        .zip(grad.par_chunks(rows_per_task * width))
        .for_each(|((w, v), g)| vectorized(|| update_block(w, v, g)));
}

/// One row's update and max-norm constraint. The squared norm is summed in
/// 16 lanes so that the loop vectorizes.
#[inline(always)]
fn update_row(w: &mut [f32], v: &mut [f32], g: &[f32], update: SgdUpdate) {
    const LANES: usize = 16;
    let SgdUpdate {
        lr,
        momentum,
        weight_decay,
        nesterov,
        max_norm,
    } = update;
    let step = |w: &mut f32, v: &mut f32, g: f32| {
        let g = g + *w * weight_decay;
        *v = *v * momentum + g;
        // A unit that gets no gradient (a dead ReLU) has its velocity decay
        // by `momentum` every step, into subnormal numbers after about 800
        // steps, which would slow this loop down many times over.
        if v.abs() < GRADIENT_FLUSH {
            *v = 0.0;
        }
        let direction = if nesterov { g + *v * momentum } else { *v };
        *w -= direction * lr;
        *w * *w
    };
    let mut lanes = [0f32; LANES];
    let mut w_blocks = w.chunks_exact_mut(LANES);
    let mut v_blocks = v.chunks_exact_mut(LANES);
    let mut g_blocks = g.chunks_exact(LANES);
    for ((w, v), g) in (&mut w_blocks).zip(&mut v_blocks).zip(&mut g_blocks) {
        for j in 0..LANES {
            lanes[j] += step(&mut w[j], &mut v[j], g[j]);
        }
    }
    let mut norm2: f32 = lanes.iter().sum();
    let tail = w_blocks.into_remainder().iter_mut();
    for ((w, v), &g) in tail
        .zip(v_blocks.into_remainder())
        .zip(g_blocks.remainder())
    {
        norm2 += step(w, v, g);
    }
    if let Some(max_norm) = max_norm {
        let norm = norm2.sqrt();
        if norm > max_norm {
            let scale = max_norm / norm;
            w.iter_mut().for_each(|w| *w *= scale);
        }
    }
}

/// What the logits are trained towards, row by row.
#[derive(Clone, Copy, Debug)]
pub enum LossTargets<'a> {
    /// Cross-entropy with these labels.
    Labels(&'a [u32]),
    /// The distillation loss (see [`crate::loss`]): soft targets (one row
    /// per example), temperature, weight of the hard-label term, labels.
    Distill {
        /// Soft targets, `rows x classes`.
        soft: &'a [f32],
        /// Temperature T.
        temperature: f32,
        /// Weight of the cross-entropy with the labels at T = 1.
        hard_weight: f32,
        /// The labels.
        labels: &'a [u32],
    },
}

/// Gradient entries smaller than this in magnitude are set to zero. A
/// confident prediction's probabilities for the wrong classes underflow
/// towards subnormal floats; multiplied through the backward pass they make
/// subnormal operands, which x86 processors handle about a hundred times
/// slower, and the training step slows down as the model gets confident.
/// Such entries change no weight: an update of lr x 1e-30 is lost against
/// any float32 weight larger than 1e-23.
pub const GRADIENT_FLUSH: f32 = 1e-30;

/// The batch-mean loss of `logits` (`rows x classes`), and its gradient
/// with respect to the logits written into `grad`, in one pass per row:
/// the gradient of T² CE(p, softmax(z/T)) is T (softmax(z/T) - p), that of
/// CE(y, softmax(z)) is softmax(z) - onehot(y), each divided by the rows;
/// entries below [`GRADIENT_FLUSH`] in magnitude are set to zero.
pub fn loss_and_grad(
    logits: &[f32],
    grad: &mut [f32],
    classes: usize,
    targets: LossTargets<'_>,
) -> f64 {
    let rows = logits.len() / classes;
    let inv_rows = 1.0 / rows as f64;
    let mut total = 0f64;
    let mut q = vec![0f64; classes];
    for (r, (z, g)) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .enumerate()
    {
        let (labels, hard_weight) = match targets {
            LossTargets::Labels(labels) => (labels, 1.0),
            LossTargets::Distill {
                soft,
                temperature,
                hard_weight,
                labels,
            } => {
                let t = f64::from(temperature);
                let log_z = softmax_at(z, t, &mut q);
                let p = &soft[r * classes..(r + 1) * classes];
                for c in 0..classes {
                    let log_q = f64::from(z[c]) / t - log_z;
                    total -= t * t * f64::from(p[c]) * log_q;
                    g[c] = (t * (q[c] - f64::from(p[c])) * inv_rows) as f32;
                }
                (labels, f64::from(hard_weight))
            }
        };
        if matches!(targets, LossTargets::Labels(_)) {
            g.fill(0.0);
        }
        if hard_weight != 0.0 {
            let y = labels[r] as usize;
            let log_z = softmax_at(z, 1.0, &mut q);
            total += hard_weight * (log_z - f64::from(z[y]));
            for c in 0..classes {
                let onehot = if c == y { 1.0 } else { 0.0 };
                g[c] += (hard_weight * (q[c] - onehot) * inv_rows) as f32;
            }
        }
    }
    grad.iter_mut()
        .filter(|g| g.abs() < GRADIENT_FLUSH)
        .for_each(|g| *g = 0.0);
    total * inv_rows
}

/// `q = softmax(z / t)`; returns log Σ exp(z / t).
fn softmax_at(z: &[f32], t: f64, q: &mut [f64]) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let max = f64::from(max) / t;
    let mut sum = 0.0;
    for (q, &z) in q.iter_mut().zip(z) {
        *q = (f64::from(z) / t - max).exp();
        sum += *q;
    }
    q.iter_mut().for_each(|q| *q /= sum);
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_relu_mask_by_hand() {
        let mut z = vec![1.0, -2.0, 0.5, -0.5];
        let mask = [2.0, 2.0, 0.0, 2.0];
        bias_relu_mask(&mut z, &[0.5, 1.0], true, Some(&mask));
        assert_eq!(z, vec![3.0, 0.0, 0.0, 1.0]);
        let mut z = vec![1.0, -2.0];
        bias_relu_mask(&mut z, &[0.5, 1.0], false, None);
        assert_eq!(z, vec![1.5, -1.0]);
    }

    #[test]
    fn relu_mask_backward_passes_only_live_units() {
        let mut g = vec![1.0, 2.0, 3.0];
        relu_mask_backward(&mut g, &[0.5, 0.0, 2.0], 2.0);
        assert_eq!(g, vec![2.0, 0.0, 6.0]);
    }

    #[test]
    fn large_inputs_split_over_threads_give_the_serial_answer() {
        let (rows, cols) = (130, PARALLEL_MIN / 50);
        let x: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32 - 3.0).collect();
        let mask: Vec<f32> = (0..rows * cols).map(|i| (i % 3) as f32).collect();
        let mut got = vec![0.0; rows * cols];
        transpose_masked(&x, rows, cols, Some(&mask), &mut got);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(got[c * rows + r], x[r * cols + c] * mask[c * rows + r]);
            }
        }
        let mut z = got.clone();
        let bias: Vec<f32> = (0..cols).map(|c| c as f32 - 100.0).collect();
        bias_relu_mask_by_unit(&mut z, rows, &bias, true, Some(&mask));
        for (i, (&v, &before)) in z.iter().zip(&got).enumerate() {
            let (unit, m) = (i / rows, mask[i]);
            assert_eq!(v, (before + bias[unit]).max(0.0) * m);
        }
    }

    #[test]
    fn max_norm_scales_only_long_rows() {
        let mut w = vec![3.0, 4.0, 0.3, 0.4];
        let mut v = vec![0.0; 4];
        let update = SgdUpdate {
            lr: 0.0,
            momentum: 0.9,
            weight_decay: 0.0,
            nesterov: true,
            max_norm: Some(1.0),
        };
        sgd_rows(&mut w, &mut v, &[0.0; 4], 2, update);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-6;
        assert!(close(w[0], 0.6) && close(w[1], 0.8), "{w:?}");
        assert_eq!(&w[2..], &[0.3, 0.4]);
    }
}
