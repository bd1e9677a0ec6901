//! In-memory labelled datasets, their validation split and index-range shards.
//!
//! A [`Dataset`] holds `len` examples of `dim` f32 features each (row-major),
//! one `u32` label per example below `num_classes`, and, for images, their
//! height and width so that augmentations can move pixels. Features are
//! already normalised (see [`Normalization`]).

pub mod examples;
pub mod idx;
pub mod npy;
pub mod shard;
pub mod source;
pub mod stream;
pub mod synthetic;

use std::ops::Range;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::seed::{self, Stream};
use crate::{Error, Result};

/// How raw inputs were turned into the features a model sees. Saved with
/// every model so that users feed it the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Features are used as generated.
    Identity,
    /// 8-bit pixel values divided by 255, giving values in [0, 1].
    #[serde(rename = "divide_by_255")]
    DivideBy255,
}

impl Normalization {
    /// A short human-readable description, as stored in model metadata.
    pub fn describe(self) -> &'static str {
        match self {
            Normalization::Identity => "identity",
            Normalization::DivideBy255 => "pixel / 255",
        }
    }
}

/// A labelled dataset held in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    name: String,
    features: Vec<f32>,
    labels: Vec<u32>,
    dim: usize,
    num_classes: usize,
    image_shape: Option<(usize, usize)>,
    normalization: Normalization,
}

impl Dataset {
    /// Builds a dataset, checking that `features` holds `labels.len() * dim`
    /// values, every label is below `num_classes`, and an image shape (if
    /// any) has `dim` pixels.
    pub fn new(
        name: impl Into<String>,
        features: Vec<f32>,
        labels: Vec<u32>,
        dim: usize,
        num_classes: usize,
        image_shape: Option<(usize, usize)>,
        normalization: Normalization,
    ) -> Result<Self> {
        let name = name.into();
        if dim == 0 {
            return Err(Error::invalid(
                "dataset dimension",
                format!("{name}: must be at least 1"),
            ));
        }
        if num_classes < 2 {
            return Err(Error::invalid(
                "number of classes",
                format!("{name}: need at least 2, got {num_classes}"),
            ));
        }
        if features.len() != labels.len() * dim {
            return Err(Error::invalid(
                "dataset features",
                format!(
                    "{name}: {} values for {} examples of dimension {dim}",
                    features.len(),
                    labels.len()
                ),
            ));
        }
        if let Some((i, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= num_classes)
        {
            return Err(Error::invalid(
                "dataset label",
                format!("{name}: example {i} has label {label}, expected below {num_classes}"),
            ));
        }
        if let Some((h, w)) = image_shape {
            if h * w != dim {
                return Err(Error::invalid(
                    "image shape",
                    format!("{name}: {h}x{w} images do not have {dim} pixels"),
                ));
            }
        }
        Ok(Dataset {
            name,
            features,
            labels,
            dim,
            num_classes,
            image_shape,
            normalization,
        })
    }

    /// The dataset's name (for messages and reports).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True when the dataset has no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Number of features per example.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Number of classes; every label is below it.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }
    /// `(height, width)` when the examples are images.
    pub fn image_shape(&self) -> Option<(usize, usize)> {
        self.image_shape
    }
    /// How the features were normalised.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }
    /// All labels, one per example.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
    /// All features, row-major (`len * dim`).
    pub fn features(&self) -> &[f32] {
        &self.features
    }
    /// The features of example `i`.
    pub fn example(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// A new dataset made of the examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize], name: impl Into<String>) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            features.extend_from_slice(self.example(i));
        }
        Dataset {
            name: name.into(),
            features,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            ..self.without_data()
        }
    }

    /// The examples in `range` (an index-range shard).
    pub fn slice(&self, range: Range<usize>) -> Result<Dataset> {
        check_range(&range, &self.name, self.len())?;
        Ok(Dataset {
            name: format!("{}[{}..{}]", self.name, range.start, range.end),
            features: self.features[range.start * self.dim..range.end * self.dim].to_vec(),
            labels: self.labels[range].to_vec(),
            ..self.without_data()
        })
    }

    /// Holds out `validation_size` examples, chosen at random from `seed`,
    /// and returns `(train, validation)`; both keep the original order.
    pub fn split_validation(
        &self,
        validation_size: usize,
        seed: u64,
    ) -> Result<(Dataset, Dataset)> {
        if validation_size >= self.len() {
            return Err(Error::invalid(
                "validation_size",
                format!(
                    "{validation_size} leaves no training examples in {} ({} examples)",
                    self.name,
                    self.len()
                ),
            ));
        }
        let held_out_mask = validation_mask(self.len(), validation_size, seed)?;
        let (held_out, kept): (Vec<usize>, Vec<usize>) =
            (0..self.len()).partition(|&i| held_out_mask[i]);
        Ok((
            self.subset(&kept, format!("{}/train", self.name)),
            self.subset(&held_out, format!("{}/validation", self.name)),
        ))
    }

    /// Examples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// A sha256 over the shape, then each example's label and features in
    /// order: two datasets with the same fingerprint hold the same examples
    /// in the same order. Computed the same way while streaming (see
    /// [`shard::ShardWriter`]).
    pub fn fingerprint(&self) -> String {
        let mut h = fingerprint_hasher(self.len(), self.dim, self.num_classes);
        for (i, &label) in self.labels.iter().enumerate() {
            hash_example(&mut h, label, self.example(i));
        }
        hex::encode(h.finalize())
    }

    /// An empty dataset of the same shape called `name`, with room for
    /// `capacity` examples.
    pub fn empty_like(&self, name: String, capacity: usize) -> Dataset {
        Dataset {
            name,
            features: Vec::with_capacity(capacity * self.dim),
            labels: Vec::with_capacity(capacity),
            ..self.without_data()
        }
    }

    /// Appends example `i` of `other` (of the same shape).
    pub fn push_example(&mut self, other: &Dataset, i: usize) {
        debug_assert_eq!(self.dim, other.dim);
        self.features.extend_from_slice(other.example(i));
        self.labels.push(other.labels[i]);
    }

    /// The examples of `parts` (of one shape, at least one), one after the
    /// other.
    pub fn concat(parts: &[&Dataset], name: String) -> Dataset {
        let len = parts.iter().map(|p| p.len()).sum();
        let mut out = parts[0].empty_like(name, len);
        for p in parts {
            out.features.extend_from_slice(&p.features);
            out.labels.extend_from_slice(&p.labels);
        }
        out
    }

    fn without_data(&self) -> Dataset {
        Dataset {
            name: self.name.clone(),
            features: Vec::new(),
            labels: Vec::new(),
            dim: self.dim,
            num_classes: self.num_classes,
            image_shape: self.image_shape,
            normalization: self.normalization,
        }
    }
}

/// Checks that `range` lies within the `len` examples of `name`.
fn check_range(range: &Range<usize>, name: &str, len: usize) -> Result<()> {
    if range.start > range.end || range.end > len {
        return Err(Error::invalid(
            "example range",
            format!("{}..{} of {name} ({len} examples)", range.start, range.end),
        ));
    }
    Ok(())
}

/// The indices of the `shards` (example ranges) that hold some of
/// `examples`.
pub fn overlapping(shards: &[Range<usize>], examples: &Range<usize>) -> Vec<usize> {
    shards
        .iter()
        .enumerate()
        .filter(|(_, r)| r.start < examples.end && examples.start < r.end)
        .map(|(i, _)| i)
        .collect()
}

/// Which of `len` examples [`Dataset::split_validation`] holds out for
/// validation: `validation_size` of them, drawn with `seed` (4 bytes per
/// example while drawing, 1 in the mask).
pub fn validation_mask(len: usize, validation_size: usize, seed: u64) -> Result<Vec<bool>> {
    if validation_size >= len {
        return Err(Error::invalid(
            "validation_size",
            format!("{validation_size} leaves no training examples ({len} examples)"),
        ));
    }
    let len32 = u32::try_from(len).map_err(|_| {
        Error::invalid(
            "dataset",
            format!("{len} examples; at most 2^32 - 1 are supported"),
        )
    })?;
    // The permutation depends only on the length, not on the element type.
    let mut order: Vec<u32> = (0..len32).collect();
    order.shuffle(&mut seed::rng(seed, Stream::Split));
    let mut mask = vec![false; len];
    for &i in &order[..validation_size] {
        mask[i as usize] = true;
    }
    Ok(mask)
}

/// The hasher of [`Dataset::fingerprint`] after the shape.
fn fingerprint_hasher(len: usize, dim: usize, num_classes: usize) -> Sha256 {
    let mut h = Sha256::new();
    for n in [len, dim, num_classes] {
        h.update((n as u64).to_le_bytes());
    }
    h
}

/// Adds one example to a fingerprint.
fn hash_example(h: &mut Sha256, label: u32, features: &[f32]) {
    h.update(label.to_le_bytes());
    let mut bytes = [0u8; 256];
    for chunk in features.chunks(64) {
        for (b, x) in bytes.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&bytes[..chunk.len() * 4]);
    }
}

/// The three parts every experiment works with. Choices made while training
/// (epochs, temperature, bias adjustments) look only at `validation`; `test`
/// is only ever used to report.
#[derive(Clone, Debug)]
pub struct Splits {
    /// Examples to train on.
    pub train: Dataset,
    /// Examples held out from the training set for every training-time choice.
    pub validation: Dataset,
    /// The official test set, for reporting only.
    pub test: Dataset,
}

impl Splits {
    /// Splits `train_full` into train and validation (`validation_size`
    /// examples drawn with `seed`) and keeps `test` as it is.
    pub fn new(
        train_full: &Dataset,
        test: Dataset,
        validation_size: usize,
        seed: u64,
    ) -> Result<Self> {
        let (train, validation) = train_full.split_validation(validation_size, seed)?;
        Ok(Splits {
            train,
            validation,
            test,
        })
    }
}

/// Cuts `0..len` into `shards` contiguous ranges whose sizes differ by at
/// most one (earlier shards get the extra examples).
pub fn shard_ranges(len: usize, shards: usize) -> Result<Vec<Range<usize>>> {
    if shards == 0 {
        return Err(Error::invalid(
            "number of shards",
            "must be at least 1, got 0",
        ));
    }
    if shards > len.max(1) {
        return Err(Error::invalid(
            "number of shards",
            format!("{shards} shards for {len} examples would leave some empty"),
        ));
    }
    let (base, extra) = (len / shards, len % shards);
    let mut start = 0;
    Ok((0..shards)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let range = start..start + size;
            start += size;
            range
        })
        .collect())
}

/// Cuts `0..len` into consecutive ranges of at most `rows` examples.
pub fn chunk_ranges(len: usize, rows: usize) -> Result<Vec<Range<usize>>> {
    if rows == 0 {
        return Err(Error::invalid(
            "rows per shard",
            "must be at least 1, got 0",
        ));
    }
    Ok((0..len)
        .step_by(rows)
        .map(|s| s..(s + rows).min(len))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n: usize) -> Dataset {
        let features = (0..n * 2).map(|x| x as f32).collect();
        let labels = (0..n as u32).map(|i| i % 3).collect();
        Dataset::new(
            "tiny",
            features,
            labels,
            2,
            3,
            None,
            Normalization::Identity,
        )
        .unwrap()
    }

    #[test]
    fn shards_cover_everything_once_and_are_balanced() {
        for len in [1usize, 7, 10, 60_000] {
            for shards in 1..=len.min(9) {
                let ranges = shard_ranges(len, shards).unwrap();
                assert_eq!(ranges.len(), shards);
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges.last().unwrap().end, len);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<_> = ranges.iter().map(|r| r.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn bad_shard_counts_are_rejected() {
        assert!(shard_ranges(10, 0).is_err());
        assert!(shard_ranges(3, 4).is_err());
        assert!(chunk_ranges(3, 0).is_err());
        assert_eq!(chunk_ranges(5, 2).unwrap(), vec![0..2, 2..4, 4..5]);
    }

    #[test]
    fn validation_split_is_disjoint_seeded_and_complete() {
        let d = tiny(50);
        let (train, val) = d.split_validation(10, 1).unwrap();
        assert_eq!((train.len(), val.len()), (40, 10));
        let firsts = |s: &Dataset| {
            (0..s.len())
                .map(|i| s.example(i)[0] as usize / 2)
                .collect::<Vec<_>>()
        };
        let mut all = firsts(&train);
        all.extend(firsts(&val));
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
        assert_eq!(d.split_validation(10, 1).unwrap().1, val);
        assert_ne!(d.split_validation(10, 2).unwrap().1, val);
        assert!(d.split_validation(50, 1).is_err());
    }

    #[test]
    fn slice_and_subset_keep_labels_with_features() {
        let d = tiny(10);
        let s = d.slice(2..5).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.example(0), d.example(2));
        assert_eq!(s.labels(), &d.labels()[2..5]);
        assert!(d.slice(5..11).is_err());
        let sub = d.subset(&[9, 0], "sub");
        assert_eq!(sub.example(0), d.example(9));
        assert_eq!(sub.labels(), &[d.labels()[9], d.labels()[0]]);
    }

    #[test]
    fn inconsistent_datasets_are_rejected() {
        let make = |values: usize, labels: Vec<u32>, image_shape| {
            Dataset::new(
                "d",
                vec![0.0; values],
                labels,
                2,
                3,
                image_shape,
                Normalization::Identity,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let err = make(5, vec![0, 1], None).unwrap_err();
        assert!(err.contains("5 values for 2 examples"), "{err}");
        let err = make(4, vec![0, 3], None).unwrap_err();
        assert!(err.contains("label 3"), "{err}");
        assert!(make(4, vec![0, 1], Some((1, 3))).is_err());
        assert!(make(4, vec![0, 1], None).is_ok());
    }

    #[test]
    fn normalization_names_are_the_documented_ones() {
        let name = |n| serde_json::to_string(&n).unwrap();
        assert_eq!(name(Normalization::DivideBy255), "\"divide_by_255\"");
        assert_eq!(name(Normalization::Identity), "\"identity\"");
    }

    #[test]
    fn fingerprint_changes_with_content() {
        let a = tiny(5);
        let mut features = a.features().to_vec();
        features[3] += 1.0;
        let b = Dataset::new(
            "tiny",
            features,
            a.labels().to_vec(),
            2,
            3,
            None,
            Normalization::Identity,
        )
        .unwrap();
        assert_eq!(a.fingerprint(), tiny(5).fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
