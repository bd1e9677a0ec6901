//! The worker's scratch folder: artifacts downloaded from the coordinator,
//! stored under their sha256 in a blob store (a folder) and verified on
//! every use, so each is fetched once and a corrupted copy is fetched
//! again, never used.

use std::path::{Path, PathBuf};

use anyhow::Context;
use common::artifact::ArtifactRef;
use common::blob::{self, BlobError, BlobStore, LocalStore, PutMode};
use common::checksum::sha256_hex;

/// Content-addressed objects under `<scratch>/artifacts/`.
#[derive(Clone, Debug)]
pub struct ArtifactCache {
    store: LocalStore,
}

impl ArtifactCache {
    /// A cache in `scratch` (created if missing).
    pub fn open(scratch: &Path) -> anyhow::Result<Self> {
        let dir = scratch.join("artifacts");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(ArtifactCache {
            store: LocalStore::new(&dir),
        })
    }

    /// Where the artifact with this checksum is kept.
    pub fn path(&self, sha256: &str) -> anyhow::Result<PathBuf> {
        Ok(self.store.path(sha256)?)
    }

    /// The bytes of `artifact` if the cache holds a copy whose checksum
    /// matches; a mismatching copy is deleted (and logged).
    pub async fn read_verified(&self, artifact: &ArtifactRef) -> Option<Vec<u8>> {
        match blob::get_verified(&self.store, &artifact.sha256, &artifact.sha256).await {
            Ok(bytes) => Some(bytes),
            Err(BlobError::Corrupt { .. }) => {
                tracing::warn!(artifact = %artifact.name, "cached copy is corrupted; fetching it again");
                let _ = self.store.remove(&artifact.sha256).await;
                None
            }
            Err(_) => None,
        }
    }

    /// Verifies downloaded `bytes` against `artifact` and stores them.
    pub async fn store(&self, artifact: &ArtifactRef, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let found = sha256_hex(bytes);
        anyhow::ensure!(
            found == artifact.sha256 && bytes.len() as u64 == artifact.size,
            "downloaded {} ({} bytes, sha256 {found}) does not match the expected {} bytes, sha256 {}",
            artifact.name,
            bytes.len(),
            artifact.size,
            artifact.sha256
        );
        blob::put_bytes(
            &self.store,
            &artifact.sha256,
            bytes.to_vec(),
            PutMode::Overwrite,
        )
        .await?;
        self.path(&artifact.sha256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::artifact::ArtifactName;

    fn artifact(bytes: &[u8]) -> ArtifactRef {
        ArtifactRef {
            name: ArtifactName::Model("x".into()),
            sha256: sha256_hex(bytes),
            size: bytes.len() as u64,
            key: None,
        }
    }

    #[tokio::test]
    async fn stores_verified_bytes_and_drops_corrupted_copies() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path()).unwrap();
        let a = artifact(b"model bytes");
        assert!(cache.read_verified(&a).await.is_none());
        cache.store(&a, b"model bytes").await.unwrap();
        assert_eq!(cache.read_verified(&a).await.unwrap(), b"model bytes");
        let path = cache.path(&a.sha256).unwrap();
        std::fs::write(&path, b"model bytez").unwrap();
        assert!(
            cache.read_verified(&a).await.is_none(),
            "corruption detected"
        );
        assert!(!path.exists(), "corrupted copy removed");
        let err = cache.store(&a, b"other").await.unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }
}
