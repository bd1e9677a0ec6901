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

use crate::eval::{argmax_rows_host, evaluate, predict_logits, Evaluation, Predictor};
use crate::hparams::{DistillConfig, TrainConfig};
use crate::model::{Mlp, MlpSpec};
use crate::specialists::clustering::confusable_clusters;
use crate::specialists::ensemble::{log_probabilities, Clusters, SpecialistEnsemble};
use crate::specialists::specialist::{relabel, train_specialist};
use crate::subset::{kept_indices, ExampleSubset};
use crate::train::{train_observed, EpochStats, StepProgress, Targets, TrainObserver, TrainReport};
use crate::{model_io, Error, Result};
use common::artifact::ArtifactName;

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
    /// Cluster the classes the generalist confuses; the output is the
    /// specialists' classes ([`Clusters`] as JSON).
    Cluster(ClusterTask),
    /// Train one specialist from the generalist; the output is its model
    /// file (its classes, then the dustbin).
    Specialist(SpecialistTask),
    /// Nothing: the output is the task's index as 8 little-endian bytes.
    /// Load tests of the coordinator use it.
    Noop(NoopTask),
}

/// A task that does nothing (for load tests).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopTask {
    /// Its number in the plan.
    pub index: u64,
}

impl NoopTask {
    /// The result a no-op task must deliver.
    pub fn payload(&self) -> Vec<u8> {
        self.index.to_le_bytes().to_vec()
    }
}

/// Which classes each specialist covers (paper, section 5): the generalist's
/// predictions over the training split, their covariance, K-means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTask {
    /// The generalist model.
    pub generalist: String,
    /// Number of specialists (K-means clusters).
    pub specialists: usize,
    /// Classes per specialist (clusters may then overlap); `None`: the
    /// K-means clusters themselves, which partition the classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes_per_specialist: Option<usize>,
    /// Seed of K-means.
    pub seed: u64,
}

/// Train specialist `index` of the clusters file, started from the
/// generalist's weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialistTask {
    /// The specialist's model name.
    pub model: String,
    /// Its cluster in [`common::artifact::ArtifactName::Clusters`].
    pub index: usize,
    /// The generalist it starts from.
    pub generalist: String,
    /// How to train it (its seed included).
    pub train: TrainConfig,
}

/// The generalist and its specialists combined by eq. 5, as one model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CombinedSpec {
    /// Its name (in the transfer set and the report).
    pub name: String,
    /// The generalist model.
    pub generalist: String,
    /// The specialist models, in the clusters file's order.
    pub specialists: Vec<String>,
    /// An example activates the specialists covering any of the
    /// generalist's `top_n` most probable classes.
    pub top_n: usize,
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
    /// Learn from these training examples only (all when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<ExampleSubset>,
    /// Also count test errors after every epoch, for a learning curve in
    /// the report (the test set never chooses anything).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record_test_curve: bool,
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
    /// Also store the generalist+specialists distribution q, as logits
    /// `ln q` under the combination's name, after the teachers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combined: Option<CombinedSpec>,
}

/// Evaluate trained models, and optionally their ensemble.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateTask {
    /// Models to evaluate one by one.
    pub models: Vec<String>,
    /// An ensemble of some of them to evaluate as one model.
    pub ensemble: Option<EnsembleSpec>,
    /// One of them evaluated again with some output biases shifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias_adjustment: Option<BiasAdjustment>,
    /// The specialists (each on its own classes + dustbin) and the
    /// generalist+specialists combination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combined: Option<CombinedSpec>,
}

/// A model's output-layer biases of some classes shifted by one amount,
/// given or chosen on the validation split (the paper's fix for classes
/// missing from the transfer set).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiasAdjustment {
    /// The model to adjust (evaluated as `<model>+bias`).
    pub model: String,
    /// The classes whose biases move.
    pub classes: Vec<u32>,
    /// By how much.
    pub shift: BiasShift,
}

/// How far the biases move.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BiasShift {
    /// This much (negative lowers them).
    Fixed(f64),
    /// The shift with the fewest validation errors.
    Chosen(ChooseOn),
}

/// Where a chosen value is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChooseOn {
    /// On the validation split: every shift from -[`MAX_BIAS_SHIFT`] to
    /// +[`MAX_BIAS_SHIFT`] in steps of [`BIAS_SHIFT_STEP`] is tried and the
    /// one with the fewest errors kept (on ties, the smallest in magnitude).
    Validation,
}

/// The largest bias shift tried when choosing on the validation split.
pub const MAX_BIAS_SHIFT: f64 = 15.0;
/// The step of the shifts tried when choosing on the validation split.
pub const BIAS_SHIFT_STEP: f64 = 0.1;

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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelEvaluation {
    /// The model's (or ensemble's) name.
    pub name: String,
    /// Trainable parameters (summed over members for an ensemble).
    pub params: usize,
    /// Errors on the validation split.
    pub validation_errors: usize,
    /// The test-set evaluation.
    pub test: Evaluation,
    /// For a bias-adjusted model: the shift applied to the classes' biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias_shift: Option<f64>,
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
    /// The specialists' classes ([`common::artifact::ArtifactName::Clusters`]).
    pub clusters: Option<Clusters>,
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
            TaskSpec::Cluster(t) => format!("cluster classes for {} specialists", t.specialists),
            TaskSpec::Specialist(t) => format!("train specialist {}", t.model),
            TaskSpec::Noop(t) => format!("no-op {}", t.index),
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
            TaskSpec::Cluster(t) => run_cluster(t, inputs, device, observer),
            TaskSpec::Specialist(t) => run_specialist(t, inputs, device, observer),
            TaskSpec::Noop(t) => Ok(TaskOutput {
                payload: t.payload(),
                summary: serde_json::Value::Null,
            }),
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
    let keep = match &task.subset {
        Some(subset) if !subset.is_everything() => {
            Some(subset.mask(splits.train.labels(), splits.train.num_classes())?)
        }
        _ => None,
    };
    let labelled_subset;
    let (train_data, targets) = match (&set, &task.distill, &keep) {
        (Some(set), Some(distill), keep) => (
            &splits.train,
            Targets::Transfer {
                set,
                distill,
                keep: keep.as_deref(),
            },
        ),
        (_, _, Some(keep)) => {
            labelled_subset = splits.train.subset(
                &kept_indices(keep),
                format!("{}/subset", splits.train.name()),
            );
            (&labelled_subset, Targets::Labels)
        }
        (_, _, None) => (&splits.train, Targets::Labels),
    };
    let examples = keep.as_ref().map_or(splits.train.len(), |k| {
        k.iter().filter(|&&kept| kept).count()
    });
    let mut curve = TestCurve {
        model: &model,
        test: &splits.test,
        device,
        inner: observer,
        errors: task.record_test_curve.then(Vec::new),
    };
    let started = Instant::now();
    let report: TrainReport = train_observed(
        &model,
        train_data,
        &splits.validation,
        targets,
        &task.train,
        device,
        &mut curve,
    )?;
    let mut summary = serde_json::json!({
        "train_seconds": started.elapsed().as_secs_f64(),
        "examples": examples,
        "training": report,
    });
    if let Some(errors) = curve.errors {
        summary["test_errors_per_epoch"] = serde_json::json!(errors);
    }
    let payload = model_io::to_bytes(&model, splits.train.normalization())?;
    Ok(TaskOutput { payload, summary })
}

/// Passes training progress on and, when `errors` is `Some`, counts the
/// model's test errors after every epoch.
struct TestCurve<'a> {
    model: &'a Mlp,
    test: &'a common::dataset::Dataset,
    device: &'a Device,
    inner: &'a mut dyn TrainObserver,
    errors: Option<Vec<usize>>,
}

impl TrainObserver for TestCurve<'_> {
    fn on_step(&mut self, progress: &StepProgress) -> Result<()> {
        self.inner.on_step(progress)
    }

    fn on_epoch(&mut self, stats: &EpochStats) -> Result<()> {
        if let Some(errors) = &mut self.errors {
            errors.push(evaluate(self.model, self.test, self.device)?.errors);
        }
        self.inner.on_epoch(stats)
    }

    fn take_checkpoint(&mut self) -> Option<crate::checkpoint::TrainCheckpoint> {
        self.inner.take_checkpoint()
    }

    fn checkpoint_due(&mut self, epochs_done: usize) -> bool {
        self.inner.checkpoint_due(epochs_done)
    }

    fn on_checkpoint(&mut self, checkpoint: crate::checkpoint::TrainCheckpoint) -> Result<()> {
        self.inner.on_checkpoint(checkpoint)
    }
}

fn load_model(inputs: &TaskInputs<'_>, name: &str, device: &Device) -> Result<Mlp> {
    let bytes = inputs
        .models
        .get(name)
        .ok_or_else(|| Error::invalid("task inputs", format!("model {name} was not provided")))?;
    let model = model_io::from_bytes(
        bytes,
        Path::new(&ArtifactName::Model(name.to_string()).key()),
        device,
    )?
    .model;
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
    let train = &inputs.splits.train;
    let rows = task.start..task.end;
    let started = Instant::now();
    let mut logits = Vec::with_capacity(task.teachers.len() + 1);
    for (k, name) in task.teachers.iter().enumerate() {
        let model = load_model(inputs, name, device)?;
        logits.push(Predictor::new(&model, device)?.logits_of(train, rows.clone())?);
        tick(observer, k + 1, started, rows.len() * (k + 1))?;
    }
    let mut names = task.teachers.clone();
    if let Some(combined) = &task.combined {
        let models = CombinedModels::load(combined, inputs, device)?;
        let ensemble = models.ensemble(combined, device)?;
        // The generalist is usually one of the teachers: reuse its logits.
        let q = match task.teachers.iter().position(|t| *t == combined.generalist) {
            Some(k) => {
                let classes = train.num_classes();
                let p = soft_targets(&[&logits[k]], classes, 1.0, EnsembleCombine::Arithmetic)?;
                let p: Vec<f64> = p.into_iter().map(f64::from).collect();
                ensemble.combined_given(&p, train, rows.clone())?
            }
            None => ensemble.combined(train, rows.clone())?,
        };
        logits.push(log_probabilities(&q));
        names.push(combined.name.clone());
        tick(observer, names.len(), started, rows.len() * names.len())?;
    }
    let views: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
    let payload = encode_shard(task.start, rows.len(), train.num_classes(), &names, &views)?;
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
            bias_shift: None,
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
            bias_shift: None,
        });
    }
    if let Some(combined) = &task.combined {
        results.extend(evaluate_combined(combined, inputs, device)?);
    }
    if let Some(adjustment) = &task.bias_adjustment {
        let model = models.get(&adjustment.model).ok_or_else(|| {
            Error::invalid(
                "bias_adjustment.model",
                format!("{} is not among the evaluated models", adjustment.model),
            )
        })?;
        results.push(evaluate_bias_adjusted(model, adjustment, splits, device)?);
    }
    let payload = serde_json::to_vec_pretty(&results).expect("evaluations serialise");
    Ok(TaskOutput {
        payload,
        summary: serde_json::json!({ "seconds": started.elapsed().as_secs_f64() }),
    })
}

/// A generalist and its specialists, loaded with their classes.
struct CombinedModels<'a> {
    generalist: Mlp,
    specialists: Vec<Mlp>,
    clusters: &'a Clusters,
}

impl<'a> CombinedModels<'a> {
    fn load(spec: &CombinedSpec, inputs: &'a TaskInputs<'_>, device: &Device) -> Result<Self> {
        let clusters = inputs.clusters.as_ref().ok_or_else(|| {
            Error::invalid(
                "task inputs",
                format!("{} needs the specialists' classes", spec.name),
            )
        })?;
        let specialists = spec
            .specialists
            .iter()
            .map(|name| load_specialist(inputs, name, device))
            .collect::<Result<_>>()?;
        Ok(CombinedModels {
            generalist: load_model(inputs, &spec.generalist, device)?,
            specialists,
            clusters,
        })
    }

    fn ensemble(
        &'a self,
        spec: &CombinedSpec,
        device: &'a Device,
    ) -> Result<SpecialistEnsemble<'a>> {
        SpecialistEnsemble::new(
            &self.generalist,
            &self.specialists,
            self.clusters,
            spec.top_n,
            device,
        )
    }
}

/// Each specialist evaluated on its own task (its classes + dustbin, on
/// the relabelled splits), then the combination on the real one.
fn evaluate_combined(
    spec: &CombinedSpec,
    inputs: &TaskInputs<'_>,
    device: &Device,
) -> Result<Vec<ModelEvaluation>> {
    let splits = inputs.splits;
    let models = CombinedModels::load(spec, inputs, device)?;
    let mut results = Vec::with_capacity(spec.specialists.len() + 1);
    for ((name, model), classes) in spec
        .specialists
        .iter()
        .zip(&models.specialists)
        .zip(&models.clusters.clusters)
    {
        results.push(ModelEvaluation {
            name: name.clone(),
            params: parameter_count(model.spec()),
            validation_errors: evaluate(model, &relabel(&splits.validation, classes)?, device)?
                .errors,
            test: evaluate(model, &relabel(&splits.test, classes)?, device)?,
            bias_shift: None,
        });
    }
    let ensemble = models.ensemble(spec, device)?;
    let classes = splits.test.num_classes();
    let predict = |data: &common::dataset::Dataset| -> Result<Vec<u32>> {
        let q = ensemble.combined(data, 0..data.len())?;
        let q: Vec<f32> = q.into_iter().map(|p| p as f32).collect();
        Ok(argmax_rows_host(&q, classes))
    };
    let validation = Evaluation::from_predictions(
        splits.validation.labels(),
        &predict(&splits.validation)?,
        classes,
    );
    results.push(ModelEvaluation {
        name: spec.name.clone(),
        params: parameter_count(models.generalist.spec())
            + models
                .specialists
                .iter()
                .map(|m| parameter_count(m.spec()))
                .sum::<usize>(),
        validation_errors: validation.errors,
        test: Evaluation::from_predictions(splits.test.labels(), &predict(&splits.test)?, classes),
        bias_shift: None,
    });
    Ok(results)
}

/// A specialist's model file (its outputs are its classes + dustbin, so it
/// is not checked against the data's classes, only its input).
fn load_specialist(inputs: &TaskInputs<'_>, name: &str, device: &Device) -> Result<Mlp> {
    let bytes = inputs
        .models
        .get(name)
        .ok_or_else(|| Error::invalid("task inputs", format!("model {name} was not provided")))?;
    let model = model_io::from_bytes(
        bytes,
        Path::new(&ArtifactName::Model(name.to_string()).key()),
        device,
    )?
    .model;
    if model.spec().input_dim != inputs.splits.train.dim() {
        return Err(Error::invalid(
            "specialist",
            format!(
                "{name} reads {} features, the data has {}",
                model.spec().input_dim,
                inputs.splits.train.dim()
            ),
        ));
    }
    Ok(model)
}

fn run_cluster(
    task: &ClusterTask,
    inputs: &TaskInputs<'_>,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TaskOutput> {
    let train = &inputs.splits.train;
    let classes = train.num_classes();
    let started = Instant::now();
    let generalist = load_model(inputs, &task.generalist, device)?;
    let logits = Predictor::new(&generalist, device)?.logits(train)?;
    let probs = soft_targets(&[&logits], classes, 1.0, EnsembleCombine::Arithmetic)?;
    tick(observer, 1, started, train.len())?;
    if task.specialists < 2 || task.specialists > classes {
        return Err(Error::invalid(
            "specialists",
            format!(
                "{} specialists for {classes} classes; need 2 to {classes}",
                task.specialists
            ),
        ));
    }
    let clusters = Clusters {
        num_classes: classes,
        clusters: confusable_clusters(
            &probs,
            classes,
            task.specialists,
            task.classes_per_specialist,
            &mut seed::rng(task.seed, Stream::Clustering),
        ),
    };
    clusters.validate()?;
    tracing::info!(clusters = ?clusters.clusters, "classes clustered for the specialists");
    Ok(TaskOutput {
        payload: serde_json::to_vec_pretty(&clusters).expect("clusters serialise"),
        summary: serde_json::json!({
            "seconds": started.elapsed().as_secs_f64(),
            "clusters": clusters.clusters,
        }),
    })
}

fn run_specialist(
    task: &SpecialistTask,
    inputs: &TaskInputs<'_>,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<TaskOutput> {
    let splits = inputs.splits;
    let clusters = inputs.clusters.as_ref().ok_or_else(|| {
        Error::invalid(
            "task inputs",
            format!("{} needs the specialists' classes", task.model),
        )
    })?;
    let classes = clusters.clusters.get(task.index).ok_or_else(|| {
        Error::invalid(
            "specialist index",
            format!("{} of {} clusters", task.index, clusters.clusters.len()),
        )
    })?;
    let generalist = load_model(inputs, &task.generalist, device)?;
    let started = Instant::now();
    let (model, training) =
        train_specialist(&generalist, classes, splits, &task.train, device, observer)?;
    let summary = serde_json::json!({
        "train_seconds": started.elapsed().as_secs_f64(),
        "examples": training.examples_per_epoch,
        "classes": classes,
        "own_examples": training.own_examples,
        "natural_dustbin": training.natural_dustbin,
        "trained_dustbin": training.trained_dustbin,
        "dustbin_correction": training.dustbin_correction,
        "training": training.training,
    });
    let payload = model_io::to_bytes(&model, splits.train.normalization())?;
    Ok(TaskOutput { payload, summary })
}

/// Evaluates `model` with the output biases of `adjustment.classes` moved
/// (adding to a class's logit is the same as adding to its bias).
fn evaluate_bias_adjusted(
    model: &Mlp,
    adjustment: &BiasAdjustment,
    splits: &Splits,
    device: &Device,
) -> Result<ModelEvaluation> {
    let classes = splits.test.num_classes();
    if let Some(c) = adjustment.classes.iter().find(|&&c| c as usize >= classes) {
        return Err(Error::invalid(
            "bias_adjustment.classes",
            format!("class {c} does not exist (the data has {classes} classes)"),
        ));
    }
    let predict_shifted = |logits: &[f32], shift: f64| {
        let mut scores = logits.to_vec();
        for row in scores.chunks_exact_mut(classes) {
            for &c in &adjustment.classes {
                row[c as usize] += shift as f32;
            }
        }
        argmax_rows_host(&scores, classes)
    };
    let validation_logits = predict_logits(model, &splits.validation, device)?;
    let validation_errors_at = |shift: f64| {
        Evaluation::from_predictions(
            splits.validation.labels(),
            &predict_shifted(&validation_logits, shift),
            classes,
        )
        .errors
    };
    let shift = match adjustment.shift {
        BiasShift::Fixed(shift) => shift,
        BiasShift::Chosen(ChooseOn::Validation) => best_shift(validation_errors_at),
    };
    let test_logits = predict_logits(model, &splits.test, device)?;
    Ok(ModelEvaluation {
        name: format!("{}+bias", adjustment.model),
        params: parameter_count(model.spec()),
        validation_errors: validation_errors_at(shift),
        test: Evaluation::from_predictions(
            splits.test.labels(),
            &predict_shifted(&test_logits, shift),
            classes,
        ),
        bias_shift: Some(shift),
    })
}

/// The shift in ±[`MAX_BIAS_SHIFT`] (steps of [`BIAS_SHIFT_STEP`]) with the
/// fewest errors; on ties the smallest in magnitude, then the negative one.
fn best_shift(errors_at: impl Fn(f64) -> usize) -> f64 {
    let steps = (MAX_BIAS_SHIFT / BIAS_SHIFT_STEP).round() as i64;
    let best = (-steps..=steps)
        .min_by_key(|&k| (errors_at(k as f64 * BIAS_SHIFT_STEP), k.abs(), k))
        .expect("the range is not empty");
    best as f64 * BIAS_SHIFT_STEP
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
            subset: None,
            record_test_curve: false,
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
            clusters: None,
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
            clusters: None,
        };
        let n = splits.train.len();
        let infer = TaskSpec::Infer(InferTask {
            shard: 0,
            start: 0,
            end: n,
            teachers: vec!["teacher-0".into()],
            combined: None,
        });
        let shard = run(&infer, &with_teacher).payload;
        let dir = tempfile::tempdir().unwrap();
        let entry =
            common::transfer::check_encoded_shard(0, 0..n, &["teacher-0".into()], 4, &shard)
                .unwrap();
        std::fs::write(dir.path().join(&entry.file), &shard).unwrap();
        common::transfer::write_manifest(
            dir.path(),
            &common::transfer::Manifest::new(
                &splits.train.fingerprint(),
                n,
                4,
                vec!["teacher-0".into()],
                vec![entry],
            ),
        )
        .unwrap();
        let distil_inputs = TaskInputs {
            splits: &splits,
            models: HashMap::new(),
            transfer_dir: Some(dir.path().into()),
            clusters: None,
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
            clusters: None,
        };
        let eval = TaskSpec::Evaluate(EvaluateTask {
            models: vec!["teacher-0".into(), "student".into()],
            ensemble: Some(EnsembleSpec {
                name: "ensemble".into(),
                members: vec!["teacher-0".into()],
                combine: EnsembleCombine::Arithmetic,
            }),
            bias_adjustment: Some(BiasAdjustment {
                model: "student".into(),
                classes: vec![1],
                shift: BiasShift::Chosen(ChooseOn::Validation),
            }),
            combined: None,
        });
        let results: Vec<ModelEvaluation> =
            serde_json::from_slice(&run(&eval, &eval_inputs).payload).unwrap();
        assert_eq!(results.len(), 4);
        assert_eq!(results[3].name, "student+bias");
        // The chosen shift is never worse on validation than no shift.
        assert!(results[3].validation_errors <= results[1].validation_errors);
        assert!(results[3].bias_shift.unwrap().abs() <= MAX_BIAS_SHIFT);
        assert_eq!(results[0].params, 8 * 16 + 16 + 16 * 4 + 4);
        // A one-member ensemble predicts exactly what its member predicts.
        assert_eq!(results[2].test, results[0].test);
        assert_eq!(results[2].validation_errors, results[0].validation_errors);
    }

    #[test]
    fn best_shift_minimises_errors_and_prefers_small_shifts_on_ties() {
        // Errors fall to 0 between 3.5 and 4.0 (inclusive).
        let errors = |s: f64| if (3.45..4.05).contains(&s) { 0 } else { 5 };
        assert!((best_shift(errors) - 3.5).abs() < 1e-9);
        assert_eq!(best_shift(|_| 1), 0.0);
        let lowest_at_minus = |s: f64| ((s + 7.6).abs() * 10.0).round() as usize;
        assert!((best_shift(lowest_at_minus) + 7.6).abs() < 1e-9);
    }

    #[test]
    fn bias_shift_parses_from_a_number_or_validation() {
        let fixed: BiasAdjustment =
            serde_json::from_str(r#"{"model":"s","classes":[3],"shift":3.5}"#).unwrap();
        assert_eq!(fixed.shift, BiasShift::Fixed(3.5));
        let chosen: BiasAdjustment =
            serde_json::from_str(r#"{"model":"s","classes":[3],"shift":"validation"}"#).unwrap();
        assert_eq!(chosen.shift, BiasShift::Chosen(ChooseOn::Validation));
        assert!(serde_json::from_str::<BiasAdjustment>(
            r#"{"model":"s","classes":[3],"shift":"test"}"#
        )
        .is_err());
    }

    #[test]
    fn a_subset_trains_on_fewer_examples_and_records_a_test_curve() {
        let splits = splits();
        let none = TaskInputs {
            splits: &splits,
            models: HashMap::new(),
            transfer_dir: None,
            clusters: None,
        };
        let spec = TaskSpec::Train(TrainTask {
            subset: Some(ExampleSubset {
                exclude_classes: vec![0],
                ..ExampleSubset::default()
            }),
            record_test_curve: true,
            ..match train_spec("baseline", None) {
                TaskSpec::Train(t) => t,
                _ => unreachable!(),
            }
        });
        let out = spec.execute(&none, &Device::Cpu, &mut Count(0)).unwrap();
        let without_0 = splits.train.labels().iter().filter(|&&l| l != 0).count();
        assert_eq!(out.summary["examples"], without_0);
        assert_eq!(
            out.summary["test_errors_per_epoch"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        // A class never seen is never predicted: every test 0 is an error.
        let model = model_io::from_bytes(&out.payload, Path::new("m"), &Device::Cpu)
            .unwrap()
            .model;
        let e = evaluate(&model, &splits.test, &Device::Cpu).unwrap();
        assert_eq!(e.per_class_errors[0], e.per_class_totals[0]);
    }

    #[test]
    fn missing_inputs_are_named() {
        let splits = splits();
        let none = TaskInputs {
            splits: &splits,
            models: HashMap::new(),
            transfer_dir: None,
            clusters: None,
        };
        let infer = TaskSpec::Infer(InferTask {
            shard: 0,
            start: 0,
            end: 10,
            teachers: vec!["t".into()],
            combined: None,
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
