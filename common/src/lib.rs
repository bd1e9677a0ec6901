//! Shared pieces of the distillation cluster that need no ML framework:
//! dataset readers and splits, the on-disk transfer-set format, checksums
//! and atomic file writes.
//!
//! Both binaries (and the candle-based `distill` crate) depend on this crate;
//! it depends on none of them.

pub mod artifact;
pub mod atomic_file;
pub mod blob;
pub mod checksum;
pub mod dataset;
pub mod error;
pub mod logging;
pub mod paths;
pub mod safetensors_header;
pub mod seed;
pub mod transfer;

pub use error::{Error, Result};
