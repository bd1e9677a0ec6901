//! The units of work of a cluster job, as the coordinator describes them to
//! workers, and how a worker runs one once it holds the inputs.
//!
//! A task is a pure function of its spec and inputs: the same spec, inputs,
//! seed and thread count give the same output bytes on CPU, whichever worker
//! runs it and however often it is retried. Times go into the summary,
//! never into the payload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use common::dataset::Splits;
use common::seed::{self, Stream};
use common::transfer::{encode_shard, soft_targets, EnsembleCombine, TransferSet};
use serde::{Deserialize, Serialize};

use crate::eval::{argmax_rows_host, evaluate, predict_logits, Evaluation};
use crate::hparams::{DistillConfig, TrainConfig};
use crate::model::{Mlp, MlpSpec};
use crate::train::{train_observed, StepProgress, Targets, TrainObserver, TrainReport};
use crate::{model_io, Error, Result};

/// Artifact name of the dataset bundle.
pub const DATASET_ARTIFACT: &str = "dataset";
/// Artifact name of the transfer set's manifest.
pub const TRANSFER_MANIFEST_ARTIFACT: &str = "transfer/manifest.json";

/// Artifact name of the model called `name`.
pub fn model_artifact(name: &str) -> String {
    format!("models/{name}")
}

/// Artifact name of transfer-set shard `index` (its file name in the folder).
pub fn shard_artifact(index: usize) -> String {
    format!("transfer/{}", common::transfer::shard_file_name(index))
}

/// One unit of work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskSpec {
    /// Train a model; the output is its model file.
    Train(TrainTask),
    /// Run the teachers over a range of the training split; the output is
    /// that transfer-set shard's file.
    Infer(InferTask),
    /// Evaluate models on the validation and test splits; the output is a
    /// JSON list of [`ModelEvaluation`].
    Evaluate(EvaluateTask),
}

/// Train one model on hard labels, or distil it from the transfer set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTask {
    /// The model's name (`teacher-0`, `student`, ...).
    pub model: String,
    /// Hidden-layer widths; input and output sizes come from the dataset.
    pub hidden: Vec<usize>,
    /// How to train it (its seed included).
    pub train: TrainConfig,
    /// `Some` to learn from the transfer set's soft targets.
    pub distill: Option<DistillConfig>,
}

/// Teacher inference over examples `start..end` of the training split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferTask {
    /// Shard number in the transfer set.
    pub shard: usize,
    /// First example (inclusive).
    pub start: usize,
    /// Last example (exclusive).
    pub end: usize,
    /// The teachers, in the transfer set's order.
    pub teachers: Vec<String>,
}

/// Evaluate trained models, and optionally their ensemble.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateTask {
    /// Models to evaluate one by one.
    pub models: Vec<String>,
    /// An ensemble of some of them to evaluate as one model.
    pub ensemble: Option<EnsembleSpec>,
}

/// An ensemble evaluated as one model: its members' class distributions
/// combined at T = 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleSpec {
    /// Name in the report.
    pub name: String,
    /// Member models.
    pub members: Vec<String>,
    /// How the members' distributions are combined.
    pub combine: EnsembleCombine,
}

/// How one model did; the payload of an evaluation task is a list of these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEvaluation {
    /// The model's (or ensemble's) name.
    pub name: String,
    /// Trainable parameters (summed over members for an ensemble).
    pub params: usize,
    /// Errors on the validation split.
    pub validation_errors: usize,
    /// The test-set evaluation.
    pub test: Evaluation,
}

/// What a task reads, already downloaded and verified.
#[derive(Debug)]
pub struct TaskInputs<'a> {
    /// The job's splits.
    pub splits: &'a Splits,
    /// Model files by model name (the bytes of `models/<name>`).
    pub models: HashMap<String, Vec<u8>>,
    /// A folder holding the transfer set, for distillation.
    pub transfer_dir: Option<PathBuf>,
}

/// What a task produced.
#[derive(Clone, Debug)]
pub struct TaskOutput {
    /// The result file's bytes (deterministic).
    pub payload: Vec<u8>,
    /// A JSON summary for the report (may hold times).
    pub summary: serde_json::Value,
}

impl TaskSpec {
    /// A short description for logs, such as `train teacher-0`.
    pub fn describe(&self) -> String {
        match self {
            TaskSpec::Train(t) if t.distill.is_some() => format!("distil {}", t.model),
            TaskSpec::Train(t) => format!("train {}", t.model),
            TaskSpec::Infer(t) => format!("infer shard {} ({}..{})", t.shard, t.start, t.end),
            TaskSpec::Evaluate(t) => format!("evaluate {} models", t.models.len()),
        }
    }

    /// Runs the task on `device`; `observer` sees training steps (and, for
    /// inference and evaluation, one step per model) and may cancel.
    pub fn execute(
        &self,
        inputs: &TaskInputs<'_>,
        device: &Device,
        observer: &mut dyn TrainObserver,
    ) -> Result<TaskOutput> {
        match self {
            TaskSpec::Train(t) => run_train(t, inputs, device, observer),
            TaskSpec::Infer(t) => run_infer(t, inputs, device, observer),
            TaskSpec::Evaluate(t) => run_evaluate(t, inputs, device, observer),
        }
    }
}

/// Trainable parameters of an MLP of this shape.
pub fn parameter_count(spec: &MlpSpec) -> usize {
    spec.layer_dims().iter().map(|(i, o)| i * o + o).sum()
}

fn run_train(
    task: &TrainTask,
    inputs: &TaskInputs<'_>,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TaskOutput> {
    let splits = inputs.splits;
    let spec = MlpSpec::new(
        splits.train.dim(),
        task.hidden.clone(),
        splits.train.num_classes(),
    )?;
    let model = Mlp::new_random(spec, &mut seed::rng(task.train.seed, Stream::Init), device)?;
    let set = match (&task.distill, &inputs.transfer_dir) {
        (Some(_), Some(dir)) => Some(TransferSet::open(dir)?),
        (Some(_), None) => {
            return Err(Error::invalid(
                "task inputs",
                format!("distilling {} needs the transfer set", task.model),
            ))
        }
        (None, _) => None,
    };
    let targets = match (&set, &task.distill) {
        (Some(set), Some(distill)) => Targets::Transfer { set, distill },
        _ => Targets::Labels,
    };
    let started = Instant::now();
    let report: TrainReport = train_observed(
        &model,
        &splits.train,
        &splits.validation,
        targets,
        &task.train,
        device,
        observer,
    )?;
    let payload = model_io::to_bytes(&model, splits.train.normalization())?;
    Ok(TaskOutput {
        payload,
        summary: serde_json::json!({
            "train_seconds": started.elapsed().as_secs_f64(),
            "training": report,
        }),
    })
}

fn load_model(inputs: &TaskInputs<'_>, name: &str, device: &Device) -> Result<Mlp> {
    let bytes = inputs
        .models
        .get(name)
        .ok_or_else(|| Error::invalid("task inputs", format!("model {name} was not provided")))?;
    let model = model_io::from_bytes(bytes, Path::new(&model_artifact(name)), device)?.model;
    model.spec().ensure_fits(name, &inputs.splits.train)?;
    Ok(model)
}

/// Reports one unit of non-training work to the observer (so a cancelled
/// task stops between models).
fn tick(
    observer: &mut dyn TrainObserver,
    step: usize,
    started: Instant,
    rows: usize,
) -> Result<()> {
    observer.on_step(&StepProgress {
        epoch: 0,
        epochs: 0,
        step,
        mean_loss: 0.0,
        examples_per_second: rows as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

fn run_infer(
    task: &InferTask,
    inputs: &TaskInputs<'_>,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TaskOutput> {
    let part = inputs.splits.train.slice(task.start..task.end)?;
    let started = Instant::now();
    let mut logits = Vec::with_capacity(task.teachers.len());
    for (k, name) in task.teachers.iter().enumerate() {
        logits.push(predict_logits(
            &load_model(inputs, name, device)?,
            &part,
            device,
        )?);
        tick(observer, k + 1, started, part.len() * (k + 1))?;
    }
    let views: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
    let payload = encode_shard(
        task.start,
        part.len(),
        part.num_classes(),
        &task.teachers,
        &views,
    )?;
    Ok(TaskOutput {
        payload,
        summary: serde_json::json!({ "seconds": started.elapsed().as_secs_f64() }),
    })
}

fn run_evaluate(
    task: &EvaluateTask,
    inputs: &TaskInputs<'_>,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TaskOutput> {
    let splits = inputs.splits;
    let started = Instant::now();
    let mut results = Vec::new();
    let mut models = HashMap::new();
    for (k, name) in task.models.iter().enumerate() {
        let model = load_model(inputs, name, device)?;
        results.push(ModelEvaluation {
            name: name.clone(),
            params: parameter_count(model.spec()),
            validation_errors: evaluate(&model, &splits.validation, device)?.errors,
            test: evaluate(&model, &splits.test, device)?,
        });
        models.insert(name.clone(), model);
        tick(observer, k + 1, started, splits.test.len() * (k + 1))?;
    }
    if let Some(ens) = &task.ensemble {
        let members = ens
            .members
            .iter()
            .map(|m| match models.get(m) {
                Some(model) => Ok(model),
                None => Err(Error::invalid(
                    "ensemble",
                    format!("member {m} is not among the evaluated models"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let predict = |data| ensemble_predictions(&members, data, ens.combine, device);
        let classes = splits.test.num_classes();
        let validation = Evaluation::from_predictions(
            splits.validation.labels(),
            &predict(&splits.validation)?,
            classes,
        );
        results.push(ModelEvaluation {
            name: ens.name.clone(),
            params: members.iter().map(|m| parameter_count(m.spec())).sum(),
            validation_errors: validation.errors,
            test: Evaluation::from_predictions(
                splits.test.labels(),
                &predict(&splits.test)?,
                classes,
            ),
        });
    }
    let payload = serde_json::to_vec_pretty(&results).expect("evaluations serialise");
    Ok(TaskOutput {
        payload,
        summary: serde_json::json!({ "seconds": started.elapsed().as_secs_f64() }),
    })
}

/// The classes predicted by an ensemble: the argmax of its members' combined
/// distributions at T = 1.
fn ensemble_predictions(
    members: &[&Mlp],
    data: &common::dataset::Dataset,
    combine: EnsembleCombine,
    device: &Device,
) -> Result<Vec<u32>> {
    let logits = members
        .iter()
        .map(|m| predict_logits(m, data, device))
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
    let probs = soft_targets(&views, data.num_classes(), 1.0, combine)?;
    Ok(argmax_rows_host(&probs, data.num_classes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::dataset::synthetic::SyntheticSpec;

    struct Count(usize);
    impl TrainObserver for Count {
        fn on_step(&mut self, _: &StepProgress) -> Result<()> {
            self.0 += 1;
            Ok(())
        }
    }

    fn splits() -> Splits {
        let spec = SyntheticSpec {
            num_classes: 4,
            group_size: 2,
            dim: 8,
            train_size: 300,
            test_size: 100,
            ..SyntheticSpec::default()
        };
        let (train, test) = spec.generate().unwrap();
        Splits::new(&train, test, 50, 3).unwrap()
    }

    fn train_spec(model: &str, distill: Option<DistillConfig>) -> TaskSpec {
        TaskSpec::Train(TrainTask {
            model: model.into(),
            hidden: vec![16],
            train: TrainConfig {
                epochs: 2,
                batch_size: 32,
                ..TrainConfig::default()
            },
            distill,
        })
    }

    #[test]
    fn spec_round_trips_through_json_and_refuses_unknown_fields() {
        let spec = train_spec("teacher-0", None);
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains(r#""kind":"train""#), "{json}");
        assert_eq!(serde_json::from_str::<TaskSpec>(&json).unwrap(), spec);
        let bad = r#"{"kind":"infer","shard":0,"start":0,"end":1,"teachers":[],"extra":1}"#;
        assert!(serde_json::from_str::<TaskSpec>(bad).is_err());
    }

    #[test]
    fn train_infer_distil_evaluate_chain_is_deterministic() {
        let splits = splits();
        let device = Device::Cpu;
        let run = |spec: &TaskSpec, inputs: &TaskInputs<'_>| {
            let mut count = Count(0);
            let out = spec.execute(inputs, &device, &mut count).unwrap();
            assert!(count.0 > 0, "observer saw progress");
            out
        };
        let none = TaskInputs {
            splits: &splits,
            models: HashMap::new(),
            transfer_dir: None,
        };
        let teacher = run(&train_spec("teacher-0", None), &none);
        assert_eq!(
            teacher.payload,
            run(&train_spec("teacher-0", None), &none).payload
        );

        let models = HashMap::from([("teacher-0".to_string(), teacher.payload.clone())]);
        let with_teacher = TaskInputs {
            splits: &splits,
            models,
            transfer_dir: None,
        };
        let n = splits.train.len();
        let infer = TaskSpec::Infer(InferTask {
            shard: 0,
            start: 0,
            end: n,
            teachers: vec!["teacher-0".into()],
        });
        let shard = run(&infer, &with_teacher).payload;
        let dir = tempfile::tempdir().unwrap();
        let entry = common::transfer::store_encoded_shard(
            dir.path(),
            0,
            0..n,
            &["teacher-0".into()],
            4,
            &shard,
        )
        .unwrap();
        common::transfer::write_manifest(
            dir.path(),
            &common::transfer::Manifest {
                format_version: common::transfer::FORMAT_VERSION,
                dataset_fingerprint: splits.train.fingerprint(),
                num_examples: n,
                num_classes: 4,
                teachers: vec!["teacher-0".into()],
                dtype: "F32".into(),
                shards: vec![entry],
            },
        )
        .unwrap();
        let distil_inputs = TaskInputs {
            splits: &splits,
            models: HashMap::new(),
            transfer_dir: Some(dir.path().into()),
        };
        let student = run(
            &train_spec("student", Some(DistillConfig::default())),
            &distil_inputs,
        );

        let models = HashMap::from([
            ("teacher-0".to_string(), teacher.payload),
            ("student".to_string(), student.payload),
        ]);
        let eval_inputs = TaskInputs {
            splits: &splits,
            models,
            transfer_dir: None,
        };
        let eval = TaskSpec::Evaluate(EvaluateTask {
            models: vec!["teacher-0".into(), "student".into()],
            ensemble: Some(EnsembleSpec {
                name: "ensemble".into(),
                members: vec!["teacher-0".into()],
                combine: EnsembleCombine::Arithmetic,
            }),
        });
        let results: Vec<ModelEvaluation> =
            serde_json::from_slice(&run(&eval, &eval_inputs).payload).unwrap();
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].params, 8 * 16 + 16 + 16 * 4 + 4);
        // A one-member ensemble predicts exactly what its member predicts.
        assert_eq!(results[2].test, results[0].test);
        assert_eq!(results[2].validation_errors, results[0].validation_errors);
    }

    #[test]
    fn missing_inputs_are_named() {
        let splits = splits();
        let none = TaskInputs {
            splits: &splits,
            models: HashMap::new(),
            transfer_dir: None,
        };
        let infer = TaskSpec::Infer(InferTask {
            shard: 0,
            start: 0,
            end: 10,
            teachers: vec!["t".into()],
        });
        let err = infer
            .execute(&none, &Device::Cpu, &mut Count(0))
            .unwrap_err();
        assert!(
            err.to_string().contains("model t was not provided"),
            "{err}"
        );
        let err = train_spec("s", Some(DistillConfig::default()))
            .execute(&none, &Device::Cpu, &mut Count(0))
            .unwrap_err();
        assert!(err.to_string().contains("needs the transfer set"), "{err}");
    }
}
