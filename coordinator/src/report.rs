//! The job's report: `report.json` for machines and `report.md` for people,
//! built from the evaluation task's results and the training tasks' records.

use std::path::Path;

use distill::task::ModelEvaluation;
use serde::Serialize;

use crate::config::ClusterConfig;
use crate::job::TaskRecord;
use crate::plan::{BASELINE, ENSEMBLE, STUDENT};

/// `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Dataset name (`synthetic`, `mnist`, `fashion-mnist`).
    pub dataset: String,
    /// The job's seed.
    pub seed: u64,
    /// Training / validation / test examples.
    pub train_examples: usize,
    /// Validation examples.
    pub validation_examples: usize,
    /// Test examples.
    pub test_examples: usize,
    /// Seconds from the coordinator's start to the report.
    pub wall_seconds: f64,
    /// The transfer set.
    pub transfer_set: TransferSummary,
    /// Every model, teachers first, the primary student marked.
    pub models: Vec<ModelReport>,
}

/// The transfer set in the report.
#[derive(Clone, Debug, Serialize)]
pub struct TransferSummary {
    /// Transfer examples (the training split).
    pub examples: usize,
    /// Teacher names.
    pub teachers: Vec<String>,
    /// Shard files.
    pub shards: usize,
    /// Bytes of all shard files.
    pub bytes: u64,
    /// Folder (relative to the output folder).
    pub dir: String,
}

/// One model in the report.
#[derive(Clone, Debug, Serialize)]
pub struct ModelReport {
    /// Its name.
    pub name: String,
    /// `teacher`, `ensemble`, `student` or `baseline`.
    pub role: String,
    /// The models it learned from (empty for hard-label models).
    pub teachers: Vec<String>,
    /// Distillation temperature (distilled models only).
    pub temperature: Option<f64>,
    /// True for the one student the job is about.
    pub primary: bool,
    /// Architecture such as `784-800-800-10` (members joined by `+` for an ensemble).
    pub architecture: String,
    /// Trainable parameters.
    pub params: usize,
    /// Errors on the validation split.
    pub validation_errors: usize,
    /// Errors on the test set.
    pub test_errors: usize,
    /// Fraction of the test set classified correctly.
    pub test_accuracy: f64,
    /// Test errors per true class.
    pub per_class_errors: Vec<usize>,
    /// Test examples per true class.
    pub per_class_totals: Vec<usize>,
    /// Seconds of training, without fetching inputs (0 for an ensemble).
    pub train_seconds: f64,
    /// Epoch whose weights were kept (trained models).
    pub selected_epoch: Option<usize>,
    /// Model file, relative to the output folder (trained models).
    pub file: Option<String>,
    /// For `student+bias`: the shift applied to the adjusted classes' biases.
    pub bias_shift: Option<f64>,
    /// Training examples it learned from (trained models).
    pub training_examples: Option<usize>,
    /// Validation errors after each epoch (trained models).
    pub validation_errors_per_epoch: Vec<usize>,
    /// Test errors after each epoch, when the job records test curves.
    pub test_errors_per_epoch: Option<Vec<usize>>,
    /// Whether the result came from the task cache instead of a worker.
    pub cached: bool,
}

/// Sizes of the job's splits.
#[derive(Clone, Copy, Debug)]
pub struct SplitSizes {
    /// Training examples.
    pub train: usize,
    /// Validation examples.
    pub validation: usize,
    /// Test examples.
    pub test: usize,
    /// Input features.
    pub dim: usize,
    /// Classes.
    pub classes: usize,
}

/// Assembles the report.
pub fn build(
    cfg: &ClusterConfig,
    sizes: SplitSizes,
    teachers: &[String],
    evaluations: &[ModelEvaluation],
    records: &std::collections::HashMap<String, TaskRecord>,
    transfer: TransferSummary,
    wall_seconds: f64,
) -> Report {
    let arch = |hidden: &[usize]| {
        std::iter::once(sizes.dim)
            .chain(hidden.iter().copied())
            .chain(std::iter::once(sizes.classes))
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("-")
    };
    let models = evaluations
        .iter()
        .map(|e| {
            let adjusted = e.bias_shift.is_some();
            // A bias-adjusted model is reported under its own name but
            // described (and its training found) as the model it adjusts.
            let name = e
                .name
                .strip_suffix("+bias")
                .filter(|_| adjusted)
                .unwrap_or(&e.name);
            let (role, learned_from, temperature, architecture) = match name {
                STUDENT => (
                    "student",
                    teachers.to_vec(),
                    Some(cfg.student.distill.temperature),
                    arch(&cfg.student.hidden),
                ),
                BASELINE => ("baseline", vec![], None, arch(&cfg.student.hidden)),
                ENSEMBLE => (
                    "ensemble",
                    teachers.to_vec(),
                    None,
                    vec![arch(&cfg.teachers.hidden); teachers.len()].join("+"),
                ),
                _ => ("teacher", vec![], None, arch(&cfg.teachers.hidden)),
            };
            let record = records.get(name);
            let summary = record.map(|r| &r.summary);
            ModelReport {
                name: e.name.clone(),
                role: role.into(),
                teachers: learned_from,
                temperature,
                primary: e.name == STUDENT,
                architecture,
                params: e.params,
                validation_errors: e.validation_errors,
                test_errors: e.test.errors,
                test_accuracy: e.test.accuracy(),
                per_class_errors: e.test.per_class_errors.clone(),
                per_class_totals: e.test.per_class_totals.clone(),
                // The training itself, without fetching inputs (the
                // task's whole time when the summary lacks it).
                train_seconds: summary
                    .and_then(|s| s.get("train_seconds"))
                    .and_then(|v| v.as_f64())
                    .or(record.map(|r| r.seconds))
                    .unwrap_or(0.0),
                selected_epoch: summary
                    .and_then(|s| s.pointer("/training/selected_epoch"))
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize),
                file: (role != "ensemble" && !adjusted)
                    .then(|| format!("models/{name}.safetensors")),
                bias_shift: e.bias_shift,
                training_examples: summary
                    .and_then(|s| s.get("examples"))
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize),
                validation_errors_per_epoch: summary
                    .and_then(|s| s.pointer("/training/epochs"))
                    .and_then(|v| v.as_array())
                    .map(|epochs| {
                        epochs
                            .iter()
                            .filter_map(|e| e.get("validation_errors")?.as_u64())
                            .map(|v| v as usize)
                            .collect()
                    })
                    .unwrap_or_default(),
                test_errors_per_epoch: summary
                    .and_then(|s| s.get("test_errors_per_epoch"))
                    .and_then(|v| serde_json::from_value(v.clone()).ok()),
                cached: record.is_some_and(|r| r.cached),
            }
        })
        .collect();
    Report {
        dataset: cfg.dataset.source.name().into(),
        seed: cfg.seed,
        train_examples: sizes.train,
        validation_examples: sizes.validation,
        test_examples: sizes.test,
        wall_seconds,
        transfer_set: transfer,
        models,
    }
}

impl Report {
    /// The report as a Markdown table with a short header.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# Distillation report: {}\n\nseed {}; {} training, {} validation, {} test examples; \
             transfer set of {} examples from {} teacher(s) in {} shards ({} bytes); {:.1} s wall time.\n\n",
            self.dataset,
            self.seed,
            self.train_examples,
            self.validation_examples,
            self.test_examples,
            self.transfer_set.examples,
            self.transfer_set.teachers.len(),
            self.transfer_set.shards,
            self.transfer_set.bytes,
            self.wall_seconds
        );
        s.push_str("| model | role | architecture | params | T | validation errors | test errors | test accuracy | kept epoch | train s |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for m in &self.models {
            s.push_str(&format!(
                "| {}{} | {} | {} | {} | {} | {} | {} / {} | {:.2}% | {} | {:.1} |\n",
                m.name,
                if m.primary { " (primary)" } else { "" },
                m.role,
                m.architecture,
                m.params,
                m.temperature.map_or("-".into(), |t| t.to_string()),
                m.validation_errors,
                m.test_errors,
                self.test_examples,
                100.0 * m.test_accuracy,
                m.selected_epoch.map_or("-".into(), |e| e.to_string()),
                m.train_seconds
            ));
        }
        s
    }

    /// Writes `report.json` and `report.md` into `dir` (atomically).
    pub fn write(&self, dir: &Path) -> common::Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("a report serialises");
        common::atomic_file::write_atomic(&dir.join("report.json"), &json)?;
        common::atomic_file::write_atomic(&dir.join("report.md"), self.to_markdown().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill::eval::Evaluation;
    use std::collections::HashMap;

    fn evaluation(name: &str, errors: &[usize]) -> ModelEvaluation {
        let labels: Vec<u32> = (0..10).map(|i| i % 2).collect();
        let mut predicted = labels.clone();
        for (slot, &count) in errors.iter().enumerate() {
            for k in 0..count {
                let i = 2 * k + slot;
                predicted[i] = 1 - predicted[i];
            }
        }
        ModelEvaluation {
            name: name.into(),
            params: 7,
            validation_errors: 1,
            test: Evaluation::from_predictions(&labels, &predicted, 2),
            bias_shift: None,
        }
    }

    #[test]
    fn roles_primary_student_and_training_seconds_come_out_right() {
        let text = "output_dir = \"o\"\n[dataset]\nsource = \"synthetic\"\n[teachers]\ncount = 2\n\
                    hidden = [8]\n[student]\nhidden = [4]\n[student.distill]\ntemperature = 3.0\n";
        let cfg = ClusterConfig::parse(text, Path::new("c.toml"), Path::new(".")).unwrap();
        let teachers = vec!["teacher-0".to_string(), "teacher-1".to_string()];
        let evaluations = vec![
            evaluation("teacher-0", &[1, 0]),
            evaluation("teacher-1", &[0, 0]),
            evaluation(STUDENT, &[1, 1]),
            evaluation(BASELINE, &[2, 1]),
            evaluation(ENSEMBLE, &[0, 0]),
            ModelEvaluation {
                bias_shift: Some(3.5),
                ..evaluation("student+bias", &[0, 1])
            },
        ];
        let records = HashMap::from([
            (
                STUDENT.to_string(),
                TaskRecord {
                    summary: serde_json::json!({
                        "train_seconds": 2.5,
                        "examples": 80,
                        "test_errors_per_epoch": [3, 2],
                        "training": {
                            "selected_epoch": 4,
                            "epochs": [{"validation_errors": 5}, {"validation_errors": 4}]
                        }
                    }),
                    seconds: 3.0,
                    cached: false,
                },
            ),
            (
                BASELINE.to_string(),
                TaskRecord {
                    summary: serde_json::Value::Null,
                    seconds: 1.5,
                    cached: true,
                },
            ),
        ]);
        let sizes = SplitSizes {
            train: 80,
            validation: 10,
            test: 10,
            dim: 5,
            classes: 2,
        };
        let transfer = TransferSummary {
            examples: 80,
            teachers: teachers.clone(),
            shards: 2,
            bytes: 100,
            dir: "transfer".into(),
        };
        let report = build(
            &cfg,
            sizes,
            &teachers,
            &evaluations,
            &records,
            transfer,
            9.0,
        );
        let roles: Vec<&str> = report.models.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["teacher", "teacher", "student", "baseline", "ensemble", "student"]
        );
        let adjusted = &report.models[5];
        assert!(!adjusted.primary && adjusted.file.is_none());
        assert_eq!(adjusted.bias_shift, Some(3.5));
        assert_eq!(adjusted.test_errors, 1);
        let student = &report.models[2];
        assert!(student.primary && report.models.iter().filter(|m| m.primary).count() == 1);
        assert_eq!(student.teachers, teachers);
        assert_eq!(student.temperature, Some(3.0));
        assert_eq!(student.architecture, "5-4-2");
        assert_eq!(
            (student.test_errors, student.per_class_errors.clone()),
            (2, vec![1, 1])
        );
        assert!((student.test_accuracy - 0.8).abs() < 1e-12);
        assert_eq!(
            (student.train_seconds, student.selected_epoch),
            (2.5, Some(4))
        );
        assert_eq!(student.training_examples, Some(80));
        assert_eq!(student.validation_errors_per_epoch, vec![5, 4]);
        assert_eq!(student.test_errors_per_epoch, Some(vec![3, 2]));
        assert!(!student.cached && report.models[3].cached);
        assert_eq!(
            report.models[3].train_seconds, 1.5,
            "falls back to the task's time"
        );
        assert!(report.models[3].teachers.is_empty() && report.models[3].temperature.is_none());
        assert_eq!(report.models[4].file, None);
        assert_eq!(report.models[4].architecture, "5-8-2+5-8-2");
        let md = report.to_markdown();
        assert!(
            md.contains("| student (primary) | student | 5-4-2 |"),
            "{md}"
        );
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "dataset",
            "test_examples",
            "wall_seconds",
            "transfer_set",
            "models",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
    }
}
