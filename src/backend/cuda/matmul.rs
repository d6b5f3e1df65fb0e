//! The linear layer out = inp · Wᵀ + b on cuBLAS, with its bias kernels. Activations and
//! the weights the product reads are `T` (f32, or bf16: the bf16 copy of the fp32 master
//! weights); every product accumulates in fp32 (cublasGemmEx, CUBLAS_COMPUTE_32F), and the
//! weight gradient is accumulated into an fp32 buffer whatever T is.
//! cuBLAS is column-major: a row-major [r, c] matrix is its column-major transpose, so
//! every product below is written for the transposes.

use std::ffi::c_void;

use cudarc::cublas::result::gemm_ex;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, PushKernelArg};

use super::ops::{checked_view, checked_view_mut, launch, typed};
use super::runtime::{Activation, CudaRuntime, DeviceRead, DeviceWrite, dim, driver};
use crate::error::{Error, Result};

/// An element type cuBLAS multiplies: its `cudaDataType` for cublasGemmEx.
pub trait GemmElement: Activation {
    const CUBLAS_TYPE: cudaDataType_t;
}

impl GemmElement for f32 {
    const CUBLAS_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
}

impl GemmElement for half::bf16 {
    const CUBLAS_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
}

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
        let out = &mut checked_view_mut(op, "out", out, n * oc)?;
        let bias = &checked_view(op, "bias", bias, oc)?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = launch::elementwise(op, n * oc)?;
        let kernel = self.kernel(op, "matmul", &typed::<T>(op), shape)?;
        let (n_i, oc_i) = (dim(op, "n", n)?, dim(op, "oc", oc)?);
        let mut args = kernel.args();
        args.arg(out).arg(bias).arg(&n_i).arg(&oc_i);
        unsafe { kernel.launch(args) }
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
        let dbias = &mut checked_view_mut(op, "dbias", dbias, oc)?;
        let dout = &checked_view(op, "dout", dout, n * oc)?;
        if dout.is_empty() {
            return Ok(());
        }
        let shape = launch::column_tiles(op, oc)?;
        let kernel = self.kernel(op, "matmul", &typed::<T>(op), shape)?;
        let (n_i, oc_i) = (dim(op, "n", n)?, dim(op, "oc", oc)?);
        let mut args = kernel.args();
        args.arg(dbias).arg(dout).arg(&n_i).arg(&oc_i);
        unsafe { kernel.launch(args) }
    }

    /// out[n, oc] = inp[n, c] · weight[oc, c]ᵀ + bias[oc] (bias optional, fp32), in fp32
    /// arithmetic, rounded to T once at the end.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_forward<T: GemmElement>(
        &self,
        out: &mut impl DeviceWrite<T>,
        inp: &impl DeviceRead<T>,
        weight: &impl DeviceRead<T>,
        bias: Option<&impl DeviceRead<f32>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_forward";
        let out = &mut checked_view_mut(op, "out", out, n * oc)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let weight = &checked_view(op, "weight", weight, oc * c)?;
        let bias_view = bias.map(|b| b.view());
        let bias = bias_view.as_ref();
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
        self.gemm(
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
    /// of dout (when given). The weight and bias gradients are fp32 whatever T is: with
    /// bf16 activations the product over the n rows still accumulates, and lands, in fp32.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_backward<T: GemmElement>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dweight: &mut impl DeviceWrite<f32>,
        dbias: Option<&mut impl DeviceWrite<f32>>,
        dout: &impl DeviceRead<T>,
        inp: &impl DeviceRead<T>,
        weight: &impl DeviceRead<T>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward";
        let dinp = &mut checked_view_mut(op, "dinp", dinp, n * c)?;
        let dweight = &mut checked_view_mut(op, "dweight", dweight, oc * c)?;
        let dout = &checked_view(op, "dout", dout, n * oc)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let weight = &checked_view(op, "weight", weight, oc * c)?;
        let mut dbias_view = dbias.map(|d| d.view_mut());
        let dbias = dbias_view.as_mut();
        if n * c * oc == 0 {
            return Ok(());
        }
        // dinpᵀ [c, n] += weightᵀ [c, oc] · doutᵀ [oc, n]
        self.gemm(
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
        self.gemm(
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

    /// Column-major C [m, n] = op(A) · op(B) + beta · C with op(A) [m, k], op(B) [k, n]:
    /// cublasGemmEx with A and B of type AB, C of type CE, fp32 compute (CUBLAS_COMPUTE_32F:
    /// plain fp32 FMA for fp32 inputs, as SGEMM, never TF32; bf16 products on the tensor
    /// cores with fp32 accumulation). Every operand is checked to hold the elements the
    /// shapes and leading dimensions reach before cuBLAS sees a pointer.
    #[allow(clippy::too_many_arguments)]
    fn gemm<AB: GemmElement, CE: GemmElement>(
        &self,
        op: &str,
        (transa, transb): (cublasOperation_t, cublasOperation_t),
        (m, n, k): (usize, usize, usize),
        a: &CudaView<'_, AB>,
        lda: usize,
        b: &CudaView<'_, AB>,
        ldb: usize,
        beta: f32,
        c: &mut CudaViewMut<'_, CE>,
        ldc: usize,
    ) -> Result<()> {
        check_operand(op, "A", a.len(), transa, (m, k), lda)?;
        check_operand(op, "B", b.len(), transb, (k, n), ldb)?;
        check_operand(op, "C", c.len(), CUBLAS_OP_N, (m, n), ldc)?;
        let (m_i, n_i, k_i) = (dim(op, "m", m)?, dim(op, "n", n)?, dim(op, "k", k)?);
        let (lda_i, ldb_i, ldc_i) = (
            dim(op, "lda", lda)?,
            dim(op, "ldb", ldb)?,
            dim(op, "ldc", ldc)?,
        );
        // With CUBLAS_COMPUTE_32F the scalars are fp32, read from the host (the handle's
        // default pointer mode).
        let alpha = 1.0f32;
        let blas = self.blas()?;
        let stream = self.stream();
        let (a_ptr, _a_read) = a.device_ptr(stream);
        let (b_ptr, _b_read) = b.device_ptr(stream);
        let (c_ptr, _c_write) = c.device_ptr_mut(stream);
        // SAFETY: the handle runs on this runtime's stream (runtime.rs `blas`); A, B and C
        // hold every element the GEMM touches (checked above), their types are the declared
        // AB and CE, and alpha, beta outlive the call, which only enqueues the work.
        unsafe {
            gemm_ex(
                *blas.handle(),
                transa,
                transb,
                m_i,
                n_i,
                k_i,
                (&alpha as *const f32).cast::<c_void>(),
                a_ptr as *const c_void,
                AB::CUBLAS_TYPE,
                lda_i,
                b_ptr as *const c_void,
                AB::CUBLAS_TYPE,
                ldb_i,
                (&beta as *const f32).cast::<c_void>(),
                c_ptr as *mut c_void,
                CE::CUBLAS_TYPE,
                ldc_i,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(driver(&format!("{op}: cuBLAS GemmEx")))
    }
}

/// Checks that a column-major operand of cublasGemmEx, op(X) [rows, cols] stored with
/// leading dimension `ld`, fits its buffer of `len` elements: stored untransposed it is
/// [rows, cols], transposed [cols, rows]; ld covers a stored column and the last stored
/// column ends inside the buffer.
fn check_operand(
    op: &str,
    name: &str,
    len: usize,
    trans: cublasOperation_t,
    (rows, cols): (usize, usize),
    ld: usize,
) -> Result<()> {
    let (stored_rows, stored_cols) = match trans {
        CUBLAS_OP_N => (rows, cols),
        _ => (cols, rows),
    };
    if ld < stored_rows.max(1) {
        return Err(Error::internal(format!(
            "{op}: {name}'s leading dimension {ld} is under its {stored_rows} stored rows"
        )));
    }
    let reach = match stored_cols {
        0 => 0,
        _ => ld * (stored_cols - 1) + stored_rows,
    };
    if reach > len {
        return Err(Error::internal(format!(
            "{op}: {name} has {len} elements, the GEMM reaches {reach}"
        )));
    }
    Ok(())
}
