//! `Cpu`: the `Backend` over host memory. Each arena is a `Vec<F>`; an op borrows the
//! parts its buffers name (checked disjoint where written) and runs the op of its file.

use std::marker::PhantomData;
use std::ops::Range;

use super::*;
use crate::backend::arena::{Loans, check_bounds};
use crate::backend::{
    Arena, AttentionDims, Backend, Batch, Buf, CausalDims, OptimStep, PositionBufs, SharedPrefix,
};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::loss::{LossExtras, LossSpec, PromptType, ranking_loss_forward_backward_with};

/// The host backend in F (f32 to train, f64 for the gradient checks). The gradient and
/// moment arenas are allocated by `start_training`: scoring needs neither.
pub struct Cpu<F> {
    params: Vec<F>, // [parameters]
    grads: Vec<F>,  // [parameters] once training
    m: Vec<F>,      // [parameters] AdamW first moment, once training
    v: Vec<F>,      // [parameters] AdamW second moment, once training
    acts: Vec<F>,   // activations and backward scratch, grown to the largest batch
    stats: Vec<F>,  // the fp32 part of the activations (F here), grown likewise
}

impl<F: Float> Cpu<F> {
    /// A backend holding `params` (moved in, not copied).
    pub fn new(params: Vec<F>) -> Cpu<F> {
        Cpu {
            params,
            grads: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            acts: Vec::new(),
            stats: Vec::new(),
        }
    }

    /// The parameter arena, for the gradient checks' perturbations.
    pub fn params_mut(&mut self) -> &mut [F] {
        &mut self.params
    }

    pub fn params(&self) -> &[F] {
        &self.params
    }

    /// The gradient arena (empty before `start_training`).
    pub fn grads(&self) -> &[F] {
        &self.grads
    }

    /// Bytes held by the activation arenas.
    pub fn activation_bytes(&self) -> usize {
        (self.acts.len() + self.stats.len()) * std::mem::size_of::<F>()
    }

    fn lend(&mut self) -> Lend<'_, F> {
        let arena = |v: &mut Vec<F>| (v.as_mut_ptr(), v.len());
        Lend {
            arenas: [
                arena(&mut self.params),
                arena(&mut self.grads),
                arena(&mut self.acts),
                arena(&mut self.stats),
            ],
            loans: Loans::default(),
            _borrow: PhantomData,
        }
    }

    fn arena(&self, arena: Arena) -> &[F] {
        match arena {
            Arena::Params => &self.params,
            Arena::Grads => &self.grads,
            Arena::Acts => &self.acts,
            Arena::Stats => &self.stats,
        }
    }

    fn read(&self, buf: Buf) -> Result<Vec<F>> {
        let arena = self.arena(buf.arena);
        check_bounds(buf, arena.len())?;
        Ok(arena[buf.range()].to_vec())
    }
}

/// Disjoint parts of the arenas, lent for one op. Holds the backend mutably borrowed, so
/// nothing else touches the arenas while its slices live.
struct Lend<'a, F> {
    arenas: [(*mut F, usize); 4], // params, grads, acts, stats: base and length
    loans: Loans,
    _borrow: PhantomData<&'a mut Cpu<F>>,
}

impl<'a, F> Lend<'a, F> {
    fn base(&self, buf: Buf) -> Result<*mut F> {
        let (base, len) = self.arenas[buf.arena as usize];
        check_bounds(buf, len)?;
        // SAFETY: within the arena's allocation (checked just above).
        Ok(unsafe { base.add(buf.offset) })
    }

    fn r(&mut self, buf: Buf) -> Result<&'a [F]> {
        let ptr = self.base(buf)?;
        self.loans.lend(buf, false)?;
        // SAFETY: in bounds; no part lent for writing overlaps it (Loans), and the arenas
        // stay borrowed for 'a.
        Ok(unsafe { std::slice::from_raw_parts(ptr, buf.len) })
    }

    fn w(&mut self, buf: Buf) -> Result<&'a mut [F]> {
        let ptr = self.base(buf)?;
        self.loans.lend(buf, true)?;
        // SAFETY: in bounds; it overlaps no other part lent by this Lend (Loans).
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, buf.len) })
    }
}

fn grow<F: Float>(arena: &mut Vec<F>, len: usize) {
    if arena.len() < len {
        arena.resize(len, F::ZERO);
    }
}

impl<F: Float> Backend for Cpu<F> {
    type Tokens = Batch;
    type Scalar = F;
    const HOST_RESIDENT: bool = true;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn reserve(&mut self, acts: usize, stats: usize) -> Result<()> {
        grow(&mut self.acts, acts);
        grow(&mut self.stats, stats);
        Ok(())
    }

    fn tokens(&mut self, batch: &Batch, _tables: (usize, usize, usize)) -> Result<Batch> {
        Ok(batch.clone())
    }

    fn zero(&mut self, buf: Buf) -> Result<()> {
        self.lend().w(buf)?.fill(F::ZERO);
        Ok(())
    }

    fn copy(&mut self, dst: Buf, src: Buf) -> Result<()> {
        let mut l = self.lend();
        let (dst, src) = (l.w(dst)?, l.r(src)?);
        if dst.len() != src.len() {
            return Err(Error::internal(format!(
                "copy: {} elements into {}",
                src.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(src);
        Ok(())
    }

    fn read_stats(&self, buf: Buf) -> Result<Vec<F>> {
        self.read(buf)
    }

    fn read_acts(&self, buf: Buf) -> Result<Vec<F>> {
        self.read(buf)
    }

    fn write_stats(&mut self, buf: Buf, values: &[F]) -> Result<()> {
        let out = self.lend().w(buf)?;
        if out.len() != values.len() {
            return Err(Error::internal(format!(
                "write_stats: {} values into {}",
                values.len(),
                out.len()
            )));
        }
        out.copy_from_slice(values);
        Ok(())
    }

    fn embedding_forward(
        &mut self,
        out: Buf,
        tokens: &Batch,
        wte: Buf,
        wpe: Buf,
        wtt: Buf,
        c: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        embedding_forward(
            l.w(out)?,
            &tokens.input_ids,
            &tokens.token_type_ids,
            l.r(wte)?,
            l.r(wpe)?,
            l.r(wtt)?,
            tokens.b,
            tokens.t,
            c,
        );
        Ok(())
    }

    fn embedding_backward(
        &mut self,
        dwte: Buf,
        dwpe: Buf,
        dwtt: Buf,
        dout: Buf,
        tokens: &Batch,
        c: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        embedding_backward(
            l.w(dwte)?,
            l.w(dwpe)?,
            l.w(dwtt)?,
            l.r(dout)?,
            &tokens.input_ids,
            &tokens.token_type_ids,
            tokens.b,
            tokens.t,
            c,
        );
        Ok(())
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
        let mut l = self.lend();
        layernorm_forward(
            l.w(out)?,
            l.w(mean)?,
            l.w(rstd)?,
            l.r(x)?,
            l.r(weight)?,
            l.r(bias)?,
            n,
            c,
            eps,
        );
        Ok(())
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
        let mut l = self.lend();
        let sum = l.w(sum)?;
        residual_forward(sum, l.r(a)?, l.r(b)?);
        layernorm_forward(
            l.w(out)?,
            l.w(mean)?,
            l.w(rstd)?,
            sum,
            l.r(weight)?,
            l.r(bias)?,
            n,
            c,
            eps,
        );
        Ok(())
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
        let mut l = self.lend();
        layernorm_backward(
            l.w(dx)?,
            l.w(dweight)?,
            l.w(dbias)?,
            l.r(dout)?,
            l.r(x)?,
            l.r(weight)?,
            l.r(mean)?,
            l.r(rstd)?,
            n,
            c,
        );
        Ok(())
    }

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
        let mut l = self.lend();
        let bias = bias.map(|b| l.r(b)).transpose()?;
        matmul_forward(l.w(out)?, l.r(x)?, l.r(weight)?, bias, n, c, oc);
        Ok(())
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
        let mut l = self.lend();
        let dbias = dbias.map(|b| l.w(b)).transpose()?;
        matmul_backward(
            l.w(dx)?,
            l.w(dweight)?,
            dbias,
            l.r(dout)?,
            l.r(x)?,
            l.r(weight)?,
            n,
            c,
            oc,
        );
        Ok(())
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
        let mut l = self.lend();
        let pre = l.w(pre)?;
        matmul_forward(pre, l.r(x)?, l.r(weight)?, Some(l.r(bias)?), n, c, oc);
        gelu_forward(l.w(out)?, pre);
        Ok(())
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
        _bias: Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        let dpre = l.w(dpre)?;
        dpre.fill(F::ZERO);
        gelu_backward(dpre, l.r(pre)?, l.r(dout)?);
        matmul_backward(
            l.w(dx)?,
            l.w(dweight)?,
            Some(l.w(dbias)?),
            dpre,
            l.r(x)?,
            l.r(weight)?,
            n,
            c,
            oc,
        );
        Ok(())
    }

    fn tanh_forward(&mut self, out: Buf, x: Buf) -> Result<()> {
        let mut l = self.lend();
        tanh_forward(l.w(out)?, l.r(x)?);
        Ok(())
    }

    fn tanh_backward(&mut self, dx: Buf, out: Buf, dout: Buf) -> Result<()> {
        let mut l = self.lend();
        tanh_backward(l.w(dx)?, l.r(out)?, l.r(dout)?);
        Ok(())
    }

    fn dropout_forward(&mut self, out: Buf, x: Buf, p: f64, seed: u64) -> Result<()> {
        let mut l = self.lend();
        dropout_forward(l.w(out)?, l.r(x)?, p, seed);
        Ok(())
    }

    fn dropout_backward(&mut self, dx: Buf, dout: Buf, p: f64, seed: u64) -> Result<()> {
        let mut l = self.lend();
        dropout_backward(l.w(dx)?, l.r(dout)?, p, seed);
        Ok(())
    }

    /// The probabilities [B, NH, T, T].
    fn attention_saved_len(&self, d: AttentionDims) -> usize {
        d.b * d.nh * d.t * d.t
    }

    fn attention_scratch_len(&self, _dims: AttentionDims) -> usize {
        0
    }

    fn attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        tokens: &Batch,
        d: AttentionDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let mut l = self.lend();
        attention_forward(
            l.w(ctx)?,
            l.w(saved)?,
            l.r(q)?,
            l.r(k)?,
            l.r(v)?,
            &tokens.mask,
            d.b,
            d.t,
            d.nh,
            d.hs,
            dropout,
        );
        Ok(())
    }

    fn attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        _scratch: Buf,
        dctx: Buf,
        _ctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        saved: Buf,
        tokens: &Batch,
        d: AttentionDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let mut l = self.lend();
        attention_backward(
            l.w(dq)?,
            l.w(dk)?,
            l.w(dv)?,
            l.r(dctx)?,
            l.r(q)?,
            l.r(k)?,
            l.r(v)?,
            l.r(saved)?,
            &tokens.mask,
            d.b,
            d.t,
            d.nh,
            d.hs,
            dropout,
        );
        Ok(())
    }

    fn cls_pool_forward(&mut self, out: Buf, x: Buf, b: usize, t: usize, c: usize) -> Result<()> {
        let mut l = self.lend();
        cls_pool_forward(l.w(out)?, l.r(x)?, b, t, c);
        Ok(())
    }

    fn cls_pool_backward(
        &mut self,
        dx: Buf,
        dout: Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        cls_pool_backward(l.w(dx)?, l.r(dout)?, b, t, c);
        Ok(())
    }

    fn token_embedding_forward(
        &mut self,
        out: Buf,
        tokens: &Batch,
        wte: Buf,
        c: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        token_embedding_forward(l.w(out)?, &tokens.input_ids, l.r(wte)?, c);
        Ok(())
    }

    fn token_embedding_backward(
        &mut self,
        dwte: Buf,
        dout: Buf,
        tokens: &Batch,
        c: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        token_embedding_backward(l.w(dwte)?, l.r(dout)?, &tokens.input_ids, c);
        Ok(())
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
        let mut l = self.lend();
        rmsnorm_forward(l.w(out)?, l.w(rstd)?, l.r(x)?, l.r(weight)?, n, c, eps);
        Ok(())
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
        let mut l = self.lend();
        rmsnorm_backward(
            l.w(dx)?,
            l.w(dweight)?,
            l.r(dout)?,
            l.r(x)?,
            l.r(weight)?,
            l.r(rstd)?,
            n,
            c,
        );
        Ok(())
    }

    fn rope_cos_sin(
        &mut self,
        cos: Buf,
        sin: Buf,
        positions: &[u32],
        inv_freq: &[f32],
    ) -> Result<()> {
        let mut l = self.lend();
        rope_cos_sin(l.w(cos)?, l.w(sin)?, positions, inv_freq);
        Ok(())
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
        let mut l = self.lend();
        rope_forward(l.w(out)?, l.r(x)?, l.r(cos)?, l.r(sin)?, n, heads, hs);
        Ok(())
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
        let mut l = self.lend();
        rope_backward(l.w(dx)?, l.r(dout)?, l.r(cos)?, l.r(sin)?, n, heads, hs);
        Ok(())
    }

    fn swiglu_forward(&mut self, out: Buf, gate: Buf, up: Buf) -> Result<()> {
        let mut l = self.lend();
        swiglu_forward(l.w(out)?, l.r(gate)?, l.r(up)?);
        Ok(())
    }

    fn swiglu_backward(
        &mut self,
        dgate: Buf,
        dup: Buf,
        dout: Buf,
        gate: Buf,
        up: Buf,
    ) -> Result<()> {
        let mut l = self.lend();
        swiglu_backward(l.w(dgate)?, l.w(dup)?, l.r(dout)?, l.r(gate)?, l.r(up)?);
        Ok(())
    }

    fn residual_forward(&mut self, out: Buf, a: Buf, b: Buf) -> Result<()> {
        let mut l = self.lend();
        residual_forward(l.w(out)?, l.r(a)?, l.r(b)?);
        Ok(())
    }

    fn residual_backward(&mut self, da: Buf, db: Buf, dout: Buf) -> Result<()> {
        let mut l = self.lend();
        residual_backward(l.w(da)?, l.w(db)?, l.r(dout)?);
        Ok(())
    }

    /// The probabilities [B, NH, T, TP + T].
    fn causal_attention_saved_len(&self, d: CausalDims) -> usize {
        d.b * d.nh * d.t * (d.tp + d.t)
    }

    fn causal_attention_scratch_len(&self, _dims: CausalDims) -> usize {
        0
    }

    fn causal_attention_forward(
        &mut self,
        ctx: Buf,
        saved: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        tokens: &Batch,
        prefix: Option<SharedPrefix<'_, Batch>>,
        d: CausalDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let of_sequence = tokens.of_sequence();
        let mut l = self.lend();
        let prefix = match prefix {
            Some(p) => Some(Prefix {
                k: l.r(p.k)?,
                v: l.r(p.v)?,
                mask: &p.prompts.mask,
                of_sequence: &of_sequence,
                prompts: p.prompts.b,
                len: d.tp,
            }),
            None => None,
        };
        causal_attention_forward(
            l.w(ctx)?,
            l.w(saved)?,
            l.r(q)?,
            l.r(k)?,
            l.r(v)?,
            &tokens.mask,
            prefix,
            d.b,
            d.t,
            d.nh,
            d.nkv,
            d.hs,
            dropout,
        );
        Ok(())
    }

    fn causal_attention_backward(
        &mut self,
        dq: Buf,
        dk: Buf,
        dv: Buf,
        dprefix: Option<(Buf, Buf)>,
        _scratch: Buf,
        dctx: Buf,
        _ctx: Buf,
        q: Buf,
        k: Buf,
        v: Buf,
        saved: Buf,
        tokens: &Batch,
        prefix: Option<SharedPrefix<'_, Batch>>,
        d: CausalDims,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let of_sequence = tokens.of_sequence();
        let mut l = self.lend();
        let (prefix, dprefix) = match (prefix, dprefix) {
            (Some(p), Some((dk, dv))) => (
                Some(Prefix {
                    k: l.r(p.k)?,
                    v: l.r(p.v)?,
                    mask: &p.prompts.mask,
                    of_sequence: &of_sequence,
                    prompts: p.prompts.b,
                    len: d.tp,
                }),
                Some(PrefixGrads {
                    dk: l.w(dk)?,
                    dv: l.w(dv)?,
                }),
            ),
            (None, None) => (None, None),
            _ => {
                return Err(Error::internal(
                    "causal_attention_backward: a prefix needs its gradients, and gradients a prefix",
                ));
            }
        };
        causal_attention_backward(
            l.w(dq)?,
            l.w(dk)?,
            l.w(dv)?,
            dprefix,
            l.r(dctx)?,
            l.r(q)?,
            l.r(k)?,
            l.r(v)?,
            l.r(saved)?,
            &tokens.mask,
            prefix,
            d.b,
            d.t,
            d.nh,
            d.nkv,
            d.hs,
            dropout,
        );
        Ok(())
    }

    fn last_token_pool_forward(
        &mut self,
        out: Buf,
        x: Buf,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        last_token_pool_forward(l.w(out)?, l.r(x)?, rows, t, c);
        Ok(())
    }

    fn last_token_pool_backward(
        &mut self,
        dx: Buf,
        dout: Buf,
        rows: &[u32],
        t: usize,
        c: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        last_token_pool_backward(l.w(dx)?, l.r(dout)?, rows, t, c);
        Ok(())
    }

    fn position_products_forward(
        &mut self,
        out: Buf,
        x: Buf,
        pos: Buf,
        d: AttentionDims,
        rows: usize,
    ) -> Result<()> {
        let mut l = self.lend();
        position_products_forward(l.w(out)?, l.r(x)?, l.r(pos)?, d.b, d.t, d.nh, d.hs, rows);
        Ok(())
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
        let mut l = self.lend();
        position_products_backward(
            l.w(dx)?,
            l.w(dpos)?,
            l.r(dout)?,
            l.r(x)?,
            l.r(pos)?,
            d.b,
            d.t,
            d.nh,
            d.hs,
            rows,
        );
        Ok(())
    }

    fn disentangled_attention_saved_len(&self, d: AttentionDims) -> usize {
        d.b * d.nh * d.t * d.t
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
        tokens: &Batch,
        d: AttentionDims,
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let mut l = self.lend();
        let terms = PositionTerms {
            c2p: terms.c2p.map(|b| l.r(b)).transpose()?,
            p2c: terms.p2c.map(|b| l.r(b)).transpose()?,
            relative,
            rows: terms.rows,
        };
        disentangled_attention_forward(
            l.w(ctx)?,
            l.w(saved)?,
            l.r(q)?,
            l.r(k)?,
            l.r(v)?,
            terms,
            &tokens.mask,
            d.b,
            d.t,
            d.nh,
            d.hs,
            scale,
            dropout,
        );
        Ok(())
    }

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
        tokens: &Batch,
        d: AttentionDims,
        scale: f64,
        dropout: Option<AttentionDropout>,
    ) -> Result<()> {
        let mut l = self.lend();
        let grads = PositionGrads {
            dc2p: dterms.c2p.map(|b| l.w(b)).transpose()?,
            dp2c: dterms.p2c.map(|b| l.w(b)).transpose()?,
        };
        let terms = PositionTerms {
            c2p: terms.c2p.map(|b| l.r(b)).transpose()?,
            p2c: terms.p2c.map(|b| l.r(b)).transpose()?,
            relative,
            rows: terms.rows,
        };
        disentangled_attention_backward(
            l.w(dq)?,
            l.w(dk)?,
            l.w(dv)?,
            grads,
            l.r(dctx)?,
            l.r(q)?,
            l.r(k)?,
            l.r(v)?,
            terms,
            l.r(saved)?,
            &tokens.mask,
            d.b,
            d.t,
            d.nh,
            d.hs,
            scale,
            dropout,
        );
        Ok(())
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
        let mut l = self.lend();
        let dlogits = l.w(dlogits)?;
        let logits = l.r(logits)?;
        let loss =
            ranking_loss_forward_backward_with(logits, ks, types, spec, eps, extras, dlogits)?;
        let divisor = F::from_f64(divisor as f64);
        for d in dlogits.iter_mut() {
            *d /= divisor;
        }
        Ok(loss.to_f64())
    }

    fn start_training(&mut self) -> Result<()> {
        for arena in [&mut self.grads, &mut self.m, &mut self.v] {
            grow(arena, self.params.len());
        }
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.grads.fill(F::ZERO);
        Ok(())
    }

    fn grad_norm(&mut self) -> Result<f64> {
        Ok(global_norm_squared(&self.grads).sqrt())
    }

    fn adamw_update(
        &mut self,
        tensors: &[(Range<usize>, bool)],
        opt: &OptimStep,
        grad_scale: f64,
    ) -> Result<()> {
        for (r, decay) in tensors {
            let wd = if *decay { opt.weight_decay } else { 0.0 };
            adamw_update(
                &mut self.params[r.clone()],
                &self.grads[r.clone()],
                &mut self.m[r.clone()],
                &mut self.v[r.clone()],
                opt.step,
                opt.lr,
                opt.beta1,
                opt.beta2,
                opt.eps,
                wd,
                grad_scale,
            );
        }
        Ok(())
    }

    fn upload_params(&mut self, params: &[f32]) -> Result<()> {
        upload(&mut self.params, params, "parameters")
    }

    fn upload_moments(&mut self, m: &[f32], v: &[f32]) -> Result<()> {
        upload(&mut self.m, m, "first moments")?;
        upload(&mut self.v, v, "second moments")
    }

    fn with_state<R>(&self, f: impl FnOnce(&[F], &[F], &[F]) -> R) -> Result<R> {
        Ok(f(&self.params, &self.m, &self.v))
    }

    fn download_grads(&self) -> Result<Vec<F>> {
        Ok(self.grads.clone())
    }
}

/// arena = values widened or narrowed to F; the lengths must agree.
fn upload<F: Float>(arena: &mut [F], values: &[f32], what: &str) -> Result<()> {
    if arena.len() != values.len() {
        return Err(Error::internal(format!(
            "{} {what} for an arena of {}",
            values.len(),
            arena.len()
        )));
    }
    for (a, &x) in arena.iter_mut().zip(values) {
        *a = F::from_f64(x as f64);
    }
    Ok(())
}
