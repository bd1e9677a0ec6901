//! A dataset source read in chunks, so that preparing a job's shards holds
//! about one shard in memory however large the source is: first the
//! training examples, then the test examples.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::synthetic::SyntheticStream;
use super::{Dataset, Normalization};
use crate::{Error, Result};

/// What a source holds, known before any example is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceShape {
    /// Name of the training set (such as `mnist/train`).
    pub train_name: String,
    /// Name of the test set.
    pub test_name: String,
    /// Training examples.
    pub train_len: usize,
    /// Test examples.
    pub test_len: usize,
    /// Features per example.
    pub dim: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// `(height, width)` of image examples.
    pub image_shape: Option<(usize, usize)>,
    /// How features are normalised.
    pub normalization: Normalization,
}

/// A source being read: its training examples in order, then its test
/// examples in order.
pub trait SourceStream: Send {
    /// What it holds.
    fn shape(&self) -> &SourceShape;
    /// The next at most `max` training examples; empty once all were read.
    fn next_train(&mut self, max: usize) -> Result<Dataset>;
    /// The next at most `max` test examples, once every training example
    /// was read; empty at the end.
    fn next_test(&mut self, max: usize) -> Result<Dataset>;
}

/// The synthetic problem as a [`SourceStream`].
pub struct SyntheticSource {
    shape: SourceShape,
    stream: SyntheticStream,
    train_left: usize,
    test_left: usize,
}

impl SyntheticSource {
    /// The examples of `spec`.
    pub fn new(spec: &super::synthetic::SyntheticSpec) -> Result<Self> {
        Ok(SyntheticSource {
            shape: SourceShape {
                train_name: "synthetic/train".into(),
                test_name: "synthetic/test".into(),
                train_len: spec.train_size,
                test_len: spec.test_size,
                dim: spec.dim,
                num_classes: spec.num_classes,
                image_shape: None,
                normalization: Normalization::Identity,
            },
            stream: spec.stream()?,
            train_left: spec.train_size,
            test_left: spec.test_size,
        })
    }
}

impl SourceStream for SyntheticSource {
    fn shape(&self) -> &SourceShape {
        &self.shape
    }
    fn next_train(&mut self, max: usize) -> Result<Dataset> {
        let n = max.min(self.train_left);
        self.train_left -= n;
        self.stream.next(n)
    }
    fn next_test(&mut self, max: usize) -> Result<Dataset> {
        if self.train_left > 0 {
            return Err(Error::invalid(
                "synthetic dataset",
                "test examples asked for before every training example was read",
            ));
        }
        let n = max.min(self.test_left);
        self.test_left -= n;
        self.stream.next(n)
    }
}

/// An IDX file of unsigned bytes being read: its dimensions, then rows.
struct IdxReader {
    path: PathBuf,
    reader: Box<dyn Read + Send>,
    dims: Vec<usize>,
    rows_left: usize,
}

impl IdxReader {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut file = BufReader::with_capacity(1 << 16, file);
        let mut magic = [0u8; 2];
        let gz = {
            use std::io::BufRead;
            let head = file.fill_buf().map_err(|e| Error::io(path, e))?;
            if head.len() >= 2 {
                magic.copy_from_slice(&head[..2]);
            }
            magic == super::idx::GZIP_MAGIC
        };
        let mut reader: Box<dyn Read + Send> = if gz {
            Box::new(flate2::read::GzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let bad_gz =
            |e: std::io::Error| Error::format(path, format!("corrupt or truncated gzip data: {e}"));
        let mut header = vec![0u8; 4];
        let got = read_full(&mut reader, &mut header).map_err(bad_gz)?;
        header.truncate(got);
        if got == 4 {
            let ndims = header[3] as usize;
            header.resize(4 + 4 * ndims, 0);
            let got = read_full(&mut reader, &mut header[4..]).map_err(bad_gz)?;
            header.truncate(4 + got);
        }
        let (dims, _) = super::idx::parse_header(path, &header)?;
        Ok(IdxReader {
            path: path.to_path_buf(),
            reader,
            rows_left: dims[0],
            dims,
        })
    }

    /// Bytes per row (the product of the inner dimensions).
    fn row_len(&self) -> usize {
        self.dims[1..].iter().product()
    }

    /// The next at most `rows` rows.
    fn read_rows(&mut self, rows: usize) -> Result<Vec<u8>> {
        let rows = rows.min(self.rows_left);
        let mut out = vec![0u8; rows * self.row_len()];
        let got = read_full(&mut self.reader, &mut out).map_err(|e| {
            Error::format(&self.path, format!("corrupt or truncated gzip data: {e}"))
        })?;
        if got < out.len() {
            return Err(Error::format(
                &self.path,
                format!(
                    "truncated: dimensions {:?} need more data bytes than the file has",
                    self.dims
                ),
            ));
        }
        self.rows_left -= rows;
        if self.rows_left == 0 {
            let mut extra = [0u8; 1];
            if read_full(&mut self.reader, &mut extra).unwrap_or(0) > 0 {
                return Err(Error::format(
                    &self.path,
                    format!(
                        "trailing bytes after the data of dimensions {:?}",
                        self.dims
                    ),
                ));
            }
        }
        Ok(out)
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// An images file and its labels file, read together.
struct IdxPair {
    images: IdxReader,
    labels: IdxReader,
    name: String,
    read: usize,
}

impl IdxPair {
    fn open(images: &Path, labels: &Path, name: String) -> Result<Self> {
        let (images, labels) = (IdxReader::open(images)?, IdxReader::open(labels)?);
        super::idx::check_pair_dims(&images.path, &images.dims, &labels.path, &labels.dims)?;
        Ok(IdxPair {
            images,
            labels,
            name,
            read: 0,
        })
    }

    fn next(&mut self, max: usize) -> Result<Dataset> {
        let pixels = self.images.read_rows(max)?;
        let labels = self.labels.read_rows(max)?;
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= super::idx::CLASSES)
        {
            return Err(Error::format(
                &self.labels.path,
                format!(
                    "label {l} of example {} is not below {}",
                    self.read + i,
                    super::idx::CLASSES
                ),
            ));
        }
        self.read += labels.len();
        let (h, w) = (self.images.dims[1], self.images.dims[2]);
        Dataset::new(
            self.name.clone(),
            pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
            labels.iter().map(|&l| u32::from(l)).collect(),
            h * w,
            super::idx::CLASSES,
            Some((h, w)),
            Normalization::DivideBy255,
        )
    }
}

/// An MNIST-style folder as a [`SourceStream`].
pub struct IdxSource {
    shape: SourceShape,
    train: IdxPair,
    test: IdxPair,
}

impl IdxSource {
    /// Opens the four files of `dir` (see [`super::idx::load_mnist_folder`]);
    /// `name` prefixes the splits' names.
    pub fn open(dir: &Path, name: &str) -> Result<Self> {
        let [train_images, train_labels, test_images, test_labels] = super::idx::folder_files(dir)?;
        let train = IdxPair::open(&train_images, &train_labels, format!("{name}/train"))?;
        let test = IdxPair::open(&test_images, &test_labels, format!("{name}/test"))?;
        let dims = &train.images.dims;
        if test.images.dims[1..] != dims[1..] {
            return Err(Error::format(
                &test.images.path,
                format!(
                    "images of {:?}, the training images are {:?}",
                    &test.images.dims[1..],
                    &dims[1..]
                ),
            ));
        }
        Ok(IdxSource {
            shape: SourceShape {
                train_name: train.name.clone(),
                test_name: test.name.clone(),
                train_len: dims[0],
                test_len: test.images.dims[0],
                dim: dims[1] * dims[2],
                num_classes: super::idx::CLASSES,
                image_shape: Some((dims[1], dims[2])),
                normalization: Normalization::DivideBy255,
            },
            train,
            test,
        })
    }
}

impl SourceStream for IdxSource {
    fn shape(&self) -> &SourceShape {
        &self.shape
    }
    fn next_train(&mut self, max: usize) -> Result<Dataset> {
        self.train.next(max)
    }
    fn next_test(&mut self, max: usize) -> Result<Dataset> {
        self.test.next(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic::SyntheticSpec;

    fn drain(stream: &mut dyn SourceStream, chunk: usize) -> (Vec<Dataset>, Vec<Dataset>) {
        let mut train = Vec::new();
        loop {
            let c = stream.next_train(chunk).unwrap();
            if c.is_empty() {
                break;
            }
            train.push(c);
        }
        let mut test = Vec::new();
        loop {
            let c = stream.next_test(chunk).unwrap();
            if c.is_empty() {
                break;
            }
            test.push(c);
        }
        (train, test)
    }

    fn joined(parts: &[Dataset]) -> Dataset {
        let refs: Vec<&Dataset> = parts.iter().collect();
        Dataset::concat(&refs, parts[0].name().to_string())
    }

    #[test]
    fn synthetic_chunks_are_the_generated_examples_bit_for_bit() {
        let spec = SyntheticSpec {
            train_size: 70,
            test_size: 25,
            ..SyntheticSpec::default()
        };
        let (train, test) = spec.generate().unwrap();
        let mut source = SyntheticSource::new(&spec).unwrap();
        assert_eq!(
            (source.shape().train_len, source.shape().test_len),
            (70, 25)
        );
        let (a, b) = drain(&mut source, 16);
        assert_eq!(a.len(), 5);
        assert_eq!(joined(&a), train);
        assert_eq!(joined(&b), test);
    }

    #[test]
    fn test_examples_before_the_training_ones_are_refused() {
        let mut source = SyntheticSource::new(&SyntheticSpec::default()).unwrap();
        assert!(source.next_test(4).is_err());
    }

    /// Writes an IDX file of `dims` holding `data`, gzipped or not.
    fn write_idx(path: &Path, dims: &[u32], data: &[u8], gz: bool) {
        let mut bytes = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(data);
        if gz {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            bytes = e.finish().unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }

    fn mnist_like(dir: &Path, gz: bool, train_labels: &[u8]) {
        let suffix = if gz { ".gz" } else { "" };
        let n = train_labels.len() as u32;
        let pixels: Vec<u8> = (0..n * 4).map(|i| (i * 7) as u8).collect();
        write_idx(
            &dir.join(format!("train-images-idx3-ubyte{suffix}")),
            &[n, 2, 2],
            &pixels,
            gz,
        );
        write_idx(
            &dir.join(format!("train-labels-idx1-ubyte{suffix}")),
            &[n],
            train_labels,
            gz,
        );
        write_idx(
            &dir.join(format!("t10k-images-idx3-ubyte{suffix}")),
            &[3, 2, 2],
            &pixels[..12],
            gz,
        );
        write_idx(
            &dir.join(format!("t10k-labels-idx1-ubyte{suffix}")),
            &[3],
            &train_labels[..3],
            gz,
        );
    }

    #[test]
    fn idx_chunks_are_the_loaded_examples() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            mnist_like(dir.path(), gz, &[1, 2, 3, 4, 5, 6, 7]);
            let (train, test) = crate::dataset::idx::load_mnist_folder(dir.path(), "m").unwrap();
            let mut source = IdxSource::open(dir.path(), "m").unwrap();
            assert_eq!(source.shape().train_len, 7);
            let (a, b) = drain(&mut source, 3);
            assert_eq!(joined(&a), train);
            assert_eq!(joined(&b), test);
        }
    }

    #[test]
    fn bad_labels_and_truncated_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        mnist_like(dir.path(), false, &[1, 2, 3, 4, 12]);
        let mut source = IdxSource::open(dir.path(), "m").unwrap();
        let e = source.next_train(10).unwrap_err().to_string();
        assert!(
            e.contains("label 12 of example 4") && e.contains("train-labels"),
            "{e}"
        );

        let path = dir.path().join("train-images-idx3-ubyte");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        let mut source = IdxSource::open(dir.path(), "m").unwrap();
        let e = source.next_train(10).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("train-images"), "{e}");
    }
}
