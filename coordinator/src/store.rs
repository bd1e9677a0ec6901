//! The coordinator's artifacts: named files under the output folder, each
//! written atomically (temp file, fsync, rename) and known by its sha256.
//! The coordinator is their single writer; workers download them by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::atomic_file::write_atomic;
use common::checksum::sha256_hex;

/// A stored artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredArtifact {
    /// Its file.
    pub path: PathBuf,
    /// sha256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Length in bytes.
    pub size: u64,
}

/// Named artifacts under one root folder.
#[derive(Debug)]
pub struct ArtifactStore {
    root: PathBuf,
    entries: BTreeMap<String, StoredArtifact>,
}

impl ArtifactStore {
    /// An empty store writing under `root`.
    pub fn new(root: &Path) -> Self {
        ArtifactStore {
            root: root.to_path_buf(),
            entries: BTreeMap::new(),
        }
    }

    /// The folder the artifacts live under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file an artifact called `name` lives in: `dataset` →
    /// `dataset.safetensors`, `models/<m>` → `models/<m>.safetensors`,
    /// `transfer/<file>` → `transfer/<file>`, `specialists/clusters.json`
    /// → itself, `evaluation` → `evaluation.json`. Names are made by the planner, never by workers.
    pub fn path_for(&self, name: &str) -> PathBuf {
        match name {
            "dataset" => self.root.join("dataset.safetensors"),
            "evaluation" => self.root.join("evaluation.json"),
            _ if name.starts_with("models/") || name.starts_with("checkpoints/") => {
                self.root.join(format!("{name}.safetensors"))
            }
            _ => self.root.join(name),
        }
    }

    /// Writes `bytes` as artifact `name` and records its checksum.
    pub fn put(&mut self, name: &str, bytes: &[u8]) -> common::Result<&StoredArtifact> {
        let path = self.path_for(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| common::Error::io(dir, e))?;
        }
        write_atomic(&path, bytes)?;
        Ok(self.record(name, path, sha256_hex(bytes), bytes.len() as u64))
    }

    /// Records an artifact that was written by other code (such as a
    /// transfer-set shard) under `path`.
    pub fn record(
        &mut self,
        name: &str,
        path: PathBuf,
        sha256: String,
        size: u64,
    ) -> &StoredArtifact {
        self.entries
            .insert(name.to_string(), StoredArtifact { path, sha256, size });
        &self.entries[name]
    }

    /// Forgets artifact `name` and deletes its file.
    pub fn remove(&mut self, name: &str) -> common::Result<()> {
        if let Some(stored) = self.entries.remove(name) {
            match std::fs::remove_file(&stored.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(common::Error::io(&stored.path, e)),
            }
        }
        Ok(())
    }

    /// The artifact called `name`, if stored.
    pub fn get(&self, name: &str) -> Option<&StoredArtifact> {
        self.entries.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_writes_the_file_and_records_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ArtifactStore::new(dir.path());
        let stored = store.put("models/teacher-0", b"weights").unwrap().clone();
        assert_eq!(stored.path, dir.path().join("models/teacher-0.safetensors"));
        assert_eq!(std::fs::read(&stored.path).unwrap(), b"weights");
        assert_eq!(stored.sha256, sha256_hex(b"weights"));
        assert_eq!(stored.size, 7);
        assert_eq!(store.get("models/teacher-0"), Some(&stored));
        assert!(store.get("models/student").is_none());
        assert_eq!(
            store.path_for("transfer/shard-00001.safetensors"),
            dir.path().join("transfer/shard-00001.safetensors")
        );
    }
}
