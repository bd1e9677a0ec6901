//! Losses: ordinary cross-entropy with labels, and the distillation loss of
//! Hinton, Vinyals & Dean (2015), section 2:
//!
//! ```text
//! loss = T^2 * CE(p_T, softmax(z / T)) + hard_weight * CE(labels, softmax(z))
//! ```
//!
//! where `p_T` are the teachers' soft targets at temperature T and `z` the
//! student's logits; both cross-entropies are averaged over the batch. The
//! T^2 factor keeps the soft term's gradient, T * (softmax(z/T) - p_T), at the
//! same scale when T changes. Pure functions of their inputs.

use candle_core::{Tensor, D};
use candle_nn::ops::log_softmax;

use crate::Result;

/// Mean cross-entropy between integer `labels` (u32, `[batch]`) and
/// `softmax(logits)` (`[batch, classes]`).
pub fn hard_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::loss::cross_entropy(logits, labels)?)
}

/// Mean cross-entropy between the distributions `targets` and
/// `softmax(logits / temperature)`, both `[batch, classes]`.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let log_q = log_softmax(&(logits / temperature)?, D::Minus1)?;
    Ok((targets * log_q)?.sum(D::Minus1)?.mean_all()?.neg()?)
}

/// The distillation loss (see the module documentation). `labels` is only
/// used when `hard_weight > 0`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use distill::loss::distillation_loss;
/// let dev = Device::Cpu;
/// let student = Tensor::new(&[[2.0f32, 0.0]], &dev)?;
/// // Soft targets equal to the student's own distribution at T = 2 leave
/// // only the entropy: T^2 * H(softmax([1, 0])).
/// let p = candle_nn::ops::softmax_last_dim(&(&student / 2.0)?)?;
/// let labels = Tensor::new(&[0u32], &dev)?;
/// let loss = distillation_loss(&student, &p, &labels, 2.0, 0.0)?.to_scalar::<f32>()?;
/// let q: f32 = 1.0 / (1.0 + (-1.0f32).exp());
/// let entropy = -(q * q.ln() + (1.0 - q) * (1.0 - q).ln());
/// assert!((loss - 4.0 * entropy).abs() < 1e-5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn distillation_loss(
    logits: &Tensor,
    soft_targets: &Tensor,
    labels: &Tensor,
    temperature: f64,
    hard_weight: f64,
) -> Result<Tensor> {
    let soft =
        (soft_cross_entropy(logits, soft_targets, temperature)? * (temperature * temperature))?;
    if hard_weight == 0.0 {
        return Ok(soft);
    }
    let hard = (hard_cross_entropy(logits, labels)? * hard_weight)?;
    Ok((soft + hard)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const B: usize = 3;
    const C: usize = 4;
    const Z: [f64; B * C] = [
        1.0, -2.0, 0.5, 3.0, 0.0, 0.0, 0.0, 0.0, -1.5, 2.5, 4.0, -0.5,
    ];
    const TEACHER: [f64; B * C] = [2.0, 1.0, 0.0, -1.0, 5.0, -5.0, 1.0, 0.5, 0.3, 0.2, 0.1, 3.0];
    const LABELS: [u32; B] = [3, 0, 2];

    fn softmax64(z: &[f64], t: f64) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| ((v - m) / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// Loss and gradient computed in f64 from the formulas:
    /// value as in the module docs; gradient per row
    /// T * (softmax(z/T) - p) / B + w * (softmax(z) - onehot) / B.
    fn reference(t: f64, w: f64) -> (f64, Vec<f64>) {
        let mut loss = 0.0;
        let mut grad = vec![0.0; B * C];
        for r in 0..B {
            let z = &Z[r * C..(r + 1) * C];
            let p = softmax64(&TEACHER[r * C..(r + 1) * C], t);
            let q_t = softmax64(z, t);
            let q_1 = softmax64(z, 1.0);
            for c in 0..C {
                loss -= t * t * p[c] * q_t[c].ln() / B as f64;
                let onehot = f64::from(u8::from(LABELS[r] as usize == c));
                grad[r * C + c] = (t * (q_t[c] - p[c]) + w * (q_1[c] - onehot)) / B as f64;
            }
            loss -= w * q_1[LABELS[r] as usize].ln() / B as f64;
        }
        (loss, grad)
    }

    #[test]
    fn value_and_gradient_match_an_f64_reference() {
        let dev = Device::Cpu;
        for (t, w) in [(1.0, 0.0), (2.0, 0.5), (20.0, 0.1), (4.0, 1.0)] {
            let z = Var::from_vec(Z.iter().map(|&v| v as f32).collect(), (B, C), &dev).unwrap();
            let p: Vec<f32> = (0..B)
                .flat_map(|r| softmax64(&TEACHER[r * C..(r + 1) * C], t))
                .map(|v| v as f32)
                .collect();
            let p = Tensor::from_vec(p, (B, C), &dev).unwrap();
            let labels = Tensor::new(&LABELS, &dev).unwrap();
            let loss = distillation_loss(z.as_tensor(), &p, &labels, t, w).unwrap();
            let grad = loss
                .backward()
                .unwrap()
                .get(&z)
                .unwrap()
                .flatten_all()
                .unwrap();
            let (want_loss, want_grad) = reference(t, w);
            let got_loss = f64::from(loss.to_scalar::<f32>().unwrap());
            // f32 arithmetic: relative 1e-5 on the value, 1e-6 absolute on gradients.
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                "T={t}: {got_loss} vs {want_loss}"
            );
            for (g, w) in grad.to_vec1::<f32>().unwrap().iter().zip(&want_grad) {
                assert!((f64::from(*g) - w).abs() < 1e-6, "T={t}: grad {g} vs {w}");
            }
        }
    }

    #[test]
    fn loss_is_smallest_when_student_matches_teacher() {
        let dev = Device::Cpu;
        let t = 3.0;
        let p: Vec<f32> = softmax64(&TEACHER[..C], t)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let p = Tensor::from_vec(p, (1, C), &dev).unwrap();
        let labels = Tensor::new(&[0u32], &dev).unwrap();
        let at = |z: Vec<f32>| {
            let z = Tensor::from_vec(z, (1, C), &dev).unwrap();
            distillation_loss(&z, &p, &labels, t, 0.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let matched = at(TEACHER[..C].iter().map(|&v| v as f32).collect());
        let off = at(TEACHER[..C].iter().map(|&v| v as f32 * 0.5).collect());
        assert!(matched < off);
    }
}
