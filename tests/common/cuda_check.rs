//! What the kernel tests (tests/cuda_kernels.rs, tests/cuda_decoder_kernels.rs) share to
//! hold a kernel against its CPU twin: the activation types with the tolerance of a value
//! stored in each, device copies of inputs as a type stores them, NaN-poisoned outputs, and
//! the comparison |gpu - cpu| <= rtol · (|cpu| + mean |cpu|).

use cudarc::driver::CudaSlice;
use half::bf16;
use rcx::backend::cuda::{self, CudaRuntime};

/// Relative tolerances: fp32 results, long fp32 sums (over rows, keys, ...), values stored
/// in bf16.
pub const F32: f64 = 1e-5;
pub const F32_SUM: f64 = 1e-4;
pub const BF16: f64 = 1e-2;

/// |gpu - cpu| <= rtol · (|cpu| + mean |cpu|) elementwise (equal infinities pass).
pub fn assert_close_f64(what: &str, gpu: &[f64], cpu: &[f64], rtol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths differ");
    let mean_abs = cpu.iter().map(|x| x.abs()).sum::<f64>() / cpu.len().max(1) as f64;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let tol = rtol * (c.abs() + mean_abs);
        assert!(
            (g - c).abs() <= tol || g == c,
            "{what}[{i}]: gpu {g} vs cpu {c} (tolerance {tol:e}, {} elements)",
            cpu.len()
        );
    }
}

/// assert_close_f64 of f32 results.
pub fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], rtol: f64) {
    assert_close_f64(what, &wide(gpu), &wide(cpu), rtol);
}

/// An activation type of the kernels, with the tolerance of values stored in it.
pub trait Act: cuda::Activation + Default {
    const RTOL: f64;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Act for f32 {
    const RTOL: f64 = F32;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Act for bf16 {
    const RTOL: f64 = BF16;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        self.to_f32()
    }
}

/// `v` as T stores it, back in f32: the inputs both sides of a T case see.
pub fn rounded<T: Act>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

/// `v` in f64, for the CPU references (computed in f64 on the same rounded inputs).
pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A device copy of `v` stored as T.
pub fn upload_as<T: Act>(rt: &CudaRuntime, v: &[f32]) -> CudaSlice<T> {
    let stored: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    rt.upload(&stored).unwrap()
}

/// `len` NaNs on the device: an output element a kernel forgets stays NaN.
pub fn poisoned<T: Act>(rt: &CudaRuntime, len: usize) -> CudaSlice<T> {
    upload_as(rt, &vec![f32::NAN; len])
}

pub fn download_f32<T: Act>(rt: &CudaRuntime, buf: &CudaSlice<T>) -> Vec<f32> {
    rt.download(buf)
        .unwrap()
        .iter()
        .map(|&x| x.to_f32())
        .collect()
}

/// Compares a device buffer of T with the f64 reference; the tolerance is the larger of
/// T's and `rtol` (a bf16 output is never better than bf16).
pub fn check<T: Act>(rt: &CudaRuntime, what: &str, buf: &CudaSlice<T>, cpu: &[f64], rtol: f64) {
    assert_close_f64(
        &format!("{what} ({})", T::SUFFIX),
        &wide(&download_f32(rt, buf)),
        cpu,
        T::RTOL.max(rtol),
    );
}
