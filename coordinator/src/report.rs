//! The job's report: `report.json` for machines and `report.md` for people,
//! built from the evaluation task's results and the training tasks' records.

use std::collections::HashMap;

use common::blob::{self, BlobError, BlobStore, PutMode};
use distill::model::ModelShape;
use distill::specialists::ensemble::Clusters;
use distill::task::{ModelEvaluation, TaskSummary};
use serde::Serialize;

use crate::config::ClusterConfig;

/// The report's key in the job's store, as JSON and as Markdown.
pub const REPORT_JSON: &str = "report.json";
/// See [`REPORT_JSON`].
pub const REPORT_MD: &str = "report.md";
use crate::job::TaskRecord;
use crate::plan::{Plan, Role, COMBINED, STUDENT, STUDENT_COMBINED};

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
    /// With specialists: their classes, the paper's Table 4 and the
    /// comparison of the generalist, the combination and both students.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specialists: Option<SpecialistsReport>,
}

/// The specialists' part of the report.
#[derive(Clone, Debug, Serialize)]
pub struct SpecialistsReport {
    /// The classes of each specialist, in model order.
    pub clusters: Vec<Vec<usize>>,
    /// Specialists active per example: those covering any of the
    /// generalist's `top_n` most probable classes.
    pub top_n: usize,
    /// The paper's Table 4: test examples grouped by how many specialists
    /// cover their true class.
    pub by_coverage: Vec<CoverageGroup>,
    /// Test accuracy of the generalist alone.
    pub generalist_test_accuracy: f64,
    /// Test accuracy of the generalist+specialists combination.
    pub combined_test_accuracy: f64,
    /// `combined / generalist - 1` (the paper: +4.4% on JFT).
    pub relative_accuracy_gain: f64,
    /// Generalist, combination, student from the generalist, student from
    /// the combination: test errors side by side.
    pub comparison: Vec<ComparisonRow>,
}

/// One row of Table 4.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CoverageGroup {
    /// Number of specialists covering the true class.
    pub specialists_covering: usize,
    /// Test examples whose true class is covered that many times.
    pub test_examples: usize,
    /// Of them, classified correctly by the generalist alone.
    pub generalist_correct: usize,
    /// Of them, classified correctly by the combination.
    pub combined_correct: usize,
    /// `combined_correct - generalist_correct`.
    pub delta_correct: i64,
    /// `delta_correct / generalist_correct` (0 when it has none right).
    pub relative_accuracy_change: f64,
}

/// One model in the specialists comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ComparisonRow {
    /// What the model is.
    pub what: String,
    /// Its name in `models`.
    pub model: String,
    /// Test errors.
    pub test_errors: usize,
    /// Test accuracy.
    pub test_accuracy: f64,
}

/// What the job's tasks produced, for the report.
#[derive(Clone, Copy, Debug)]
pub struct Outcomes<'a> {
    /// The evaluation task's results.
    pub evaluations: &'a [ModelEvaluation],
    /// Finished tasks' records by task id.
    pub records: &'a HashMap<String, TaskRecord>,
    /// The specialists' classes (jobs with specialists).
    pub clusters: Option<&'a Clusters>,
    /// Each model's stored key (`models/<name>.safetensors`, or with S3 its
    /// committed attempt); a model missing here is named by that default.
    pub model_keys: &'a HashMap<String, String>,
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
    /// `teacher`, `ensemble`, `student`, `baseline`, `specialist` (its
    /// errors are on its own task: its classes + dustbin) or `combined`
    /// (the generalist+specialists by eq. 5).
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
    plan: &Plan,
    outcomes: Outcomes<'_>,
    transfer: TransferSummary,
    wall_seconds: f64,
) -> Report {
    let Outcomes {
        evaluations,
        records,
        clusters,
        model_keys,
    } = outcomes;
    let teachers = &plan.teachers[..];
    let arch_to = |shape: &ModelShape, outputs: usize| {
        shape
            .for_data(sizes.dim, outputs)
            .map_or_else(|e| format!("({e})"), |a| a.describe())
    };
    let (teacher_shape, student_shape) = (cfg.teachers.shape(), cfg.student.shape());
    let arch = |shape: &ModelShape| arch_to(shape, sizes.classes);
    let specialist_arch = |name: &str| {
        let m = plan.specialists.iter().position(|s| s == name)?;
        let covered = clusters?.clusters.get(m)?.len();
        Some(arch_to(&teacher_shape, covered + 1))
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
            let planned = plan.models.get(name);
            let role = planned.map_or(Role::Teacher, |m| m.role);
            let learned_from = planned.map(|m| m.learned_from.clone()).unwrap_or_default();
            let architecture = match role {
                Role::Student | Role::Baseline => arch(&student_shape),
                Role::Teacher => arch(&teacher_shape),
                Role::Ensemble => vec![arch(&teacher_shape); teachers.len()].join("+"),
                Role::Specialist => specialist_arch(name).unwrap_or_default(),
                Role::Combined => format!(
                    "{} + {} specialists",
                    arch(&teacher_shape),
                    plan.specialists.len()
                ),
            };
            let temperature = (role == Role::Student).then_some(cfg.student.distill.temperature);
            let record = records.get(name);
            let trained = record.and_then(|r| {
                let task = plan.tasks.iter().find(|t| t.id == name)?;
                task.spec.summary(&r.summary)
            });
            let trained = trained.as_ref().and_then(TaskSummary::trained);
            ModelReport {
                name: e.name.clone(),
                role: role.as_str().into(),
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
                train_seconds: trained
                    .map(|t| t.train_seconds)
                    .or(record.map(|r| r.seconds))
                    .unwrap_or(0.0),
                selected_epoch: trained.map(|t| t.training.selected_epoch),
                file: (!matches!(role, Role::Ensemble | Role::Combined) && !adjusted).then(|| {
                    model_keys
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| format!("models/{name}.safetensors"))
                }),
                bias_shift: e.bias_shift,
                training_examples: trained.map(|t| t.examples),
                validation_errors_per_epoch: trained
                    .map(|t| {
                        t.training
                            .epochs
                            .iter()
                            .map(|e| e.validation_errors)
                            .collect()
                    })
                    .unwrap_or_default(),
                test_errors_per_epoch: trained.and_then(|t| t.test_errors_per_epoch.clone()),
                cached: record.is_some_and(|r| r.cached),
            }
        })
        .collect::<Vec<ModelReport>>();
    let specialists = clusters.and_then(|c| specialists_report(cfg, teachers, c, &models));
    Report {
        dataset: cfg.dataset.source.name().into(),
        seed: cfg.seed,
        train_examples: sizes.train,
        validation_examples: sizes.validation,
        test_examples: sizes.test,
        wall_seconds,
        transfer_set: transfer,
        models,
        specialists,
    }
}

/// Table 4 and the comparison, from the per-class test errors of the
/// generalist and the combination; `None` when either is missing.
fn specialists_report(
    cfg: &ClusterConfig,
    teachers: &[String],
    clusters: &Clusters,
    models: &[ModelReport],
) -> Option<SpecialistsReport> {
    let find = |name: &str| models.iter().find(|m| m.name == name);
    let generalist = find(teachers.first()?)?;
    let combined = find(COMBINED)?;
    let coverage = clusters.coverage();
    let most = coverage.iter().copied().max().unwrap_or(0);
    let correct = |m: &ModelReport, classes: &[usize]| -> usize {
        classes
            .iter()
            .map(|&c| m.per_class_totals[c] - m.per_class_errors[c])
            .sum()
    };
    let by_coverage = (0..=most)
        .filter_map(|k| {
            let classes: Vec<usize> = (0..coverage.len()).filter(|&c| coverage[c] == k).collect();
            let test_examples: usize = classes
                .iter()
                .map(|&c| generalist.per_class_totals[c])
                .sum();
            if classes.is_empty() || test_examples == 0 {
                return None;
            }
            let (g, q) = (correct(generalist, &classes), correct(combined, &classes));
            let delta = q as i64 - g as i64;
            Some(CoverageGroup {
                specialists_covering: k,
                test_examples,
                generalist_correct: g,
                combined_correct: q,
                delta_correct: delta,
                relative_accuracy_change: if g == 0 { 0.0 } else { delta as f64 / g as f64 },
            })
        })
        .collect();
    let row = |what: &str, name: &str| {
        find(name).map(|m| ComparisonRow {
            what: what.into(),
            model: name.into(),
            test_errors: m.test_errors,
            test_accuracy: m.test_accuracy,
        })
    };
    let comparison = [
        row("generalist", &generalist.name),
        row("generalist + specialists (eq. 5)", COMBINED),
        row("student from the generalist", STUDENT),
        row("student from generalist + specialists", STUDENT_COMBINED),
    ]
    .into_iter()
    .flatten()
    .collect();
    Some(SpecialistsReport {
        clusters: clusters.clusters.clone(),
        top_n: cfg.specialists.as_ref().map_or(1, |s| s.top_n),
        by_coverage,
        generalist_test_accuracy: generalist.test_accuracy,
        combined_test_accuracy: combined.test_accuracy,
        relative_accuracy_gain: if generalist.test_accuracy > 0.0 {
            combined.test_accuracy / generalist.test_accuracy - 1.0
        } else {
            0.0
        },
        comparison,
    })
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
        if let Some(sp) = &self.specialists {
            s.push_str(&sp.to_markdown(self.test_examples));
        }
        s
    }

    /// Writes `report.json` and `report.md` into the job's store
    /// (replacing a report of an earlier run: it is derived).
    pub async fn write(&self, store: &dyn BlobStore) -> Result<(), BlobError> {
        let json = serde_json::to_vec_pretty(self).expect("a report serialises");
        blob::put_bytes(store, REPORT_JSON, json, PutMode::Overwrite).await?;
        let md = self.to_markdown().into_bytes();
        blob::put_bytes(store, REPORT_MD, md, PutMode::Overwrite).await?;
        Ok(())
    }
}

impl SpecialistsReport {
    fn to_markdown(&self, test_examples: usize) -> String {
        let mut s = format!(
            "\n## Specialists\n\n{} specialists (active: those covering any of the generalist's top {} classes); classes: {}.\n\n",
            self.clusters.len(),
            self.top_n,
            self.clusters
                .iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        s.push_str("| specialists covering the true class | test examples | generalist correct | combined correct | change in correct | relative accuracy change |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for g in &self.by_coverage {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:+} | {:+.2}% |\n",
                g.specialists_covering,
                g.test_examples,
                g.generalist_correct,
                g.combined_correct,
                g.delta_correct,
                100.0 * g.relative_accuracy_change
            ));
        }
        s.push_str(&format!(
            "\nTest accuracy: generalist {:.2}%, generalist + specialists {:.2}% (relative gain {:+.2}%; the paper: +4.4% on JFT).\n\n",
            100.0 * self.generalist_test_accuracy,
            100.0 * self.combined_test_accuracy,
            100.0 * self.relative_accuracy_gain
        ));
        s.push_str("| model | name | test errors | test accuracy |\n|---|---|---|---|\n");
        for r in &self.comparison {
            s.push_str(&format!(
                "| {} | {} | {} / {} | {:.2}% |\n",
                r.what,
                r.model,
                r.test_errors,
                test_examples,
                100.0 * r.test_accuracy
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{BASELINE, ENSEMBLE};
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
        let cfg = ClusterConfig::parse(
            text,
            std::path::Path::new("c.toml"),
            std::path::Path::new("."),
        )
        .unwrap();
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
                    summary: serde_json::to_value(distill::task::TrainSummary {
                        train_seconds: 2.5,
                        examples: 80,
                        test_errors_per_epoch: Some(vec![3, 2]),
                        training: distill::train::TrainReport {
                            selected_epoch: 4,
                            epochs: [5, 4]
                                .into_iter()
                                .enumerate()
                                .map(|(i, validation_errors)| distill::train::EpochStats {
                                    epoch: i + 1,
                                    mean_loss: 0.5,
                                    validation_errors,
                                    learning_rate: 0.1,
                                    seconds: 1.0,
                                    examples_per_second: 80.0,
                                    shard_wait_seconds: 0.0,
                                })
                                .collect(),
                        },
                    })
                    .unwrap(),
                    seconds: 3.0,
                    cached: false,
                    made_by: None,
                },
            ),
            (
                BASELINE.to_string(),
                TaskRecord {
                    summary: serde_json::Value::Null,
                    seconds: 1.5,
                    cached: true,
                    made_by: None,
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
        let plan = crate::plan::plan(
            &cfg,
            &common::dataset::shard::DatasetLayout::new([80, 10, 10], 65_536).unwrap(),
        )
        .unwrap();
        assert_eq!(plan.teachers, teachers);
        let report = build(
            &cfg,
            sizes,
            &plan,
            Outcomes {
                evaluations: &evaluations,
                records: &records,
                clusters: None,
                model_keys: &HashMap::new(),
            },
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
