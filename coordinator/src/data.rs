//! Loads the job's dataset as the config says and splits it: the validation
//! split is drawn from the training set with the job's seed; the test set is
//! only used to report.

use common::dataset::idx::load_mnist_folder;
use common::dataset::Splits;
use common::paths::datasets_dir;

use crate::config::{ClusterConfig, DatasetSource};

/// The train/validation/test splits of `cfg`'s dataset.
pub fn load_splits(cfg: &ClusterConfig) -> anyhow::Result<Splits> {
    let d = &cfg.dataset;
    let (train_full, test) = match d.source {
        DatasetSource::Synthetic => d.synthetic.clone().unwrap_or_default().generate()?,
        source => {
            let dir = match &d.dir {
                Some(dir) => dir.clone(),
                None => datasets_dir().join(source.name()),
            };
            load_mnist_folder(&dir, source.name()).map_err(|e| {
                anyhow::anyhow!(
                    "{e}\n(dataset.source = {:?} reads the IDX files from `dataset.dir`, default \
                     $DATASETS_DIR/{}; set DATASETS_DIR or `dataset.dir`)",
                    source.name(),
                    source.name()
                )
            })?
        }
    };
    let train_full = match d.train_limit {
        Some(n) if n < train_full.len() => train_full.slice(0..n)?,
        _ => train_full,
    };
    Ok(Splits::new(&train_full, test, d.validation_size, cfg.seed)?)
}
