//! `manifest.json`: what a transfer set holds and the checksum of each shard.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::validate_teacher_id;
use crate::{Error, Result};

/// The version of the transfer-set format this code writes. It also reads
/// version 1 (no `encoding` field, `"dtype": "F32"`: dense f32 logits).
pub const FORMAT_VERSION: u32 = 2;
/// File name of the manifest inside a transfer-set folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// How a shard stores the teachers' outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// Every teacher's raw logits as an f32 tensor `[rows, classes]`.
    #[default]
    DenseF32,
}

/// The manifest of a transfer set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ManifestFile", into = "ManifestFile")]
pub struct Manifest {
    /// [`crate::dataset::Dataset::fingerprint`] of the transfer examples.
    pub dataset_fingerprint: String,
    /// Number of transfer examples (rows over all shards).
    pub num_examples: usize,
    /// Number of classes (columns of every logits tensor).
    pub num_classes: usize,
    /// Teacher ids, in the order the ensemble lists them.
    pub teachers: Vec<String>,
    /// How the shards store the teachers' outputs.
    pub encoding: Encoding,
    /// The shards, in example order.
    pub shards: Vec<ShardEntry>,
}

/// `manifest.json` as written, in any version this code reads.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    format_version: u32,
    dataset_fingerprint: String,
    num_examples: usize,
    num_classes: usize,
    teachers: Vec<String>,
    /// Version 1 only: always `"F32"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dtype: Option<String>,
    /// From version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encoding: Option<Encoding>,
    shards: Vec<ShardEntry>,
}

impl TryFrom<ManifestFile> for Manifest {
    type Error = String;

    fn try_from(file: ManifestFile) -> std::result::Result<Self, String> {
        let encoding = match (file.format_version, file.dtype.as_deref(), file.encoding) {
            (1, Some("F32"), None) => Encoding::DenseF32,
            (1, dtype, None) => {
                return Err(format!(
                    "dtype {dtype:?} is not supported in format_version 1 (expected \"F32\")"
                ))
            }
            (2, None, Some(encoding)) => encoding,
            (1 | 2, _, _) => {
                return Err(format!(
                    "format_version {} has {}",
                    file.format_version,
                    if file.format_version == 1 {
                        "`dtype` and no `encoding`"
                    } else {
                        "`encoding` and no `dtype`"
                    }
                ))
            }
            (v, _, _) => {
                return Err(format!(
                    "format_version {v} is not supported (this build reads versions 1 and {FORMAT_VERSION})"
                ))
            }
        };
        Ok(Manifest {
            dataset_fingerprint: file.dataset_fingerprint,
            num_examples: file.num_examples,
            num_classes: file.num_classes,
            teachers: file.teachers,
            encoding,
            shards: file.shards,
        })
    }
}

impl From<Manifest> for ManifestFile {
    fn from(m: Manifest) -> Self {
        ManifestFile {
            format_version: FORMAT_VERSION,
            dataset_fingerprint: m.dataset_fingerprint,
            num_examples: m.num_examples,
            num_classes: m.num_classes,
            teachers: m.teachers,
            dtype: None,
            encoding: Some(m.encoding),
            shards: m.shards,
        }
    }
}

/// One shard's entry in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name, relative to the transfer-set folder.
    pub file: String,
    /// First example index (inclusive).
    pub start: usize,
    /// Last example index (exclusive).
    pub end: usize,
    /// Number of rows (`end - start`).
    pub rows: usize,
    /// sha256 of the file's bytes, lowercase hex.
    pub sha256: String,
    /// The object's key under the job's root when it is not
    /// `transfer/<file>`: with S3, the attempt whose output was committed
    /// (`attempts/transfer/<file>/<attempt>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A manifest in the making: what the transfer set holds, and its shards'
/// entries as they are stored (in any order, by shard number). The
/// coordinator, the single-process teacher path and the tests all build
/// manifests with it.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestBuilder {
    head: Manifest,
    entries: Vec<Option<ShardEntry>>,
    /// How many of `entries` are stored (so that completion and the next
    /// example take constant time however many shards there are).
    stored: usize,
}

impl ManifestBuilder {
    /// A transfer set of `teachers`' outputs over `num_classes` classes for
    /// `num_examples` examples of the dataset with `dataset_fingerprint`,
    /// stored as `encoding`, of `shards` shards (more may be added).
    pub fn new(
        dataset_fingerprint: &str,
        num_examples: usize,
        num_classes: usize,
        teachers: Vec<String>,
        encoding: Encoding,
        shards: usize,
    ) -> Self {
        ManifestBuilder {
            head: Manifest {
                dataset_fingerprint: dataset_fingerprint.to_string(),
                num_examples,
                num_classes,
                teachers,
                encoding,
                shards: Vec::new(),
            },
            entries: vec![None; shards],
            stored: 0,
        }
    }

    /// What the transfer set holds (without shards).
    pub fn head(&self) -> &Manifest {
        &self.head
    }

    /// Records shard `index` as stored with `entry`.
    pub fn stored(&mut self, index: usize, entry: ShardEntry) {
        if index >= self.entries.len() {
            self.entries.resize(index + 1, None);
        }
        if self.entries[index].replace(entry).is_none() {
            self.stored += 1;
        }
    }

    /// Forgets shard `index` (it is lost and made again).
    pub fn lost(&mut self, index: usize) {
        if self.entries.get_mut(index).and_then(Option::take).is_some() {
            self.stored -= 1;
        }
    }

    /// Shards known so far (stored or expected).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no shard is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The example after the last stored shard's rows.
    pub fn next_example(&self) -> usize {
        self.entries
            .iter()
            .flatten()
            .map(|e| e.end)
            .max()
            .unwrap_or(0)
    }

    /// The manifest, once every shard is stored (never for a transfer set
    /// of no shards). [`Manifest::validate`] checks that they cover the
    /// examples.
    pub fn complete(&self) -> Option<Manifest> {
        if self.entries.is_empty() || self.stored < self.entries.len() {
            return None;
        }
        Some(Manifest {
            shards: self.entries.iter().flatten().cloned().collect(),
            ..self.head.clone()
        })
    }
}

impl Manifest {
    /// The manifest's JSON after [`Manifest::validate`] (`path` names it
    /// in messages).
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        self.validate(path)?;
        Ok(serde_json::to_vec_pretty(self).expect("a manifest serialises"))
    }

    /// Checks internal consistency: classes, teacher ids, and that the
    /// shards cover `0..num_examples` in order without gaps or overlaps.
    /// `path` names the manifest in messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.validate_head()
            .map_err(|reason| Error::format(path, reason))?;
        self.validate_shards()
            .map_err(|reason| Error::format(path, reason))
    }

    /// Checks what the transfer set holds: at least 2 classes, one teacher
    /// or more, with valid and unique ids.
    pub fn validate_head(&self) -> std::result::Result<(), String> {
        if self.num_classes < 2 {
            return Err(format!(
                "num_classes is {}, expected at least 2",
                self.num_classes
            ));
        }
        if self.teachers.is_empty() {
            return Err("no teachers listed".into());
        }
        for t in &self.teachers {
            validate_teacher_id(t).map_err(|e| e.to_string())?;
        }
        let mut sorted = self.teachers.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.teachers.len() {
            return Err("teacher ids are not unique".into());
        }
        Ok(())
    }

    fn validate_shards(&self) -> std::result::Result<(), String> {
        let mut next = 0;
        for (i, s) in self.shards.iter().enumerate() {
            if s.start != next || s.end <= s.start || s.rows != s.end - s.start {
                return Err(format!(
                    "shard {i} ({}) covers {}..{} with {} rows, expected to start at {next} and be non-empty",
                    s.file, s.start, s.end, s.rows
                ));
            }
            if s.file.contains('/') || s.file.contains('\\') || s.file.starts_with('.') {
                return Err(format!("shard {i} has an unsafe file name {:?}", s.file));
            }
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "shard {i} ({}) has a malformed sha256 {:?}",
                    s.file, s.sha256
                ));
            }
            next = s.end;
        }
        if next != self.num_examples {
            return Err(format!(
                "shards cover 0..{next} but num_examples is {}",
                self.num_examples
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

    fn version_1(dtype: &str) -> String {
        format!(
            r#"{{"format_version": 1, "dataset_fingerprint": "fp", "num_examples": 2,
                "num_classes": 3, "teachers": ["t"], "dtype": "{dtype}",
                "shards": [{{"file": "shard-00000.safetensors", "start": 0, "end": 2,
                             "rows": 2, "sha256": "{SHA}"}}]}}"#
        )
    }

    #[test]
    fn version_2_is_written_and_version_1_read_as_dense_f32() {
        let old: Manifest = serde_json::from_str(&version_1("F32")).unwrap();
        assert_eq!(old.encoding, Encoding::DenseF32);
        old.validate(Path::new("m")).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&old.to_bytes(Path::new("m")).unwrap()).unwrap();
        assert_eq!(written["format_version"], 2);
        assert_eq!(written["encoding"], "dense-f32");
        assert!(written.get("dtype").is_none());
        let again: Manifest = serde_json::from_value(written).unwrap();
        assert_eq!(again, old);
    }

    #[test]
    fn unknown_versions_and_mixed_fields_are_refused_with_the_reason() {
        let refused = |text: &str| {
            serde_json::from_str::<Manifest>(text)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&version_1("F16")).contains("dtype Some(\"F16\")"));
        let v3 = version_1("F32").replace("\"format_version\": 1", "\"format_version\": 3");
        assert!(refused(&v3).contains("format_version 3 is not supported"));
        let v2_with_dtype =
            version_1("F32").replace("\"format_version\": 1", "\"format_version\": 2");
        assert!(refused(&v2_with_dtype).contains("`encoding` and no `dtype`"));
        let unknown = version_1("F32").replace(
            "\"dtype\": \"F32\"",
            "\"dtype\": \"F32\", \"encoding\": \"top-k\"",
        );
        assert!(refused(&unknown).contains("top-k"));
    }

    #[test]
    fn a_builder_completes_once_every_shard_is_stored_in_any_order() {
        let entry = |i: usize| ShardEntry {
            file: format!("shard-{i:05}.safetensors"),
            start: i * 2,
            end: i * 2 + 2,
            rows: 2,
            sha256: SHA.into(),
            key: None,
        };
        let mut b = ManifestBuilder::new("fp", 4, 3, vec!["t".into()], Encoding::DenseF32, 2);
        b.stored(1, entry(1));
        assert_eq!(b.complete(), None);
        b.stored(0, entry(0));
        let m = b.complete().unwrap();
        m.validate(Path::new("m")).unwrap();
        assert_eq!(m.shards, [entry(0), entry(1)]);
        b.lost(0);
        assert_eq!(b.complete(), None);
        assert_eq!(b.next_example(), 4);
    }
}
