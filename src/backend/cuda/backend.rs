//! `Cuda`: the `Backend` on one GPU, over the kernels of kernels/*.cu.
//!
//! Two activation types (`DType`): f32 throughout, or bf16 activations and GEMM inputs with
//! fp32 accumulation everywhere (cuBLAS compute 32F, fp32 arithmetic in the kernels), fp32
//! master weights, gradients and AdamW moments, and a bf16 copy of the weights that GEMMs on
//! bf16 activations read, rounded from the master at upload and refreshed by the fused
//! AdamW. The Stats arena is fp32 whatever the type.
//!
//! Every arena is one device allocation: parameters, gradients and the two moments in the
//! model's parameter layout (so a checkpoint goes up or comes down in one copy whatever the
//! type, and a run moves between CPU and GPU, f32 and bf16), the activations in the
//! activation type, the stats in fp32. An op turns its `Buf`s into cudarc views of those
//! allocations (checked disjoint where written) and launches its kernels.
//!
//! Two ops fuse what the CPU runs as two: `matmul_gelu` adds the bias inside the GELU kernel
//! (so its `pre` holds the product without the bias), and `residual_layernorm_forward` adds
//! the residual inside the LayerNorm kernel.
//!
//! STATUS: compiled and run on the emulated device (BERT, the Llama family with the shared
//! prefix, DeBERTa); never run on a GPU (none has been lent yet); tests/cuda_model.rs checks
//! it against the CPU backend on the first GPU run.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaViewMut};
use half::bf16;

use super::buckets::GradSync;
use super::cast::ModelFloat;
use super::deberta_ops::{DevicePositionGrads, DevicePositionTerms};
use super::decoder_ops::{CausalPrefix, CausalPrefixGrads};
use super::loss::RankingBatch;
use super::ops::{FlashKernels, TokenBatch};
use super::optim::AdamWStep;
use super::runtime::{Activation, CudaRuntime, driver};
use super::zero::OptimizerShard;
use crate::backend::DType;
use crate::backend::arena::{Loans, check_bounds};
use crate::backend::{
    Arena, AttentionDims, AttentionDropout, Backend, Batch, Buf, CausalDims, OptimStep,
    PositionBufs, SharedPrefix,
};
use crate::error::{Error, Result};
use crate::loss::{LossExtras, LossSpec, PromptType};

/// A batch's tokens on the device: ids with the embedding backward's row lists, and the
/// padding mask.
pub struct CudaTokens {
    tokens: TokenBatch,
    mask: CudaSlice<u8>,         // [B, T]
    of_sequence: CudaSlice<u32>, // [B] the prompt of each sequence (Batch::of_sequence)
}

/// The activation type and the buffers of that type.
enum Precision {
    F32 {
        acts: CudaSlice<f32>, // the Acts arena
    },
    Bf16 {
        /// [parameters] the master weights rounded to bf16, in the parameter layout (so
        /// one AdamW launch per run refreshes it). GEMMs on bf16 activations read it; the
        /// rest (tables, biases, LayerNorm, the fp32 head) read the master, so those parts
        /// of the copy are written and never read: a few percent of a model, kept for the
        /// single layout.
        weights: CudaSlice<bf16>,
        acts: CudaSlice<bf16>, // the Acts arena
    },
}

/// The backend on one GPU.
pub struct Cuda {
    pub(super) rt: Arc<CudaRuntime>,
    pub(super) params: CudaSlice<f32>, // [parameters] fp32 master weights
    pub(super) grads: CudaSlice<f32>,  // [parameters] once training
    pub(super) m: CudaSlice<f32>,      // [moments] AdamW first moment, once training
    pub(super) v: CudaSlice<f32>,      // [moments] AdamW second moment, once training
    stats: CudaSlice<f32>,             // the Stats arena
    precision: Precision,
    /// ZeRO-1: this rank's part of the optimizer state (None: all of it). Its ranges of the
    /// parameter arena, one after another, are the [moments] of m and v.
    pub(super) optimizer_shard: Option<OptimizerShard>,
    /// Data parallelism: the gradient buckets summed while the backward runs.
    pub(super) grad_sync: Option<GradSync>,
}

impl Cuda {
    /// Uploads `params` in one copy (and rounds them to the bf16 copy for `DType::Bf16`).
    pub fn new(rt: Arc<CudaRuntime>, params: &[f32], dtype: DType) -> Result<Cuda> {
        let params = rt.upload(params)?;
        let precision = match dtype {
            DType::F32 => Precision::F32 { acts: rt.zeros(1)? },
            DType::Bf16 => {
                let mut weights = rt.zeros::<bf16>(params.len())?;
                rt.cast_f32_to_bf16(&mut weights, &params)?;
                Precision::Bf16 {
                    weights,
                    acts: rt.zeros(1)?,
                }
            }
        };
        Ok(Cuda {
            grads: rt.zeros(1)?,
            m: rt.zeros(1)?,
            v: rt.zeros(1)?,
            stats: rt.zeros(1)?,
            params,
            precision,
            rt,
            optimizer_shard: None,
            grad_sync: None,
        })
    }

    pub fn runtime(&self) -> &Arc<CudaRuntime> {
        &self.rt
    }

    /// The activation type.
    pub fn dtype(&self) -> DType {
        match self.precision {
            Precision::F32 { .. } => DType::F32,
            Precision::Bf16 { .. } => DType::Bf16,
        }
    }

    /// The parameters as GEMMs on activations read them, as f32: the master weights for
    /// f32, their bf16 copy widened for bf16.
    pub fn download_gemm_weights(&self) -> Result<Vec<f32>> {
        match &self.precision {
            Precision::F32 { .. } => self.rt.download(&self.params),
            Precision::Bf16 { weights, .. } => Ok(self
                .rt
                .download(weights)?
                .into_iter()
                .map(f32::from)
                .collect()),
        }
    }

    fn check_arena(&self, what: &str, len: usize) -> Result<()> {
        if len == self.params.len() {
            Ok(())
        } else {
            Err(Error::internal(format!(
                "CUDA backend: {len} {what} for a parameter arena of {}",
                self.params.len()
            )))
        }
    }

    /// Rounds the master weights into the bf16 copy (bf16 only).
    pub(super) fn refresh_bf16_weights(&mut self) -> Result<()> {
        match &mut self.precision {
            Precision::Bf16 { weights, .. } => self.rt.cast_f32_to_bf16(weights, &self.params),
            Precision::F32 { .. } => Ok(()),
        }
    }

    /// The parameter ranges whose AdamW moments this backend holds, in their order in m
    /// and v.
    pub(super) fn moment_ranges(&self) -> Vec<Range<usize>> {
        match &self.optimizer_shard {
            Some(shard) => shard.owned(self.params.len()).to_vec(),
            None => std::iter::once(0..self.params.len()).collect(),
        }
    }

    pub(super) fn training(&self) -> Result<()> {
        if self.grads.len() == self.params.len() {
            Ok(())
        } else {
            Err(Error::internal(
                "CUDA backend: training ops before start_training",
            ))
        }
    }
}

/// A view of the same memory as `view` for as long as the arena is borrowed.
///
/// # Safety
/// The caller guarantees that no other live view overlaps the result for 'a where either
/// is written (`Loans`).
unsafe fn extend_view<'a, T>(view: CudaViewMut<'_, T>) -> CudaViewMut<'a, T> {
    let view = std::mem::ManuallyDrop::new(view);
    let source: *const CudaViewMut<'_, T> = &*view;
    // SAFETY: the two types differ only in a lifetime, so they have the same layout; the
    // view holds only a device address, a length and shared references into the arena's
    // CudaSlice, which stays borrowed for 'a.
    unsafe { std::ptr::read(source.cast::<CudaViewMut<'a, T>>()) }
}

/// Parts of the arenas lent for one op, as views; a written part overlaps no other part.
struct Lend<'a, T> {
    params: CudaViewMut<'a, f32>,
    grads: CudaViewMut<'a, f32>,
    stats: CudaViewMut<'a, f32>,
    acts: CudaViewMut<'a, T>,
    /// The weights GEMMs on T activations read: the master itself for f32 (read only),
    /// its bf16 copy for bf16.
    weights: CudaViewMut<'a, T>,
    loans: Loans,
}

/// `buf`'s part of `whole`, for 'a.
///
/// # Safety
/// As `extend_view`: the part is lent through `Loans`.
unsafe fn part<'a, E>(whole: &CudaViewMut<'a, E>, buf: Buf) -> Result<CudaViewMut<'a, E>> {
    check_bounds(buf, whole.len())?;
    // SAFETY: a bitwise copy of a view is another handle on the same memory (views own
    // nothing and have no destructor); the part taken from it is extended to 'a.
    let mut copy = unsafe { std::ptr::read(whole) };
    Ok(unsafe { extend_view(copy.slice_mut(buf.range())) })
}

impl<'a, T> Lend<'a, T> {
    /// An fp32 buffer: of the parameters, the gradients or the stats.
    fn f(&mut self, buf: Buf, write: bool) -> Result<CudaViewMut<'a, f32>> {
        self.loans.lend(buf, write)?;
        let whole = match buf.arena {
            Arena::Params => &self.params,
            Arena::Grads => &self.grads,
            Arena::Stats => &self.stats,
            Arena::Acts => {
                return Err(Error::internal(format!(
                    "CUDA backend: {buf:?} is in the activation type where fp32 is needed"
                )));
            }
        };
        // SAFETY: lent through `loans` just above.
        unsafe { part(whole, buf) }
    }

    /// An activation buffer, in T.
    fn t(&mut self, buf: Buf, write: bool) -> Result<CudaViewMut<'a, T>> {
        if buf.arena != Arena::Acts {
            return Err(Error::internal(format!(
                "CUDA backend: {buf:?} is fp32 where the activation type is needed"
            )));
        }
        self.loans.lend(buf, write)?;
        // SAFETY: lent through `loans` just above.
        unsafe { part(&self.acts, buf) }
    }

    /// A weight matrix of the parameter arena as GEMMs on T activations read it.
    fn w(&mut self, buf: Buf) -> Result<CudaViewMut<'a, T>> {
        if buf.arena != Arena::Params {
            return Err(Error::internal(format!(
                "CUDA backend: {buf:?} is not a parameter"
            )));
        }
        self.loans.lend(buf, false)?;
        // SAFETY: lent (as a read of the parameters) through `loans` just above; nothing
        // writes the parameters during an op.
        unsafe { part(&self.weights, buf) }
    }
}

/// Runs `$body` with `$l: Lend<T>` for the backend's activation type T, and `$rt`.
macro_rules! lend {
    ($self:ident, |$rt:ident, $l:ident| $body:expr) => {{
        let $rt: &CudaRuntime = &$self.rt;
        let params = $self.params.as_view_mut();
        let grads = $self.grads.as_view_mut();
        let stats = $self.stats.as_view_mut();
        match &mut $self.precision {
            Precision::F32 { acts } => {
                // SAFETY: a second handle on the parameters, only ever read (`Lend::w`).
                let weights = unsafe { std::ptr::read(&params) };
                #[allow(unused_mut)]
                let mut $l = Lend {
                    params,
                    grads,
                    stats,
                    acts: acts.as_view_mut(),
                    weights,
                    loans: Loans::default(),
                };
                $body
            }
            Precision::Bf16 { weights, acts } => {
                #[allow(unused_mut)]
                let mut $l = Lend {
                    params,
                    grads,
                    stats,
                    acts: acts.as_view_mut(),
                    weights: weights.as_view_mut(),
                    loans: Loans::default(),
                };
                $body
            }
        }
    }};
}

/// Replaces `arena` with a zeroed one of `len` elements when it is smaller.
fn grow<E: Activation>(rt: &CudaRuntime, arena: &mut CudaSlice<E>, len: usize) -> Result<()> {
    if arena.len() < len {
        // Free the old arena first: the new one may need most of the device.
        *arena = rt.zeros(1)?;
        *arena = rt.zeros(len)?;
    }
    Ok(())
}

fn zero_view<E: Activation>(rt: &CudaRuntime, view: &mut CudaViewMut<'_, E>) -> Result<()> {
    rt.stream()
        .memset_zeros(view)
        .map_err(driver("zero a buffer"))
}

fn is_acts(buf: Buf) -> bool {
    buf.arena == Arena::Acts
}

impl Backend for Cuda {
    type Tokens = CudaTokens;
    type Scalar = f32;
    const HOST_RESIDENT: bool = false;

    fn describe(&self) -> String {
        let device = self.rt.device_name();
        let dtype = match self.dtype() {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        };
        format!(
            "cuda ({}, {dtype})",
            device.unwrap_or_else(|e| e.to_string())
        )
    }

    fn reserve(&mut self, acts: usize, stats: usize) -> Result<()> {
        let bytes = match self.precision {
            Precision::F32 { .. } => 4 * acts + 4 * stats,
            Precision::Bf16 { .. } => 2 * acts + 4 * stats,
        };
        let need = |e: Error| {
            Error::internal(format!(
                "{e} (the activations need {:.2} GiB)",
                bytes as f64 / (1u64 << 30) as f64
            ))
        };
        let rt = &self.rt;
        match &mut self.precision {
            Precision::F32 { acts: arena } => grow(rt, arena, acts).map_err(need)?,
            Precision::Bf16 { acts: arena, .. } => grow(rt, arena, acts).map_err(need)?,
        }
        grow(rt, &mut self.stats, stats).map_err(need)
    }

    fn tokens(&mut self, batch: &Batch, tables: (usize, usize, usize)) -> Result<CudaTokens> {
        let (b, t) = (batch.b, batch.t);
        Ok(CudaTokens {
            tokens: TokenBatch::new(
                &self.rt,
                &batch.input_ids,
                &batch.token_type_ids,
                b,
                t,
                tables,
            )?,
            mask: self.rt.upload(&batch.mask)?,
            of_sequence: self.rt.upload(&batch.of_sequence())?,
        })
    }

    fn zero(&mut self, buf: Buf) -> Result<()> {
        lend!(self, |rt, l| match is_acts(buf) {
            true => zero_view(rt, &mut l.t(buf, true)?),
            false => zero_view(rt, &mut l.f(buf, true)?),
        })
    }

    fn copy(&mut self, dst: Buf, src: Buf) -> Result<()> {
        if dst.len != src.len {
            return Err(Error::internal(format!(
                "copy: {} elements into {}",
                src.len, dst.len
            )));
        }
        let copied = driver("copy a buffer");
        lend!(self, |rt, l| match (is_acts(dst), is_acts(src)) {
            (true, true) => {
                let (mut d, s) = (l.t(dst, true)?, l.t(src, false)?);
                rt.stream().memcpy_dtod(&s, &mut d).map_err(copied)
            }
            (false, false) => {
                let (mut d, s) = (l.f(dst, true)?, l.f(src, false)?);
                rt.stream().memcpy_dtod(&s, &mut d).map_err(copied)
            }
            (false, true) => {
                let (mut d, s) = (l.f(dst, true)?, l.t(src, false)?);
                ModelFloat::to_f32(rt, &mut d, &s.as_view())
            }
            (true, false) => {
                let (mut d, s) = (l.t(dst, true)?, l.f(src, false)?);
                ModelFloat::from_f32(rt, &mut d, &s.as_view())
            }
        })
    }

    fn read_stats(&self, buf: Buf) -> Result<Vec<f32>> {
        if buf.arena == Arena::Acts {
            return self.read_acts(buf);
        }
        let arena = match buf.arena {
            Arena::Params => &self.params,
            Arena::Grads => &self.grads,
            _ => &self.stats,
        };
        check_bounds(buf, arena.len())?;
        self.rt
            .stream()
            .clone_dtoh(&arena.slice(buf.range()))
            .map_err(driver("copy a buffer to the host"))
    }

    fn read_acts(&self, buf: Buf) -> Result<Vec<f32>> {
        if buf.arena != Arena::Acts {
            return self.read_stats(buf);
        }
        let to_host = driver("copy activations to the host");
        match &self.precision {
            Precision::F32 { acts } => {
                check_bounds(buf, acts.len())?;
                self.rt
                    .stream()
                    .clone_dtoh(&acts.slice(buf.range()))
                    .map_err(to_host)
            }
            Precision::Bf16 { acts, .. } => {
                check_bounds(buf, acts.len())?;
                let values = self
                    .rt
                    .stream()
                    .clone_dtoh(&acts.slice(buf.range()))
                    .map_err(to_host)?;
                Ok(values.into_iter().map(f32::from).collect())
            }
        }
    }

    fn write_stats(&mut self, buf: Buf, values: &[f32]) -> Result<()> {
        if buf.arena != Arena::Stats || buf.len != values.len() {
            return Err(Error::internal(format!(
                "write_stats: {} values into {buf:?}",
                values.len()
            )));
        }
        check_bounds(buf, self.stats.len())?;
        self.rt
            .stream()
            .memcpy_htod(values, &mut self.stats.slice_mut(buf.range()))
            .map_err(driver("copy values to the device"))
    }

    fn embedding_forward(
        &mut self,
        out: Buf,
        tokens: &CudaTokens,
        wte: Buf,
        wpe: Buf,
        wtt: Buf,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.embedding_forward(
            &mut l.t(out, true)?,
            &tokens.tokens,
            &l.f(wte, false)?,
            &l.f(wpe, false)?,
            &l.f(wtt, false)?,
            c
        ))
    }

    fn embedding_backward(
        &mut self,
        dwte: Buf,
        dwpe: Buf,
        dwtt: Buf,
        dout: Buf,
        tokens: &CudaTokens,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.embedding_backward(
            &mut l.f(dwte, true)?,
            &mut l.f(dwpe, true)?,
            &mut l.f(dwtt, true)?,
            &l.t(dout, false)?,
            &tokens.tokens,
            c
        ))
    }

    fn layernorm_forward(
        &mut self,
        out: Buf,
        mean: Buf,
        rstd: Buf,
        x: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        if is_acts(out) && !is_acts(x) {
            // An fp32 table normed into activations (DeBERTa's relative embeddings).
            return lend!(self, |rt, l| {
                let mut out32 = rt.zeros::<f32>(out.len)?;
                rt.layernorm_forward(
                    &mut out32,
                    &mut l.f(mean, true)?,
                    &mut l.f(rstd, true)?,
                    &l.f(x, false)?,
                    &l.f(weight, false)?,
                    &l.f(bias, false)?,
                    n,
                    c,
                    eps,
                )?;
                store_rounded(rt, &mut l, out, &out32)
            });
        }
        lend!(self, |rt, l| rt.layernorm_forward(
            &mut l.t(out, true)?,
            &mut l.f(mean, true)?,
            &mut l.f(rstd, true)?,
            &l.t(x, false)?,
            &l.f(weight, false)?,
            &l.f(bias, false)?,
            n,
            c,
            eps
        ))
    }

    fn residual_layernorm_forward(
        &mut self,
        out: Buf,
        sum: Buf,
        mean: Buf,
        rstd: Buf,
        a: Buf,
        b: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.residual_layernorm_forward(
            &mut l.t(out, true)?,
            &mut l.t(sum, true)?,
            &mut l.f(mean, true)?,
            &mut l.f(rstd, true)?,
            &l.t(a, false)?,
            &l.t(b, false)?,
            &l.f(weight, false)?,
            &l.f(bias, false)?,
            n,
            c,
            eps
        ))
    }

    fn layernorm_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dbias: Buf,
        dout: Buf,
        x: Buf,
        weight: Buf,
        mean: Buf,
        rstd: Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        if !is_acts(dx) && is_acts(dout) {
            // Into an fp32 table's gradient from activation gradients (DeBERTa's relative
            // embeddings): in fp32 throughout.
            return lend!(self, |rt, l| {
                let dout32 = widened(rt, &mut l, dout)?;
                rt.layernorm_backward(
                    &mut l.f(dx, true)?,
                    &mut l.f(dweight, true)?,
                    &mut l.f(dbias, true)?,
                    &dout32,
                    &l.f(x, false)?,
                    &l.f(weight, false)?,
                    &l.f(mean, false)?,
                    &l.f(rstd, false)?,
                    n,
                    c,
                )
            });
        }
        lend!(self, |rt, l| rt.layernorm_backward(
            &mut l.t(dx, true)?,
            &mut l.f(dweight, true)?,
            &mut l.f(dbias, true)?,
            &l.t(dout, false)?,
            &l.t(x, false)?,
            &l.f(weight, false)?,
            &l.f(mean, false)?,
            &l.f(rstd, false)?,
            n,
            c
        ))
    }

    /// On activations, in the activation type with the GEMM weights; on fp32 buffers (the
    /// head), in fp32 with the master weights.
    fn matmul_forward(
        &mut self,
        out: Buf,
        x: Buf,
        weight: Buf,
        bias: Option<Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| {
            let bias = bias.map(|b| l.f(b, false)).transpose()?;
            match is_acts(x) {
                true => rt.matmul_forward(
                    &mut l.t(out, true)?,
                    &l.t(x, false)?,
                    &l.w(weight)?,
                    bias.as_ref(),
                    n,
                    c,
                    oc,
                ),
                false => rt.matmul_forward(
                    &mut l.f(out, true)?,
                    &l.f(x, false)?,
                    &l.f(weight, false)?,
                    bias.as_ref(),
                    n,
                    c,
                    oc,
                ),
            }
        })
    }

    fn matmul_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dbias: Option<Buf>,
        dout: Buf,
        x: Buf,
        weight: Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| {
            let mut dweight = l.f(dweight, true)?;
            let mut dbias = dbias.map(|b| l.f(b, true)).transpose()?;
            match is_acts(x) {
                true => rt.matmul_backward(
                    &mut l.t(dx, true)?,
                    &mut dweight,
                    dbias.as_mut(),
                    &l.t(dout, false)?,
                    &l.t(x, false)?,
                    &l.w(weight)?,
                    n,
                    c,
                    oc,
                ),
                false => rt.matmul_backward(
                    &mut l.f(dx, true)?,
                    &mut dweight,
                    dbias.as_mut(),
                    &l.f(dout, false)?,
                    &l.f(x, false)?,
                    &l.f(weight, false)?,
                    n,
                    c,
                    oc,
                ),
            }
        })
    }

    fn matmul_gelu_forward(
        &mut self,
        out: Buf,
        pre: Buf,
        x: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        if !is_acts(x) {
            // On fp32 buffers (DeBERTa's pooler, in the Stats arena): in fp32 with the master
            // weights, as matmul_forward.
            return lend!(self, |rt, l| {
                let mut pre = l.f(pre, true)?;
                rt.matmul_forward(
                    &mut pre,
                    &l.f(x, false)?,
                    &l.f(weight, false)?,
                    None::<&CudaViewMut<'_, f32>>,
                    n,
                    c,
                    oc,
                )?;
                rt.bias_gelu_forward(&mut l.f(out, true)?, &pre, &l.f(bias, false)?, n, oc)
            });
        }
        lend!(self, |rt, l| {
            let mut pre = l.t(pre, true)?;
            let bias = l.f(bias, false)?;
            rt.matmul_forward(
                &mut pre,
                &l.t(x, false)?,
                &l.w(weight)?,
                None::<&CudaViewMut<'_, f32>>,
                n,
                c,
                oc,
            )?;
            rt.bias_gelu_forward(&mut l.t(out, true)?, &pre, &bias, n, oc)
        })
    }

    fn matmul_gelu_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dbias: Buf,
        dpre: Buf,
        dout: Buf,
        pre: Buf,
        x: Buf,
        weight: Buf,
        bias: Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        if !is_acts(x) {
            // On fp32 buffers (DeBERTa's pooler): in fp32 with the master weights.
            return lend!(self, |rt, l| {
                let mut dpre = l.f(dpre, true)?;
                zero_view(rt, &mut dpre)?;
                rt.bias_gelu_backward(
                    &mut dpre,
                    &mut l.f(dbias, true)?,
                    &l.f(dout, false)?,
                    &l.f(pre, false)?,
                    &l.f(bias, false)?,
                    n,
                    oc,
                )?;
                rt.matmul_backward(
                    &mut l.f(dx, true)?,
                    &mut l.f(dweight, true)?,
                    None::<&mut CudaViewMut<'_, f32>>,
                    &dpre,
                    &l.f(x, false)?,
                    &l.f(weight, false)?,
                    n,
                    c,
                    oc,
                )
            });
        }
        lend!(self, |rt, l| {
            let mut dpre = l.t(dpre, true)?;
            zero_view(rt, &mut dpre)?;
            // The GELU kernel owns the bias, so its gradient comes from there.
            rt.bias_gelu_backward(
                &mut dpre,
                &mut l.f(dbias, true)?,
                &l.t(dout, false)?,
                &l.t(pre, false)?,
                &l.f(bias, false)?,
                n,
                oc,
            )?;
            rt.matmul_backward(
                &mut l.t(dx, true)?,
                &mut l.f(dweight, true)?,
                None::<&mut CudaViewMut<'_, f32>>,
                &dpre,
                &l.t(x, false)?,
                &l.w(weight)?,
                n,
                c,
                oc,
            )
        })
    }

    fn tanh_forward(&mut self, out: Buf, x: Buf) -> Result<()> {
        lend!(self, |rt, l| match is_acts(x) {
            true => rt.tanh_forward(&mut l.t(out, true)?, &l.t(x, false)?),
            false => rt.tanh_forward(&mut l.f(out, true)?, &l.f(x, false)?),
        })
    }

    fn tanh_backward(&mut self, dx: Buf, out: Buf, dout: Buf) -> Result<()> {
        lend!(self, |rt, l| match is_acts(out) {
            true => rt.tanh_backward(&mut l.t(dx, true)?, &l.t(out, false)?, &l.t(dout, false)?),
            false => rt.tanh_backward(&mut l.f(dx, true)?, &l.f(out, false)?, &l.f(dout, false)?),
        })
    }

    fn dropout_forward(&mut self, out: Buf, x: Buf, p: f64, seed: u64) -> Result<()> {
        lend!(self, |rt, l| match (is_acts(out), is_acts(x)) {
            (true, true) => rt.dropout_forward(&mut l.t(out, true)?, &l.t(x, false)?, p, seed),
            // An fp32 table dropped into activations (DeBERTa's relative embeddings, not
            // normed): in fp32, rounded to T once.
            (true, false) => {
                let mut out32 = rt.zeros::<f32>(out.len)?;
                rt.dropout_forward(&mut out32, &l.f(x, false)?, p, seed)?;
                store_rounded(rt, &mut l, out, &out32)
            }
            _ => rt.dropout_forward(&mut l.f(out, true)?, &l.f(x, false)?, p, seed),
        })
    }

    fn dropout_backward(&mut self, dx: Buf, dout: Buf, p: f64, seed: u64) -> Result<()> {
        lend!(self, |rt, l| match (is_acts(dx), is_acts(dout)) {
            (true, true) => rt.dropout_backward(&mut l.t(dx, true)?, &l.t(dout, false)?, p, seed),
            // Into an fp32 table's gradient (DeBERTa's relative embeddings): in fp32.
            (false, true) => {
                let dout32 = widened(rt, &mut l, dout)?;
                rt.dropout_backward(&mut l.f(dx, true)?, &dout32, p, seed)
            }
            _ => rt.dropout_backward(&mut l.f(dx, true)?, &l.f(dout, false)?, p, seed),
        })
    }

    /// Flash attention never stores the T x T probabilities: the forward saves each query
    /// row's logsumexp [B, NH, T] and the backward recomputes the probabilities from it.
    fn attention_saved_len(&self, d: AttentionDims) -> usize {
        d.b * d.nh * d.t
    }

    /// The backward's row dots D = dctx · ctx [B, NH, T].
    fn attention_scratch_len(&self, d: AttentionDims) -> usize {
        d.b * d.nh * d.t
    }

    /// The flash-style kernels of kernels/attention.cu: version 3 on tensor cores in bf16,
    /// version 2 in f32.
    fn attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        tokens: &CudaTokens,
        d: AttentionDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.flash_attention_forward(
            &mut l.t(ctx, true)?,
            &mut l.f(saved, true)?,
            &l.t(q, false)?,
            &l.t(k, false)?,
            &l.t(v, false)?,
            &tokens.mask,
            (d.b, d.t, d.nh, d.hs),
            dropout,
            kernels_for(&l),
        ))
    }

    fn attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        scratch: Buf,
        dctx: Buf,
        ctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        saved: Buf,
        tokens: &CudaTokens,
        d: AttentionDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.flash_attention_backward(
            &mut l.t(dq, true)?,
            &mut l.t(dk, true)?,
            &mut l.t(dv, true)?,
            &mut l.f(scratch, true)?,
            &l.t(dctx, false)?,
            &l.t(ctx, false)?,
            &l.t(q, false)?,
            &l.t(k, false)?,
            &l.t(v, false)?,
            &l.f(saved, false)?,
            &tokens.mask,
            (d.b, d.t, d.nh, d.hs),
            dropout,
            kernels_for(&l),
        ))
    }

    fn cls_pool_forward(&mut self, out: Buf, x: Buf, b: usize, t: usize, c: usize) -> Result<()> {
        lend!(self, |rt, l| rt.cls_pool_forward(
            &mut l.t(out, true)?,
            &l.t(x, false)?,
            b,
            t,
            c
        ))
    }

    fn cls_pool_backward(
        &mut self,
        dx: Buf,
        dout: Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.cls_pool_backward(
            &mut l.t(dx, true)?,
            &l.t(dout, false)?,
            b,
            t,
            c
        ))
    }

    // ---- decoder ops (kernels/rmsnorm.cu, swiglu.cu, rope.cu, attention_causal.cu) ----

    fn token_embedding_forward(
        &mut self,
        out: Buf,
        tokens: &CudaTokens,
        wte: Buf,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.token_embedding_forward(
            &mut l.t(out, true)?,
            &tokens.tokens,
            &l.f(wte, false)?,
            c
        ))
    }

    fn token_embedding_backward(
        &mut self,
        dwte: Buf,
        dout: Buf,
        tokens: &CudaTokens,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.token_embedding_backward(
            &mut l.f(dwte, true)?,
            &l.t(dout, false)?,
            &tokens.tokens,
            c
        ))
    }

    fn rmsnorm_forward(
        &mut self,
        out: Buf,
        rstd: Buf,
        x: Buf,
        weight: Buf,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.rmsnorm_forward(
            &mut l.t(out, true)?,
            &mut l.f(rstd, true)?,
            &l.t(x, false)?,
            &l.f(weight, false)?,
            n,
            c,
            eps
        ))
    }

    fn rmsnorm_backward(
        &mut self,
        dx: Buf,
        dweight: Buf,
        dout: Buf,
        x: Buf,
        weight: Buf,
        rstd: Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.rmsnorm_backward(
            &mut l.t(dx, true)?,
            &mut l.f(dweight, true)?,
            &l.t(dout, false)?,
            &l.t(x, false)?,
            &l.f(weight, false)?,
            &l.f(rstd, false)?,
            n,
            c
        ))
    }

    /// Into the fp32 Stats buffers the model gives; `rope_forward`/`_backward` round them
    /// to the activation type, as the kernels (and transformers) read them.
    fn rope_cos_sin(
        &mut self,
        cos: Buf,
        sin: Buf,
        positions: &[u32],
        inv_freq: &[f32],
    ) -> Result<()> {
        let (n, half) = (positions.len(), inv_freq.len());
        let positions = self.rt.upload(positions)?;
        let inv_freq = self.rt.upload(inv_freq)?;
        lend!(self, |rt, l| rt.rope_cos_sin::<f32>(
            &mut l.f(cos, true)?,
            &mut l.f(sin, true)?,
            &positions,
            &inv_freq,
            n,
            half
        ))
    }

    fn rope_forward(
        &mut self,
        out: Buf,
        x: Buf,
        cos: Buf,
        sin: Buf,
        n: usize,
        heads: usize,
        hs: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| {
            let (cos, sin) = rope_tables(rt, &mut l, cos, sin)?;
            rt.rope_forward(
                &mut l.t(out, true)?,
                &l.t(x, false)?,
                &cos,
                &sin,
                n,
                heads,
                hs,
            )
        })
    }

    fn rope_backward(
        &mut self,
        dx: Buf,
        dout: Buf,
        cos: Buf,
        sin: Buf,
        n: usize,
        heads: usize,
        hs: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| {
            let (cos, sin) = rope_tables(rt, &mut l, cos, sin)?;
            rt.rope_backward(
                &mut l.t(dx, true)?,
                &l.t(dout, false)?,
                &cos,
                &sin,
                n,
                heads,
                hs,
            )
        })
    }

    fn swiglu_forward(&mut self, out: Buf, gate: Buf, up: Buf) -> Result<()> {
        lend!(self, |rt, l| rt.swiglu_forward(
            &mut l.t(out, true)?,
            &l.t(gate, false)?,
            &l.t(up, false)?
        ))
    }

    fn swiglu_backward(
        &mut self,
        dgate: Buf,
        dup: Buf,
        dout: Buf,
        gate: Buf,
        up: Buf,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.swiglu_backward(
            &mut l.t(dgate, true)?,
            &mut l.t(dup, true)?,
            &l.t(dout, false)?,
            &l.t(gate, false)?,
            &l.t(up, false)?
        ))
    }

    fn residual_forward(&mut self, out: Buf, a: Buf, b: Buf) -> Result<()> {
        lend!(self, |rt, l| rt.residual_forward(
            &mut l.t(out, true)?,
            &l.t(a, false)?,
            &l.t(b, false)?
        ))
    }

    fn residual_backward(&mut self, da: Buf, db: Buf, dout: Buf) -> Result<()> {
        lend!(self, |rt, l| rt.residual_backward(
            &mut l.t(da, true)?,
            &mut l.t(db, true)?,
            &l.t(dout, false)?
        ))
    }

    /// Flash-style: the forward saves each query row's logsumexp [B, NH, T].
    fn causal_attention_saved_len(&self, d: CausalDims) -> usize {
        d.b * d.nh * d.t
    }

    /// The backward's row dots D = dctx · ctx [B, NH, T].
    fn causal_attention_scratch_len(&self, d: CausalDims) -> usize {
        d.b * d.nh * d.t
    }

    fn causal_attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        tokens: &CudaTokens,
        prefix: Option<SharedPrefix<'_, CudaTokens>>,
        d: CausalDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        lend!(self, |rt, l| {
            let kv = match prefix {
                Some(p) => Some((l.t(p.k, false)?, l.t(p.v, false)?, p.prompts)),
                None => None,
            };
            let prefix = kv.as_ref().map(|(pk, pv, prompts)| CausalPrefix {
                k: pk.as_view(),
                v: pv.as_view(),
                mask: prompts.mask.as_view(),
                of_sequence: tokens.of_sequence.as_view(),
                prompts: prompts.tokens.b,
                len: d.tp,
            });
            rt.causal_attention_forward(
                &mut l.t(ctx, true)?,
                &mut l.f(saved, true)?,
                &l.t(q, false)?,
                &l.t(k, false)?,
                &l.t(v, false)?,
                &tokens.mask,
                prefix.as_ref(),
                (d.b, d.t, d.nh, d.nkv, d.hs),
                dropout,
            )
        })
    }

    fn causal_attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        dprefix: Option<(Buf, Buf)>,
        scratch: Buf,
        dctx: Buf,
        ctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        saved: Buf,
        tokens: &CudaTokens,
        prefix: Option<SharedPrefix<'_, CudaTokens>>,
        d: CausalDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        lend!(self, |rt, l| {
            let kv = match prefix {
                Some(p) => Some((l.t(p.k, false)?, l.t(p.v, false)?, p.prompts)),
                None => None,
            };
            let prefix = kv.as_ref().map(|(pk, pv, prompts)| CausalPrefix {
                k: pk.as_view(),
                v: pv.as_view(),
                mask: prompts.mask.as_view(),
                of_sequence: tokens.of_sequence.as_view(),
                prompts: prompts.tokens.b,
                len: d.tp,
            });
            let dprefix = match dprefix {
                Some((dk, dv)) => Some(CausalPrefixGrads {
                    dk: l.t(dk, true)?,
                    dv: l.t(dv, true)?,
                }),
                None => None,
            };
            rt.causal_attention_backward(
                &mut l.t(dq, true)?,
                &mut l.t(dk, true)?,
                &mut l.t(dv, true)?,
                dprefix,
                &mut l.f(scratch, true)?,
                &l.t(dctx, false)?,
                &l.t(ctx, false)?,
                &l.t(q, false)?,
                &l.t(k, false)?,
                &l.t(v, false)?,
                &l.f(saved, false)?,
                &tokens.mask,
                prefix.as_ref(),
                (d.b, d.t, d.nh, d.nkv, d.hs),
                dropout,
            )
        })
    }

    fn last_token_pool_forward(
        &mut self,
        out: Buf,
        x: Buf,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.last_token_pool_forward(
            &mut l.t(out, true)?,
            &l.t(x, false)?,
            rows,
            t,
            c
        ))
    }

    fn last_token_pool_backward(
        &mut self,
        dx: Buf,
        dout: Buf,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.last_token_pool_backward(
            &mut l.t(dx, true)?,
            &l.t(dout, false)?,
            rows,
            t,
            c
        ))
    }

    // ---- DeBERTa's disentangled attention (kernels/disentangled_attention.cu) ----

    fn position_products_forward(
        &mut self,
        out: Buf,
        x: Buf,
        pos: Buf,
        d: AttentionDims,
        rows: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.position_products_forward(
            &mut l.t(out, true)?,
            &l.t(x, false)?,
            &l.t(pos, false)?,
            (d.b, d.t, d.nh, d.hs),
            rows,
        ))
    }

    fn position_products_backward(
        &mut self,
        dx: Buf,
        dpos: Buf,
        dout: Buf,
        x: Buf,
        pos: Buf,
        d: AttentionDims,
        rows: usize,
    ) -> Result<()> {
        lend!(self, |rt, l| rt.position_products_backward(
            &mut l.t(dx, true)?,
            &mut l.t(dpos, true)?,
            &l.t(dout, false)?,
            &l.t(x, false)?,
            &l.t(pos, false)?,
            (d.b, d.t, d.nh, d.hs),
            rows,
        ))
    }

    /// Flash-style: [lse [B, NH, T] | the backward's row dots [B, NH, T] | the output in
    /// fp32 [B, T, NH·HS]] (`SavedParts`).
    fn disentangled_attention_saved_len(&self, d: AttentionDims) -> usize {
        SavedParts::len(d)
    }

    fn disentangled_attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        terms: PositionBufs,
        relative: &[u32],
        tokens: &CudaTokens,
        d: AttentionDims,
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let saved = SavedParts::new(saved, d)?;
        lend!(self, |rt, l| {
            let (c2p, p2c) = (lend_term(&mut l, terms.c2p)?, lend_term(&mut l, terms.p2c)?);
            let terms = DevicePositionTerms {
                c2p: c2p.as_ref(),
                p2c: p2c.as_ref(),
                relative,
                rows: terms.rows,
            };
            rt.disentangled_attention_forward(
                &mut l.t(ctx, true)?,
                &mut l.f(saved.out32, true)?,
                &mut l.f(saved.lse, true)?,
                &l.t(q, false)?,
                &l.t(k, false)?,
                &l.t(v, false)?,
                terms,
                &tokens.mask,
                (d.b, d.t, d.nh, d.hs),
                scale,
                dropout,
            )
        })
    }

    /// Writes the row dots into `saved`'s middle part, which only this backward uses.
    fn disentangled_attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        dterms: PositionBufs,
        dctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        terms: PositionBufs,
        saved: Buf,
        relative: &[u32],
        tokens: &CudaTokens,
        d: AttentionDims,
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let saved = SavedParts::new(saved, d)?;
        lend!(self, |rt, l| {
            let grads = DevicePositionGrads {
                dc2p: dterms.c2p.map(|b| l.t(b, true)).transpose()?,
                dp2c: dterms.p2c.map(|b| l.t(b, true)).transpose()?,
            };
            let (c2p, p2c) = (lend_term(&mut l, terms.c2p)?, lend_term(&mut l, terms.p2c)?);
            let terms = DevicePositionTerms {
                c2p: c2p.as_ref(),
                p2c: p2c.as_ref(),
                relative,
                rows: terms.rows,
            };
            rt.disentangled_attention_backward(
                &mut l.t(dq, true)?,
                &mut l.t(dk, true)?,
                &mut l.t(dv, true)?,
                grads,
                &mut l.f(saved.row_dot, true)?,
                &l.t(dctx, false)?,
                &l.f(saved.out32, false)?,
                &l.t(q, false)?,
                &l.t(k, false)?,
                &l.t(v, false)?,
                terms,
                &l.f(saved.lse, false)?,
                &tokens.mask,
                (d.b, d.t, d.nh, d.hs),
                scale,
                dropout,
            )
        })
    }

    fn ranking_loss(
        &mut self,
        dlogits: Buf,
        logits: Buf,
        ks: &[usize],
        types: &[Option<PromptType>],
        spec: &LossSpec,
        eps: f64,
        extras: &LossExtras,
        divisor: usize,
    ) -> Result<f64> {
        if !extras.is_off() {
            // The fused kernel computes the paper's loss only.
            return Err(Error::user(
                "ties (`scores`), `margin` and `center_rewards_coefficient` train on the CPU \
                 only: the CUDA loss kernel does not have them yet; use `device: cpu`",
            ));
        }
        let ranking = RankingBatch::new(&self.rt, ks, types, spec)?;
        lend!(self, |rt, l| {
            let mut dlogits = l.f(dlogits, true)?;
            let value = rt.ranking_loss_forward_backward(
                &mut dlogits,
                &l.f(logits, false)?,
                &ranking,
                eps,
            )?;
            if divisor > 1 {
                // As the CPU: the f32 dlogits divided by the count (B values: a round trip
                // through the host costs less than a kernel of its own).
                let mut host = rt
                    .stream()
                    .clone_dtoh(&dlogits)
                    .map_err(driver("copy dlogits to the host"))?;
                for d in host.iter_mut() {
                    *d /= divisor as f32;
                }
                rt.stream()
                    .memcpy_htod(&host, &mut dlogits)
                    .map_err(driver("copy dlogits to the device"))?;
            }
            Ok(value)
        })
    }

    fn start_training(&mut self) -> Result<()> {
        let total = self.params.len();
        if self.grads.len() != total {
            self.grads = self.rt.zeros(total)?;
        }
        let moments = self.moment_ranges().iter().map(|r| r.len()).sum();
        for arena in [&mut self.m, &mut self.v] {
            if arena.len() != moments {
                *arena = self.rt.zeros(moments)?;
            }
        }
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.training()?;
        self.rt
            .stream()
            .memset_zeros(&mut self.grads)
            .map_err(driver("zero the gradients"))
    }

    fn grads_final(&mut self, range: Range<usize>) -> Result<()> {
        self.start_grad_sums(range)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        self.training()?;
        Ok(self.rt.global_norm_squared(&[self.grads.as_view()])?.sqrt())
    }

    /// One launch per run of consecutive tensors with the same decay flag; for bf16 the
    /// fused kernel also refreshes the weights' bf16 copy.
    fn adamw_update(
        &mut self,
        tensors: &[(Range<usize>, bool)],
        opt: &OptimStep,
        grad_scale: f64,
    ) -> Result<()> {
        self.training()?;
        let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
        for (range, decay) in tensors {
            match runs.last_mut() {
                Some((run, d)) if d == decay && run.end == range.start => run.end = range.end,
                _ => runs.push((range.clone(), *decay)),
            }
        }
        // Each run's parts whose moments this backend holds, with where they are in m and v.
        let mut parts = Vec::new();
        let mut offset = 0;
        for owned in self.moment_ranges() {
            for (range, decay) in &runs {
                let (start, end) = (range.start.max(owned.start), range.end.min(owned.end));
                if start < end {
                    let at = offset + start - owned.start;
                    parts.push((start..end, at..at + (end - start), *decay));
                }
            }
            offset += owned.len();
        }
        for (range, moments, decay) in parts {
            let hp = AdamWStep {
                step: opt.step,
                lr: opt.lr,
                beta1: opt.beta1,
                beta2: opt.beta2,
                eps: opt.eps,
                weight_decay: if decay { opt.weight_decay } else { 0.0 },
                grad_scale,
            };
            let params = &mut self.params.slice_mut(range.clone());
            let grads = &self.grads.slice(range.clone());
            let m = &mut self.m.slice_mut(moments.clone());
            let v = &mut self.v.slice_mut(moments);
            match &mut self.precision {
                Precision::F32 { .. } => self.rt.adamw_update(params, grads, m, v, &hp)?,
                Precision::Bf16 { weights, .. } => self.rt.adamw_update_bf16_copy(
                    params,
                    &mut weights.slice_mut(range.clone()),
                    grads,
                    m,
                    v,
                    &hp,
                )?,
            }
        }
        Ok(())
    }

    fn upload_params(&mut self, params: &[f32]) -> Result<()> {
        self.check_arena("parameters", params.len())?;
        self.rt
            .stream()
            .memcpy_htod(params, &mut self.params)
            .map_err(driver("upload the parameters"))?;
        if let Precision::Bf16 { weights, .. } = &mut self.precision {
            self.rt.cast_f32_to_bf16(weights, &self.params)?;
        }
        Ok(())
    }

    /// Whole moments [parameters]; a shard keeps its own parts.
    fn upload_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        self.training()?;
        self.check_arena("first moments", m.len())?;
        self.check_arena("second moments", v.len())?;
        let stream = self.rt.stream().clone();
        let mut offset = 0;
        for owned in self.moment_ranges() {
            let at = offset..offset + owned.len();
            stream
                .memcpy_htod(&m[owned.clone()], &mut self.m.slice_mut(at.clone()))
                .map_err(driver("upload the first moments"))?;
            stream
                .memcpy_htod(&v[owned.clone()], &mut self.v.slice_mut(at))
                .map_err(driver("upload the second moments"))?;
            offset += owned.len();
        }
        Ok(())
    }

    /// Whole moments [parameters] (a shard gathers them from the other ranks, which must
    /// call this at the same point).
    fn with_state<R>(&self, f: impl FnOnce(&[f32], &[f32], &[f32]) -> R) -> Result<R> {
        let params = self.rt.download(&self.params)?;
        let (m, v) = match (self.training(), &self.optimizer_shard) {
            (Err(_), _) => (Vec::new(), Vec::new()),
            (Ok(()), None) => (self.rt.download(&self.m)?, self.rt.download(&self.v)?),
            (Ok(()), Some(shard)) => (
                shard.gather(&self.rt, &self.m, self.params.len())?,
                shard.gather(&self.rt, &self.v, self.params.len())?,
            ),
        };
        Ok(f(&params, &m, &v))
    }

    fn download_grads(&self) -> Result<Vec<f32>> {
        self.rt.download(&self.grads)
    }
}

/// The parts of the disentangled attention's saved buffer (Stats, fp32).
struct SavedParts {
    lse: Buf,     // [B, NH, T] log-sum-exp per query row
    row_dot: Buf, // [B, NH, T] the backward's D = dctx · ctx, scratch
    out32: Buf,   // [B, T, NH·HS] the forward's output in fp32
}

impl SavedParts {
    fn len(d: AttentionDims) -> usize {
        2 * d.b * d.nh * d.t + d.b * d.t * d.nh * d.hs
    }

    fn new(saved: Buf, d: AttentionDims) -> Result<SavedParts> {
        if saved.len != SavedParts::len(d) {
            return Err(Error::internal(format!(
                "disentangled attention: saved has {} elements, the shapes need {}",
                saved.len,
                SavedParts::len(d)
            )));
        }
        let rows = d.b * d.nh * d.t;
        Ok(SavedParts {
            lse: saved.part(0, rows),
            row_dot: saved.part(rows, rows),
            out32: saved.part(2 * rows, saved.len - 2 * rows),
        })
    }
}

/// A position term's products, lent for reading (None where the model has no such term).
fn lend_term<'a, T>(l: &mut Lend<'a, T>, buf: Option<Buf>) -> Result<Option<CudaViewMut<'a, T>>> {
    buf.map(|b| l.t(b, false)).transpose()
}

/// cos, sin (fp32 Stats) rounded to the activation type T in fresh buffers, as the rope
/// kernels read them (a plain copy for f32).
fn rope_tables<T: Activation + ModelFloat>(
    rt: &CudaRuntime,
    l: &mut Lend<'_, T>,
    cos: Buf,
    sin: Buf,
) -> Result<(CudaSlice<T>, CudaSlice<T>)> {
    let mut tables = [rt.zeros::<T>(cos.len)?, rt.zeros::<T>(sin.len)?];
    for (table, buf) in tables.iter_mut().zip([cos, sin]) {
        ModelFloat::from_f32(rt, &mut table.as_view_mut(), &l.f(buf, false)?.as_view())?;
    }
    let [cos, sin] = tables;
    Ok((cos, sin))
}

/// An activation buffer widened into a fresh fp32 buffer (the mixed-arena cases of
/// LayerNorm and dropout, which run in fp32).
fn widened<T: Activation + ModelFloat>(
    rt: &CudaRuntime,
    l: &mut Lend<'_, T>,
    buf: Buf,
) -> Result<CudaSlice<f32>> {
    let mut wide = rt.zeros::<f32>(buf.len)?;
    ModelFloat::to_f32(rt, &mut wide.as_view_mut(), &l.t(buf, false)?.as_view())?;
    Ok(wide)
}

/// out (an activation buffer) = `from` rounded to T.
fn store_rounded<T: Activation + ModelFloat>(
    rt: &CudaRuntime,
    l: &mut Lend<'_, T>,
    out: Buf,
    from: &CudaSlice<f32>,
) -> Result<()> {
    ModelFloat::from_f32(rt, &mut l.t(out, true)?, &from.as_view())
}

/// Which flash kernels the activation type runs: tensor cores where it has them (bf16).
fn kernels_for<T: Activation>(_: &Lend<'_, T>) -> FlashKernels {
    FlashKernels::for_activation::<T>()
}
