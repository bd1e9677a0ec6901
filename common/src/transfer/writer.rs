//! Writing a transfer set shard by shard.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use super::manifest::{Manifest, ShardEntry, MANIFEST_FILE};
use super::{logits_tensor_name, validate_teacher_id, INDEX_TENSOR};
use crate::atomic_file::write_atomic;
use crate::checksum::sha256_hex;
use crate::{Error, Result};

/// Writes the shards of a new transfer set in example order, then its
/// manifest. Until [`TransferSetWriter::finish`] has run there is no
/// `manifest.json`, so a half-written transfer set is never mistaken for a
/// complete one.
#[derive(Debug)]
pub struct TransferSetWriter {
    dir: PathBuf,
    manifest: Manifest,
}

impl TransferSetWriter {
    /// Starts a transfer set in `dir` (created if missing) for `num_examples`
    /// examples of the dataset with `dataset_fingerprint`, with logits from
    /// `teachers` over `num_classes` classes. Refuses a folder that already
    /// holds a manifest.
    pub fn create(
        dir: &Path,
        dataset_fingerprint: &str,
        num_examples: usize,
        num_classes: usize,
        teachers: Vec<String>,
    ) -> Result<Self> {
        let manifest = Manifest::new(
            dataset_fingerprint,
            num_examples,
            num_classes,
            teachers,
            Vec::new(),
        );
        if num_classes < 2 {
            return Err(Error::invalid(
                "num_classes",
                format!("need at least 2, got {num_classes}"),
            ));
        }
        if manifest.teachers.is_empty() {
            return Err(Error::invalid(
                "teachers",
                "a transfer set needs at least one teacher",
            ));
        }
        for t in &manifest.teachers {
            validate_teacher_id(t)?;
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let manifest_path = dir.join(MANIFEST_FILE);
        if manifest_path.exists() {
            return Err(Error::invalid(
                "transfer-set folder",
                format!(
                    "{} already holds a transfer set; remove it or choose another folder",
                    dir.display()
                ),
            ));
        }
        Ok(TransferSetWriter {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The index of the first example the next shard must start at.
    pub fn next_example(&self) -> usize {
        self.manifest.shards.last().map_or(0, |s| s.end)
    }

    /// Writes the next shard: `logits[k]` holds teacher k's logits
    /// (`rows * num_classes`, row-major) for the examples starting at
    /// [`Self::next_example`].
    pub fn write_shard(&mut self, logits: &[&[f32]]) -> Result<&ShardEntry> {
        let classes = self.manifest.num_classes;
        let teachers = &self.manifest.teachers;
        if logits.len() != teachers.len() {
            return Err(Error::invalid(
                "shard logits",
                format!(
                    "{} teachers' logits given, the transfer set has {}",
                    logits.len(),
                    teachers.len()
                ),
            ));
        }
        let values = logits[0].len();
        if values == 0
            || !values.is_multiple_of(classes)
            || logits.iter().any(|l| l.len() != values)
        {
            return Err(Error::invalid(
                "shard logits",
                format!(
                    "every teacher must give the same non-zero number of rows x {classes} values"
                ),
            ));
        }
        let rows = values / classes;
        let start = self.next_example();
        let end = start + rows;
        if end > self.manifest.num_examples {
            return Err(Error::invalid(
                "shard logits",
                format!(
                    "rows {start}..{end} exceed the {} examples of the transfer set",
                    self.manifest.num_examples
                ),
            ));
        }
        let bytes = encode_shard(start, rows, classes, teachers, logits)?;
        let file = shard_file_name(self.manifest.shards.len());
        write_atomic(&self.dir.join(&file), &bytes)?;
        self.manifest.shards.push(ShardEntry {
            file,
            start,
            end,
            rows,
            sha256: sha256_hex(&bytes),
        });
        Ok(self.manifest.shards.last().expect("just pushed"))
    }

    /// Writes `manifest.json`, which makes the transfer set complete, once
    /// the shards cover every example.
    pub fn finish(self) -> Result<Manifest> {
        if self.next_example() != self.manifest.num_examples {
            return Err(Error::invalid(
                "transfer set",
                format!(
                    "shards cover 0..{} of {} examples; write the rest before finishing",
                    self.next_example(),
                    self.manifest.num_examples
                ),
            ));
        }
        write_manifest(&self.dir, &self.manifest)?;
        Ok(self.manifest)
    }
}

/// File name of shard number `index` in a transfer-set folder.
pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.safetensors")
}

/// Checks that `bytes`, a shard encoded elsewhere (by a worker), can be
/// shard `index` of a transfer set: that it holds `teachers`' logits over
/// `num_classes` classes for exactly the examples in `range`. Returns its
/// manifest entry.
pub fn check_encoded_shard(
    index: usize,
    range: std::ops::Range<usize>,
    teachers: &[String],
    num_classes: usize,
    bytes: &[u8],
) -> Result<ShardEntry> {
    let file = shard_file_name(index);
    super::Shard::decode(
        bytes,
        Path::new(&file),
        range.clone(),
        teachers,
        num_classes,
    )?;
    Ok(ShardEntry {
        file,
        start: range.start,
        end: range.end,
        rows: range.len(),
        sha256: sha256_hex(bytes),
    })
}

/// Validates `manifest` and writes it into `dir`, which completes a transfer
/// set whose shards were checked with [`check_encoded_shard`] and written there. Returns the
/// bytes written.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<Vec<u8>> {
    let path = dir.join(MANIFEST_FILE);
    let json = manifest.to_bytes(&path)?;
    write_atomic(&path, &json)?;
    Ok(json)
}

/// The safetensors bytes of one shard: `logits[k]` holds teacher k's logits
/// (`rows * classes`, row-major) for examples `start..start + rows`.
/// Deterministic: the same arguments give the same bytes.
pub fn encode_shard(
    start: usize,
    rows: usize,
    classes: usize,
    teachers: &[String],
    logits: &[&[f32]],
) -> Result<Vec<u8>> {
    let index_bytes: Vec<u8> = (start..start + rows)
        .flat_map(|i| (i as i64).to_le_bytes())
        .collect();
    let logit_bytes: Vec<Vec<u8>> = logits
        .iter()
        .map(|l| l.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let view = |dtype, shape, data| {
        TensorView::new(dtype, shape, data)
            .map_err(|e| Error::invalid("shard tensor", e.to_string()))
    };
    let mut tensors = vec![(
        INDEX_TENSOR.to_string(),
        view(Dtype::I64, vec![rows], &index_bytes)?,
    )];
    for (t, bytes) in teachers.iter().zip(&logit_bytes) {
        tensors.push((
            logits_tensor_name(t),
            view(Dtype::F32, vec![rows, classes], bytes)?,
        ));
    }
    safetensors::serialize(tensors, None).map_err(|e| Error::invalid("shard", e.to_string()))
}
