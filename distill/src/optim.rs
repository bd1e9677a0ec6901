//! Stochastic gradient descent with momentum (candle-nn's SGD has none).
//!
//! The update follows PyTorch's `torch.optim.SGD` with `dampening = 0`, so
//! that results can be compared with a PyTorch reference:
//!
//! ```text
//! g = grad + weight_decay * w        (weight decay on matrices only, not biases)
//! v = momentum * v + g
//! d = g + momentum * v  if nesterov, else v
//! w = w - lr * d
//! ```

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{Error, Result};

/// SGD with (optionally Nesterov) momentum over a fixed set of variables.
#[derive(Debug)]
pub struct SgdMomentum {
    vars: Vec<Var>,
    velocity: Vec<Tensor>,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
}

impl SgdMomentum {
    /// An optimiser for `vars` with zero initial velocity.
    pub fn new(vars: Vec<Var>, momentum: f64, weight_decay: f64, nesterov: bool) -> Result<Self> {
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::invalid(
                "momentum",
                format!("must be in [0, 1), got {momentum}"),
            ));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::invalid(
                "weight_decay",
                format!("must be >= 0, got {weight_decay}"),
            ));
        }
        let velocity = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        Ok(SgdMomentum {
            vars,
            velocity,
            momentum,
            weight_decay,
            nesterov,
        })
    }

    /// Applies one update with learning rate `lr`. A variable without a
    /// gradient (not used by the loss) is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for (var, velocity) in self.vars.iter().zip(self.velocity.iter_mut()) {
            let Some(grad) = grads.get(var) else { continue };
            let grad = if self.weight_decay > 0.0 && var.rank() >= 2 {
                (grad + (var.as_tensor() * self.weight_decay)?)?
            } else {
                grad.clone()
            };
            *velocity = ((&*velocity * self.momentum)? + &grad)?;
            let direction = if self.nesterov {
                (grad + (&*velocity * self.momentum)?)?
            } else {
                velocity.clone()
            };
            var.set(&(var.as_tensor() - (direction * lr)?)?)?;
        }
        Ok(())
    }

    /// The velocity buffers, in the order of the variables (for checkpoints).
    pub fn velocity(&self) -> &[Tensor] {
        &self.velocity
    }

    /// Replaces the velocity buffers (from a checkpoint); each must have
    /// its variable's shape.
    pub fn set_velocity(&mut self, velocity: Vec<Tensor>) -> Result<()> {
        if velocity.len() != self.vars.len()
            || velocity
                .iter()
                .zip(&self.vars)
                .any(|(v, var)| v.dims() != var.dims())
        {
            return Err(Error::invalid(
                "checkpoint",
                "its momentum buffers do not match the model's parameters",
            ));
        }
        self.velocity = velocity;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Minimises f(w) = 0.5 * sum(w^2) (gradient w) for three steps and
    /// compares with the update rule computed by hand in f64.
    fn run(momentum: f64, nesterov: bool, weight_decay: f64) -> (Vec<f32>, [f64; 4]) {
        let dev = Device::Cpu;
        let w = Var::from_vec(vec![1.0f32, -2.0, 0.5, 3.0], (2, 2), &dev).unwrap();
        let mut opt = SgdMomentum::new(vec![w.clone()], momentum, weight_decay, nesterov).unwrap();
        let lr = 0.1;
        let mut w_ref = [1.0f64, -2.0, 0.5, 3.0];
        let mut v_ref = [0.0f64; 4];
        for _ in 0..3 {
            let loss = (w.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap(), lr).unwrap();
            for i in 0..4 {
                let g = w_ref[i] + weight_decay * w_ref[i];
                v_ref[i] = momentum * v_ref[i] + g;
                let d = if nesterov {
                    g + momentum * v_ref[i]
                } else {
                    v_ref[i]
                };
                w_ref[i] -= lr * d;
            }
        }
        let got = w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (got, w_ref)
    }

    #[test]
    fn matches_the_update_rule_in_f64() {
        for (m, n, wd) in [
            (0.0, false, 0.0),
            (0.9, false, 0.0),
            (0.9, true, 0.0),
            (0.5, false, 0.01),
        ] {
            let (got, want) = run(m, n, wd);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-6,
                    "momentum {m} nesterov {n}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn bad_hyperparameters_are_rejected() {
        assert!(SgdMomentum::new(vec![], 1.0, 0.0, false).is_err());
        assert!(SgdMomentum::new(vec![], -0.1, 0.0, false).is_err());
        assert!(SgdMomentum::new(vec![], 0.9, -1.0, false).is_err());
    }
}
