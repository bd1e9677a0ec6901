//! Training checkpoints: everything a training run needs to go on from the
//! end of an epoch exactly as if it had never stopped. On CPU, a run
//! resumed from a checkpoint ends with the same bits as an uninterrupted
//! run with the same seed and thread count.
//!
//! A checkpoint holds the parameters and the optimizer's momentum buffers,
//! the positions of the three random streams that training draws from
//! (shuffling, dropout, jitter), the step counter (which sets the learning
//! rate), the epochs' history and, when the best validation epoch is kept,
//! that epoch's weights.
//!
//! The file is safetensors (tensors `param.{i}`, `velocity.{i}`, `best.{i}`
//! in the order of [`crate::model::Mlp::vars`]; the rest as JSON in the
//! metadata), so it can be inspected from Python like a model.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::seed::ChaCha8Rng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::{Architecture, MlpSpec};
use crate::train::EpochStats;
use crate::{Error, Result};

/// The `format` metadata value of checkpoints this code writes.
pub const CHECKPOINT_FORMAT: &str = "distill-checkpoint/2";
/// The format before model families, whose metadata holds a bare
/// [`MlpSpec`] under `spec`; still read.
const CHECKPOINT_FORMAT_V1: &str = "distill-checkpoint/1";

/// Where a random stream is: enough to continue it exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngPosition {
    /// The 32-byte ChaCha key, hex.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// Words of the key stream used so far (a u128, as a decimal string).
    pub word_pos: String,
}

impl RngPosition {
    /// Where `rng` is.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        RngPosition {
            seed: hex::encode(rng.get_seed()),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// A generator at this position.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        let bad = |what: &str| Error::invalid("checkpoint", format!("bad random state: {what}"));
        let seed: [u8; 32] = hex::decode(&self.seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("seed"))?;
        let word_pos: u128 = self.word_pos.parse().map_err(|_| bad("word_pos"))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// The random streams of a training run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngPositions {
    /// Example order.
    pub shuffle: RngPosition,
    /// Dropout masks.
    pub dropout: RngPosition,
    /// Image translations.
    pub jitter: RngPosition,
}

/// A training run stopped after an epoch.
#[derive(Clone, Debug)]
pub struct TrainCheckpoint {
    /// The model's architecture (checked on resume).
    pub architecture: Architecture,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimisation steps taken.
    pub step: usize,
    /// Parameters, in the order of [`crate::model::Mlp::vars`].
    pub params: Vec<Tensor>,
    /// The optimizer's momentum buffers, in the same order.
    pub velocity: Vec<Tensor>,
    /// The random streams.
    pub rngs: RngPositions,
    /// One entry per completed epoch.
    pub history: Vec<EpochStats>,
    /// The best validation epoch so far and its parameters, when training
    /// keeps the best epoch.
    pub best: Option<(usize, Vec<Tensor>)>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    /// Since format 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    architecture: Option<Architecture>,
    /// Format 1's architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<MlpSpec>,
    epochs_done: usize,
    step: usize,
    rngs: RngPositions,
    history: Vec<EpochStats>,
    best_epoch: Option<usize>,
    tensors: usize,
}

impl TrainCheckpoint {
    /// The checkpoint as safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta = Meta {
            format: CHECKPOINT_FORMAT.into(),
            architecture: Some(self.architecture.clone()),
            spec: None,
            epochs_done: self.epochs_done,
            step: self.step,
            rngs: self.rngs.clone(),
            history: self.history.clone(),
            best_epoch: self.best.as_ref().map(|(e, _)| *e),
            tensors: self.params.len(),
        };
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let groups = [
            ("param", Some(&self.params)),
            ("velocity", Some(&self.velocity)),
            ("best", self.best.as_ref().map(|(_, t)| t)),
        ];
        for (prefix, group) in groups {
            for (i, t) in group.into_iter().flatten().enumerate() {
                tensors.push((format!("{prefix}.{i}"), t.to_device(&Device::Cpu)?));
            }
        }
        let metadata = HashMap::from([(
            "checkpoint".to_string(),
            serde_json::to_string(&meta).expect("checkpoint metadata serialises"),
        )]);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| Error::invalid("checkpoint", format!("cannot serialise: {e}")))?;
        Ok(common::safetensors_header::with_sorted_header(bytes))
    }

    /// Parses checkpoint bytes onto `device`; every tensor's shape is
    /// checked against the architecture.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let bad = |reason: String| Error::invalid("checkpoint", reason);
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("checkpoint"))
            .ok_or_else(|| bad("no checkpoint metadata".into()))?;
        let meta: Meta =
            serde_json::from_str(meta).map_err(|e| bad(format!("bad metadata: {e}")))?;
        let architecture = match (meta.format.as_str(), meta.architecture, meta.spec) {
            (CHECKPOINT_FORMAT, Some(architecture), None) => architecture,
            (CHECKPOINT_FORMAT_V1, None, Some(spec)) => Architecture::Mlp(spec),
            (CHECKPOINT_FORMAT | CHECKPOINT_FORMAT_V1, _, _) => {
                return Err(bad("inconsistent metadata".into()))
            }
            (other, _, _) => {
                return Err(bad(format!(
                    "format {other:?}, this version reads {CHECKPOINT_FORMAT:?} and {CHECKPOINT_FORMAT_V1:?}"
                )))
            }
        };
        let shapes = architecture.parameter_shapes();
        if meta.tensors != shapes.len() || meta.history.len() != meta.epochs_done {
            return Err(bad("inconsistent metadata".into()));
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
        let group = |prefix: &str| -> Result<Vec<Tensor>> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, shape)| {
                    let name = format!("{prefix}.{i}");
                    let t = tensors
                        .get(&name)
                        .ok_or_else(|| bad(format!("{name} is missing")))?;
                    if t.dims() != shape.as_slice() || t.dtype() != candle_core::DType::F32 {
                        return Err(bad(format!(
                            "{name} is {:?} {:?}, the architecture needs F32 {shape:?}",
                            t.dtype(),
                            t.dims()
                        )));
                    }
                    Ok(t.clone())
                })
                .collect()
        };
        let best = match meta.best_epoch {
            Some(epoch) => Some((epoch, group("best")?)),
            None => None,
        };
        Ok(TrainCheckpoint {
            params: group("param")?,
            velocity: group("velocity")?,
            architecture,
            epochs_done: meta.epochs_done,
            step: meta.step,
            rngs: meta.rngs,
            history: meta.history,
            best,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn a_restored_random_stream_continues_where_it_stopped() {
        let mut rng = common::seed::rng(7, common::seed::Stream::Shuffle);
        let _: Vec<u32> = (0..13).map(|_| rng.random()).collect();
        let position = RngPosition::of(&rng);
        let expected: Vec<u64> = (0..20).map(|_| rng.random()).collect();
        let mut restored = position.restore().unwrap();
        let got: Vec<u64> = (0..20).map(|_| restored.random()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_checkpoint_round_trips_and_bad_bytes_are_refused() {
        let spec = MlpSpec::new(3, vec![4], 2).unwrap();
        let architecture = Architecture::Mlp(spec.clone());
        let shapes = architecture.parameter_shapes();
        let tensors = |offset: f32| -> Vec<Tensor> {
            shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    let v: Vec<f32> = (0..n).map(|i| i as f32 + offset).collect();
                    Tensor::from_vec(v, s.as_slice(), &Device::Cpu).unwrap()
                })
                .collect()
        };
        let rng = common::seed::rng(1, common::seed::Stream::Dropout);
        let checkpoint = TrainCheckpoint {
            architecture,
            epochs_done: 0,
            step: 17,
            params: tensors(0.5),
            velocity: tensors(-1.0),
            rngs: RngPositions {
                shuffle: RngPosition::of(&rng),
                dropout: RngPosition::of(&rng),
                jitter: RngPosition::of(&rng),
            },
            history: Vec::new(),
            best: Some((3, tensors(9.0))),
        };
        let bytes = checkpoint.to_bytes().unwrap();
        assert_eq!(bytes, checkpoint.to_bytes().unwrap(), "deterministic");
        let back = TrainCheckpoint::from_bytes(&bytes, &Device::Cpu).unwrap();
        assert_eq!(back.step, 17);
        assert_eq!(back.best.as_ref().unwrap().0, 3);
        for (a, b) in back.velocity.iter().zip(&checkpoint.velocity) {
            assert_eq!(a.to_vec1::<f32>().ok(), b.to_vec1::<f32>().ok());
            assert_eq!(a.dims(), b.dims());
        }
        assert_eq!(
            back.params[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            checkpoint.params[0]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let err = TrainCheckpoint::from_bytes(b"garbage", &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("not a safetensors file"), "{err}");
        let model = crate::model::Mlp::new_random(
            spec,
            &mut common::seed::rng(1, common::seed::Stream::Init),
            &Device::Cpu,
        )
        .unwrap();
        let model_file =
            crate::model_io::mlp_to_bytes(&model, common::dataset::Normalization::Identity)
                .unwrap();
        let err = TrainCheckpoint::from_bytes(&model_file, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("no checkpoint metadata"), "{err}");
    }
}
