//! Where a job's examples come from: the dataset formats it can read, each
//! loaded as a training set and a test set.
//!
//! A new format is one variant of [`DatasetSource`] (its name, what it
//! needs, how it loads) and one module that parses it, like [`super::idx`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::stream::{IdxSource, SourceStream, SyntheticSource};
use super::synthetic::SyntheticSpec;
use super::Dataset;
use crate::paths::datasets_dir;
use crate::{Error, Result};

/// A dataset format, as `[dataset] source` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetSource {
    /// The built-in synthetic problem (no files needed).
    Synthetic,
    /// MNIST IDX files (`DATASETS_DIR/mnist` unless `dir` is given).
    Mnist,
    /// Fashion-MNIST IDX files (`DATASETS_DIR/fashion-mnist` unless `dir`).
    FashionMnist,
}

/// What `[dataset]` says about the source besides naming it.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceOptions<'a> {
    /// The folder of its files (already resolved against the config's
    /// folder), if given.
    pub dir: Option<&'a Path>,
    /// Parameters of the synthetic problem, if given.
    pub synthetic: Option<&'a SyntheticSpec>,
}

/// A `[dataset]` key that does not fit the source, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionError {
    /// The key under `[dataset]`, such as `dir`.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl DatasetSource {
    /// The dataset's name in reports and its folder under `DATASETS_DIR`.
    pub fn name(self) -> &'static str {
        match self {
            DatasetSource::Synthetic => "synthetic",
            DatasetSource::Mnist => "mnist",
            DatasetSource::FashionMnist => "fashion-mnist",
        }
    }

    /// Checks that `options` are ones this source takes, and valid.
    pub fn check(self, options: SourceOptions<'_>) -> std::result::Result<(), OptionError> {
        let error = |key, reason: String| Err(OptionError { key, reason });
        match (self, options.synthetic, options.dir) {
            (DatasetSource::Synthetic, Some(spec), _) => spec
                .validate()
                .or_else(|e| error("synthetic", e.to_string())),
            (DatasetSource::Synthetic, None, Some(_)) => {
                error("dir", "is not used by source = \"synthetic\"".into())
            }
            (_, Some(_), _) => error(
                "synthetic",
                format!(
                    "is only allowed with source = \"synthetic\", not {:?}",
                    self.name()
                ),
            ),
            _ => Ok(()),
        }
    }

    /// Loads the training set and the test set.
    pub fn load(self, options: SourceOptions<'_>) -> Result<(Dataset, Dataset)> {
        match self {
            DatasetSource::Synthetic => options.synthetic.cloned().unwrap_or_default().generate(),
            DatasetSource::Mnist | DatasetSource::FashionMnist => {
                let dir = self.dir(options);
                super::idx::load_mnist_folder(&dir, self.name()).map_err(|e| self.explain(e))
            }
        }
    }

    /// Opens the source to read in chunks (see [`super::stream`]).
    pub fn open(self, options: SourceOptions<'_>) -> Result<Box<dyn SourceStream>> {
        match self {
            DatasetSource::Synthetic => Ok(Box::new(SyntheticSource::new(
                &options.synthetic.cloned().unwrap_or_default(),
            )?)),
            DatasetSource::Mnist | DatasetSource::FashionMnist => {
                let dir = self.dir(options);
                Ok(Box::new(
                    IdxSource::open(&dir, self.name()).map_err(|e| self.explain(e))?,
                ))
            }
        }
    }

    /// `e` (a file-based source's error) with where its files are looked for.
    fn explain(self, e: Error) -> Error {
        Error::invalid(
            "dataset",
            format!(
                "{e}\n(dataset.source = {:?} reads the IDX files from `dataset.dir`, \
                 default $DATASETS_DIR/{}; set DATASETS_DIR or `dataset.dir`)",
                self.name(),
                self.name()
            ),
        )
    }

    /// The folder a file-based source reads: `options.dir`, or its folder
    /// under `DATASETS_DIR`.
    fn dir(self, options: SourceOptions<'_>) -> PathBuf {
        options
            .dir
            .map_or_else(|| datasets_dir().join(self.name()), Path::to_path_buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_that_do_not_fit_the_source_are_named() {
        let spec = SyntheticSpec::default();
        let dir = Path::new("d");
        let synthetic_dir = SourceOptions {
            dir: Some(dir),
            synthetic: None,
        };
        assert_eq!(
            DatasetSource::Synthetic
                .check(synthetic_dir)
                .unwrap_err()
                .key,
            "dir"
        );
        let mnist_synthetic = SourceOptions {
            dir: None,
            synthetic: Some(&spec),
        };
        let e = DatasetSource::Mnist.check(mnist_synthetic).unwrap_err();
        assert_eq!(e.key, "synthetic");
        assert!(e.reason.contains("\"mnist\""), "{}", e.reason);
        assert!(DatasetSource::Mnist
            .check(SourceOptions {
                dir: Some(dir),
                synthetic: None
            })
            .is_ok());
    }

    #[test]
    fn a_missing_folder_says_where_the_files_were_looked_for() {
        let e = DatasetSource::FashionMnist
            .load(SourceOptions {
                dir: Some(Path::new("/nonexistent/fm")),
                synthetic: None,
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/fm") && e.contains("DATASETS_DIR"),
            "{e}"
        );
    }

    #[test]
    fn the_synthetic_source_loads_without_files() {
        let (train, test) = DatasetSource::Synthetic
            .load(SourceOptions::default())
            .unwrap();
        assert!(train.len() > test.len() && !test.is_empty());
    }
}
