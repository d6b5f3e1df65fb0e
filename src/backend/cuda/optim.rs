//! Gradient clipping and the optimizer step on the device (kernels/optimizer.cu).

use cudarc::driver::{CudaView, PushKernelArg};

use super::ops::launch::{self, NORM_BLOCKS};
use super::ops::{checked_view, checked_view_mut};
use super::runtime::{CudaRuntime, DeviceRead, DeviceWrite};
use crate::error::{Error, Result};

/// AdamW hyper-parameters of one step (PyTorch's torch.optim.AdamW).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Counts from 1.
    pub step: u64,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Multiplies the gradients: the clip factor, 1 when not clipping.
    pub grad_scale: f64,
}

impl AdamWStep {
    /// (beta1, beta2, eps, decay, step_size, bias_correction2_sqrt, grad_scale), the
    /// kernel's f64 arguments, computed as the CPU reference does.
    fn kernel_args(&self) -> Result<[f64; 7]> {
        if self.step == 0 {
            return Err(Error::internal("adamw_update: step counts from 1"));
        }
        let bias_correction1 = 1.0 - self.beta1.powf(self.step as f64);
        let bias_correction2_sqrt = (1.0 - self.beta2.powf(self.step as f64)).sqrt();
        Ok([
            self.beta1,
            self.beta2,
            self.eps,
            1.0 - self.lr * self.weight_decay,
            self.lr / bias_correction1,
            bias_correction2_sqrt,
            self.grad_scale,
        ])
    }
}

impl CudaRuntime {
    /// Sum of squares of every element of every buffer, accumulated in f64 (one small copy
    /// to the host). Deterministic: fixed partition, fixed reduction trees.
    pub fn global_norm_squared(&self, grads: &[CudaView<'_, f32>]) -> Result<f64> {
        let op = "global_norm_squared";
        let count = grads.len() * NORM_BLOCKS;
        if count == 0 {
            return Ok(0.0);
        }
        let mut partials = self.zeros::<f64>(count)?; // [buffers * NORM_BLOCKS]
        let partial = self.kernel(
            op,
            "optimizer",
            "global_norm_squared_partial",
            launch::norm_partial(),
        )?;
        for (i, g) in grads.iter().enumerate() {
            let len = g.len();
            let mut slot = partials.slice_mut(i * NORM_BLOCKS..(i + 1) * NORM_BLOCKS);
            let mut args = partial.args();
            args.arg(&mut slot).arg(g).arg(&len);
            unsafe { partial.launch(args) }?;
        }
        let mut total = self.zeros::<f64>(1)?;
        let finish = self.kernel(
            op,
            "optimizer",
            "global_norm_squared_finish",
            launch::norm_finish(),
        )?;
        let count_i = count as i32;
        let mut args = finish.args();
        args.arg(&mut total).arg(&partials).arg(&count_i);
        unsafe { finish.launch(args) }?;
        Ok(self.download(&total)?[0])
    }

    /// One AdamW step on fp32 master weights params, with moments m, v, all [len].
    pub fn adamw_update(
        &self,
        params: &mut impl DeviceWrite<f32>,
        grads: &impl DeviceRead<f32>,
        m: &mut impl DeviceWrite<f32>,
        v: &mut impl DeviceWrite<f32>,
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw_update";
        let params = &mut params.view_mut();
        let len = params.len();
        let grads = &checked_view(op, "grads", grads, len)?;
        let m = &mut checked_view_mut(op, "m", m, len)?;
        let v = &mut checked_view_mut(op, "v", v, len)?;
        let hyper = hp.kernel_args()?;
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(op, "optimizer", op, launch::elementwise(op, len)?)?;
        let mut args = kernel.args();
        args.arg(params).arg(grads).arg(m).arg(v).arg(&len);
        for h in &hyper {
            args.arg(h);
        }
        unsafe { kernel.launch(args) }
    }

    /// adamw_update that also writes params_bf16 [len], the bf16 copy a bf16 forward reads.
    pub fn adamw_update_bf16_copy(
        &self,
        params: &mut impl DeviceWrite<f32>,
        params_bf16: &mut impl DeviceWrite<half::bf16>,
        grads: &impl DeviceRead<f32>,
        m: &mut impl DeviceWrite<f32>,
        v: &mut impl DeviceWrite<f32>,
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw_update_bf16_copy";
        let params = &mut params.view_mut();
        let len = params.len();
        let params_bf16 = &mut checked_view_mut(op, "params_bf16", params_bf16, len)?;
        let grads = &checked_view(op, "grads", grads, len)?;
        let m = &mut checked_view_mut(op, "m", m, len)?;
        let v = &mut checked_view_mut(op, "v", v, len)?;
        let hyper = hp.kernel_args()?;
        if len == 0 {
            return Ok(());
        }
        let kernel = self.kernel(op, "optimizer", op, launch::elementwise(op, len)?)?;
        let mut args = kernel.args();
        args.arg(params)
            .arg(params_bf16)
            .arg(grads)
            .arg(m)
            .arg(v)
            .arg(&len);
        for h in &hyper {
            args.arg(h);
        }
        unsafe { kernel.launch(args) }
    }
}
