//! The generalist and its specialists used together (eq. 5): each model's
//! class probabilities at T = 1, combined per example over the specialists
//! that the generalist's top classes activate.

use std::ops::Range;

use common::dataset::Dataset;
use common::transfer::{soft_targets, EnsembleCombine};
use serde::{Deserialize, Serialize};

use super::combine::{combine_batch, SolverSettings};
use super::specialist::check_classes;
use crate::eval::Logits;
use crate::{Error, Result};

/// The classes each specialist covers, as the clustering task stores them
/// (`specialists/clusters.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clusters {
    /// Classes of the data.
    pub num_classes: usize,
    /// Specialist m covers `clusters[m]` (increasing class numbers).
    pub clusters: Vec<Vec<usize>>,
}

impl Clusters {
    /// Parses and checks a clusters file; `name` names it in errors.
    pub fn from_json(bytes: &[u8], name: &str) -> Result<Self> {
        let clusters: Clusters = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid(name, format!("not a clusters file: {e}")))?;
        clusters.validate()?;
        Ok(clusters)
    }

    /// Checks every cluster with [`check_classes`].
    pub fn validate(&self) -> Result<()> {
        if self.clusters.is_empty() {
            return Err(Error::invalid("clusters", "no specialist"));
        }
        for classes in &self.clusters {
            check_classes(classes, self.num_classes)?;
        }
        Ok(())
    }

    /// How many specialists cover each class.
    pub fn coverage(&self) -> Vec<usize> {
        let mut count = vec![0; self.num_classes];
        for c in self.clusters.iter().flatten() {
            count[*c] += 1;
        }
        count
    }
}

/// A generalist with its specialists, ready for inference.
pub struct SpecialistEnsemble<'a> {
    generalist: Box<dyn Logits + 'a>,
    specialists: Vec<Box<dyn Logits + 'a>>,
    clusters: &'a Clusters,
    top_n: usize,
    settings: SolverSettings,
}

impl<'a> SpecialistEnsemble<'a> {
    /// Checks that specialist m has `clusters[m].len() + 1` outputs and
    /// the generalist one per class.
    pub fn new(
        generalist: Box<dyn Logits + 'a>,
        specialists: Vec<Box<dyn Logits + 'a>>,
        clusters: &'a Clusters,
        top_n: usize,
    ) -> Result<Self> {
        if generalist.num_classes() != clusters.num_classes {
            return Err(Error::invalid(
                "generalist",
                format!(
                    "has {} outputs for {} classes",
                    generalist.num_classes(),
                    clusters.num_classes
                ),
            ));
        }
        if specialists.len() != clusters.clusters.len() {
            return Err(Error::invalid(
                "specialists",
                format!(
                    "{} models for {} clusters",
                    specialists.len(),
                    clusters.clusters.len()
                ),
            ));
        }
        for (m, (model, classes)) in specialists.iter().zip(&clusters.clusters).enumerate() {
            if model.num_classes() != classes.len() + 1 {
                return Err(Error::invalid(
                    "specialists",
                    format!(
                        "specialist {m} has {} outputs, its {} classes + dustbin need {}",
                        model.num_classes(),
                        classes.len(),
                        classes.len() + 1
                    ),
                ));
            }
        }
        if top_n == 0 {
            return Err(Error::invalid("top_n", "must be at least 1"));
        }
        Ok(SpecialistEnsemble {
            generalist,
            specialists,
            clusters,
            top_n,
            settings: SolverSettings::default(),
        })
    }

    /// The generalist's distribution (T = 1) over the examples `rows` of
    /// `data`, row-major.
    pub fn generalist_probabilities(&self, data: &Dataset, rows: Range<usize>) -> Result<Vec<f64>> {
        probabilities(&*self.generalist, data, rows)
    }

    /// The combined distribution q of eq. 5 for the examples `rows` of
    /// `data`, given the generalist's distribution `p` over them.
    pub fn combined_given(
        &self,
        p: &[f64],
        data: &Dataset,
        rows: Range<usize>,
    ) -> Result<Vec<f64>> {
        let specialists = self
            .specialists
            .iter()
            .map(|s| probabilities(&**s, data, rows.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(combine_batch(
            p,
            self.clusters.num_classes,
            &self.clusters.clusters,
            &specialists,
            self.top_n,
            self.settings,
        ))
    }

    /// The combined distribution q of eq. 5 for the examples `rows`.
    pub fn combined(&self, data: &Dataset, rows: Range<usize>) -> Result<Vec<f64>> {
        let p = self.generalist_probabilities(data, rows.clone())?;
        self.combined_given(&p, data, rows)
    }
}

fn probabilities(model: &dyn Logits, data: &Dataset, rows: Range<usize>) -> Result<Vec<f64>> {
    let logits = model.logits_of(data, rows)?;
    let width = model.num_classes();
    let p = soft_targets(&[&logits], width, 1.0, EnsembleCombine::Arithmetic)?;
    Ok(p.into_iter().map(f64::from).collect())
}

/// Logits whose softmax is `q` (`ln q`, floored so that a probability of 0
/// stays finite): how a combined distribution is stored in a transfer set
/// beside the teachers' logits. At temperature T the student then learns
/// softmax(ln q / T), q softened the way a teacher's logits are.
pub fn log_probabilities(q: &[f64]) -> Vec<f32> {
    q.iter().map(|&p| (p.max(1e-30).ln()) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::Predictor;
    use crate::model::{Mlp, MlpSpec};
    use candle_core::Device;
    use common::seed::{self, Stream};

    #[test]
    fn clusters_files_are_checked() {
        let ok = Clusters {
            num_classes: 4,
            clusters: vec![vec![0, 1], vec![1, 3]],
        };
        ok.validate().unwrap();
        assert_eq!(ok.coverage(), vec![1, 2, 0, 1]);
        let json = serde_json::to_vec(&ok).unwrap();
        assert_eq!(Clusters::from_json(&json, "c").unwrap(), ok);
        let bad = br#"{"num_classes": 4, "clusters": [[0, 7]]}"#;
        let err = Clusters::from_json(bad, "c").unwrap_err().to_string();
        assert!(err.contains("class 7 does not exist"), "{err}");
        assert!(Clusters::from_json(b"{}", "c").is_err());
    }

    #[test]
    fn combines_the_models_probabilities_with_eq_5() {
        // One specialist, top_n so large that it is always active: the
        // result is `combine_batch` over the models' softmax outputs.
        let device = Device::Cpu;
        let rng = &mut seed::rng(5, Stream::Init);
        let g = Mlp::new_random(MlpSpec::new(4, vec![3], 3).unwrap(), rng, &device).unwrap();
        let s = [Mlp::new_random(MlpSpec::new(4, vec![3], 2).unwrap(), rng, &device).unwrap()];
        let clusters = Clusters {
            num_classes: 3,
            clusters: vec![vec![1]],
        };
        let data = Dataset::new(
            "d",
            (0..20).map(|i| i as f32 / 10.0 - 1.0).collect(),
            vec![0; 5],
            4,
            3,
            None,
            common::dataset::Normalization::Identity,
        )
        .unwrap();
        let boxed = |m: &Mlp| Box::new(Predictor::new(m, &device).unwrap()) as Box<dyn Logits>;
        let ensemble =
            SpecialistEnsemble::new(boxed(&g), s.iter().map(boxed).collect(), &clusters, 3)
                .unwrap();
        let q = ensemble.combined(&data, 0..5).unwrap();
        let p = ensemble.generalist_probabilities(&data, 0..5).unwrap();
        let sp = probabilities(&Predictor::new(&s[0], &device).unwrap(), &data, 0..5).unwrap();
        let want = combine_batch(
            &p,
            3,
            &clusters.clusters,
            &[sp],
            3,
            SolverSettings::default(),
        );
        assert_eq!(q, want);
        for row in q.chunks(3) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
        let wrong = Clusters {
            num_classes: 3,
            clusters: vec![vec![0, 1]],
        };
        assert!(
            SpecialistEnsemble::new(boxed(&g), s.iter().map(boxed).collect(), &wrong, 1).is_err()
        );
    }

    #[test]
    fn log_probabilities_softmax_back_to_q() {
        let q = [0.7, 0.3, 0.0];
        let z = log_probabilities(&q);
        let back = soft_targets(&[&z], 3, 1.0, EnsembleCombine::Arithmetic).unwrap();
        assert!((back[0] - 0.7).abs() < 1e-6 && (back[1] - 0.3).abs() < 1e-6);
        assert!(back[2] < 1e-20);
    }
}
