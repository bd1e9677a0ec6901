//! A blob store in memory, for tests and the in-memory job harness.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{check_key, once, BlobError, BlobStore, ByteStream, PutMode, Written};

/// Objects in a map; a put becomes visible whole when its stream ends.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryStore {
    fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn not_found(&self, key: &str) -> BlobError {
        BlobError::NotFound {
            store: self.describe(),
            key: key.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl BlobStore for MemoryStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn put(&self, key: &str, data: ByteStream, mode: PutMode) -> Result<Written, BlobError> {
        check_key(key)?;
        let bytes = super::collect(data, &self.describe(), key).await?;
        let written = Written {
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
        };
        let mut objects = self.objects();
        if mode == PutMode::CreateOnly && objects.contains_key(key) {
            return Err(BlobError::AlreadyExists {
                store: self.describe(),
                key: key.to_string(),
            });
        }
        objects.insert(key.to_string(), Bytes::from(bytes));
        Ok(written)
    }

    async fn get(&self, key: &str) -> Result<ByteStream, BlobError> {
        check_key(key)?;
        let bytes = self
            .objects()
            .get(key)
            .cloned()
            .ok_or_else(|| self.not_found(key))?;
        Ok(once(bytes))
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, BlobError> {
        check_key(key)?;
        Ok(self.objects().get(key).map(|b| b.len() as u64))
    }

    async fn remove(&self, key: &str) -> Result<(), BlobError> {
        check_key(key)?;
        self.objects().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        Ok(self
            .objects()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }
}
