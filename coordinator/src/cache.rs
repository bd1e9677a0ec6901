//! Finished tasks' results kept across jobs, so that a benchmark that runs
//! many jobs trains each teacher once, and a job that was stopped picks up
//! where it stopped.
//!
//! A result is found by its key: a sha256 over the task's spec (which holds
//! its seed and every hyperparameter) and the names and checksums of its
//! inputs (the dataset bundle, the models and shards it reads). Tasks are
//! deterministic functions of these, so a hit is the result the task would
//! produce again. The code itself is not part of the key: clear the folder
//! after changing how models are trained.
//!
//! Each entry is a folder `<key>/` with `result.bin` and `meta.json`
//! (checksum, size, summary, seconds); `meta.json` is written last, so an
//! entry without it is incomplete and ignored. A result whose checksum does
//! not match is logged, deleted and treated as missing.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::artifact::ArtifactRef;
use common::blob::{self, BlobStore, LocalStore, PutMode};
use distill::task::TaskSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Changes when the meaning of a key or an entry's layout changes (2: the
/// inputs are named by their typed artifact names).
const CACHE_FORMAT: &str = "distill-task-cache/2";

/// A result read back from the cache.
#[derive(Clone, Debug)]
pub struct CachedResult {
    /// The task's output bytes (checksum verified).
    pub payload: Bytes,
    /// The worker's summary when it ran the task.
    pub summary: serde_json::Value,
    /// Seconds the compute took when it ran.
    pub seconds: f64,
}

/// An entry found in the cache without reading its result (see
/// [`TaskCache::find`]).
#[derive(Clone, Debug)]
pub struct CachedEntry {
    /// sha256 of the result, as recorded when it was kept.
    pub sha256: String,
    /// Its length (checked against the stored object).
    pub size: u64,
    /// The worker's summary when it ran the task.
    pub summary: serde_json::Value,
    /// Seconds the compute took when it ran.
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    sha256: String,
    size: u64,
    summary: serde_json::Value,
    seconds: f64,
}

/// Cached task results in a blob store.
#[derive(Clone, Debug)]
pub struct TaskCache {
    store: Arc<dyn BlobStore>,
}

impl TaskCache {
    /// The cache in folder `dir`.
    pub fn open(dir: &Path) -> Self {
        Self::in_store(Arc::new(LocalStore::new(dir)))
    }

    /// The cache in `store`.
    pub fn in_store(store: Arc<dyn BlobStore>) -> Self {
        TaskCache { store }
    }

    /// The key of `spec` run on `inputs`, in the order the task lists them.
    pub fn key<'a>(spec: &TaskSpec, inputs: impl IntoIterator<Item = &'a ArtifactRef>) -> String {
        let mut h = Sha256::new();
        h.update(CACHE_FORMAT.as_bytes());
        h.update([0]);
        h.update(serde_json::to_vec(spec).expect("specs serialise"));
        for input in inputs {
            h.update([0]);
            h.update(input.name.to_string().as_bytes());
            h.update([0]);
            h.update(input.sha256.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The result stored under `key`, if there is a complete, intact one.
    pub async fn get(&self, key: &str) -> Option<CachedResult> {
        let store = &*self.store;
        let meta = blob::get_bytes(store, &format!("{key}/meta.json"))
            .await
            .ok()?;
        let meta: Meta = serde_json::from_slice(&meta)
            .map_err(|e| tracing::warn!(entry = key, error = %e, "unreadable cache entry ignored"))
            .ok()?;
        let result = format!("{key}/result.bin");
        match blob::get_verified(store, &result, &meta.sha256).await {
            Ok(payload) if payload.len() as u64 == meta.size => Some(CachedResult {
                payload: payload.into(),
                summary: meta.summary,
                seconds: meta.seconds,
            }),
            Err(e) if e.is_not_found() => None,
            _ => {
                tracing::warn!(
                    entry = key,
                    "corrupted cache entry deleted; the task runs again"
                );
                let _ = store.remove(&format!("{key}/meta.json")).await;
                let _ = store.remove(&result).await;
                None
            }
        }
    }

    /// The entry under `key` if it is complete and its result has the
    /// recorded length; the result is not read (see
    /// [`TaskCache::copy_result`]: in a bucket it is copied on the server,
    /// and its readers verify it).
    pub async fn find(&self, key: &str) -> Option<CachedEntry> {
        let store = &*self.store;
        let meta = blob::get_bytes(store, &format!("{key}/meta.json"))
            .await
            .ok()?;
        let meta: Meta = serde_json::from_slice(&meta).ok()?;
        match store.size(&format!("{key}/result.bin")).await {
            Ok(Some(size)) if size == meta.size => Some(CachedEntry {
                sha256: meta.sha256,
                size: meta.size,
                summary: meta.summary,
                seconds: meta.seconds,
            }),
            _ => None,
        }
    }

    /// Copies the result under `key` to `to` in `target`.
    pub async fn copy_result(
        &self,
        key: &str,
        target: &dyn BlobStore,
        to: &str,
    ) -> Result<(), blob::BlobError> {
        blob::copy(&*self.store, &format!("{key}/result.bin"), target, to).await
    }

    /// Keeps object `from` of `source` (with `sha256` and `size`) as the
    /// result under `key`, copied without passing through this process
    /// when both are the same bucket.
    pub async fn keep(
        &self,
        key: &str,
        source: &dyn BlobStore,
        from: &str,
        stored: &CachedEntry,
    ) -> Result<(), blob::BlobError> {
        let store = &*self.store;
        blob::copy(source, from, store, &format!("{key}/result.bin")).await?;
        let meta = Meta {
            sha256: stored.sha256.clone(),
            size: stored.size,
            summary: stored.summary.clone(),
            seconds: stored.seconds,
        };
        let meta = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        blob::put_bytes(store, &format!("{key}/meta.json"), meta, PutMode::Overwrite).await?;
        Ok(())
    }

    /// Deletes the entry under `key` (its result was found corrupt).
    pub async fn forget(&self, key: &str) {
        let _ = self.store.remove(&format!("{key}/meta.json")).await;
        let _ = self.store.remove(&format!("{key}/result.bin")).await;
    }

    /// Stores a result under `key` (replacing any entry there).
    pub async fn put(
        &self,
        key: &str,
        payload: Bytes,
        summary: &serde_json::Value,
        seconds: f64,
    ) -> Result<(), blob::BlobError> {
        let store = &*self.store;
        let written = blob::put_bytes(
            store,
            &format!("{key}/result.bin"),
            payload,
            PutMode::Overwrite,
        )
        .await?;
        let meta = Meta {
            sha256: written.sha256,
            size: written.size,
            summary: summary.clone(),
            seconds,
        };
        let meta = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        blob::put_bytes(store, &format!("{key}/meta.json"), meta, PutMode::Overwrite).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::artifact::ArtifactName;
    use distill::task::InferTask;

    fn spec(end: usize) -> TaskSpec {
        TaskSpec::Infer(InferTask {
            shard: 0,
            start: 0,
            end,
            teachers: vec!["teacher-0".into()],
            combined: None,
        })
    }

    fn input(name: ArtifactName, sha256: &str) -> ArtifactRef {
        ArtifactRef {
            name,
            sha256: sha256.into(),
            size: 1,
            key: None,
        }
    }

    #[test]
    fn key_depends_on_spec_and_input_checksums() {
        let dataset = |sha| [input(ArtifactName::Dataset, sha)];
        let k = TaskCache::key(&spec(10), &dataset("aa"));
        assert_eq!(k, TaskCache::key(&spec(10), &dataset("aa")));
        assert_ne!(k, TaskCache::key(&spec(11), &dataset("aa")));
        assert_ne!(k, TaskCache::key(&spec(10), &dataset("ab")));
        let model = [input(ArtifactName::Model("dataset".into()), "aa")];
        assert_ne!(k, TaskCache::key(&spec(10), &model));
    }

    #[tokio::test]
    async fn round_trips_and_drops_corrupted_or_incomplete_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TaskCache::open(dir.path());
        assert!(cache.get("k").await.is_none());
        let summary = serde_json::json!({"train_seconds": 1.5});
        cache
            .put("k", Bytes::from_static(b"model bytes"), &summary, 2.0)
            .await
            .unwrap();
        let hit = cache.get("k").await.unwrap();
        assert_eq!(&hit.payload[..], b"model bytes");
        assert_eq!(hit.summary, summary);
        assert_eq!(hit.seconds, 2.0);

        std::fs::write(dir.path().join("k/result.bin"), b"model bytez").unwrap();
        assert!(cache.get("k").await.is_none());
        assert!(
            !dir.path().join("k/result.bin").exists(),
            "corrupted entry deleted"
        );

        cache
            .put("j", Bytes::from_static(b"x"), &summary, 1.0)
            .await
            .unwrap();
        std::fs::remove_file(dir.path().join("j/meta.json")).unwrap();
        assert!(cache.get("j").await.is_none());
    }

    #[tokio::test]
    async fn entries_are_kept_and_handed_out_by_copy() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TaskCache::open(&dir.path().join("cache"));
        let job = LocalStore::new(&dir.path().join("job"));
        let written = blob::put_bytes(&job, "attempts/m/1", b"model".to_vec(), PutMode::Overwrite)
            .await
            .unwrap();
        let entry = CachedEntry {
            sha256: written.sha256.clone(),
            size: written.size,
            summary: serde_json::json!({"s": 1}),
            seconds: 3.0,
        };
        cache.keep("k", &job, "attempts/m/1", &entry).await.unwrap();
        let found = cache.find("k").await.unwrap();
        assert_eq!((found.sha256, found.size), (written.sha256, 5));
        cache.copy_result("k", &job, "attempts/m/2").await.unwrap();
        assert_eq!(
            blob::get_bytes(&job, "attempts/m/2").await.unwrap(),
            b"model"
        );
        std::fs::write(dir.path().join("cache/k/result.bin"), b"longer model").unwrap();
        assert!(
            cache.find("k").await.is_none(),
            "a result of another length is no hit"
        );
        cache.forget("k").await;
        assert!(!dir.path().join("cache/k/meta.json").exists());
    }
}
