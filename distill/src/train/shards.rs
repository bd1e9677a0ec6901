//! Reading a transfer set's soft targets while training: the next shard is
//! read and decoded on another thread while the current one trains.

use std::time::{Duration, Instant};

use common::transfer::{Shard, TransferSet};

use crate::hparams::DistillConfig;
use crate::{Error, Result};

/// Calls `f` with each shard of `order` and its soft targets, reading and
/// decoding the next shard on another thread while `f` trains on the
/// current one. At most two shards are in memory at once, however large the
/// transfer set. Returns the time spent waiting for shards.
pub(super) fn for_each_prefetched_shard(
    set: &TransferSet,
    distill: &DistillConfig,
    order: &[usize],
    mut f: impl FnMut(&Shard, &[f32]) -> Result<()>,
) -> Result<Duration> {
    let members = teacher_indices(set, distill)?;
    let (send, receive) = std::sync::mpsc::sync_channel::<Result<(Shard, Vec<f32>)>>(0);
    std::thread::scope(|scope| {
        let members = &members;
        scope.spawn(move || {
            for &s in order {
                let loaded = set.read_shard(s).map_err(Error::from).and_then(|shard| {
                    let soft =
                        shard.soft_targets_of(members, distill.temperature, distill.combine)?;
                    Ok((shard, soft))
                });
                let failed = loaded.is_err();
                if send.send(loaded).is_err() || failed {
                    // Training stopped early, or this shard is bad: the
                    // receiving side has the error.
                    return;
                }
            }
        });
        // Dropping the receiver on an early return unblocks the reader.
        let mut waited = Duration::ZERO;
        loop {
            let asked = Instant::now();
            let Ok(loaded) = receive.recv() else { break };
            waited += asked.elapsed();
            let (shard, soft) = loaded?;
            f(&shard, &soft)?;
        }
        Ok(waited)
    })
}

/// Positions in `set`'s teacher list of the teachers `distill` learns
/// from: [`DistillConfig::teachers`], or all of them when it is empty.
pub(super) fn teacher_indices(set: &TransferSet, distill: &DistillConfig) -> Result<Vec<usize>> {
    let stored = &set.manifest().teachers;
    if distill.teachers.is_empty() {
        return Ok((0..stored.len()).collect());
    }
    distill
        .teachers
        .iter()
        .map(|name| {
            stored.iter().position(|t| t == name).ok_or_else(|| {
                Error::invalid(
                    "distill.teachers",
                    format!("{name} is not in the transfer set (it holds {stored:?})"),
                )
            })
        })
        .collect()
}
