//! Evaluating the trained models on the validation and test splits: each
//! model, the teachers' ensemble, a bias-adjusted student and the
//! specialists with their combination. The output is a JSON list of
//! [`ModelEvaluation`].

use std::collections::HashMap;
use std::time::Instant;

use common::artifact::ArtifactName;
use common::dataset::Dataset;
use common::transfer::{soft_targets, EnsembleCombine};
use serde::{Deserialize, Serialize};

use super::combined::{evaluate_combined, models_and_combination, CombinedSpec};
use super::{
    dataset_inputs, load_model, tick, Checked, HeldOut, JobLayout, Run, TaskKind, TaskOutput,
    TimedSummary,
};
use crate::eval::{argmax_rows_host, evaluate_logits, Evaluation, Logits};
use crate::{Error, Result};

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

impl TaskKind for EvaluateTask {
    /// The dataset, the models, and what the combination needs besides
    /// them.
    fn inputs(&self, job: &JobLayout<'_>) -> Vec<ArtifactName> {
        let mut inputs = dataset_inputs(job.dataset, [], true, true);
        inputs.extend(models_and_combination(&self.models, self.combined.as_ref()));
        inputs
    }

    fn output(&self) -> ArtifactName {
        ArtifactName::Evaluation
    }

    /// A list of evaluations.
    fn check_output(&self, payload: &[u8], _: usize) -> Result<Checked, String> {
        serde_json::from_slice(payload)
            .map(Checked::Evaluation)
            .map_err(|e| format!("not an evaluation list: {e}"))
    }

    fn run(&self, run: Run<'_>) -> Result<TaskOutput> {
        let Run(inputs, device, observer) = run;
        let splits = &inputs.data.held_out()?;
        let started = Instant::now();
        let mut results = Vec::new();
        let mut models = HashMap::new();
        for (k, name) in self.models.iter().enumerate() {
            let model = load_model(inputs, name, device)?;
            results.push(ModelEvaluation {
                name: name.clone(),
                params: model.parameters(),
                validation_errors: evaluate_logits(&*model, &splits.validation)?.errors,
                test: evaluate_logits(&*model, &splits.test)?,
                bias_shift: None,
            });
            models.insert(name.clone(), model);
            tick(observer, k + 1, started, splits.test.len() * (k + 1))?;
        }
        if let Some(ens) = &self.ensemble {
            results.push(evaluate_ensemble(ens, &models, splits)?);
        }
        if let Some(combined) = &self.combined {
            results.extend(evaluate_combined(combined, inputs, splits, device)?);
        }
        if let Some(adjustment) = &self.bias_adjustment {
            let model = models.get(&adjustment.model).ok_or_else(|| {
                Error::invalid(
                    "bias_adjustment.model",
                    format!("{} is not among the evaluated models", adjustment.model),
                )
            })?;
            results.push(evaluate_bias_adjusted(&**model, adjustment, splits)?);
        }
        let payload = serde_json::to_vec_pretty(&results).expect("evaluations serialise");
        let summary = TimedSummary {
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(TaskOutput::new(payload, &summary))
    }
}

/// The ensemble `ens` of some of the evaluated `models`, as one model.
fn evaluate_ensemble(
    ens: &EnsembleSpec,
    models: &HashMap<String, Box<dyn Logits>>,
    splits: &HeldOut<'_>,
) -> Result<ModelEvaluation> {
    let members = ens
        .members
        .iter()
        .map(|m| match models.get(m) {
            Some(model) => Ok(&**model),
            None => Err(Error::invalid(
                "ensemble",
                format!("member {m} is not among the evaluated models"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let predict = |data| ensemble_predictions(&members, data, ens.combine);
    let classes = splits.test.num_classes();
    let validation = Evaluation::from_predictions(
        splits.validation.labels(),
        &predict(&splits.validation)?,
        classes,
    );
    Ok(ModelEvaluation {
        name: ens.name.clone(),
        params: members.iter().map(|m| m.parameters()).sum(),
        validation_errors: validation.errors,
        test: Evaluation::from_predictions(splits.test.labels(), &predict(&splits.test)?, classes),
        bias_shift: None,
    })
}

/// Evaluates `model` with the output biases of `adjustment.classes` moved
/// (adding to a class's logit is the same as adding to its bias).
fn evaluate_bias_adjusted(
    model: &dyn Logits,
    adjustment: &BiasAdjustment,
    splits: &HeldOut<'_>,
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
    let validation_logits = model.logits(&splits.validation)?;
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
    let test_logits = model.logits(&splits.test)?;
    Ok(ModelEvaluation {
        name: format!("{}+bias", adjustment.model),
        params: model.parameters(),
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
    members: &[&dyn Logits],
    data: &Dataset,
    combine: EnsembleCombine,
) -> Result<Vec<u32>> {
    let logits = members
        .iter()
        .map(|m| m.logits(data))
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
    let probs = soft_targets(&views, data.num_classes(), 1.0, combine)?;
    Ok(argmax_rows_host(&probs, data.num_classes()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
