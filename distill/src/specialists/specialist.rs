//! One specialist (paper, section 5): a network of the generalist's shape
//! whose output layer covers its own classes plus a dustbin, started from
//! the generalist's weights, trained on the enriched half-and-half stream,
//! with its dustbin logit corrected afterwards.

use candle_core::{Device, Var};
use common::dataset::examples::Examples;
use common::dataset::Dataset;

use super::dustbin::{
    dustbin_logit_correction, enriched_dustbin_fraction, natural_dustbin_fraction, specialist_label,
};
use crate::hparams::TrainConfig;
use crate::model::{Dense, Mlp, MlpSpec};
use crate::train::{train_observed, Targets, TrainObserver, TrainReport};
use crate::{Error, Result};

/// Checks that `classes` can be a specialist's over `num_classes` classes:
/// at least one, distinct, each below `num_classes`, and not all of them
/// (a specialist needs a dustbin).
pub fn check_classes(classes: &[usize], num_classes: usize) -> Result<()> {
    let mut sorted = classes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if classes.is_empty() || sorted.len() != classes.len() {
        return Err(Error::invalid(
            "specialist classes",
            format!("need at least one class, each once, got {classes:?}"),
        ));
    }
    if let Some(c) = classes.iter().find(|&&c| c >= num_classes) {
        return Err(Error::invalid(
            "specialist classes",
            format!("class {c} does not exist (the data has {num_classes} classes)"),
        ));
    }
    if classes.len() == num_classes {
        return Err(Error::invalid(
            "specialist classes",
            "a specialist covering every class has no dustbin; use more specialists",
        ));
    }
    Ok(())
}

/// `data` as a specialist covering `classes` sees it: the same examples,
/// labelled with their position in `classes` or the dustbin
/// (`classes.len()`).
pub fn relabel(data: &Dataset, classes: &[usize]) -> Result<Dataset> {
    let labels = specialist_labels(data.labels(), classes);
    Ok(Dataset::new(
        format!("{}/specialist", data.name()),
        data.features().to_vec(),
        labels,
        data.dim(),
        classes.len() + 1,
        data.image_shape(),
        data.normalization(),
    )?)
}

fn specialist_labels(labels: &[u32], classes: &[usize]) -> Vec<u32> {
    labels
        .iter()
        .map(|&l| specialist_label(classes, l as usize) as u32)
        .collect()
}

/// A specialist before training: the generalist's hidden layers; output
/// rows of its own classes copied from the generalist's; a dustbin row that
/// is the mean of the other classes' rows, with their mean bias plus the
/// log of their number, so that the dustbin starts near the generalist's
/// total probability of the other classes (exact when their logits agree).
pub fn init_from_generalist(generalist: &Mlp, classes: &[usize], device: &Device) -> Result<Mlp> {
    let spec = generalist.spec();
    check_classes(classes, spec.num_classes)?;
    let layers = generalist.layers();
    let (last, hidden) = layers.split_last().expect("an MLP has an output layer");
    let mut copied: Vec<Dense> = hidden
        .iter()
        .map(|l| {
            Ok(Dense {
                weight: Var::from_tensor(&l.weight.as_tensor().to_device(device)?)?,
                bias: Var::from_tensor(&l.bias.as_tensor().to_device(device)?)?,
            })
        })
        .collect::<Result<_>>()?;
    let weight: Vec<Vec<f32>> = last.weight.as_tensor().to_vec2()?;
    let bias: Vec<f32> = last.bias.as_tensor().to_vec1()?;
    let fan_in = weight[0].len();
    let others: Vec<usize> = (0..spec.num_classes)
        .filter(|c| !classes.contains(c))
        .collect();
    let mut out_weight = Vec::with_capacity((classes.len() + 1) * fan_in);
    let mut out_bias = Vec::with_capacity(classes.len() + 1);
    for &c in classes {
        out_weight.extend_from_slice(&weight[c]);
        out_bias.push(bias[c]);
    }
    let n = others.len() as f32;
    out_weight.extend((0..fan_in).map(|i| others.iter().map(|&c| weight[c][i]).sum::<f32>() / n));
    out_bias.push(others.iter().map(|&c| bias[c]).sum::<f32>() / n + n.ln());
    let rows = classes.len() + 1;
    copied.push(Dense {
        weight: Var::from_vec(out_weight, (rows, fan_in), device)?,
        bias: Var::from_vec(out_bias, rows, device)?,
    });
    let spec = MlpSpec::new(spec.input_dim, spec.hidden.clone(), rows)?;
    Mlp::from_layers(spec, copied)
}

/// What training a specialist did, for the report.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpecialistTraining {
    /// Training examples of its own classes.
    pub own_examples: usize,
    /// Examples per epoch (its own plus as many drawn from the rest).
    pub examples_per_epoch: usize,
    /// Fraction of dustbin examples in the training split.
    pub natural_dustbin: f64,
    /// Fraction of dustbin examples in its training stream.
    pub trained_dustbin: f64,
    /// What was added to the dustbin logit after training.
    pub dustbin_correction: f64,
    /// The training history.
    pub training: TrainReport,
}

/// Trains a specialist covering `classes`, started from `generalist`, on
/// the enriched stream of `train` (validated on `validation` relabelled the
/// same way), then raises its dustbin bias by [`dustbin_logit_correction`].
pub fn train_specialist(
    generalist: &Mlp,
    classes: &[usize],
    (train, validation): (&dyn Examples, &Dataset),
    cfg: &TrainConfig,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<(Mlp, SpecialistTraining)> {
    generalist.spec().ensure_fits("generalist", train)?;
    let model = init_from_generalist(generalist, classes, device)?;
    let train_labels = train.labels()?;
    let labels = specialist_labels(&train_labels, classes);
    let dustbin = classes.len() as u32;
    let (own, rest): (Vec<usize>, Vec<usize>) =
        (0..labels.len()).partition(|&i| labels[i] != dustbin);
    if own.is_empty() || rest.is_empty() {
        return Err(Error::invalid(
            "specialist classes",
            format!(
                "{classes:?} leave {} examples of their own and {} others in the training split; \
                 a specialist needs both",
                own.len(),
                rest.len()
            ),
        ));
    }
    let validation = relabel(validation, classes)?;
    let training = train_observed(
        &model,
        train,
        &validation,
        Targets::Enriched {
            labels: &labels,
            classes: classes.len() + 1,
            own: &own,
            rest: &rest,
        },
        cfg,
        device,
        observer,
    )?;
    let natural = natural_dustbin_fraction(&train_labels, classes);
    let trained = enriched_dustbin_fraction(own.len(), rest.len());
    let correction = dustbin_logit_correction(natural, trained);
    let output = model.layers().last().expect("an output layer");
    let mut bias: Vec<f32> = output.bias.as_tensor().to_vec1()?;
    bias[classes.len()] += correction as f32;
    output.bias.set(&candle_core::Tensor::from_vec(
        bias,
        classes.len() + 1,
        device,
    )?)?;
    Ok((
        model,
        SpecialistTraining {
            own_examples: own.len(),
            examples_per_epoch: own.len() + own.len().min(rest.len()),
            natural_dustbin: natural,
            trained_dustbin: trained,
            dustbin_correction: correction,
            training,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::predict_logits;
    use common::dataset::synthetic::SyntheticSpec;
    use common::seed::{self, Stream};

    fn generalist(classes: usize) -> Mlp {
        let spec = MlpSpec::new(6, vec![5], classes).unwrap();
        Mlp::new_random(spec, &mut seed::rng(3, Stream::Init), &Device::Cpu).unwrap()
    }

    #[test]
    fn starts_from_the_generalist_with_a_dustbin_for_the_rest() {
        let g = generalist(5);
        let s = init_from_generalist(&g, &[3, 1], &Device::Cpu).unwrap();
        assert_eq!(s.spec().num_classes, 3);
        let x = candle_core::Tensor::randn(0f32, 1.0, (4, 6), &Device::Cpu).unwrap();
        let gl: Vec<Vec<f32>> = g.forward(&x).unwrap().to_vec2().unwrap();
        let sl: Vec<Vec<f32>> = s.forward(&x).unwrap().to_vec2().unwrap();
        for (g, s) in gl.iter().zip(&sl) {
            // Own classes: the generalist's logits, in the specialist's order.
            assert!((s[0] - g[3]).abs() < 1e-5 && (s[1] - g[1]).abs() < 1e-5);
            // Dustbin: the others' mean logit + ln 3 (their logits differ,
            // so this is below log-sum-exp and above their mean).
            let others = [g[0], g[2], g[4]];
            let mean = others.iter().sum::<f32>() / 3.0;
            assert!((s[2] - (mean + 3f32.ln())).abs() < 1e-5);
            let lse = others.iter().map(|v| v.exp()).sum::<f32>().ln();
            assert!(s[2] <= lse + 1e-5);
        }
    }

    #[test]
    fn bad_class_lists_are_refused() {
        assert!(check_classes(&[], 4).is_err());
        assert!(check_classes(&[1, 1], 4).is_err());
        assert!(check_classes(&[4], 4).is_err());
        assert!(check_classes(&[0, 1, 2, 3], 4).is_err());
        check_classes(&[2, 0], 4).unwrap();
    }

    #[test]
    fn a_trained_specialist_tells_its_classes_apart_and_its_dustbin_is_corrected() {
        let data = SyntheticSpec {
            num_classes: 6,
            group_size: 3,
            dim: 12,
            train_size: 3000,
            test_size: 1000,
            ..SyntheticSpec::default()
        };
        let (train, test) = data.generate().unwrap();
        let splits = common::dataset::Splits::new(&train, test, 500, 1).unwrap();
        let spec = MlpSpec::new(12, vec![32], 6).unwrap();
        let g = Mlp::new_random(spec, &mut seed::rng(1, Stream::Init), &Device::Cpu).unwrap();
        let cfg = TrainConfig {
            epochs: 6,
            batch_size: 64,
            ..TrainConfig::default()
        };
        let classes = [0, 1, 2];
        struct Quiet;
        impl TrainObserver for Quiet {}
        let (s, t) = train_specialist(
            &g,
            &classes,
            (&splits.train, &splits.validation),
            &cfg,
            &Device::Cpu,
            &mut Quiet,
        )
        .unwrap();
        // About half the training split is in classes 0..3, so the stream
        // is half and half and the dustbin barely under-sampled.
        assert_eq!(t.trained_dustbin, 0.5);
        assert!((t.natural_dustbin - 0.5).abs() < 0.05, "{t:?}");
        assert!((t.dustbin_correction - (t.natural_dustbin / 0.5).ln()).abs() < 1e-12);
        assert_eq!(t.training.epochs.len(), 6);
        let relabelled = relabel(&splits.test, &classes).unwrap();
        let errors = crate::eval::evaluate(&s, &relabelled, &Device::Cpu)
            .unwrap()
            .errors;
        assert!(
            errors < relabelled.len() / 4,
            "{errors} errors of {}",
            relabelled.len()
        );
        assert_eq!(
            predict_logits(&s, &relabelled, &Device::Cpu).unwrap().len(),
            4 * 1000
        );
    }
}
