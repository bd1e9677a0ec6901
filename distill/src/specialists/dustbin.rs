//! A specialist's training data (paper, section 5): its own classes plus
//! one "dustbin" class for all the others; half of its examples drawn from
//! its classes and half at random from the rest; and, after training, the
//! dustbin logit raised by the log of the factor by which the dustbin was
//! under-sampled, so that the specialist's probabilities refer to the true
//! class frequencies again.

/// The label a specialist covering `classes` learns for true label
/// `label`: its position in `classes`, or `classes.len()` (the dustbin).
pub fn specialist_label(classes: &[usize], label: usize) -> usize {
    classes
        .iter()
        .position(|&c| c == label)
        .unwrap_or(classes.len())
}

/// What to add to the dustbin logit after training: `ln(natural /
/// trained)`, where `natural` is the fraction of dustbin examples in the
/// data the specialist meets at inference and `trained` the fraction in
/// its training stream. Under-sampling the dustbin (`trained < natural`)
/// makes the correction positive.
pub fn dustbin_logit_correction(natural: f64, trained: f64) -> f64 {
    assert!(
        natural > 0.0 && trained > 0.0,
        "dustbin fractions must be positive: {natural} and {trained}"
    );
    (natural / trained).ln()
}

/// The fraction of dustbin examples in a specialist's training stream
/// (see [`crate::train::Targets::Enriched`]): every epoch it sees its `own`
/// examples and as many drawn from the `rest` (all of the rest when there
/// are fewer), so the fraction is one half unless the rest runs short.
pub fn enriched_dustbin_fraction(own: usize, rest: usize) -> f64 {
    let drawn = own.min(rest);
    drawn as f64 / (own + drawn).max(1) as f64
}

/// The fraction of `labels` outside `classes`: how often a specialist
/// covering `classes` meets dustbin examples in the natural data.
pub fn natural_dustbin_fraction(labels: &[u32], classes: &[usize]) -> f64 {
    let outside = labels
        .iter()
        .filter(|&&l| !classes.contains(&(l as usize)))
        .count();
    outside as f64 / labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enriched_stream_is_half_own_classes_unless_the_rest_runs_short() {
        // 10 balanced classes, the specialist covers 2: 20% of the data.
        let labels: Vec<u32> = (0..1000).map(|i| (i % 10) as u32).collect();
        let classes = [3, 7];
        assert!((natural_dustbin_fraction(&labels, &classes) - 0.8).abs() < 1e-12);
        assert_eq!(enriched_dustbin_fraction(200, 800), 0.5);
        // Here the dustbin is under-sampled 0.8 / 0.5 = 1.6 times.
        let c = dustbin_logit_correction(0.8, enriched_dustbin_fraction(200, 800));
        assert!((c - 1.6f64.ln()).abs() < 1e-12);
        // 8 of 10 classes covered: only 200 others for 800 own examples.
        assert_eq!(enriched_dustbin_fraction(800, 200), 0.2);
    }

    #[test]
    fn labels_map_to_positions_or_the_dustbin() {
        let classes = [7, 2, 9];
        assert_eq!(specialist_label(&classes, 2), 1);
        assert_eq!(specialist_label(&classes, 9), 2);
        assert_eq!(specialist_label(&classes, 0), 3);
    }

    #[test]
    fn correction_by_hand() {
        // 3 of 10 balanced classes covered: 70% of the data is dustbin; a
        // half-and-half stream under-samples it by 0.7 / 0.5 = 1.4.
        let c = dustbin_logit_correction(0.7, 0.5);
        assert!((c - 1.4f64.ln()).abs() < 1e-15);
        assert!((c - 0.336_472_236_621_212_9).abs() < 1e-12);
        // Raising the logit by ln 1.4 multiplies the dustbin's odds by 1.4:
        // logits (0, 0) give 0.5; after the correction 1.4 / 2.4.
        let p = c.exp() / (c.exp() + 1.0);
        assert!((p - 1.4 / 2.4).abs() < 1e-12);
        // No correction when the stream kept the natural proportion.
        assert_eq!(dustbin_logit_correction(0.5, 0.5), 0.0);
    }
}
