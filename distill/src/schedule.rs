//! The learning-rate schedule: linear warm-up, then cosine decay.

use crate::{Error, Result};

/// Learning rate as a function of the optimisation step: rises linearly from
/// `base / warmup_steps` to `base` over `warmup_steps`, then follows a cosine
/// from `base` down to `base * final_fraction` at `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    base: f64,
    warmup_steps: usize,
    total_steps: usize,
    final_fraction: f64,
}

impl LrSchedule {
    /// A schedule; `warmup_steps` must not exceed `total_steps`.
    pub fn new(
        base: f64,
        warmup_steps: usize,
        total_steps: usize,
        final_fraction: f64,
    ) -> Result<Self> {
        if !(base.is_finite() && base > 0.0) {
            return Err(Error::invalid(
                "learning_rate",
                format!("must be > 0, got {base}"),
            ));
        }
        if total_steps == 0 || warmup_steps > total_steps {
            return Err(Error::invalid(
                "schedule",
                format!("{warmup_steps} warm-up steps for {total_steps} steps in all"),
            ));
        }
        if !(0.0..=1.0).contains(&final_fraction) {
            return Err(Error::invalid(
                "final_lr_fraction",
                format!("must be in [0, 1], got {final_fraction}"),
            ));
        }
        Ok(LrSchedule {
            base,
            warmup_steps,
            total_steps,
            final_fraction,
        })
    }

    /// The learning rate for step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = (self.total_steps - self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.base * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_by_cosine() {
        let s = LrSchedule::new(0.1, 10, 110, 0.0).unwrap();
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(60) - 0.05).abs() < 1e-12, "half way down the cosine");
        assert!(s.lr(110).abs() < 1e-12);
        assert!(s.lr(500).abs() < 1e-12, "stays at the floor");
        let mut prev = f64::INFINITY;
        for step in 10..=110 {
            assert!(s.lr(step) <= prev);
            prev = s.lr(step);
        }
    }

    #[test]
    fn final_fraction_sets_the_floor() {
        let s = LrSchedule::new(1.0, 0, 100, 0.1).unwrap();
        assert!((s.lr(0) - 1.0).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn bad_schedules_are_rejected() {
        assert!(LrSchedule::new(0.0, 0, 10, 0.0).is_err());
        assert!(LrSchedule::new(0.1, 11, 10, 0.0).is_err());
        assert!(LrSchedule::new(0.1, 0, 0, 0.0).is_err());
        assert!(LrSchedule::new(0.1, 0, 10, 1.5).is_err());
    }
}
