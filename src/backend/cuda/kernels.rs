//! The kernel images build.rs compiled from kernels/*.cu and embedded in the crate.

/// One kernel file (kernels/<name>.cu) compiled three ways.
pub struct KernelImage {
    /// The file stem, also the module name the launch wrappers ask for.
    pub name: &'static str,
    /// PTX for compute capability 9.0 and later, JIT-compiled by the driver.
    pub ptx_compute_90: &'static str,
    /// PTX for compute capability 8.x (A100 and the like).
    pub ptx_compute_80: &'static str,
    /// Machine code for sm_90 (H100/H200): loads without JIT.
    pub cubin_sm_90: &'static [u8],
}

// Defines KERNELS_BUILT, KERNELS_NOT_BUILT_REASON and KERNEL_IMAGES.
include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
