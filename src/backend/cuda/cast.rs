//! Conversions between fp32 and the activation type (kernels/cast.cu), and `ModelFloat`,
//! the activation types the device backend runs in: f32, or bf16 with fp32 master weights.

use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use half::bf16;

use super::matmul::GemmElement;
use super::ops::{checked_view_mut, launch};
use super::runtime::{CudaRuntime, DeviceRead, DeviceWrite, check_len, driver};
use crate::error::Result;

/// An activation type of the device backend. Values cross to fp32 and back in two places
/// (copies between the Acts and Stats arenas, and the parameters' bf16 copy), through these.
pub trait ModelFloat: GemmElement {
    /// out [len] = inp [len] as fp32.
    fn to_f32(
        rt: &CudaRuntime,
        out: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, Self>,
    ) -> Result<()>;

    /// out [len] = inp [len] rounded to this type.
    fn from_f32(
        rt: &CudaRuntime,
        out: &mut CudaViewMut<'_, Self>,
        inp: &CudaView<'_, f32>,
    ) -> Result<()>;
}

impl ModelFloat for f32 {
    fn to_f32(
        rt: &CudaRuntime,
        out: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, f32>,
    ) -> Result<()> {
        copy_f32(rt, out, inp)
    }

    fn from_f32(
        rt: &CudaRuntime,
        out: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, f32>,
    ) -> Result<()> {
        copy_f32(rt, out, inp)
    }
}

impl ModelFloat for bf16 {
    fn to_f32(
        rt: &CudaRuntime,
        out: &mut CudaViewMut<'_, f32>,
        inp: &CudaView<'_, bf16>,
    ) -> Result<()> {
        rt.cast_bf16_to_f32(out, inp)
    }

    fn from_f32(
        rt: &CudaRuntime,
        out: &mut CudaViewMut<'_, bf16>,
        inp: &CudaView<'_, f32>,
    ) -> Result<()> {
        rt.cast_f32_to_bf16(out, inp)
    }
}

/// out = inp, both fp32 [len] (cudarc's copy asserts the lengths: check them first).
fn copy_f32(
    rt: &CudaRuntime,
    out: &mut CudaViewMut<'_, f32>,
    inp: &CudaView<'_, f32>,
) -> Result<()> {
    check_len("copy_f32", "out", out.len(), inp.len())?;
    rt.stream()
        .memcpy_dtod(inp, out)
        .map_err(driver("copy_f32"))
}

impl CudaRuntime {
    /// out [len] = inp [len] rounded to bf16 (nearest, ties to even).
    pub fn cast_f32_to_bf16(
        &self,
        out: &mut impl DeviceWrite<bf16>,
        inp: &impl DeviceRead<f32>,
    ) -> Result<()> {
        let op = "cast_f32_to_bf16";
        let inp = &inp.view();
        let out = &mut checked_view_mut(op, "out", out, inp.len())?;
        self.cast_launch(op, out, inp)
    }

    /// out [len] = inp [len] as fp32 (exact).
    pub fn cast_bf16_to_f32(
        &self,
        out: &mut impl DeviceWrite<f32>,
        inp: &impl DeviceRead<bf16>,
    ) -> Result<()> {
        let op = "cast_bf16_to_f32";
        let inp = &inp.view();
        let out = &mut checked_view_mut(op, "out", out, inp.len())?;
        self.cast_launch(op, out, inp)
    }

    /// The two cast kernels take (out, inp, len); `op` is the kernel's name.
    fn cast_launch<D, S>(
        &self,
        op: &str,
        out: &mut CudaViewMut<'_, D>,
        inp: &CudaView<'_, S>,
    ) -> Result<()> {
        let len = out.len();
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(op, "cast", op, launch::elementwise(op, len)?)?;
        let mut args = kernel.args();
        args.arg(out).arg(inp).arg(&len);
        unsafe { kernel.launch(args) }
    }
}
