//! Model files: safetensors with the architecture, input normalisation and
//! tensor layout in the metadata, so that a model can be loaded again by us
//! and by Python (`safetensors` + `numpy`, or PyTorch's `nn.Linear`).
//!
//! Tensors: `layers.{i}.weight` F32 `[out, in]` and `layers.{i}.bias` F32
//! `[out]`, input side first. Metadata keys: `format`, `architecture` (JSON
//! of [`MlpSpec`]), `activation`, `input_normalization`, `layout`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use common::atomic_file::write_atomic;
use common::dataset::Normalization;

use crate::model::{Dense, Mlp, MlpSpec};
use crate::{Error, Result};

/// The `format` metadata value of model files this code writes.
pub const MODEL_FORMAT: &str = "distill-mlp/1";
const LAYOUT: &str = "layers.{i}.weight is F32 [out, in] row-major, layers.{i}.bias is F32 [out]; \
    h = relu(x @ weight.T + bias) for every layer but the last, whose output are the logits";

/// A model with the facts needed to use it.
#[derive(Clone, Debug)]
pub struct SavedModel {
    /// The network.
    pub model: Mlp,
    /// How inputs must be normalised before they are fed to it.
    pub normalization: Normalization,
}

/// The bytes of a model file (deterministic for given weights).
pub fn to_bytes(model: &Mlp, normalization: Normalization) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, layer) in model.layers().iter().enumerate() {
        tensors.push((
            format!("layers.{i}.weight"),
            layer.weight.as_tensor().to_device(&Device::Cpu)?,
        ));
        tensors.push((
            format!("layers.{i}.bias"),
            layer.bias.as_tensor().to_device(&Device::Cpu)?,
        ));
    }
    let metadata = HashMap::from([
        ("format".to_string(), MODEL_FORMAT.to_string()),
        (
            "architecture".to_string(),
            serde_json::to_string(model.spec()).expect("spec serialises"),
        ),
        ("activation".to_string(), "relu".to_string()),
        (
            "input_normalization".to_string(),
            serde_json::to_string(&normalization).expect("normalization serialises"),
        ),
        ("layout".to_string(), LAYOUT.to_string()),
    ]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| Error::invalid("model", format!("cannot serialise: {e}")))?;
    Ok(common::safetensors_header::with_sorted_header(bytes))
}

/// Writes `model` to `path` atomically.
pub fn save(model: &Mlp, normalization: Normalization, path: &Path) -> Result<()> {
    write_atomic(path, &to_bytes(model, normalization)?)?;
    Ok(())
}

/// Loads a model file written by [`save`] onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<SavedModel> {
    let bytes = std::fs::read(path).map_err(|e| common::Error::io(path, e))?;
    from_bytes(&bytes, path, device)
}

/// Parses the bytes of a model file; `path` names it in messages.
pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<SavedModel> {
    let bad = |reason: String| Error::Common(common::Error::format(path, reason));
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| bad(format!("metadata key {key:?} is missing")))
    };
    if get("format")? != MODEL_FORMAT {
        return Err(bad(format!(
            "format {:?} is not {MODEL_FORMAT:?}",
            get("format")?
        )));
    }
    let spec: MlpSpec = serde_json::from_str(get("architecture")?)
        .map_err(|e| bad(format!("architecture metadata: {e}")))?;
    let normalization: Normalization = serde_json::from_str(get("input_normalization")?)
        .map_err(|e| bad(format!("input_normalization metadata: {e}")))?;
    check_finite(bytes).map_err(bad)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
    let take = |name: String| {
        tensors
            .get(&name)
            .ok_or_else(|| bad(format!("tensor {name:?} is missing")))
            .and_then(|t| Ok(Var::from_tensor(t)?))
    };
    let layers = (0..spec.layer_dims().len())
        .map(|i| {
            Ok(Dense {
                weight: take(format!("layers.{i}.weight"))?,
                bias: take(format!("layers.{i}.bias"))?,
            })
        })
        .collect::<Result<_>>()?;
    let model = Mlp::from_layers(spec, layers).map_err(|e| bad(e.to_string()))?;
    Ok(SavedModel {
        model,
        normalization,
    })
}

/// Refuses a file with a NaN or infinite F32 value (a diverged model).
fn check_finite(bytes: &[u8]) -> std::result::Result<(), String> {
    let tensors = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    for (name, view) in tensors.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let bad = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .find(|v| !v.is_finite());
        if let Some(v) = bad {
            return Err(format!("tensor {name:?} holds {v}: weights must be finite"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::seed::{self, Stream};

    #[test]
    fn round_trips_weights_and_metadata() {
        let dev = Device::Cpu;
        let spec = MlpSpec::new(5, vec![4, 3], 2).unwrap();
        let m = Mlp::new_random(spec.clone(), &mut seed::rng(2, Stream::Init), &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save(&m, Normalization::DivideBy255, &path).unwrap();
        let back = load(&path, &dev).unwrap();
        assert_eq!(back.model.spec(), &spec);
        assert_eq!(back.normalization, Normalization::DivideBy255);
        let x = Tensor::ones((2, 5), candle_core::DType::F32, &dev).unwrap();
        let a = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let b = back.model.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        assert_eq!(
            to_bytes(&m, Normalization::DivideBy255).unwrap(),
            std::fs::read(&path).unwrap()
        );
    }

    #[test]
    fn garbage_and_foreign_files_are_rejected_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"not a model").unwrap();
        let e = load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("junk.safetensors"), "{e}");
        let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let bytes = safetensors::serialize([("x", &t)], None).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let e = load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("format") && e.contains("missing"), "{e}");
    }

    #[test]
    fn a_model_with_a_nan_weight_is_refused() {
        let spec = MlpSpec::new(3, vec![2], 2).unwrap();
        let m = Mlp::new_random(spec, &mut seed::rng(2, Stream::Init), &Device::Cpu).unwrap();
        let w = &m.layers()[1].bias;
        w.set(&Tensor::new(&[0.0f32, f32::NAN], &Device::Cpu).unwrap())
            .unwrap();
        let bytes = to_bytes(&m, Normalization::Identity).unwrap();
        let e = from_bytes(&bytes, Path::new("m"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers.1.bias") && e.contains("finite"), "{e}");
    }
}
