//! The transfer set: the outputs of every teacher for every transfer
//! example, stored as shards in an [`Encoding`] plus a JSON manifest.
//!
//! Layout of a transfer-set folder (encoding `dense-f32`, the only one
//! today: raw f32 logits, see [`dense`]):
//!
//! ```text
//! manifest.json              format version (2; version 1 is read too),
//!                            dataset fingerprint, teachers, encoding, and
//!                            per shard: file, example range, rows, sha256
//! shard-00000.safetensors    "example_index": I64 [rows]
//!                            "logits.<teacher id>": F32 [rows, classes], one per teacher
//! shard-00001.safetensors    ...
//! ```
//!
//! Shards hold raw logits, not probabilities: the temperature is applied when
//! reading ([`soft_targets`]), so one transfer set serves any T. Nothing in a
//! shard depends on time, host or process: the same logits give the same
//! bytes. Every file is written atomically, and a reader verifies each
//! shard's checksum before using it, one shard at a time, so a transfer set
//! may be larger than memory.

mod dense;
mod manifest;
mod reader;
mod targets;
mod writer;

pub use manifest::{
    Encoding, Manifest, ManifestBuilder, ShardEntry, FORMAT_VERSION, MANIFEST_FILE,
};
pub use reader::{Shard, TransferSet};
pub use targets::{soft_targets, EnsembleCombine};
pub use writer::{
    check_encoded_shard, encode_shard, shard_file_name, write_manifest, ShardLogits,
    TransferSetWriter,
};

use crate::{Error, Result};

/// Name of the example-index tensor in a shard.
pub const INDEX_TENSOR: &str = "example_index";

/// Name of a teacher's logits tensor in a shard.
pub fn logits_tensor_name(teacher: &str) -> String {
    format!("logits.{teacher}")
}

/// Checks that a teacher id is usable as a tensor-name suffix and file name
/// part: 1 to 64 characters from `[A-Za-z0-9_-]`.
pub fn validate_teacher_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "teacher id",
            format!("{id:?}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"),
        ))
    }
}
