//! From the jobs' reports to each experiment's tables, notes and plots.
//! Every choice shown here (temperature, bias shift, epoch) was made on the
//! validation split; test errors are only reported.

use std::path::Path;

use anyhow::Context;
use distill::task::{BIAS_SHIFT_STEP, MAX_BIAS_SHIFT};
use serde_json::json;

use crate::experiment::{Experiment, Kind, MissingClasses, PaperTable, TemperatureSweep};
use crate::plot::{line_plot, Axes, Series};
use crate::results::Table;
use crate::runner::JobResult;
use crate::stats::{format_mean_std, mean_std};

/// What an experiment reports besides its stamp.
#[derive(Debug, Default)]
pub struct Analysis {
    /// Tables.
    pub tables: Vec<Table>,
    /// Remarks.
    pub notes: Vec<String>,
    /// Plot files written into the results folder.
    pub plots: Vec<String>,
    /// Raw figures.
    pub data: serde_json::Value,
}

/// The jobs of one variant, by seed order.
fn of_variant<'a>(jobs: &'a [JobResult], variant: &str) -> Vec<&'a JobResult> {
    jobs.iter().filter(|j| j.variant == variant).collect()
}

/// A model's numeric report field over the variant's seeds.
fn field(jobs: &[&JobResult], model: &str, key: &str) -> anyhow::Result<Vec<f64>> {
    jobs.iter()
        .map(|j| {
            j.model(model)?[key]
                .as_f64()
                .with_context(|| format!("{model}.{key} is not a number"))
        })
        .collect()
}

/// Test and validation examples of a job.
fn sizes(job: &JobResult) -> (u64, u64) {
    let n = |key: &str| job.report[key].as_u64().unwrap_or(0);
    (n("test_examples"), n("validation_examples"))
}

fn seeds_of(jobs: &[&JobResult]) -> String {
    jobs.iter()
        .map(|j| j.seed.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn list(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Builds the analysis of `exp` from its finished jobs.
pub fn analyse(
    exp: &Experiment,
    jobs: &[JobResult],
    results_dir: &Path,
) -> anyhow::Result<Analysis> {
    match &exp.experiment {
        Kind::PaperTable(p) => paper_table(p, jobs),
        Kind::Temperature(t) => temperature(exp, t, jobs, results_dir),
        Kind::MissingClasses(m) => missing_classes(m, jobs),
        Kind::Regulariser(_) => regulariser(exp, jobs, results_dir),
    }
}

fn paper_table(p: &PaperTable, jobs: &[JobResult]) -> anyhow::Result<Analysis> {
    let single = of_variant(jobs, "one-teacher");
    let ensemble = of_variant(jobs, &format!("ensemble-of-{}", p.ensemble_size));
    let first = single.first().context("no finished one-teacher job")?;
    let paper = |pick: fn(&crate::experiment::PaperErrors) -> usize| {
        p.paper
            .as_ref()
            .map_or("–".to_string(), |e| pick(e).to_string())
    };
    let temperature = first.model("student")?["temperature"]
        .as_f64()
        .unwrap_or(0.0);
    let rows: Vec<(String, &[&JobResult], &str, String)> = vec![
        (
            "baseline: hard labels".into(),
            &single,
            "baseline",
            paper(|e| e.baseline),
        ),
        ("teacher".into(), &single, "teacher-0", paper(|e| e.teacher)),
        (
            format!("ensemble of {} teachers", p.ensemble_size),
            &ensemble,
            "ensemble",
            "–".into(),
        ),
        (
            format!("student distilled from one teacher, T = {temperature}"),
            &single,
            "student",
            paper(|e| e.student),
        ),
        (
            format!(
                "student distilled from the ensemble of {}, T = {temperature}",
                p.ensemble_size
            ),
            &ensemble,
            "student",
            "–".into(),
        ),
    ];
    let mut table = Table::new(
        format!(
            "Test errors (of {}) over the seeds, mean ± standard deviation; the kept epoch of every model was chosen on the {} validation examples.",
            sizes(first).0,
            sizes(first).1
        ),
        &["model", "architecture", "seeds", "test errors", "per seed", "validation errors", "paper"],
    );
    let mut data = serde_json::Map::new();
    for (label, runs, model, paper) in rows {
        if runs.is_empty() {
            continue;
        }
        let test = field(runs, model, "test_errors")?;
        let validation = field(runs, model, "validation_errors")?;
        let seconds = field(runs, model, "train_seconds")?;
        let architecture = runs[0].model(model)?["architecture"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        table.row(vec![
            label.clone(),
            architecture.clone(),
            seeds_of(runs),
            format_mean_std(&test, 1),
            list(&test),
            format_mean_std(&validation, 1),
            paper,
        ]);
        data.insert(
            label,
            json!({"model": model, "architecture": architecture, "seeds": runs.iter().map(|j| j.seed).collect::<Vec<_>>(), "test_errors": test, "validation_errors": validation, "train_seconds": seconds}),
        );
    }
    let mut notes = Vec::new();
    let baseline = field(&single, "baseline", "test_errors")?;
    let student = field(&single, "student", "test_errors")?;
    let gain: Vec<f64> = baseline.iter().zip(&student).map(|(b, s)| b - s).collect();
    notes.push(format!(
        "Errors saved by distilling from one teacher instead of training on hard labels (baseline − student), per seed: {}; mean ± sd {}.",
        list(&gain),
        format_mean_std(&gain, 1)
    ));
    if !ensemble.is_empty() {
        let paired: Vec<f64> = ensemble
            .iter()
            .filter_map(|e| {
                let s = single.iter().find(|s| s.seed == e.seed)?;
                Some(s.test_errors("baseline").ok()? - e.test_errors("student").ok()?)
            })
            .collect();
        notes.push(format!(
            "The same from the ensemble (baseline − ensemble student), per seed: {}; mean ± sd {}.",
            list(&paired),
            format_mean_std(&paired, 1)
        ));
    }
    Ok(Analysis {
        tables: vec![table],
        notes,
        plots: vec![],
        data: serde_json::Value::Object(data),
    })
}

fn temperature(
    exp: &Experiment,
    t: &TemperatureSweep,
    jobs: &[JobResult],
    results_dir: &Path,
) -> anyhow::Result<Analysis> {
    let first = jobs.first().context("no finished job")?;
    let mut table = Table::new(
        format!(
            "Test errors (of {}) of students with two hidden layers of the given width, distilled at each temperature from the same teacher.",
            sizes(first).0
        ),
        &["units per layer", "T", "seeds", "test errors", "validation errors"],
    );
    let mut series = Vec::new();
    let mut notes = Vec::new();
    let mut data = Vec::new();
    for &h in &t.hidden_sizes {
        let mut points = Vec::new();
        let mut best: Option<(f64, f64, f64)> = None;
        let mut baseline = None;
        for &temp in &t.temperatures {
            let runs = of_variant(jobs, &format!("h{h}-T{temp}"));
            if runs.is_empty() {
                continue;
            }
            let test = field(&runs, "student", "test_errors")?;
            let validation = field(&runs, "student", "validation_errors")?;
            let (mean_test, _) = mean_std(&test);
            let (mean_val, _) = mean_std(&validation);
            table.row(vec![
                h.to_string(),
                temp.to_string(),
                seeds_of(&runs),
                format_mean_std(&test, 1),
                format_mean_std(&validation, 1),
            ]);
            points.push((temp, mean_test));
            if best.is_none_or(|(_, v, _)| mean_val < v) {
                best = Some((temp, mean_val, mean_test));
            }
            baseline.get_or_insert(mean_std(&field(&runs, "baseline", "test_errors")?).0);
            data.push(json!({"hidden": h, "temperature": temp, "test_errors": test, "validation_errors": validation}));
        }
        if let Some(b) = baseline {
            table.row(vec![
                h.to_string(),
                "hard labels (baseline)".into(),
                String::new(),
                format!("{b:.1}"),
                String::new(),
            ]);
            if let (Some(&(x0, _)), Some(&(x1, _))) = (points.first(), points.last()) {
                series.push(Series {
                    name: format!("{h} units, hard labels"),
                    points: vec![(x0, b), (x1, b)],
                    plain: true,
                });
            }
        }
        if let Some((temp, val, test)) = best {
            notes.push(format!(
                "{h} units: the temperature with the fewest validation errors is T = {temp} ({val:.1} validation, {test:.1} test errors)."
            ));
        }
        series.push(Series {
            name: format!("{h} units, distilled"),
            points,
            plain: false,
        });
    }
    let plot = format!("{}.svg", exp.name);
    line_plot(
        &results_dir.join(&plot),
        &Axes {
            title: "Test errors against distillation temperature",
            x: "temperature T (log scale)",
            y: &format!("test errors (of {})", sizes(first).0),
            log_x: true,
        },
        &series,
    )?;
    Ok(Analysis {
        tables: vec![table],
        notes,
        plots: vec![plot],
        data: json!(data),
    })
}

fn missing_classes(m: &MissingClasses, jobs: &[JobResult]) -> anyhow::Result<Analysis> {
    let first = jobs.first().context("no finished job")?;
    let mut table = Table::new(
        format!(
            "Test errors (of {}) when classes are missing from the transfer set, before and after shifting output biases.",
            sizes(first).0
        ),
        &["case", "model", "seeds", "test errors", "errors on missing classes", "missing classes right", "bias shift", "paper"],
    );
    let mut data = Vec::new();
    for case in &m.cases {
        let chosen = of_variant(jobs, &format!("{}-validation", case.name));
        let given = of_variant(jobs, &format!("{}-paper-shift", case.name));
        let Some(first) = chosen.first().or(given.first()) else {
            continue;
        };
        let classes = first.model("student")?["per_class_errors"]
            .as_array()
            .map_or(0, Vec::len);
        let missing = case.missing(classes);
        let on_missing = |job: &JobResult, model: &str| -> anyhow::Result<(f64, f64)> {
            let m = job.model(model)?;
            let sum = |key: &str| -> anyhow::Result<f64> {
                missing
                    .iter()
                    .map(|&c| {
                        m[key][c as usize]
                            .as_f64()
                            .with_context(|| format!("{model}.{key}[{c}] is missing"))
                    })
                    .sum()
            };
            Ok((sum("per_class_errors")?, sum("per_class_totals")?))
        };
        let rows: [(&str, &[&JobResult], &str); 4] = [
            (
                "baseline, hard labels on the same examples",
                &chosen,
                "baseline",
            ),
            ("student, no adjustment", &chosen, "student"),
            (
                "student, shift chosen on validation",
                &chosen,
                "student+bias",
            ),
            ("student, the paper's shift", &given, "student+bias"),
        ];
        for (label, runs, model) in rows {
            if runs.is_empty() {
                continue;
            }
            let test = field(runs, model, "test_errors")?;
            let mut missing_errors = Vec::new();
            let mut right = Vec::new();
            for job in runs.iter() {
                let (errors, total) = on_missing(job, model)?;
                missing_errors.push(errors);
                right.push(100.0 * (1.0 - errors / total.max(1.0)));
            }
            let shifts: Vec<f64> = runs
                .iter()
                .filter_map(|j| j.model(model).ok()?["bias_shift"].as_f64())
                .collect();
            let total_missing = on_missing(runs[0], model)?.1;
            table.row(vec![
                case.name.clone(),
                label.into(),
                seeds_of(runs),
                format_mean_std(&test, 1),
                format!(
                    "{} of {total_missing:.0}",
                    format_mean_std(&missing_errors, 1)
                ),
                format!("{}%", format_mean_std(&right, 1)),
                if shifts.is_empty() {
                    "–".into()
                } else {
                    shifts
                        .iter()
                        .map(|s| format!("{s:+.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                if model == "student" {
                    case.paper.clone()
                } else {
                    String::new()
                },
            ]);
            data.push(json!({"case": case.name, "model": label, "missing_classes": missing, "test_errors": test, "errors_on_missing": missing_errors, "bias_shifts": shifts}));
        }
    }
    Ok(Analysis {
        tables: vec![table],
        notes: vec![format!(
            "The shift chosen on validation is the one in [-{}, {}] (steps of {}) with the fewest errors on the {} validation examples, which do contain the missing classes.",
            MAX_BIAS_SHIFT, MAX_BIAS_SHIFT, BIAS_SHIFT_STEP, sizes(first).1
        )],
        plots: vec![],
        data: json!(data),
    })
}

fn regulariser(
    exp: &Experiment,
    jobs: &[JobResult],
    results_dir: &Path,
) -> anyhow::Result<Analysis> {
    let runs: Vec<&JobResult> = jobs.iter().collect();
    let first = runs.first().context("no finished job")?;
    let mut table = Table::new(
        format!("Test errors (of {}) of the same net trained on the same small subset of the training split, with hard labels and with soft targets from a teacher trained on all of it.", sizes(first).0),
        &["model", "training examples", "seeds", "test errors, epoch chosen on validation", "kept epoch", "test errors, last epoch"],
    );
    let mut series = Vec::new();
    let mut data = Vec::new();
    for (label, model) in [
        ("hard labels", "baseline"),
        ("soft targets", "student"),
        ("teacher (all training examples)", "teacher-0"),
    ] {
        let test = field(&runs, model, "test_errors")?;
        let kept = field(&runs, model, "selected_epoch")?;
        let curves: Vec<Vec<f64>> = runs
            .iter()
            .filter_map(|j| {
                serde_json::from_value(j.model(model).ok()?["test_errors_per_epoch"].clone()).ok()
            })
            .collect();
        let last: Vec<f64> = curves.iter().filter_map(|c| c.last().copied()).collect();
        let examples = first.model(model)?["training_examples"]
            .as_f64()
            .map_or("all".to_string(), |n| format!("{n:.0}"));
        table.row(vec![
            label.into(),
            examples,
            seeds_of(&runs),
            format_mean_std(&test, 1),
            list(&kept),
            if last.is_empty() {
                "–".into()
            } else {
                format_mean_std(&last, 1)
            },
        ]);
        if let Some(curve) = curves.first() {
            series.push(Series {
                name: format!("{label} (seed {})", first.seed),
                points: curve
                    .iter()
                    .enumerate()
                    .map(|(e, &v)| ((e + 1) as f64, v))
                    .collect(),
                plain: false,
            });
        }
        data.push(json!({"model": label, "test_errors": test, "kept_epoch": kept, "test_errors_per_epoch": curves}));
    }
    let plot = format!("{}.svg", exp.name);
    line_plot(
        &results_dir.join(&plot),
        &Axes {
            title: "Test errors after each epoch, trained on a small subset",
            x: "epoch",
            y: &format!("test errors (of {})", sizes(first).0),
            log_x: false,
        },
        &series,
    )?;
    Ok(Analysis {
        tables: vec![table],
        notes: vec![
            "The test curve is recorded for the plot only; the kept epoch is the one with the fewest validation errors.".into(),
        ],
        plots: vec![plot],
        data: json!(data),
    })
}
