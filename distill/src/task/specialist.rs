//! Training one specialist (paper, section 5): started from the
//! generalist's weights, on an enriched stream of its classes with the
//! rest lumped into a dustbin class. The output is its model file.

use std::time::Instant;

use common::artifact::ArtifactName;
use serde::{Deserialize, Serialize};

use super::train::TrainSummary;
use super::{dataset_inputs, load_mlp, JobLayout, Run, TaskKind, TaskOutput};
use crate::hparams::TrainConfig;
use crate::specialists::specialist::train_specialist;
use crate::{model_io, Error, Result};
use common::dataset::shard::Split;

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

/// What a specialist's training reports besides its model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpecialistSummary {
    /// As for any trained model (`examples` per epoch).
    #[serde(flatten)]
    pub trained: TrainSummary,
    /// The classes it covers.
    pub classes: Vec<usize>,
    /// Training examples of its own classes.
    pub own_examples: usize,
    /// Fraction of dustbin examples in the training split.
    pub natural_dustbin: f64,
    /// Fraction of dustbin examples in its training stream.
    pub trained_dustbin: f64,
    /// What was added to the dustbin logit after training.
    pub dustbin_correction: f64,
}

impl TaskKind for SpecialistTask {
    /// The training and validation splits, the generalist and the
    /// clusters.
    fn inputs(&self, job: &JobLayout<'_>) -> Vec<ArtifactName> {
        let mut inputs = dataset_inputs(job.dataset, job.dataset.all(Split::Train), true, false);
        inputs.push(ArtifactName::Model(self.generalist.clone()));
        inputs.push(ArtifactName::Clusters);
        inputs
    }

    fn output(&self) -> ArtifactName {
        ArtifactName::Model(self.model.clone())
    }

    fn run(&self, run: Run<'_>) -> Result<TaskOutput> {
        let Run(inputs, device, observer) = run;
        let data = inputs.data;
        let clusters = inputs.clusters.as_ref().ok_or_else(|| {
            Error::invalid(
                "task inputs",
                format!("{} needs the specialists' classes", self.model),
            )
        })?;
        let classes = clusters.clusters.get(self.index).ok_or_else(|| {
            Error::invalid(
                "specialist index",
                format!("{} of {} clusters", self.index, clusters.clusters.len()),
            )
        })?;
        let generalist = load_mlp(inputs, &self.generalist, device)?;
        let started = Instant::now();
        let validation = data.validation.load_all()?;
        let (model, training) = train_specialist(
            &generalist,
            classes,
            (data.train, &validation),
            &self.train,
            device,
            observer,
        )?;
        let summary = SpecialistSummary {
            trained: TrainSummary {
                train_seconds: started.elapsed().as_secs_f64(),
                examples: training.examples_per_epoch,
                training: training.training,
                test_errors_per_epoch: None,
            },
            classes: classes.clone(),
            own_examples: training.own_examples,
            natural_dustbin: training.natural_dustbin,
            trained_dustbin: training.trained_dustbin,
            dustbin_correction: training.dustbin_correction,
        };
        let payload = model_io::mlp_to_bytes(&model, data.train.normalization())?;
        Ok(TaskOutput::new(payload, &summary))
    }
}
