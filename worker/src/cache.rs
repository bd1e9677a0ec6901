//! The worker's scratch folder: artifacts downloaded from the coordinator,
//! stored under their sha256 and verified on every use, so each is fetched
//! once and a corrupted copy is fetched again, never used.

use std::path::{Path, PathBuf};

use anyhow::Context;
use common::atomic_file::write_atomic;
use common::checksum::sha256_hex;
use proto::pb;

/// Content-addressed files under `<scratch>/artifacts/`.
#[derive(Clone, Debug)]
pub struct ArtifactCache {
    dir: PathBuf,
}

impl ArtifactCache {
    /// A cache in `scratch` (created if missing).
    pub fn open(scratch: &Path) -> anyhow::Result<Self> {
        let dir = scratch.join("artifacts");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(ArtifactCache { dir })
    }

    /// Where the artifact with this checksum is kept.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// The bytes of `artifact` if the cache holds a copy whose checksum
    /// matches; a mismatching copy is deleted (and logged).
    pub fn read_verified(&self, artifact: &pb::ArtifactRef) -> Option<Vec<u8>> {
        let path = self.path(&artifact.sha256);
        let bytes = std::fs::read(&path).ok()?;
        if sha256_hex(&bytes) == artifact.sha256 {
            Some(bytes)
        } else {
            tracing::warn!(artifact = %artifact.name, path = %path.display(), "cached copy is corrupted; fetching it again");
            let _ = std::fs::remove_file(&path);
            None
        }
    }

    /// Verifies downloaded `bytes` against `artifact` and stores them.
    pub fn store(&self, artifact: &pb::ArtifactRef, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let found = sha256_hex(bytes);
        anyhow::ensure!(
            found == artifact.sha256 && bytes.len() as u64 == artifact.size,
            "downloaded {} ({} bytes, sha256 {found}) does not match the expected {} bytes, sha256 {}",
            artifact.name,
            bytes.len(),
            artifact.size,
            artifact.sha256
        );
        let path = self.path(&artifact.sha256);
        write_atomic(&path, bytes)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(bytes: &[u8]) -> pb::ArtifactRef {
        pb::ArtifactRef {
            name: "models/x".into(),
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
        }
    }

    #[test]
    fn stores_verified_bytes_and_drops_corrupted_copies() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path()).unwrap();
        let a = artifact(b"model bytes");
        assert!(cache.read_verified(&a).is_none());
        cache.store(&a, b"model bytes").unwrap();
        assert_eq!(cache.read_verified(&a).unwrap(), b"model bytes");
        std::fs::write(cache.path(&a.sha256), b"model bytez").unwrap();
        assert!(cache.read_verified(&a).is_none(), "corruption detected");
        assert!(!cache.path(&a.sha256).exists(), "corrupted copy removed");
        let err = cache.store(&a, b"other").unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }
}
