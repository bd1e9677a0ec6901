//! Reading a transfer set shard by shard, verifying every checksum.

use std::path::{Path, PathBuf};

use super::dense;
use super::manifest::{Encoding, Manifest, MANIFEST_FILE};
use super::targets::{soft_targets, EnsembleCombine};
use crate::checksum::sha256_hex;
use crate::dataset::examples::Examples;
use crate::{Error, Result};

/// A complete transfer set on disk, opened through its manifest.
#[derive(Clone, Debug)]
pub struct TransferSet {
    dir: PathBuf,
    manifest: Manifest,
}

/// One shard in memory: every teacher's outputs for examples
/// `start..start + rows`, decoded from its encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    start: usize,
    rows: usize,
    num_classes: usize,
    /// Per teacher (manifest order), `rows * num_classes` logits, row-major.
    logits: Vec<Vec<f32>>,
}

impl Shard {
    /// Index of the first example.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Number of examples.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Number of teachers.
    pub fn num_teachers(&self) -> usize {
        self.logits.len()
    }

    /// Teacher `k`'s logits (manifest order), `rows * num_classes` values,
    /// row-major.
    pub fn logits(&self, k: usize) -> &[f32] {
        &self.logits[k]
    }

    /// The soft targets of the ensemble of every teacher at `temperature`.
    pub fn soft_targets(&self, temperature: f64, combine: EnsembleCombine) -> Result<Vec<f32>> {
        let all: Vec<usize> = (0..self.logits.len()).collect();
        self.soft_targets_of(&all, temperature, combine)
    }

    /// The soft targets of the ensemble of teachers `members` (manifest
    /// order) at `temperature`.
    pub fn soft_targets_of(
        &self,
        members: &[usize],
        temperature: f64,
        combine: EnsembleCombine,
    ) -> Result<Vec<f32>> {
        let logits: Vec<&[f32]> = members.iter().map(|&k| self.logits[k].as_slice()).collect();
        soft_targets(&logits, self.num_classes, temperature, combine)
    }

    /// Decodes the bytes of a shard file stored as `encoding` that should
    /// hold the outputs of `teachers` over `num_classes` classes for the
    /// examples in `range`; `path` names it in errors.
    pub fn decode(
        bytes: &[u8],
        path: &Path,
        encoding: Encoding,
        range: std::ops::Range<usize>,
        teachers: &[String],
        num_classes: usize,
    ) -> Result<Shard> {
        let logits = match encoding {
            Encoding::DenseF32 => dense::decode(bytes, path, range.clone(), teachers, num_classes)?,
        };
        Ok(Shard {
            start: range.start,
            rows: range.len(),
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
    pub fn check_dataset(&self, dataset: &dyn Examples) -> Result<()> {
        let found = dataset.fingerprint()?;
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
            self.manifest.encoding,
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

#[cfg(test)]
mod tests {
    use super::super::TransferSetWriter;
    use super::*;

    /// A dense transfer set of `teachers` over 3 classes for `examples`
    /// examples.
    fn head(examples: usize, teachers: Vec<String>) -> crate::transfer::ManifestBuilder {
        crate::transfer::ManifestBuilder::new("fp", examples, 3, teachers, Encoding::DenseF32, 0)
    }

    fn logits(rows: usize, seed: f32) -> Vec<f32> {
        (0..rows * 3)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 4.0)
            .collect()
    }

    fn write_set(dir: &Path) -> (Vec<f32>, Vec<f32>) {
        let (a, b) = (logits(10, 0.0), logits(10, 1.0));
        let mut w =
            TransferSetWriter::create(dir, head(10, vec!["t0".into(), "t1".into()])).unwrap();
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
        let a_back: Vec<f32> = shards.iter().flat_map(|s| s.logits(0).to_vec()).collect();
        let b_back: Vec<f32> = shards.iter().flat_map(|s| s.logits(1).to_vec()).collect();
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
        assert!(TransferSetWriter::create(dir.path(), head(4, vec!["bad id".into()])).is_err());
        assert!(TransferSetWriter::create(dir.path(), head(4, vec![])).is_err());
        let mut w = TransferSetWriter::create(dir.path(), head(4, vec!["t".into()])).unwrap();
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
        let e = TransferSetWriter::create(dir.path(), head(10, vec!["t0".into()])).unwrap_err();
        assert!(e.to_string().contains("already holds"), "{e}");
    }

    #[test]
    fn a_shard_with_a_nan_or_infinite_logit_is_refused() {
        let teachers = ["t0".to_string()];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut z = logits(2, 0.5);
            z[4] = bad;
            let views = [z.as_slice()];
            let block = crate::transfer::ShardLogits::new(10, 3, &teachers, &views).unwrap();
            let bytes = crate::transfer::encode_shard(Encoding::DenseF32, &block).unwrap();
            let e = Shard::decode(
                &bytes,
                Path::new("s"),
                Encoding::DenseF32,
                10..12,
                &teachers,
                3,
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("example 11 class 1") && e.contains("finite"),
                "{e}"
            );
        }
    }
}
