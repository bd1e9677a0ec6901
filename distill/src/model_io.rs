//! Model files: safetensors with the architecture, input normalisation and
//! tensor layout in the metadata, so that a model can be loaded again by us
//! and by Python (`safetensors` + `numpy`, or PyTorch's `nn.Linear`).
//!
//! Metadata keys: `format` ([`MODEL_FORMAT`]), `architecture` (JSON of
//! [`Architecture`], tagged with its `family`), `input_normalization`,
//! `layout` (the family's tensors in words) and, for MLPs, `activation`.
//! An MLP's tensors are `layers.{i}.weight` F32 `[out, in]` and
//! `layers.{i}.bias` F32 `[out]`, input side first.
//!
//! Files of the first format, `distill-mlp/1`, are still read: their
//! `architecture` is a bare [`MlpSpec`] and their tensors are the same.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::atomic_file::write_atomic;
use common::dataset::Normalization;

use crate::model::{Architecture, Mlp, MlpSpec, Model};
use crate::{Error, Result};

/// The `format` metadata value of model files this code writes.
pub const MODEL_FORMAT: &str = "distill-model/2";
/// The format before model families: MLPs only, a bare [`MlpSpec`].
const MLP_FORMAT_V1: &str = "distill-mlp/1";
const MLP_LAYOUT: &str =
    "layers.{i}.weight is F32 [out, in] row-major, layers.{i}.bias is F32 [out]; \
    h = relu(x @ weight.T + bias) for every layer but the last, whose output are the logits";

/// A model with the facts needed to use it.
#[derive(Clone, Debug)]
pub struct SavedModel {
    /// The network.
    pub model: Model,
    /// How inputs must be normalised before they are fed to it.
    pub normalization: Normalization,
}

/// The bytes of a model file (deterministic for given weights).
pub fn to_bytes(model: &Model, normalization: Normalization) -> Result<Vec<u8>> {
    let (tensors, family_metadata) = match model {
        Model::Mlp(mlp) => (
            mlp_tensors(mlp)?,
            [("activation", "relu"), ("layout", MLP_LAYOUT)],
        ),
    };
    let mut metadata = HashMap::from([
        ("format".to_string(), MODEL_FORMAT.to_string()),
        (
            "architecture".to_string(),
            serde_json::to_string(&model.architecture()).expect("architecture serialises"),
        ),
        (
            "input_normalization".to_string(),
            serde_json::to_string(&normalization).expect("normalization serialises"),
        ),
    ]);
    metadata.extend(family_metadata.map(|(k, v)| (k.to_string(), v.to_string())));
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| Error::invalid("model", format!("cannot serialise: {e}")))?;
    Ok(common::safetensors_header::with_sorted_header(bytes))
}

fn mlp_tensors(mlp: &Mlp) -> Result<Vec<(String, Tensor)>> {
    mlp.named_parameters()
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().to_device(&Device::Cpu)?)))
        .collect()
}

/// The bytes of an MLP's model file.
pub fn mlp_to_bytes(mlp: &Mlp, normalization: Normalization) -> Result<Vec<u8>> {
    to_bytes(&Model::Mlp(mlp.clone()), normalization)
}

/// Writes `model` to `path` atomically.
pub fn save(model: &Model, normalization: Normalization, path: &Path) -> Result<()> {
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
    let architecture = get("architecture")?;
    let architecture = match get("format")?.as_str() {
        MODEL_FORMAT => serde_json::from_str(architecture),
        MLP_FORMAT_V1 => serde_json::from_str::<MlpSpec>(architecture).map(Architecture::Mlp),
        other => {
            return Err(bad(format!(
                "format {other:?} is neither {MODEL_FORMAT:?} nor {MLP_FORMAT_V1:?}"
            )))
        }
    }
    .map_err(|e| bad(format!("architecture metadata: {e}")))?;
    let normalization: Normalization = serde_json::from_str(get("input_normalization")?)
        .map_err(|e| bad(format!("input_normalization metadata: {e}")))?;
    check_finite(bytes).map_err(bad)?;
    let vb = VarBuilder::from_slice_safetensors(bytes, DType::F32, device)?;
    let model = match architecture {
        Architecture::Mlp(spec) => {
            Model::Mlp(Mlp::load(spec, &vb).map_err(|e| bad(e.to_string()))?)
        }
    };
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

    fn mlp(input: usize, hidden: Vec<usize>, classes: usize) -> Mlp {
        let spec = MlpSpec::new(input, hidden, classes).unwrap();
        Mlp::new_random(spec, &mut seed::rng(2, Stream::Init), &Device::Cpu).unwrap()
    }

    fn loaded_mlp(saved: SavedModel) -> Mlp {
        let Model::Mlp(mlp) = saved.model;
        mlp
    }

    fn outputs(m: &Mlp) -> Vec<Vec<f32>> {
        let x = Tensor::ones((2, m.spec().input_dim), DType::F32, &Device::Cpu).unwrap();
        m.forward(&x).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn round_trips_weights_and_metadata() {
        let m = mlp(5, vec![4, 3], 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save(&Model::Mlp(m.clone()), Normalization::DivideBy255, &path).unwrap();
        let back = load(&path, &Device::Cpu).unwrap();
        assert_eq!(back.normalization, Normalization::DivideBy255);
        assert_eq!(
            back.model.architecture(),
            Model::Mlp(m.clone()).architecture()
        );
        let back = loaded_mlp(back);
        assert_eq!(outputs(&m), outputs(&back));
        assert_eq!(
            mlp_to_bytes(&m, Normalization::DivideBy255).unwrap(),
            std::fs::read(&path).unwrap()
        );
    }

    /// A file of `format` holding `m`'s tensors under `architecture`.
    fn file_with(format: &str, architecture: &str, m: &Mlp) -> Vec<u8> {
        let metadata = HashMap::from([
            ("format".to_string(), format.to_string()),
            ("architecture".to_string(), architecture.to_string()),
            (
                "input_normalization".to_string(),
                "\"identity\"".to_string(),
            ),
        ]);
        let tensors = mlp_tensors(m).unwrap();
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .unwrap()
    }

    /// A file as the first format wrote it: same tensors, `distill-mlp/1`
    /// and a bare spec.
    fn v1_file(m: &Mlp) -> Vec<u8> {
        file_with(MLP_FORMAT_V1, &serde_json::to_string(m.spec()).unwrap(), m)
    }

    #[test]
    fn files_of_the_first_format_are_still_read() {
        let m = mlp(3, vec![4], 2);
        let back = from_bytes(&v1_file(&m), Path::new("old"), &Device::Cpu).unwrap();
        assert_eq!(back.normalization, Normalization::Identity);
        assert_eq!(outputs(&m), outputs(&loaded_mlp(back)));
    }

    #[test]
    fn a_tensor_of_the_wrong_shape_or_a_missing_one_is_named() {
        let m = mlp(3, vec![4], 2);
        let wider = r#"{"family":"mlp","input_dim":3,"hidden":[5],"num_classes":2}"#;
        let e = from_bytes(
            &file_with(MODEL_FORMAT, wider, &m),
            Path::new("m.st"),
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("layers.0.weight") && e.contains("m.st"), "{e}");
        let deeper = r#"{"family":"mlp","input_dim":3,"hidden":[4,4],"num_classes":2}"#;
        let e = from_bytes(
            &file_with(MODEL_FORMAT, deeper, &m),
            Path::new("m.st"),
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("layers.1.weight"), "{e}");
        let unknown = r#"{"family":"cnn","input_dim":3}"#;
        let e = from_bytes(
            &file_with(MODEL_FORMAT, unknown, &m),
            Path::new("m.st"),
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("architecture") && e.contains("cnn"), "{e}");
    }

    #[test]
    fn garbage_and_foreign_files_are_rejected_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"not a model").unwrap();
        let e = load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("junk.safetensors"), "{e}");
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let bytes = safetensors::serialize([("x", &t)], None).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let e = load(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn an_unknown_format_is_refused() {
        let m = mlp(3, vec![4], 2);
        let bytes = file_with(
            "distill-mlp/9",
            &serde_json::to_string(m.spec()).unwrap(),
            &m,
        );
        let e = from_bytes(&bytes, Path::new("m"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("distill-mlp/9"), "{e}");
    }

    #[test]
    fn a_model_with_a_nan_weight_is_refused() {
        let m = mlp(3, vec![2], 2);
        let w = &m.layers()[1].bias;
        w.set(&Tensor::new(&[0.0f32, f32::NAN], &Device::Cpu).unwrap())
            .unwrap();
        let bytes = mlp_to_bytes(&m, Normalization::Identity).unwrap();
        let e = from_bytes(&bytes, Path::new("m"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers.1.bias") && e.contains("finite"), "{e}");
    }
}
