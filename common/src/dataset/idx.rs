//! The IDX file format of MNIST and Fashion-MNIST, gzip-compressed or raw.
//!
//! An IDX file is a big-endian header (two zero bytes, a type code, the
//! number of dimensions, then one u32 per dimension) followed by the data.
//! Only unsigned bytes (type 0x08) are used by these datasets. The reader
//! checks the header and that the data has exactly the announced length.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Dataset, Normalization};
use crate::{Error, Result};

const UNSIGNED_BYTE: u8 = 0x08;
pub(super) const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Classes of the MNIST-style datasets.
pub(super) const CLASSES: usize = 10;

/// The content of one IDX file of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The size of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes, gzip-compressed or not.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("corrupt or truncated gzip data: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(path, &bytes)
}

/// Checks the header at the start of `bytes` (an uncompressed IDX file or
/// its beginning) and returns the dimensions and the header's length.
pub(super) fn parse_header(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, usize)> {
    if bytes.len() < 4 {
        return Err(Error::format(
            path,
            format!(
                "file is {} bytes long, too short for an IDX header",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::format(
            path,
            format!(
                "wrong magic number 0x{:02x}{:02x}{:02x}{:02x}: an IDX file starts with two zero bytes",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != UNSIGNED_BYTE {
        return Err(Error::format(
            path,
            format!(
                "unsupported IDX data type 0x{:02x}: only unsigned bytes (0x08) are supported",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err(Error::format(path, "IDX header announces zero dimensions"));
    }
    let header_len = 4 + 4 * ndims;
    if bytes.len() < header_len {
        return Err(Error::format(
            path,
            format!(
                "truncated header: {ndims} dimensions need {header_len} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    Ok((dims, header_len))
}

/// Parses the bytes of an (uncompressed) IDX file; `path` is for messages.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray> {
    let (dims, header_len) = parse_header(path, bytes)?;
    let expected: usize = dims.iter().product();
    let found = bytes.len() - header_len;
    if found != expected {
        let what = if found < expected {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(Error::format(
            path,
            format!("{what}: dimensions {dims:?} need {expected} data bytes, file has {found}"),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header_len..].to_vec(),
    })
}

/// The file names of an MNIST-style folder (`.gz` is tried first, then the
/// raw name).
const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Loads an MNIST-style folder (MNIST, Fashion-MNIST) as `(train, test)`,
/// with pixels scaled to [0, 1]. `name` prefixes the datasets' names.
pub fn load_mnist_folder(dir: &Path, name: &str) -> Result<(Dataset, Dataset)> {
    let paths = folder_files(dir)?;
    let train = load_pair(&paths[0], &paths[1], &format!("{name}/train"))?;
    let test = load_pair(&paths[2], &paths[3], &format!("{name}/test"))?;
    Ok((train, test))
}

/// The four files of an MNIST-style folder: training images and labels,
/// test images and labels.
pub(super) fn folder_files(dir: &Path) -> Result<[PathBuf; 4]> {
    let paths: Vec<PathBuf> = FILES
        .iter()
        .map(|f| find_file(dir, f))
        .collect::<Result<_>>()?;
    Ok(paths.try_into().expect("four files"))
}

fn find_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{stem}.gz"));
    let raw = dir.join(stem);
    if gz.is_file() {
        Ok(gz)
    } else if raw.is_file() {
        Ok(raw)
    } else {
        Err(Error::io(
            gz,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("not found (nor {stem} uncompressed) in {}", dir.display()),
            ),
        ))
    }
}

/// Checks that an images file has 3 dimensions and its labels file 1, of
/// the same count.
pub(super) fn check_pair_dims(
    images_path: &Path,
    images: &[usize],
    labels_path: &Path,
    labels: &[usize],
) -> Result<()> {
    if images.len() != 3 {
        return Err(Error::format(
            images_path,
            format!("expected 3 dimensions (count, rows, columns), found {images:?}"),
        ));
    }
    if labels.len() != 1 {
        return Err(Error::format(
            labels_path,
            format!("expected 1 dimension (count), found {labels:?}"),
        ));
    }
    if labels[0] != images[0] {
        return Err(Error::format(
            labels_path,
            format!(
                "label count {} does not match the image count {} of {}",
                labels[0],
                images[0],
                images_path.display()
            ),
        ));
    }
    Ok(())
}

/// Loads one images file and its labels file as a dataset of 10 classes.
pub fn load_pair(images_path: &Path, labels_path: &Path, name: &str) -> Result<Dataset> {
    let images = read_idx(images_path)?;
    let labels = read_idx(labels_path)?;
    check_pair_dims(images_path, &images.dims, labels_path, &labels.dims)?;
    let (h, w) = (images.dims[1], images.dims[2]);
    if let Some((i, &l)) = labels
        .data
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= CLASSES)
    {
        return Err(Error::format(
            labels_path,
            format!("label {l} of example {i} is not below {CLASSES}"),
        ));
    }
    let features = images.data.iter().map(|&p| f32::from(p) / 255.0).collect();
    let labels = labels.data.iter().map(|&l| u32::from(l)).collect();
    Dataset::new(
        name,
        features,
        labels,
        h * w,
        CLASSES,
        Some((h, w)),
        Normalization::DivideBy255,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, UNSIGNED_BYTE, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_raw_and_gzip_alike() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let raw = read_idx(&write(dir.path(), "a", &bytes)).unwrap();
        let gz = read_idx(&write(dir.path(), "a.gz", &gzip(&bytes))).unwrap();
        assert_eq!(raw, gz);
        assert_eq!(raw.dims, vec![2, 3]);
        assert_eq!(raw.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn wrong_magic_truncation_and_trailing_bytes_are_named() {
        let p = Path::new("x-idx3-ubyte");
        let mut bad = idx_bytes(&[2], &[1, 2]);
        bad[0] = 8;
        let e = parse_idx(p, &bad).unwrap_err().to_string();
        assert!(e.contains("x-idx3-ubyte") && e.contains("magic"), "{e}");
        let e = parse_idx(p, &idx_bytes(&[4, 2], &[0; 7]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated") && e.contains("8 data bytes"), "{e}");
        let e = parse_idx(p, &idx_bytes(&[2], &[0; 3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trailing"), "{e}");
        let e = parse_idx(p, &[0, 0, 8, 3, 0, 0]).unwrap_err().to_string();
        assert!(e.contains("truncated header"), "{e}");
        let e = parse_idx(p, &[0, 0, 0x0d, 1, 0, 0, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("data type"), "{e}");
    }

    #[test]
    fn truncated_gzip_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let gz = gzip(&idx_bytes(&[100], &[7; 100]));
        let p = write(dir.path(), "cut.gz", &gz[..gz.len() / 2]);
        let e = read_idx(&p).unwrap_err().to_string();
        assert!(e.contains("cut.gz") && e.contains("gzip"), "{e}");
    }

    #[test]
    fn label_count_mismatch_and_bad_labels_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let images = write(dir.path(), "img", &idx_bytes(&[3, 2, 2], &[0; 12]));
        let labels = write(dir.path(), "lab", &idx_bytes(&[2], &[1, 2]));
        let e = load_pair(&images, &labels, "t").unwrap_err().to_string();
        assert!(
            e.contains("label count 2") && e.contains("image count 3"),
            "{e}"
        );
        let labels = write(dir.path(), "lab", &idx_bytes(&[3], &[1, 10, 2]));
        let e = load_pair(&images, &labels, "t").unwrap_err().to_string();
        assert!(e.contains("label 10"), "{e}");
        let labels = write(dir.path(), "lab", &idx_bytes(&[3], &[1, 9, 2]));
        let d = load_pair(&images, &labels, "t").unwrap();
        assert_eq!((d.len(), d.dim(), d.image_shape()), (3, 4, Some((2, 2))));
    }

    #[test]
    fn missing_folder_names_the_file() {
        let e = load_mnist_folder(Path::new("/nonexistent/mnist"), "mnist")
            .unwrap_err()
            .to_string();
        assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    }
}
