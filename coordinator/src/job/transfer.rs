//! The transfer set as the job builds it: one manifest entry per stored
//! shard; once every shard is stored, the manifest that completes it.

use common::transfer::{Manifest, ShardEntry};

use super::DatasetFacts;

/// The shards stored so far.
#[derive(Clone, Debug)]
pub(super) struct TransferSet {
    entries: Vec<Option<ShardEntry>>,
}

impl TransferSet {
    /// A transfer set of `shards` shards, none stored.
    pub fn new(shards: usize) -> Self {
        TransferSet {
            entries: vec![None; shards],
        }
    }

    /// Records shard `index` as stored with `entry`.
    pub fn stored(&mut self, index: usize, entry: ShardEntry) {
        self.entries[index] = Some(entry);
    }

    /// Forgets shard `index` (it is lost and made again).
    pub fn lost(&mut self, index: usize) {
        self.entries[index] = None;
    }

    /// The manifest, once every shard is stored (never for a job without
    /// a transfer set).
    pub fn manifest(&self, dataset: &DatasetFacts, teachers: &[String]) -> Option<Manifest> {
        if self.entries.is_empty() || self.entries.iter().any(Option::is_none) {
            return None;
        }
        Some(Manifest::new(
            &dataset.fingerprint,
            dataset.train_len,
            dataset.num_classes,
            teachers.to_vec(),
            self.entries.iter().flatten().cloned().collect(),
        ))
    }
}
