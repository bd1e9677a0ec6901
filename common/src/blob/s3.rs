//! An S3 bucket (AWS or any S3-compatible server) as a blob store, through
//! the `object_store` crate: its signing, retries with backoff and
//! multipart uploads.
//!
//! Objects live under `<prefix>/<key>`. A put streams: up to one part
//! ([`PART_BYTES`]) is buffered and sent as one request; a larger object
//! goes up as a multipart upload, hashed while it streams, and aborted if
//! the stream fails. Create-only puts are single conditional requests
//! (`If-None-Match: *`), so they are buffered whole: they are used for
//! small objects (the transfer manifest).
//!
//! Credentials come from `object_store`'s standard sources (the `AWS_*`
//! environment variables, web identity, instance metadata), never from a
//! config file, and are never logged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode as S3PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{check_key, BlobError, BlobStore, ByteStream, PutMode, Written};

/// Bytes per part of a multipart upload (S3 wants at least 5 MiB).
pub const PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// How long a request is retried.
#[derive(Clone, Copy, Debug)]
pub struct Retries {
    /// Retries at most.
    pub attempts: usize,
    /// Within this time of the first try.
    pub within: Duration,
}

/// The retries of [`S3Store::new`]: for up to two minutes, bounded by time
/// rather than count. (object_store's backoff is jittered between its
/// start and the doubled previous wait, capped at 5 s here, so 40 retries
/// were spent in 12 s against a server still restarting on a busy machine.)
pub const PATIENT_RETRIES: Retries = Retries {
    attempts: 100_000,
    within: Duration::from_secs(120),
};

/// Where the bucket is: everything but the credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// The bucket.
    pub bucket: String,
    /// Key prefix of every object (no leading or trailing '/'; may be empty).
    #[serde(default)]
    pub prefix: String,
    /// The server's URL, for an S3-compatible store (AWS when absent).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The bucket's region.
    pub region: String,
    /// Allow plain-HTTP endpoints (tests against a local server).
    #[serde(default)]
    pub allow_http: bool,
}

impl S3Settings {
    /// The bucket and prefix as a URL, with the endpoint when there is one.
    pub fn describe(&self) -> String {
        let at = self
            .endpoint
            .as_deref()
            .map_or(String::new(), |e| format!(" at {e}"));
        format!("s3://{}/{}{at}", self.bucket, self.prefix)
    }
}

/// A bucket and a key prefix as a [`BlobStore`].
#[derive(Clone, Debug)]
pub struct S3Store {
    store: Arc<dyn ObjectStore>,
    settings: S3Settings,
}

impl S3Store {
    /// The store of `settings`, with credentials from the environment.
    /// Nothing is contacted yet (see [`S3Store::probe`]). A request that
    /// fails for want of a connection or with a server error is retried
    /// with backoff for up to [`PATIENT_RETRIES`]'s two minutes, so that a
    /// server restarting mid-job costs time, not work.
    pub fn new(settings: &S3Settings) -> Result<Self, BlobError> {
        Self::with_retries(settings, PATIENT_RETRIES)
    }

    /// As [`S3Store::new`], giving up after a few quick retries: for the
    /// start-up check, which should say at once that an endpoint is
    /// unreachable.
    pub fn impatient(settings: &S3Settings) -> Result<Self, BlobError> {
        Self::with_retries(
            settings,
            Retries {
                attempts: 3,
                within: Duration::from_secs(10),
            },
        )
    }

    fn with_retries(settings: &S3Settings, retries: Retries) -> Result<Self, BlobError> {
        // The HTTP client's TLS uses the process's rustls provider: ring,
        // the one tonic uses (an error only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: retries.attempts,
            retry_timeout: retries.within,
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_retry(retry)
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_allow_http(settings.allow_http);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|e| BlobError::Io {
            store: settings.describe(),
            key: String::new(),
            error: std::io::Error::other(e.to_string()),
        })?;
        let mut settings = settings.clone();
        settings.prefix = settings.prefix.trim_matches('/').to_string();
        Ok(S3Store {
            store: Arc::new(store),
            settings,
        })
    }

    /// Writes, reads back and deletes a probe object under `key`, so that a
    /// missing bucket, refused credentials or an unreachable endpoint are
    /// found at start-up, each in the server's words.
    pub async fn probe(&self, key: &str) -> Result<(), BlobError> {
        let bytes = b"distill probe".to_vec();
        super::put_bytes(self, key, bytes.clone(), PutMode::Overwrite).await?;
        let back = super::get_bytes(self, key).await?;
        self.remove(key).await?;
        if back != bytes {
            return Err(self.error(
                key,
                "the probe object read back differs from what was written",
            ));
        }
        Ok(())
    }

    /// The same bucket and client under another prefix.
    pub fn with_prefix(&self, prefix: &str) -> S3Store {
        S3Store {
            store: self.store.clone(),
            settings: S3Settings {
                prefix: prefix.trim_matches('/').to_string(),
                ..self.settings.clone()
            },
        }
    }

    /// The settings this store was opened with (no credentials in them).
    pub fn settings(&self) -> &S3Settings {
        &self.settings
    }

    /// Copies `from` of `source` to `to` of this store on the server;
    /// `None` when `source` is another bucket or server.
    pub async fn copy_from(
        &self,
        source: &S3Store,
        from: &str,
        to: &str,
    ) -> Option<Result<(), BlobError>> {
        let same = source.settings.bucket == self.settings.bucket
            && source.settings.endpoint == self.settings.endpoint;
        if !same {
            return None;
        }
        let checked = check_key(from).and_then(|()| check_key(to));
        Some(match checked {
            Err(e) => Err(e),
            Ok(()) => self
                .store
                .copy(&source.path(from), &self.path(to))
                .await
                .map_err(|e| source.map_err(from, e)),
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        match self.settings.prefix.as_str() {
            "" => ObjectPath::from_iter(key.split('/')),
            prefix => ObjectPath::from_iter(prefix.split('/').chain(key.split('/'))),
        }
    }

    /// The key of object `path` of this store's prefix.
    fn key_of(&self, path: &ObjectPath) -> Option<String> {
        let full = path.as_ref();
        match self.settings.prefix.as_str() {
            "" => Some(full.to_string()),
            prefix => full
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(str::to_string),
        }
    }

    fn error(&self, key: &str, message: impl Into<String>) -> BlobError {
        BlobError::Io {
            store: self.describe(),
            key: key.to_string(),
            error: std::io::Error::other(message.into()),
        }
    }

    fn map_err(&self, key: &str, e: object_store::Error) -> BlobError {
        let store = self.describe();
        let key = key.to_string();
        match e {
            object_store::Error::NotFound { .. } => BlobError::NotFound { store, key },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => BlobError::AlreadyExists { store, key },
            other => BlobError::Io {
                store,
                key,
                error: std::io::Error::other(other.to_string()),
            },
        }
    }

    /// Sends `data` as a multipart upload started with `first` (already
    /// hashed); aborts the upload if the stream or a part fails.
    async fn put_multipart(
        &self,
        key: &str,
        first: Vec<Bytes>,
        mut data: ByteStream,
        hasher: &mut Sha256,
        size: &mut u64,
    ) -> Result<(), BlobError> {
        let path = self.path(key);
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|e| self.map_err(key, e))?;
        tracing::info!(location = %self.location(key), "multipart upload started");
        let mut upload = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        for chunk in first {
            upload.put(chunk);
        }
        loop {
            let chunk = match data.next().await {
                None => break,
                Some(Ok(chunk)) => chunk,
                Some(Err(source)) => {
                    let _ = upload.abort().await;
                    return Err(BlobError::Io {
                        store: self.describe(),
                        key: key.to_string(),
                        error: source,
                    });
                }
            };
            hasher.update(&chunk);
            *size += chunk.len() as u64;
            if let Err(e) = upload.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = upload.abort().await;
                return Err(self.map_err(key, e));
            }
            upload.put(chunk);
        }
        upload.finish().await.map_err(|e| self.map_err(key, e))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlobStore for S3Store {
    fn describe(&self) -> String {
        self.settings.describe()
    }

    fn as_s3(&self) -> Option<&S3Store> {
        Some(self)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.settings.bucket, self.path(key))
    }

    async fn put(
        &self,
        key: &str,
        mut data: ByteStream,
        mode: PutMode,
    ) -> Result<Written, BlobError> {
        check_key(key)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buffered = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|source| BlobError::Io {
                store: self.describe(),
                key: key.to_string(),
                error: source,
            })?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            buffered.push(chunk);
            if mode == PutMode::Overwrite && size >= PART_BYTES as u64 {
                self.put_multipart(key, buffered, data, &mut hasher, &mut size)
                    .await?;
                return Ok(Written {
                    sha256: hex::encode(hasher.finalize()),
                    size,
                });
            }
        }
        let mode = match mode {
            PutMode::Overwrite => S3PutMode::Overwrite,
            PutMode::CreateOnly => S3PutMode::Create,
        };
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&self.path(key), PutPayload::from_iter(buffered), options)
            .await
            .map_err(|e| self.map_err(key, e))?;
        Ok(Written {
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    }

    async fn get(&self, key: &str) -> Result<ByteStream, BlobError> {
        check_key(key)?;
        let result = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.map_err(key, e))?;
        Ok(result
            .into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed())
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, BlobError> {
        check_key(key)?;
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.map_err(key, e)),
        }
    }

    async fn remove(&self, key: &str) -> Result<(), BlobError> {
        check_key(key)?;
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        // S3 lists by whole path segments: list the folder the prefix is
        // in, then keep the keys that start with it.
        let folder = prefix.rsplit_once('/').map_or("", |(folder, _)| folder);
        let root = match (self.settings.prefix.as_str(), folder) {
            ("", "") => None,
            (p, "") => Some(ObjectPath::from_iter(p.split('/'))),
            (_, f) => Some(self.path(f)),
        };
        let listed: Vec<_> = self
            .store
            .list(root.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.map_err(prefix, e))?;
        let mut keys: Vec<String> = listed
            .iter()
            .filter_map(|meta| self.key_of(&meta.location))
            .filter(|key| key.starts_with(prefix))
            .collect();
        keys.sort();
        Ok(keys)
    }
}

/// The test bucket that `scripts/test.sh` starts (SeaweedFS), from
/// `DISTILL_TEST_S3_ENDPOINT` and `DISTILL_TEST_S3_BUCKET` (credentials in
/// the `AWS_*` variables), under a prefix unique to this call. `None`, with
/// a line saying the test is skipped, when no endpoint is set; under CI
/// (`CI` set) a missing endpoint is a failure.
pub fn test_settings(name: &str) -> Option<S3Settings> {
    let Ok(endpoint) = std::env::var("DISTILL_TEST_S3_ENDPOINT") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name}: CI needs an S3 endpoint in DISTILL_TEST_S3_ENDPOINT (scripts/test.sh starts SeaweedFS)"
        );
        eprintln!("{name}: skipped, no S3 endpoint (DISTILL_TEST_S3_ENDPOINT; scripts/test.sh starts one)");
        return None;
    };
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Some(S3Settings {
        bucket: std::env::var("DISTILL_TEST_S3_BUCKET").unwrap_or_else(|_| "distill-test".into()),
        prefix: format!("tests/{name}-{}-{unique}", std::process::id()),
        endpoint: Some(endpoint),
        region: "us-east-1".into(),
        allow_http: true,
    })
}
