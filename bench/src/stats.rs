//! Summary statistics over seeds.

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// `mean ± std` with `decimals` decimals, or the value alone for one seed.
pub fn format_mean_std(values: &[f64], decimals: usize) -> String {
    match values.len() {
        0 => "–".into(),
        1 => format!("{:.*}", decimals, values[0]),
        _ => {
            let (m, s) = mean_std(values);
            format!("{m:.decimals$} ± {s:.decimals$}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_standard_deviation() {
        let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert!((s - 2.138089935299395).abs() < 1e-12);
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
        assert_eq!(format_mean_std(&[1.0, 3.0], 1), "2.0 ± 1.4");
        assert_eq!(format_mean_std(&[], 1), "–");
    }
}
