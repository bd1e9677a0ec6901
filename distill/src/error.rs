//! The error type of the ML core.

/// Everything that can go wrong training, evaluating or saving models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing datasets, transfer sets or files failed.
    #[error(transparent)]
    Common(#[from] common::Error),
    /// A hyperparameter or argument is outside its valid range.
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
    /// An [`Error::Invalid`] for the parameter `name`.
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
