//! Where a job's artifacts live: a [`BlobStore`] of byte objects under
//! '/'-separated relative keys (an [`crate::artifact::ArtifactName`]'s
//! [`key`](crate::artifact::ArtifactName::key)). Writes stream in and come
//! back with the sha256 of what was written; reads stream out.
//!
//! Three stores: [`LocalStore`], a folder (each object written to a
//! temporary file, fsynced, renamed into place, the folder fsynced),
//! [`S3Store`], an S3 bucket (AWS or S3-compatible) under a key prefix, and
//! [`MemoryStore`], for tests and harnesses. The trait is async because
//! object stores are; the folder does its blocking I/O on tokio's blocking
//! pool, never on an async thread.

mod local;
mod memory;
pub mod s3;

use std::fmt;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use sha2::{Digest, Sha256};

pub use async_trait::async_trait;
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use s3::{S3Settings, S3Store};

/// The bytes of an object, in chunks.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// What a put does when the key already holds an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it (readers see the old object or the new one, never a mix).
    Overwrite,
    /// Fail with [`BlobError::AlreadyExists`] and leave it as it is.
    CreateOnly,
}

/// What a put wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// sha256 of the bytes, lowercase hex.
    pub sha256: String,
    /// Their length.
    pub size: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No object has this key.
    #[error("{store}: no object {key:?}")]
    NotFound {
        /// The store, in words.
        store: String,
        /// The key.
        key: String,
    },
    /// A create-only put found an object there.
    #[error("{store}: {key:?} already exists")]
    AlreadyExists {
        /// The store, in words.
        store: String,
        /// The key.
        key: String,
    },
    /// The key is not a relative '/'-separated path of plain names.
    #[error("{key:?} is not a valid key (relative, '/'-separated, no '.' or '..' parts)")]
    BadKey {
        /// The key.
        key: String,
    },
    /// An object's bytes are not the ones recorded for it.
    #[error("{store}: {key:?} is corrupt (sha256 {found}, {expected} was stored)")]
    Corrupt {
        /// The store, in words.
        store: String,
        /// The key.
        key: String,
        /// The recorded sha256.
        expected: String,
        /// The sha256 of the bytes read.
        found: String,
    },
    /// A create-only put found other bytes under the key.
    #[error("{store}: {key:?} already holds different bytes (sha256 {found}, {expected} was to be written)")]
    Differs {
        /// The store, in words.
        store: String,
        /// The key.
        key: String,
        /// The sha256 of what was to be written.
        expected: String,
        /// The sha256 of what is there.
        found: String,
    },
    /// Reading or writing failed. (The cause is part of the message and
    /// not a `source`, so that error chains print it once.)
    #[error("{store}: {key:?}: {error}")]
    Io {
        /// The store, in words.
        store: String,
        /// The key (or prefix).
        key: String,
        /// The underlying error.
        error: std::io::Error,
    },
}

impl BlobError {
    /// True for [`BlobError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, BlobError::NotFound { .. })
    }
}

/// Objects under keys. Implementations are cheap to share (`Arc<dyn
/// BlobStore>`) and safe to call from many tasks at once.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// The store in words, for messages (`folder /data/job`, `memory`).
    fn describe(&self) -> String;

    /// Where object `key` is, for people: a path or a URL.
    fn location(&self, key: &str) -> String {
        format!("{} {key}", self.describe())
    }

    /// Writes the object `key` from `data`, hashing while writing. Nothing
    /// is visible under `key` until every byte is durably written; a failed
    /// put leaves the old object (or none).
    async fn put(&self, key: &str, data: ByteStream, mode: PutMode) -> Result<Written, BlobError>;

    /// The bytes of object `key`.
    async fn get(&self, key: &str) -> Result<ByteStream, BlobError>;

    /// The length of object `key`, `None` if there is none.
    async fn size(&self, key: &str) -> Result<Option<u64>, BlobError>;

    /// Deletes object `key`; deleting a missing object is not an error.
    async fn remove(&self, key: &str) -> Result<(), BlobError>;

    /// The keys that start with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError>;

    /// This store as a bucket, for copies that stay on the server.
    fn as_s3(&self) -> Option<&S3Store> {
        None
    }
}

/// Writes `bytes` as object `key` unless it exists; an object already
/// there (a put whose commit was lost, a retry) counts as written if it
/// holds the same bytes, and is [`BlobError::Differs`] otherwise.
pub async fn put_once(
    store: &dyn BlobStore,
    key: &str,
    bytes: impl Into<Bytes>,
) -> Result<Written, BlobError> {
    let bytes: Bytes = bytes.into();
    match put_bytes(store, key, bytes.clone(), PutMode::CreateOnly).await {
        Err(BlobError::AlreadyExists { .. }) => {
            let expected = hex::encode(Sha256::digest(&bytes));
            let there = get_bytes(store, key).await?;
            let found = hex::encode(Sha256::digest(&there));
            if found == expected {
                Ok(Written {
                    sha256: found,
                    size: there.len() as u64,
                })
            } else {
                Err(BlobError::Differs {
                    store: store.describe(),
                    key: key.to_string(),
                    expected,
                    found,
                })
            }
        }
        written => written,
    }
}

/// Copies object `from` of `source` to `to` of `target` (replacing what is
/// there): on the server when both are the same bucket, through this
/// process otherwise.
pub async fn copy(
    source: &dyn BlobStore,
    from: &str,
    target: &dyn BlobStore,
    to: &str,
) -> Result<(), BlobError> {
    if let (Some(s), Some(t)) = (source.as_s3(), target.as_s3()) {
        if let Some(copied) = t.copy_from(s, from, to).await {
            return copied;
        }
    }
    target
        .put(to, source.get(from).await?, PutMode::Overwrite)
        .await
        .map(drop)
}

/// A stream of one chunk: `bytes`.
pub fn once(bytes: impl Into<Bytes>) -> ByteStream {
    stream::once(std::future::ready(Ok(bytes.into()))).boxed()
}

/// Writes `bytes` as object `key`.
pub async fn put_bytes(
    store: &dyn BlobStore,
    key: &str,
    bytes: impl Into<Bytes>,
    mode: PutMode,
) -> Result<Written, BlobError> {
    store.put(key, once(bytes), mode).await
}

/// The whole of object `key`.
pub async fn get_bytes(store: &dyn BlobStore, key: &str) -> Result<Vec<u8>, BlobError> {
    collect(store.get(key).await?, &store.describe(), key).await
}

/// Every byte of `data`, the stream of object `key` of `store` (named in
/// errors).
pub(crate) async fn collect(
    mut data: ByteStream,
    store: &str,
    key: &str,
) -> Result<Vec<u8>, BlobError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = data.next().await {
        bytes.extend_from_slice(&chunk.map_err(|source| BlobError::Io {
            store: store.to_string(),
            key: key.to_string(),
            error: source,
        })?);
    }
    Ok(bytes)
}

/// The whole of object `key` if its sha256 is `sha256`; else
/// [`BlobError::Corrupt`].
pub async fn get_verified(
    store: &dyn BlobStore,
    key: &str,
    sha256: &str,
) -> Result<Vec<u8>, BlobError> {
    let bytes = get_bytes(store, key).await?;
    let found = hex::encode(Sha256::digest(&bytes));
    if found != sha256 {
        return Err(BlobError::Corrupt {
            store: store.describe(),
            key: key.to_string(),
            expected: sha256.to_string(),
            found,
        });
    }
    Ok(bytes)
}

/// The sha256 of object `key`, hashed as it streams (never held whole).
pub async fn sha256_of(store: &dyn BlobStore, key: &str) -> Result<String, BlobError> {
    let mut data = store.get(key).await?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = data.next().await {
        hasher.update(chunk.map_err(|source| BlobError::Io {
            store: store.describe(),
            key: key.to_string(),
            error: source,
        })?);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that `key` is relative, '/'-separated and made of plain names.
pub(crate) fn check_key(key: &str) -> Result<(), BlobError> {
    let plain =
        |part: &str| !part.is_empty() && part != "." && part != ".." && !part.contains('\\');
    if key.starts_with('/') || !key.split('/').all(plain) {
        return Err(BlobError::BadKey {
            key: key.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod errors {
    use super::BlobError;

    #[test]
    fn an_io_error_says_its_cause_once_in_a_chain() {
        let e = BlobError::Io {
            store: "s3://b/p".into(),
            key: "k".into(),
            error: std::io::Error::other("connection refused"),
        };
        assert_eq!(e.to_string(), "s3://b/p: \"k\": connection refused");
        assert!(
            std::error::Error::source(&e).is_none(),
            "no second copy below it"
        );
    }
}

#[cfg(test)]
mod contract {
    //! The behaviour every store must have, run against each of them.

    use super::*;
    use std::sync::Arc;

    async fn check(store: Arc<dyn BlobStore>) {
        let w = put_bytes(
            &*store,
            "models/a.safetensors",
            b"one".to_vec(),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
        assert_eq!(w.size, 3);
        assert_eq!(w.sha256, crate::checksum::sha256_hex(b"one"));
        assert_eq!(
            get_bytes(&*store, "models/a.safetensors").await.unwrap(),
            b"one"
        );
        assert_eq!(store.size("models/a.safetensors").await.unwrap(), Some(3));
        assert_eq!(store.size("models/b.safetensors").await.unwrap(), None);

        // Streams of many chunks are hashed as one object.
        let chunks =
            stream::iter([&b"tw"[..], b"", b"o"].map(|c| Ok(Bytes::copy_from_slice(c)))).boxed();
        let w = store
            .put("models/a.safetensors", chunks, PutMode::Overwrite)
            .await
            .unwrap();
        assert_eq!(w.sha256, crate::checksum::sha256_hex(b"two"));
        assert_eq!(
            get_bytes(&*store, "models/a.safetensors").await.unwrap(),
            b"two"
        );

        // A put-once of the same bytes succeeds, of others names the key.
        let again = put_once(&*store, "models/a.safetensors", b"two".to_vec())
            .await
            .unwrap();
        assert_eq!(again.sha256, crate::checksum::sha256_hex(b"two"));
        let err = put_once(&*store, "models/a.safetensors", b"three".to_vec())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BlobError::Differs { key, .. } if key == "models/a.safetensors"),
            "{err}"
        );
        put_once(&*store, "models/c.safetensors", b"c".to_vec())
            .await
            .unwrap();
        copy(
            &*store,
            "models/c.safetensors",
            &*store,
            "models/d.safetensors",
        )
        .await
        .unwrap();
        assert_eq!(
            get_bytes(&*store, "models/d.safetensors").await.unwrap(),
            b"c"
        );
        store.remove("models/c.safetensors").await.unwrap();
        store.remove("models/d.safetensors").await.unwrap();

        // Create-only refuses an existing key and changes nothing.
        let err = put_bytes(
            &*store,
            "models/a.safetensors",
            b"x".to_vec(),
            PutMode::CreateOnly,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BlobError::AlreadyExists { .. }), "{err}");
        assert_eq!(
            get_bytes(&*store, "models/a.safetensors").await.unwrap(),
            b"two"
        );
        put_bytes(
            &*store,
            "transfer/shard-00000.safetensors",
            b"s".to_vec(),
            PutMode::CreateOnly,
        )
        .await
        .unwrap();

        // A stream that fails part-way leaves the old object.
        let failing = stream::iter([
            Ok(Bytes::from_static(b"half")),
            Err(std::io::Error::other("connection reset")),
        ])
        .boxed();
        assert!(store
            .put("models/a.safetensors", failing, PutMode::Overwrite)
            .await
            .is_err());
        assert_eq!(
            get_bytes(&*store, "models/a.safetensors").await.unwrap(),
            b"two"
        );

        assert_eq!(
            store.list("").await.unwrap(),
            ["models/a.safetensors", "transfer/shard-00000.safetensors"]
        );
        assert_eq!(
            store.list("transfer/").await.unwrap(),
            ["transfer/shard-00000.safetensors"]
        );
        assert!(store.list("nothing/").await.unwrap().is_empty());

        let err = get_verified(&*store, "models/a.safetensors", "00")
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Corrupt { .. }), "{err}");

        store.remove("models/a.safetensors").await.unwrap();
        store.remove("models/a.safetensors").await.unwrap();
        let err = store
            .get("models/a.safetensors")
            .await
            .err()
            .expect("removed");
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("models/a.safetensors"), "{err}");

        for bad in ["/abs", "a/../b", "", "a//b", "./a"] {
            let err = put_bytes(&*store, bad, b"x".to_vec(), PutMode::Overwrite)
                .await
                .unwrap_err();
            assert!(matches!(err, BlobError::BadKey { .. }), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn the_folder_store_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        check(Arc::new(LocalStore::new(dir.path()))).await;
        // Nothing but the objects is left (no temporary files).
        let mut names: Vec<_> = std::fs::read_dir(dir.path().join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert!(names.is_empty(), "{names:?}");
    }

    #[tokio::test]
    async fn the_memory_store_keeps_the_contract() {
        check(Arc::new(MemoryStore::default())).await;
    }

    /// Against the real S3 server `scripts/test.sh` starts (skipped, saying
    /// so, in a plain `cargo test` without one; required under CI).
    #[tokio::test]
    async fn the_s3_store_keeps_the_contract() {
        let Some(settings) = s3::test_settings("contract") else {
            return;
        };
        let store = Arc::new(S3Store::new(&settings).unwrap());
        store.probe("probe").await.unwrap();
        check(store.clone()).await;
        // What is left is under the prefix only, and the bucket's other
        // prefixes are not listed.
        assert_eq!(
            store.list("").await.unwrap(),
            ["transfer/shard-00000.safetensors"]
        );
    }

    /// An object of several parts goes up as a multipart upload, hashed as
    /// it streams; a stream that fails after some parts leaves nothing.
    #[tokio::test]
    async fn the_s3_store_streams_large_objects_in_parts() {
        let Some(settings) = s3::test_settings("multipart") else {
            return;
        };
        let store = S3Store::new(&settings).unwrap();
        let chunk = Bytes::from(vec![7u8; 3 << 20]);
        let total = 7 * chunk.len();
        let big = stream::iter((0..7).map({
            let chunk = chunk.clone();
            move |_| Ok(chunk.clone())
        }))
        .boxed();
        let w = store
            .put("models/big", big, PutMode::Overwrite)
            .await
            .unwrap();
        assert!(total > 2 * s3::PART_BYTES);
        assert_eq!(w.size, total as u64);
        assert_eq!(w.sha256, crate::checksum::sha256_hex(&vec![7u8; total]));
        let back = get_verified(&store, "models/big", &w.sha256).await.unwrap();
        assert_eq!(back.len(), total);

        let parts: Vec<std::io::Result<Bytes>> = (0..5)
            .map(|_| Ok(chunk.clone()))
            .chain([Err(std::io::Error::other("worker killed"))])
            .collect();
        let failing = stream::iter(parts).boxed();
        assert!(store
            .put("models/half", failing, PutMode::Overwrite)
            .await
            .is_err());
        assert_eq!(store.size("models/half").await.unwrap(), None);
        store.remove("models/big").await.unwrap();
    }
}
