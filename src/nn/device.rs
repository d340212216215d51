//! Choosing where models run: `--device auto|cpu|cuda|metal`.

use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA or Metal when built in and present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            "metal" => Ok(DeviceChoice::Metal),
            other => Err(format!(
                "unknown device {other:?}: use auto, cpu, cuda or metal"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("this histolens was built without {0} support: rebuild with `--features {0}`")]
    NotBuilt(&'static str),
    #[error("{0} device unavailable: {1}")]
    Unavailable(&'static str, candle_core::Error),
}

/// The device for `choice`. `Auto` never fails: it falls back to the CPU.
pub fn select(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda(),
        DeviceChoice::Metal => metal(),
        DeviceChoice::Auto => Ok(cuda().or_else(|_| metal()).unwrap_or(Device::Cpu)),
    }
}

fn cuda() -> Result<Device, DeviceError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(DeviceError::NotBuilt("cuda"));
    }
    Device::new_cuda(0).map_err(|e| DeviceError::Unavailable("cuda", e))
}

fn metal() -> Result<Device, DeviceError> {
    if !candle_core::utils::metal_is_available() {
        return Err(DeviceError::NotBuilt("metal"));
    }
    Device::new_metal(0).map_err(|e| DeviceError::Unavailable("metal", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_fall_back() {
        assert_eq!("CPU".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!(select(DeviceChoice::Auto).is_ok());
        assert!(matches!(select(DeviceChoice::Cpu), Ok(Device::Cpu)));
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(
            select(DeviceChoice::Cuda),
            Err(DeviceError::NotBuilt("cuda"))
        ));
    }
}
