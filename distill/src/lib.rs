//! The machine-learning core of the distillation cluster, on candle:
//! multilayer perceptrons with dropout, max-norm and jitter, SGD with
//! momentum and a learning-rate schedule, the distillation loss of Hinton,
//! Vinyals & Dean (2015), training loops on hard labels or on a transfer
//! set, teacher inference into a transfer set, evaluation, and model files.
//!
//! The device is chosen once, at the edge ([`device::select`]), and passed
//! down as `&Device`. Every random choice draws from a stream derived from
//! the configured seed ([`common::seed`]).

pub mod augment;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod fused;
pub mod hparams;
pub mod loss;
pub mod model;
pub mod model_io;
pub mod optim;
pub mod schedule;
pub mod specialists;
pub mod subset;
pub mod task;
pub mod teacher;
pub mod train;

pub use error::{Error, Result};
