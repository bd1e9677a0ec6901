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

use std::path::{Path, PathBuf};

use common::atomic_file::write_atomic;
use common::checksum::sha256_hex;
use distill::task::TaskSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Changes when the meaning of a key or an entry's layout changes.
const CACHE_FORMAT: &str = "distill-task-cache/1";

/// A result read back from the cache.
#[derive(Clone, Debug)]
pub struct CachedResult {
    /// The task's output bytes (checksum verified).
    pub payload: Vec<u8>,
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

/// A folder of cached task results.
#[derive(Clone, Debug)]
pub struct TaskCache {
    dir: PathBuf,
}

impl TaskCache {
    /// The cache in `dir` (created if missing).
    pub fn open(dir: &Path) -> common::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| common::Error::io(dir, e))?;
        Ok(TaskCache {
            dir: dir.to_path_buf(),
        })
    }

    /// The key of `spec` run on `inputs` (artifact name, sha256), in the
    /// order the task lists them.
    pub fn key<'a>(
        spec: &TaskSpec,
        inputs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> String {
        let mut h = Sha256::new();
        h.update(CACHE_FORMAT.as_bytes());
        h.update([0]);
        h.update(serde_json::to_vec(spec).expect("specs serialise"));
        for (name, sha256) in inputs {
            h.update([0]);
            h.update(name.as_bytes());
            h.update([0]);
            h.update(sha256.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The result stored under `key`, if there is a complete, intact one.
    pub fn get(&self, key: &str) -> Option<CachedResult> {
        let entry = self.dir.join(key);
        let meta: Meta = serde_json::from_slice(&std::fs::read(entry.join("meta.json")).ok()?)
            .map_err(|e| tracing::warn!(entry = %entry.display(), error = %e, "unreadable cache entry ignored"))
            .ok()?;
        let payload = std::fs::read(entry.join("result.bin")).ok()?;
        if payload.len() as u64 != meta.size || sha256_hex(&payload) != meta.sha256 {
            tracing::warn!(entry = %entry.display(), "corrupted cache entry deleted; the task runs again");
            let _ = std::fs::remove_dir_all(&entry);
            return None;
        }
        Some(CachedResult {
            payload,
            summary: meta.summary,
            seconds: meta.seconds,
        })
    }

    /// Stores a result under `key` (replacing any entry there).
    pub fn put(
        &self,
        key: &str,
        payload: &[u8],
        summary: &serde_json::Value,
        seconds: f64,
    ) -> common::Result<()> {
        let entry = self.dir.join(key);
        std::fs::create_dir_all(&entry).map_err(|e| common::Error::io(&entry, e))?;
        write_atomic(&entry.join("result.bin"), payload)?;
        let meta = Meta {
            sha256: sha256_hex(payload),
            size: payload.len() as u64,
            summary: summary.clone(),
            seconds,
        };
        write_atomic(
            &entry.join("meta.json"),
            &serde_json::to_vec_pretty(&meta).expect("meta serialises"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn key_depends_on_spec_and_input_checksums() {
        let k = TaskCache::key(&spec(10), [("dataset", "aa")]);
        assert_eq!(k, TaskCache::key(&spec(10), [("dataset", "aa")]));
        assert_ne!(k, TaskCache::key(&spec(11), [("dataset", "aa")]));
        assert_ne!(k, TaskCache::key(&spec(10), [("dataset", "ab")]));
        assert_ne!(k, TaskCache::key(&spec(10), [("datasets", "aa")]));
    }

    #[test]
    fn round_trips_and_drops_corrupted_or_incomplete_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TaskCache::open(dir.path()).unwrap();
        assert!(cache.get("k").is_none());
        let summary = serde_json::json!({"train_seconds": 1.5});
        cache.put("k", b"model bytes", &summary, 2.0).unwrap();
        let hit = cache.get("k").unwrap();
        assert_eq!(hit.payload, b"model bytes");
        assert_eq!(hit.summary, summary);
        assert_eq!(hit.seconds, 2.0);

        std::fs::write(dir.path().join("k/result.bin"), b"model bytez").unwrap();
        assert!(cache.get("k").is_none());
        assert!(!dir.path().join("k").exists(), "corrupted entry deleted");

        cache.put("j", b"x", &summary, 1.0).unwrap();
        std::fs::remove_file(dir.path().join("j/meta.json")).unwrap();
        assert!(cache.get("j").is_none());
    }
}
