//! [`ClusterConfig::validate`]: every value checked, in sections, with a
//! message that names the key; [`ClusterConfig::check_classes`] once the
//! data's classes are known.

use std::net::SocketAddr;
use std::path::Path;

use distill::hparams::TrainConfig;
use distill::task::BiasShift;

use super::{ClusterConfig, ConfigError, StorageConfig};

/// A key and what is wrong with its value.
struct Problem {
    key: String,
    reason: String,
}

impl Problem {
    /// The error of the config file at `path`.
    fn at(self, path: &Path) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key: self.key,
            reason: self.reason,
        }
    }
}

/// The problem with `key`.
fn invalid(key: &str, reason: String) -> Problem {
    Problem {
        key: key.to_string(),
        reason,
    }
}

impl ClusterConfig {
    /// Checks every value; the error names the key and the allowed values.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        self.validate_operational()
            .and_then(|()| self.validate_storage())
            .and_then(|()| self.validate_dataset())
            .and_then(|()| self.validate_models())
            .and_then(|()| self.validate_transfer())
            .map_err(|p| p.at(path))
    }

    /// `[storage]`: an S3 bucket needs a bucket and a region, and a prefix
    /// of plain names.
    fn validate_storage(&self) -> Result<(), Problem> {
        let StorageConfig::S3(s3) = &self.storage else {
            return Ok(());
        };
        if s3.bucket.trim().is_empty() {
            return Err(invalid("storage.bucket", "must name the bucket".into()));
        }
        if s3.region.trim().is_empty() {
            return Err(invalid(
                "storage.region",
                "must name the bucket's region (such as \"us-east-1\")".into(),
            ));
        }
        let plain = |part: &str| !part.is_empty() && part != "." && part != "..";
        if let Some(dir) = &self.cache_dir {
            let dir = dir.to_string_lossy();
            if dir.starts_with('/') || !dir.split('/').all(plain) {
                return Err(invalid(
                    "cache_dir",
                    format!(
                        "{dir:?}: with [storage] kind = \"s3\" the task cache is a key prefix in the bucket \
                         ('/'-separated plain names, under storage.prefix), not a folder"
                    ),
                ));
            }
        }
        if !s3.prefix.is_empty() && !s3.prefix.split('/').all(plain) {
            return Err(invalid(
                "storage.prefix",
                format!(
                    "{:?} must be '/'-separated plain names, without a leading or trailing '/'",
                    s3.prefix
                ),
            ));
        }
        if let Some(endpoint) = &s3.endpoint {
            let http = endpoint.starts_with("http://");
            if !http && !endpoint.starts_with("https://") {
                return Err(invalid(
                    "storage.endpoint",
                    format!("{endpoint:?} must be an http:// or https:// URL"),
                ));
            }
            if http && !s3.allow_http {
                return Err(invalid(
                    "storage.endpoint",
                    format!("{endpoint:?} is plain HTTP: set allow_http = true to use it"),
                ));
            }
        }
        Ok(())
    }

    /// Addresses, shards, leases, attempts, intervals and limits.
    fn validate_operational(&self) -> Result<(), Problem> {
        self.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:50051", self.listen),
            )
        })?;
        self.status_listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "status_listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080",
                    self.status_listen
                ),
            )
        })?;
        if !(1..=100_000).contains(&self.transfer_shards) {
            return Err(invalid(
                "transfer_shards",
                format!("must be in 1..=100000, got {}", self.transfer_shards),
            ));
        }
        if !(self.lease_timeout_secs.is_finite() && self.lease_timeout_secs > 0.0) {
            return Err(invalid(
                "lease_timeout_secs",
                format!("must be a number > 0, got {}", self.lease_timeout_secs),
            ));
        }
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_interval_ms as f64 * 3.0 > self.lease_timeout_secs * 1000.0
        {
            return Err(invalid(
                "heartbeat_interval_ms",
                format!(
                    "must be at least 1 and at most a third of lease_timeout_secs ({} ms), got {}",
                    self.lease_timeout_secs * 1000.0 / 3.0,
                    self.heartbeat_interval_ms
                ),
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(invalid(
                "max_attempts",
                format!("must be in 1..=100, got {}", self.max_attempts),
            ));
        }
        if !(self.summary_interval_secs.is_finite() && self.summary_interval_secs > 0.0) {
            return Err(invalid(
                "summary_interval_secs",
                format!("must be a number > 0, got {}", self.summary_interval_secs),
            ));
        }
        if !(self.checkpoint_interval_secs.is_finite()
            && (0.0..=86_400.0).contains(&self.checkpoint_interval_secs))
        {
            return Err(invalid(
                "checkpoint_interval_secs",
                format!(
                    "must be a number in 0..=86400 (0: after every epoch), got {}",
                    self.checkpoint_interval_secs
                ),
            ));
        }
        if let Some(load) = &self.load_test {
            if !(1..=1_000_000).contains(&load.tasks) {
                return Err(invalid(
                    "load_test.tasks",
                    format!("must be in 1..=1000000, got {}", load.tasks),
                ));
            }
        }
        if !(1..=1 << 20).contains(&self.max_artifact_mib) {
            return Err(invalid(
                "max_artifact_mib",
                format!("must be in 1..=1048576, got {}", self.max_artifact_mib),
            ));
        }
        Ok(())
    }

    /// `[dataset]`: the split sizes and what the source takes.
    fn validate_dataset(&self) -> Result<(), Problem> {
        let d = &self.dataset;
        if d.validation_size == 0 {
            return Err(invalid(
                "dataset.validation_size",
                "must be at least 1, got 0".into(),
            ));
        }
        for (key, value) in [
            ("dataset.shard_examples", d.shard_examples),
            ("dataset.shuffle_window_shards", d.shuffle_window_shards),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1, got 0".into()));
            }
        }
        if d.train_limit == Some(0) {
            return Err(invalid(
                "dataset.train_limit",
                "must be at least 1, got 0".into(),
            ));
        }
        if let Err(e) = d.source.check(d.source_options()) {
            return Err(invalid(&format!("dataset.{}", e.key), e.reason));
        }
        Ok(())
    }

    /// The model tables: counts, layer widths, training and distillation settings.
    fn validate_models(&self) -> Result<(), Problem> {
        if !(1..=64).contains(&self.teachers.count) {
            return Err(invalid(
                "teachers.count",
                format!("must be in 1..=64, got {}", self.teachers.count),
            ));
        }
        let mut models: Vec<(&str, &[usize], &TrainConfig)> = vec![
            ("teachers", &self.teachers.hidden, &self.teachers.train),
            ("student", &self.student.hidden, &self.student.train),
            ("baseline", &self.student.hidden, self.baseline_train()),
        ];
        if let Some(s) = &self.specialists {
            models.push(("specialists", &self.teachers.hidden, &s.train));
            if self.teachers.count != 1 {
                return Err(invalid(
                    "teachers.count",
                    format!(
                        "must be 1 with [specialists] (the one generalist they start from), got {}",
                        self.teachers.count
                    ),
                ));
            }
            if !(2..=10_000).contains(&s.count) {
                return Err(invalid(
                    "specialists.count",
                    format!("must be in 2..=10000, got {}", s.count),
                ));
            }
            if s.top_n == 0 {
                return Err(invalid(
                    "specialists.top_n",
                    "must be at least 1, got 0".into(),
                ));
            }
            if s.classes_per_specialist == Some(0) {
                return Err(invalid(
                    "specialists.classes_per_specialist",
                    "must be at least 1, got 0".into(),
                ));
            }
        }
        for (table, hidden, train) in models {
            if hidden.is_empty() || hidden.contains(&0) {
                return Err(invalid(
                    &format!("{table}.hidden"),
                    format!("must list at least one layer width, each at least 1, got {hidden:?}"),
                ));
            }
            train
                .validate()
                .map_err(|e| invalid(&format!("{table}.train"), e.to_string()))?;
        }
        self.student
            .distill
            .validate()
            .map_err(|e| invalid("student.distill", e.to_string()))?;
        Ok(())
    }

    /// `[transfer]` and the student's bias adjustment.
    fn validate_transfer(&self) -> Result<(), Problem> {
        if let Some(fraction) = self.transfer.fraction {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(invalid(
                    "transfer.fraction",
                    format!("must be in (0, 1], got {fraction}"),
                ));
            }
        }
        if !self.transfer.exclude_classes.is_empty() && !self.transfer.only_classes.is_empty() {
            return Err(invalid(
                "transfer.only_classes",
                "cannot be given together with transfer.exclude_classes".into(),
            ));
        }
        if let Some(adjustment) = &self.student.bias_adjustment {
            if adjustment.classes.is_empty() {
                return Err(invalid(
                    "student.bias_adjustment.classes",
                    "must list at least one class".into(),
                ));
            }
            if let BiasShift::Fixed(shift) = adjustment.shift {
                if !shift.is_finite() {
                    return Err(invalid(
                        "student.bias_adjustment.shift",
                        format!("must be a finite number or \"validation\", got {shift}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the keys that name classes against the data's class count.
    pub fn check_classes(&self, path: &Path, num_classes: usize) -> Result<(), ConfigError> {
        self.classes_fit(num_classes).map_err(|p| p.at(path))
    }

    fn classes_fit(&self, num_classes: usize) -> Result<(), Problem> {
        let lists = [
            ("transfer.exclude_classes", &self.transfer.exclude_classes),
            ("transfer.only_classes", &self.transfer.only_classes),
        ];
        let adjusted = self
            .student
            .bias_adjustment
            .as_ref()
            .map(|a| ("student.bias_adjustment.classes", &a.classes));
        if let Some(s) = &self.specialists {
            if s.count > num_classes {
                return Err(invalid(
                    "specialists.count",
                    format!("{} specialists for {num_classes} classes", s.count),
                ));
            }
            if s.classes_per_specialist.is_some_and(|m| m >= num_classes) {
                return Err(invalid(
                    "specialists.classes_per_specialist",
                    format!(
                        "must be below the number of classes ({num_classes}): a specialist needs a dustbin"
                    ),
                ));
            }
            if s.top_n > num_classes {
                return Err(invalid(
                    "specialists.top_n",
                    format!("must be at most the number of classes ({num_classes})"),
                ));
            }
        }
        for (key, classes) in lists.into_iter().chain(adjusted) {
            if let Some(c) = classes.iter().find(|&&c| c as usize >= num_classes) {
                return Err(invalid(
                    key,
                    format!("class {c} does not exist (the data has {num_classes} classes)"),
                ));
            }
        }
        Ok(())
    }
}
