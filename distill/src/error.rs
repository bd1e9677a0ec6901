//! The error type of the ML core.

/// Everything that can go wrong training, evaluating or saving models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing datasets, transfer sets or files failed, or a
    /// parameter is outside its valid range.
    #[error(transparent)]
    Common(#[from] common::Error),
    /// The caller stopped the work (a worker that lost its lease, a signal).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// Training blew up: an epoch's mean loss is not a finite number, so the
    /// weights are no longer usable.
    #[error(
        "training diverged: the mean loss of epoch {epoch} is {loss}; \
         lower the learning rate (or set max_norm)"
    )]
    Diverged {
        /// The 1-based epoch.
        epoch: usize,
        /// Its mean loss (NaN or infinite).
        loss: f64,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A parameter or argument outside its valid range (a
    /// [`common::Error::Invalid`]): `name` as a user would write it, `reason`
    /// says what is wrong and what was expected.
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Common(common::Error::invalid(name, reason))
    }
}
