//! `cluster.toml`: one file describes the whole job. Unknown keys are refused
//! (the message lists the keys allowed there), values are checked by
//! [`ClusterConfig::validate`] with messages that name the key, and paths are
//! relative to the config file's folder. The schema is here; the checks in
//! [`validate`].
//!
//! Every random choice flows from the top-level `seed`: the validation split
//! uses it directly and each model's training seed is derived from it and
//! the model's name ([`derive_seed`]), so model tables take no `seed` key.

mod validate;

use std::path::{Path, PathBuf};

pub use common::blob::S3Settings;
pub use common::dataset::source::DatasetSource;
use common::dataset::source::SourceOptions;
use common::dataset::synthetic::SyntheticSpec;
use distill::hparams::{DistillConfig, TrainConfig};
pub use distill::model::Family;
use distill::model::ModelShape;
use distill::subset::ExampleSubset;
use distill::task::BiasShift;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A config problem, with the file and the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key that does not belong, or a value of the
    /// wrong type (the message names it and lists the allowed keys).
    #[error("{path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value outside its allowed range.
    #[error("{path}: `{key}` {reason}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Dotted key, such as `teachers.train.learning_rate`.
        key: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

/// Whether calls to the coordinator must carry the cluster token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Authentication {
    /// Every call except the health service needs the token, read from
    /// `--token-file` or `DISTILL_CLUSTER_TOKEN` (never from this file).
    #[default]
    Token,
    /// No authentication: anyone who reaches the port may act as a worker.
    Off,
}

/// `[tls]`: the coordinator serves TLS (rustls) with this certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Mutual TLS: accept only clients with a certificate signed by this CA
    /// (PEM). Not supported with `--local-workers`.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// The CA that signed `cert` (PEM): what `--local-workers` trust.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// `[dataset]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// `synthetic`, `mnist` or `fashion-mnist`.
    pub source: DatasetSource,
    /// Folder of the IDX files (relative to the config file); default
    /// `$DATASETS_DIR/<source>`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Training examples held out for every training-time choice.
    #[serde(default = "default_validation_size")]
    pub validation_size: usize,
    /// Use only the first this-many training examples (before the split).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Parameters of the synthetic problem (`source = "synthetic"` only).
    #[serde(default)]
    pub synthetic: Option<SyntheticSpec>,
    /// Examples per stored dataset shard (the last shard of a split may
    /// hold fewer).
    #[serde(default = "default_shard_examples")]
    pub shard_examples: usize,
    /// Training shards shuffled together (see
    /// [`distill::hparams::TrainConfig::shuffle_window_shards`]).
    #[serde(default = "default_shuffle_window_shards")]
    pub shuffle_window_shards: usize,
}

impl DatasetConfig {
    /// What the source is given besides its name.
    pub fn source_options(&self) -> SourceOptions<'_> {
        SourceOptions {
            dir: self.dir.as_deref(),
            synthetic: self.synthetic.as_ref(),
        }
    }
}

fn default_validation_size() -> usize {
    5000
}

fn default_shard_examples() -> usize {
    common::dataset::shard::DEFAULT_SHARD_EXAMPLES
}

fn default_shuffle_window_shards() -> usize {
    4
}

/// `[teachers]`: the ensemble of generalist teachers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeachersConfig {
    /// Ensemble members (differing only by seed).
    #[serde(default = "one")]
    pub count: usize,
    /// Model family (`"mlp"`, the only one yet).
    #[serde(default)]
    pub family: Family,
    /// Hidden-layer widths.
    pub hidden: Vec<usize>,
    /// How each member is trained (seed derived per member).
    #[serde(default)]
    pub train: TrainConfig,
}

fn one() -> usize {
    1
}

/// A model's family and shape from a table's `family` and `hidden` keys.
fn shape_of(family: Family, hidden: &[usize]) -> ModelShape {
    match family {
        Family::Mlp => ModelShape::Mlp {
            hidden: hidden.to_vec(),
        },
    }
}

impl TeachersConfig {
    /// The teachers' family and shape (specialists share it).
    pub fn shape(&self) -> ModelShape {
        shape_of(self.family, &self.hidden)
    }
}

impl StudentConfig {
    /// The student's family and shape (the baseline shares it).
    pub fn shape(&self) -> ModelShape {
        shape_of(self.family, &self.hidden)
    }
}

/// `[student]`: the model the job is about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentConfig {
    /// Model family (`"mlp"`, the only one yet).
    #[serde(default)]
    pub family: Family,
    /// Hidden-layer widths.
    pub hidden: Vec<usize>,
    /// How it is trained.
    #[serde(default)]
    pub train: TrainConfig,
    /// Temperature, hard-label weight, ensemble combination.
    #[serde(default)]
    pub distill: DistillConfig,
    /// Evaluate the student once more with some output biases shifted
    /// (reported as `student+bias`).
    #[serde(default)]
    pub bias_adjustment: Option<BiasAdjustmentConfig>,
}

/// `[student.bias_adjustment]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiasAdjustmentConfig {
    /// Classes whose output biases move.
    pub classes: Vec<u32>,
    /// A number (negative lowers them), or `"validation"`: the shift in
    /// [-15, 15] (steps of 0.1) with the fewest validation errors.
    pub shift: BiasShift,
}

/// `[transfer]`: which training examples the student (and the baseline)
/// learn from. Teachers see the whole training split and the shards hold
/// teacher logits for all of it, so one transfer set serves every subset;
/// the selection is applied as the student reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferConfig {
    /// A random fraction of the training split, in (0, 1] (drawn with a
    /// seed derived from the job's).
    #[serde(default)]
    pub fraction: Option<f64>,
    /// Leave these classes out.
    #[serde(default)]
    pub exclude_classes: Vec<u32>,
    /// Keep only these classes.
    #[serde(default)]
    pub only_classes: Vec<u32>,
}

/// `[specialists]`: the paper's specialists (section 5) beside the one
/// generalist teacher. A clustering task groups the classes the generalist
/// confuses (K-means on the covariance of its predictions over the training
/// split); each group gets a specialist, trained from the generalist's
/// weights on its classes plus a dustbin; the generalist and the
/// specialists are combined per example by eq. 5; and a second student
/// (`student-combined`) is distilled from that combination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialistsConfig {
    /// Number of specialists (K-means clusters), at least 2.
    pub count: usize,
    /// Classes per specialist: each gets the classes nearest its K-means
    /// centre, so specialists may overlap and some classes may be left to
    /// the generalist. Default: the K-means clusters themselves, which
    /// partition the classes (no overlap).
    #[serde(default)]
    pub classes_per_specialist: Option<usize>,
    /// An example activates the specialists covering any of the
    /// generalist's `top_n` most probable classes (the paper: 1).
    #[serde(default = "one")]
    pub top_n: usize,
    /// How each specialist is trained (seed derived per specialist).
    #[serde(default)]
    pub train: TrainConfig,
}

/// `[baseline]`: the student's architecture on hard labels only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineConfig {
    /// How it is trained; default: exactly like the student.
    #[serde(default)]
    pub train: Option<TrainConfig>,
}

/// The whole of `cluster.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// gRPC listen address (`--listen` overrides it).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// HTTP address of the status page and the Prometheus metrics
    /// (`--status-listen` overrides it). Off loopback they need the token.
    #[serde(default = "default_status_listen")]
    pub status_listen: String,
    /// Output folder (relative to the config file): `transfer/`, `models/`,
    /// `report.json`, `report.md`.
    pub output_dir: PathBuf,
    /// Seed of every random choice of the job.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `"token"` (the default) or `"off"`, which must be said explicitly.
    #[serde(default)]
    pub authentication: Authentication,
    /// Serve TLS (plaintext when absent).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Shards of the transfer set (and teacher-inference tasks); never
    /// derived from the number of workers.
    #[serde(default = "default_shards")]
    pub transfer_shards: usize,
    /// A lease not renewed by a heartbeat for this long expires and its task
    /// goes to another worker.
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout_secs: f64,
    /// How often workers heartbeat while running a task.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// Attempts per task (failures and expired leases) before the job fails.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Seconds between job-summary log lines.
    #[serde(default = "default_summary")]
    pub summary_interval_secs: f64,
    /// A training task uploads a checkpoint (weights, optimizer and random
    /// state) at the first epoch end after this many seconds; a re-run of
    /// the task resumes from the latest one. 0: after every epoch.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_secs: f64,
    /// Largest result or checkpoint a worker may upload, in MiB.
    #[serde(default = "default_max_artifact_mib")]
    pub max_artifact_mib: u64,
    /// The data.
    pub dataset: DatasetConfig,
    /// The teachers.
    pub teachers: TeachersConfig,
    /// The distilled student.
    pub student: StudentConfig,
    /// Specialists beside the generalist (none by default).
    #[serde(default)]
    pub specialists: Option<SpecialistsConfig>,
    /// The hard-label baseline.
    #[serde(default)]
    pub baseline: Option<BaselineConfig>,
    /// Which examples the student and the baseline learn from.
    #[serde(default)]
    pub transfer: TransferConfig,
    /// Count the student's and the baseline's test errors after every
    /// epoch, for learning curves in the report.
    #[serde(default)]
    pub record_test_curves: bool,
    /// Folder of finished tasks' results, keyed by a hash of the task and
    /// its inputs: a task already run with the same spec, seed and data is
    /// taken from here instead of being run again (relative to the config
    /// file; none by default). With `[storage] kind = "s3"` it is a key
    /// prefix under the bucket's `prefix` instead.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// A load test of the coordinator instead of the job: only no-op tasks.
    #[serde(default)]
    pub load_test: Option<LoadTestConfig>,
    /// Where the artifacts live (`[storage]`; the output folder by default).
    #[serde(default)]
    pub storage: StorageConfig,
}

/// `[storage]`: where models, checkpoints, the transfer set, the dataset
/// bundle and the report live. The job's state always stays in the output
/// folder.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// The output folder (`kind = "local"`).
    #[default]
    Local,
    /// An S3 bucket (`kind = "s3"`, with `bucket`, `prefix`, `endpoint`,
    /// `region`, `allow_http`); the job's objects go under
    /// `<prefix>/<job>/`, where the job is the output folder's name.
    /// Credentials come from the environment, never from this file.
    S3(S3Settings),
}

/// `[load_test]`: the job is `tasks` no-op tasks (the other tables are
/// still read and checked, and the dataset loaded, but nothing is trained).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadTestConfig {
    /// Number of no-op tasks, 1..=1000000.
    pub tasks: usize,
}

fn default_listen() -> String {
    "127.0.0.1:50051".into()
}
fn default_status_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_seed() -> u64 {
    1
}
fn default_shards() -> usize {
    8
}
fn default_lease_timeout() -> f64 {
    30.0
}
fn default_heartbeat() -> u64 {
    1000
}
fn default_attempts() -> u32 {
    3
}
fn default_summary() -> f64 {
    30.0
}
fn default_checkpoint_interval() -> f64 {
    300.0
}
fn default_max_artifact_mib() -> u64 {
    4096
}

/// Top-level keys a restarted job may change (see [`ClusterConfig::identity`]).
const OPERATIONAL_KEYS: [&str; 12] = [
    "listen",
    "status_listen",
    "max_artifact_mib",
    "checkpoint_interval_secs",
    "output_dir",
    "authentication",
    "tls",
    "lease_timeout_secs",
    "heartbeat_interval_ms",
    "max_attempts",
    "summary_interval_secs",
    "cache_dir",
];

/// Model tables whose `train` sub-table must not set `seed`.
const MODEL_TABLES: [&str; 4] = ["teachers", "student", "baseline", "specialists"];

impl ClusterConfig {
    /// Reads, parses and validates `path`; relative paths in it become
    /// relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        Self::parse(&text, path, base)
    }

    /// Parses and validates TOML `text`; `path` names it in errors and
    /// relative paths are resolved against `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let value: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        for table in MODEL_TABLES {
            let has_seed = value
                .get(table)
                .and_then(|t| t.get("train"))
                .and_then(|t| t.get("seed"))
                .is_some();
            if has_seed {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key: format!("{table}.train.seed"),
                    reason: "is not allowed: model seeds derive from the top-level `seed`".into(),
                });
            }
        }
        let mut cfg: ClusterConfig = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        cfg.output_dir = base.join(&cfg.output_dir);
        if let Some(dir) = &cfg.dataset.dir {
            cfg.dataset.dir = Some(base.join(dir));
        }
        // With S3 the cache is a key prefix in the bucket, not a folder.
        if let (Some(dir), StorageConfig::Local) = (&cfg.cache_dir, &cfg.storage) {
            cfg.cache_dir = Some(base.join(dir));
        }
        if let Some(tls) = &mut cfg.tls {
            for path in [
                Some(&mut tls.cert),
                Some(&mut tls.key),
                tls.client_ca.as_mut(),
                tls.ca.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                *path = base.join(&*path);
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The settings that make the job what it is, as dotted keys (defaults
    /// filled in): a restart of the job must not change them. Left out are
    /// the operational ones (where to listen, security, timeouts, logging,
    /// the task cache and the output folder itself), which may change.
    pub fn identity(&self) -> std::collections::BTreeMap<String, String> {
        let mut value = serde_json::to_value(self).expect("the config serialises");
        let map = value.as_object_mut().expect("the config is a table");
        for key in OPERATIONAL_KEYS {
            map.remove(key);
        }
        crate::state::flatten(&value)
    }

    /// The examples the student and the baseline learn from, as a task
    /// describes them (`None`: the whole training split).
    pub fn transfer_subset(&self) -> Option<ExampleSubset> {
        let t = &self.transfer;
        let subset = ExampleSubset {
            fraction: t.fraction.unwrap_or(1.0),
            exclude_classes: t.exclude_classes.clone(),
            only_classes: t.only_classes.clone(),
            seed: derive_seed(self.seed, "transfer"),
        };
        (!subset.is_everything()).then_some(subset)
    }

    /// The baseline's training settings: its own, or the student's.
    pub fn baseline_train(&self) -> &TrainConfig {
        self.baseline
            .as_ref()
            .and_then(|b| b.train.as_ref())
            .unwrap_or(&self.student.train)
    }
}

/// The training seed of model `name` in a job with seed `job_seed`: the
/// first 8 bytes of sha256(job_seed, name). Stable across versions and
/// platforms, and different for every model.
pub fn derive_seed(job_seed: u64, name: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(job_seed.to_le_bytes());
    h.update(name.as_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
output_dir = "out"
[dataset]
source = "synthetic"
validation_size = 500
[teachers]
hidden = [64]
[student]
hidden = [16]
"#;

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(text, Path::new("cluster.toml"), Path::new("/jobs"))
    }

    #[test]
    fn minimal_config_gets_defaults_and_paths_relative_to_its_folder() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.output_dir, Path::new("/jobs/out"));
        assert_eq!(cfg.listen, "127.0.0.1:50051");
        assert_eq!(cfg.teachers.count, 1);
        assert_eq!(cfg.transfer_shards, 8);
        assert_eq!(cfg.baseline_train(), &cfg.student.train);
        assert_eq!(cfg.teachers.shape(), ModelShape::Mlp { hidden: vec![64] });
    }

    #[test]
    fn storage_is_the_folder_by_default_or_a_bucket_with_exactly_its_keys() {
        assert_eq!(parse(MINIMAL).unwrap().storage, StorageConfig::Local);
        let s3 = "[storage]\nkind = \"s3\"\nbucket = \"b\"\nprefix = \"team/runs\"\n\
                  endpoint = \"http://127.0.0.1:8333\"\nregion = \"us-east-1\"\nallow_http = true\n";
        let cfg = parse(&format!("{MINIMAL}{s3}")).unwrap();
        let StorageConfig::S3(settings) = &cfg.storage else {
            panic!("{:?}", cfg.storage)
        };
        assert_eq!(settings.bucket, "b");
        assert_eq!(settings.prefix, "team/runs");
        for (edit, key) in [
            (s3.replace("allow_http = true\n", ""), "allow_http"),
            (s3.replace("team/runs", "/team"), "storage.prefix"),
            (
                s3.replace("bucket = \"b\"", "bucket = \"\""),
                "storage.bucket",
            ),
            (format!("{s3}secret_key = \"x\"\n"), "secret_key"),
            (s3.replace("\"s3\"", "\"gcs\""), "gcs"),
            (s3.replace("region = \"us-east-1\"\n", ""), "region"),
        ] {
            let err = parse(&format!("{MINIMAL}{edit}")).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn the_model_family_defaults_to_mlp_and_an_unknown_one_is_named() {
        let cfg = parse(&MINIMAL.replace("[student]", "[student]\nfamily = \"mlp\"")).unwrap();
        assert_eq!(cfg.student.family, Family::Mlp);
        let err = parse(&MINIMAL.replace("[student]", "[student]\nfamily = \"cnn\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cnn") && err.contains("mlp"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named_with_the_allowed_ones() {
        let err = parse(&MINIMAL.replace("[teachers]", "[teachers]\ncuont = 2")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cuont") && msg.contains("count"), "{msg}");
        let err = parse(&format!("{MINIMAL}\n[student.train]\nlearning_rat = 0.1")).unwrap_err();
        assert!(err.to_string().contains("learning_rat"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (edit, key) in [
            ("transfer_shards = 0\n", "transfer_shards"),
            ("listen = \"nowhere\"\n", "listen"),
            ("heartbeat_interval_ms = 20000\n", "heartbeat_interval_ms"),
            ("max_attempts = 0\n", "max_attempts"),
        ] {
            let err = parse(&format!("{edit}{MINIMAL}")).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{key}: {err}"
            );
        }
        let err = parse(&format!("{MINIMAL}\n[student.train]\nlearning_rate = -1.0")).unwrap_err();
        assert!(
            err.to_string().contains("`student.train`")
                && err.to_string().contains("learning_rate"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}\n[student.distill]\ntemperature = 0.0")).unwrap_err();
        assert!(err.to_string().contains("temperature"), "{err}");
        let err = parse(&MINIMAL.replace("hidden = [16]", "hidden = []")).unwrap_err();
        assert!(err.to_string().contains("`student.hidden`"), "{err}");
        let err =
            parse(&MINIMAL.replace("source = \"synthetic\"", "source = \"cifar\"")).unwrap_err();
        assert!(err.to_string().contains("fashion-mnist"), "{err}");
    }

    #[test]
    fn transfer_selection_and_bias_adjustment_are_checked() {
        let cfg = parse(&format!(
            "{MINIMAL}\n[student.bias_adjustment]\nclasses = [3]\nshift = \"validation\"\n\
             [transfer]\nexclude_classes = [3]\n"
        ))
        .unwrap();
        assert_eq!(cfg.transfer_subset().unwrap().exclude_classes, vec![3]);
        assert!(cfg.check_classes(Path::new("c"), 10).is_ok());
        let err = cfg.check_classes(Path::new("c"), 3).unwrap_err();
        assert!(
            err.to_string().contains("`transfer.exclude_classes`"),
            "{err}"
        );
        assert!(parse(MINIMAL).unwrap().transfer_subset().is_none());
        for (extra, key) in [
            ("[transfer]\nfraction = 0.0", "transfer.fraction"),
            (
                "[transfer]\nexclude_classes = [1]\nonly_classes = [2]",
                "transfer.only_classes",
            ),
            (
                "[student.bias_adjustment]\nclasses = []\nshift = 1.0",
                "student.bias_adjustment.classes",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert!(err.to_string().contains(&format!("`{key}`")), "{err}");
        }
        let err = parse(&format!(
            "{MINIMAL}\n[student.bias_adjustment]\nclasses = [1]\nshift = \"test\""
        ))
        .unwrap_err();
        assert!(err.to_string().contains("shift"), "{err}");
    }

    #[test]
    fn specialists_are_checked_against_the_teachers_and_the_classes() {
        let cfg = parse(&format!("{MINIMAL}\n[specialists]\ncount = 3\n")).unwrap();
        let s = cfg.specialists.as_ref().unwrap();
        assert_eq!((s.count, s.top_n, s.classes_per_specialist), (3, 1, None));
        assert!(cfg.check_classes(Path::new("c"), 10).is_ok());
        let err = cfg.check_classes(Path::new("c"), 2).unwrap_err();
        assert!(err.to_string().contains("`specialists.count`"), "{err}");
        let overlapping = parse(&format!(
            "{MINIMAL}\n[specialists]\ncount = 3\nclasses_per_specialist = 10\n"
        ))
        .unwrap();
        let err = overlapping.check_classes(Path::new("c"), 10).unwrap_err();
        assert!(err.to_string().contains("needs a dustbin"), "{err}");
        for (extra, key) in [
            ("[specialists]\ncount = 1", "specialists.count"),
            ("[specialists]\ncount = 2\ntop_n = 0", "specialists.top_n"),
            (
                "[specialists]\ncount = 2\nclasses_per_specialist = 0",
                "specialists.classes_per_specialist",
            ),
            (
                "[specialists]\ncount = 2\n[specialists.train]\nepochs = 0",
                "specialists.train",
            ),
            (
                "[specialists]\ncount = 2\n[specialists.train]\nseed = 3",
                "specialists.train.seed",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}\n{extra}")).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{extra}: {err}"
            );
        }
        let two_teachers = MINIMAL.replace("[teachers]\n", "[teachers]\ncount = 2\n");
        let err = parse(&format!("{two_teachers}\n[specialists]\ncount = 2")).unwrap_err();
        assert!(err.to_string().contains("`teachers.count`"), "{err}");
    }

    #[test]
    fn tls_paths_are_relative_to_the_config_and_authentication_is_named() {
        let cfg = parse(&format!(
            "authentication = \"off\"\n{MINIMAL}\n[tls]\ncert = \"s.pem\"\nkey = \"k/s.key\"\n"
        ))
        .unwrap();
        assert_eq!(cfg.authentication, Authentication::Off);
        let tls = cfg.tls.unwrap();
        assert_eq!(tls.cert, Path::new("/jobs/s.pem"));
        assert_eq!(tls.key, Path::new("/jobs/k/s.key"));
        assert_eq!((tls.client_ca, tls.ca), (None, None));
        assert_eq!(
            parse(MINIMAL).unwrap().authentication,
            Authentication::Token
        );
        let err = parse(&format!("authentication = \"maybe\"\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("maybe"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[tls]\ncert = \"s.pem\"\n")).unwrap_err();
        assert!(err.to_string().contains("key"), "{err}");
    }

    #[test]
    fn every_example_config_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                ClusterConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 5, "{seen} example configs in {}", dir.display());
    }

    /// The cluster.toml inside a ConfigMap of `deploy/` (`file` below it).
    fn deploy_config(file: &str) -> ClusterConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file);
        let yaml = std::fs::read_to_string(&path).unwrap();
        let (_, block) = yaml
            .split_once("  cluster.toml: |\n")
            .expect("the ConfigMap holds cluster.toml as a block");
        let text: String = block
            .lines()
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or("")))
            .collect();
        ClusterConfig::parse(&text, &path, Path::new("/")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The cluster.toml inside `deploy/configmap.yaml` is a valid config,
    /// and so is the S3 variant's, which differs only by its `[storage]`.
    #[test]
    fn the_deploy_config_maps_hold_valid_configs() {
        let cfg = deploy_config("configmap.yaml");
        assert_eq!(cfg.output_dir, Path::new("/data/job"));
        assert_eq!(cfg.listen, "0.0.0.0:50051");
        assert_eq!(cfg.status_listen, "0.0.0.0:8080");
        assert_eq!(cfg.storage, StorageConfig::Local);
        let s3 = deploy_config("s3/configmap.yaml");
        assert!(
            matches!(s3.storage, StorageConfig::S3(_)),
            "{:?}",
            s3.storage
        );
        assert_eq!(
            ClusterConfig {
                storage: StorageConfig::Local,
                ..s3
            },
            cfg
        );
    }

    #[test]
    fn model_tables_refuse_a_seed_of_their_own() {
        let err = parse(&format!("{MINIMAL}\n[teachers.train]\nseed = 5")).unwrap_err();
        assert!(err.to_string().contains("`teachers.train.seed`"), "{err}");
    }

    #[test]
    fn derived_seeds_differ_by_model_and_job_seed() {
        assert_ne!(derive_seed(1, "teacher-0"), derive_seed(1, "teacher-1"));
        assert_ne!(derive_seed(1, "student"), derive_seed(2, "student"));
        assert_eq!(derive_seed(1, "student"), derive_seed(1, "student"));
    }
}
