//! Choosing the compute device, once, at the edge of the program.

use candle_core::Device;

#[cfg(not(feature = "cuda"))]
use crate::Error;
use crate::Result;

/// Which device a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU (candle's multi-threaded CPU backend).
    Cpu,
    /// The CUDA GPU with this ordinal.
    Gpu(usize),
}

/// The candle device for `choice`. Asking for a GPU in a build without the
/// `cuda` feature fails with a message that says how to get one.
pub fn select(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Gpu(ordinal) => gpu(ordinal),
    }
}

#[cfg(feature = "cuda")]
fn gpu(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn gpu(ordinal: usize) -> Result<Device> {
    Err(Error::invalid(
        "device",
        format!(
            "GPU {ordinal} requested, but this build has no CUDA support; \
             rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit's nvcc)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        assert!(select(DeviceChoice::Cpu).unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn gpu_without_cuda_feature_says_how_to_build_it() {
        let e = select(DeviceChoice::Gpu(0)).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
