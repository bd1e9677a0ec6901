//! The job as a graph of tasks: teachers (hard labels, one per ensemble
//! member) and the baseline, then teacher inference over each transfer-set
//! shard, then the student's distillation, then one evaluation of everything.
//! The shard count comes from the config, never from the number of workers.
//!
//! With `[specialists]`, the one teacher is the generalist: a clustering
//! task groups its confused classes, one task per specialist trains it,
//! inference also stores the generalist+specialists distribution (as the
//! transfer set's `combined` teacher), and a second student learns from it.
//!
//! Each task's inputs and output come from its spec; its dependencies are
//! the tasks that make its inputs. The plan also says what each model is
//! (its [`Role`]), for the report.

use std::collections::{BTreeMap, HashMap};

use common::artifact::ArtifactName;
use common::dataset::shard::DatasetLayout;
use common::dataset::shard_ranges;
use distill::hparams::{DistillConfig, TrainConfig};
use distill::model::ModelShape;
use distill::task::{
    BiasAdjustment, ClusterTask, CombinedSpec, EnsembleSpec, EvaluateTask, InferTask, JobLayout,
    NoopTask, SpecialistTask, TaskSpec, TrainTask,
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

/// One task of the plan.
#[derive(Clone, Debug)]
pub struct PlannedTask {
    /// Stable id, such as `teacher-0`, `infer-00003`, `student`.
    pub id: String,
    /// What the worker runs.
    pub spec: TaskSpec,
    /// Tasks that must be done first (indices into [`Plan::tasks`]): those
    /// whose outputs it reads.
    pub deps: Vec<usize>,
    /// Artifacts it reads (from its spec).
    pub inputs: Vec<ArtifactName>,
    /// The artifact it makes (from its spec).
    pub output: ArtifactName,
}

/// What a model is in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A teacher trained on hard labels (with specialists, the generalist).
    Teacher,
    /// The teachers' ensemble.
    Ensemble,
    /// A model distilled from the transfer set.
    Student,
    /// The student's architecture trained on hard labels.
    Baseline,
    /// A specialist (its errors are on its own classes + dustbin).
    Specialist,
    /// The generalist and its specialists combined by eq. 5.
    Combined,
}

impl Role {
    /// Its name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Teacher => "teacher",
            Role::Ensemble => "ensemble",
            Role::Student => "student",
            Role::Baseline => "baseline",
            Role::Specialist => "specialist",
            Role::Combined => "combined",
        }
    }
}

/// A model of the plan, as the report describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedModel {
    /// What it is.
    pub role: Role,
    /// The models it learned from (empty for hard-label models).
    pub learned_from: Vec<String>,
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
    /// Every model the evaluation reports, by name.
    pub models: BTreeMap<String, PlannedModel>,
}

impl Plan {
    /// A plan of `tasks` (dependencies first), each with its inputs and
    /// output from its spec and its dependencies from those.
    fn link(tasks: Vec<(String, TaskSpec)>, layout: &JobLayout<'_>) -> Vec<PlannedTask> {
        let mut made_by: HashMap<ArtifactName, usize> = HashMap::new();
        let mut planned = Vec::with_capacity(tasks.len());
        for (i, (id, spec)) in tasks.into_iter().enumerate() {
            let inputs = spec.inputs(layout);
            let mut deps: Vec<usize> = inputs
                .iter()
                .filter_map(|a| made_by.get(a).copied())
                .collect();
            deps.sort_unstable();
            deps.dedup();
            let output = spec.output();
            made_by.insert(output.clone(), i);
            planned.push(PlannedTask {
                id,
                spec,
                deps,
                inputs,
                output,
            });
        }
        planned
    }
}

/// A load test's plan: `tasks` independent no-op tasks.
pub fn load_test_plan(tasks: usize) -> Plan {
    let tasks = (0..tasks as u64)
        .map(|index| {
            let noop = NoopTask { index };
            (noop.id(), TaskSpec::Noop(noop))
        })
        .collect();
    Plan {
        tasks: Plan::link(
            tasks,
            &JobLayout {
                transfer_shards: 0,
                dataset: &DatasetLayout::default(),
            },
        ),
        teachers: Vec::new(),
        specialists: Vec::new(),
        transfer_teachers: Vec::new(),
        shards: 0,
        models: BTreeMap::new(),
    }
}

/// Plans the job of `cfg` for a dataset stored as `dataset` says (with
/// `[load_test]`, only its no-op tasks).
pub fn plan(cfg: &ClusterConfig, dataset: &DatasetLayout) -> common::Result<Plan> {
    let train_len = dataset.train.last().map_or(0, |r| r.end);
    if let Some(load) = &cfg.load_test {
        return Ok(load_test_plan(load.tasks));
    }
    let teachers: Vec<String> = (0..cfg.teachers.count)
        .map(|k| format!("teacher-{k}"))
        .collect();
    // Each model trains with its own seed, derived from the job's and its
    // name. The student and the baseline learn from the `[transfer]`
    // selection of examples; the teachers from the whole training split.
    let train = |name: &str, shape: ModelShape, base: &TrainConfig, distill, teacher: bool| {
        TaskSpec::Train(TrainTask {
            model: name.into(),
            shape,
            train: TrainConfig {
                seed: derive_seed(cfg.seed, name),
                shuffle_window_shards: cfg.dataset.shuffle_window_shards,
                ..base.clone()
            },
            distill,
            subset: if teacher { None } else { cfg.transfer_subset() },
            record_test_curve: !teacher && cfg.record_test_curves,
        })
    };
    let mut tasks: Vec<(String, TaskSpec)> = Vec::new();
    let mut models = BTreeMap::new();
    let mut add_model = |name: &str, role: Role, learned_from: &[String]| {
        let model = PlannedModel {
            role,
            learned_from: learned_from.to_vec(),
        };
        models.insert(name.to_string(), model);
    };
    for name in &teachers {
        tasks.push((
            name.clone(),
            train(name, cfg.teachers.shape(), &cfg.teachers.train, None, true),
        ));
        add_model(name, Role::Teacher, &[]);
    }
    tasks.push((
        BASELINE.into(),
        train(
            BASELINE,
            cfg.student.shape(),
            cfg.baseline_train(),
            None,
            false,
        ),
    ));
    add_model(BASELINE, Role::Baseline, &[]);
    let generalist = &teachers[0];
    let mut specialists = Vec::new();
    let mut combined = None;
    if let Some(spec) = &cfg.specialists {
        tasks.push((
            CLUSTER.into(),
            TaskSpec::Cluster(ClusterTask {
                generalist: generalist.clone(),
                specialists: spec.count,
                classes_per_specialist: spec.classes_per_specialist,
                seed: derive_seed(cfg.seed, CLUSTER),
            }),
        ));
        for m in 0..spec.count {
            let name = specialist_name(m);
            tasks.push((
                name.clone(),
                TaskSpec::Specialist(SpecialistTask {
                    model: name.clone(),
                    index: m,
                    generalist: generalist.clone(),
                    train: TrainConfig {
                        seed: derive_seed(cfg.seed, &name),
                        shuffle_window_shards: cfg.dataset.shuffle_window_shards,
                        ..spec.train.clone()
                    },
                }),
            ));
            add_model(&name, Role::Specialist, &teachers);
            specialists.push(name);
        }
        let with_specialists: Vec<String> = teachers.iter().chain(&specialists).cloned().collect();
        add_model(COMBINED, Role::Combined, &with_specialists);
        combined = Some(CombinedSpec {
            name: COMBINED.into(),
            generalist: generalist.clone(),
            specialists: specialists.clone(),
            top_n: spec.top_n,
        });
    }
    let mut transfer_teachers = teachers.clone();
    transfer_teachers.extend(combined.as_ref().map(|c| c.name.clone()));
    let shards = cfg.transfer_shards.min(train_len.max(1));
    for (index, range) in shard_ranges(train_len, shards)?.into_iter().enumerate() {
        tasks.push((
            format!("infer-{index:05}"),
            TaskSpec::Infer(InferTask {
                shard: index,
                start: range.start,
                end: range.end,
                teachers: teachers.clone(),
                combined: combined.clone(),
            }),
        ));
    }
    // Each student learns from the teachers, or from the combination.
    let mut students = vec![(STUDENT, teachers.clone())];
    if let Some(c) = &combined {
        students.push((STUDENT_COMBINED, vec![c.name.clone()]));
    }
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
        tasks.push((
            name.to_string(),
            train(
                name,
                cfg.student.shape(),
                &cfg.student.train,
                Some(distill),
                false,
            ),
        ));
        add_model(name, Role::Student, learns_from);
    }
    let mut evaluated = teachers.clone();
    evaluated.extend(students.iter().map(|(name, _)| name.to_string()));
    evaluated.push(BASELINE.into());
    let ensemble = (teachers.len() > 1).then(|| EnsembleSpec {
        name: ENSEMBLE.into(),
        members: teachers.clone(),
        combine: cfg.student.distill.combine,
    });
    if ensemble.is_some() {
        add_model(ENSEMBLE, Role::Ensemble, &teachers);
    }
    tasks.push((
        EVALUATE.into(),
        TaskSpec::Evaluate(EvaluateTask {
            models: evaluated,
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
    ));
    Ok(Plan {
        tasks: Plan::link(
            tasks,
            &JobLayout {
                transfer_shards: shards,
                dataset,
            },
        ),
        teachers,
        specialists,
        transfer_teachers,
        shards,
        models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The layout of a dataset of `train` training examples (one shard per
    /// split).
    pub(crate) fn layout(train: usize) -> DatasetLayout {
        DatasetLayout::new([train, 10, 10], 65_536).unwrap()
    }

    #[test]
    fn tasks_read_only_the_dataset_shards_they_need() {
        let p = plan(&config(1, 2), &DatasetLayout::new([10, 4, 4], 4).unwrap()).unwrap();
        let inputs_of = |id: &str| -> Vec<String> {
            let task = p.tasks.iter().find(|t| t.id == id).unwrap();
            task.inputs
                .iter()
                .filter(|n| matches!(n, ArtifactName::DatasetShard(..)))
                .map(ToString::to_string)
                .collect()
        };
        // Transfer shard 1 holds examples 5..10 of the 10: dataset shards 1 and 2.
        assert_eq!(
            inputs_of("infer-00001"),
            [
                "dataset/train/shard-00001.safetensors",
                "dataset/train/shard-00002.safetensors"
            ]
        );
        assert_eq!(
            inputs_of(EVALUATE),
            [
                "dataset/validation/shard-00000.safetensors",
                "dataset/test/shard-00000.safetensors"
            ]
        );
        assert_eq!(inputs_of("teacher-0").len(), 4, "train and validation");
    }

    fn config(teachers: usize, shards: usize) -> ClusterConfig {
        let text = format!(
            "output_dir = \"o\"\ntransfer_shards = {shards}\n[dataset]\nsource = \"synthetic\"\n\
             [teachers]\ncount = {teachers}\nhidden = [8]\n[student]\nhidden = [4]\n"
        );
        ClusterConfig::parse(&text, Path::new("c.toml"), Path::new(".")).unwrap()
    }

    #[test]
    fn graph_has_teachers_baseline_shards_student_evaluation_in_dependency_order() {
        let p = plan(&config(2, 3), &layout(100)).unwrap();
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
            .map(|t| match &t.spec {
                TaskSpec::Infer(infer) => infer.start..infer.end,
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
        let p = plan(&config(1, 2), &layout(10)).unwrap();
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
        assert_eq!(plan(&config(1, 4), &layout(1000)).unwrap().shards, 4);
        assert_eq!(plan(&config(1, 50), &layout(7)).unwrap().shards, 7);
    }

    #[test]
    fn specialists_add_clustering_specialist_tasks_and_a_second_student() {
        let text = "output_dir = \"o\"\ntransfer_shards = 2\n[dataset]\nsource = \"synthetic\"\n\
                    [teachers]\nhidden = [8]\n[student]\nhidden = [4]\n[specialists]\ncount = 2\ntop_n = 2\n";
        let cfg = ClusterConfig::parse(text, Path::new("c.toml"), Path::new(".")).unwrap();
        let p = plan(&cfg, &layout(10)).unwrap();
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
        let roles: Vec<(&str, Role)> = p.models.iter().map(|(n, m)| (n.as_str(), m.role)).collect();
        assert_eq!(
            roles,
            [
                ("baseline", Role::Baseline),
                ("combined", Role::Combined),
                ("specialist-00", Role::Specialist),
                ("specialist-01", Role::Specialist),
                ("student", Role::Student),
                ("student-combined", Role::Student),
                ("teacher-0", Role::Teacher),
            ]
        );
        assert_eq!(p.models["student-combined"].learned_from, [COMBINED]);
        assert_eq!(p.tasks[3].deps, vec![0, 2]);
        assert!(p.tasks[3].inputs.contains(&ArtifactName::Clusters));
        // Inference needs the generalist, every specialist and the clusters.
        assert_eq!(p.tasks[5].deps, vec![0, 2, 3, 4]);
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
        assert_eq!(evaluate.deps, vec![0, 1, 2, 3, 4, 7, 8]);
        match &evaluate.spec {
            TaskSpec::Evaluate(e) => {
                assert!(e.combined.is_some());
                assert!(e.models.contains(&STUDENT_COMBINED.to_string()));
            }
            other => panic!("{other:?}"),
        }
    }
}
