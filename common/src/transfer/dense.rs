//! The `dense-f32` encoding: a safetensors file holding the example index
//! (`"example_index"`: I64 `[rows]`) and every teacher's raw logits
//! (`"logits.<teacher id>"`: F32 `[rows, classes]`, row-major).
//!
//! A new encoding is a module like this one (encode and decode) and a
//! variant of [`super::Encoding`].

use std::ops::Range;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{logits_tensor_name, ShardLogits, INDEX_TENSOR};
use crate::{Error, Result};

/// The bytes of one shard holding `block`. Deterministic: the same logits
/// give the same bytes.
pub(super) fn encode(block: &ShardLogits<'_>) -> Result<Vec<u8>> {
    let &ShardLogits {
        start,
        rows,
        classes,
        teachers,
        logits,
    } = block;
    let index_bytes: Vec<u8> = (start..start + rows)
        .flat_map(|i| (i as i64).to_le_bytes())
        .collect();
    let logit_bytes: Vec<Vec<u8>> = logits
        .iter()
        .map(|l| l.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let view = |dtype, shape, data| {
        TensorView::new(dtype, shape, data)
            .map_err(|e| Error::invalid("shard tensor", e.to_string()))
    };
    let mut tensors = vec![(
        INDEX_TENSOR.to_string(),
        view(Dtype::I64, vec![rows], &index_bytes)?,
    )];
    for (t, bytes) in teachers.iter().zip(&logit_bytes) {
        tensors.push((
            logits_tensor_name(t),
            view(Dtype::F32, vec![rows, classes], bytes)?,
        ));
    }
    safetensors::serialize(tensors, None).map_err(|e| Error::invalid("shard", e.to_string()))
}

/// Every teacher's logits (in `teachers`' order) from the bytes of a shard
/// that should hold them over `num_classes` classes for the examples in
/// `range`; `path` names it in errors. Checks every tensor's dtype and
/// shape, that the example index holds exactly `range`, and that every
/// logit is finite.
pub(super) fn decode(
    bytes: &[u8],
    path: &Path,
    range: Range<usize>,
    teachers: &[String],
    num_classes: usize,
) -> Result<Vec<Vec<f32>>> {
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
    teachers
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
        .collect()
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
