//! The job's artifact store, from `[storage]`: the output folder, or an S3
//! bucket under `<prefix>/<job>/` (the job being the output folder's
//! name), which is probed at start-up so that a missing bucket, refused
//! credentials or an unreachable endpoint stop the coordinator at once,
//! in the server's words, before anything is written.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use common::artifact::ArtifactName;
use common::blob::{BlobStore, LocalStore, S3Settings, S3Store};

use crate::cache::TaskCache;
use crate::config::StorageConfig;
use crate::report::{REPORT_JSON, REPORT_MD};

/// The key of the start-up probe object.
const PROBE_KEY: &str = "probe";

/// The job's name under the bucket's prefix: the output folder's name.
pub fn job_name(out: &Path) -> String {
    out.file_name()
        .map_or_else(|| "job".into(), |n| n.to_string_lossy().into_owned())
}

/// The bucket settings of this job: `prefix` extended by the job's name.
pub fn job_settings(s3: &S3Settings, out: &Path) -> S3Settings {
    let job = job_name(out);
    let prefix = match s3.prefix.as_str() {
        "" => job,
        prefix => format!("{prefix}/{job}"),
    };
    S3Settings {
        prefix,
        ..s3.clone()
    }
}

/// Opens the job's store (the output folder `out`, or the bucket, probed).
pub async fn open(storage: &StorageConfig, out: &Path) -> anyhow::Result<Arc<dyn BlobStore>> {
    match storage {
        StorageConfig::Local => Ok(Arc::new(LocalStore::new(out))),
        StorageConfig::S3(s3) => {
            let settings = job_settings(s3, out);
            let store = S3Store::new(&settings)
                .with_context(|| format!("[storage] {}", settings.describe()))?;
            let quick = S3Store::impatient(&settings)
                .with_context(|| format!("[storage] {}", settings.describe()))?;
            quick.probe(PROBE_KEY).await.with_context(|| {
                format!(
                    "[storage] {}: the start-up check (write, read back and delete {PROBE_KEY:?}) failed; \
                     check the bucket, the endpoint and the AWS_* credentials",
                    settings.describe()
                )
            })?;
            tracing::info!(store = %settings.describe(), "artifacts in S3");
            Ok(Arc::new(store))
        }
    }
}

/// The task cache of `cache_dir`: the folder, or with S3 the key prefix
/// `<prefix>/<cache_dir>` of the job's bucket (`store`), where results are
/// kept and handed out by copies on the server.
pub fn open_cache(storage: &StorageConfig, cache_dir: &Path, store: &dyn BlobStore) -> TaskCache {
    match (storage, store.as_s3()) {
        (StorageConfig::S3(s3), Some(bucket)) => {
            let dir = cache_dir.to_string_lossy();
            let prefix = match s3.prefix.as_str() {
                "" => dir.into_owned(),
                prefix => format!("{prefix}/{dir}"),
            };
            let cache = bucket.with_prefix(&prefix);
            tracing::info!(cache = %cache.describe(), "task cache in use");
            TaskCache::in_store(Arc::new(cache))
        }
        _ => {
            tracing::info!(dir = %cache_dir.display(), "task cache in use");
            TaskCache::open(cache_dir)
        }
    }
}

/// Removes an earlier run's objects from `store` (for `--fresh`): in a
/// bucket everything under the job's prefix, in the output folder the
/// artifacts and the report (other files there are the user's). Returns
/// how many were removed.
pub async fn remove_earlier_run(
    storage: &StorageConfig,
    store: &dyn BlobStore,
) -> anyhow::Result<usize> {
    let mut removed = 0;
    for key in store.list("").await? {
        let ours = match storage {
            StorageConfig::S3(_) => true,
            StorageConfig::Local => {
                // `dataset.safetensors`: the one-file dataset of earlier versions.
                ArtifactName::from_key(&key).is_ok()
                    || [REPORT_JSON, REPORT_MD, "dataset.safetensors"].contains(&key.as_str())
            }
        };
        if ours {
            store.remove(&key).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(prefix: &str) -> S3Settings {
        S3Settings {
            bucket: "b".into(),
            prefix: prefix.into(),
            endpoint: None,
            region: "r".into(),
            allow_http: false,
        }
    }

    #[test]
    fn the_job_goes_under_the_prefix_by_the_output_folders_name() {
        let out = Path::new("/jobs/mnist-run");
        assert_eq!(job_settings(&s3("team/x"), out).prefix, "team/x/mnist-run");
        assert_eq!(job_settings(&s3(""), out).prefix, "mnist-run");
    }

    #[tokio::test]
    async fn fresh_removes_only_the_runs_objects_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        for key in ["models/teacher-0.safetensors", "report.md", "cluster.toml"] {
            common::blob::put_bytes(&store, key, b"x".to_vec(), common::blob::PutMode::Overwrite)
                .await
                .unwrap();
        }
        let removed = remove_earlier_run(&StorageConfig::Local, &store)
            .await
            .unwrap();
        assert_eq!(removed, 2);
        assert_eq!(store.list("").await.unwrap(), ["cluster.toml"]);
    }
}
