//! Evaluation: logits over a dataset, errors, accuracy, per-class errors and
//! the confusion matrix; and [`Logits`], what evaluation, inference into
//! the transfer set and eq. 5 ask of a trained model.

use candle_core::{DType, Device, Tensor, D};
use common::dataset::Dataset;
use serde::{Deserialize, Serialize};

use crate::fused::CpuForward;
use crate::model::Mlp;
use crate::Result;

/// Rows per inference batch.
pub const INFERENCE_BATCH: usize = 1024;

/// How well a model classifies a dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Misclassified examples.
    pub errors: usize,
    /// Examples evaluated.
    pub total: usize,
    /// Misclassified examples per true class.
    pub per_class_errors: Vec<usize>,
    /// Examples per true class.
    pub per_class_totals: Vec<usize>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

impl Evaluation {
    /// Tallies predictions against labels over `num_classes` classes.
    pub fn from_predictions(labels: &[u32], predicted: &[u32], num_classes: usize) -> Self {
        let mut confusion = vec![vec![0; num_classes]; num_classes];
        for (&l, &p) in labels.iter().zip(predicted) {
            confusion[l as usize][p as usize] += 1;
        }
        let per_class_totals: Vec<usize> = confusion.iter().map(|row| row.iter().sum()).collect();
        let per_class_errors: Vec<usize> = confusion
            .iter()
            .enumerate()
            .map(|(c, row)| per_class_totals[c] - row[c])
            .collect();
        Evaluation {
            errors: per_class_errors.iter().sum(),
            total: labels.len(),
            per_class_errors,
            per_class_totals,
            confusion,
        }
    }

    /// Fraction classified correctly.
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        1.0 - self.errors as f64 / self.total as f64
    }
}

/// Calls `f` with the inputs of consecutive batches of `data` as tensors of
/// at most [`INFERENCE_BATCH`] rows.
fn for_each_batch(
    data: &Dataset,
    device: &Device,
    f: impl FnMut(std::ops::Range<usize>, &Tensor) -> Result<()>,
) -> Result<()> {
    for_each_batch_in(data, 0..data.len(), device, f)
}

/// [`for_each_batch`] over the examples in `rows` only.
fn for_each_batch_in(
    data: &Dataset,
    rows: std::ops::Range<usize>,
    device: &Device,
    mut f: impl FnMut(std::ops::Range<usize>, &Tensor) -> Result<()>,
) -> Result<()> {
    let dim = data.dim();
    for start in rows.clone().step_by(INFERENCE_BATCH) {
        let end = (start + INFERENCE_BATCH).min(rows.end);
        let x = Tensor::from_slice(
            &data.features()[start * dim..end * dim],
            (end - start, dim),
            device,
        )?;
        f(start..end, &x)?;
    }
    Ok(())
}

/// The model's logits for every example, row-major `[len, classes]`.
pub fn predict_logits(model: &Mlp, data: &Dataset, device: &Device) -> Result<Vec<f32>> {
    Predictor::new(model, device)?.logits(data)
}

/// A trained model that gives class scores for examples: what evaluation,
/// inference into the transfer set and eq. 5 ask of a teacher. [`Predictor`]
/// is the MLP's; a model of another family (an ONNX teacher) is another
/// implementation.
pub trait Logits {
    /// Input features per example.
    fn input_dim(&self) -> usize;

    /// Outputs (classes) per example.
    fn num_classes(&self) -> usize;

    /// Trainable parameters.
    fn parameters(&self) -> usize;

    /// The logits of the examples `rows` of `data`, row-major
    /// `[rows, classes]`.
    fn logits_of(&self, data: &Dataset, rows: std::ops::Range<usize>) -> Result<Vec<f32>>;

    /// The logits of every example of `data`, row-major.
    fn logits(&self, data: &Dataset) -> Result<Vec<f32>> {
        self.logits_of(data, 0..data.len())
    }
}

/// An MLP ready to compute logits on `device`, for several datasets in a
/// row (on CPU the weights are laid out for inference once, not per call).
pub struct Predictor {
    model: Mlp,
    device: Device,
    cpu: Option<CpuForward>,
}

impl Predictor {
    /// Prepares `model` for inference on `device` (the weights are shared,
    /// not copied).
    pub fn new(model: &Mlp, device: &Device) -> Result<Self> {
        let cpu = if device.is_cpu() {
            Some(CpuForward::new(model)?)
        } else {
            None
        };
        Ok(Predictor {
            model: model.clone(),
            device: device.clone(),
            cpu,
        })
    }

    /// The model.
    pub fn model(&self) -> &Mlp {
        &self.model
    }
}

impl Logits for Predictor {
    fn input_dim(&self) -> usize {
        self.model.spec().input_dim
    }

    fn num_classes(&self) -> usize {
        self.model.spec().num_classes
    }

    fn parameters(&self) -> usize {
        self.model
            .spec()
            .layer_dims()
            .iter()
            .map(|(i, o)| i * o + o)
            .sum()
    }

    /// Nothing is copied out of `data` on CPU.
    fn logits_of(&self, data: &Dataset, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        if rows.end > data.len() || rows.start > rows.end {
            return Err(crate::Error::invalid(
                "rows",
                format!("{rows:?} is not within the {} examples", data.len()),
            ));
        }
        if let Some(cpu) = &self.cpu {
            let dim = data.dim();
            return Ok(cpu.logits(&data.features()[rows.start * dim..rows.end * dim]));
        }
        let mut out = Vec::with_capacity(rows.len() * self.model.spec().num_classes);
        for_each_batch_in(data, rows, &self.device, |_, x| {
            out.extend(self.model.forward(x)?.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        })?;
        Ok(out)
    }
}

/// Evaluates `model` on `data` from its logits (the arg-max class of each
/// row).
pub fn evaluate_logits(model: &dyn Logits, data: &Dataset) -> Result<Evaluation> {
    let predicted = argmax_rows_host(&model.logits(data)?, model.num_classes());
    Ok(Evaluation::from_predictions(
        data.labels(),
        &predicted,
        data.num_classes(),
    ))
}

/// The arg-max class of each row of `[rows, classes]` logits on a device.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?)
}

/// The arg-max class of each row of host-side `[rows, classes]` scores (the
/// first maximum on ties, like [`argmax_rows`]).
pub fn argmax_rows_host(scores: &[f32], classes: usize) -> Vec<u32> {
    scores
        .chunks_exact(classes)
        .map(|row| {
            let mut best = 0;
            for (c, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = c;
                }
            }
            best as u32
        })
        .collect()
}

/// Evaluates `model` on `data`.
pub fn evaluate(model: &Mlp, data: &Dataset, device: &Device) -> Result<Evaluation> {
    if device.is_cpu() {
        return evaluate_logits(&Predictor::new(model, device)?, data);
    }
    // Elsewhere the arg-max is taken on the device: only classes come back.
    let mut predicted = Vec::with_capacity(data.len());
    for_each_batch(data, device, |_, x| {
        predicted.extend(argmax_rows(&model.forward(x)?)?);
        Ok(())
    })?;
    Ok(Evaluation::from_predictions(
        data.labels(),
        &predicted,
        data.num_classes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_argmax_takes_the_first_maximum() {
        assert_eq!(
            argmax_rows_host(&[0.1, 0.7, 0.2, 0.5, 0.5, 0.0], 3),
            vec![1, 0]
        );
    }

    #[test]
    fn tallies_errors_per_class_and_confusion() {
        let e = Evaluation::from_predictions(&[0, 0, 1, 2, 2, 2], &[0, 1, 1, 2, 0, 2], 3);
        assert_eq!(e.errors, 2);
        assert_eq!(e.total, 6);
        assert_eq!(e.per_class_errors, vec![1, 0, 1]);
        assert_eq!(e.per_class_totals, vec![2, 1, 3]);
        assert_eq!(
            e.confusion,
            vec![vec![1, 1, 0], vec![0, 1, 0], vec![1, 0, 2]]
        );
        assert!((e.accuracy() - 4.0 / 6.0).abs() < 1e-12);
    }
}
