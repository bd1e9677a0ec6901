//! Soft targets from stored logits: softmax at temperature T, and the
//! ensemble's combined distribution.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How the members' distributions at temperature T are combined into one
/// target distribution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnsembleCombine {
    /// The arithmetic mean of the members' softmax(z/T) (the paper's choice).
    #[default]
    Arithmetic,
    /// The renormalised geometric mean of the members' softmax(z/T), which
    /// equals softmax(mean(z)/T).
    Geometric,
}

/// Soft targets for `rows` examples: `members[k]` holds teacher k's logits
/// (`rows * classes`, row-major); the result is `rows * classes`
/// probabilities, each row summing to 1. Computed in f64 and rounded once.
///
/// ```
/// use common::transfer::{soft_targets, EnsembleCombine};
/// // One example, two classes, two teachers; at T = 1 the arithmetic mean
/// // of their softmax outputs.
/// let (a, b): (&[f32], &[f32]) = (&[0.0, 2.0], &[2.0, 0.0]);
/// let p = soft_targets(&[a, b], 2, 1.0, EnsembleCombine::Arithmetic).unwrap();
/// assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6);
/// ```
pub fn soft_targets(
    members: &[&[f32]],
    classes: usize,
    temperature: f64,
    combine: EnsembleCombine,
) -> Result<Vec<f32>> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::invalid(
            "temperature",
            format!("must be a finite number > 0, got {temperature}"),
        ));
    }
    let first = members
        .first()
        .ok_or_else(|| Error::invalid("ensemble", "no teacher logits given"))?;
    if classes == 0
        || !first.len().is_multiple_of(classes)
        || members.iter().any(|m| m.len() != first.len())
    {
        return Err(Error::invalid(
            "teacher logits",
            format!("members must all hold rows x {classes} values"),
        ));
    }
    let rows = first.len() / classes;
    let k = members.len() as f64;
    let mut out = vec![0f32; first.len()];
    let mut acc = vec![0f64; classes];
    let mut z = vec![0f64; classes];
    for r in 0..rows {
        let span = r * classes..(r + 1) * classes;
        acc.iter_mut().for_each(|a| *a = 0.0);
        match combine {
            EnsembleCombine::Arithmetic => {
                for m in members {
                    for (zc, &l) in z.iter_mut().zip(&m[span.clone()]) {
                        *zc = f64::from(l) / temperature;
                    }
                    softmax_in_place(&mut z);
                    for (a, p) in acc.iter_mut().zip(&z) {
                        *a += p / k;
                    }
                }
            }
            EnsembleCombine::Geometric => {
                for m in members {
                    for (a, &l) in acc.iter_mut().zip(&m[span.clone()]) {
                        *a += f64::from(l) / temperature / k;
                    }
                }
                softmax_in_place(&mut acc);
            }
        }
        for (o, a) in out[span].iter_mut().zip(&acc) {
            *o = *a as f32;
        }
    }
    Ok(out)
}

fn softmax_in_place(z: &mut [f64]) {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    z.iter_mut().for_each(|v| *v /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_teacher_matches_hand_computed_softmax() {
        // softmax([1, 2, 3] / 2) = exp([0.5, 1, 1.5]) / sum
        let t = soft_targets(&[&[1.0, 2.0, 3.0]], 3, 2.0, EnsembleCombine::Arithmetic).unwrap();
        let e: Vec<f64> = [0.5f64, 1.0, 1.5].iter().map(|x| x.exp()).collect();
        let s: f64 = e.iter().sum();
        for (a, b) in t.iter().zip(&e) {
            assert!((f64::from(*a) - b / s).abs() < 1e-7);
        }
    }

    #[test]
    fn high_temperature_flattens_and_low_sharpens() {
        let z: &[f32] = &[0.0, 5.0];
        let hot = soft_targets(&[z], 2, 100.0, EnsembleCombine::Arithmetic).unwrap();
        let cold = soft_targets(&[z], 2, 0.1, EnsembleCombine::Arithmetic).unwrap();
        assert!((hot[0] - 0.5).abs() < 0.02);
        assert!(cold[1] > 0.999_999);
    }

    #[test]
    fn arithmetic_and_geometric_means_of_two_members() {
        let a: &[f32] = &[0.0, 2.0];
        let b: &[f32] = &[2.0, 0.0];
        let arith = soft_targets(&[a, b], 2, 1.0, EnsembleCombine::Arithmetic).unwrap();
        assert!((arith[0] - 0.5).abs() < 1e-7);
        // Geometric: softmax(mean logits) = softmax([1, 1]).
        let geo = soft_targets(&[a, b], 2, 1.0, EnsembleCombine::Geometric).unwrap();
        assert!((geo[0] - 0.5).abs() < 1e-7);
        // An asymmetric case where the two differ.
        let c: &[f32] = &[0.0, 4.0];
        let arith = soft_targets(&[a, c], 2, 1.0, EnsembleCombine::Arithmetic).unwrap();
        let s = |x: f64| 1.0 / (1.0 + x.exp());
        assert!((f64::from(arith[0]) - (s(2.0) + s(4.0)) / 2.0).abs() < 1e-7);
        let geo = soft_targets(&[a, c], 2, 1.0, EnsembleCombine::Geometric).unwrap();
        assert!((f64::from(geo[0]) - s(3.0)).abs() < 1e-7);
    }

    #[test]
    fn bad_temperature_and_shapes_are_rejected() {
        let z: &[f32] = &[0.0, 1.0];
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = soft_targets(&[z], 2, t, EnsembleCombine::Arithmetic).unwrap_err();
            assert!(e.to_string().contains("temperature"), "{e}");
        }
        assert!(soft_targets(&[z, &[0.0]], 2, 1.0, EnsembleCombine::Arithmetic).is_err());
        assert!(soft_targets(&[], 2, 1.0, EnsembleCombine::Arithmetic).is_err());
    }
}
