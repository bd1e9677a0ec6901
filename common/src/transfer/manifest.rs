//! `manifest.json`: what a transfer set holds and the checksum of each shard.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::validate_teacher_id;
use crate::{Error, Result};

/// The version of the transfer-set format this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a transfer-set folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest of a transfer set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] for files this code writes.
    pub format_version: u32,
    /// [`crate::dataset::Dataset::fingerprint`] of the transfer examples.
    pub dataset_fingerprint: String,
    /// Number of transfer examples (rows over all shards).
    pub num_examples: usize,
    /// Number of classes (columns of every logits tensor).
    pub num_classes: usize,
    /// Teacher ids, in the order the ensemble lists them.
    pub teachers: Vec<String>,
    /// Element type of the logits; always `"F32"`.
    pub dtype: String,
    /// The shards, in example order.
    pub shards: Vec<ShardEntry>,
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
}

impl Manifest {
    /// The manifest of a transfer set of f32 logits ([`FORMAT_VERSION`]):
    /// `teachers`' logits over `num_classes` classes for `num_examples`
    /// examples of the dataset with `dataset_fingerprint`, in `shards`.
    pub fn new(
        dataset_fingerprint: &str,
        num_examples: usize,
        num_classes: usize,
        teachers: Vec<String>,
        shards: Vec<ShardEntry>,
    ) -> Self {
        Manifest {
            format_version: FORMAT_VERSION,
            dataset_fingerprint: dataset_fingerprint.to_string(),
            num_examples,
            num_classes,
            teachers,
            dtype: "F32".into(),
            shards,
        }
    }

    /// The manifest's JSON after [`Manifest::validate`] (`path` names it
    /// in messages).
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>> {
        self.validate(path)?;
        Ok(serde_json::to_vec_pretty(self).expect("a manifest serialises"))
    }

    /// Checks internal consistency: version, dtype, teacher ids, and that the
    /// shards cover `0..num_examples` in order without gaps or overlaps.
    /// `path` names the manifest in messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| Err(Error::format(path, reason));
        if self.format_version != FORMAT_VERSION {
            return bad(format!(
                "format_version {} is not supported (this build reads version {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.dtype != "F32" {
            return bad(format!(
                "dtype {:?} is not supported (expected \"F32\")",
                self.dtype
            ));
        }
        if self.num_classes < 2 {
            return bad(format!(
                "num_classes is {}, expected at least 2",
                self.num_classes
            ));
        }
        if self.teachers.is_empty() {
            return bad("no teachers listed".into());
        }
        for t in &self.teachers {
            validate_teacher_id(t).map_err(|e| Error::format(path, e.to_string()))?;
        }
        let mut sorted = self.teachers.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.teachers.len() {
            return bad("teacher ids are not unique".into());
        }
        let mut next = 0;
        for (i, s) in self.shards.iter().enumerate() {
            if s.start != next || s.end <= s.start || s.rows != s.end - s.start {
                return bad(format!(
                    "shard {i} ({}) covers {}..{} with {} rows, expected to start at {next} and be non-empty",
                    s.file, s.start, s.end, s.rows
                ));
            }
            if s.file.contains('/') || s.file.contains('\\') || s.file.starts_with('.') {
                return bad(format!("shard {i} has an unsafe file name {:?}", s.file));
            }
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!(
                    "shard {i} ({}) has a malformed sha256 {:?}",
                    s.file, s.sha256
                ));
            }
            next = s.end;
        }
        if next != self.num_examples {
            return bad(format!(
                "shards cover 0..{next} but num_examples is {}",
                self.num_examples
            ));
        }
        Ok(())
    }
}
