//! Launch wrappers of the decoder kernels (kernels/rmsnorm.cu, swiglu.cu, rope.cu,
//! attention_causal.cu), methods of `CudaRuntime` as ops.rs's are, each mirroring its CPU
//! twin in src/backend/cpu (rmsnorm.rs, swiglu.rs, rope.rs, attention_causal.rs): forward
//! outputs are overwritten, backward gradients are ADDED to. Activations are
//! `T: Activation` (f32 or bf16); RMSNorm's weight, its gradient and every saved statistic
//! are fp32. Every length is checked against the shapes before a launch, so a wrong call is
//! an error, never a wild access.

use cudarc::driver::{CudaView, CudaViewMut, LaunchArgs, PushKernelArg};

use super::ops::launch::LaunchShape;
use super::ops::{checked_view, checked_view_mut, launch as ops_launch, typed};
use super::runtime::{Activation, CudaRuntime, DeviceRead, DeviceWrite, check_len, dim};
use crate::backend::cpu::AttentionDropout;
use crate::error::{Error, Result};

/// The launch shapes of the decoder kernels, pure functions of the tensor shapes (no device
/// needed, so the CPU emulation runs the very grids a GPU gets). The constants restate
/// kernels/attention_causal.cu's.
pub mod launch {
    use crate::backend::cuda::launch::{LaunchShape, MAX_SHARED_BYTES};
    use crate::backend::cuda::runtime::blocks;
    use crate::error::{Error, Result};

    /// Own rows per block (CAUSAL_WARPS = 4 warps of 4), streamed tile rows, threads per
    /// block and the largest head size of the causal attention kernels.
    pub const CAUSAL_ROWS: usize = 16;
    pub const CAUSAL_TILE: usize = 32;
    pub const CAUSAL_THREADS: usize = 128;
    pub const CAUSAL_MAX_HEAD: usize = 128;

    /// causal_attention_forward: grid (query tiles of CAUSAL_ROWS, b*nh); shared: own
    /// queries [CAUSAL_ROWS, hs], keys [CAUSAL_TILE, hs|1], values [CAUSAL_TILE, hs], fp32.
    pub fn causal_forward(op: &str, t: usize, heads: usize, hs: usize) -> Result<LaunchShape> {
        let floats = CAUSAL_ROWS * hs + CAUSAL_TILE * (hs | 1) + CAUSAL_TILE * hs;
        causal_shape(op, t, heads, hs, floats)
    }

    /// causal_attention_backward_key (grid (key tiles of t, b*nkv)),
    /// causal_attention_backward_prefix_key (grid (key tiles of the prefix length,
    /// prompts*nkv)) and causal_attention_backward_query (grid (query tiles of t, b*nh)):
    /// `rows` own rows over `heads`; shared: two own tiles [CAUSAL_ROWS, hs] and two
    /// streamed tiles [CAUSAL_TILE, hs|1], fp32.
    pub fn causal_backward(op: &str, rows: usize, heads: usize, hs: usize) -> Result<LaunchShape> {
        let floats = 2 * CAUSAL_ROWS * hs + 2 * CAUSAL_TILE * (hs | 1);
        causal_shape(op, rows, heads, hs, floats)
    }

    /// Version 2 (tensor cores, bf16; kernels/attention_causal.cu `tc_*`): own rows per
    /// block (4 warps of 16), threads per block, the rows of the forward's key tiles.
    pub const CAUSAL_TC_ROWS: usize = 64;
    pub const CAUSAL_TC_THREADS: usize = 128;
    pub const CAUSAL_TC_FORWARD_TILE: usize = 64;

    /// Whether version 2 takes head size hs: a multiple of 16 (wmma's blocks, no padding)
    /// up to CAUSAL_MAX_HEAD.
    pub fn causal_tc_head(hs: usize) -> bool {
        hs > 0 && hs <= CAUSAL_MAX_HEAD && hs.is_multiple_of(16)
    }

    /// The rows of version 2's backward tiles: 64 up to hs = 64, else 32 (so that the key
    /// kernels' shared memory stays within MAX_SHARED_BYTES).
    pub fn causal_tc_backward_tile(hs: usize) -> usize {
        if hs <= 64 { 64 } else { 32 }
    }

    /// causal_attention_tc_forward: grid (query tiles of CAUSAL_TC_ROWS, b*nh); shared:
    /// own queries and a key and a value tile (bf16), per warp a scratch and a weight tile.
    pub fn causal_tc_forward(op: &str, t: usize, heads: usize, hs: usize) -> Result<LaunchShape> {
        let tile = CAUSAL_TC_FORWARD_TILE;
        causal_tc_shape(op, (t, heads, hs), CAUSAL_TC_ROWS + 2 * tile, tile, 1, 1, 0)
    }

    /// causal_attention_tc_backward_key (grid (key tiles of t, b*nkv)) and
    /// causal_attention_tc_backward_prefix_key (grid (key tiles of the prefix length,
    /// prompts*nkv)): own keys and values, a query and a dout tile; per warp two scratches
    /// and two weight tiles; lse and dot of a query tile.
    pub fn causal_tc_backward_key(
        op: &str,
        rows: usize,
        heads: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let tile = causal_tc_backward_tile(hs);
        let head_rows = 2 * CAUSAL_TC_ROWS + 2 * tile;
        causal_tc_shape(op, (rows, heads, hs), head_rows, tile, 2, 2, 2 * tile)
    }

    /// causal_attention_tc_backward_query (grid (query tiles of t, b*nh)): own queries and
    /// douts, a key and a value tile; per warp two scratches and one weight tile.
    pub fn causal_tc_backward_query(
        op: &str,
        rows: usize,
        heads: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        let tile = causal_tc_backward_tile(hs);
        let head_rows = 2 * CAUSAL_TC_ROWS + 2 * tile;
        causal_tc_shape(op, (rows, heads, hs), head_rows, tile, 2, 1, 0)
    }

    /// Version 2's layout in bytes: `head_rows` bf16 rows of stride hs + 8, then per warp
    /// `scratches` fp32 [16, tile + 4] and `weights` bf16 [16, tile + 8], then `floats`
    /// fp32.
    fn causal_tc_shape(
        op: &str,
        (rows, heads, hs): (usize, usize, usize),
        head_rows: usize,
        tile: usize,
        scratches: usize,
        weights: usize,
        floats: usize,
    ) -> Result<LaunchShape> {
        if !causal_tc_head(hs) {
            return Err(Error::internal(format!(
                "{op}: the tensor-core kernels take head sizes that are multiples of 16 up to \
                 {CAUSAL_MAX_HEAD}, not {hs}"
            )));
        }
        let warps = CAUSAL_TC_THREADS / 32;
        let bytes = head_rows * (hs + 8) * 2
            + warps * scratches * 16 * (tile + 4) * 4
            + warps * weights * 16 * (tile + 8) * 2
            + floats * 4;
        // At most about 88 KiB (the backward key kernels at hs = 64).
        debug_assert!(bytes <= MAX_SHARED_BYTES as usize);
        Ok(LaunchShape {
            grid: (blocks(op, rows, CAUSAL_TC_ROWS)?, y_blocks(op, heads)?, 1),
            block: CAUSAL_TC_THREADS as u32,
            shared_bytes: bytes as u32,
        })
    }

    /// A grid's y extent: 1..=65535 blocks.
    fn y_blocks(op: &str, heads: usize) -> Result<u32> {
        if (1..=65535).contains(&heads) {
            Ok(heads as u32)
        } else {
            Err(Error::internal(format!(
                "{op}: {heads} blocks along the grid's y axis, the limit is 65535"
            )))
        }
    }

    fn causal_shape(
        op: &str,
        rows: usize,
        heads: usize,
        hs: usize,
        floats: usize,
    ) -> Result<LaunchShape> {
        if hs == 0 || hs > CAUSAL_MAX_HEAD {
            return Err(Error::internal(format!(
                "{op}: head size {hs} is outside 1..={CAUSAL_MAX_HEAD}"
            )));
        }
        // hs <= 128 keeps this under MAX_SHARED_BYTES (about 49 KiB at most).
        let shared_bytes = (floats * std::mem::size_of::<f32>()) as u32;
        debug_assert!(shared_bytes <= MAX_SHARED_BYTES);
        Ok(LaunchShape {
            grid: (blocks(op, rows, CAUSAL_ROWS)?, y_blocks(op, heads)?, 1),
            block: CAUSAL_THREADS as u32,
            shared_bytes,
        })
    }
}

/// The prompts whose keys and values the sequences of a batch continue (the CPU twin's
/// `cpu::Prefix`): sequence s first attends to every real key of prompt of_sequence[s].
/// The caller checks of_sequence against `prompts` (as `TokenBatch::new` checks ids): the
/// kernels give a sequence with an index past the prompts no prefix rather than read out
/// of bounds.
#[derive(Debug)]
pub struct CausalPrefix<'a, T> {
    /// [prompts, len, nkv*hs]: the prompts' keys (rotated) and values.
    pub k: CudaView<'a, T>,
    pub v: CudaView<'a, T>,
    /// [prompts, len]: 1 = real prompt token, 0 = padding.
    pub mask: CudaView<'a, u8>,
    /// [b]: the prompt of each sequence.
    pub of_sequence: CudaView<'a, u32>,
    pub prompts: usize,
    /// Tokens per prompt, padding included.
    pub len: usize,
}

/// The gradients of a `CausalPrefix`'s keys and values, [prompts, len, nkv*hs] each: the
/// backward adds to them the sum over every sequence that continues the prompt.
#[derive(Debug)]
pub struct CausalPrefixGrads<'a, T> {
    pub dk: CudaViewMut<'a, T>,
    pub dv: CudaViewMut<'a, T>,
}

/// Which kernels run the causal attention (kernels/attention_causal.cu): version 1 on CUDA
/// cores (f32 and bf16, fp32 arithmetic throughout) or version 2 on tensor cores (bf16,
/// head sizes that are multiples of 16 up to 128; the probabilities and their gradients
/// rounded to bf16 before they multiply, as FlashAttention-2 does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CausalKernels {
    CudaCores,
    TensorCores,
}

impl CausalKernels {
    /// What the device model runs for activations of type T at head size hs: tensor cores
    /// where the type has them (bf16) and the head size suits them, else version 1.
    pub fn for_shape<T: Activation>(hs: usize) -> CausalKernels {
        if T::TENSOR_CORE_ATTENTION && launch::causal_tc_head(hs) {
            CausalKernels::TensorCores
        } else {
            CausalKernels::CudaCores
        }
    }

    /// Refuses what the version cannot run: on tensor cores, f32 or a head size off the
    /// multiples of 16.
    fn check<T: Activation>(self, op: &str, hs: usize) -> Result<()> {
        match self {
            CausalKernels::TensorCores if !T::TENSOR_CORE_ATTENTION => {
                Err(Error::internal(format!(
                    "{op}: the tensor-core kernels take bf16 activations, not {}",
                    T::SUFFIX
                )))
            }
            CausalKernels::TensorCores if !launch::causal_tc_head(hs) => {
                Err(Error::internal(format!(
                    "{op}: the tensor-core kernels take head sizes that are multiples of 16 up \
                     to {}, not {hs}",
                    launch::CAUSAL_MAX_HEAD
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The scalar arguments the causal attention kernels end with (b, t, nh, nkv, hs, prompts,
/// prefix len, scale, drop_p, drop_scale, seed), checked: nkv divides
/// nh, the prefix's buffers match its shapes, the dropout's p is in [0, 1).
struct CausalArgs {
    dims: [i32; 7],
    scale: f32,
    drop_p: f64,
    drop_scale: f32,
    seed: u64,
}

impl CausalArgs {
    fn new<T>(
        op: &str,
        (b, t, nh, nkv, hs): (usize, usize, usize, usize, usize),
        prefix: Option<&CausalPrefix<'_, T>>,
        dropout: Option<AttentionDropout>,
    ) -> Result<CausalArgs> {
        // p = 0: no dropout, no hashing; the kept weights' scale 1 / (1 - p) in fp32.
        let (drop_p, drop_scale, seed) = match dropout {
            None => (0.0, 1.0, 0),
            Some(d) if (0.0..1.0).contains(&d.p) => (d.p, (1.0 / (1.0 - d.p)) as f32, d.seed),
            Some(d) => {
                return Err(Error::internal(format!(
                    "{op}: dropout p = {} is not in [0, 1)",
                    d.p
                )));
            }
        };
        if nkv == 0 || !nh.is_multiple_of(nkv) {
            return Err(Error::internal(format!(
                "{op}: {nkv} key/value heads do not divide {nh} query heads"
            )));
        }
        let (prompts, len) = prefix.map_or((0, 0), |p| (p.prompts, p.len));
        if let Some(p) = prefix {
            let kv = p.prompts * p.len * nkv * hs;
            check_len(op, "prefix k", p.k.len(), kv)?;
            check_len(op, "prefix v", p.v.len(), kv)?;
            check_len(op, "prefix mask", p.mask.len(), p.prompts * p.len)?;
            check_len(op, "prefix of_sequence", p.of_sequence.len(), b)?;
        }
        Ok(CausalArgs {
            dims: [
                dim(op, "b", b)?,
                dim(op, "t", t)?,
                dim(op, "nh", nh)?,
                dim(op, "nkv", nkv)?,
                dim(op, "hs", hs)?,
                dim(op, "prompts", prompts)?,
                dim(op, "prefix len", len)?,
            ],
            scale: (1.0 / (hs as f64).sqrt()) as f32,
            drop_p,
            drop_scale,
            seed,
        })
    }

    /// Pushes b, t, nh, nkv, hs, prompts, prefix len, scale, drop_p, drop_scale, seed.
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        for d in &self.dims {
            args.arg(d);
        }
        args.arg(&self.scale)
            .arg(&self.drop_p)
            .arg(&self.drop_scale)
            .arg(&self.seed);
    }
}

/// A kernel's name in the version `kernels`: causal_attention_<part>_<T> on CUDA cores,
/// causal_attention_tc_<part>_bf16 on tensor cores.
fn causal_kernel<T: Activation>(kernels: CausalKernels, part: &str) -> String {
    match kernels {
        CausalKernels::CudaCores => typed::<T>(&format!("causal_attention_{part}")),
        CausalKernels::TensorCores => typed::<T>(&format!("causal_attention_tc_{part}")),
    }
}

/// A null device pointer: the prefix arguments of a call without a prefix (the kernels
/// never read them when the prefix length is 0).
const NULL: u64 = 0;

/// Pushes the prefix's k, v, mask and of_sequence, or four null pointers without one.
fn push_prefix<'a, T>(args: &mut LaunchArgs<'a>, prefix: Option<&'a CausalPrefix<'_, T>>) {
    match prefix {
        Some(p) => {
            args.arg(&p.k).arg(&p.v).arg(&p.mask).arg(&p.of_sequence);
        }
        None => {
            args.arg(&NULL).arg(&NULL).arg(&NULL).arg(&NULL);
        }
    }
}

/// The rope kernels' checks: hs even, cos and sin [n, hs/2]; their views and the launch
/// shape (one thread per pair of n*heads*hs/2).
fn rope_checks<'a, T>(
    op: &str,
    cos: &'a impl DeviceRead<T>,
    sin: &'a impl DeviceRead<T>,
    (n, heads, hs): (usize, usize, usize),
) -> Result<(CudaView<'a, T>, CudaView<'a, T>, LaunchShape)> {
    if !hs.is_multiple_of(2) {
        return Err(Error::internal(format!("{op}: head size {hs} is not even")));
    }
    let cos = checked_view(op, "cos", cos, n * hs / 2)?;
    let sin = checked_view(op, "sin", sin, n * hs / 2)?;
    let pairs = (n * heads * hs / 2).max(1);
    Ok((cos, sin, ops_launch::elementwise(op, pairs)?))
}

/// n, heads, hs as the kernels' ints.
fn rope_dims(op: &str, (n, heads, hs): (usize, usize, usize)) -> Result<[i32; 3]> {
    Ok([
        dim(op, "n", n)?,
        dim(op, "heads", heads)?,
        dim(op, "hs", hs)?,
    ])
}

impl CudaRuntime {
    /// out[n, c] = weight[c] · T(inp · rstd), rstd[n] = 1 / sqrt(mean(inp²) + eps) saved.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        rstd: &mut impl DeviceWrite<f32>,
        inp: &impl DeviceRead<T>,
        weight: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
        eps: f64,
    ) -> Result<()> {
        let op = "rmsnorm_forward";
        let out = &mut checked_view_mut(op, "out", out, n * c)?;
        let rstd = &mut checked_view_mut(op, "rstd", rstd, n)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let weight = &checked_view(op, "weight", weight, c)?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = ops_launch::warp_rows(op, n)?;
        let kernel = self.kernel(op, "rmsnorm", &typed::<T>(op), shape)?;
        let (n_i, c_i, eps_f) = (dim(op, "n", n)?, dim(op, "c", c)?, eps as f32);
        let mut args = kernel.args();
        args.arg(out)
            .arg(rstd)
            .arg(inp)
            .arg(weight)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&eps_f);
        unsafe { kernel.launch(args) }
    }

    /// dinp[n, c] += rstd · (dnorm - norm · mean(dnorm · norm)) with dnorm = weight · dout,
    /// norm = inp · rstd; dweight[c] += Σ_rows dout · norm. Two launches: the input
    /// gradient row by row, then the column sums (fixed order, no atomics).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dweight: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        inp: &impl DeviceRead<T>,
        weight: &impl DeviceRead<f32>,
        rstd: &impl DeviceRead<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "rmsnorm_backward";
        let dinp = &mut checked_view_mut(op, "dinp", dinp, n * c)?;
        let dweight = &mut checked_view_mut(op, "dweight", dweight, c)?;
        let dout = &checked_view(op, "dout", dout, n * c)?;
        let inp = &checked_view(op, "inp", inp, n * c)?;
        let weight = &checked_view(op, "weight", weight, c)?;
        let rstd = &checked_view(op, "rstd", rstd, n)?;
        if dinp.is_empty() {
            return Ok(());
        }
        let (n_i, c_i) = (dim(op, "n", n)?, dim(op, "c", c)?);
        let input = self.kernel(
            op,
            "rmsnorm",
            &typed::<T>("rmsnorm_backward_input"),
            ops_launch::warp_rows(op, n)?,
        )?;
        let mut args = input.args();
        args.arg(dinp)
            .arg(dout)
            .arg(inp)
            .arg(weight)
            .arg(rstd)
            .arg(&n_i)
            .arg(&c_i);
        unsafe { input.launch(args) }?;
        let params = self.kernel(
            op,
            "rmsnorm",
            &typed::<T>("rmsnorm_backward_weight"),
            ops_launch::column_tiles(op, c)?,
        )?;
        let mut args = params.args();
        args.arg(dweight)
            .arg(dout)
            .arg(inp)
            .arg(rstd)
            .arg(&n_i)
            .arg(&c_i);
        unsafe { params.launch(args) }
    }

    /// out[i] = T(silu(gate[i])) · up[i], elementwise over equal lengths.
    pub fn swiglu_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        gate: &impl DeviceRead<T>,
        up: &impl DeviceRead<T>,
    ) -> Result<()> {
        let op = "swiglu_forward";
        let out = &mut out.view_mut();
        let len = out.len();
        let gate = &checked_view(op, "gate", gate, len)?;
        let up = &checked_view(op, "up", up, len)?;
        if len == 0 {
            return Ok(());
        }
        let shape = ops_launch::elementwise(op, len)?;
        let kernel = self.kernel(op, "swiglu", &typed::<T>(op), shape)?;
        let mut args = kernel.args();
        args.arg(out).arg(gate).arg(up).arg(&len);
        unsafe { kernel.launch(args) }
    }

    /// dgate[i] += dout · up · silu'(gate); dup[i] += dout · T(silu(gate)).
    pub fn swiglu_backward<T: Activation>(
        &self,
        dgate: &mut impl DeviceWrite<T>,
        dup: &mut impl DeviceWrite<T>,
        dout: &impl DeviceRead<T>,
        gate: &impl DeviceRead<T>,
        up: &impl DeviceRead<T>,
    ) -> Result<()> {
        let op = "swiglu_backward";
        let dout = &dout.view();
        let len = dout.len();
        let dgate = &mut checked_view_mut(op, "dgate", dgate, len)?;
        let dup = &mut checked_view_mut(op, "dup", dup, len)?;
        let gate = &checked_view(op, "gate", gate, len)?;
        let up = &checked_view(op, "up", up, len)?;
        if len == 0 {
            return Ok(());
        }
        let shape = ops_launch::elementwise(op, len)?;
        let kernel = self.kernel(op, "swiglu", &typed::<T>(op), shape)?;
        let mut args = kernel.args();
        args.arg(dgate)
            .arg(dup)
            .arg(dout)
            .arg(gate)
            .arg(up)
            .arg(&len);
        unsafe { kernel.launch(args) }
    }

    /// cos[n, half], sin[n, half] = T(cos, sin of f32(f32(positions[i]) · inv_freq[j])), the
    /// CPU's `rope_cos_sin`; inv_freq [half] from `cpu::rope_inv_freq` (Llama 3's scaling
    /// included), positions [n] per token.
    pub fn rope_cos_sin<T: Activation>(
        &self,
        cos: &mut impl DeviceWrite<T>,
        sin: &mut impl DeviceWrite<T>,
        positions: &impl DeviceRead<u32>,
        inv_freq: &impl DeviceRead<f32>,
        n: usize,
        half: usize,
    ) -> Result<()> {
        let op = "rope_cos_sin";
        let cos = &mut checked_view_mut(op, "cos", cos, n * half)?;
        let sin = &mut checked_view_mut(op, "sin", sin, n * half)?;
        let positions = &checked_view(op, "positions", positions, n)?;
        let inv_freq = &checked_view(op, "inv_freq", inv_freq, half)?;
        if cos.is_empty() {
            return Ok(());
        }
        let shape = ops_launch::elementwise(op, n * half)?;
        let kernel = self.kernel(op, "rope", &typed::<T>(op), shape)?;
        let (n_i, half_i) = (dim(op, "n", n)?, dim(op, "half", half)?);
        let mut args = kernel.args();
        args.arg(cos)
            .arg(sin)
            .arg(positions)
            .arg(inv_freq)
            .arg(&n_i)
            .arg(&half_i);
        unsafe { kernel.launch(args) }
    }

    /// out[n, heads*hs] = inp rotated per head by cos, sin [n, hs/2] (rotate_half layout:
    /// out[i] = x1 cos_i - x2 sin_i, out[i + hs/2] = x2 cos_i + x1 sin_i). hs even.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        inp: &impl DeviceRead<T>,
        cos: &impl DeviceRead<T>,
        sin: &impl DeviceRead<T>,
        n: usize,
        heads: usize,
        hs: usize,
    ) -> Result<()> {
        let op = "rope_forward";
        let out = &mut checked_view_mut(op, "out", out, n * heads * hs)?;
        let inp = &checked_view(op, "inp", inp, n * heads * hs)?;
        self.rope_launch(op, out, inp, cos, sin, (n, heads, hs))
    }

    /// rope_forward in place: x[n, heads*hs] rotated (each thread reads its pair before
    /// writing it).
    pub fn rope_forward_in_place<T: Activation>(
        &self,
        x: &mut impl DeviceWrite<T>,
        cos: &impl DeviceRead<T>,
        sin: &impl DeviceRead<T>,
        n: usize,
        heads: usize,
        hs: usize,
    ) -> Result<()> {
        let op = "rope_forward_in_place";
        let x = &mut checked_view_mut(op, "x", x, n * heads * hs)?;
        let (cos, sin, shape) = rope_checks(op, cos, sin, (n, heads, hs))?;
        if x.is_empty() {
            return Ok(());
        }
        let kernel = self.kernel(op, "rope", &typed::<T>(op), shape)?;
        let dims = rope_dims(op, (n, heads, hs))?;
        let mut args = kernel.args();
        args.arg(x).arg(&cos).arg(&sin);
        for d in &dims {
            args.arg(d);
        }
        unsafe { kernel.launch(args) }
    }

    /// dinp[n, heads*hs] += the inverse rotation of dout [n, heads*hs]:
    /// dinp[i] += d1 cos_i + d2 sin_i, dinp[i + hs/2] += d2 cos_i - d1 sin_i.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_backward<T: Activation>(
        &self,
        dinp: &mut impl DeviceWrite<T>,
        dout: &impl DeviceRead<T>,
        cos: &impl DeviceRead<T>,
        sin: &impl DeviceRead<T>,
        n: usize,
        heads: usize,
        hs: usize,
    ) -> Result<()> {
        let op = "rope_backward";
        let dinp = &mut checked_view_mut(op, "dinp", dinp, n * heads * hs)?;
        let dout = &checked_view(op, "dout", dout, n * heads * hs)?;
        self.rope_launch(op, dinp, dout, cos, sin, (n, heads, hs))
    }

    /// rope_forward and rope_backward take (written, read, cos, sin, n, heads, hs), one
    /// thread per pair.
    fn rope_launch<T: Activation>(
        &self,
        op: &str,
        written: &mut CudaViewMut<'_, T>,
        read: &CudaView<'_, T>,
        cos: &impl DeviceRead<T>,
        sin: &impl DeviceRead<T>,
        shapes: (usize, usize, usize),
    ) -> Result<()> {
        let (cos, sin, shape) = rope_checks(op, cos, sin, shapes)?;
        if written.is_empty() {
            return Ok(());
        }
        let kernel = self.kernel(op, "rope", &typed::<T>(op), shape)?;
        let dims = rope_dims(op, shapes)?;
        let mut args = kernel.args();
        args.arg(written).arg(read).arg(&cos).arg(&sin);
        for d in &dims {
            args.arg(d);
        }
        unsafe { kernel.launch(args) }
    }

    /// Causal attention with grouped-query heads (the CPU's `causal_attention_forward`,
    /// its dropout mask bit for bit), flash-style: out [b, t, nh*hs] from q [b, t, nh*hs], k, v
    /// [b, t, nkv*hs] (query head h reads key/value head h / (nh/nkv)), mask [b, t]
    /// (1 = real token) and the optional shared prefix; lse [b, nh, t] (fp32) saves
    /// log Σ_j exp(s_ij) over each query row's allowed keys (+inf for a row with none,
    /// whose output is 0). hs <= 128; nkv divides nh. Runs the kernels the model runs,
    /// `CausalKernels::for_shape` (tensor cores for bf16 where hs is a multiple of 16).
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        lse: &mut impl DeviceWrite<f32>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        mask: &impl DeviceRead<u8>,
        prefix: Option<&CausalPrefix<'_, T>>,
        dims: (usize, usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let kernels = CausalKernels::for_shape::<T>(dims.4);
        self.causal_attention_forward_with(out, lse, q, k, v, mask, prefix, dims, dropout, kernels)
    }

    /// causal_attention_forward by the given kernels, with dropout on the probabilities: the
    /// weight that multiplies v is p · keep / (1 - p), keep the CPU's `AttentionDropout`
    /// mask over its probs [b, nh, t, prefix len + t], bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention_forward_with<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        lse: &mut impl DeviceWrite<f32>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        mask: &impl DeviceRead<u8>,
        prefix: Option<&CausalPrefix<'_, T>>,
        (b, t, nh, nkv, hs): (usize, usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
        kernels: CausalKernels,
    ) -> Result<()> {
        let op = "causal_attention_forward";
        kernels.check::<T>(op, hs)?;
        let scalars = CausalArgs::new(op, (b, t, nh, nkv, hs), prefix, dropout)?;
        let out = &mut checked_view_mut(op, "out", out, b * t * nh * hs)?;
        let lse = &mut checked_view_mut(op, "lse", lse, b * nh * t)?;
        let q = &checked_view(op, "q", q, b * t * nh * hs)?;
        let k = &checked_view(op, "k", k, b * t * nkv * hs)?;
        let v = &checked_view(op, "v", v, b * t * nkv * hs)?;
        let mask = &checked_view(op, "mask", mask, b * t)?;
        if lse.is_empty() || hs == 0 {
            return Ok(());
        }
        let shape = match kernels {
            CausalKernels::CudaCores => launch::causal_forward(op, t, b * nh, hs)?,
            CausalKernels::TensorCores => launch::causal_tc_forward(op, t, b * nh, hs)?,
        };
        let name = causal_kernel::<T>(kernels, "forward");
        let kernel = self.kernel(op, "attention_causal", &name, shape)?;
        let mut args = kernel.args();
        args.arg(out).arg(lse).arg(q).arg(k).arg(v).arg(mask);
        push_prefix(&mut args, prefix);
        scalars.push(&mut args);
        unsafe { kernel.launch(args) }
    }

    /// dq [b, t, nh*hs], dk, dv [b, t, nkv*hs] (and the prefix's dk, dv [prompts, len,
    /// nkv*hs]) += the gradients of causal_attention_forward given dout, its output `out`
    /// (unchanged since), its lse and the same mask and prefix. row_dot [b, nh, t] is
    /// scratch (overwritten). Launches, no atomics (the same bits every run): row_dot =
    /// dout · out per query row; dk, dv per key tile and key/value head, summing the
    /// group's query heads in order; with a prefix, the prefix's dk, dv per key tile,
    /// prompt and key/value head, summing the sequences that continue the prompt in batch
    /// order; dq per query tile. The kernels of `CausalKernels::for_shape`, as the forward.
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention_backward<T: Activation>(
        &self,
        dq: &mut impl DeviceWrite<T>,
        dk: &mut impl DeviceWrite<T>,
        dv: &mut impl DeviceWrite<T>,
        dprefix: Option<CausalPrefixGrads<'_, T>>,
        row_dot: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        out: &impl DeviceRead<T>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        lse: &impl DeviceRead<f32>,
        mask: &impl DeviceRead<u8>,
        prefix: Option<&CausalPrefix<'_, T>>,
        dims: (usize, usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let kernels = CausalKernels::for_shape::<T>(dims.4);
        self.causal_attention_backward_with(
            dq, dk, dv, dprefix, row_dot, dout, out, q, k, v, lse, mask, prefix, dims, dropout,
            kernels,
        )
    }

    /// causal_attention_backward by the given kernels, with the forward's dropout.
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention_backward_with<T: Activation>(
        &self,
        dq: &mut impl DeviceWrite<T>,
        dk: &mut impl DeviceWrite<T>,
        dv: &mut impl DeviceWrite<T>,
        dprefix: Option<CausalPrefixGrads<'_, T>>,
        row_dot: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        out: &impl DeviceRead<T>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        lse: &impl DeviceRead<f32>,
        mask: &impl DeviceRead<u8>,
        prefix: Option<&CausalPrefix<'_, T>>,
        (b, t, nh, nkv, hs): (usize, usize, usize, usize, usize),
        dropout: Option<AttentionDropout>,
        kernels: CausalKernels,
    ) -> Result<()> {
        let op = "causal_attention_backward";
        kernels.check::<T>(op, hs)?;
        let scalars = CausalArgs::new(op, (b, t, nh, nkv, hs), prefix, dropout)?;
        let (q_len, kv_len) = (b * t * nh * hs, b * t * nkv * hs);
        let dq = &mut checked_view_mut(op, "dq", dq, q_len)?;
        let dk = &mut checked_view_mut(op, "dk", dk, kv_len)?;
        let dv = &mut checked_view_mut(op, "dv", dv, kv_len)?;
        let row_dot = &mut checked_view_mut(op, "row_dot", row_dot, b * nh * t)?;
        let dout = &checked_view(op, "dout", dout, q_len)?;
        let out = &checked_view(op, "out", out, q_len)?;
        let q = &checked_view(op, "q", q, q_len)?;
        let k = &checked_view(op, "k", k, kv_len)?;
        let v = &checked_view(op, "v", v, kv_len)?;
        let lse = &checked_view(op, "lse", lse, b * nh * t)?;
        let mask = &checked_view(op, "mask", mask, b * t)?;
        let mut dprefix = match (prefix, dprefix) {
            (Some(p), Some(d)) => {
                let kv = p.prompts * p.len * nkv * hs;
                check_len(op, "prefix dk", d.dk.len(), kv)?;
                check_len(op, "prefix dv", d.dv.len(), kv)?;
                Some(d)
            }
            (None, None) => None,
            _ => {
                return Err(Error::internal(format!(
                    "{op}: a prefix needs its gradients and gradients need a prefix"
                )));
            }
        };
        if lse.is_empty() || hs == 0 {
            return Ok(());
        }
        let (key_shape, query_shape) = match kernels {
            CausalKernels::CudaCores => (
                launch::causal_backward(op, t, b * nkv, hs)?,
                launch::causal_backward(op, t, b * nh, hs)?,
            ),
            CausalKernels::TensorCores => (
                launch::causal_tc_backward_key(op, t, b * nkv, hs)?,
                launch::causal_tc_backward_query(op, t, b * nh, hs)?,
            ),
        };
        let (b_i, t_i, nh_i, hs_i) = (
            dim(op, "b", b)?,
            dim(op, "t", t)?,
            dim(op, "nh", nh)?,
            dim(op, "hs", hs)?,
        );
        // The row dots are the same pass for both versions.
        let dot = self.kernel(
            op,
            "attention_causal",
            &typed::<T>("causal_attention_backward_dot"),
            ops_launch::warp_rows(op, b * nh * t)?,
        )?;
        let mut args = dot.args();
        args.arg(&mut *row_dot)
            .arg(dout)
            .arg(out)
            .arg(&b_i)
            .arg(&t_i)
            .arg(&nh_i)
            .arg(&hs_i);
        unsafe { dot.launch(args) }?;
        let row_dot = &row_dot.as_view();

        let key_name = causal_kernel::<T>(kernels, "backward_key");
        let key = self.kernel(op, "attention_causal", &key_name, key_shape)?;
        let mut args = key.args();
        args.arg(dk).arg(dv).arg(dout).arg(q).arg(k).arg(v);
        args.arg(lse).arg(row_dot).arg(mask);
        scalars.push(&mut args);
        unsafe { key.launch(args) }?;

        if let (Some(p), Some(d)) = (prefix, dprefix.as_mut())
            && p.len > 0
            && p.prompts > 0
        {
            let shape = match kernels {
                CausalKernels::CudaCores => {
                    launch::causal_backward(op, p.len, p.prompts * nkv, hs)?
                }
                CausalKernels::TensorCores => {
                    launch::causal_tc_backward_key(op, p.len, p.prompts * nkv, hs)?
                }
            };
            let name = causal_kernel::<T>(kernels, "backward_prefix_key");
            let prefix_key = self.kernel(op, "attention_causal", &name, shape)?;
            let mut args = prefix_key.args();
            args.arg(&mut d.dk).arg(&mut d.dv).arg(dout).arg(q);
            args.arg(&p.k).arg(&p.v).arg(&p.mask).arg(&p.of_sequence);
            args.arg(lse).arg(row_dot);
            scalars.push(&mut args);
            unsafe { prefix_key.launch(args) }?;
        }

        let query_name = causal_kernel::<T>(kernels, "backward_query");
        let query = self.kernel(op, "attention_causal", &query_name, query_shape)?;
        let mut args = query.args();
        args.arg(dq).arg(dout).arg(q).arg(k).arg(v);
        args.arg(lse).arg(row_dot).arg(mask);
        push_prefix(&mut args, prefix);
        scalars.push(&mut args);
        unsafe { query.launch(args) }
    }
}
