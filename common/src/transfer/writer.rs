//! Writing a transfer set shard by shard, into a blob store.

use std::path::Path;
use std::sync::Arc;

use safetensors::tensor::{Dtype, TensorView};

use super::manifest::{Manifest, ShardEntry, MANIFEST_FILE};
use super::{logits_tensor_name, validate_teacher_id, INDEX_TENSOR};
use crate::atomic_file::write_atomic;
use crate::blob::{self, BlobError, BlobStore, LocalStore, PutMode};
use crate::checksum::sha256_hex;
use crate::{Error, Result};

/// Writes the shards of a new transfer set in example order, then its
/// manifest (create-only: it is the commit). Until
/// [`TransferSetWriter::finish`] has run there is no `manifest.json`, so a
/// half-written transfer set is never mistaken for a complete one.
///
/// Its methods block: it runs the store's calls on a runtime of its own, so
/// it must not be used from inside an async runtime (use the store there).
#[derive(Debug)]
pub struct TransferSetWriter {
    store: Arc<dyn BlobStore>,
    prefix: String,
    runtime: tokio::runtime::Runtime,
    manifest: Manifest,
}

impl TransferSetWriter {
    /// Starts a transfer set in folder `dir` (see
    /// [`TransferSetWriter::create_in`]).
    pub fn create(
        dir: &Path,
        dataset_fingerprint: &str,
        num_examples: usize,
        num_classes: usize,
        teachers: Vec<String>,
    ) -> Result<Self> {
        let store = Arc::new(LocalStore::new(dir));
        let writer = Self::create_in(
            store,
            "",
            dataset_fingerprint,
            num_examples,
            num_classes,
            teachers,
        )?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(writer)
    }

    /// Starts a transfer set under keys `<prefix><file>` of `store` (such
    /// as `transfer/`, or `""` for a folder of its own) for `num_examples`
    /// examples of the dataset with `dataset_fingerprint`, with logits from
    /// `teachers` over `num_classes` classes. Refuses a place that already
    /// holds a manifest.
    pub fn create_in(
        store: Arc<dyn BlobStore>,
        prefix: &str,
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("the transfer-set writer's runtime", e))?;
        let writer = TransferSetWriter {
            store,
            prefix: prefix.to_string(),
            runtime,
            manifest,
        };
        let manifest_key = writer.key(MANIFEST_FILE);
        if writer
            .runtime
            .block_on(writer.store.size(&manifest_key))?
            .is_some()
        {
            return Err(writer.already_there());
        }
        Ok(writer)
    }

    fn key(&self, file: &str) -> String {
        format!("{}{file}", self.prefix)
    }

    fn already_there(&self) -> Error {
        Error::invalid(
            "transfer-set folder",
            format!(
                "{} already holds a transfer set at {:?}; remove it or choose another place",
                self.store.describe(),
                self.key(MANIFEST_FILE)
            ),
        )
    }

    fn put(&self, file: &str, bytes: Vec<u8>, mode: PutMode) -> Result<blob::Written, BlobError> {
        let key = self.key(file);
        self.runtime
            .block_on(blob::put_bytes(&*self.store, &key, bytes, mode))
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
        let written = self.put(&file, bytes, PutMode::Overwrite)?;
        self.manifest.shards.push(ShardEntry {
            file,
            start,
            end,
            rows,
            sha256: written.sha256,
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
        let json = self
            .manifest
            .to_bytes(Path::new(&self.key(MANIFEST_FILE)))?;
        match self.put(MANIFEST_FILE, json, PutMode::CreateOnly) {
            Ok(_) => Ok(self.manifest),
            Err(BlobError::AlreadyExists { .. }) => Err(self.already_there()),
            Err(e) => Err(e.into()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::MemoryStore;

    fn writer(store: &Arc<MemoryStore>) -> TransferSetWriter {
        TransferSetWriter::create_in(store.clone(), "transfer/", "fp", 4, 3, vec!["t".into()])
            .unwrap()
    }

    #[test]
    fn writes_shards_then_commits_the_manifest_once_into_any_store() {
        let store = Arc::new(MemoryStore::default());
        let logits = [0.5f32; 4 * 3];
        let (mut first, mut second) = (writer(&store), writer(&store));
        for w in [&mut first, &mut second] {
            w.write_shard(&[&logits[..6]]).unwrap();
            w.write_shard(&[&logits[6..]]).unwrap();
        }
        let keys = |store: &MemoryStore| {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(store.list(""))
                .unwrap()
        };
        assert_eq!(
            keys(&store),
            [
                "transfer/shard-00000.safetensors",
                "transfer/shard-00001.safetensors"
            ],
            "no manifest before finish"
        );
        let manifest = first.finish().unwrap();
        assert_eq!(manifest.shards.len(), 2);
        assert!(keys(&store).contains(&"transfer/manifest.json".to_string()));
        // Two writers of one place: the manifest is committed once.
        let e = second.finish().unwrap_err().to_string();
        assert!(e.contains("already holds"), "{e}");
        let e = TransferSetWriter::create_in(store, "transfer/", "fp", 4, 3, vec!["t".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("already holds"), "{e}");
    }
}
