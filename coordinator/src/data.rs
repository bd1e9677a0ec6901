//! Loads the job's dataset as the config says and splits it: the validation
//! split is drawn from the training set with the job's seed; the test set is
//! only used to report.

use common::dataset::Splits;

use crate::config::ClusterConfig;

/// The train/validation/test splits of `cfg`'s dataset.
pub fn load_splits(cfg: &ClusterConfig) -> anyhow::Result<Splits> {
    let d = &cfg.dataset;
    let (train_full, test) = d.source.load(d.source_options())?;
    let train_full = match d.train_limit {
        Some(n) if n < train_full.len() => train_full.slice(0..n)?,
        _ => train_full,
    };
    Ok(Splits::new(&train_full, test, d.validation_size, cfg.seed)?)
}
