//! [`Examples`]: a split that training and inference read shard by shard,
//! whether it is held in memory (a [`Dataset`], one shard) or stored as
//! shard files ([`super::shard::ShardedSplit`]).

use std::borrow::Cow;
use std::ops::Range;

use super::{Dataset, Normalization};
use crate::{Error, Result};

/// A split read one shard at a time.
pub trait Examples: Send + Sync {
    /// Its name (for messages and reports).
    fn name(&self) -> &str;
    /// Number of examples.
    fn len(&self) -> usize;
    /// Features per example.
    fn dim(&self) -> usize;
    /// Number of classes; every label is below it.
    fn num_classes(&self) -> usize;
    /// `(height, width)` when the examples are images.
    fn image_shape(&self) -> Option<(usize, usize)>;
    /// How the features were normalised.
    fn normalization(&self) -> Normalization;
    /// The example ranges of its shards, in order, covering `0..len`.
    fn shard_ranges(&self) -> Vec<Range<usize>>;
    /// The examples of shard `i`.
    fn shard(&self, i: usize) -> Result<Cow<'_, Dataset>>;
    /// [`Dataset::fingerprint`] of the whole split.
    fn fingerprint(&self) -> Result<String>;

    /// True when it has no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples of `shards`, one after the other in that order.
    fn load_shards(&self, shards: &[usize]) -> Result<Cow<'_, Dataset>> {
        if let [only] = shards {
            return self.shard(*only);
        }
        let parts = shards
            .iter()
            .map(|&i| self.shard(i))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Dataset> = parts.iter().map(|p| &**p).collect();
        if refs.is_empty() {
            return Err(Error::invalid("dataset shards", "none asked for"));
        }
        Ok(Cow::Owned(Dataset::concat(&refs, self.name().to_string())))
    }

    /// Every example, in memory.
    fn load_all(&self) -> Result<Cow<'_, Dataset>> {
        let all: Vec<usize> = (0..self.shard_ranges().len()).collect();
        self.load_shards(&all)
    }

    /// The shards that hold `range`, loaded, and the index of their first
    /// example: example `i` of `range` is example `i - offset` of the data.
    fn load_range(&self, range: Range<usize>) -> Result<(Cow<'_, Dataset>, usize)> {
        super::check_range(&range, self.name(), self.len())?;
        let ranges = self.shard_ranges();
        let needed = super::overlapping(&ranges, &range);
        let offset = needed.first().map_or(0, |&i| ranges[i].start);
        if needed.is_empty() {
            return Ok((Cow::Owned(Dataset::empty_shape(self)?), offset));
        }
        Ok((self.load_shards(&needed)?, offset))
    }

    /// Every label, in order (4 bytes per example; features are read one
    /// shard at a time and dropped).
    fn labels(&self) -> Result<Cow<'_, [u32]>> {
        let mut labels = Vec::with_capacity(self.len());
        for i in 0..self.shard_ranges().len() {
            labels.extend_from_slice(self.shard(i)?.labels());
        }
        Ok(Cow::Owned(labels))
    }

    /// The examples at `indices` (ascending), in memory, called `name`.
    fn subset(&self, indices: &[usize], name: String) -> Result<Dataset> {
        if indices.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid("example subset", "indices must ascend"));
        }
        let mut out = Dataset::empty_shape(self)?.empty_like(name, indices.len());
        let mut rest = indices;
        for (i, range) in self.shard_ranges().into_iter().enumerate() {
            let inside = rest.partition_point(|&k| k < range.end);
            if inside > 0 {
                let shard = self.shard(i)?;
                for &k in &rest[..inside] {
                    out.push_example(&shard, k - range.start);
                }
            }
            rest = &rest[inside..];
        }
        if let Some(k) = rest.first() {
            return Err(Error::invalid(
                "example subset",
                format!("example {k} of {} ({} examples)", self.name(), self.len()),
            ));
        }
        Ok(out)
    }
}

impl Dataset {
    /// An empty dataset shaped like `examples`.
    fn empty_shape(examples: &(impl Examples + ?Sized)) -> Result<Dataset> {
        Dataset::new(
            examples.name(),
            Vec::new(),
            Vec::new(),
            examples.dim(),
            examples.num_classes(),
            examples.image_shape(),
            examples.normalization(),
        )
    }
}

/// A dataset in memory is one shard.
impl Examples for Dataset {
    fn name(&self) -> &str {
        Dataset::name(self)
    }
    fn len(&self) -> usize {
        Dataset::len(self)
    }
    fn dim(&self) -> usize {
        Dataset::dim(self)
    }
    fn num_classes(&self) -> usize {
        Dataset::num_classes(self)
    }
    fn image_shape(&self) -> Option<(usize, usize)> {
        Dataset::image_shape(self)
    }
    fn normalization(&self) -> Normalization {
        Dataset::normalization(self)
    }
    fn shard_ranges(&self) -> Vec<Range<usize>> {
        std::iter::once(0..Dataset::len(self)).collect()
    }
    fn shard(&self, i: usize) -> Result<Cow<'_, Dataset>> {
        if i != 0 {
            return Err(Error::invalid(
                "dataset shard",
                format!(
                    "{} is one shard in memory, not {}",
                    Dataset::name(self),
                    i + 1
                ),
            ));
        }
        Ok(Cow::Borrowed(self))
    }
    fn fingerprint(&self) -> Result<String> {
        Ok(Dataset::fingerprint(self))
    }
    fn labels(&self) -> Result<Cow<'_, [u32]>> {
        Ok(Cow::Borrowed(Dataset::labels(self)))
    }
    fn subset(&self, indices: &[usize], name: String) -> Result<Dataset> {
        if let Some(&k) = indices.iter().find(|&&k| k >= Dataset::len(self)) {
            return Err(Error::invalid(
                "example subset",
                format!(
                    "example {k} of {} ({} examples)",
                    Dataset::name(self),
                    Dataset::len(self)
                ),
            ));
        }
        Ok(Dataset::subset(self, indices, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::shard::{ShardedSplit, Split};

    fn data(n: usize) -> Dataset {
        Dataset::new(
            "d",
            (0..n * 2).map(|x| x as f32).collect(),
            (0..n as u32).map(|i| i % 3).collect(),
            2,
            3,
            None,
            Normalization::Identity,
        )
        .unwrap()
    }

    #[test]
    fn sharded_and_in_memory_splits_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(10);
        let s = ShardedSplit::write(&d, Split::Train, 4, dir.path()).unwrap();
        assert_eq!(s.shard_ranges(), [0..4, 4..8, 8..10]);
        assert_eq!(&*Examples::labels(&s).unwrap(), d.labels());
        assert_eq!(s.load_all().unwrap().features(), d.features());
        let (part, offset) = s.load_range(5..9).unwrap();
        assert_eq!((part.len(), offset), (6, 4));
        assert_eq!(part.example(5 - offset), d.example(5));
        let picked = Examples::subset(&s, &[1, 4, 9], "p".into()).unwrap();
        assert_eq!(picked, d.subset(&[1, 4, 9], "p"));
        let (whole, offset) = d.load_range(5..9).unwrap();
        assert!(matches!(whole, Cow::Borrowed(_)) && offset == 0);
    }

    #[test]
    fn a_shard_not_given_or_out_of_range_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(10);
        let s = ShardedSplit::write(&d, Split::Train, 4, dir.path())
            .unwrap()
            .only(&[0]);
        let e = s.shard(1).unwrap_err().to_string();
        assert!(
            e.contains("dataset/train/shard-00001") && e.contains("not among"),
            "{e}"
        );
        assert!(s.load_range(3..11).is_err());
        assert!(Examples::subset(&d, &[3, 10], "x".into()).is_err());
    }
}
