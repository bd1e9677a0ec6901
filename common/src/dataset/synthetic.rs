//! A built-in synthetic classification problem, so that the quick start and
//! the fast tests need no files.
//!
//! Classes come in groups that are deliberately confusable: each group has a
//! centre, each class a centre near its group's, and each class two modes
//! around its centre (so that a linear model does not suffice). Examples are
//! a mode plus Gaussian noise. A teacher therefore learns "dark knowledge"
//! worth distilling: the wrong classes of the right group get far more
//! probability than the others.

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::{Dataset, Normalization};
use crate::seed::{self, ChaCha8Rng, Stream};
use crate::{Error, Result};

/// Parameters of the synthetic dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    /// Number of classes.
    pub num_classes: usize,
    /// Classes per confusable group (the last group may be smaller).
    pub group_size: usize,
    /// Features per example.
    pub dim: usize,
    /// Training examples (before the validation split).
    pub train_size: usize,
    /// Test examples.
    pub test_size: usize,
    /// Standard deviation of group centres around the origin.
    pub group_spread: f32,
    /// Standard deviation of class centres around their group's centre.
    pub class_spread: f32,
    /// Standard deviation of each example around its mode.
    pub noise: f32,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            num_classes: 12,
            group_size: 3,
            dim: 32,
            train_size: 6000,
            test_size: 2000,
            group_spread: 3.0,
            class_spread: 1.0,
            noise: 2.5,
            seed: 17,
        }
    }
}

impl SyntheticSpec {
    /// Checks every field and says which one is wrong.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::invalid(
                    format!("synthetic.{name}"),
                    "must be at least 1, got 0",
                ))
            } else {
                Ok(())
            }
        };
        positive("group_size", self.group_size)?;
        positive("dim", self.dim)?;
        positive("train_size", self.train_size)?;
        positive("test_size", self.test_size)?;
        if self.num_classes < 2 {
            return Err(Error::invalid(
                "synthetic.num_classes",
                format!("must be at least 2, got {}", self.num_classes),
            ));
        }
        for (name, v) in [
            ("group_spread", self.group_spread),
            ("class_spread", self.class_spread),
            ("noise", self.noise),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(
                    format!("synthetic.{name}"),
                    format!("must be a finite number >= 0, got {v}"),
                ));
            }
        }
        Ok(())
    }

    /// Generates `(train, test)` from the same class geometry.
    pub fn generate(&self) -> Result<(Dataset, Dataset)> {
        let mut stream = self.stream()?;
        let train = stream.next(self.train_size)?;
        let test = stream.next(self.test_size)?;
        Ok((train, test))
    }

    /// The same examples as [`SyntheticSpec::generate`], in chunks: the
    /// training examples, then the test examples.
    pub fn stream(&self) -> Result<SyntheticStream> {
        self.validate()?;
        let mut rng = seed::rng(self.seed, Stream::Synthetic);
        let groups = self.num_classes.div_ceil(self.group_size);
        let group_centres: Vec<Vec<f32>> = (0..groups)
            .map(|_| {
                (0..self.dim)
                    .map(|_| gaussian(self.group_spread).sample(&mut rng))
                    .collect()
            })
            .collect();
        let modes: Vec<[Vec<f32>; 2]> = (0..self.num_classes)
            .map(|c| {
                let centre: Vec<f32> = group_centres[c / self.group_size]
                    .iter()
                    .map(|g| g + gaussian(self.class_spread).sample(&mut rng))
                    .collect();
                let offset: Vec<f32> = (0..self.dim)
                    .map(|_| gaussian(self.class_spread * 0.5).sample(&mut rng))
                    .collect();
                let a = centre.iter().zip(&offset).map(|(c, o)| c + o).collect();
                let b = centre.iter().zip(&offset).map(|(c, o)| c - o).collect();
                [a, b]
            })
            .collect();
        Ok(SyntheticStream {
            spec: self.clone(),
            rng,
            modes,
            made: 0,
        })
    }
}

fn gaussian(sd: f32) -> Normal<f32> {
    Normal::new(0.0, sd).expect("validated standard deviation")
}

/// The synthetic examples of a [`SyntheticSpec`], made on demand: each
/// depends on the ones before it (one random stream), so they come in
/// order, training examples first.
pub struct SyntheticStream {
    spec: SyntheticSpec,
    rng: ChaCha8Rng,
    modes: Vec<[Vec<f32>; 2]>,
    made: usize,
}

impl SyntheticStream {
    /// The next `n` examples (training examples while there are any; a
    /// chunk does not straddle the two), named after their split.
    pub fn next(&mut self, n: usize) -> Result<Dataset> {
        let spec = &self.spec;
        let in_train = self.made < spec.train_size;
        let left = if in_train {
            spec.train_size - self.made
        } else {
            spec.train_size + spec.test_size - self.made
        };
        let n = n.min(left);
        let mut features = Vec::with_capacity(n * spec.dim);
        let mut labels = Vec::with_capacity(n);
        let noise = gaussian(spec.noise);
        for _ in 0..n {
            let class = self.rng.random_range(0..spec.num_classes);
            let mode = &self.modes[class][self.rng.random_range(0..2)];
            features.extend(mode.iter().map(|m| m + noise.sample(&mut self.rng)));
            labels.push(class as u32);
        }
        self.made += n;
        Dataset::new(
            if in_train {
                "synthetic/train"
            } else {
                "synthetic/test"
            },
            features,
            labels,
            spec.dim,
            spec.num_classes,
            None,
            Normalization::Identity,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let spec = SyntheticSpec {
            train_size: 50,
            test_size: 10,
            ..Default::default()
        };
        let (a, _) = spec.generate().unwrap();
        let (b, _) = spec.generate().unwrap();
        let (c, _) = SyntheticSpec {
            seed: 1,
            ..spec.clone()
        }
        .generate()
        .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!((a.len(), a.dim(), a.num_classes()), (50, 32, 12));
    }

    #[test]
    fn every_class_appears_in_a_large_sample() {
        let (train, _) = SyntheticSpec::default().generate().unwrap();
        assert!(train.class_counts().iter().all(|&c| c > 300));
    }

    #[test]
    fn classes_of_a_group_are_closer_than_classes_of_different_groups() {
        let spec = SyntheticSpec::default();
        let (train, _) = spec.generate().unwrap();
        let mean = |class: u32| {
            let mut m = vec![0f64; train.dim()];
            let mut n = 0.0;
            for i in (0..train.len()).filter(|&i| train.labels()[i] == class) {
                for (a, &x) in m.iter_mut().zip(train.example(i)) {
                    *a += f64::from(x);
                }
                n += 1.0;
            }
            m.iter().map(|a| a / n).collect::<Vec<_>>()
        };
        let dist =
            |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        let (m0, m1, m3) = (mean(0), mean(1), mean(3));
        assert!(dist(&m0, &m1) * 2.0 < dist(&m0, &m3));
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = SyntheticSpec {
            dim: 0,
            ..Default::default()
        }
        .generate()
        .unwrap_err();
        assert!(e.to_string().contains("synthetic.dim"));
        let e = SyntheticSpec {
            noise: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("synthetic.noise"));
        let e = SyntheticSpec {
            num_classes: 1,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("num_classes"));
    }
}
