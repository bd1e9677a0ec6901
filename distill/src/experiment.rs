//! The paper's basic experiment as a library routine: a small net on hard
//! labels (the baseline), a large regularised teacher, and the small net
//! distilled from the teacher through an on-disk transfer set; each
//! evaluated on the test split. The examples (`mnist_paper`, `quickstart`)
//! are thin wrappers around [`run`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use common::dataset::Splits;
use common::seed::{self, Stream};
use common::transfer::{TransferSet, MANIFEST_FILE};
use serde::Serialize;

use crate::eval::{evaluate, Evaluation};
use crate::hparams::{DistillConfig, TrainConfig};
use crate::model::{Mlp, MlpSpec, Model};
use crate::train::{train, EpochStats, Targets, TrainReport};
use crate::{model_io, teacher, Result};

/// One model to train: its shape and how to train it.
#[derive(Clone, Debug, Serialize)]
pub struct ModelPlan {
    /// Shape of the network.
    pub spec: MlpSpec,
    /// Training hyperparameters.
    pub train: TrainConfig,
}

/// Everything [`run`] needs besides the data.
#[derive(Clone, Debug, Serialize)]
pub struct ExperimentConfig {
    /// The small net on hard labels.
    pub baseline: ModelPlan,
    /// The large teacher.
    pub teacher: ModelPlan,
    /// The small net distilled from the teacher.
    pub student: ModelPlan,
    /// Temperature and loss weights of the distillation.
    pub distill: DistillConfig,
    /// Examples per transfer-set shard.
    pub rows_per_shard: usize,
    /// Output folder: models, the transfer set.
    pub out: PathBuf,
    /// Load models already saved in `out` instead of training them again.
    pub resume: bool,
}

/// What became of one model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelOutcome {
    /// `baseline`, `teacher` or `student`.
    pub role: &'static str,
    /// Architecture, such as `784-800-800-10`.
    pub architecture: String,
    /// Epochs configured.
    pub epochs: usize,
    /// Errors on the validation split with the kept weights.
    pub validation_errors: usize,
    /// Test-set evaluation (for reporting only).
    pub test: Evaluation,
    /// The training history; `None` when the model was loaded (resume).
    pub training: Option<TrainReport>,
    /// Where the model file is.
    pub model_file: PathBuf,
}

/// Trains (or loads) baseline, teacher and student and evaluates them.
/// `progress` sees every epoch of every model, with the model's role.
pub fn run(
    cfg: &ExperimentConfig,
    splits: &Splits,
    device: &Device,
    mut progress: impl FnMut(&str, &EpochStats),
) -> Result<Vec<ModelOutcome>> {
    cfg.distill.validate()?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| common::Error::io(&cfg.out, e))?;
    let (_, baseline) = run_model(
        cfg,
        "baseline",
        &cfg.baseline,
        splits,
        Targets::Labels,
        device,
        &mut progress,
    )?;
    let (teacher_model, teacher) = run_model(
        cfg,
        "teacher",
        &cfg.teacher,
        splits,
        Targets::Labels,
        device,
        &mut progress,
    )?;

    // The folder name carries the training data's fingerprint, so a resumed
    // run never reuses logits computed for other examples.
    let fingerprint = splits.train.fingerprint();
    let transfer_dir = cfg.out.join(format!("transfer-{}", &fingerprint[..12]));
    if !(cfg.resume && transfer_dir.join(MANIFEST_FILE).exists()) {
        remove_dir_if_present(&transfer_dir)?;
        let started = Instant::now();
        teacher::write_transfer_set(
            &[("teacher", &teacher_model)],
            &splits.train,
            &transfer_dir,
            cfg.rows_per_shard,
            device,
        )?;
        tracing::info!(dir = %transfer_dir.display(), seconds = started.elapsed().as_secs_f64(), "transfer set written");
    }
    let set = TransferSet::open(&transfer_dir)?;
    let targets = Targets::Transfer {
        set: &set,
        distill: &cfg.distill,
        keep: None,
    };
    let (_, student) = run_model(
        cfg,
        "student",
        &cfg.student,
        splits,
        targets,
        device,
        &mut progress,
    )?;
    Ok(vec![baseline, teacher, student])
}

fn run_model(
    cfg: &ExperimentConfig,
    role: &'static str,
    plan: &ModelPlan,
    splits: &Splits,
    targets: Targets<'_>,
    device: &Device,
    progress: &mut impl FnMut(&str, &EpochStats),
) -> Result<(Mlp, ModelOutcome)> {
    let path = cfg.out.join(format!("{role}.safetensors"));
    let (model, training) = if cfg.resume && path.exists() {
        tracing::info!(role, path = %path.display(), "loading saved model");
        let Model::Mlp(model) = model_io::load(&path, device)?.model;
        (model, None)
    } else {
        let model = Mlp::new_random(
            plan.spec.clone(),
            &mut seed::rng(plan.train.seed, Stream::Init),
            device,
        )?;
        let report = train(
            &model,
            &splits.train,
            &splits.validation,
            targets,
            &plan.train,
            device,
            |e| progress(role, e),
        )?;
        model_io::save(
            &Model::Mlp(model.clone()),
            splits.train.normalization(),
            &path,
        )?;
        (model, Some(report))
    };
    let outcome = ModelOutcome {
        role,
        architecture: model.spec().describe(),
        epochs: plan.train.epochs,
        validation_errors: evaluate(&model, &splits.validation, device)?.errors,
        test: evaluate(&model, &splits.test, device)?,
        training,
        model_file: path,
    };
    Ok((model, outcome))
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(common::Error::io(dir, e).into()),
        _ => Ok(()),
    }
}

/// A Markdown table of the outcomes; `paper` gives a reference column
/// (test errors per role) when there is one.
pub fn format_table(outcomes: &[ModelOutcome], paper: Option<[&str; 3]>) -> String {
    let mut s = String::from(
        "| model | architecture | epochs (kept) | s/epoch | validation errors | test errors |",
    );
    s.push_str(if paper.is_some() { " paper |\n" } else { "\n" });
    s.push_str("|---|---|---|---|---|---|");
    s.push_str(if paper.is_some() { "---|\n" } else { "\n" });
    for (i, o) in outcomes.iter().enumerate() {
        let (kept, secs) = o
            .training
            .as_ref()
            .map_or(("loaded".into(), "-".into()), |r| {
                (
                    r.selected_epoch.to_string(),
                    format!("{:.2}", r.seconds_per_epoch()),
                )
            });
        s.push_str(&format!(
            "| {} | {} | {} ({kept}) | {secs} | {} | {} / {} |",
            o.role, o.architecture, o.epochs, o.validation_errors, o.test.errors, o.test.total
        ));
        if let Some(p) = paper {
            s.push_str(&format!(" {} |", p.get(i).copied().unwrap_or("-")));
        }
        s.push('\n');
    }
    s
}
