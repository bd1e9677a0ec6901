//! Tasks run one after another on a small synthetic dataset: the chain a
//! job runs (train, infer, distil, evaluate) and the errors of missing
//! inputs.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use common::dataset::Splits;
use common::transfer::EnsembleCombine;

use super::*;
use crate::eval::evaluate;
use crate::hparams::{DistillConfig, TrainConfig};
use crate::model::ModelShape;
use crate::subset::ExampleSubset;
use common::dataset::synthetic::SyntheticSpec;

struct Count(usize);
impl TrainObserver for Count {
    fn on_step(&mut self, _: &StepProgress) -> Result<()> {
        self.0 += 1;
        Ok(())
    }
}

fn splits() -> Splits {
    let spec = SyntheticSpec {
        num_classes: 4,
        group_size: 2,
        dim: 8,
        train_size: 300,
        test_size: 100,
        ..SyntheticSpec::default()
    };
    let (train, test) = spec.generate().unwrap();
    Splits::new(&train, test, 50, 3).unwrap()
}

/// Inputs of nothing but the splits.
fn no_inputs(splits: &Splits) -> TaskInputs<'_> {
    TaskInputs {
        data: splits.into(),
        models: HashMap::new(),
        transfer_dir: None,
        clusters: None,
    }
}

fn train_spec(model: &str, distill: Option<DistillConfig>) -> TaskSpec {
    TaskSpec::Train(TrainTask {
        model: model.into(),
        shape: ModelShape::Mlp { hidden: vec![16] },
        train: TrainConfig {
            epochs: 2,
            batch_size: 32,
            ..TrainConfig::default()
        },
        distill,
        subset: None,
        record_test_curve: false,
    })
}

#[test]
fn spec_round_trips_through_json_and_refuses_unknown_fields() {
    let spec = train_spec("teacher-0", None);
    let json = serde_json::to_string(&spec).unwrap();
    assert!(json.contains(r#""kind":"train""#), "{json}");
    assert_eq!(serde_json::from_str::<TaskSpec>(&json).unwrap(), spec);
    let bad = r#"{"kind":"infer","shard":0,"start":0,"end":1,"teachers":[],"extra":1}"#;
    assert!(serde_json::from_str::<TaskSpec>(bad).is_err());
}

#[test]
fn train_infer_distil_evaluate_chain_is_deterministic() {
    let splits = splits();
    let device = Device::Cpu;
    let run = |spec: &TaskSpec, inputs: &TaskInputs<'_>| {
        let mut count = Count(0);
        let out = spec.execute(inputs, &device, &mut count).unwrap();
        assert!(count.0 > 0, "observer saw progress");
        out
    };
    let none = no_inputs(&splits);
    let teacher = run(&train_spec("teacher-0", None), &none);
    assert_eq!(
        teacher.payload,
        run(&train_spec("teacher-0", None), &none).payload
    );

    let models = HashMap::from([("teacher-0".to_string(), teacher.payload.clone())]);
    let with_teacher = TaskInputs {
        data: (&splits).into(),
        models,
        transfer_dir: None,
        clusters: None,
    };
    let n = splits.train.len();
    let infer = TaskSpec::Infer(InferTask {
        shard: 0,
        start: 0,
        end: n,
        teachers: vec!["teacher-0".into()],
        combined: None,
    });
    let shard = run(&infer, &with_teacher).payload;
    let dir = tempfile::tempdir().unwrap();
    let Ok(Checked::Shard(entry)) = infer.check_output(&shard, 4) else {
        panic!("inference makes the shard its spec describes");
    };
    assert!(
        infer.check_output(&shard, 5).is_err(),
        "a shard of 4 classes"
    );
    std::fs::write(dir.path().join(&entry.file), &shard).unwrap();
    let mut manifest = common::transfer::ManifestBuilder::new(
        &splits.train.fingerprint(),
        n,
        4,
        vec!["teacher-0".into()],
        common::transfer::Encoding::DenseF32,
        1,
    );
    manifest.stored(0, entry);
    common::transfer::write_manifest(dir.path(), &manifest.complete().unwrap()).unwrap();
    let distil_inputs = TaskInputs {
        data: (&splits).into(),
        models: HashMap::new(),
        transfer_dir: Some(dir.path().into()),
        clusters: None,
    };
    let student = run(
        &train_spec("student", Some(DistillConfig::default())),
        &distil_inputs,
    );

    let models = HashMap::from([
        ("teacher-0".to_string(), teacher.payload),
        ("student".to_string(), student.payload),
    ]);
    let eval_inputs = TaskInputs {
        data: (&splits).into(),
        models,
        transfer_dir: None,
        clusters: None,
    };
    let eval = TaskSpec::Evaluate(EvaluateTask {
        models: vec!["teacher-0".into(), "student".into()],
        ensemble: Some(EnsembleSpec {
            name: "ensemble".into(),
            members: vec!["teacher-0".into()],
            combine: EnsembleCombine::Arithmetic,
        }),
        bias_adjustment: Some(BiasAdjustment {
            model: "student".into(),
            classes: vec![1],
            shift: BiasShift::Chosen(ChooseOn::Validation),
        }),
        combined: None,
    });
    let results: Vec<ModelEvaluation> =
        serde_json::from_slice(&run(&eval, &eval_inputs).payload).unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[3].name, "student+bias");
    // The chosen shift is never worse on validation than no shift.
    assert!(results[3].validation_errors <= results[1].validation_errors);
    assert!(results[3].bias_shift.unwrap().abs() <= MAX_BIAS_SHIFT);
    assert_eq!(results[0].params, 8 * 16 + 16 + 16 * 4 + 4);
    // A one-member ensemble predicts exactly what its member predicts.
    assert_eq!(results[2].test, results[0].test);
    assert_eq!(results[2].validation_errors, results[0].validation_errors);
}

#[test]
fn a_subset_trains_on_fewer_examples_and_records_a_test_curve() {
    let splits = splits();
    let none = no_inputs(&splits);
    let spec = TaskSpec::Train(TrainTask {
        subset: Some(ExampleSubset {
            exclude_classes: vec![0],
            ..ExampleSubset::default()
        }),
        record_test_curve: true,
        ..match train_spec("baseline", None) {
            TaskSpec::Train(t) => t,
            _ => unreachable!(),
        }
    });
    let out = spec.execute(&none, &Device::Cpu, &mut Count(0)).unwrap();
    let without_0 = splits.train.labels().iter().filter(|&&l| l != 0).count();
    let Some(TaskSummary::Train(summary)) = spec.summary(&out.summary) else {
        panic!("a training summary: {}", out.summary);
    };
    assert_eq!(summary.examples, without_0);
    assert_eq!(summary.test_errors_per_epoch.map(|e| e.len()), Some(2));
    // A class never seen is never predicted: every test 0 is an error.
    let Model::Mlp(model) = model_io::from_bytes(&out.payload, Path::new("m"), &Device::Cpu)
        .unwrap()
        .model;
    let e = evaluate(&model, &splits.test, &Device::Cpu).unwrap();
    assert_eq!(e.per_class_errors[0], e.per_class_totals[0]);
}

#[test]
fn missing_inputs_are_named() {
    let splits = splits();
    let none = no_inputs(&splits);
    let infer = TaskSpec::Infer(InferTask {
        shard: 0,
        start: 0,
        end: 10,
        teachers: vec!["t".into()],
        combined: None,
    });
    let err = infer
        .execute(&none, &Device::Cpu, &mut Count(0))
        .unwrap_err();
    assert!(
        err.to_string().contains("model t was not provided"),
        "{err}"
    );
    let err = train_spec("s", Some(DistillConfig::default()))
        .execute(&none, &Device::Cpu, &mut Count(0))
        .unwrap_err();
    assert!(err.to_string().contains("needs the transfer set"), "{err}");
}
