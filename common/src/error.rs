//! The error type of the `common` crate: every variant names the file,
//! field or value at fault and what was expected.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing datasets and artifacts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what the format requires.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A file's sha256 does not match the one recorded for it.
    #[error("{}: checksum mismatch: expected sha256 {expected}, found {found}", path.display())]
    Checksum {
        /// The offending file.
        path: PathBuf,
        /// The recorded checksum.
        expected: String,
        /// The checksum of the bytes on disk.
        found: String,
    },
    /// A blob store call failed.
    #[error(transparent)]
    Blob(#[from] crate::blob::BlobError),
    /// A parameter or argument is outside its valid range.
    #[error("invalid {name}: {reason}")]
    Invalid {
        /// The parameter's name, as a user would write it.
        name: String,
        /// What is wrong and what was expected.
        reason: String,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Invalid`] for the parameter `name`.
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
