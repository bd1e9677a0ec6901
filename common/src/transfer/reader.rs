//! Reading a transfer set shard by shard, verifying every checksum.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors};

use super::manifest::{Manifest, MANIFEST_FILE};
use super::targets::{soft_targets, EnsembleCombine};
use super::{logits_tensor_name, INDEX_TENSOR};
use crate::checksum::sha256_hex;
use crate::dataset::Dataset;
use crate::{Error, Result};

/// A complete transfer set on disk, opened through its manifest.
#[derive(Clone, Debug)]
pub struct TransferSet {
    dir: PathBuf,
    manifest: Manifest,
}

/// One shard in memory: every teacher's logits for examples
/// `start..start + rows`.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    /// Index of the first example.
    pub start: usize,
    /// Number of examples.
    pub rows: usize,
    /// Number of classes.
    pub num_classes: usize,
    /// Per teacher (manifest order), `rows * num_classes` logits, row-major.
    pub logits: Vec<Vec<f32>>,
}

impl Shard {
    /// The ensemble's soft targets at temperature `temperature`.
    pub fn soft_targets(&self, temperature: f64, combine: EnsembleCombine) -> Result<Vec<f32>> {
        let members: Vec<&[f32]> = self.logits.iter().map(Vec::as_slice).collect();
        soft_targets(&members, self.num_classes, temperature, combine)
    }
}

impl Shard {
    /// Decodes the bytes of a shard file that should hold the logits of
    /// `teachers` over `num_classes` classes for the examples in `range`;
    /// `path` names it in errors. Checks every tensor's dtype and shape and
    /// that the example index holds exactly `range`.
    pub fn decode(
        bytes: &[u8],
        path: &Path,
        range: std::ops::Range<usize>,
        teachers: &[String],
        num_classes: usize,
    ) -> Result<Shard> {
        let rows = range.len();
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        let index = tensor_bytes(&tensors, path, INDEX_TENSOR, Dtype::I64, &[rows])?;
        let expected = range.clone().map(|i| i as i64);
        let stored = index
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")));
        if !stored.eq(expected) {
            return Err(Error::format(
                path,
                format!(
                    "{INDEX_TENSOR} does not hold {}..{}",
                    range.start, range.end
                ),
            ));
        }
        if tensors.len() != teachers.len() + 1 {
            return Err(Error::format(
                path,
                format!(
                    "holds {} tensors, expected {INDEX_TENSOR} and the logits of {} teachers",
                    tensors.len(),
                    teachers.len()
                ),
            ));
        }
        let logits = teachers
            .iter()
            .map(|t| {
                let name = logits_tensor_name(t);
                let data = tensor_bytes(&tensors, path, &name, Dtype::F32, &[rows, num_classes])?;
                let logits: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                if let Some(at) = logits.iter().position(|z| !z.is_finite()) {
                    return Err(Error::format(
                        path,
                        format!(
                            "teacher {t}'s logit for example {} class {} is {} (logits must be finite)",
                            range.start + at / num_classes.max(1),
                            at % num_classes.max(1),
                            logits[at]
                        ),
                    ));
                }
                Ok(logits)
            })
            .collect::<Result<_>>()?;
        Ok(Shard {
            start: range.start,
            rows,
            num_classes,
            logits,
        })
    }
}

impl TransferSet {
    /// Opens the transfer set in `dir`, reading and validating its manifest.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::format(&path, format!("not a valid manifest: {e}")))?;
        manifest.validate(&path)?;
        Ok(TransferSet {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The folder holding the transfer set.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks that the transfer set was made for exactly these examples.
    pub fn check_dataset(&self, dataset: &Dataset) -> Result<()> {
        let found = dataset.fingerprint();
        if found != self.manifest.dataset_fingerprint || dataset.len() != self.manifest.num_examples
        {
            return Err(Error::format(
                self.dir.join(MANIFEST_FILE),
                format!(
                    "made for a dataset with fingerprint {} ({} examples), not for {} (fingerprint {found}, {} examples)",
                    self.manifest.dataset_fingerprint,
                    self.manifest.num_examples,
                    dataset.name(),
                    dataset.len()
                ),
            ));
        }
        if dataset.num_classes() != self.manifest.num_classes {
            return Err(Error::format(
                self.dir.join(MANIFEST_FILE),
                format!(
                    "has {} classes, dataset {} has {}",
                    self.manifest.num_classes,
                    dataset.name(),
                    dataset.num_classes()
                ),
            ));
        }
        Ok(())
    }

    /// Number of shards.
    pub fn num_shards(&self) -> usize {
        self.manifest.shards.len()
    }

    /// Reads shard `i`, verifying its checksum and its tensors.
    pub fn read_shard(&self, i: usize) -> Result<Shard> {
        let entry = self.manifest.shards.get(i).ok_or_else(|| {
            Error::invalid(
                "shard number",
                format!("{i}, the transfer set has {} shards", self.num_shards()),
            )
        })?;
        let path = self.dir.join(&entry.file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let found = sha256_hex(&bytes);
        if found != entry.sha256 {
            return Err(Error::Checksum {
                path,
                expected: entry.sha256.clone(),
                found,
            });
        }
        Shard::decode(
            &bytes,
            &path,
            entry.start..entry.end,
            &self.manifest.teachers,
            self.manifest.num_classes,
        )
    }

    /// Reads the shards one after the other (only one is in memory at a
    /// time unless the caller keeps them).
    pub fn shards(&self) -> impl Iterator<Item = Result<Shard>> + '_ {
        (0..self.num_shards()).map(|i| self.read_shard(i))
    }
}

fn tensor_bytes<'a>(
    tensors: &'a SafeTensors<'a>,
    path: &Path,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8]> {
    let t = tensors
        .tensor(name)
        .map_err(|_| Error::format(path, format!("tensor {name:?} is missing")))?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(Error::format(
            path,
            format!(
                "tensor {name:?} is {:?} {:?}, expected {dtype:?} {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.data())
}

#[cfg(test)]
mod tests {
    use super::super::TransferSetWriter;
    use super::*;

    fn logits(rows: usize, seed: f32) -> Vec<f32> {
        (0..rows * 3)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 4.0)
            .collect()
    }

    fn write_set(dir: &Path) -> (Vec<f32>, Vec<f32>) {
        let (a, b) = (logits(10, 0.0), logits(10, 1.0));
        let mut w =
            TransferSetWriter::create(dir, "fp", 10, 3, vec!["t0".into(), "t1".into()]).unwrap();
        w.write_shard(&[&a[..12], &b[..12]]).unwrap();
        w.write_shard(&[&a[12..], &b[12..]]).unwrap();
        w.finish().unwrap();
        (a, b)
    }

    #[test]
    fn round_trip_streams_every_shard_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = write_set(dir.path());
        let set = TransferSet::open(dir.path()).unwrap();
        assert_eq!(set.num_shards(), 2);
        let shards: Vec<Shard> = set.shards().collect::<Result<_>>().unwrap();
        assert_eq!(
            (
                shards[0].start,
                shards[0].rows,
                shards[1].start,
                shards[1].rows
            ),
            (0, 4, 4, 6)
        );
        let a_back: Vec<f32> = shards.iter().flat_map(|s| s.logits[0].clone()).collect();
        let b_back: Vec<f32> = shards.iter().flat_map(|s| s.logits[1].clone()).collect();
        assert_eq!((a_back, b_back), (a, b));
    }

    #[test]
    fn same_logits_give_the_same_bytes() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_set(d1.path());
        write_set(d2.path());
        for f in [
            "shard-00000.safetensors",
            "shard-00001.safetensors",
            "manifest.json",
        ] {
            assert_eq!(
                std::fs::read(d1.path().join(f)).unwrap(),
                std::fs::read(d2.path().join(f)).unwrap()
            );
        }
    }

    #[test]
    fn corrupted_shard_fails_its_checksum_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let p = dir.path().join("shard-00001.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        let set = TransferSet::open(dir.path()).unwrap();
        assert!(set.read_shard(0).is_ok());
        let e = set.read_shard(1).unwrap_err();
        assert!(matches!(e, Error::Checksum { .. }));
        assert!(e.to_string().contains("shard-00001"), "{e}");
    }

    #[test]
    fn missing_shard_and_bad_manifest_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        std::fs::remove_file(dir.path().join("shard-00000.safetensors")).unwrap();
        let e = TransferSet::open(dir.path())
            .unwrap()
            .read_shard(0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shard-00000"), "{e}");

        let manifest = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(
            &manifest,
            text.replace("\"num_examples\": 10", "\"num_examples\": 11"),
        )
        .unwrap();
        let e = TransferSet::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("num_examples is 11"), "{e}");
        std::fs::write(&manifest, "{ not json").unwrap();
        let e = TransferSet::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("manifest.json") && e.contains("not a valid manifest"),
            "{e}"
        );
    }

    #[test]
    fn writer_rejects_misuse() {
        let dir = tempfile::tempdir().unwrap();
        let a = logits(4, 0.0);
        assert!(TransferSetWriter::create(dir.path(), "fp", 4, 3, vec!["bad id".into()]).is_err());
        assert!(TransferSetWriter::create(dir.path(), "fp", 4, 3, vec![]).is_err());
        let mut w = TransferSetWriter::create(dir.path(), "fp", 4, 3, vec!["t".into()]).unwrap();
        assert!(w.write_shard(&[&a[..5]]).is_err());
        assert!(w.write_shard(&[&a, &a]).is_err());
        w.write_shard(&a[..6].chunks(6).collect::<Vec<_>>())
            .unwrap();
        assert!(w.write_shard(&[&a]).is_err(), "past the end");
        let e = TransferSetWriter::finish(w).unwrap_err().to_string();
        assert!(e.contains("0..2 of 4"), "{e}");
        assert!(!dir.path().join(MANIFEST_FILE).exists());
    }

    #[test]
    fn existing_transfer_set_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path());
        let e = TransferSetWriter::create(dir.path(), "fp", 10, 3, vec!["t0".into()]).unwrap_err();
        assert!(e.to_string().contains("already holds"), "{e}");
    }

    #[test]
    fn a_shard_with_a_nan_or_infinite_logit_is_refused() {
        let teachers = ["t0".to_string()];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut z = logits(2, 0.5);
            z[4] = bad;
            let bytes = crate::transfer::encode_shard(10, 2, 3, &teachers, &[&z]).unwrap();
            let e = Shard::decode(&bytes, Path::new("s"), 10..12, &teachers, 3)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("example 11 class 1") && e.contains("finite"),
                "{e}"
            );
        }
    }
}
