//! Combining a generalist with specialists at inference (Hinton, Vinyals &
//! Dean 2015, eq. 5): the distribution q over all classes minimising
//!
//! ```text
//! KL(p_g, q) + Σ_m KL(p_m, q_m)
//! ```
//!
//! over the active specialists m, where q_m is q seen through specialist
//! m's classes: q itself on the classes it covers and, for its dustbin, the
//! sum of q over every class it does not cover.
//!
//! Only the cross-entropy part of each KL depends on q, so the objective
//! is `-Σ_c a_c log q_c - Σ_m b_m log Σ_{c ∉ S_m} q_c` with `a` the
//! generalist's probabilities plus the specialists' probabilities of their
//! own classes, and `b_m` specialist m's dustbin probability. It is convex
//! in q on the simplex. The solver is the EM (minorise-maximise) iteration
//! for it,
//!
//! ```text
//! q_c <- (a_c + q_c Σ_{m: c ∉ S_m} b_m / Q_m) / (Σ a + Σ b),   Q_m = Σ_{c ∉ S_m} q_c
//! ```
//!
//! which decreases the objective at every step and converges to its
//! minimum; it stops when no probability moves by more than the tolerance.

/// A specialist's view of one example: the classes it covers (indices into
/// the full class list) and its probabilities for them, followed by its
/// dustbin probability (`probs.len() == classes.len() + 1`).
#[derive(Clone, Copy, Debug)]
pub struct SpecialistOutput<'a> {
    /// Covered classes, distinct, each below the number of classes.
    pub classes: &'a [usize],
    /// Probabilities of `classes`, then of the dustbin; they sum to 1.
    pub probs: &'a [f64],
}

/// How the solver stops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SolverSettings {
    /// Stop when no probability changes by more than this in an iteration.
    pub tolerance: f64,
    /// Give up after this many iterations (the result is then the last
    /// iterate, still a distribution).
    pub max_iterations: usize,
}

impl Default for SolverSettings {
    fn default() -> Self {
        SolverSettings {
            tolerance: 1e-9,
            max_iterations: 10_000,
        }
    }
}

/// The minimiser q of eq. 5 for one example, and how many iterations it
/// took. With no specialists the answer is the generalist's `p` itself.
pub fn combine(
    generalist: &[f64],
    specialists: &[SpecialistOutput<'_>],
    settings: SolverSettings,
) -> (Vec<f64>, usize) {
    let classes = generalist.len();
    let mut a = generalist.to_vec();
    let mut outside: Vec<Vec<bool>> = Vec::with_capacity(specialists.len());
    let mut b = Vec::with_capacity(specialists.len());
    for s in specialists {
        assert_eq!(
            s.probs.len(),
            s.classes.len() + 1,
            "probabilities + dustbin"
        );
        let mut out = vec![true; classes];
        for (&c, &p) in s.classes.iter().zip(s.probs) {
            a[c] += p;
            out[c] = false;
        }
        outside.push(out);
        b.push(s.probs[s.classes.len()]);
    }
    let total: f64 = a.iter().sum::<f64>() + b.iter().sum::<f64>();
    // Start from the uniform distribution: every class positive, so any
    // class that the optimum gives mass to can receive it.
    let mut q = vec![1.0 / classes as f64; classes];
    let mut next = vec![0.0; classes];
    for iteration in 1..=settings.max_iterations {
        next.copy_from_slice(&a);
        for (out, &b_m) in outside.iter().zip(&b) {
            let q_out: f64 = q.iter().zip(out).filter(|(_, &o)| o).map(|(q, _)| q).sum();
            if q_out > 0.0 {
                for c in 0..classes {
                    if out[c] {
                        next[c] += b_m * q[c] / q_out;
                    }
                }
            }
        }
        let mut change = 0f64;
        for (q, n) in q.iter_mut().zip(&next) {
            let n = n / total;
            change = change.max((n - *q).abs());
            *q = n;
        }
        if change <= settings.tolerance {
            return (q, iteration);
        }
    }
    (q, settings.max_iterations)
}

/// The specialists active for one example (paper, section 5): those whose
/// classes include any of the generalist's `top_n` most probable classes.
/// `clusters[m]` lists specialist m's classes.
pub fn active_specialists(generalist: &[f64], clusters: &[Vec<usize>], top_n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..generalist.len()).collect();
    order.sort_by(|&a, &b| generalist[b].total_cmp(&generalist[a]).then(a.cmp(&b)));
    let top = &order[..top_n.min(order.len())];
    clusters
        .iter()
        .enumerate()
        .filter(|(_, classes)| classes.iter().any(|c| top.contains(c)))
        .map(|(m, _)| m)
        .collect()
}

/// Eq. 5 for every example: `generalist` is `rows x classes`; specialist m
/// covers `clusters[m]` and its output `specialists[m]` is `rows x
/// (clusters[m].len() + 1)` (dustbin last). Each row is combined with the
/// specialists that [`active_specialists`] selects for it. Returns the
/// combined distributions, `rows x classes`; rows are solved in parallel.
pub fn combine_batch(
    generalist: &[f64],
    classes: usize,
    clusters: &[Vec<usize>],
    specialists: &[Vec<f64>],
    top_n: usize,
    settings: SolverSettings,
) -> Vec<f64> {
    assert_eq!(
        clusters.len(),
        specialists.len(),
        "one output per specialist"
    );
    use rayon::prelude::*;
    let mut out = vec![0f64; generalist.len()];
    out.par_chunks_mut(classes)
        .zip(generalist.par_chunks(classes))
        .enumerate()
        .for_each(|(r, (q, p))| {
            let outputs: Vec<SpecialistOutput<'_>> = active_specialists(p, clusters, top_n)
                .into_iter()
                .map(|m| {
                    let width = clusters[m].len() + 1;
                    SpecialistOutput {
                        classes: &clusters[m],
                        probs: &specialists[m][r * width..(r + 1) * width],
                    }
                })
                .collect();
            q.copy_from_slice(&combine(p, &outputs, settings).0);
        });
    out
}

/// The objective of eq. 5 at `q` (up to the constant entropies of the
/// models' distributions): the sum of the cross-entropies.
pub fn objective(generalist: &[f64], specialists: &[SpecialistOutput<'_>], q: &[f64]) -> f64 {
    let ce = |p: f64, q: f64| if p > 0.0 { -p * q.ln() } else { 0.0 };
    let mut total: f64 = generalist.iter().zip(q).map(|(&p, &q)| ce(p, q)).sum();
    for s in specialists {
        let mut inside = 0.0;
        for (&c, &p) in s.classes.iter().zip(s.probs) {
            total += ce(p, q[c]);
            inside += q[c];
        }
        total += ce(s.probs[s.classes.len()], (1.0 - inside).max(0.0));
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SolverSettings {
        SolverSettings::default()
    }

    #[test]
    fn a_single_model_gives_back_its_own_distribution() {
        let p = [0.7, 0.2, 0.1];
        let (q, _) = combine(&p, &[], settings());
        for (q, p) in q.iter().zip(p) {
            assert!((q - p).abs() < 1e-12, "{q} vs {p}");
        }
    }

    #[test]
    fn a_specialist_that_agrees_changes_nothing() {
        let p = [0.5, 0.3, 0.15, 0.05];
        // Covers classes 0 and 1 and agrees with the generalist: 0.5, 0.3,
        // and the dustbin 0.2 = p[2] + p[3].
        let s = SpecialistOutput {
            classes: &[0, 1],
            probs: &[0.5, 0.3, 0.2],
        };
        let (q, _) = combine(&p, &[s], settings());
        for (q, p) in q.iter().zip(p) {
            assert!((q - p).abs() < 1e-7, "{q} vs {p}");
        }
    }

    #[test]
    fn dustbin_mass_is_spread_over_uncovered_classes_by_the_generalist() {
        // A specialist sure the example is none of its classes: the combined
        // distribution moves mass off them, onto the others in the
        // generalist's proportions.
        let p = [0.4, 0.4, 0.15, 0.05];
        let s = SpecialistOutput {
            classes: &[0, 1],
            probs: &[0.0, 0.0, 1.0],
        };
        let (q, _) = combine(&p, &[s], settings());
        assert!(q[2] + q[3] > p[2] + p[3]);
        assert!((q[2] / q[3] - 3.0).abs() < 1e-6, "{q:?}");
        assert!((q.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn only_specialists_covering_the_top_classes_take_part() {
        let clusters = vec![vec![0, 1], vec![2], vec![3, 4]];
        let p = [0.05, 0.5, 0.1, 0.3, 0.05];
        assert_eq!(active_specialists(&p, &clusters, 1), vec![0]);
        assert_eq!(active_specialists(&p, &clusters, 2), vec![0, 2]);
        // Batched: row 0 activates specialist 0 only, which pulls class 0
        // up; row 1's top class is 2, so specialist 0 is ignored there.
        let generalist = [0.4, 0.35, 0.25, 0.1, 0.2, 0.7];
        let clusters = vec![vec![0], vec![2]];
        let specialists = vec![vec![0.9, 0.1, 0.9, 0.1], vec![0.5, 0.5, 0.8, 0.2]];
        let q = combine_batch(&generalist, 3, &clusters, &specialists, 1, settings());
        let (row0, _) = combine(
            &generalist[..3],
            &[SpecialistOutput {
                classes: &[0],
                probs: &[0.9, 0.1],
            }],
            settings(),
        );
        let (row1, _) = combine(
            &generalist[3..],
            &[SpecialistOutput {
                classes: &[2],
                probs: &[0.8, 0.2],
            }],
            settings(),
        );
        assert_eq!(&q[..3], &row0[..]);
        assert_eq!(&q[3..], &row1[..]);
        assert!(q[0] > generalist[0]);
    }

    /// Every point of a grid on the 3-class simplex, the best one kept.
    fn brute_force(p: &[f64], specialists: &[SpecialistOutput<'_>]) -> (Vec<f64>, f64) {
        let n = 2000;
        let mut best = (vec![], f64::INFINITY);
        for i in 1..n {
            for j in 1..n - i {
                let q = [
                    i as f64 / n as f64,
                    j as f64 / n as f64,
                    (n - i - j) as f64 / n as f64,
                ];
                let f = objective(p, specialists, &q);
                if f < best.1 {
                    best = (q.to_vec(), f);
                }
            }
        }
        best
    }

    #[test]
    fn matches_a_brute_force_search_on_small_cases() {
        // (generalist, [(specialist's classes, its probabilities + dustbin)])
        type Case = (Vec<f64>, Vec<(Vec<usize>, Vec<f64>)>);
        let cases: Vec<Case> = vec![
            (vec![0.6, 0.3, 0.1], vec![(vec![0, 1], vec![0.2, 0.7, 0.1])]),
            (
                vec![0.2, 0.5, 0.3],
                vec![(vec![0], vec![0.6, 0.4]), (vec![1, 2], vec![0.1, 0.3, 0.6])],
            ),
            (vec![1.0 / 3.0; 3], vec![(vec![2], vec![0.9, 0.1])]),
        ];
        for (p, specs) in &cases {
            let specialists: Vec<SpecialistOutput<'_>> = specs
                .iter()
                .map(|(c, pr)| SpecialistOutput {
                    classes: c,
                    probs: pr,
                })
                .collect();
            let (q, _) = combine(p, &specialists, settings());
            let (grid_q, grid_f) = brute_force(p, &specialists);
            let f = objective(p, &specialists, &q);
            // The solver is at least as good as the best grid point, and
            // lands within the grid's resolution of it.
            assert!(f <= grid_f + 1e-12, "{f} vs grid {grid_f}");
            for (a, b) in q.iter().zip(&grid_q) {
                assert!((a - b).abs() < 2e-3, "{q:?} vs {grid_q:?}");
            }
        }
    }
}
