//! What a job stores: every artifact has one typed name ([`ArtifactName`]),
//! shown on the wire and in logs as today's strings (`models/teacher-0`,
//! `transfer/shard-00003.safetensors`, ...), and one key in a blob store
//! ([`ArtifactName::key`]). [`ArtifactRef`] is a stored artifact: its name,
//! checksum and size.
//!
//! Names are made by the planner and parsed back only at the edges (a
//! download request, a committed record), so no other code builds or
//! splits them by prefix.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dataset::shard::{shard_key, Split, INDEX_KEY};
use crate::transfer::shard_file_name;

/// The name of one artifact of a job.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArtifactName {
    /// The dataset's index (`dataset/index.json`): every split's shards.
    Dataset,
    /// Shard number this of a split of the prepared dataset.
    DatasetShard(Split, usize),
    /// The model file of the model called by this name.
    Model(String),
    /// The latest training checkpoint of the task with this id.
    Checkpoint(String),
    /// Transfer-set shard number this.
    Shard(usize),
    /// The transfer set's `manifest.json`.
    TransferManifest,
    /// The specialists' classes.
    Clusters,
    /// The evaluation task's results.
    Evaluation,
    /// The output of the load test's no-op task with this id.
    Noop(String),
}

/// Why a string is not an artifact name or key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an artifact name")]
pub struct NotAnArtifact(pub String);

const MODELS: &str = "models/";
const CHECKPOINTS: &str = "checkpoints/";
const TRANSFER: &str = "transfer/";
const NOOP: &str = "noop/";
const SAFETENSORS: &str = ".safetensors";
const MANIFEST: &str = "transfer/manifest.json";
const CLUSTERS: &str = "specialists/clusters.json";

impl ArtifactName {
    /// Its key in a blob store, relative to the job's root: the file it is
    /// in under the output folder (`dataset/index.json`,
    /// `dataset/<split>/shard-<i>.safetensors`,
    /// `models/<m>.safetensors`, `checkpoints/<task>.safetensors`,
    /// `transfer/shard-<i>.safetensors`, `transfer/manifest.json`,
    /// `specialists/clusters.json`, `evaluation.json`, `noop/<task>`).
    pub fn key(&self) -> String {
        match self {
            ArtifactName::Dataset => INDEX_KEY.into(),
            ArtifactName::DatasetShard(..) => self.to_string(),
            ArtifactName::Model(m) => format!("{MODELS}{m}{SAFETENSORS}"),
            ArtifactName::Checkpoint(t) => format!("{CHECKPOINTS}{t}{SAFETENSORS}"),
            ArtifactName::Shard(_) | ArtifactName::TransferManifest | ArtifactName::Clusters => {
                self.to_string()
            }
            ArtifactName::Evaluation => "evaluation.json".into(),
            ArtifactName::Noop(t) => format!("{NOOP}{t}"),
        }
    }

    /// The artifact stored under `key` (the inverse of [`Self::key`]).
    pub fn from_key(key: &str) -> Result<Self, NotAnArtifact> {
        let name = match key {
            INDEX_KEY => "dataset".to_string(),
            "evaluation.json" => "evaluation".to_string(),
            _ if key.starts_with(MODELS) || key.starts_with(CHECKPOINTS) => key
                .strip_suffix(SAFETENSORS)
                .ok_or_else(|| NotAnArtifact(key.to_string()))?
                .to_string(),
            _ => key.to_string(),
        };
        let parsed: ArtifactName = name.parse().map_err(|_| NotAnArtifact(key.to_string()))?;
        if parsed.key() == key {
            Ok(parsed)
        } else {
            Err(NotAnArtifact(key.to_string()))
        }
    }

    /// The model's name, for a model file.
    pub fn model(&self) -> Option<&str> {
        match self {
            ArtifactName::Model(m) => Some(m),
            _ => None,
        }
    }

    /// The shard's index, for a transfer-set shard.
    pub fn shard(&self) -> Option<usize> {
        match self {
            ArtifactName::Shard(i) => Some(*i),
            _ => None,
        }
    }
}

impl fmt::Display for ArtifactName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactName::Dataset => f.write_str("dataset"),
            ArtifactName::DatasetShard(split, i) => f.write_str(&shard_key(*split, *i)),
            ArtifactName::Model(m) => write!(f, "{MODELS}{m}"),
            ArtifactName::Checkpoint(t) => write!(f, "{CHECKPOINTS}{t}"),
            ArtifactName::Shard(i) => write!(f, "{TRANSFER}{}", shard_file_name(*i)),
            ArtifactName::TransferManifest => f.write_str(MANIFEST),
            ArtifactName::Clusters => f.write_str(CLUSTERS),
            ArtifactName::Evaluation => f.write_str("evaluation"),
            ArtifactName::Noop(t) => write!(f, "{NOOP}{t}"),
        }
    }
}

/// A model name or task id inside an artifact name: letters, digits, `-`,
/// `_` and `.` (not leading), so that it is one path segment.
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The index of a shard file name (`shard-00003.safetensors`; one
/// spelling only, not `shard-3`).
fn shard_index(file: &str) -> Option<usize> {
    let index = file
        .strip_prefix("shard-")
        .and_then(|f| f.strip_suffix(SAFETENSORS))
        .and_then(|i| i.parse::<usize>().ok())?;
    (shard_file_name(index) == file).then_some(index)
}

impl FromStr for ArtifactName {
    type Err = NotAnArtifact;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NotAnArtifact(s.to_string());
        let segment = |rest: &str| {
            if is_segment(rest) {
                Ok(rest.to_string())
            } else {
                Err(bad())
            }
        };
        match s {
            "dataset" => Ok(ArtifactName::Dataset),
            "evaluation" => Ok(ArtifactName::Evaluation),
            MANIFEST => Ok(ArtifactName::TransferManifest),
            CLUSTERS => Ok(ArtifactName::Clusters),
            _ => {
                if let Some(m) = s.strip_prefix(MODELS) {
                    segment(m).map(ArtifactName::Model)
                } else if let Some(t) = s.strip_prefix(CHECKPOINTS) {
                    segment(t).map(ArtifactName::Checkpoint)
                } else if let Some(t) = s.strip_prefix(NOOP) {
                    segment(t).map(ArtifactName::Noop)
                } else if let Some(path) = s.strip_prefix("dataset/") {
                    let (split, file) = path.split_once('/').ok_or_else(bad)?;
                    let split = Split::parse(split).ok_or_else(bad)?;
                    let index = shard_index(file).ok_or_else(bad)?;
                    Ok(ArtifactName::DatasetShard(split, index))
                } else if let Some(file) = s.strip_prefix(TRANSFER) {
                    shard_index(file).map(ArtifactName::Shard).ok_or_else(bad)
                } else {
                    Err(bad())
                }
            }
        }
    }
}

impl Serialize for ArtifactName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArtifactName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A stored artifact: what it is, the sha256 of its bytes, their length
/// and, when it is not at its name's key, the key it is stored under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Which artifact.
    pub name: ArtifactName,
    /// sha256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Length in bytes.
    pub size: u64,
    /// The object's key when it is not [`ArtifactName::key`]: the attempt
    /// a worker wrote straight to the bucket ([`attempt_key`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl ArtifactRef {
    /// The key of the object holding it.
    pub fn stored_key(&self) -> String {
        self.key.clone().unwrap_or_else(|| self.name.key())
    }
}

/// Where objects written by workers go before the coordinator commits one:
/// every attempt's output has a key of its own, so a stale or killed
/// attempt can never overwrite a committed object.
pub const ATTEMPTS: &str = "attempts/";

/// The key of `name` as attempt `attempt` writes it:
/// `attempts/<name's key>/<attempt>`. A checkpoint adds the epochs it holds
/// (`<attempt>.<epochs>`), since one attempt writes several.
pub fn attempt_key(name: &ArtifactName, attempt: u64, epochs_done: Option<usize>) -> String {
    match epochs_done {
        Some(epochs) => format!("{ATTEMPTS}{}/{attempt}.{epochs}", name.key()),
        None => format!("{ATTEMPTS}{}/{attempt}", name.key()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ArtifactName> {
        vec![
            ArtifactName::Dataset,
            ArtifactName::DatasetShard(Split::Validation, 2),
            ArtifactName::Model("teacher-0".into()),
            ArtifactName::Checkpoint("specialist-03".into()),
            ArtifactName::Shard(7),
            ArtifactName::TransferManifest,
            ArtifactName::Clusters,
            ArtifactName::Evaluation,
            ArtifactName::Noop("noop-0000001".into()),
        ]
    }

    #[test]
    fn names_and_keys_are_todays_strings_and_round_trip() {
        let shown: Vec<String> = all().iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "dataset",
                "dataset/validation/shard-00002.safetensors",
                "models/teacher-0",
                "checkpoints/specialist-03",
                "transfer/shard-00007.safetensors",
                "transfer/manifest.json",
                "specialists/clusters.json",
                "evaluation",
                "noop/noop-0000001",
            ]
        );
        let keys: Vec<String> = all().iter().map(ArtifactName::key).collect();
        assert_eq!(
            keys,
            [
                "dataset/index.json",
                "dataset/validation/shard-00002.safetensors",
                "models/teacher-0.safetensors",
                "checkpoints/specialist-03.safetensors",
                "transfer/shard-00007.safetensors",
                "transfer/manifest.json",
                "specialists/clusters.json",
                "evaluation.json",
                "noop/noop-0000001",
            ]
        );
        for name in all() {
            assert_eq!(name.to_string().parse::<ArtifactName>().unwrap(), name);
            assert_eq!(ArtifactName::from_key(&name.key()).unwrap(), name);
            let json = serde_json::to_string(&name).unwrap();
            assert_eq!(serde_json::from_str::<ArtifactName>(&json).unwrap(), name);
        }
    }

    #[test]
    fn attempts_have_keys_of_their_own_under_attempts() {
        let model = ArtifactName::Model("teacher-0".into());
        assert_eq!(
            attempt_key(&model, 17, None),
            "attempts/models/teacher-0.safetensors/17"
        );
        let checkpoint = ArtifactName::Checkpoint("teacher-0".into());
        assert_eq!(
            attempt_key(&checkpoint, 17, Some(3)),
            "attempts/checkpoints/teacher-0.safetensors/17.3"
        );
        let stored = ArtifactRef {
            name: model.clone(),
            sha256: "0".repeat(64),
            size: 1,
            key: None,
        };
        assert_eq!(stored.stored_key(), model.key());
        let direct = ArtifactRef {
            key: Some(attempt_key(&model, 17, None)),
            ..stored
        };
        assert_eq!(
            direct.stored_key(),
            "attempts/models/teacher-0.safetensors/17"
        );
    }

    #[test]
    fn other_strings_are_refused() {
        for bad in [
            "",
            "models/",
            "models/../state/job.redb",
            "models/a/b",
            "models/.hidden",
            "transfer/shard-3.safetensors",
            "transfer/shard-00003",
            "transfer/other.json",
            "dataset.safetensors",
            "dataset/index.json",
            "dataset/other/shard-00001.safetensors",
            "dataset/train/shard-1.safetensors",
            "report.json",
        ] {
            assert!(bad.parse::<ArtifactName>().is_err(), "{bad:?} accepted");
        }
        for bad in ["models/teacher-0", "dataset", "state/job.redb", "report.md"] {
            assert!(ArtifactName::from_key(bad).is_err(), "key {bad:?} accepted");
        }
    }
}
