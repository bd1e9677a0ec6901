//! The generalist and its specialists combined per example by eq. 5, as
//! one model: what inference into the transfer set and evaluation share.

use candle_core::Device;
use common::artifact::ArtifactName;
use common::dataset::Dataset;
use serde::{Deserialize, Serialize};

use super::evaluate::ModelEvaluation;
use super::{load_model, load_model_file, HeldOut, TaskInputs};
use crate::eval::{argmax_rows_host, evaluate_logits, Evaluation, Logits};
use crate::specialists::ensemble::{Clusters, SpecialistEnsemble};
use crate::specialists::specialist::relabel;
use crate::{Error, Result};

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

/// What a task reading `models` and maybe the combination reads besides
/// the dataset: the models, then what the combination needs besides them
/// (the generalist unless among them, the specialists, the clusters).
pub(super) fn models_and_combination(
    models: &[String],
    combined: Option<&CombinedSpec>,
) -> Vec<ArtifactName> {
    let mut inputs = Vec::new();
    inputs.extend(models.iter().cloned().map(ArtifactName::Model));
    if let Some(combined) = combined {
        let generalist = ArtifactName::Model(combined.generalist.clone());
        if !inputs.contains(&generalist) {
            inputs.push(generalist);
        }
        inputs.extend(
            combined
                .specialists
                .iter()
                .cloned()
                .map(ArtifactName::Model),
        );
        inputs.push(ArtifactName::Clusters);
    }
    inputs
}

/// A generalist and its specialists, loaded with their classes.
pub(super) struct CombinedModels<'a> {
    generalist: Box<dyn Logits>,
    specialists: Vec<Box<dyn Logits>>,
    clusters: &'a Clusters,
}

impl<'a> CombinedModels<'a> {
    pub(super) fn load(
        spec: &CombinedSpec,
        inputs: &'a TaskInputs<'_>,
        device: &Device,
    ) -> Result<Self> {
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

    /// The eq. 5 combination of the models (which it takes).
    pub(super) fn into_ensemble(self, spec: &CombinedSpec) -> Result<SpecialistEnsemble<'a>> {
        SpecialistEnsemble::new(self.generalist, self.specialists, self.clusters, spec.top_n)
    }
}

/// Each specialist evaluated on its own task (its classes + dustbin, on
/// the relabelled splits), then the combination on the real one.
pub(super) fn evaluate_combined(
    spec: &CombinedSpec,
    inputs: &TaskInputs<'_>,
    splits: &HeldOut<'_>,
    device: &Device,
) -> Result<Vec<ModelEvaluation>> {
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
            params: model.parameters(),
            validation_errors: evaluate_logits(&**model, &relabel(&splits.validation, classes)?)?
                .errors,
            test: evaluate_logits(&**model, &relabel(&splits.test, classes)?)?,
            bias_shift: None,
        });
    }
    let params = models.generalist.parameters()
        + models
            .specialists
            .iter()
            .map(|m| m.parameters())
            .sum::<usize>();
    let ensemble = models.into_ensemble(spec)?;
    let classes = splits.test.num_classes();
    let predict = |data: &Dataset| -> Result<Vec<u32>> {
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
        params,
        validation_errors: validation.errors,
        test: Evaluation::from_predictions(splits.test.labels(), &predict(&splits.test)?, classes),
        bias_shift: None,
    });
    Ok(results)
}

/// A specialist's model file (its outputs are its classes + dustbin, so it
/// is not checked against the data's classes, only its input).
fn load_specialist(
    inputs: &TaskInputs<'_>,
    name: &str,
    device: &Device,
) -> Result<Box<dyn Logits>> {
    let model = load_model_file(inputs, name, device)?;
    let input_dim = model.architecture().input_dim();
    if input_dim != inputs.data.train.dim() {
        return Err(Error::invalid(
            "specialist",
            format!(
                "{name} reads {input_dim} features, the data has {}",
                inputs.data.train.dim()
            ),
        ));
    }
    model.into_logits(device)
}
