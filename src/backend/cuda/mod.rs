//! The CUDA backend: kernels compiled ahead of time by build.rs from kernels/*.cu and
//! embedded in the crate, launched through cudarc with the driver loaded at run time, so
//! rcx builds and runs (CPU only) on machines without CUDA. Each kernel has one typed
//! launch wrapper, a method of `CudaRuntime`, mirroring the CPU op it is checked against.

mod backend;
pub mod buckets;
mod cast;
pub mod deberta_ops;
pub mod decoder_ops;
mod kernels;
mod loss;
mod matmul;
pub mod nccl;
mod ops;
mod optim;
mod runtime;
pub mod zero;

pub use backend::{Cuda, CudaTokens};
pub use cast::ModelFloat;
pub use kernels::{KERNEL_IMAGES, KERNELS_BUILT, KERNELS_NOT_BUILT_REASON, KernelImage};
pub use loss::RankingBatch;
pub use matmul::GemmElement;
pub use ops::{FlashKernels, TokenBatch, launch};
pub use optim::AdamWStep;
pub use runtime::{Activation, CudaRuntime, DeviceRead, DeviceWrite, available};
