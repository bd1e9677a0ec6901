//! A folder as a blob store: today's output folder layout, each object a
//! file under its key.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{check_key, BlobError, BlobStore, ByteStream, PutMode, Written};

/// Temporary files start with this; listings skip them.
const PARTIAL: &str = ".partial-";
/// Chunk size of reads.
const READ_CHUNK: usize = 1 << 20;

/// Objects as files under one folder: written to a temporary file beside
/// the destination, fsynced, renamed into place (or, create-only, linked,
/// which fails if the name is taken), and the folder fsynced.
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// The store of folder `root` (created on the first write).
    pub fn new(root: &Path) -> Self {
        LocalStore {
            root: root.to_path_buf(),
        }
    }

    /// The file of object `key`.
    pub fn path(&self, key: &str) -> Result<PathBuf, BlobError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn io(&self, key: &str, source: std::io::Error) -> BlobError {
        if source.kind() == std::io::ErrorKind::NotFound {
            BlobError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            }
        } else {
            BlobError::Io {
                store: self.describe(),
                key: key.to_string(),
                error: source,
            }
        }
    }
}

/// Runs blocking file-system work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("blocking task failed: {e}"))))
}

#[async_trait::async_trait]
impl BlobStore for LocalStore {
    fn describe(&self) -> String {
        format!("folder {}", self.root.display())
    }

    fn location(&self, key: &str) -> String {
        self.root.join(key).display().to_string()
    }

    async fn put(
        &self,
        key: &str,
        mut data: ByteStream,
        mode: PutMode,
    ) -> Result<Written, BlobError> {
        let path = self.path(key)?;
        let dir = path.parent().expect("a key has a file name").to_path_buf();
        let err = |e| self.io(key, e);
        let tmp = {
            let dir = dir.clone();
            blocking(move || {
                std::fs::create_dir_all(&dir)?;
                tempfile::Builder::new().prefix(PARTIAL).tempfile_in(&dir)
            })
            .await
            .map_err(|e| BlobError::Io {
                store: self.describe(),
                key: key.to_string(),
                error: e,
            })?
        };
        let mut file = tokio::fs::File::from_std(tmp.as_file().try_clone().map_err(err)?);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(err)?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(err)?;
        }
        file.flush().await.map_err(err)?;
        file.sync_all().await.map_err(err)?;
        drop(file);
        let persisted = blocking(move || {
            match mode {
                PutMode::Overwrite => tmp.persist(&path),
                PutMode::CreateOnly => tmp.persist_noclobber(&path),
            }
            .map_err(|e| e.error)?;
            crate::atomic_file::sync_dir(&dir).map_err(std::io::Error::other)
        })
        .await;
        match persisted {
            Ok(()) => Ok(Written {
                sha256: hex::encode(hasher.finalize()),
                size,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(BlobError::AlreadyExists {
                    store: self.describe(),
                    key: key.to_string(),
                })
            }
            Err(e) => Err(err(e)),
        }
    }

    async fn get(&self, key: &str) -> Result<ByteStream, BlobError> {
        let path = self.path(key)?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.io(key, e))?;
        Ok(tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK).boxed())
    }

    async fn size(&self, key: &str) -> Result<Option<u64>, BlobError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    async fn remove(&self, key: &str) -> Result<(), BlobError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let root = self.root.clone();
        let wanted = prefix.to_string();
        let mut keys = blocking(move || {
            let mut keys = Vec::new();
            walk(&root, "", &wanted, &mut keys)?;
            Ok(keys)
        })
        .await
        .map_err(|e| self.io(prefix, e))?;
        keys.sort();
        Ok(keys)
    }
}

/// Adds the keys under `dir` (whose key prefix is `at`) that start with
/// `prefix`, skipping temporary files and folders that cannot match.
fn walk(dir: &Path, at: &str, prefix: &str, keys: &mut Vec<String>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not a key this store wrote
        };
        if name.starts_with(PARTIAL) {
            continue;
        }
        let key = format!("{at}{name}");
        let kind = entry.file_type()?;
        if kind.is_dir() {
            let sub = format!("{key}/");
            if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                walk(&entry.path(), &sub, prefix, keys)?;
            }
        } else if kind.is_file() && key.starts_with(prefix) {
            keys.push(key);
        }
    }
    Ok(())
}
