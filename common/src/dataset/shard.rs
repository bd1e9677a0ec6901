//! A prepared dataset as example-range shards: what the coordinator writes
//! to the blob store and workers read, so that no process holds a whole
//! split.
//!
//! Each split (train, validation, test) is cut into consecutive ranges of
//! `shard_examples` examples, stored as `dataset/<split>/shard-NNNNN.safetensors`.
//! A shard holds tensors `features` (`[rows, dim]`) and `labels` (U32
//! `[rows]`). Features of a dataset normalised by
//! [`Normalization::DivideBy255`] are stored as the original U8 pixels (4x
//! smaller, decoded to exactly the same f32 values); others as F32. The
//! header's metadata holds the split, the first example's index, the class
//! count, the image shape and the normalisation. The same examples give the
//! same bytes.
//!
//! `dataset/index.json` ([`DatasetIndex`]) lists every shard with its
//! checksum, and each split's fingerprint; it is written last.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::examples::Examples;
use super::{chunk_ranges, Dataset, Normalization};
use crate::{Error, Result};

/// Value of the `format` metadata key of a shard.
pub const SHARD_FORMAT: &str = "distill-dataset-shard/1";
/// Value of [`DatasetIndex::format`].
pub const INDEX_FORMAT: &str = "distill-dataset-index/1";
/// Examples per shard when the config does not say.
pub const DEFAULT_SHARD_EXAMPLES: usize = 65_536;

/// One of a job's three splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Examples to train on.
    Train,
    /// Held out from the training set for every training-time choice.
    Validation,
    /// The official test set, for reporting only.
    Test,
}

impl Split {
    /// All three, in their order in the index.
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    /// Its name in keys and files (`train`, `validation`, `test`).
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    /// The split called `name`.
    pub fn parse(name: &str) -> Option<Split> {
        Split::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which examples of which split a shard holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlace {
    /// Its split.
    pub split: Split,
    /// The index (within the split) of its first example.
    pub start: usize,
}

/// Encodes `data` as the shard of `split` starting at example `start`.
pub fn encode_shard(place: ShardPlace, data: &Dataset) -> Result<Vec<u8>> {
    let pixels = data.normalization == Normalization::DivideBy255
        && data.features.iter().all(|&x| to_pixel(x).is_some());
    let features: Vec<u8> = if pixels {
        data.features
            .iter()
            .map(|&x| to_pixel(x).expect("checked"))
            .collect()
    } else {
        data.features.iter().flat_map(|x| x.to_le_bytes()).collect()
    };
    let labels: Vec<u8> = data.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    let dtype = if pixels { Dtype::U8 } else { Dtype::F32 };
    let bad = |e: safetensors::SafeTensorError| Error::invalid("dataset shard", e.to_string());
    let views = [
        (
            "features",
            TensorView::new(dtype, vec![data.len(), data.dim], &features).map_err(bad)?,
        ),
        (
            "labels",
            TensorView::new(Dtype::U32, vec![data.len()], &labels).map_err(bad)?,
        ),
    ];
    let metadata = HashMap::from([
        ("format".to_string(), SHARD_FORMAT.to_string()),
        ("split".into(), place.split.as_str().into()),
        ("start".into(), place.start.to_string()),
        ("name".into(), data.name.clone()),
        ("num_classes".into(), data.num_classes.to_string()),
        (
            "image_shape".into(),
            data.image_shape
                .map_or(String::new(), |(h, w)| format!("{h}x{w}")),
        ),
        (
            "normalization".into(),
            serde_json::to_string(&data.normalization).expect("serialises"),
        ),
    ]);
    safetensors::serialize(views, Some(metadata))
        .map(crate::safetensors_header::with_sorted_header)
        .map_err(bad)
}

/// Decodes a shard written by [`encode_shard`]; `path` names it in errors.
pub fn decode_shard(bytes: &[u8], path: &Path) -> Result<(ShardPlace, Dataset)> {
    let bad = |reason: String| Error::format(path, reason);
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| {
        meta.get(key)
            .cloned()
            .ok_or_else(|| bad(format!("metadata key {key:?} is missing")))
    };
    if get("format")? != SHARD_FORMAT {
        return Err(bad(format!("not a dataset shard ({SHARD_FORMAT})")));
    }
    let split = get("split")?;
    let split = Split::parse(&split).ok_or_else(|| bad(format!("unknown split {split:?}")))?;
    let number = |key: &str| -> Result<usize> {
        get(key)?
            .parse()
            .map_err(|_| bad(format!("{key} is not a number")))
    };
    let (start, num_classes) = (number("start")?, number("num_classes")?);
    let image_shape = match get("image_shape")?.as_str() {
        "" => None,
        s => Some(
            s.split_once('x')
                .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)))
                .ok_or_else(|| bad(format!("image_shape {s:?} is not HxW")))?,
        ),
    };
    let normalization: Normalization = serde_json::from_str(&get("normalization")?)
        .map_err(|e| bad(format!("normalization: {e}")))?;
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let f = tensors
        .tensor("features")
        .map_err(|_| bad("tensor features is missing".into()))?;
    let l = tensors
        .tensor("labels")
        .map_err(|_| bad("tensor labels is missing".into()))?;
    let (&[rows, dim], &[labels_len]) = (f.shape(), l.shape()) else {
        return Err(bad("features must be 2-D and labels 1-D".into()));
    };
    if labels_len != rows || l.dtype() != Dtype::U32 {
        return Err(bad(format!("labels must be U32 [{rows}]")));
    }
    let features = match f.dtype() {
        Dtype::U8 => f.data().iter().map(|&p| f32::from(p) / 255.0).collect(),
        Dtype::F32 => f
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        other => {
            return Err(bad(format!(
                "features have dtype {other:?}, expected U8 or F32"
            )))
        }
    };
    let labels = l
        .data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let data = Dataset::new(
        get("name")?,
        features,
        labels,
        dim,
        num_classes,
        image_shape,
        normalization,
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok((ShardPlace { split, start }, data))
}

/// The 8-bit pixel whose `/ 255` is exactly `x`, if there is one.
fn to_pixel(x: f32) -> Option<u8> {
    let p = (x * 255.0).round();
    ((0.0..=255.0).contains(&p) && f32::from(p as u8) / 255.0 == x).then_some(p as u8)
}

/// One stored shard, as the index lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// Index (within its split) of its first example.
    pub start: usize,
    /// Number of examples.
    pub rows: usize,
    /// Its key in the blob store, relative to the job's root.
    pub key: String,
    /// sha256 of its bytes.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

impl ShardInfo {
    /// The examples it holds.
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.rows
    }
}

/// One split in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitIndex {
    /// The split's name in reports (such as `mnist/train`).
    pub name: String,
    /// Number of examples.
    pub len: usize,
    /// [`Dataset::fingerprint`] of the whole split.
    pub fingerprint: String,
    /// Its shards, in order, covering `0..len`.
    pub shards: Vec<ShardInfo>,
}

/// `dataset/index.json`: what a prepared dataset is and where its shards
/// are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetIndex {
    /// [`INDEX_FORMAT`].
    pub format: String,
    /// Features per example.
    pub dim: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// `[height, width]` when the examples are images.
    pub image_shape: Option<(usize, usize)>,
    /// How the features were normalised.
    pub normalization: Normalization,
    /// Examples per shard (the last of a split may hold fewer).
    pub shard_examples: usize,
    /// The training split.
    pub train: SplitIndex,
    /// The validation split.
    pub validation: SplitIndex,
    /// The test split.
    pub test: SplitIndex,
}

impl DatasetIndex {
    /// The index of `split`.
    pub fn split(&self, split: Split) -> &SplitIndex {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }

    /// The example ranges of every split's shards.
    pub fn layout(&self) -> DatasetLayout {
        let ranges = |s: &SplitIndex| s.shards.iter().map(ShardInfo::range).collect();
        DatasetLayout {
            train: ranges(&self.train),
            validation: ranges(&self.validation),
            test: ranges(&self.test),
        }
    }

    /// Parses an index; `path` names it in errors. Checks the format and
    /// that every split's shards cover it in order.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Self> {
        let index: DatasetIndex = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, format!("not a dataset index: {e}")))?;
        if index.format != INDEX_FORMAT {
            return Err(Error::format(
                path,
                format!("format {:?}, expected {INDEX_FORMAT:?}", index.format),
            ));
        }
        for split in Split::ALL {
            let s = index.split(split);
            let mut next = 0;
            for shard in &s.shards {
                if shard.start != next || shard.rows == 0 {
                    return Err(Error::format(
                        path,
                        format!("{split} shard {} does not follow example {next}", shard.key),
                    ));
                }
                next = shard.range().end;
            }
            if next != s.len {
                return Err(Error::format(
                    path,
                    format!("{split} shards cover {next} of {} examples", s.len),
                ));
            }
        }
        Ok(index)
    }

    /// The index as written (deterministic bytes).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("an index serialises")
    }
}

/// The example ranges of each split's shards: what a task needs to name
/// the shards it reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatasetLayout {
    /// Shards of the training split.
    pub train: Vec<Range<usize>>,
    /// Shards of the validation split.
    pub validation: Vec<Range<usize>>,
    /// Shards of the test split.
    pub test: Vec<Range<usize>>,
}

impl DatasetLayout {
    /// The layout of splits of `lens` (train, validation, test) examples cut
    /// into shards of `shard_examples`.
    pub fn new(lens: [usize; 3], shard_examples: usize) -> Result<Self> {
        Ok(DatasetLayout {
            train: chunk_ranges(lens[0], shard_examples)?,
            validation: chunk_ranges(lens[1], shard_examples)?,
            test: chunk_ranges(lens[2], shard_examples)?,
        })
    }

    /// The shard ranges of `split`.
    pub fn ranges(&self, split: Split) -> &[Range<usize>] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }

    /// The indices of `split`'s shards that hold some of `examples`.
    pub fn overlapping(&self, split: Split, examples: Range<usize>) -> Vec<usize> {
        super::overlapping(self.ranges(split), &examples)
    }

    /// The indices of all of `split`'s shards.
    pub fn all(&self, split: Split) -> Range<usize> {
        0..self.ranges(split).len()
    }
}

/// A split as shards in files, read one shard at a time (what a worker
/// trains from). Only the shards a task was given have a file.
#[derive(Clone, Debug)]
pub struct ShardedSplit {
    split: Split,
    index: SplitIndex,
    dim: usize,
    num_classes: usize,
    image_shape: Option<(usize, usize)>,
    normalization: Normalization,
    files: Vec<Option<PathBuf>>,
}

impl ShardedSplit {
    /// `split` of `index`, with the files of the shards at hand (`files[i]`
    /// for shard `i`, `None` where the task was not given it).
    pub fn new(index: &DatasetIndex, split: Split, files: Vec<Option<PathBuf>>) -> Result<Self> {
        let s = index.split(split);
        if files.len() != s.shards.len() {
            return Err(Error::invalid(
                "dataset shards",
                format!(
                    "{} files for the {} shards of {split}",
                    files.len(),
                    s.shards.len()
                ),
            ));
        }
        Ok(ShardedSplit {
            split,
            index: s.clone(),
            dim: index.dim,
            num_classes: index.num_classes,
            image_shape: index.image_shape,
            normalization: index.normalization,
            files,
        })
    }
}

impl ShardedSplit {
    /// Writes `data` as `split`'s shards of `rows` examples into `dir` and
    /// reads them back as a sharded split (for tests and tools; a job's
    /// shards come from [`ShardWriter`]).
    pub fn write(data: &Dataset, split: Split, rows: usize, dir: &Path) -> Result<Self> {
        let mut shards = Vec::new();
        let mut files = Vec::new();
        for (i, r) in chunk_ranges(data.len(), rows)?.into_iter().enumerate() {
            let place = ShardPlace {
                split,
                start: r.start,
            };
            let bytes = encode_shard(place, &data.slice(r.clone())?)?;
            let key = shard_key(split, i);
            let path = dir.join(key.replace('/', "_"));
            std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
            files.push(Some(path));
            shards.push(ShardInfo {
                start: r.start,
                rows: r.len(),
                key,
                sha256: crate::checksum::sha256_hex(&bytes),
                size: bytes.len() as u64,
            });
        }
        let index = SplitIndex {
            name: data.name.clone(),
            len: data.len(),
            fingerprint: data.fingerprint(),
            shards,
        };
        Ok(ShardedSplit {
            split,
            index,
            dim: data.dim,
            num_classes: data.num_classes,
            image_shape: data.image_shape,
            normalization: data.normalization,
            files,
        })
    }

    /// The same split with only the shards at `given` readable.
    pub fn only(&self, given: &[usize]) -> Self {
        let files = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| f.clone().filter(|_| given.contains(&i)))
            .collect();
        ShardedSplit {
            files,
            ..self.clone()
        }
    }
}

impl Examples for ShardedSplit {
    fn name(&self) -> &str {
        &self.index.name
    }
    fn len(&self) -> usize {
        self.index.len
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn image_shape(&self) -> Option<(usize, usize)> {
        self.image_shape
    }
    fn normalization(&self) -> Normalization {
        self.normalization
    }
    fn shard_ranges(&self) -> Vec<Range<usize>> {
        self.index.shards.iter().map(ShardInfo::range).collect()
    }
    fn fingerprint(&self) -> Result<String> {
        Ok(self.index.fingerprint.clone())
    }

    fn shard(&self, i: usize) -> Result<Cow<'_, Dataset>> {
        let info = self.index.shards.get(i).ok_or_else(|| {
            Error::invalid(
                "dataset shard",
                format!(
                    "{} has {} shards, not {}",
                    self.split,
                    self.index.shards.len(),
                    i + 1
                ),
            )
        })?;
        let path = self.files[i].as_ref().ok_or_else(|| {
            Error::invalid(
                "dataset shard",
                format!("{} was not among this task's inputs", info.key),
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (place, data) = decode_shard(&bytes, path)?;
        let expected = ShardPlace {
            split: self.split,
            start: info.start,
        };
        if place != expected || data.len() != info.rows || data.dim != self.dim {
            return Err(Error::format(
                path,
                format!(
                    "holds {} examples of {} from {}, the index says {} of {} from {}",
                    data.len(),
                    place.split,
                    place.start,
                    info.rows,
                    self.split,
                    info.start
                ),
            ));
        }
        Ok(Cow::Owned(data))
    }
}

/// Writes a split as shards while its examples stream in: examples are
/// pushed in order, every full shard is handed back encoded, and the
/// split's fingerprint is computed on the way.
pub struct ShardWriter {
    split: Split,
    name: String,
    shard_examples: usize,
    len: usize,
    written: usize,
    pending: Option<Dataset>,
    hasher: Sha256,
}

/// An encoded shard, ready to store.
#[derive(Debug)]
pub struct EncodedShard {
    /// Its split and first example.
    pub place: ShardPlace,
    /// Number of examples.
    pub rows: usize,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

impl ShardWriter {
    /// A writer of `split` (called `name`, `len` examples of `dim` features
    /// and `num_classes` classes) cut every `shard_examples`.
    pub fn new(
        split: Split,
        name: String,
        len: usize,
        (dim, num_classes): (usize, usize),
        shard_examples: usize,
    ) -> Self {
        ShardWriter {
            split,
            name,
            shard_examples: shard_examples.max(1),
            len,
            written: 0,
            pending: None,
            hasher: super::fingerprint_hasher(len, dim, num_classes),
        }
    }

    /// Adds example `i` of `chunk`; returns the shard it completed, if any.
    pub fn push(&mut self, chunk: &Dataset, i: usize) -> Result<Option<EncodedShard>> {
        if self.written >= self.len {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "{} has more than the {} examples announced",
                    self.name, self.len
                ),
            ));
        }
        let pending = self
            .pending
            .get_or_insert_with(|| chunk.empty_like(self.name.clone(), self.shard_examples));
        pending.push_example(chunk, i);
        super::hash_example(&mut self.hasher, chunk.labels[i], chunk.example(i));
        self.written += 1;
        if pending.len() == self.shard_examples || self.written == self.len {
            return self.flush().map(Some);
        }
        Ok(None)
    }

    fn flush(&mut self) -> Result<EncodedShard> {
        let data = self.pending.take().expect("a pending shard");
        let place = ShardPlace {
            split: self.split,
            start: self.written - data.len(),
        };
        Ok(EncodedShard {
            place,
            rows: data.len(),
            bytes: encode_shard(place, &data)?,
        })
    }

    /// The split's fingerprint, once every announced example was pushed.
    pub fn finish(self) -> Result<String> {
        if self.written != self.len {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "{} ended after {} of {} examples",
                    self.name, self.written, self.len
                ),
            ));
        }
        Ok(hex::encode(self.hasher.finalize()))
    }
}

/// The key of shard `index` of `split`.
pub fn shard_key(split: Split, index: usize) -> String {
    format!(
        "dataset/{split}/{}",
        crate::transfer::shard_file_name(index)
    )
}

/// The key of the dataset's index.
pub const INDEX_KEY: &str = "dataset/index.json";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic::SyntheticSpec;

    fn pixels() -> Dataset {
        let features: Vec<f32> = (0..40).map(|i| f32::from(i as u8 * 6) / 255.0).collect();
        Dataset::new(
            "px",
            features,
            (0..10).map(|i| i % 3).collect(),
            4,
            3,
            Some((2, 2)),
            Normalization::DivideBy255,
        )
        .unwrap()
    }

    #[test]
    fn pixel_data_round_trips_exactly_as_u8() {
        let d = pixels();
        let place = ShardPlace {
            split: Split::Validation,
            start: 20,
        };
        let bytes = encode_shard(place, &d).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.tensors()["features"].dtype, Dtype::U8);
        let (back_place, back) = decode_shard(&bytes, Path::new("b")).unwrap();
        assert_eq!((back_place, &back), (place, &d));
        assert_eq!(
            encode_shard(place, &back).unwrap(),
            bytes,
            "deterministic bytes"
        );
    }

    #[test]
    fn real_valued_data_round_trips_as_f32() {
        let (train, _) = SyntheticSpec {
            train_size: 60,
            test_size: 20,
            ..SyntheticSpec::default()
        }
        .generate()
        .unwrap();
        let place = ShardPlace {
            split: Split::Train,
            start: 0,
        };
        let (_, back) =
            decode_shard(&encode_shard(place, &train).unwrap(), Path::new("b")).unwrap();
        assert_eq!(back, train);
    }

    #[test]
    fn garbage_and_foreign_files_are_refused_with_the_path() {
        let err = decode_shard(b"not a shard", Path::new("cache/x")).unwrap_err();
        assert!(err.to_string().contains("cache/x"), "{err}");
        let other = safetensors::serialize(
            [("a", TensorView::new(Dtype::U8, vec![1], &[0u8]).unwrap())],
            None,
        )
        .unwrap();
        let err = decode_shard(&other, Path::new("y")).unwrap_err();
        assert!(err.to_string().contains("format"), "{err}");
    }

    #[test]
    fn the_writer_cuts_shards_and_fingerprints_the_split_as_a_whole() {
        let d = pixels();
        let mut writer = ShardWriter::new(Split::Train, "px".into(), d.len(), (4, 3), 4);
        let mut shards = Vec::new();
        for i in 0..d.len() {
            shards.extend(writer.push(&d, i).unwrap());
        }
        assert_eq!(writer.finish().unwrap(), d.fingerprint());
        let rows: Vec<_> = shards.iter().map(|s| (s.place.start, s.rows)).collect();
        assert_eq!(rows, [(0, 4), (4, 4), (8, 2)]);
        let (_, last) = decode_shard(&shards[2].bytes, Path::new("s")).unwrap();
        assert_eq!(last.labels(), &d.labels()[8..]);
    }

    #[test]
    fn a_writer_given_too_few_or_too_many_examples_says_so() {
        let d = pixels();
        let mut short = ShardWriter::new(Split::Test, "px".into(), 11, (4, 3), 4);
        for i in 0..d.len() {
            short.push(&d, i).unwrap();
        }
        assert!(short.finish().unwrap_err().to_string().contains("10 of 11"));
        let mut long = ShardWriter::new(Split::Test, "px".into(), 1, (4, 3), 4);
        long.push(&d, 0).unwrap();
        assert!(long.push(&d, 1).is_err());
    }

    #[test]
    fn layouts_name_the_shards_a_range_needs() {
        let layout = DatasetLayout::new([10, 3, 4], 4).unwrap();
        assert_eq!(layout.train, [0..4, 4..8, 8..10]);
        assert_eq!(layout.overlapping(Split::Train, 3..5), [0, 1]);
        assert_eq!(layout.overlapping(Split::Train, 8..10), [2]);
        assert_eq!(layout.all(Split::Test), 0..1);
    }
}
