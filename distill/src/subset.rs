//! Which training examples a model learns from: a random fraction of the
//! training split, and/or only some classes. The paper's experiments on
//! classes missing from the transfer set (section 3) and on soft targets as
//! a regulariser (section 6, 3% of the data) are made of these.

use common::seed::{self, Stream};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A selection of training examples, by random fraction then by class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExampleSubset {
    /// Keep this fraction of the training split, drawn at random from
    /// `seed` (before the class filters), in (0, 1].
    pub fraction: f64,
    /// Leave out the examples of these classes.
    pub exclude_classes: Vec<u32>,
    /// Keep only the examples of these classes (empty: all classes).
    pub only_classes: Vec<u32>,
    /// Seed of the random fraction.
    pub seed: u64,
}

impl Default for ExampleSubset {
    fn default() -> Self {
        ExampleSubset {
            fraction: 1.0,
            exclude_classes: Vec::new(),
            only_classes: Vec::new(),
            seed: 1,
        }
    }
}

impl ExampleSubset {
    /// True when it keeps every example.
    pub fn is_everything(&self) -> bool {
        self.fraction >= 1.0 && self.exclude_classes.is_empty() && self.only_classes.is_empty()
    }

    /// Checks the fields against a problem of `num_classes` classes; the
    /// error names the field.
    pub fn validate(&self, num_classes: usize) -> Result<()> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(Error::invalid(
                "fraction",
                format!("must be in (0, 1], got {}", self.fraction),
            ));
        }
        for (name, classes) in [
            ("exclude_classes", &self.exclude_classes),
            ("only_classes", &self.only_classes),
        ] {
            if let Some(c) = classes.iter().find(|&&c| c as usize >= num_classes) {
                return Err(Error::invalid(
                    name,
                    format!("class {c} does not exist (the data has {num_classes} classes)"),
                ));
            }
        }
        if !self.exclude_classes.is_empty() && !self.only_classes.is_empty() {
            return Err(Error::invalid(
                "exclude_classes",
                "give exclude_classes or only_classes, not both",
            ));
        }
        Ok(())
    }

    /// `keep[i]` tells whether training example `i` (of `labels`) is in the
    /// subset. Fails when the subset is empty.
    pub fn mask(&self, labels: &[u32], num_classes: usize) -> Result<Vec<bool>> {
        self.validate(num_classes)?;
        let mut keep = vec![self.fraction >= 1.0; labels.len()];
        if self.fraction < 1.0 {
            let mut order: Vec<usize> = (0..labels.len()).collect();
            order.shuffle(&mut seed::rng(self.seed, Stream::Subset));
            let count = ((labels.len() as f64 * self.fraction).round() as usize).max(1);
            for &i in &order[..count.min(labels.len())] {
                keep[i] = true;
            }
        }
        for (k, &label) in keep.iter_mut().zip(labels) {
            let class_kept = if self.only_classes.is_empty() {
                !self.exclude_classes.contains(&label)
            } else {
                self.only_classes.contains(&label)
            };
            *k &= class_kept;
        }
        if !keep.contains(&true) {
            return Err(Error::invalid(
                "example subset",
                "keeps no training example; check fraction and the class lists",
            ));
        }
        Ok(keep)
    }
}

/// The indices `i` with `keep[i]`.
pub fn kept_indices(keep: &[bool]) -> Vec<usize> {
    keep.iter()
        .enumerate()
        .filter_map(|(i, &k)| k.then_some(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u32> {
        (0..1000).map(|i| i % 10).collect()
    }

    #[test]
    fn everything_by_default() {
        let s = ExampleSubset::default();
        assert!(s.is_everything());
        assert!(s.mask(&labels(), 10).unwrap().iter().all(|&k| k));
    }

    #[test]
    fn fraction_is_seeded_and_sized() {
        let s = ExampleSubset {
            fraction: 0.03,
            seed: 7,
            ..ExampleSubset::default()
        };
        let a = s.mask(&labels(), 10).unwrap();
        assert_eq!(a.iter().filter(|&&k| k).count(), 30);
        assert_eq!(a, s.mask(&labels(), 10).unwrap());
        let other = ExampleSubset { seed: 8, ..s };
        assert_ne!(a, other.mask(&labels(), 10).unwrap());
    }

    #[test]
    fn class_filters_keep_exactly_their_classes() {
        let labels = labels();
        let without_3 = ExampleSubset {
            exclude_classes: vec![3],
            ..ExampleSubset::default()
        }
        .mask(&labels, 10)
        .unwrap();
        assert!(labels.iter().zip(&without_3).all(|(&l, &k)| k == (l != 3)));
        let only_7_8 = ExampleSubset {
            only_classes: vec![7, 8],
            ..ExampleSubset::default()
        }
        .mask(&labels, 10)
        .unwrap();
        assert_eq!(kept_indices(&only_7_8).len(), 200);
        assert!(labels
            .iter()
            .zip(&only_7_8)
            .all(|(&l, &k)| k == (l == 7 || l == 8)));
    }

    #[test]
    fn bad_subsets_are_named() {
        let err = |s: ExampleSubset| s.mask(&labels(), 10).unwrap_err().to_string();
        assert!(err(ExampleSubset {
            fraction: 0.0,
            ..Default::default()
        })
        .contains("fraction"));
        assert!(err(ExampleSubset {
            exclude_classes: vec![10],
            ..Default::default()
        })
        .contains("class 10 does not exist"));
        assert!(err(ExampleSubset {
            exclude_classes: vec![1],
            only_classes: vec![2],
            ..Default::default()
        })
        .contains("not both"));
        assert!(err(ExampleSubset {
            exclude_classes: (0..10).collect(),
            ..Default::default()
        })
        .contains("keeps no training example"));
    }
}
