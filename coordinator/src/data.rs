//! Prepares the job's dataset: reads the source in chunks, splits the
//! training set into train and validation (the validation examples drawn
//! with the job's seed), and stores every split as shards
//! ([`common::dataset::shard`]) with their index, written last. Memory holds
//! a few shards, not the dataset: the chunk being read, the shard being
//! filled for each split, and the shards on their way to the store.

use anyhow::Context;
use common::artifact::{ArtifactName, ArtifactRef};
use common::blob::{self, BlobStore, PutMode};
use common::dataset::shard::{
    DatasetIndex, EncodedShard, ShardInfo, ShardWriter, Split, SplitIndex, INDEX_FORMAT,
};
use common::dataset::stream::SourceShape;
use common::dataset::validation_mask;

use crate::config::ClusterConfig;

/// Examples read from the source at a time.
const CHUNK: usize = 4096;
/// Encoded shards waiting for the store.
const QUEUED_SHARDS: usize = 2;

/// The prepared dataset.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// Its index, as stored.
    pub index: DatasetIndex,
    /// The stored artifacts: every shard, then the index.
    pub artifacts: Vec<ArtifactRef>,
}

impl Prepared {
    /// The stored index.
    pub fn index_ref(&self) -> &ArtifactRef {
        self.artifacts.last().expect("the index is stored last")
    }
}

/// What streaming the source found, besides the shards.
struct Streamed {
    shape: SourceShape,
    splits: [(String, usize, String); 3],
}

/// Reads `cfg`'s dataset and stores it as shards in `store`, removing
/// shards of an earlier preparation that this one does not have.
pub async fn prepare(cfg: &ClusterConfig, store: &dyn BlobStore) -> anyhow::Result<Prepared> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<EncodedShard>(QUEUED_SHARDS);
    let streaming = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || stream_splits(&cfg, &tx))
    };
    let per_shard = cfg.dataset.shard_examples;
    let mut shards: [Vec<ShardInfo>; 3] = Default::default();
    let mut artifacts = Vec::new();
    while let Some(shard) = rx.recv().await {
        let name = ArtifactName::DatasetShard(shard.place.split, shard.place.start / per_shard);
        let key = name.key();
        let written = blob::put_bytes(store, &key, shard.bytes, PutMode::Overwrite)
            .await
            .with_context(|| format!("storing {key}"))?;
        let split = Split::ALL
            .iter()
            .position(|&s| s == shard.place.split)
            .expect("a split");
        shards[split].push(ShardInfo {
            start: shard.place.start,
            rows: shard.rows,
            key,
            sha256: written.sha256.clone(),
            size: written.size,
        });
        artifacts.push(ArtifactRef {
            name,
            sha256: written.sha256,
            size: written.size,
            key: None,
        });
    }
    let streamed = streaming
        .await
        .context("preparing the dataset panicked")??;
    let [train, validation, test] = streamed.splits;
    let [train_shards, validation_shards, test_shards] = shards;
    let split = |(name, len, fingerprint): (String, usize, String), shards| SplitIndex {
        name,
        len,
        fingerprint,
        shards,
    };
    let shape = streamed.shape;
    let index = DatasetIndex {
        format: INDEX_FORMAT.into(),
        dim: shape.dim,
        num_classes: shape.num_classes,
        image_shape: shape.image_shape,
        normalization: shape.normalization,
        shard_examples: per_shard,
        train: split(train, train_shards),
        validation: split(validation, validation_shards),
        test: split(test, test_shards),
    };
    let written = blob::put_bytes(
        store,
        &ArtifactName::Dataset.key(),
        index.to_json(),
        PutMode::Overwrite,
    )
    .await?;
    artifacts.push(ArtifactRef {
        name: ArtifactName::Dataset,
        sha256: written.sha256,
        size: written.size,
        key: None,
    });
    let keep: std::collections::HashSet<String> = artifacts.iter().map(|a| a.name.key()).collect();
    for key in store.list("dataset/").await? {
        if !keep.contains(&key) {
            store.remove(&key).await?;
        }
    }
    Ok(Prepared { index, artifacts })
}

/// Streams the source through one shard writer per split, sending every
/// full shard to `tx`.
fn stream_splits(
    cfg: &ClusterConfig,
    tx: &tokio::sync::mpsc::Sender<EncodedShard>,
) -> anyhow::Result<Streamed> {
    let d = &cfg.dataset;
    let mut source = d.source.open(d.source_options())?;
    let shape = source.shape().clone();
    let full_len = d
        .train_limit
        .map_or(shape.train_len, |n| n.min(shape.train_len));
    let full_name = if full_len < shape.train_len {
        format!("{}[0..{full_len}]", shape.train_name)
    } else {
        shape.train_name.clone()
    };
    if d.validation_size >= full_len {
        anyhow::bail!(
            "dataset.validation_size = {} leaves no training examples in {full_name} ({full_len} examples)",
            d.validation_size
        );
    }
    let held_out = validation_mask(full_len, d.validation_size, cfg.seed)?;
    let dims = (shape.dim, shape.num_classes);
    let mut writers = [
        ShardWriter::new(
            Split::Train,
            format!("{full_name}/train"),
            full_len - d.validation_size,
            dims,
            d.shard_examples,
        ),
        ShardWriter::new(
            Split::Validation,
            format!("{full_name}/validation"),
            d.validation_size,
            dims,
            d.shard_examples,
        ),
        ShardWriter::new(
            Split::Test,
            shape.test_name.clone(),
            shape.test_len,
            dims,
            d.shard_examples,
        ),
    ];
    let send = |shard: Option<EncodedShard>| -> anyhow::Result<()> {
        if let Some(shard) = shard {
            tx.blocking_send(shard)
                .map_err(|_| anyhow::anyhow!("storing the dataset's shards stopped"))?;
        }
        Ok(())
    };
    let mut seen = 0;
    loop {
        let chunk = source.next_train(CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        // Examples past `train_limit` are still read: a synthetic source
        // makes the test examples after them.
        for i in 0..chunk.len().min(full_len.saturating_sub(seen)) {
            let writer = &mut writers[usize::from(held_out[seen + i])];
            send(writer.push(&chunk, i)?)?;
        }
        seen += chunk.len();
    }
    loop {
        let chunk = source.next_test(CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        for i in 0..chunk.len() {
            send(writers[2].push(&chunk, i)?)?;
        }
    }
    let [train, validation, test] = writers;
    let lens = [
        full_len - d.validation_size,
        d.validation_size,
        shape.test_len,
    ];
    let names = [
        format!("{full_name}/train"),
        format!("{full_name}/validation"),
        shape.test_name.clone(),
    ];
    let fingerprints = [train.finish()?, validation.finish()?, test.finish()?];
    let mut splits = names
        .into_iter()
        .zip(lens)
        .zip(fingerprints)
        .map(|((name, len), fingerprint)| (name, len, fingerprint));
    Ok(Streamed {
        splits: [
            splits.next().expect("three"),
            splits.next().expect("three"),
            splits.next().expect("three"),
        ],
        shape,
    })
}
