//! The job as a graph of tasks: teachers (hard labels, one per ensemble
//! member) and the baseline, then teacher inference over each transfer-set
//! shard, then the student's distillation, then one evaluation of everything.
//! The shard count comes from the config, never from the number of workers.
//!
//! With `[specialists]`, the one teacher is the generalist: a clustering
//! task groups its confused classes, one task per specialist trains it,
//! inference also stores the generalist+specialists distribution (as the
//! transfer set's `combined` teacher), and a second student learns from it.

use std::ops::Range;

use common::artifact::ArtifactName;
use common::dataset::shard_ranges;
use distill::hparams::{DistillConfig, TrainConfig};
use distill::task::{
    BiasAdjustment, ClusterTask, CombinedSpec, EnsembleSpec, EvaluateTask, InferTask,
    SpecialistTask, TaskSpec, TrainTask,
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
/// Id of the task that clusters the classes for the specialists.
pub const CLUSTER: &str = "clusters";
/// Name of the generalist+specialists combination (eq. 5).
pub const COMBINED: &str = "combined";
/// Name of the student distilled from the combination.
pub const STUDENT_COMBINED: &str = "student-combined";

/// Name of specialist `m`.
pub fn specialist_name(m: usize) -> String {
    format!("specialist-{m:02}")
}

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
    /// The specialists' classes ([`ArtifactName::Clusters`]).
    Clusters,
    /// A no-op task's result (`noop/<id>`, 8 bytes).
    Noop(String),
}

impl Output {
    /// The name of the artifact it is stored as.
    pub fn artifact(&self) -> ArtifactName {
        match self {
            Output::Model(name) => ArtifactName::Model(name.clone()),
            Output::Shard { index, .. } => ArtifactName::Shard(*index),
            Output::Evaluation => ArtifactName::Evaluation,
            Output::Clusters => ArtifactName::Clusters,
            Output::Noop(id) => ArtifactName::Noop(id.clone()),
        }
    }
}

/// The artifact of model `name`.
fn model(name: &str) -> ArtifactName {
    ArtifactName::Model(name.to_string())
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
    pub inputs: Vec<ArtifactName>,
    /// Where its result goes.
    pub output: Output,
}

/// The whole job.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Tasks, dependencies first.
    pub tasks: Vec<PlannedTask>,
    /// Teacher models (with specialists, the one generalist).
    pub teachers: Vec<String>,
    /// Specialist models (none without `[specialists]`).
    pub specialists: Vec<String>,
    /// What the transfer set holds, in its order: the teachers' logits,
    /// then with specialists the combination's `ln q`.
    pub transfer_teachers: Vec<String>,
    /// Number of transfer-set shards.
    pub shards: usize,
}

/// A load test's plan: `tasks` independent no-op tasks.
pub fn load_test_plan(tasks: usize) -> Plan {
    Plan {
        tasks: (0..tasks)
            .map(|i| {
                let id = format!("noop-{i:07}");
                PlannedTask {
                    spec: TaskSpec::Noop(distill::task::NoopTask { index: i as u64 }),
                    deps: Vec::new(),
                    inputs: Vec::new(),
                    output: Output::Noop(id.clone()),
                    id,
                }
            })
            .collect(),
        teachers: Vec::new(),
        specialists: Vec::new(),
        transfer_teachers: Vec::new(),
        shards: 0,
    }
}

/// Plans the job of `cfg` for a training split of `train_len` examples
/// (with `[load_test]`, only its no-op tasks).
pub fn plan(cfg: &ClusterConfig, train_len: usize) -> common::Result<Plan> {
    if let Some(load) = &cfg.load_test {
        return Ok(load_test_plan(load.tasks));
    }
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
            inputs: vec![ArtifactName::Dataset],
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
        inputs: vec![ArtifactName::Dataset],
        output: Output::Model(BASELINE.into()),
    });
    let baseline_task = tasks.len() - 1;
    let generalist = &teachers[0];
    let mut specialist_tasks = Vec::new();
    let mut specialists = Vec::new();
    let mut combined = None;
    if let Some(spec) = &cfg.specialists {
        tasks.push(PlannedTask {
            id: CLUSTER.into(),
            spec: TaskSpec::Cluster(ClusterTask {
                generalist: generalist.clone(),
                specialists: spec.count,
                classes_per_specialist: spec.classes_per_specialist,
                seed: derive_seed(cfg.seed, CLUSTER),
            }),
            deps: vec![0],
            inputs: vec![ArtifactName::Dataset, model(generalist)],
            output: Output::Clusters,
        });
        let cluster_task = tasks.len() - 1;
        for m in 0..spec.count {
            let name = specialist_name(m);
            specialist_tasks.push(tasks.len());
            tasks.push(PlannedTask {
                id: name.clone(),
                spec: TaskSpec::Specialist(SpecialistTask {
                    model: name.clone(),
                    index: m,
                    generalist: generalist.clone(),
                    train: TrainConfig {
                        seed: derive_seed(cfg.seed, &name),
                        ..spec.train.clone()
                    },
                }),
                deps: vec![0, cluster_task],
                inputs: vec![
                    ArtifactName::Dataset,
                    model(generalist),
                    ArtifactName::Clusters,
                ],
                output: Output::Model(name.clone()),
            });
            specialists.push(name);
        }
        specialist_tasks.push(cluster_task);
        combined = Some(CombinedSpec {
            name: COMBINED.into(),
            generalist: generalist.clone(),
            specialists: specialists.clone(),
            top_n: spec.top_n,
        });
    }
    // What a task using the combination reads besides the generalist.
    let combined_inputs: Vec<ArtifactName> = if combined.is_some() {
        specialists
            .iter()
            .map(|m| model(m))
            .chain(std::iter::once(ArtifactName::Clusters))
            .collect()
    } else {
        vec![]
    };
    let mut transfer_teachers = teachers.clone();
    transfer_teachers.extend(combined.as_ref().map(|c| c.name.clone()));
    let shards = cfg.transfer_shards.min(train_len.max(1));
    let mut infer_tasks = Vec::new();
    let teacher_inputs: Vec<ArtifactName> = teachers.iter().map(|t| model(t)).collect();
    let mut infer_deps = teacher_tasks.clone();
    infer_deps.extend(&specialist_tasks);
    for (index, range) in shard_ranges(train_len, shards)?.into_iter().enumerate() {
        infer_tasks.push(tasks.len());
        tasks.push(PlannedTask {
            id: format!("infer-{index:05}"),
            spec: TaskSpec::Infer(InferTask {
                shard: index,
                start: range.start,
                end: range.end,
                teachers: teachers.clone(),
                combined: combined.clone(),
            }),
            deps: infer_deps.clone(),
            inputs: std::iter::once(ArtifactName::Dataset)
                .chain(teacher_inputs.iter().cloned())
                .chain(combined_inputs.iter().cloned())
                .collect(),
            output: Output::Shard { index, range },
        });
    }
    let mut student_inputs = vec![ArtifactName::Dataset, ArtifactName::TransferManifest];
    student_inputs.extend((0..infer_tasks.len()).map(ArtifactName::Shard));
    // Each student learns from the teachers, or from the combination.
    let mut students = vec![(STUDENT, teachers.clone())];
    if let Some(c) = &combined {
        students.push((STUDENT_COMBINED, vec![c.name.clone()]));
    }
    let mut student_tasks = Vec::new();
    for (name, learns_from) in &students {
        let distill = DistillConfig {
            // Only a transfer set holding more than the teachers needs a
            // selection (and without one the spec stays as before).
            teachers: if combined.is_some() {
                learns_from.clone()
            } else {
                cfg.student.distill.teachers.clone()
            },
            ..cfg.student.distill.clone()
        };
        student_tasks.push(tasks.len());
        tasks.push(PlannedTask {
            id: name.to_string(),
            spec: train(
                name,
                &cfg.student.hidden,
                &cfg.student.train,
                Some(distill),
                false,
            ),
            deps: infer_tasks.clone(),
            inputs: student_inputs.clone(),
            output: Output::Model(name.to_string()),
        });
    }
    let mut models = teachers.clone();
    models.extend(students.iter().map(|(name, _)| name.to_string()));
    models.push(BASELINE.into());
    let ensemble = (teachers.len() > 1).then(|| EnsembleSpec {
        name: ENSEMBLE.into(),
        members: teachers.clone(),
        combine: cfg.student.distill.combine,
    });
    let mut deps = teacher_tasks;
    deps.push(baseline_task);
    deps.extend(&specialist_tasks);
    deps.extend(&student_tasks);
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
            combined,
        }),
        deps,
        inputs: std::iter::once(ArtifactName::Dataset)
            .chain(models.iter().map(|m| model(m)))
            .chain(combined_inputs)
            .collect(),
        output: Output::Evaluation,
    });
    Ok(Plan {
        tasks,
        teachers,
        specialists,
        transfer_teachers,
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
        assert!(p.tasks[6].inputs.contains(&ArtifactName::Shard(2)));
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

    #[test]
    fn specialists_add_clustering_specialist_tasks_and_a_second_student() {
        let text = "output_dir = \"o\"\ntransfer_shards = 2\n[dataset]\nsource = \"synthetic\"\n\
                    [teachers]\nhidden = [8]\n[student]\nhidden = [4]\n[specialists]\ncount = 2\ntop_n = 2\n";
        let cfg = ClusterConfig::parse(text, Path::new("c.toml"), Path::new(".")).unwrap();
        let p = plan(&cfg, 10).unwrap();
        let ids: Vec<&str> = p.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "teacher-0",
                "baseline",
                "clusters",
                "specialist-00",
                "specialist-01",
                "infer-00000",
                "infer-00001",
                "student",
                "student-combined",
                "evaluate"
            ]
        );
        assert_eq!(p.specialists, ["specialist-00", "specialist-01"]);
        assert_eq!(p.transfer_teachers, ["teacher-0", "combined"]);
        assert_eq!(p.tasks[3].deps, vec![0, 2]);
        assert!(p.tasks[3].inputs.contains(&ArtifactName::Clusters));
        // Inference needs the generalist, every specialist and the clusters.
        assert_eq!(p.tasks[5].deps, vec![0, 3, 4, 2]);
        match &p.tasks[5].spec {
            TaskSpec::Infer(t) => {
                let c = t.combined.as_ref().unwrap();
                assert_eq!((c.name.as_str(), c.top_n), (COMBINED, 2));
                assert_eq!(c.specialists, p.specialists);
            }
            other => panic!("{other:?}"),
        }
        // Each student learns from its own part of the transfer set.
        let learns_from = |i: usize| match &p.tasks[i].spec {
            TaskSpec::Train(t) => t.distill.as_ref().unwrap().teachers.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(learns_from(7), ["teacher-0"]);
        assert_eq!(learns_from(8), ["combined"]);
        let seeds: Vec<u64> = [3, 4]
            .iter()
            .map(|&i| match &p.tasks[i].spec {
                TaskSpec::Specialist(t) => t.train.seed,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_ne!(seeds[0], seeds[1]);
        let evaluate = p.tasks.last().unwrap();
        assert_eq!(evaluate.deps, vec![0, 1, 3, 4, 2, 7, 8]);
        match &evaluate.spec {
            TaskSpec::Evaluate(e) => {
                assert!(e.combined.is_some());
                assert!(e.models.contains(&STUDENT_COMBINED.to_string()));
            }
            other => panic!("{other:?}"),
        }
    }
}
