//! Launch wrappers of DeBERTa's disentangled attention kernels
//! (kernels/disentangled_attention.cu), methods of `CudaRuntime` as ops.rs's are, each
//! mirroring its CPU twin in src/backend/cpu/disentangled_attention.rs: forward outputs are
//! overwritten, backward gradients are ADDED to. Activations (q, k, v, the products c2p and
//! p2c, the projected positions) are `T: Activation` (f32 or bf16); what the attention saves
//! (lse, the fp32 copy of its output) and the backward's row dots are fp32. Every length,
//! and every entry of the relative-position map, is checked before a launch, so a wrong
//! call is an error, never a wild access.

use cudarc::driver::{CudaView, CudaViewMut, LaunchArgs, PushKernelArg};

use super::ops::{checked_view, checked_view_mut, launch as ops_launch, typed};
use super::runtime::{Activation, CudaRuntime, DeviceRead, DeviceWrite, check_len, dim};
use crate::backend::cpu::AttentionDropout;
use crate::error::{Error, Result};

/// The launch shapes of the kernels, pure functions of the tensor shapes (no device needed,
/// so the CPU emulation runs the very grids a GPU gets). The constants restate
/// kernels/disentangled_attention.cu's.
pub mod launch {
    use crate::backend::cuda::launch::{LaunchShape, MAX_SHARED_BYTES};
    use crate::backend::cuda::runtime::blocks;
    use crate::error::{Error, Result};

    /// The position products' output tile (PRODUCT_TILE x PRODUCT_TILE, one thread each).
    pub const PRODUCT_TILE: usize = 16;
    pub const PRODUCT_THREADS: usize = PRODUCT_TILE * PRODUCT_TILE;
    /// The attention's own rows per block (4 warps of 4), streamed tile rows, threads per
    /// block and largest head size.
    pub const ROWS: usize = 16;
    pub const TILE: usize = 32;
    pub const THREADS: usize = 128;
    pub const MAX_HEAD: usize = 128;

    /// A grid axis of `items` in tiles of `tile`, within the y/z limit of 65535.
    fn axis(op: &str, what: &str, items: usize, tile: usize) -> Result<u32> {
        let n = blocks(op, items.max(1), tile)?;
        if n > 65535 {
            return Err(Error::internal(format!(
                "{op}: {n} blocks of {what} along a grid axis, the limit is 65535"
            )));
        }
        Ok(n)
    }

    fn products(grid: (u32, u32, u32)) -> LaunchShape {
        LaunchShape {
            grid,
            block: PRODUCT_THREADS as u32,
            shared_bytes: 0,
        }
    }

    /// position_products_forward: grid (position-row tiles, query tiles, b*nh).
    pub fn products_forward(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        rows: usize,
    ) -> Result<LaunchShape> {
        Ok(products((
            blocks(op, rows.max(1), PRODUCT_TILE)?,
            axis(op, "tokens", t, PRODUCT_TILE)?,
            axis(op, "heads", b * nh, 1)?,
        )))
    }

    /// position_products_backward_x: grid (head-channel tiles, query tiles, b*nh).
    pub fn products_backward_x(
        op: &str,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<LaunchShape> {
        Ok(products((
            blocks(op, hs.max(1), PRODUCT_TILE)?,
            axis(op, "tokens", t, PRODUCT_TILE)?,
            axis(op, "heads", b * nh, 1)?,
        )))
    }

    /// position_products_backward_pos: grid (head-channel tiles, position-row tiles, nh).
    pub fn products_backward_pos(
        op: &str,
        nh: usize,
        hs: usize,
        rows: usize,
    ) -> Result<LaunchShape> {
        Ok(products((
            blocks(op, hs.max(1), PRODUCT_TILE)?,
            axis(op, "position rows", rows, PRODUCT_TILE)?,
            axis(op, "heads", nh, 1)?,
        )))
    }

    /// disentangled_attention_forward: grid (query tiles of ROWS, b*nh); shared: own
    /// queries [ROWS, hs], keys [TILE, hs|1], values [TILE, hs], fp32.
    pub fn attention_forward(op: &str, t: usize, heads: usize, hs: usize) -> Result<LaunchShape> {
        let floats = ROWS * hs + TILE * (hs | 1) + TILE * hs;
        attention_shape(op, t, heads, hs, floats, 0)
    }

    /// disentangled_attention_backward_key (grid over key tiles) and _query (over query
    /// tiles): (tiles of ROWS, b*nh); shared: two own tiles [ROWS, hs], two streamed tiles
    /// [TILE, hs|1] and, when the kernel scatters a position term (`accumulates`), its
    /// own rows' gradient [ROWS, rows], fp32. Too many position rows for the shared memory
    /// is a user error: the config's relative span does not fit the device kernels.
    pub fn attention_backward(
        op: &str,
        t: usize,
        heads: usize,
        hs: usize,
        rows: usize,
        accumulates: bool,
    ) -> Result<LaunchShape> {
        let floats = 2 * ROWS * hs + 2 * TILE * (hs | 1);
        let accumulator = if accumulates { ROWS * rows } else { 0 };
        attention_shape(op, t, heads, hs, floats, accumulator)
    }

    fn attention_shape(
        op: &str,
        t: usize,
        heads: usize,
        hs: usize,
        floats: usize,
        accumulator: usize,
    ) -> Result<LaunchShape> {
        if hs == 0 || hs > MAX_HEAD {
            return Err(Error::internal(format!(
                "{op}: head size {hs} is outside 1..={MAX_HEAD}"
            )));
        }
        let bytes = (floats + accumulator) * std::mem::size_of::<f32>();
        if bytes > MAX_SHARED_BYTES as usize {
            return Err(Error::user(format!(
                "{op}: {} relative position rows at head size {hs} need {bytes} bytes of \
                 shared memory, over the kernels' {MAX_SHARED_BYTES}; use fewer \
                 position_buckets (or max_relative_positions) or device: cpu",
                accumulator / ROWS
            )));
        }
        Ok(LaunchShape {
            grid: (blocks(op, t.max(1), ROWS)?, axis(op, "heads", heads, 1)?, 1),
            block: THREADS as u32,
            shared_bytes: bytes as u32,
        })
    }
}

/// The position terms of a disentangled attention on the device (the CPU's
/// `PositionTerms`): c2p and p2c [b, nh, t, rows] (device buffers `R` of the activation
/// type) where the model has them, and the relative-position map r [t, t] on the host
/// (checked below rows, then uploaded).
#[derive(Debug)]
pub struct DevicePositionTerms<'a, R> {
    pub c2p: Option<&'a R>,
    pub p2c: Option<&'a R>,
    pub relative: &'a [u32],
    /// 2S: the number of position rows.
    pub rows: usize,
}

/// The products' gradients, [b, nh, t, rows] each, present exactly where the terms are.
#[derive(Debug)]
pub struct DevicePositionGrads<'a, T> {
    pub dc2p: Option<CudaViewMut<'a, T>>,
    pub dp2c: Option<CudaViewMut<'a, T>>,
}

/// A null device pointer: an absent term (the kernels test for it).
const NULL: u64 = 0;

/// The scalar arguments the attention kernels end with after the terms and the mask: t,
/// nh, hs, scale and the dropout's (drop_p, drop_scale, seed), p = 0 without dropout.
struct AttentionScalars {
    rows: i32,
    dims: [i32; 3],
    scale: f32,
    drop_p: f64,
    drop_scale: f32,
    seed: u64,
}

impl AttentionScalars {
    fn new(
        op: &str,
        (t, nh, hs): (usize, usize, usize),
        rows: usize,
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<AttentionScalars> {
        let (drop_p, drop_scale, seed) = match dropout {
            None => (0.0, 1.0, 0),
            // 1 / (1 - p) rounded to fp32, as the CPU's f32 ops and kernels/attention.cu.
            Some(d) if (0.0..1.0).contains(&d.p) => (d.p, (1.0 / (1.0 - d.p)) as f32, d.seed),
            Some(d) => {
                return Err(Error::internal(format!(
                    "{op}: dropout p = {} is not in [0, 1)",
                    d.p
                )));
            }
        };
        Ok(AttentionScalars {
            rows: dim(op, "rows", rows)?,
            dims: [dim(op, "t", t)?, dim(op, "nh", nh)?, dim(op, "hs", hs)?],
            scale: scale as f32,
            drop_p,
            drop_scale,
            seed,
        })
    }
}

/// The terms' views checked against the shapes and the map uploaded: what the attention
/// kernels read.
struct CheckedTerms<'a, T> {
    c2p: Option<CudaView<'a, T>>,
    p2c: Option<CudaView<'a, T>>,
    relative: Option<cudarc::driver::CudaSlice<u32>>,
}

impl<'a, T> CheckedTerms<'a, T> {
    fn new<R: DeviceRead<T>>(
        rt: &CudaRuntime,
        op: &str,
        terms: DevicePositionTerms<'a, R>,
        (b, t, nh): (usize, usize, usize),
    ) -> Result<CheckedTerms<'a, T>> {
        let products = b * nh * t * terms.rows;
        let view = |name, term: Option<&'a R>| {
            term.map(|r| checked_view(op, name, r, products))
                .transpose()
        };
        let (c2p, p2c) = (view("c2p", terms.c2p)?, view("p2c", terms.p2c)?);
        if c2p.is_none() && p2c.is_none() {
            return Ok(CheckedTerms {
                c2p: None,
                p2c: None,
                relative: None,
            });
        }
        check_len(op, "relative", terms.relative.len(), t * t)?;
        if let Some(bad) = terms.relative.iter().find(|&&r| r as usize >= terms.rows) {
            return Err(Error::internal(format!(
                "{op}: relative position {bad} is past the {} position rows",
                terms.rows
            )));
        }
        Ok(CheckedTerms {
            c2p,
            p2c,
            relative: Some(rt.upload(terms.relative)?),
        })
    }

    /// Pushes c2p, p2c, relative (null where absent).
    fn push<'b>(&'b self, args: &mut LaunchArgs<'b>) {
        match &self.c2p {
            Some(v) => args.arg(v),
            None => args.arg(&NULL),
        };
        match &self.p2c {
            Some(v) => args.arg(v),
            None => args.arg(&NULL),
        };
        match &self.relative {
            Some(r) => args.arg(r),
            None => args.arg(&NULL),
        };
    }
}

/// Pushes rows, mask, t, nh, hs, scale, drop_p, drop_scale, seed (after the terms).
fn push_tail<'b>(args: &mut LaunchArgs<'b>, s: &'b AttentionScalars, mask: &'b CudaView<'_, u8>) {
    args.arg(&s.rows).arg(mask);
    for d in &s.dims {
        args.arg(d);
    }
    args.arg(&s.scale)
        .arg(&s.drop_p)
        .arg(&s.drop_scale)
        .arg(&s.seed);
}

impl CudaRuntime {
    /// out [b, nh, t, rows] = per head, x [b, t, nh*hs] times posᵀ, pos [rows, nh*hs]
    /// (the CPU's `position_products_forward`), fp32 accumulation.
    pub fn position_products_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        x: &impl DeviceRead<T>,
        pos: &impl DeviceRead<T>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        rows: usize,
    ) -> Result<()> {
        let op = "position_products_forward";
        let out = &mut checked_view_mut(op, "out", out, b * nh * t * rows)?;
        let x = &checked_view(op, "x", x, b * t * nh * hs)?;
        let pos = &checked_view(op, "pos", pos, rows * nh * hs)?;
        if out.is_empty() {
            return Ok(());
        }
        let shape = launch::products_forward(op, b, t, nh, rows)?;
        let kernel = self.kernel(op, "disentangled_attention", &typed::<T>(op), shape)?;
        let dims = [
            dim(op, "t", t)?,
            dim(op, "nh", nh)?,
            dim(op, "hs", hs)?,
            dim(op, "rows", rows)?,
        ];
        let mut args = kernel.args();
        args.arg(out).arg(x).arg(pos);
        for d in &dims {
            args.arg(d);
        }
        unsafe { kernel.launch(args) }
    }

    /// dx [b, t, nh*hs] += dout · pos and dpos [rows, nh*hs] += Σ_b doutᵀ · x, per head (the
    /// CPU's `position_products_backward`). Two launches; every element is summed by one
    /// thread in a fixed order (dpos over the sequences, then the tokens): deterministic.
    #[allow(clippy::too_many_arguments)]
    pub fn position_products_backward<T: Activation>(
        &self,
        dx: &mut impl DeviceWrite<T>,
        dpos: &mut impl DeviceWrite<T>,
        dout: &impl DeviceRead<T>,
        x: &impl DeviceRead<T>,
        pos: &impl DeviceRead<T>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        rows: usize,
    ) -> Result<()> {
        let op = "position_products_backward";
        let dx = &mut checked_view_mut(op, "dx", dx, b * t * nh * hs)?;
        let dpos = &mut checked_view_mut(op, "dpos", dpos, rows * nh * hs)?;
        let dout = &checked_view(op, "dout", dout, b * nh * t * rows)?;
        let x = &checked_view(op, "x", x, b * t * nh * hs)?;
        let pos = &checked_view(op, "pos", pos, rows * nh * hs)?;
        if dout.is_empty() || hs == 0 {
            return Ok(());
        }
        let (b_i, t_i, nh_i, hs_i, rows_i) = (
            dim(op, "b", b)?,
            dim(op, "t", t)?,
            dim(op, "nh", nh)?,
            dim(op, "hs", hs)?,
            dim(op, "rows", rows)?,
        );
        let name = typed::<T>("position_products_backward_x");
        let shape = launch::products_backward_x(op, b, t, nh, hs)?;
        let kernel = self.kernel(op, "disentangled_attention", &name, shape)?;
        let mut args = kernel.args();
        args.arg(dx).arg(dout).arg(pos);
        args.arg(&t_i).arg(&nh_i).arg(&hs_i).arg(&rows_i);
        unsafe { kernel.launch(args) }?;

        let name = typed::<T>("position_products_backward_pos");
        let shape = launch::products_backward_pos(op, nh, hs, rows)?;
        let kernel = self.kernel(op, "disentangled_attention", &name, shape)?;
        let mut args = kernel.args();
        args.arg(dpos).arg(dout).arg(x);
        args.arg(&b_i).arg(&t_i).arg(&nh_i).arg(&hs_i).arg(&rows_i);
        unsafe { kernel.launch(args) }
    }

    /// The disentangled attention (the CPU's `disentangled_attention_forward`), flash-style:
    /// out [b, t, nh*hs] = dropout(softmax(scale · (q kᵀ + c2p[i, r_ij] + p2c[j, r_ij]),
    /// padded keys masked)) · v per head, without the [b, nh, t, t] probabilities: lse
    /// [b, nh, t] saves log Σ_j exp(s_ij) per query row and out32 [b, t, nh*hs] the output
    /// in fp32, both for the backward. hs <= 128.
    #[allow(clippy::too_many_arguments)]
    pub fn disentangled_attention_forward<T: Activation>(
        &self,
        out: &mut impl DeviceWrite<T>,
        out32: &mut impl DeviceWrite<f32>,
        lse: &mut impl DeviceWrite<f32>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        terms: DevicePositionTerms<'_, impl DeviceRead<T>>,
        mask: &impl DeviceRead<u8>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let op = "disentangled_attention_forward";
        let act = b * t * nh * hs;
        let out = &mut checked_view_mut(op, "out", out, act)?;
        let out32 = &mut checked_view_mut(op, "out32", out32, act)?;
        let lse = &mut checked_view_mut(op, "lse", lse, b * nh * t)?;
        let q = &checked_view(op, "q", q, act)?;
        let k = &checked_view(op, "k", k, act)?;
        let v = &checked_view(op, "v", v, act)?;
        let mask = &checked_view(op, "mask", mask, b * t)?;
        let rows = terms.rows;
        let terms = CheckedTerms::new(self, op, terms, (b, t, nh))?;
        if lse.is_empty() || hs == 0 {
            return Ok(());
        }
        let shape = launch::attention_forward(op, t, b * nh, hs)?;
        let kernel = self.kernel(op, "disentangled_attention", &typed::<T>(op), shape)?;
        let scalars = AttentionScalars::new(op, (t, nh, hs), rows, scale, dropout)?;
        let mut args = kernel.args();
        args.arg(out).arg(out32).arg(lse).arg(q).arg(k).arg(v);
        terms.push(&mut args);
        push_tail(&mut args, &scalars, mask);
        unsafe { kernel.launch(args) }
    }

    /// dq, dk, dv [b, t, nh*hs] and the products' gradients += the gradients of
    /// disentangled_attention_forward given dout, its out32 and lse and the same terms, mask,
    /// scale and dropout. row_dot [b, nh, t] is scratch (overwritten). Three launches, no
    /// atomics (the same bits every run): row_dot = dout · out32 per query row; dk, dv and
    /// dp2c per key tile; dq and dc2p per query tile (each block owns its rows of the
    /// products' gradients, kernels/disentangled_attention.cu says how).
    #[allow(clippy::too_many_arguments)]
    pub fn disentangled_attention_backward<T: Activation>(
        &self,
        dq: &mut impl DeviceWrite<T>,
        dk: &mut impl DeviceWrite<T>,
        dv: &mut impl DeviceWrite<T>,
        grads: DevicePositionGrads<'_, T>,
        row_dot: &mut impl DeviceWrite<f32>,
        dout: &impl DeviceRead<T>,
        out32: &impl DeviceRead<f32>,
        q: &impl DeviceRead<T>,
        k: &impl DeviceRead<T>,
        v: &impl DeviceRead<T>,
        terms: DevicePositionTerms<'_, impl DeviceRead<T>>,
        lse: &impl DeviceRead<f32>,
        mask: &impl DeviceRead<u8>,
        (b, t, nh, hs): (usize, usize, usize, usize),
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let op = "disentangled_attention_backward";
        let act = b * t * nh * hs;
        let dq = &mut checked_view_mut(op, "dq", dq, act)?;
        let dk = &mut checked_view_mut(op, "dk", dk, act)?;
        let dv = &mut checked_view_mut(op, "dv", dv, act)?;
        let row_dot = &mut checked_view_mut(op, "row_dot", row_dot, b * nh * t)?;
        let dout = &checked_view(op, "dout", dout, act)?;
        let out32 = &checked_view(op, "out32", out32, act)?;
        let q = &checked_view(op, "q", q, act)?;
        let k = &checked_view(op, "k", k, act)?;
        let v = &checked_view(op, "v", v, act)?;
        let lse = &checked_view(op, "lse", lse, b * nh * t)?;
        let mask = &checked_view(op, "mask", mask, b * t)?;
        let rows = terms.rows;
        let DevicePositionGrads { dc2p, dp2c } = grads;
        if dc2p.is_some() != terms.c2p.is_some() || dp2c.is_some() != terms.p2c.is_some() {
            return Err(Error::internal(format!(
                "{op}: the products' gradients must be present exactly where the terms are"
            )));
        }
        let products = b * nh * t * rows;
        let mut dc2p = dc2p;
        let mut dp2c = dp2c;
        for (name, grad) in [("dc2p", &dc2p), ("dp2c", &dp2c)] {
            if let Some(grad) = grad {
                check_len(op, name, grad.len(), products)?;
            }
        }
        let terms = CheckedTerms::new(self, op, terms, (b, t, nh))?;
        if lse.is_empty() || hs == 0 {
            return Ok(());
        }
        let key_shape = launch::attention_backward(op, t, b * nh, hs, rows, dp2c.is_some())?;
        let query_shape = launch::attention_backward(op, t, b * nh, hs, rows, dc2p.is_some())?;
        let scalars = AttentionScalars::new(op, (t, nh, hs), rows, scale, dropout)?;

        let dot = self.kernel(
            op,
            "disentangled_attention",
            &typed::<T>("disentangled_attention_backward_dot"),
            ops_launch::warp_rows(op, b * nh * t)?,
        )?;
        let b_i = dim(op, "b", b)?;
        let mut args = dot.args();
        args.arg(&mut *row_dot).arg(dout).arg(out32).arg(&b_i);
        for d in &scalars.dims {
            args.arg(d);
        }
        unsafe { dot.launch(args) }?;
        let row_dot = &row_dot.as_view();

        let key = self.kernel(
            op,
            "disentangled_attention",
            &typed::<T>("disentangled_attention_backward_key"),
            key_shape,
        )?;
        let mut args = key.args();
        args.arg(dk).arg(dv);
        push_grad(&mut args, &mut dp2c);
        args.arg(dout).arg(q).arg(k).arg(v).arg(lse).arg(row_dot);
        terms.push(&mut args);
        push_tail(&mut args, &scalars, mask);
        unsafe { key.launch(args) }?;

        let query = self.kernel(
            op,
            "disentangled_attention",
            &typed::<T>("disentangled_attention_backward_query"),
            query_shape,
        )?;
        let mut args = query.args();
        args.arg(dq);
        push_grad(&mut args, &mut dc2p);
        args.arg(dout).arg(q).arg(k).arg(v).arg(lse).arg(row_dot);
        terms.push(&mut args);
        push_tail(&mut args, &scalars, mask);
        unsafe { query.launch(args) }
    }
}

/// Pushes a product's gradient, or null where the term is absent.
fn push_grad<'b, T>(args: &mut LaunchArgs<'b>, grad: &'b mut Option<CudaViewMut<'_, T>>) {
    match grad {
        Some(g) => args.arg(g),
        None => args.arg(&NULL),
    };
}
