//! The fast CPU training path: hand-written backpropagation through the
//! MLP with the matrix products written into preallocated buffers and the
//! element-wise work fused into one pass per layer, spread over the same
//! thread pool as the matrix products. [`crate::train`] uses it whenever the
//! device is the CPU; on other devices candle's autograd runs the step (it
//! keeps everything on the device). Tests hold the two to the same numbers.
//! Inference and evaluation on CPU go through [`CpuForward`] likewise.

pub mod forward;
pub mod gemm;
pub mod kernels;
pub mod trainer;

pub use forward::CpuForward;
pub use trainer::{FusedTrainer, OptimizerSettings};
