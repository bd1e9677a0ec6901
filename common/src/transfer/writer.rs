//! Writing a transfer set shard by shard, into a blob store.

use std::path::Path;
use std::sync::Arc;

use super::dense;
use super::manifest::{Encoding, Manifest, ManifestBuilder, ShardEntry, MANIFEST_FILE};
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
    manifest: ManifestBuilder,
}

impl TransferSetWriter {
    /// Starts the transfer set `manifest` describes in folder `dir` (see
    /// [`TransferSetWriter::create_in`]).
    pub fn create(dir: &Path, manifest: ManifestBuilder) -> Result<Self> {
        let store = Arc::new(LocalStore::new(dir));
        let writer = Self::create_in(store, "", manifest)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(writer)
    }

    /// Starts the transfer set `manifest` describes (its shards are
    /// written here, in order) under keys `<prefix><file>` of `store` (such
    /// as `transfer/`, or `""` for a folder of its own). Refuses a place
    /// that already holds a manifest.
    pub fn create_in(
        store: Arc<dyn BlobStore>,
        prefix: &str,
        manifest: ManifestBuilder,
    ) -> Result<Self> {
        manifest
            .head()
            .validate_head()
            .map_err(|reason| Error::invalid("transfer set", reason))?;
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
        self.manifest.next_example()
    }

    /// Writes the next shard: `logits[k]` holds teacher k's logits
    /// (`rows * num_classes`, row-major) for the examples starting at
    /// [`Self::next_example`].
    pub fn write_shard(&mut self, logits: &[&[f32]]) -> Result<ShardEntry> {
        let head = self.manifest.head();
        let block = ShardLogits::new(
            self.next_example(),
            head.num_classes,
            &head.teachers,
            logits,
        )?;
        let (start, end) = (block.start, block.start + block.rows);
        if end > head.num_examples {
            return Err(Error::invalid(
                "shard logits",
                format!(
                    "rows {start}..{end} exceed the {} examples of the transfer set",
                    head.num_examples
                ),
            ));
        }
        let bytes = encode_shard(head.encoding, &block)?;
        let rows = block.rows;
        let index = self.manifest.len();
        let file = shard_file_name(index);
        let written = self.put(&file, bytes, PutMode::Overwrite)?;
        let entry = ShardEntry {
            file,
            start,
            end,
            rows,
            sha256: written.sha256,
            key: None,
        };
        self.manifest.stored(index, entry.clone());
        Ok(entry)
    }

    /// Writes `manifest.json`, which makes the transfer set complete, once
    /// the shards cover every example.
    pub fn finish(self) -> Result<Manifest> {
        let num_examples = self.manifest.head().num_examples;
        let manifest = match self.manifest.complete() {
            Some(m) if self.next_example() == num_examples => m,
            _ => {
                return Err(Error::invalid(
                    "transfer set",
                    format!(
                        "shards cover 0..{} of {num_examples} examples; write the rest before finishing",
                        self.next_example(),
                    ),
                ))
            }
        };
        let json = manifest.to_bytes(Path::new(&self.key(MANIFEST_FILE)))?;
        match self.put(MANIFEST_FILE, json, PutMode::CreateOnly) {
            Ok(_) => Ok(manifest),
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
    encoding: Encoding,
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
        encoding,
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
        key: None,
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

/// Teachers' raw logits for consecutive examples: what one shard stores.
#[derive(Clone, Copy, Debug)]
pub struct ShardLogits<'a> {
    /// The first example.
    pub start: usize,
    /// Examples (rows of every teacher's block).
    pub rows: usize,
    /// Values per row.
    pub classes: usize,
    /// The column names (teacher ids), one per block of `logits`.
    pub teachers: &'a [String],
    /// `logits[k]`: teacher k's `rows * classes` values, row-major.
    pub logits: &'a [&'a [f32]],
}

impl<'a> ShardLogits<'a> {
    /// Logits for the examples from `start` on, checked: one non-empty
    /// block per teacher, all of the same whole number of rows.
    pub fn new(
        start: usize,
        classes: usize,
        teachers: &'a [String],
        logits: &'a [&'a [f32]],
    ) -> Result<Self> {
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
        let values = logits.first().map_or(0, |l| l.len());
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
        Ok(ShardLogits {
            start,
            rows: values / classes,
            classes,
            teachers,
            logits,
        })
    }
}

/// The bytes of one shard stored as `encoding`. Deterministic: the same
/// logits give the same bytes.
pub fn encode_shard(encoding: Encoding, block: &ShardLogits<'_>) -> Result<Vec<u8>> {
    match encoding {
        Encoding::DenseF32 => dense::encode(block),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> ManifestBuilder {
        ManifestBuilder::new("fp", 4, 3, vec!["t".into()], Encoding::DenseF32, 0)
    }
    use crate::blob::MemoryStore;

    fn writer(store: &Arc<MemoryStore>) -> TransferSetWriter {
        TransferSetWriter::create_in(store.clone(), "transfer/", head()).unwrap()
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
        let e = TransferSetWriter::create_in(store, "transfer/", head())
            .unwrap_err()
            .to_string();
        assert!(e.contains("already holds"), "{e}");
    }
}
