//! Teacher inference into a transfer set: every teacher's logits for every
//! transfer example, written shard by shard (writing overlaps computing).

use std::path::Path;

use candle_core::Device;
use common::dataset::{chunk_ranges, Dataset};
use common::transfer::{Encoding, Manifest, ManifestBuilder, TransferSetWriter};

use crate::eval::{Logits, Predictor};
use crate::model::Mlp;
use crate::Result;

/// Runs each `(id, model)` teacher over `data` and writes their logits to a
/// new transfer set in `dir`, `rows_per_shard` examples per shard.
pub fn write_transfer_set(
    teachers: &[(&str, &Mlp)],
    data: &Dataset,
    dir: &Path,
    rows_per_shard: usize,
    device: &Device,
) -> Result<Manifest> {
    for (id, t) in teachers {
        t.spec().ensure_fits(id, data)?;
    }
    let ids: Vec<String> = teachers.iter().map(|(id, _)| id.to_string()).collect();
    let predictors = teachers
        .iter()
        .map(|(_, t)| Predictor::new(t, device))
        .collect::<Result<Vec<_>>>()?;
    // The writer thread encodes, checksums and writes shard k while the
    // teachers compute shard k + 1, so the disk never shows in the time.
    let (send, receive) = std::sync::mpsc::sync_channel::<Vec<Vec<f32>>>(1);
    std::thread::scope(|scope| {
        let writing = scope.spawn(move || -> Result<Manifest> {
            // Hashing the dataset for the manifest overlaps the first shard.
            let fingerprint = data.fingerprint();
            let manifest = ManifestBuilder::new(
                &fingerprint,
                data.len(),
                data.num_classes(),
                ids,
                Encoding::DenseF32,
                0,
            );
            let mut writer = TransferSetWriter::create(dir, manifest)?;
            for logits in receive {
                let views: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
                writer.write_shard(&views)?;
            }
            Ok(writer.finish()?)
        });
        let computed = (|| -> Result<()> {
            for range in chunk_ranges(data.len(), rows_per_shard)? {
                let logits = predictors
                    .iter()
                    .map(|p| p.logits_of(data, range.clone()))
                    .collect::<Result<Vec<_>>>()?;
                if send.send(logits).is_err() {
                    // The writer stopped on an error; it reports it below.
                    break;
                }
            }
            Ok(())
        })();
        drop(send);
        let written = writing.join().expect("the shard writer panicked");
        // A compute error comes first: the writer then only saw fewer shards.
        computed?;
        written
    })
}
