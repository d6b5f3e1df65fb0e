//! The linear layer out = inp · Wᵀ + b on cuBLAS (fp32 SGEMM), with its bias kernels.
//! cuBLAS is column-major: a row-major [r, c] matrix is its column-major transpose, so
//! every product below is written for the transposes.

use cudarc::cublas::Gemm;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

use super::ops::{launch, launch_config};
use super::runtime::{
    Activation, CudaRuntime, DeviceRead, DeviceWrite, blocks, check_len, dim, driver,
};
use crate::error::Result;

const THREADS: usize = 256;

impl CudaRuntime {
    /// out[n, oc] = bias[oc] on every row.
    pub fn bias_broadcast_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        bias: &impl DeviceRead<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "bias_broadcast_forward";
        let out = &mut out.view_mut();
        let bias = &bias.view();
        check_len(op, "out", out.len(), n * oc)?;
        check_len(op, "bias", bias.len(), oc)?;
        if out.is_empty() {
            return Ok(());
        }
        let f = self.function("matmul", &format!("bias_broadcast_forward_{}", T::SUFFIX))?;
        let (n_i, oc_i) = (dim(op, "n", n)?, dim(op, "oc", oc)?);
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(out).arg(bias).arg(&n_i).arg(&oc_i);
        let cfg = launch_config(blocks(op, n * oc, THREADS)?, THREADS, 0);
        unsafe { launch.launch(cfg) }.map_err(driver(op))?;
        Ok(())
    }

    /// dbias[oc] += column sums of dout[n, oc] (deterministic, no atomics).
    pub fn bias_backward<T: Activation>(
        &self,
        dbias: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "bias_backward";
        let dbias = &mut dbias.view_mut();
        let dout = &dout.view();
        check_len(op, "dbias", dbias.len(), oc)?;
        check_len(op, "dout", dout.len(), n * oc)?;
        if dout.is_empty() {
            return Ok(());
        }
        let f = self.function("matmul", &format!("bias_backward_{}", T::SUFFIX))?;
        let (n_i, oc_i) = (dim(op, "n", n)?, dim(op, "oc", oc)?);
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(dbias).arg(dout).arg(&n_i).arg(&oc_i);
        let cfg = launch::column_tiles(op, oc)?.config();
        unsafe { launch.launch(cfg) }.map_err(driver(op))?;
        Ok(())
    }

    /// out[n, oc] = inp[n, c] · weight[oc, c]ᵀ + bias[oc] (bias optional).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward(
        &self,
        out: &mut impl DeviceWrite<f32>,
        inp: &impl DeviceRead<f32>,
        weight: &impl DeviceRead<f32>,
        bias: Option<&impl DeviceRead<f32>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_forward";
        let out = &mut out.view_mut();
        let inp = &inp.view();
        let weight = &weight.view();
        let bias_view = bias.map(|b| b.view());
        let bias = bias_view.as_ref();
        check_len(op, "out", out.len(), n * oc)?;
        check_len(op, "inp", inp.len(), n * c)?;
        check_len(op, "weight", weight.len(), oc * c)?;
        if out.is_empty() {
            return Ok(());
        }
        let beta = match bias {
            Some(bias) => {
                self.bias_broadcast_forward(out, bias, n, oc)?;
                1.0
            }
            None => 0.0,
        };
        // Column-major: outᵀ [oc, n] = (weightᵀ)ᵀ [oc, c] · inpᵀ [c, n].
        self.sgemm(
            op,
            (CUBLAS_OP_T, CUBLAS_OP_N),
            (oc, n, c),
            weight,
            c,
            inp,
            c,
            beta,
            out,
            oc,
        )
    }

    /// dinp[n, c] += dout · weight; dweight[oc, c] += doutᵀ · inp; dbias[oc] += column sums
    /// of dout (when given).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward(
        &self,
        dinp: &mut impl DeviceWrite<f32>,
        dweight: &mut impl DeviceWrite<f32>,
        dbias: Option<&mut impl DeviceWrite<f32>>,
        dout: &impl DeviceRead<f32>,
        inp: &impl DeviceRead<f32>,
        weight: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward";
        let dinp = &mut dinp.view_mut();
        let dweight = &mut dweight.view_mut();
        let dout = &dout.view();
        let inp = &inp.view();
        let weight = &weight.view();
        let mut dbias_view = dbias.map(|d| d.view_mut());
        let dbias = dbias_view.as_mut();
        check_len(op, "dinp", dinp.len(), n * c)?;
        check_len(op, "dweight", dweight.len(), oc * c)?;
        check_len(op, "dout", dout.len(), n * oc)?;
        check_len(op, "inp", inp.len(), n * c)?;
        check_len(op, "weight", weight.len(), oc * c)?;
        if n * c * oc == 0 {
            return Ok(());
        }
        // dinpᵀ [c, n] += weightᵀ [c, oc] · doutᵀ [oc, n]
        self.sgemm(
            op,
            (CUBLAS_OP_N, CUBLAS_OP_N),
            (c, n, oc),
            weight,
            c,
            dout,
            oc,
            1.0,
            dinp,
            c,
        )?;
        // dweightᵀ [c, oc] += inpᵀ [c, n] · dout [n, oc]
        self.sgemm(
            op,
            (CUBLAS_OP_N, CUBLAS_OP_T),
            (c, oc, n),
            inp,
            c,
            dout,
            oc,
            1.0,
            dweight,
            c,
        )?;
        if let Some(dbias) = dbias {
            self.bias_backward(dbias, dout, n, oc)?;
        }
        Ok(())
    }

    /// Column-major C [m, n] = op(A) · op(B) + beta · C with op(A) [m, k], op(B) [k, n].
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        op: &str,
        (transa, transb): (cublasOperation_t, cublasOperation_t),
        (m, n, k): (usize, usize, usize),
        a: &CudaView<'_, f32>,
        lda: usize,
        b: &CudaView<'_, f32>,
        ldb: usize,
        beta: f32,
        c: &mut CudaViewMut<'_, f32>,
        ldc: usize,
    ) -> Result<()> {
        let cfg = GemmConfig {
            transa,
            transb,
            m: dim(op, "m", m)?,
            n: dim(op, "n", n)?,
            k: dim(op, "k", k)?,
            alpha: 1.0f32,
            lda: dim(op, "lda", lda)?,
            ldb: dim(op, "ldb", ldb)?,
            beta,
            ldc: dim(op, "ldc", ldc)?,
        };
        let blas = self.blas()?;
        // SAFETY: the callers checked every buffer against the shapes, which bound all the
        // elements the GEMM touches given these leading dimensions.
        unsafe { blas.gemm(cfg, a, b, c) }.map_err(driver(&format!("{op}: cuBLAS SGEMM")))
    }
}
