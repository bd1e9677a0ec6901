//! Training one model from scratch: on hard labels (teachers, the
//! baseline) or distilled from the transfer set's soft targets (students).
//! The output is the model file.

use std::time::Instant;

use candle_core::Device;
use common::artifact::ArtifactName;
use common::seed::{self, Stream};
use common::transfer::TransferSet;
use serde::{Deserialize, Serialize};

use super::{dataset_inputs, JobLayout, Run, TaskKind, TaskOutput};
use crate::eval::evaluate;
use crate::hparams::{DistillConfig, TrainConfig};
use crate::model::{Architecture, Mlp, ModelShape};
use crate::subset::{kept_indices, ExampleSubset};
use crate::train::{train_observed, EpochStats, StepProgress, Targets, TrainObserver, TrainReport};
use crate::{model_io, Error, Result};
use common::dataset::examples::Examples;
use common::dataset::shard::Split;

/// Train one model on hard labels, or distil it from the transfer set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTask {
    /// The model's name (`teacher-0`, `student`, ...).
    pub model: String,
    /// Its family and shape; input and output sizes come from the dataset.
    pub shape: ModelShape,
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

/// What a training task reports besides its model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Seconds of training, without fetching inputs.
    pub train_seconds: f64,
    /// Training examples it learned from.
    pub examples: usize,
    /// The training history.
    pub training: TrainReport,
    /// Test errors after each epoch, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_errors_per_epoch: Option<Vec<usize>>,
}

impl TaskKind for TrainTask {
    /// The training and validation splits (the test split too for a test
    /// curve), and to distil the transfer set's manifest and shards.
    fn inputs(&self, job: &JobLayout<'_>) -> Vec<ArtifactName> {
        let train = job.dataset.all(Split::Train);
        let mut inputs = dataset_inputs(job.dataset, train, true, self.record_test_curve);
        if self.distill.is_some() {
            inputs.push(ArtifactName::TransferManifest);
            inputs.extend((0..job.transfer_shards).map(ArtifactName::Shard));
        }
        inputs
    }

    fn output(&self) -> ArtifactName {
        ArtifactName::Model(self.model.clone())
    }

    fn run(&self, run: Run<'_>) -> Result<TaskOutput> {
        let Run(inputs, device, observer) = run;
        let data = inputs.data;
        // Training is written for MLPs (the fused CPU path among others).
        let Architecture::Mlp(spec) = self
            .shape
            .for_data(data.train.dim(), data.train.num_classes())?;
        let model = Mlp::new_random(spec, &mut seed::rng(self.train.seed, Stream::Init), device)?;
        let set = match (&self.distill, &inputs.transfer_dir) {
            (Some(_), Some(dir)) => Some(TransferSet::open(dir)?),
            (Some(_), None) => {
                return Err(Error::invalid(
                    "task inputs",
                    format!("distilling {} needs the transfer set", self.model),
                ))
            }
            (None, _) => None,
        };
        let keep = match &self.subset {
            Some(subset) if !subset.is_everything() => {
                Some(subset.mask(&data.train.labels()?, data.train.num_classes())?)
            }
            _ => None,
        };
        let labelled_subset;
        let (train_data, targets): (&dyn Examples, _) = match (&set, &self.distill, &keep) {
            (Some(set), Some(distill), keep) => (
                data.train,
                Targets::Transfer {
                    set,
                    distill,
                    keep: keep.as_deref(),
                },
            ),
            (_, _, Some(keep)) => {
                labelled_subset = data
                    .train
                    .subset(&kept_indices(keep), format!("{}/subset", data.train.name()))?;
                (&labelled_subset, Targets::Labels)
            }
            (_, _, None) => (data.train, Targets::Labels),
        };
        let examples = keep
            .as_ref()
            .map_or(data.train.len(), |k| k.iter().filter(|&&kept| kept).count());
        let test = match self.record_test_curve {
            true => Some(data.test.load_all()?),
            false => None,
        };
        let validation = data.validation.load_all()?;
        let mut curve = TestCurve {
            model: &model,
            test: test.as_deref(),
            device,
            inner: observer,
            errors: self.record_test_curve.then(Vec::new),
        };
        let started = Instant::now();
        let training = train_observed(
            &model,
            train_data,
            &validation,
            targets,
            &self.train,
            device,
            &mut curve,
        )?;
        let summary = TrainSummary {
            train_seconds: started.elapsed().as_secs_f64(),
            examples,
            training,
            test_errors_per_epoch: curve.errors,
        };
        let payload = model_io::mlp_to_bytes(&model, data.train.normalization())?;
        Ok(TaskOutput::new(payload, &summary))
    }
}

/// Passes training progress on and, when `errors` is `Some`, counts the
/// model's test errors after every epoch.
struct TestCurve<'a> {
    model: &'a Mlp,
    test: Option<&'a common::dataset::Dataset>,
    device: &'a Device,
    inner: &'a mut dyn TrainObserver,
    errors: Option<Vec<usize>>,
}

impl TrainObserver for TestCurve<'_> {
    fn on_step(&mut self, progress: &StepProgress) -> Result<()> {
        self.inner.on_step(progress)
    }

    fn on_epoch(&mut self, stats: &EpochStats) -> Result<()> {
        if let (Some(errors), Some(test)) = (&mut self.errors, self.test) {
            errors.push(evaluate(self.model, test, self.device)?.errors);
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
