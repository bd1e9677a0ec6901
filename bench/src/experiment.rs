//! An experiment file (`bench/experiments/*.toml`): a base `cluster.toml`,
//! the seeds, and which of the paper's experiments to run over it. Each
//! experiment expands into variants (edits of the base config), and each
//! variant runs once per seed as a real coordinator job.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

/// One experiment file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// File stem of the results (`bench/results/<name>.{md,json,svg}`).
    pub name: String,
    /// Heading of the results.
    pub title: String,
    /// What the experiment costs and what was cut to fit it, in words.
    pub budget: String,
    /// Job seeds; each variant runs once per seed.
    pub seeds: Vec<u64>,
    /// Worker processes per job.
    #[serde(default = "two")]
    pub local_workers: usize,
    /// Compute threads per worker.
    #[serde(default = "one")]
    pub worker_threads: usize,
    /// The base `cluster.toml` (the runner sets `output_dir`, `seed` and
    /// `cache_dir`).
    pub cluster: toml::Table,
    /// Which experiment.
    pub experiment: Kind,
}

fn two() -> usize {
    2
}
fn one() -> usize {
    1
}

/// The paper's experiments.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Kind {
    /// Section 3's table: baseline, teacher, ensemble, student from one
    /// teacher and from the ensemble.
    PaperTable(PaperTable),
    /// Test errors of small students against the temperature.
    Temperature(TemperatureSweep),
    /// Classes left out of the transfer set, and the bias fix.
    MissingClasses(MissingClasses),
    /// Soft targets as a regulariser on a small fraction of the data.
    Regulariser(Regulariser),
}

/// `[experiment.paper_table]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperTable {
    /// Teachers in the ensemble.
    pub ensemble_size: usize,
    /// The paper's test errors, where it reports them.
    #[serde(default)]
    pub paper: Option<PaperErrors>,
}

/// The paper's section 3 test errors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaperErrors {
    /// 800-800 on hard labels.
    pub baseline: usize,
    /// 1200-1200 with dropout and jitter.
    pub teacher: usize,
    /// 800-800 distilled at T = 20.
    pub student: usize,
}

/// `[experiment.temperature]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemperatureSweep {
    /// Units per hidden layer of the students (two hidden layers each).
    pub hidden_sizes: Vec<usize>,
    /// Temperatures tried.
    pub temperatures: Vec<f64>,
}

/// `[experiment.missing_classes]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingClasses {
    /// The cases.
    pub cases: Vec<MissingCase>,
}

/// One transfer set with classes left out.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingCase {
    /// Short name (used in paths).
    pub name: String,
    /// Classes left out of the transfer set.
    #[serde(default)]
    pub exclude_classes: Vec<u32>,
    /// The only classes kept.
    #[serde(default)]
    pub only_classes: Vec<u32>,
    /// Classes whose output biases move afterwards.
    pub adjust_classes: Vec<u32>,
    /// The shift the paper used (the other run chooses it on validation).
    pub paper_shift: f64,
    /// What the paper reports for this case.
    pub paper: String,
}

impl MissingCase {
    /// The classes absent from the transfer set, among `classes`.
    pub fn missing(&self, classes: usize) -> Vec<u32> {
        (0..classes as u32)
            .filter(|c| {
                self.exclude_classes.contains(c)
                    || (!self.only_classes.is_empty() && !self.only_classes.contains(c))
            })
            .collect()
    }
}

/// `[experiment.regulariser]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regulariser {
    /// Fraction of the training split both models learn from.
    pub fraction: f64,
}

/// One edit of the base config: a dotted key and its new value.
pub type Edit = (String, toml::Value);

/// A configuration of the experiment, run once per seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// Folder name and label, such as `h30-T2.5`.
    pub label: String,
    /// Edits of the base config.
    pub edits: Vec<Edit>,
}

impl Experiment {
    /// Reads and checks an experiment file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let exp: Experiment =
            toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
        if exp.seeds.is_empty() {
            bail!("{}: `seeds` must list at least one seed", path.display());
        }
        if exp.local_workers == 0 || exp.worker_threads == 0 {
            bail!(
                "{}: `local_workers` and `worker_threads` must be at least 1",
                path.display()
            );
        }
        for key in ["output_dir", "seed", "cache_dir"] {
            if exp.cluster.contains_key(key) {
                bail!(
                    "{}: `cluster.{key}` is set by the runner; remove it",
                    path.display()
                );
            }
        }
        Ok(exp)
    }

    /// The variants, in the order they run.
    pub fn variants(&self) -> Vec<Variant> {
        let int = |v: usize| toml::Value::Integer(v as i64);
        let classes = |c: &[u32]| {
            toml::Value::Array(c.iter().map(|&c| toml::Value::Integer(c.into())).collect())
        };
        match &self.experiment {
            // The ensemble first: its teachers train in parallel, and the
            // one-teacher job then finds teacher-0 and the baseline cached.
            Kind::PaperTable(p) => vec![
                Variant {
                    label: format!("ensemble-of-{}", p.ensemble_size),
                    edits: vec![("teachers.count".into(), int(p.ensemble_size))],
                },
                Variant {
                    label: "one-teacher".into(),
                    edits: vec![("teachers.count".into(), int(1))],
                },
            ],
            Kind::Temperature(t) => t
                .hidden_sizes
                .iter()
                .flat_map(|&h| {
                    t.temperatures.iter().map(move |&temp| Variant {
                        label: format!("h{h}-T{temp}"),
                        edits: vec![
                            (
                                "student.hidden".into(),
                                toml::Value::Array(vec![int(h), int(h)]),
                            ),
                            (
                                "student.distill.temperature".into(),
                                toml::Value::Float(temp),
                            ),
                        ],
                    })
                })
                .collect(),
            Kind::MissingClasses(m) => m
                .cases
                .iter()
                .flat_map(|case| {
                    let selection: Edit = if case.only_classes.is_empty() {
                        (
                            "transfer.exclude_classes".into(),
                            classes(&case.exclude_classes),
                        )
                    } else {
                        ("transfer.only_classes".into(), classes(&case.only_classes))
                    };
                    [
                        ("validation", toml::Value::String("validation".into())),
                        ("paper-shift", toml::Value::Float(case.paper_shift)),
                    ]
                    .map(|(how, shift)| Variant {
                        label: format!("{}-{how}", case.name),
                        edits: vec![
                            selection.clone(),
                            (
                                "student.bias_adjustment.classes".into(),
                                classes(&case.adjust_classes),
                            ),
                            ("student.bias_adjustment.shift".into(), shift),
                        ],
                    })
                })
                .collect(),
            Kind::Regulariser(r) => vec![Variant {
                label: format!("fraction-{}", r.fraction),
                edits: vec![
                    ("transfer.fraction".into(), toml::Value::Float(r.fraction)),
                    ("record_test_curves".into(), toml::Value::Boolean(true)),
                ],
            }],
        }
    }
}

/// The base config with `edits` applied (tables are created as needed).
pub fn apply_edits(base: &toml::Table, edits: &[Edit]) -> anyhow::Result<toml::Table> {
    let mut table = base.clone();
    for (key, value) in edits {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().expect("split yields one part at least");
        let mut node = &mut table;
        for part in parts {
            node = node
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("`{part}` in `{key}` is not a table"))?;
        }
        node.insert(last.to_string(), value.clone());
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
name = "t"
title = "T"
budget = "tiny"
seeds = [1]
[cluster]
transfer_shards = 2
[cluster.student]
hidden = [8]
[experiment.missing_classes]
cases = [{ name = "no-3", exclude_classes = [3], adjust_classes = [3], paper_shift = 3.5, paper = "206" }]
"#;

    #[test]
    fn missing_class_cases_expand_into_a_chosen_and_a_given_shift() {
        let exp: Experiment = toml::from_str(FILE).unwrap();
        let variants = exp.variants();
        let labels: Vec<&str> = variants.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(labels, ["no-3-validation", "no-3-paper-shift"]);
        let cfg = apply_edits(&exp.cluster, &variants[1].edits).unwrap();
        assert_eq!(cfg["student"]["hidden"].as_array().unwrap().len(), 1);
        assert_eq!(
            cfg["student"]["bias_adjustment"]["shift"].as_float(),
            Some(3.5)
        );
        assert_eq!(
            cfg["transfer"]["exclude_classes"].as_array().unwrap()[0].as_integer(),
            Some(3)
        );
    }

    #[test]
    fn missing_classes_of_a_case() {
        let case = MissingCase {
            name: "78".into(),
            exclude_classes: vec![],
            only_classes: vec![7, 8],
            adjust_classes: vec![7, 8],
            paper_shift: -7.6,
            paper: String::new(),
        };
        assert_eq!(case.missing(10), vec![0, 1, 2, 3, 4, 5, 6, 9]);
    }

    #[test]
    fn edits_refuse_to_descend_into_a_value() {
        let base: toml::Table = toml::from_str("a = 1").unwrap();
        let err = apply_edits(&base, &[("a.b".into(), toml::Value::Integer(2))]).unwrap_err();
        assert!(err.to_string().contains("not a table"), "{err}");
    }
}
