//! The units of work of a cluster job, one module per kind: each owns its
//! spec (what the coordinator sends), what it reads and makes, how a worker
//! runs it once it holds the inputs, how the coordinator checks its output,
//! and its typed summary.
//!
//! A task is a pure function of its spec and inputs: the same spec, inputs,
//! seed and thread count give the same output bytes on CPU, whichever worker
//! runs it and however often it is retried. Times go into the summary,
//! never into the payload.

mod cluster;
mod combined;
mod evaluate;
mod infer;
mod noop;
mod specialist;
mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use common::artifact::ArtifactName;
use common::dataset::examples::Examples;
use common::dataset::shard::{DatasetLayout, Split};
use common::dataset::{Dataset, Splits};
use common::transfer::ShardEntry;
use serde::{Deserialize, Serialize};

pub use cluster::{ClusterSummary, ClusterTask};
pub use combined::CombinedSpec;
pub use evaluate::{
    BiasAdjustment, BiasShift, ChooseOn, EnsembleSpec, EvaluateTask, ModelEvaluation,
    BIAS_SHIFT_STEP, MAX_BIAS_SHIFT,
};
pub use infer::InferTask;
pub use noop::NoopTask;
pub use specialist::{SpecialistSummary, SpecialistTask};
pub use train::{TrainSummary, TrainTask};

use crate::eval::Logits;
use crate::model::{Mlp, Model};
use crate::specialists::ensemble::Clusters;
use crate::train::{StepProgress, TrainObserver};
use crate::{model_io, Error, Result};

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

/// The job's splits as a task reads them: shard by shard, and only the
/// shards it listed among its inputs (the others fail to load).
#[derive(Clone, Copy)]
pub struct TaskData<'a> {
    /// The training split.
    pub train: &'a dyn Examples,
    /// The validation split.
    pub validation: &'a dyn Examples,
    /// The test split.
    pub test: &'a dyn Examples,
}

impl<'a> From<&'a Splits> for TaskData<'a> {
    fn from(splits: &'a Splits) -> Self {
        TaskData {
            train: &splits.train,
            validation: &splits.validation,
            test: &splits.test,
        }
    }
}

impl std::fmt::Debug for TaskData<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |e: &dyn Examples| format!("{} ({} examples)", e.name(), e.len());
        f.debug_struct("TaskData")
            .field("train", &d(self.train))
            .field("validation", &d(self.validation))
            .field("test", &d(self.test))
            .finish()
    }
}

/// The validation and test splits, in memory (what evaluations read).
pub(crate) struct HeldOut<'a> {
    /// The validation split.
    pub validation: std::borrow::Cow<'a, Dataset>,
    /// The test split.
    pub test: std::borrow::Cow<'a, Dataset>,
}

impl<'a> TaskData<'a> {
    /// The validation and test splits, loaded.
    pub(crate) fn held_out(&self) -> Result<HeldOut<'a>> {
        Ok(HeldOut {
            validation: self.validation.load_all()?,
            test: self.test.load_all()?,
        })
    }
}

/// What a job's artifacts look like, as tasks need it to name their inputs.
#[derive(Clone, Copy, Debug)]
pub struct JobLayout<'a> {
    /// Shards of the transfer set.
    pub transfer_shards: usize,
    /// The dataset's shards.
    pub dataset: &'a DatasetLayout,
}

/// The dataset's index, then the shards of `train` (indices), and of the
/// validation and test splits when asked for.
fn dataset_inputs(
    layout: &DatasetLayout,
    train: impl IntoIterator<Item = usize>,
    validation: bool,
    test: bool,
) -> Vec<ArtifactName> {
    let mut inputs = vec![ArtifactName::Dataset];
    inputs.extend(
        train
            .into_iter()
            .map(|i| ArtifactName::DatasetShard(Split::Train, i)),
    );
    for (split, wanted) in [(Split::Validation, validation), (Split::Test, test)] {
        if wanted {
            inputs.extend(
                layout
                    .all(split)
                    .map(|i| ArtifactName::DatasetShard(split, i)),
            );
        }
    }
    inputs
}

/// What a task reads, already downloaded and verified.
#[derive(Debug)]
pub struct TaskInputs<'a> {
    /// The job's splits.
    pub data: TaskData<'a>,
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
    /// Its kind's summary as JSON, for the report (may hold times).
    pub summary: serde_json::Value,
}

impl TaskOutput {
    fn new(payload: Vec<u8>, summary: &impl Serialize) -> Self {
        TaskOutput {
            payload,
            summary: serde_json::to_value(summary).expect("summaries serialise"),
        }
    }
}

/// The summary of a task that reports only its time (inference,
/// evaluation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimedSummary {
    /// Seconds it took.
    pub seconds: f64,
}

/// A finished task's summary, read as its kind's type.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskSummary {
    /// Of a [`TrainTask`].
    Train(TrainSummary),
    /// Of a [`SpecialistTask`].
    Specialist(SpecialistSummary),
    /// Of a [`ClusterTask`].
    Cluster(ClusterSummary),
    /// Of an [`InferTask`] or an [`EvaluateTask`].
    Timed(TimedSummary),
    /// A no-op task has none.
    Noop,
}

impl TaskSummary {
    /// The training part, for a task that trained a model.
    pub fn trained(&self) -> Option<&TrainSummary> {
        match self {
            TaskSummary::Train(t) => Some(t),
            TaskSummary::Specialist(s) => Some(&s.trained),
            _ => None,
        }
    }
}

/// A task's output, checked and decoded as far as the coordinator needs it.
#[derive(Clone, Debug)]
pub enum Checked {
    /// A model file.
    Model,
    /// A transfer-set shard, with its manifest entry.
    Shard(ShardEntry),
    /// The specialists' classes.
    Clusters(Clusters),
    /// The evaluation's results.
    Evaluation(Vec<ModelEvaluation>),
    /// A no-op task's payload.
    Noop,
}

/// What each kind of task does; a new kind is one module with one
/// implementation, and one variant of [`TaskSpec`].
trait TaskKind {
    /// The artifacts it reads, in the order a worker is given them, in a
    /// job laid out as `job` says.
    fn inputs(&self, job: &JobLayout<'_>) -> Vec<ArtifactName>;

    /// The artifact its output is stored as.
    fn output(&self) -> ArtifactName;

    /// Checks that `payload` is what it makes in a job of `num_classes`; by
    /// default, that it is a readable model file (for the kinds that
    /// train a model).
    fn check_output(&self, payload: &[u8], _num_classes: usize) -> Result<Checked, String> {
        let output = self.output();
        model_io::from_bytes(payload, Path::new(&output.key()), &Device::Cpu).map_err(|e| {
            match &output {
                ArtifactName::Model(name) => format!("{name}: {e}"),
                other => format!("{other}: {e}"),
            }
        })?;
        Ok(Checked::Model)
    }

    /// Runs it.
    fn run(&self, run: Run<'_>) -> Result<TaskOutput>;
}

/// What a running task works with: its inputs, the device it computes on,
/// and the observer that sees its training steps (for inference and
/// evaluation, one step per model) and may cancel it.
struct Run<'r>(&'r TaskInputs<'r>, &'r Device, &'r mut dyn TrainObserver);

impl TaskSpec {
    fn kind(&self) -> &dyn TaskKind {
        match self {
            TaskSpec::Train(t) => t,
            TaskSpec::Infer(t) => t,
            TaskSpec::Evaluate(t) => t,
            TaskSpec::Cluster(t) => t,
            TaskSpec::Specialist(t) => t,
            TaskSpec::Noop(t) => t,
        }
    }

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

    /// The artifacts it reads, in the order a worker is given them, in a
    /// job laid out as `job` says.
    pub fn inputs(&self, job: &JobLayout<'_>) -> Vec<ArtifactName> {
        self.kind().inputs(job)
    }

    /// The artifact its output is stored as.
    pub fn output(&self) -> ArtifactName {
        self.kind().output()
    }

    /// Whether it trains (and so may upload checkpoints).
    pub fn trains(&self) -> bool {
        matches!(self, TaskSpec::Train(_) | TaskSpec::Specialist(_))
    }

    /// Checks that `payload` is what this task makes in a job of
    /// `num_classes`; the error says why not.
    pub fn check_output(&self, payload: &[u8], num_classes: usize) -> Result<Checked, String> {
        self.kind().check_output(payload, num_classes)
    }

    /// What [`TaskSpec::check_output`] would say of an output with `sha256`
    /// that the coordinator does not read (a worker wrote it to the bucket
    /// after checking it; its readers verify it): `None` for the kinds whose
    /// output the job must decode (clusters, evaluation), which are small.
    pub fn checked_unread(&self, sha256: &str) -> Option<Checked> {
        match self {
            TaskSpec::Train(_) | TaskSpec::Specialist(_) => Some(Checked::Model),
            TaskSpec::Noop(_) => Some(Checked::Noop),
            TaskSpec::Infer(t) => Some(Checked::Shard(ShardEntry {
                file: common::transfer::shard_file_name(t.shard),
                start: t.start,
                end: t.end,
                rows: t.end - t.start,
                sha256: sha256.to_string(),
                key: None,
            })),
            TaskSpec::Evaluate(_) | TaskSpec::Cluster(_) => None,
        }
    }

    /// Reads a finished task's summary JSON as its kind's type (`None` when
    /// it is missing or not of that shape).
    pub fn summary(&self, json: &serde_json::Value) -> Option<TaskSummary> {
        fn read<'a, T: Deserialize<'a>>(json: &'a serde_json::Value) -> Option<T> {
            T::deserialize(json).ok()
        }
        match self {
            TaskSpec::Train(_) => read(json).map(TaskSummary::Train),
            TaskSpec::Specialist(_) => read(json).map(TaskSummary::Specialist),
            TaskSpec::Cluster(_) => read(json).map(TaskSummary::Cluster),
            TaskSpec::Infer(_) | TaskSpec::Evaluate(_) => read(json).map(TaskSummary::Timed),
            TaskSpec::Noop(_) => Some(TaskSummary::Noop),
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
        self.kind().run(Run(inputs, device, observer))
    }
}

/// Model `name` of the inputs, as given.
fn load_model_file(inputs: &TaskInputs<'_>, name: &str, device: &Device) -> Result<Model> {
    let bytes = inputs
        .models
        .get(name)
        .ok_or_else(|| Error::invalid("task inputs", format!("model {name} was not provided")))?;
    Ok(model_io::from_bytes(
        bytes,
        Path::new(&ArtifactName::Model(name.to_string()).key()),
        device,
    )?
    .model)
}

/// MLP `name` of the inputs, checked against the data's features and
/// classes (to train from its weights).
fn load_mlp(inputs: &TaskInputs<'_>, name: &str, device: &Device) -> Result<Mlp> {
    let Model::Mlp(mlp) = load_model_file(inputs, name, device)?;
    mlp.spec().ensure_fits(name, inputs.data.train)?;
    Ok(mlp)
}

/// Model `name` of the inputs, checked against the data's features and
/// classes, ready to give logits on `device`.
fn load_model(inputs: &TaskInputs<'_>, name: &str, device: &Device) -> Result<Box<dyn Logits>> {
    let model = load_model_file(inputs, name, device)?;
    model.architecture().ensure_fits(name, inputs.data.train)?;
    model.into_logits(device)
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

#[cfg(test)]
mod tests;
