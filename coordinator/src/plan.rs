//! The job as a graph of tasks: teachers (hard labels, one per ensemble
//! member) and the baseline, then teacher inference over each transfer-set
//! shard, then the student's distillation, then one evaluation of everything.
//! The shard count comes from the config, never from the number of workers.

use std::ops::Range;

use common::dataset::shard_ranges;
use distill::hparams::TrainConfig;
use distill::task::{
    model_artifact, shard_artifact, BiasAdjustment, EnsembleSpec, EvaluateTask, InferTask,
    TaskSpec, TrainTask, DATASET_ARTIFACT, TRANSFER_MANIFEST_ARTIFACT,
};

use crate::config::{derive_seed, ClusterConfig};

/// Name of the distilled student.
pub const STUDENT: &str = "student";
/// Name of the hard-label baseline.
pub const BASELINE: &str = "baseline";
/// Name of the teachers' ensemble (evaluated when there are two or more).
pub const ENSEMBLE: &str = "ensemble";
/// Id of the evaluation task.
pub const EVALUATE: &str = "evaluate";

/// Where a task's result goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A model file, `models/<name>.safetensors`.
    Model(String),
    /// Transfer-set shard `index`, covering `range` of the training split.
    Shard {
        /// Shard number.
        index: usize,
        /// Training examples it covers.
        range: Range<usize>,
    },
    /// The evaluation of every model (`evaluation.json`).
    Evaluation,
}

/// One task of the plan.
#[derive(Clone, Debug)]
pub struct PlannedTask {
    /// Stable id, such as `teacher-0`, `infer-00003`, `student`.
    pub id: String,
    /// What the worker runs.
    pub spec: TaskSpec,
    /// Tasks that must be done first (indices into [`Plan::tasks`]).
    pub deps: Vec<usize>,
    /// Artifacts it reads.
    pub inputs: Vec<String>,
    /// Where its result goes.
    pub output: Output,
}

/// The whole job.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Tasks, dependencies first.
    pub tasks: Vec<PlannedTask>,
    /// Teacher names, in the transfer set's order.
    pub teachers: Vec<String>,
    /// Number of transfer-set shards.
    pub shards: usize,
}

/// Plans the job of `cfg` for a training split of `train_len` examples.
pub fn plan(cfg: &ClusterConfig, train_len: usize) -> common::Result<Plan> {
    let teachers: Vec<String> = (0..cfg.teachers.count)
        .map(|k| format!("teacher-{k}"))
        .collect();
    // Each model trains with its own seed, derived from the job's and its
    // name. The student and the baseline learn from the `[transfer]`
    // selection of examples; the teachers from the whole training split.
    let train = |name: &str, hidden: &[usize], base: &TrainConfig, distill, teacher: bool| {
        TaskSpec::Train(TrainTask {
            model: name.into(),
            hidden: hidden.to_vec(),
            train: TrainConfig {
                seed: derive_seed(cfg.seed, name),
                ..base.clone()
            },
            distill,
            subset: if teacher { None } else { cfg.transfer_subset() },
            record_test_curve: !teacher && cfg.record_test_curves,
        })
    };
    let mut tasks = Vec::new();
    for name in &teachers {
        tasks.push(PlannedTask {
            id: name.clone(),
            spec: train(name, &cfg.teachers.hidden, &cfg.teachers.train, None, true),
            deps: vec![],
            inputs: vec![DATASET_ARTIFACT.into()],
            output: Output::Model(name.clone()),
        });
    }
    let teacher_tasks: Vec<usize> = (0..teachers.len()).collect();
    tasks.push(PlannedTask {
        id: BASELINE.into(),
        spec: train(
            BASELINE,
            &cfg.student.hidden,
            cfg.baseline_train(),
            None,
            false,
        ),
        deps: vec![],
        inputs: vec![DATASET_ARTIFACT.into()],
        output: Output::Model(BASELINE.into()),
    });
    let baseline_task = tasks.len() - 1;
    let shards = cfg.transfer_shards.min(train_len.max(1));
    let mut infer_tasks = Vec::new();
    let teacher_inputs: Vec<String> = teachers.iter().map(|t| model_artifact(t)).collect();
    for (index, range) in shard_ranges(train_len, shards)?.into_iter().enumerate() {
        infer_tasks.push(tasks.len());
        tasks.push(PlannedTask {
            id: format!("infer-{index:05}"),
            spec: TaskSpec::Infer(InferTask {
                shard: index,
                start: range.start,
                end: range.end,
                teachers: teachers.clone(),
            }),
            deps: teacher_tasks.clone(),
            inputs: std::iter::once(DATASET_ARTIFACT.to_string())
                .chain(teacher_inputs.iter().cloned())
                .collect(),
            output: Output::Shard { index, range },
        });
    }
    let mut student_inputs = vec![
        DATASET_ARTIFACT.to_string(),
        TRANSFER_MANIFEST_ARTIFACT.into(),
    ];
    student_inputs.extend((0..infer_tasks.len()).map(shard_artifact));
    tasks.push(PlannedTask {
        id: STUDENT.into(),
        spec: train(
            STUDENT,
            &cfg.student.hidden,
            &cfg.student.train,
            Some(cfg.student.distill.clone()),
            false,
        ),
        deps: infer_tasks,
        inputs: student_inputs,
        output: Output::Model(STUDENT.into()),
    });
    let student_task = tasks.len() - 1;
    let mut models = teachers.clone();
    models.push(STUDENT.into());
    models.push(BASELINE.into());
    let ensemble = (teachers.len() > 1).then(|| EnsembleSpec {
        name: ENSEMBLE.into(),
        members: teachers.clone(),
        combine: cfg.student.distill.combine,
    });
    let mut deps = teacher_tasks;
    deps.extend([baseline_task, student_task]);
    tasks.push(PlannedTask {
        id: EVALUATE.into(),
        spec: TaskSpec::Evaluate(EvaluateTask {
            models: models.clone(),
            ensemble,
            bias_adjustment: cfg
                .student
                .bias_adjustment
                .as_ref()
                .map(|a| BiasAdjustment {
                    model: STUDENT.into(),
                    classes: a.classes.clone(),
                    shift: a.shift,
                }),
        }),
        deps,
        inputs: std::iter::once(DATASET_ARTIFACT.to_string())
            .chain(models.iter().map(|m| model_artifact(m)))
            .collect(),
        output: Output::Evaluation,
    });
    Ok(Plan {
        tasks,
        teachers,
        shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(teachers: usize, shards: usize) -> ClusterConfig {
        let text = format!(
            "output_dir = \"o\"\ntransfer_shards = {shards}\n[dataset]\nsource = \"synthetic\"\n\
             [teachers]\ncount = {teachers}\nhidden = [8]\n[student]\nhidden = [4]\n"
        );
        ClusterConfig::parse(&text, Path::new("c.toml"), Path::new(".")).unwrap()
    }

    #[test]
    fn graph_has_teachers_baseline_shards_student_evaluation_in_dependency_order() {
        let p = plan(&config(2, 3), 100).unwrap();
        let ids: Vec<&str> = p.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "teacher-0",
                "teacher-1",
                "baseline",
                "infer-00000",
                "infer-00001",
                "infer-00002",
                "student",
                "evaluate"
            ]
        );
        assert_eq!(p.tasks[3].deps, vec![0, 1]);
        assert_eq!(p.tasks[6].deps, vec![3, 4, 5]);
        assert_eq!(p.tasks[7].deps, vec![0, 1, 2, 6]);
        for (i, t) in p.tasks.iter().enumerate() {
            assert!(
                t.deps.iter().all(|&d| d < i),
                "{} depends on a later task",
                t.id
            );
        }
        let ranges: Vec<_> = p.tasks[3..6]
            .iter()
            .map(|t| match &t.output {
                Output::Shard { range, .. } => range.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ranges, vec![0..34, 34..67, 67..100]);
        assert!(p.tasks[6]
            .inputs
            .contains(&"transfer/shard-00002.safetensors".to_string()));
        match &p.tasks[7].spec {
            TaskSpec::Evaluate(e) => assert_eq!(e.ensemble.as_ref().unwrap().members, p.teachers),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_model_gets_its_own_seed_and_one_teacher_has_no_ensemble() {
        let p = plan(&config(1, 2), 10).unwrap();
        let seeds: Vec<u64> = p
            .tasks
            .iter()
            .filter_map(|t| match &t.spec {
                TaskSpec::Train(t) => Some(t.train.seed),
                _ => None,
            })
            .collect();
        assert_eq!(seeds.len(), 3);
        assert!(seeds[0] != seeds[1] && seeds[1] != seeds[2] && seeds[0] != seeds[2]);
        match &p.tasks.last().unwrap().spec {
            TaskSpec::Evaluate(e) => assert!(e.ensemble.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shard_count_depends_on_the_config_only_and_is_capped_by_examples() {
        assert_eq!(plan(&config(1, 4), 1000).unwrap().shards, 4);
        assert_eq!(plan(&config(1, 50), 7).unwrap().shards, 7);
    }
}
