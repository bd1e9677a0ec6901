//! One safetensors file holding a job's train, validation and test splits:
//! what the coordinator serves to workers, so that a worker needs nothing but
//! the coordinator's address.
//!
//! Tensors `<split>.features` (`[len, dim]`) and `<split>.labels` (U32
//! `[len]`) for `train`, `validation` and `test`. Features of a dataset
//! normalised by [`Normalization::DivideBy255`] are stored as the original U8
//! pixels (4x smaller, decoded to exactly the same f32 values); others as
//! F32. The header's metadata holds the names, the class count, the image
//! shape and the normalisation. The same splits give the same bytes.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::{Dataset, Normalization, Splits};
use crate::{Error, Result};

/// Value of the `format` metadata key of a bundle.
pub const BUNDLE_FORMAT: &str = "distill-dataset/1";
const SPLITS: [&str; 3] = ["train", "validation", "test"];

/// Encodes the three splits (which must agree on dimension, classes, image
/// shape and normalisation) as one safetensors file.
pub fn encode_splits(splits: &Splits) -> Result<Vec<u8>> {
    let parts = [&splits.train, &splits.validation, &splits.test];
    let first = parts[0];
    for d in &parts[1..] {
        if d.dim != first.dim
            || d.num_classes != first.num_classes
            || d.image_shape != first.image_shape
            || d.normalization != first.normalization
        {
            return Err(Error::invalid(
                "dataset splits",
                format!(
                    "{} and {} differ in shape or normalisation",
                    first.name, d.name
                ),
            ));
        }
    }
    let pixels = first.normalization == Normalization::DivideBy255
        && parts
            .iter()
            .all(|d| d.features.iter().all(|&x| to_pixel(x).is_some()));
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut metadata = HashMap::new();
    for (split, d) in SPLITS.iter().zip(parts) {
        let features = if pixels {
            d.features
                .iter()
                .map(|&x| to_pixel(x).expect("checked"))
                .collect()
        } else {
            d.features.iter().flat_map(|x| x.to_le_bytes()).collect()
        };
        let dtype = if pixels { Dtype::U8 } else { Dtype::F32 };
        buffers.push((
            format!("{split}.features"),
            dtype,
            vec![d.len(), d.dim],
            features,
        ));
        let labels = d.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        buffers.push((format!("{split}.labels"), Dtype::U32, vec![d.len()], labels));
        metadata.insert(format!("{split}.name"), d.name.clone());
    }
    metadata.insert("format".into(), BUNDLE_FORMAT.into());
    metadata.insert("num_classes".into(), first.num_classes.to_string());
    metadata.insert(
        "image_shape".into(),
        first
            .image_shape
            .map_or(String::new(), |(h, w)| format!("{h}x{w}")),
    );
    metadata.insert(
        "normalization".into(),
        serde_json::to_string(&first.normalization).expect("serialises"),
    );
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::invalid("dataset bundle", e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata))
        .map(crate::safetensors_header::with_sorted_header)
        .map_err(|e| Error::invalid("dataset bundle", e.to_string()))
}

/// Decodes a bundle written by [`encode_splits`]; `path` names it in errors.
pub fn decode_splits(bytes: &[u8], path: &Path) -> Result<Splits> {
    let bad = |reason: String| Error::format(path, reason);
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| {
        meta.get(key)
            .cloned()
            .ok_or_else(|| bad(format!("metadata key {key:?} is missing")))
    };
    if get("format")? != BUNDLE_FORMAT {
        return Err(bad(format!("not a dataset bundle ({BUNDLE_FORMAT})")));
    }
    let num_classes: usize = get("num_classes")?
        .parse()
        .map_err(|_| bad("num_classes is not a number".into()))?;
    let image_shape = match get("image_shape")?.as_str() {
        "" => None,
        s => {
            let (h, w) = s
                .split_once('x')
                .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)))
                .ok_or_else(|| bad(format!("image_shape {s:?} is not HxW")))?;
            Some((h, w))
        }
    };
    let normalization: Normalization = serde_json::from_str(&get("normalization")?)
        .map_err(|e| bad(format!("normalization: {e}")))?;
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::with_capacity(3);
    for split in SPLITS {
        let f = tensors
            .tensor(&format!("{split}.features"))
            .map_err(|_| bad(format!("tensor {split}.features is missing")))?;
        let l = tensors
            .tensor(&format!("{split}.labels"))
            .map_err(|_| bad(format!("tensor {split}.labels is missing")))?;
        let (&[len, dim], &[labels_len]) = (f.shape(), l.shape()) else {
            return Err(bad(format!("{split}: features must be 2-D and labels 1-D")));
        };
        if labels_len != len || l.dtype() != Dtype::U32 {
            return Err(bad(format!("{split}.labels must be U32 [{len}]")));
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
                    "{split}.features has dtype {other:?}, expected U8 or F32"
                )))
            }
        };
        let labels = l
            .data()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let d = Dataset::new(
            get(&format!("{split}.name"))?,
            features,
            labels,
            dim,
            num_classes,
            image_shape,
            normalization,
        )
        .map_err(|e| bad(e.to_string()))?;
        out.push(d);
    }
    let test = out.pop().expect("three splits");
    let validation = out.pop().expect("three splits");
    let train = out.pop().expect("three splits");
    Ok(Splits {
        train,
        validation,
        test,
    })
}

/// The 8-bit pixel whose `/ 255` is exactly `x`, if there is one.
fn to_pixel(x: f32) -> Option<u8> {
    let p = (x * 255.0).round();
    ((0.0..=255.0).contains(&p) && f32::from(p as u8) / 255.0 == x).then_some(p as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic::SyntheticSpec;

    fn small_splits(normalization: Normalization) -> Splits {
        let features: Vec<f32> = (0..40).map(|i| f32::from(i as u8 * 6) / 255.0).collect();
        let d = Dataset::new(
            "px",
            features,
            (0..10).map(|i| i % 3).collect(),
            4,
            3,
            Some((2, 2)),
            normalization,
        )
        .unwrap();
        Splits::new(&d, d.slice(0..3).unwrap(), 2, 7).unwrap()
    }

    #[test]
    fn pixel_data_round_trips_exactly_as_u8() {
        let splits = small_splits(Normalization::DivideBy255);
        let bytes = encode_splits(&splits).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.tensors()["train.features"].dtype, Dtype::U8);
        let back = decode_splits(&bytes, Path::new("b")).unwrap();
        assert_eq!(back.train, splits.train);
        assert_eq!(back.validation, splits.validation);
        assert_eq!(back.test, splits.test);
        assert_eq!(encode_splits(&back).unwrap(), bytes, "deterministic bytes");
    }

    #[test]
    fn real_valued_data_round_trips_as_f32() {
        let spec = SyntheticSpec {
            train_size: 60,
            test_size: 20,
            ..SyntheticSpec::default()
        };
        let (train, test) = spec.generate().unwrap();
        let splits = Splits::new(&train, test, 10, 1).unwrap();
        let back = decode_splits(&encode_splits(&splits).unwrap(), Path::new("b")).unwrap();
        assert_eq!(back.train, splits.train);
        assert_eq!(back.test.fingerprint(), splits.test.fingerprint());
    }

    #[test]
    fn garbage_and_foreign_files_are_refused_with_the_path() {
        let err = decode_splits(b"not a bundle", Path::new("cache/x")).unwrap_err();
        assert!(err.to_string().contains("cache/x"), "{err}");
        let other = safetensors::serialize(
            [("a", TensorView::new(Dtype::U8, vec![1], &[0u8]).unwrap())],
            None,
        )
        .unwrap();
        let err = decode_splits(&other, Path::new("y")).unwrap_err();
        assert!(err.to_string().contains("format"), "{err}");
    }
}
