//! Where training runs and in which arithmetic: the `device:` and `dtype:` a run config
//! (or `rcx train --device/--dtype`) asks for. They belong to the backends, which are
//! below the config and the trainer that read them.

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when a device is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The training arithmetic. Checkpoints hold fp32 weights either way, so a run can move
/// between the two (and between CPU and GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// f32 throughout (the CPU backend, or the CUDA trainer).
    F32,
    /// bf16 activations and GEMM inputs with fp32 accumulation, fp32 master weights, fp32
    /// gradients and AdamW moments: the CUDA trainer only (`device: cuda`, or `auto` on a
    /// machine with a GPU); with the CPU, `rcx train` refuses it.
    Bf16,
}

impl Device {
    /// The name in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }
}

impl DType {
    /// The name in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}
